"""The one classification summary: counts by hand, both constructors agree, every consumer
(1-NN MoA evaluation, cross-validation, weak supervision) reports through it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from morphoprof.classification import ClassificationSummary
from morphoprof.errors import InputError
from morphoprof.evaluation.moa import nearest_neighbor_moa


def test_counts_per_class_and_confusion_by_hand():
    s = ClassificationSummary.from_indices([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 1, 0],
                                           ["a", "b", "c"])
    assert (s.correct, s.n) == (4, 6) and s.accuracy == pytest.approx(4 / 6)
    np.testing.assert_array_equal(s.matrix, [[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert s.per_class()["a"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "n": 3}
    assert s.per_class()["c"] == {"accuracy": 0.0, "correct": 0, "n": 1}
    j = s.to_json()
    assert j["confusion"] == {"labels": ["a", "b", "c"],
                              "matrix": [[2, 1, 0], [0, 2, 0], [1, 0, 0]]}
    assert (j["accuracy"], j["correct"], j["n"]) == (s.accuracy, 4, 6)
    by_name = ClassificationSummary.from_names(list("aaabbc"), list("abaaba"), ["a", "b", "c"])
    assert by_name.per_class()["b"] == {"accuracy": 0.5, "correct": 1, "n": 2}


def test_absent_classes_and_empty_input():
    s = ClassificationSummary.from_indices([0, 0], [0, 1], ["x", "y"])
    assert s.per_class()["y"] == {"accuracy": None, "correct": 0, "n": 0}
    assert list(s.per_class(present_only=True)) == ["x"]
    empty = ClassificationSummary.from_indices([], [], ["x"])
    assert empty.accuracy is None and empty.n == 0


def test_bad_input_is_named():
    with pytest.raises(InputError, match="0..1"):
        ClassificationSummary.from_indices([0, 2], [0, 1], ["x", "y"])
    with pytest.raises(InputError, match="shape"):
        ClassificationSummary.from_indices([0, 1], [0], ["x", "y"])
    with pytest.raises(InputError, match=r"\['z'\]"):
        ClassificationSummary.from_names(["x", "z"], ["x", "x"], ["x", "y"])


def test_nearest_neighbour_moa_reports_through_the_summary():
    # A1 and A2 are compound pairs of MoA A, B1 / B2 of MoA B; A2 looks like B
    df = pd.DataFrame({
        "Metadata_compound": ["a1", "a2", "b1", "b2"],
        "Metadata_concentration": [1.0] * 4,
        "Metadata_moa": ["A", "A", "B", "B"],
        "f1": [1.0, 0.0, 0.1, 0.0], "f2": [0.0, 1.0, 1.0, 0.9]})
    r = nearest_neighbor_moa(df, "nsc")
    preds = [p["predicted"] for p in r["predictions"]]
    s = ClassificationSummary.from_names(df["Metadata_moa"].tolist(), preds, ["A", "B"])
    assert r["confusion"] == s.to_json()["confusion"]
    assert r["per_moa"] == s.per_class() and (r["correct"], r["n"]) == (s.correct, s.n)
