"""Cluttered hand-written digits (Kraus et al. 2016, Fig. 3): a MIL benchmark with known
instances.

Each canvas holds ``n_digits`` digits at random positions (overlaps composited by maximum).
A canvas of class d (d = 1..9) holds ``per_class * d`` digits of class d; the rest are zeros,
the distractors. Only the canvas label is given to the learner, so a MIL network has to find
the few (class 1: 10 of 100) informative instances among the zeros. Digits come from an array
the caller supplies (real MNIST in the benchmarks; scikit-learn's bundled 8x8 digits in tests),
and training and test canvases draw from disjoint halves of each class's digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.io_utils import load_array_file


@dataclass(frozen=True)
class DigitsConfig:
    """Canvas settings (defaults: Kraus's).

    Attributes:
        size: canvas side, px.
        n_digits: digits per canvas.
        per_class: a canvas of class d holds ``per_class * d`` digits of class d.
        classes: the digit classes (Kraus: 1..9; 0 is the distractor).
        train_per_class, test_per_class: canvases per class.
        digit_size: resize digits to this side first (None: as given).
        test_fraction: share of each class's digits kept for the test canvases.
        seed: seeds the split, the digit draws and the positions.
    """

    size: int = 512
    n_digits: int = 100
    per_class: int = 10
    classes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9)
    train_per_class: int = 50
    test_per_class: int = 10
    digit_size: int | None = None
    test_fraction: float = 0.2
    seed: int = 0


def _resize(digits: np.ndarray, side: int) -> np.ndarray:
    from skimage.transform import resize

    return np.stack([resize(d, (side, side), order=1, anti_aliasing=True, preserve_range=True)
                     for d in digits]).astype(np.float32)


def cluttered_digits(digits: np.ndarray, labels: np.ndarray, cfg: DigitsConfig | None = None
                     ) -> tuple[np.ndarray, pd.DataFrame]:
    """Generate the canvases.

    Args:
        digits: ``(M, h, w)`` digit images, any range (scaled to [0, 1] by the array's max).
        labels: ``(M,)`` their digit classes (0..9); class 0 and every class of ``cfg.classes``
            must be present.
        cfg: canvas settings.

    Returns:
        ``canvases`` ``(N, 1, size, size)`` float32 in [0, 1] and a table with one row per
        canvas: ``Metadata_label`` (the digit class, as text), ``Metadata_split`` (train |
        test), ``Metadata_count`` (digits of the class), ``Metadata_zeros`` (distractors) and
        ``Metadata_canvas`` (its number).
    """
    cfg = cfg or DigitsConfig()
    digits = np.asarray(digits, dtype=np.float32)
    labels = np.asarray(labels).astype(int)
    if digits.ndim != 3 or len(digits) != len(labels):
        raise InputError(f"digits must be (M, h, w) with one label each; got {digits.shape} "
                         f"and {labels.shape} labels")
    if cfg.per_class * max(cfg.classes) > cfg.n_digits:
        raise InputError(f"class {max(cfg.classes)} needs {cfg.per_class * max(cfg.classes)} "
                         f"digits but a canvas holds {cfg.n_digits}")
    missing = [c for c in (0, *cfg.classes) if not (labels == c).any()]
    if missing:
        raise InputError(f"the digit array has no digits of class(es) {missing}")
    if digits.max() > 0:
        digits = digits / digits.max()
    if cfg.digit_size is not None:
        digits = _resize(digits, cfg.digit_size)
    h, w = digits.shape[1:]
    if h > cfg.size or w > cfg.size:
        raise InputError(f"digits of {h}x{w} px do not fit a {cfg.size}-px canvas")
    rng = np.random.default_rng(cfg.seed)
    pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "test": {}}
    for c in (0, *cfg.classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(cfg.test_fraction * len(idx)))) if len(idx) > 1 else 0
        pools["test"][c] = idx[:n_test] if n_test else idx
        pools["train"][c] = idx[n_test:]
    rows, canvases = [], []
    for split, n in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
        for c in cfg.classes:
            for _ in range(n):
                k = cfg.per_class * c
                pick = np.concatenate([
                    rng.choice(pools[split][c], k, replace=k > len(pools[split][c])),
                    rng.choice(pools[split][0], cfg.n_digits - k,
                               replace=cfg.n_digits - k > len(pools[split][0]))])
                canvas = np.zeros((cfg.size, cfg.size), np.float32)
                ys = rng.integers(0, cfg.size - h + 1, len(pick))
                xs = rng.integers(0, cfg.size - w + 1, len(pick))
                for i, y0, x0 in zip(pick, ys, xs):
                    win = canvas[y0:y0 + h, x0:x0 + w]
                    np.maximum(win, digits[i], out=win)
                rows.append({"Metadata_label": str(c), "Metadata_split": split,
                             "Metadata_count": k, "Metadata_zeros": cfg.n_digits - k,
                             "Metadata_canvas": len(rows)})
                canvases.append(canvas)
    return np.stack(canvases)[:, None], pd.DataFrame(rows)


def load_digits_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (M, h, w), labels (M,))`` from an ``.npz`` holding ``images`` / ``labels``
    (or ``x`` / ``y``), e.g. ``../shared/data/mnist/mnist_10k.npz``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"digit file not found: {path}")
    try:
        with load_array_file(path) as z:
            names = set(z.files)
            xk = next((k for k in ("images", "x", "X", "digits") if k in names), None)
            yk = next((k for k in ("labels", "y", "Y", "targets") if k in names), None)
            if xk is None or yk is None:
                raise InputError(f"{path}: expected arrays 'images' and 'labels'; found "
                                 f"{sorted(names)}")
            return np.asarray(z[xk]), np.asarray(z[yk])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
