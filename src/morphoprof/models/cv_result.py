"""What a cross-validated training run found: :class:`CVResult` (written as ``cv.json``) and
its folds (:class:`FoldResult`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from morphoprof.classification import ClassificationSummary


@dataclass(frozen=True)
class FoldResult:
    """One fold: the groups it held out, its image counts, its held-out image accuracy, its
    training time (s) and the epochs it ran."""

    fold: int
    held_out: tuple[str, ...]
    n_train: int
    n_test: int
    image_accuracy: float
    train_seconds: float
    epochs_run: int | None

    def to_json(self) -> dict:
        """The fold's entry in ``cv.json``'s ``folds``."""
        return {"fold": self.fold, "held_out": list(self.held_out), "n_train": self.n_train,
                "n_test": self.n_test, "image_accuracy": self.image_accuracy,
                "train_seconds": self.train_seconds, "epochs_run": self.epochs_run}

    @classmethod
    def from_json(cls, d: dict) -> FoldResult:
        """Back from :meth:`to_json`."""
        return cls(**{**d, "held_out": tuple(d["held_out"])})


@dataclass(frozen=True)
class CVResult:
    """A cross-validation of an image classifier, holding out whole groups (compounds).

    Attributes:
        classes: the K classes, in the order of the probability columns.
        label, group: the class column and the column held out together.
        n_images: images scored (each once, by the fold that held it out).
        folds: one :class:`FoldResult` per fold.
        image_accuracy: out-of-fold accuracy over all images.
        treatment: the treatments' predictions (images aggregated by
            ``treatment_aggregation``) against their labels.
        treatment_aggregation: ``mean`` or ``median``.
        conformal: the group-conformal sets' ``alpha``, ``target_coverage``, ``coverage``,
            ``mean_set_size``... (:func:`~morphoprof.classification.set_metrics`).
        train_seconds: training time summed over the folds, s.
        kind: ``finetune`` or ``mil`` (set by :func:`~morphoprof.models.run.run_training`).
        trunk: a MIL run's trunk: frozen, cached maps, input statistics...
        jacobian_overlays: the PNG overlays of a MIL run's Jacobian maps.
    """

    classes: tuple[str, ...]
    label: str
    group: str
    n_images: int
    folds: tuple[FoldResult, ...]
    image_accuracy: float
    treatment: ClassificationSummary
    treatment_aggregation: str
    conformal: dict[str, Any]
    train_seconds: float
    kind: str | None = None
    trunk: dict[str, Any] | None = None
    jacobian_overlays: tuple[str, ...] | None = None

    def with_run(self, **changes: Any) -> CVResult:
        """A copy with the run's ``kind``, ``trunk`` or ``jacobian_overlays`` set."""
        return replace(self, **changes)

    def to_json(self) -> dict:
        """``cv.json``: every attribute, the optional ones only where set."""
        out = {"classes": list(self.classes), "label": self.label, "group": self.group,
               "n_images": self.n_images, "folds": [f.to_json() for f in self.folds],
               "image_accuracy": self.image_accuracy, "treatment": self.treatment.to_json(),
               "treatment_aggregation": self.treatment_aggregation,
               "conformal": self.conformal, "train_seconds": self.train_seconds}
        for key in ("kind", "trunk", "jacobian_overlays"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "jacobian_overlays" else value
        return out

    @classmethod
    def from_json(cls, d: dict) -> CVResult:
        """Back from :meth:`to_json` (a ``cv.json``)."""
        overlays = d.get("jacobian_overlays")
        return cls(classes=tuple(d["classes"]), label=d["label"], group=d["group"],
                   n_images=d["n_images"], folds=tuple(FoldResult.from_json(f)
                                                       for f in d["folds"]),
                   image_accuracy=d["image_accuracy"],
                   treatment=ClassificationSummary.from_json(d["treatment"]),
                   treatment_aggregation=d["treatment_aggregation"],
                   conformal=d["conformal"], train_seconds=d["train_seconds"],
                   kind=d.get("kind"), trunk=d.get("trunk"),
                   jacobian_overlays=tuple(overlays) if overlays is not None else None)

    def summary(self) -> dict:
        """The headline numbers (for benchmarks and reports): treatment accuracy and counts,
        image accuracy, per-class accuracy, the confusion matrix, the folds' held-out groups,
        accuracy and time, the conformal sets and the training time."""
        t = self.treatment
        return {"treatment_accuracy": t.accuracy, "treatment_counts": f"{t.correct}/{t.n}",
                "image_accuracy": self.image_accuracy,
                "per_class": {m: v["accuracy"] for m, v in t.per_class().items()},
                "confusion": t.matrix.tolist(), "classes": list(self.classes),
                "folds": [{"held_out": list(f.held_out), "image_accuracy": f.image_accuracy,
                           "train_seconds": f.train_seconds} for f in self.folds],
                "conformal": self.conformal, "train_seconds": self.train_seconds}

    def summary_line(self) -> str:
        """One line: treatment and image accuracy, the conformal sets' coverage and size."""
        t, c = self.treatment, self.conformal
        return (f"{self.kind}: treatment accuracy {t.correct}/{t.n} = {t.accuracy:.3f} "
                f"(image accuracy {self.image_accuracy:.3f}); conformal coverage "
                f"{c['coverage']:.3f} at target {c['target_coverage']:.2f}, mean set size "
                f"{c['mean_set_size']:.2f}")
