"""Cross-validation splits that keep a whole group (a compound, a well) on one side.

A classifier that has seen a compound's images is judged on how well it recognises *that
compound*, not its mechanism: MoA accuracy only means something when every compound of the test
fold is absent from training (Ljosa 2013's NSC rule, Kensert 2019's leave-compound-out CV).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from morphoprof.errors import InputError


def single_group_classes(table: pd.DataFrame, label_col: str, group_col: str) -> list[str]:
    """Classes (values of ``label_col``) held by a single group: they cannot be held out, since
    no other group of the class would remain to learn it from."""
    n = table.groupby(label_col, observed=True)[group_col].nunique()
    return sorted(str(k) for k in n[n < 2].index)


def group_folds(
    table: pd.DataFrame,
    label_col: str,
    group_col: str,
    n_folds: int = 3,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold: ``n_folds`` (train_rows, test_rows) pairs of row positions.

    Each class's groups are shuffled (seeded) and dealt round-robin to the folds, so every fold
    tests about ``1 / n_folds`` of each class's groups, a group is never on both sides, and every
    class keeps at least one group in training (classes need >= 2 groups).

    Args:
        table: one row per image, with ``label_col`` and ``group_col``.
        label_col: the class column (e.g. ``Metadata_moa``).
        group_col: the unit held out whole (e.g. ``Metadata_compound``, or ``Metadata_well``).
        n_folds: number of folds (>= 2).
        seed: seeds the shuffling.

    Raises:
        InputError: a column is missing, a class has a single group, or a group carries two
            classes.
    """
    for col in (label_col, group_col):
        if col not in table.columns:
            raise InputError(f"cross-validation needs column {col!r}; found {list(table.columns)}")
    if n_folds < 2:
        raise InputError(f"cross-validation needs >= 2 folds, got {n_folds}")
    labels = table[label_col].astype(str).to_numpy()
    groups = table[group_col].astype(str).to_numpy()
    per_group = pd.Series(labels).groupby(groups).nunique()
    mixed = sorted(per_group[per_group > 1].index)
    if mixed:
        raise InputError(f"group(s) {mixed[:5]} of {group_col!r} carry more than one "
                         f"{label_col!r}; a group must have one class")
    lonely = single_group_classes(table.assign(**{label_col: labels, group_col: groups}),
                                  label_col, group_col)
    if lonely:
        raise InputError(
            f"class(es) {lonely} of {label_col!r} have a single {group_col!r}: it cannot be held "
            "out (nothing of that class would be left to train on); drop them or group by a "
            "finer unit")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for label in sorted(set(labels)):
        members = sorted(set(groups[labels == label]))
        for k, g in enumerate(rng.permutation(members)):
            fold_of[str(g)] = (offset + k) % n_folds
        offset += len(members)  # spread the remainders of different classes over the folds
    fold = np.array([fold_of[g] for g in groups])
    rows = np.arange(len(table))
    out = [(rows[fold != f], rows[fold == f]) for f in range(n_folds)]
    empty = [f for f, (_, test) in enumerate(out) if len(test) == 0]
    if empty:
        raise InputError(f"fold(s) {empty} would be empty: {len(fold_of)} groups for "
                         f"{n_folds} folds")
    return out


def split_groups(
    groups: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split row positions into (keep, held-out) by whole groups (e.g. wells for validation):
    about ``fraction`` of the groups go to the held-out side (at least one when fraction > 0)."""
    groups = np.asarray(groups).astype(str)
    unique = np.unique(groups)
    rows = np.arange(len(groups))
    if fraction <= 0 or len(unique) < 2:
        return rows, rows[:0]
    n_out = min(len(unique) - 1, max(1, int(round(fraction * len(unique)))))
    out = set(np.random.default_rng(seed).permutation(unique)[:n_out])
    mask = np.array([g in out for g in groups])
    return rows[~mask], rows[mask]
