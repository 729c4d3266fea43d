"""Group-held-out folds: no compound on both sides, every class trained in every fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from morphoprof.errors import InputError
from morphoprof.models.splits import group_folds, single_group_classes, split_groups
from tests.conftest import shared


def check_folds(table: pd.DataFrame, folds, label: str, group: str) -> None:
    seen_test = np.zeros(len(table), int)
    for train, test in folds:
        assert set(table[group].iloc[train]).isdisjoint(table[group].iloc[test])
        assert set(table[label].iloc[train]) == set(table[label])  # every class trained
        assert len(set(train) | set(test)) == len(table) and not set(train) & set(test)
        seen_test[test] += 1
    assert (seen_test == 1).all()  # every image tested exactly once


def test_grouped_split_on_the_6moa_labels():
    labels = pd.read_csv(shared("bbbc021", "fields_6moa", "labels.csv"), sep=";", index_col=0)
    for seed in range(5):
        folds = group_folds(labels, "moa", "compound", n_folds=3, seed=seed)
        check_folds(labels, folds, "moa", "compound")
        # Each fold tests about a third of each MoA's compounds (round-robin per MoA).
        for _, test in folds:
            per_moa = labels.iloc[test].groupby("moa")["compound"].nunique()
            assert per_moa.max() <= 2


def test_grouped_split_synthetic_and_seeded():
    rng = np.random.default_rng(0)
    rows = [{"moa": f"m{m}", "compound": f"c{m}_{c}", "x": rng.random()}
            for m in range(4) for c in range(2 + m) for _ in range(rng.integers(1, 6))]
    table = pd.DataFrame(rows)
    a = group_folds(table, "moa", "compound", n_folds=2, seed=1)
    b = group_folds(table, "moa", "compound", n_folds=2, seed=1)
    check_folds(table, a, "moa", "compound")
    assert all((x[1] == y[1]).all() for x, y in zip(a, b))
    c = group_folds(table, "moa", "compound", n_folds=2, seed=2)
    assert any(len(x[1]) != len(y[1]) or (x[1] != y[1]).any() for x, y in zip(a, c))


def test_a_class_with_one_compound_cannot_be_held_out():
    table = pd.DataFrame({"moa": ["A", "A", "B", "B", "C"],
                          "compound": ["a1", "a2", "b1", "b2", "c1"]})
    assert single_group_classes(table, "moa", "compound") == ["C"]
    with pytest.raises(InputError, match=r"\['C'\].*single.*cannot be held out"):
        group_folds(table, "moa", "compound")
    mixed = pd.DataFrame({"moa": ["A", "B", "A", "B"], "compound": ["x", "x", "y", "z"]})
    with pytest.raises(InputError, match="more than one"):
        group_folds(mixed, "moa", "compound")
    with pytest.raises(InputError, match="column"):
        group_folds(table, "moa", "well")
    with pytest.raises(InputError, match="empty"):
        group_folds(table.iloc[:4], "moa", "compound", n_folds=5)


def test_split_groups_keeps_wells_whole():
    wells = np.repeat([f"w{i}" for i in range(10)], 3)
    keep, held = split_groups(wells, 0.2, seed=0)
    assert set(wells[keep]).isdisjoint(wells[held])
    assert len(set(wells[held])) == 2 and len(keep) + len(held) == 30
    assert len(split_groups(wells, 0.0)[1]) == 0
