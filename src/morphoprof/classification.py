"""How well a single-label classifier did: one summary (accuracy, per-class accuracy, confusion
matrix) for every place that scores predictions against labels, whether the predictions come
from 1-NN on profiles (NSC / NSCB), from a cross-validated network, or from held-out cells; and
split-conformal prediction sets over any score matrix (Vovk; Angelopoulos & Bates 2021).

It sits below the stages so that training (``models``) and evaluation use the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from morphoprof.errors import InputError


@dataclass(frozen=True, eq=False)
class ClassificationSummary:
    """Counts of (true, predicted) label pairs.

    Attributes:
        labels: the K class names, in matrix order.
        matrix: ``(K, K)`` int confusion matrix, true classes as rows, predictions as columns.
    """

    labels: tuple[str, ...]
    matrix: np.ndarray

    @classmethod
    def from_indices(cls, true: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray,
                     labels: Sequence[str]) -> ClassificationSummary:
        """From ``(n,)`` true and predicted class indices into ``labels``."""
        t, p = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
        if t.shape != p.shape or t.ndim != 1:
            raise InputError(f"true and predicted labels differ in shape: {t.shape} vs {p.shape}")
        k = len(labels)
        if len(t) and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k):
            raise InputError(f"class indices must lie in 0..{k - 1}")
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (t, p), 1)
        return cls(tuple(str(c) for c in labels), matrix)

    @classmethod
    def from_names(cls, true: Sequence[str], pred: Sequence[str],
                   labels: Sequence[str] | None = None) -> ClassificationSummary:
        """From ``(n,)`` true and predicted class names; ``labels``: the classes (default: the
        sorted names seen in ``true`` and ``pred``)."""
        names = list(labels) if labels is not None else sorted(set(true) | set(pred))
        pos = {c: k for k, c in enumerate(names)}
        unknown = sorted({c for c in (*true, *pred) if c not in pos})
        if unknown:
            raise InputError(f"labels {unknown} are not among the classes {names}")
        return cls.from_indices([pos[c] for c in true], [pos[c] for c in pred], names)

    @property
    def n(self) -> int:
        """Number of scored predictions."""
        return int(self.matrix.sum())

    @property
    def correct(self) -> int:
        """Number of right predictions."""
        return int(np.trace(self.matrix))

    @property
    def accuracy(self) -> float | None:
        """Fraction right; None when nothing was scored."""
        return self.correct / self.n if self.n else None

    def per_class(self, present_only: bool = False) -> dict[str, dict]:
        """``{class: {"accuracy", "correct", "n"}}`` over each class's true members (accuracy
        None for a class with none; ``present_only`` leaves those out)."""
        out = {}
        for k, c in enumerate(self.labels):
            n_k, c_k = int(self.matrix[k].sum()), int(self.matrix[k, k])
            if n_k or not present_only:
                out[c] = {"accuracy": c_k / n_k if n_k else None, "correct": c_k, "n": n_k}
        return out

    def to_json(self) -> dict:
        """``{"accuracy", "correct", "n", "per_class", "confusion": {"labels", "matrix"}}``."""
        return {"accuracy": self.accuracy, "correct": self.correct, "n": self.n,
                "per_class": self.per_class(),
                "confusion": {"labels": list(self.labels), "matrix": self.matrix.tolist()}}

    @classmethod
    def from_json(cls, d: dict) -> ClassificationSummary:
        """Back from :meth:`to_json` (its confusion matrix)."""
        return cls(tuple(d["confusion"]["labels"]), np.asarray(d["confusion"]["matrix"],
                                                                dtype=np.int64))


def conformal_threshold(calibration_scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n + 1)(1 - alpha)) / n empirical quantile of the
    ``n`` calibration scores (true-label nonconformity). ``inf`` when n is too small for the
    requested coverage (every label is then in every set: honest, not a wrong number)."""
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    n = len(s)
    k = int(np.ceil((n + 1) * (1 - alpha)))
    return float("inf") if k > n else float(s[k - 1])


def prediction_sets(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """``(m, K)`` nonconformity scores -> ``(m, K)`` boolean sets (score <= threshold; one
    threshold, or one per row)."""
    t = np.asarray(threshold, dtype=np.float64)
    return np.asarray(scores) <= (t[:, None] if t.ndim == 1 else t)


def set_metrics(sets: np.ndarray, true_index: np.ndarray) -> dict:
    """Empirical coverage (true label in set), mean set size, and the fraction of singletons."""
    sets = np.asarray(sets, bool)
    true_index = np.asarray(true_index)
    covered = sets[np.arange(len(sets)), true_index]
    size = sets.sum(1)
    return {"coverage": float(covered.mean()), "mean_set_size": float(size.mean()),
            "singleton_fraction": float((size == 1).mean()), "n": int(len(sets))}
