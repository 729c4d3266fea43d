"""WeakResult: weak.json's keys, with and without held-out cells, and the one-line report."""

from __future__ import annotations

from morphoprof.classification import ClassificationSummary
from morphoprof.models.weak_result import WeakResult


def _result(heldout: ClassificationSummary | None, cells_per_s: float | None) -> WeakResult:
    return WeakResult(
        classes=("a", "b"), channels=("DNA",), batch_column="Metadata_plate",
        cells={"train": 8, "val": 2, "test": 4 if heldout else 0}, mixup_alpha=0.2, gru=True,
        checkpoint="last.ckpt", layer="layer3", epochs_run=2, world_size=1,
        train_batches_per_epoch_per_process=3, train_batches_per_epoch=3, train_seconds=4.0,
        train_cells_per_s=cells_per_s, heldout=heldout, extract_cells_per_s=100.0,
        features="out/features", metrics_csv="out/weak/metrics.csv")


def test_held_out_scores_come_from_the_summary_and_only_with_test_cells():
    held = ClassificationSummary.from_indices([0, 0, 0, 1], [0, 0, 1, 1], ["a", "b"])
    r = _result(held, 12.0)
    d = r.to_json()
    assert d["heldout_cell_accuracy"] == 0.75
    assert d["heldout_per_class_accuracy"] == {"a": 2 / 3, "b": 1.0}
    assert (d["chance_accuracy"], d["heldout_majority_fraction"]) == (0.5, 0.75)  # 3 of 4 "a"
    assert list(d)[14:18] == ["chance_accuracy", "heldout_cell_accuracy",
                              "heldout_majority_fraction", "heldout_per_class_accuracy"]
    assert "wall_seconds" not in d and r.with_wall_seconds(5.0).to_json()["wall_seconds"] == 5.0
    assert "held-out cell accuracy 0.750 (chance 0.500); 12 training cells/s" in r.summary_line()
    none = _result(None, None)
    assert none.heldout_cell_accuracy is None and "heldout_cell_accuracy" not in none.to_json()
    # no cells seen in this call (a resumed, finished run): no speed, and no crash
    assert "held-out" not in none.summary_line() and "- training cells/s" in none.summary_line()
