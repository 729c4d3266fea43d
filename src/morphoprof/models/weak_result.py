"""What a weakly supervised training run found (Caicedo 2018): :class:`WeakResult`, written
as ``weak.json``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from morphoprof.classification import ClassificationSummary


@dataclass(frozen=True)
class WeakResult:
    """A ``train weak`` run.

    Attributes:
        classes: the weak labels (treatments), in the network's output order.
        channels: the stains the crops hold, in order.
        batch_column: the column sequences and mixup partners were drawn across.
        cells: ``{"train", "val", "test"}`` cell counts.
        mixup_alpha, gru: the regularisers' settings.
        checkpoint: the checkpoint the embeddings come from (best on validation, else last).
        layer: the embedding layer.
        epochs_run, world_size: epochs trained; processes that trained.
        train_batches_per_epoch_per_process, train_batches_per_epoch: batches per epoch.
        train_seconds: training wall time, s; train_cells_per_s: cells seen per second.
        heldout: the held-out cells' predictions against their labels (None: no test cells).
        extract_cells_per_s: embedding speed over every cell.
        features: the feature folder of every cell's embedding; metrics_csv: per-epoch losses.
        wall_seconds: the whole call, s (set by :func:`~morphoprof.train.train_weak_from_yaml`;
            not in ``weak.json``).
    """

    classes: tuple[str, ...]
    channels: tuple[str, ...]
    batch_column: str
    cells: dict[str, int]
    mixup_alpha: float
    gru: bool
    checkpoint: str
    layer: str
    epochs_run: int
    world_size: int
    train_batches_per_epoch_per_process: int
    train_batches_per_epoch: int
    train_seconds: float
    train_cells_per_s: float | None
    heldout: ClassificationSummary | None
    extract_cells_per_s: float | None
    features: str
    metrics_csv: str
    wall_seconds: float | None = None

    @property
    def chance_accuracy(self) -> float:
        """1 / the number of labels."""
        return 1.0 / len(self.classes)

    @property
    def heldout_majority_fraction(self) -> float | None:
        """The most common held-out label's share of the test cells."""
        if self.heldout is None:
            return None
        return float(self.heldout.matrix.sum(axis=1).max() / self.heldout.n)

    @property
    def heldout_cell_accuracy(self) -> float | None:
        """Accuracy over the held-out cells (None: no test cells)."""
        return self.heldout.accuracy if self.heldout is not None else None

    @property
    def heldout_per_class_accuracy(self) -> dict[str, float | None] | None:
        """Held-out accuracy per label present among the test cells."""
        if self.heldout is None:
            return None
        return {c: v["accuracy"] for c, v in self.heldout.per_class(present_only=True).items()}

    def with_wall_seconds(self, seconds: float) -> WeakResult:
        """A copy with the call's wall time."""
        return replace(self, wall_seconds=seconds)

    def to_json(self) -> dict[str, Any]:
        """``weak.json``: the attributes in order, the held-out scores only with test cells,
        ``wall_seconds`` only where set."""
        out: dict[str, Any] = {
            "classes": list(self.classes), "channels": list(self.channels),
            "batch_column": self.batch_column, "cells": dict(self.cells),
            "mixup_alpha": self.mixup_alpha, "gru": self.gru, "checkpoint": self.checkpoint,
            "layer": self.layer, "epochs_run": self.epochs_run, "world_size": self.world_size,
            "train_batches_per_epoch_per_process": self.train_batches_per_epoch_per_process,
            "train_batches_per_epoch": self.train_batches_per_epoch,
            "train_seconds": self.train_seconds, "train_cells_per_s": self.train_cells_per_s,
            "chance_accuracy": self.chance_accuracy}
        if self.heldout is not None:
            out.update(heldout_cell_accuracy=self.heldout_cell_accuracy,
                       heldout_majority_fraction=self.heldout_majority_fraction,
                       heldout_per_class_accuracy=self.heldout_per_class_accuracy)
        out.update(extract_cells_per_s=self.extract_cells_per_s, features=self.features,
                   metrics_csv=self.metrics_csv)
        if self.wall_seconds is not None:
            out["wall_seconds"] = self.wall_seconds
        return out

    def summary_line(self, summary_file: str = "weak.json") -> str:
        """One line: labels, epochs, held-out accuracy against chance, speed, where things
        are."""
        acc = self.heldout_cell_accuracy
        held = (f"held-out cell accuracy {acc:.3f} (chance {self.chance_accuracy:.3f}); "
                if acc is not None else "")
        speed = f"{self.train_cells_per_s:.0f}" if self.train_cells_per_s else "-"
        return (f"weak: {len(self.classes)} labels, {self.epochs_run} epochs, {held}{speed} "
                f"training cells/s; embeddings ({self.layer}) in {self.features}; summary in "
                f"{summary_file}")
