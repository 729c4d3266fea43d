"""CVResult: cv.json written and read back, its headline summary and one-line report."""

from __future__ import annotations

import json

import numpy as np

from morphoprof.classification import ClassificationSummary
from morphoprof.models.cv_result import CVResult, FoldResult


def _result() -> CVResult:
    treatment = ClassificationSummary.from_indices([0, 0, 1, 2, 2], [0, 1, 1, 2, 2],
                                                   ["a", "b", "c"])
    folds = (FoldResult(0, ("x", "y"), 40, 20, 0.75, 12.5, 3),
             FoldResult(1, ("z",), 50, 10, 0.9, 10.0, 3))
    return CVResult(classes=("a", "b", "c"), label="Metadata_moa", group="Metadata_compound",
                    n_images=30, folds=folds, image_accuracy=0.8, treatment=treatment,
                    treatment_aggregation="median",
                    conformal={"alpha": 0.1, "target_coverage": 0.9, "coverage": 0.8,
                               "mean_set_size": 1.4},
                    train_seconds=22.5)


def test_cv_json_round_trips_and_keeps_its_keys():
    r = _result().with_run(kind="mil", trunk={"frozen": True, "input_mean": [0.5]},
                           jacobian_overlays=("o0.png",))
    d = json.loads(json.dumps(r.to_json()))  # what cv.json holds
    assert list(d) == ["classes", "label", "group", "n_images", "folds", "image_accuracy",
                       "treatment", "treatment_aggregation", "conformal", "train_seconds",
                       "kind", "trunk", "jacobian_overlays"]
    assert d["folds"][0] == {"fold": 0, "held_out": ["x", "y"], "n_train": 40, "n_test": 20,
                             "image_accuracy": 0.75, "train_seconds": 12.5, "epochs_run": 3}
    assert d["treatment"]["correct"] == 4 and d["treatment"]["n"] == 5
    back = CVResult.from_json(d)
    assert back.to_json() == d
    assert back.folds[1].held_out == ("z",) and back.jacobian_overlays == ("o0.png",)
    assert np.array_equal(back.treatment.matrix, r.treatment.matrix)
    # a finetune run has no trunk or overlays: the keys are left out, not null
    plain = _result().with_run(kind="finetune").to_json()
    assert "trunk" not in plain and "jacobian_overlays" not in plain


def test_summary_and_line_report_the_treatments():
    r = _result().with_run(kind="finetune")
    s = r.summary()
    assert s["treatment_counts"] == "4/5" and s["treatment_accuracy"] == 0.8
    assert s["per_class"] == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert s["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 2]]
    assert [f["held_out"] for f in s["folds"]] == [["x", "y"], ["z"]]
    assert r.summary_line() == ("finetune: treatment accuracy 4/5 = 0.800 (image accuracy "
                                "0.800); conformal coverage 0.800 at target 0.90, mean set "
                                "size 1.40")
