"""Retrieval metrics on profiles: average precision / mAP (the copairs definition) and
nearest-neighbour accuracies.

- :func:`average_precision`: for each query row, rank its positive and negative partners by cosine
  similarity; AP is the mean, over the positives, of the precision at each positive's rank.
- :func:`activity_map` ("phenotypic activity", replicate retrieval): each treated well retrieves the
  other wells of its treatment (positives) against the control wells (negatives); mAP per
  treatment, with copairs' permutation p-values and FDR correction.
- :func:`consistency_map` (MoA retrieval): each treatment retrieves treatments of the same MoA but
  another compound (positives) against treatments of other MoAs (negatives); mAP per MoA.
- :func:`nn_accuracy`: does a profile's nearest neighbour share a column's value (Caicedo's
  replicate accuracy with the treatment column; group accuracy with a compound family, gene or
  MoA column), optionally excluding neighbours that share other columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.evaluation.moa import annotated_treatments, feature_matrix, unit_rows
from morphoprof.index.schema import COMPOUND, CONCENTRATION, CONTROL, MOA

TREATMENT = [COMPOUND, CONCENTRATION]


def _codes(df: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    """One integer per row identifying its combination of values in ``cols``."""
    if not cols:
        return np.zeros(len(df), np.int64)
    return df.groupby(list(cols), sort=False, dropna=False).ngroup().to_numpy()


def average_precision(
    x: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    queries: np.ndarray | None = None,
    chunk: int = 1024,
) -> pd.DataFrame:
    """Average precision of each query row against its positive and negative partners.

    Args:
        x: ``(n, d)`` profiles; similarity is cosine.
        positives, negatives: ``(n, n)`` boolean pair masks (row = query); the diagonal is
            ignored. A pair should not be both.
        queries: rows to score (default: every row with at least one positive).
        chunk: query rows per block of the similarity computation (memory ~ chunk x n).

    Returns:
        One row per query: ``row``, ``average_precision``, ``n_pos_pairs``, ``n_total_pairs``
        (copairs' column names). Ties in similarity keep row order.
    """
    n = len(x)
    positives = np.asarray(positives, bool).copy()
    negatives = np.asarray(negatives, bool).copy()
    if positives.shape != (n, n) or negatives.shape != (n, n):
        raise InputError(f"pair masks must be ({n}, {n})")
    np.fill_diagonal(positives, False)
    np.fill_diagonal(negatives, False)
    if queries is None:
        queries = np.flatnonzero(positives.any(1))
    unit = unit_rows(x)
    ap = np.full(len(queries), np.nan)
    n_pos = positives[queries].sum(1)
    n_tot = n_pos + negatives[queries].sum(1)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        sim = unit[q] @ unit.T
        for r, i in enumerate(q):
            cand = np.flatnonzero(positives[i] | negatives[i])
            if not positives[i].any():
                continue
            order = cand[np.argsort(-sim[r, cand], kind="stable")]
            hits = positives[i, order]
            ranks = np.flatnonzero(hits) + 1
            ap[start + r] = np.mean(np.arange(1, len(ranks) + 1) / ranks)
    return pd.DataFrame({"row": queries, "average_precision": ap,
                         "n_pos_pairs": n_pos, "n_total_pairs": n_tot})


def _map_table(meta: pd.DataFrame, ap: pd.DataFrame, group_cols: list[str], null_size: int,
               threshold: float, seed: int) -> tuple[pd.DataFrame, dict]:
    """Per-group mAP with copairs' permutation p-values (BH-corrected), plus a summary."""
    from copairs.map import mean_average_precision
    from copairs.map.normalization import expected_ap

    ap = ap.dropna(subset=["average_precision"])
    ap = ap[ap["n_total_pairs"] > ap["n_pos_pairs"]]
    if ap.empty:
        raise InputError("no query has both positives and negatives: mAP is undefined")
    # copairs' normalised AP, clip((AP - E[AP]) / (1 - E[AP]), -1, 1), with E[AP] (its exact
    # expectation under random ranking) computed once per (positives, total) configuration
    conf = ap[["n_pos_pairs", "n_total_pairs"]].to_numpy()
    uniq, inverse = np.unique(conf, axis=0, return_inverse=True)
    mu0 = np.array([expected_ap(int(m), int(t - m)) for m, t in uniq])[inverse.ravel()]
    norm = (ap["average_precision"].to_numpy() - mu0) / np.maximum(1 - mu0, 1e-10)
    ap = ap.assign(normalized_average_precision=np.clip(norm, -1.0, 1.0))
    table = meta.iloc[ap["row"].to_numpy()][group_cols].reset_index(drop=True)
    table = pd.concat([table, ap.drop(columns="row").reset_index(drop=True)], axis=1)
    scores = mean_average_precision(table, group_cols, null_size=null_size, threshold=threshold,
                                    seed=seed, progress_bar=False)
    summary = {
        "mean_map": float(scores["mean_average_precision"].mean()),
        "mean_normalized_map": float(scores["mean_normalized_average_precision"].mean()),
        "fraction_retrieved": float(scores["below_corrected_p"].mean()),
        "n_groups": int(len(scores)),
        "n_queries": int(len(table)),
        "p_threshold": threshold,
        "null_size": null_size,
    }
    return scores, summary


def activity_map(
    wells: pd.DataFrame,
    features: Sequence[str] | None = None,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Replicate retrieval against controls ("phenotypic activity" mAP) on well profiles.

    Queries are treated wells; positives are the other wells of the same treatment (compound x
    concentration); negatives are control wells (``Metadata_control``). Treatments with a single
    well have no positive and are left out (counted in the summary).

    Returns:
        ``(per-treatment table, summary)``: the table has the treatment columns,
        ``mean_average_precision``, ``p_value``, ``corrected_p_value``, ``below_corrected_p``;
        the summary has ``mean_map``, ``fraction_retrieved`` (treatments with corrected
        p < threshold), ``n_groups``, ``n_queries``, ``single_well_treatments``.
    """
    need = [c for c in TREATMENT + [CONTROL] if c not in wells.columns]
    if need:
        raise InputError(f"activity mAP needs column(s) {need}")
    df = wells.reset_index(drop=True)
    x = feature_matrix(df, features)
    ctrl = df[CONTROL].astype(bool).to_numpy()
    if not ctrl.any():
        raise InputError("activity mAP needs control wells (Metadata_control) as negatives")
    code = _codes(df, TREATMENT)
    positives = (code[:, None] == code[None, :]) & ~ctrl[:, None] & ~ctrl[None, :]
    negatives = ~ctrl[:, None] & ctrl[None, :]
    ap = average_precision(x, positives, negatives)
    scores, summary = _map_table(df, ap, TREATMENT, null_size, threshold, seed)
    counts = pd.Series(code[~ctrl]).value_counts()
    summary["single_well_treatments"] = int((counts == 1).sum())
    return scores, summary


def consistency_map(
    treatments: pd.DataFrame,
    features: Sequence[str] | None = None,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """MoA retrieval mAP on treatment profiles: positives share the MoA but not the compound,
    negatives have another MoA. Rows without a MoA and controls are left out.

    Returns ``(per-MoA table, summary)`` as :func:`activity_map`."""
    need = [c for c in (MOA, COMPOUND) if c not in treatments.columns]
    if need:
        raise InputError(f"MoA mAP needs column(s) {need}")
    df = annotated_treatments(treatments)
    if len(df) < 3:
        raise InputError(f"MoA mAP needs at least 3 annotated treatments, got {len(df)}")
    x = feature_matrix(df, features)
    moa = _codes(df, [MOA])
    cpd = _codes(df, [COMPOUND])
    positives = (moa[:, None] == moa[None, :]) & (cpd[:, None] != cpd[None, :])
    negatives = moa[:, None] != moa[None, :]
    ap = average_precision(x, positives, negatives)
    return _map_table(df, ap, [MOA], null_size, threshold, seed)


def nn_accuracy(
    profiles: pd.DataFrame,
    target: str | Sequence[str],
    exclude_same: Sequence[str] = (),
    features: Sequence[str] | None = None,
) -> dict:
    """Fraction of rows whose most similar other row (cosine) has the same ``target`` value(s).

    Args:
        target: column(s) to match: the treatment columns give replicate accuracy; a gene,
            compound-family or MoA column gives group accuracy.
        exclude_same: neighbours sharing any of these columns' values with the query are not
            allowed (e.g. the compound column, for a group accuracy that cannot be won by
            replicates of the query itself).

    Returns:
        ``{"accuracy", "correct", "n"}``; rows with no allowed neighbour are not counted.
    """
    target = [target] if isinstance(target, str) else list(target)
    need = [c for c in target + list(exclude_same) if c not in profiles.columns]
    if need:
        raise InputError(f"nearest-neighbour accuracy needs column(s) {need}")
    df = profiles.reset_index(drop=True)
    x = unit_rows(feature_matrix(df, features))
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    for col in exclude_same:
        c = _codes(df, [col])
        sim[c[:, None] == c[None, :]] = -np.inf
    tgt = _codes(df, target)
    has = np.isfinite(sim).any(1)
    nn = np.argmax(sim, axis=1)
    correct = int((tgt[has] == tgt[nn[has]]).sum())
    n = int(has.sum())
    return {"accuracy": correct / n if n else None, "correct": correct, "n": n}
