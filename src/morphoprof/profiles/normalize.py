"""Normalisation of profiles against a reference subset (DMSO controls by default).

``standardize`` subtracts the reference mean and divides by its standard deviation; ``robust``
uses the median and the MAD (x 1.4826); ``center`` only subtracts the reference mean. Each is
fitted per plate (default), per batch or on all rows, so plate and batch intensity shifts that also
move the controls cancel out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.features.shards import feature_columns
from morphoprof.index.schema import CONTROL, PLATE

METHODS = ("standardize", "robust", "center", "spherize", "none")


def normalize(
    df: pd.DataFrame,
    method: str = "robust",
    by: str | None = PLATE,
    reference: str = "controls",
    features: Sequence[str] | None = None,
    eps: float = 1e-6,
) -> pd.DataFrame:
    """Normalise feature columns group by group against a reference subset.

    Args:
        df: well (or field / cell) rows with ``Metadata_*`` columns and features.
        method: ``standardize`` (mean / std), ``robust`` (median / 1.4826 MAD), ``center``
            (subtract the reference mean only; stable with few control wells), ``spherize``
            (TVN: PCA whitening fitted on the reference rows, see :class:`Spherize`) or ``none``.
        by: metadata column whose groups are normalised separately (``None``: all rows at once).
        reference: ``controls`` (rows with ``Metadata_control`` true) or ``all``.
        features: feature columns (default: every non-metadata column).
        eps: floor of the scale, so constant features do not divide by zero.

    Returns:
        A copy with normalised float32 features; groups without reference rows raise InputError.
    """
    if method not in METHODS:
        raise InputError(f"normalization method must be one of {METHODS}, got {method!r}")
    if reference not in ("controls", "all"):
        raise InputError(f"reference must be 'controls' or 'all', got {reference!r}")
    out = df.copy()
    if method == "none":
        return out
    feats = list(features) if features is not None else feature_columns(df)
    if reference == "controls" and CONTROL not in df.columns:
        raise InputError(f"reference='controls' needs a {CONTROL} column")
    if by is not None and by not in df.columns:
        raise InputError(f"cannot normalise by {by!r}: not a column")
    groups = [(None, np.arange(len(df)))] if by is None else list(
        df.groupby(by, sort=False).indices.items()
    )
    x = df[feats].to_numpy(dtype=np.float64)
    is_ref = (
        df[CONTROL].astype(bool).to_numpy() if reference == "controls" else np.ones(len(df), bool)
    )
    result = np.empty_like(x)
    for key, rows in groups:
        ref = x[rows][is_ref[rows]]
        if len(ref) == 0:
            raise InputError(f"{by}={key!r}: no reference ({reference}) rows to normalise against")
        if method == "spherize":
            result[rows] = Spherize("pca", eps).fit(ref).transform(x[rows])
            continue
        if method == "center":
            center, scale = ref.mean(0), np.ones(x.shape[1])
        elif method == "standardize":
            center, scale = ref.mean(0), ref.std(0)
        else:
            center = np.median(ref, 0)
            scale = 1.4826 * np.median(np.abs(ref - center), 0)
        result[rows] = (x[rows] - center) / np.maximum(scale, eps)
    out[feats] = result.astype(np.float32)
    return out


class Spherize:
    """Sphering / typical variation normalisation (TVN; Ando et al. 2017): whiten features so that
    the reference profiles (DMSO controls) have zero mean and identity covariance.

    ``mode="pca"`` rotates onto the controls' principal axes and scales each by
    ``1 / sqrt(eigenvalue + eps)``; ``mode="zca"`` rotates back afterwards (whitened features stay
    aligned with the original ones). ``eps`` regularises directions in which the controls barely
    vary (with fewer controls than features, most of them); with ``eps`` small against the
    eigenvalues, the transformed controls have covariance I.
    """

    def __init__(self, mode: str = "pca", eps: float = 1e-6) -> None:
        if mode not in ("pca", "zca"):
            raise InputError(f"spherize mode must be 'pca' or 'zca', got {mode!r}")
        self.mode = mode
        self.eps = float(eps)
        self.mean_: np.ndarray | None = None
        self.matrix_: np.ndarray | None = None

    def fit(self, reference: np.ndarray) -> Spherize:
        """Fit on ``(n, d)`` reference profiles (n >= 2)."""
        x = np.asarray(reference, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise InputError(f"spherize needs at least 2 reference profiles, got shape {x.shape}")
        self.mean_ = x.mean(axis=0)
        cov = np.cov(x - self.mean_, rowvar=False).reshape(x.shape[1], x.shape[1])
        vals, vecs = np.linalg.eigh(cov)
        vals = np.clip(vals, 0.0, None)
        w = vecs / np.sqrt(vals + self.eps)  # columns scaled: x @ w whitens (PCA)
        self.matrix_ = w @ vecs.T if self.mode == "zca" else w
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(n, d)`` -> whitened ``(n, d)`` (PCA mode: components ordered by increasing
        control variance)."""
        if self.matrix_ is None:
            raise InputError("Spherize is not fitted")
        return (np.asarray(x, dtype=np.float64) - self.mean_) @ self.matrix_

    def save(self, path: str | Path) -> Path:
        """Save the fitted transform (npz), to apply to new data later."""
        from morphoprof.io_utils import write_npz

        if self.matrix_ is None:
            raise InputError("Spherize is not fitted")
        return write_npz(path, mean=self.mean_, matrix=self.matrix_, mode=self.mode, eps=self.eps)

    @classmethod
    def load(cls, path: str | Path) -> Spherize:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"fitted transform not found: {path}")
        with np.load(path) as z:
            obj = cls(str(z["mode"]), float(z["eps"]))
            obj.mean_, obj.matrix_ = z["mean"], z["matrix"]
        return obj
