"""Normalisation of profiles against a reference subset (DMSO controls by default).

``standardize`` subtracts the reference mean and divides by its standard deviation; ``robust``
uses the median and the MAD (x 1.4826); ``center`` only subtracts the reference mean; ``spherize``
(TVN) whitens; ``coral`` aligns each batch's covariance to the pooled controls'; ``factor_analysis``
turns profiles into factor scores; ``inverse_normal`` maps each feature's ranks among the
reference rows to normal scores (rank-based inverse normal transform, as pycytominer). Each is
fitted per plate (default), per batch or on all rows, so plate and batch shifts that also move
the controls cancel out; fitted transforms are saved and re-applied with :class:`Normalizer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from morphoprof.errors import InputError
from morphoprof.index.schema import CONTROL, PLATE
from morphoprof.io_utils import load_array_file, write_npz
from morphoprof.settings import Settings
from morphoprof.shards import feature_columns

logger = logging.getLogger(__name__)

METHODS = ("standardize", "robust", "center", "spherize", "coral", "factor_analysis",
           "inverse_normal", "none")
METHOD_ALIASES = {"mad_robustize": "robust"}  # pycytominer's name, accepted
# the default of normalize() and the normalize command (as pycytominer's normalize)
DEFAULT_METHOD = "robust"


class NormalizationConfig(Settings):
    """How profiles are normalised (:class:`Normalizer`'s settings): a run config's
    ``profiles.normalization``, the normalisation options of ``morphoprof aggregate`` and
    ``normalize``."""

    method: Literal[METHODS + tuple(METHOD_ALIASES)] | None = Field(
        None, description="normalisation of the profiles, fitted on the reference rows "
        "(default: center; none, with a note, when the table has no control rows)")
    by: str = Field("plate", description="fit separately per plate, batch, all (one fit), or "
                    "any metadata column")
    reference: Literal["controls", "all"] = Field("controls", description="rows the "
                                                  "normalisation is fitted on")
    eps: float = Field(1e-6, ge=0, description="scale floor; for spherize / coral, the "
                       "covariance regulariser")
    n_factors: int = Field(50, ge=1, description="factor_analysis: number of factors")
    fallback: Literal["none", "all"] = Field(
        "none", description="a plate without controls: error (none) or fit on all its rows "
        "(all)")
FACTOR_PREFIX = "Factor_"


def _reference_mask(df: pd.DataFrame, reference: str) -> np.ndarray:
    if reference == "all":
        return np.ones(len(df), bool)
    if CONTROL not in df.columns:
        raise InputError(f"reference='controls' needs a {CONTROL} column (or use reference='all')")
    return df[CONTROL].fillna(False).astype(bool).to_numpy()


def _quantile_transformer(n_quantiles: int):
    """scikit-learn's quantile transform to normal scores, on every row (no subsampling, so a
    fit is deterministic)."""
    from sklearn.preprocessing import QuantileTransformer

    return QuantileTransformer(n_quantiles=n_quantiles, output_distribution="normal",
                               subsample=None)


def _sqrtm(cov: np.ndarray, power: float, eps: float) -> np.ndarray:
    """Symmetric matrix power of ``cov + eps I`` (power 0.5 or -0.5)."""
    vals, vecs = np.linalg.eigh(cov)
    vals = np.clip(vals, 0.0, None) + eps
    return (vecs * vals**power) @ vecs.T


class Normalizer:
    """A normalisation fitted on reference rows (DMSO controls by default), group by group, that
    can be saved and applied to new data.

    Methods (``x`` a row of features, statistics from the group's reference rows):

    - ``center``: ``x - mean``; ``standardize``: ``(x - mean) / std``; ``robust``:
      ``(x - median) / (1.4826 MAD)`` (pycytominer's ``mad_robustize``);
    - ``spherize``: TVN (Ando 2017), PCA (or ZCA) whitening so the reference rows have zero mean
      and identity covariance (see :class:`Spherize`);
    - ``coral``: CORAL (Sun 2016) alignment: each group's rows are whitened with its reference
      covariance and re-coloured with the covariance of *all* groups' reference rows, so every
      batch's controls end up with the same mean and covariance;
    - ``factor_analysis``: factor-analysis profiles (Ljosa 2013): a factor model with
      ``n_factors`` factors is fitted on the reference rows and every row is replaced by its
      factor scores (features ``Factor_1..k``); fitted on all groups together;
    - ``inverse_normal``: each feature's value is placed among the reference rows' quantiles
      (at most 1,000) and mapped to the standard normal quantile of that rank (scikit-learn's
      ``QuantileTransformer``, as pycytominer's ``inverse_normal``), so every feature of the
      reference rows ends up ~N(0, 1) whatever its original distribution.

    ``mad_robustize`` (pycytominer's name) is accepted for ``robust``.

    Args:
        method: one of :data:`METHODS`.
        by: metadata column whose groups are fitted separately (``None``: all rows together).
        reference: ``controls`` (``Metadata_control`` true) or ``all``.
        eps: floor of scales / regulariser of covariances.
        n_factors: factors for ``factor_analysis``.
        fallback: ``none`` (a group without reference rows is an error) or ``all`` (fit such a
            group on all its rows, and say so in :attr:`warnings`).
    """

    def __init__(self, method: str = DEFAULT_METHOD, by: str | None = PLATE,
                 reference: str = "controls", eps: float = 1e-6, n_factors: int = 50,
                 fallback: str = "none", spherize_mode: str = "pca") -> None:
        method = METHOD_ALIASES.get(method, method)
        if method not in METHODS:
            raise InputError(f"normalization method must be one of {METHODS}, got {method!r}")
        if reference not in ("controls", "all"):
            raise InputError(f"reference must be 'controls' or 'all', got {reference!r}")
        if fallback not in ("none", "all"):
            raise InputError(f"fallback must be 'none' or 'all', got {fallback!r}")
        if method == "factor_analysis" and by is not None:
            raise InputError("factor_analysis is fitted on all groups together: use by=None "
                             "(normalise per plate first with another method if needed)")
        self.method, self.by, self.reference = method, by, reference
        self.eps, self.n_factors, self.fallback = float(eps), int(n_factors), fallback
        self.spherize_mode = spherize_mode
        self.features: list[str] = []
        self.params: dict[str, dict[str, np.ndarray]] = {}
        self.warnings: list[str] = []

    # -- fitting -------------------------------------------------------------------------------
    def _groups(self, df: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        if self.by is None:
            return [("__all__", np.arange(len(df)))]
        if self.by not in df.columns:
            raise InputError(f"cannot normalise by {self.by!r}: not a column")
        if df[self.by].isna().any():
            rows = np.flatnonzero(df[self.by].isna().to_numpy())[:5].tolist()
            raise InputError(f"{self.by} is empty in row(s) {rows}: cannot assign them a group")
        return [(str(k), v) for k, v in df.groupby(self.by, sort=True).indices.items()]

    def fit(self, df: pd.DataFrame, features: Sequence[str] | None = None) -> Normalizer:
        """Fit on the rows of ``df`` (reference rows selected by ``reference``)."""
        self.features = list(features) if features is not None else feature_columns(df)
        if not self.features:
            raise InputError("no feature columns to normalise")
        if self.method == "none":
            return self
        x = df[self.features].to_numpy(dtype=np.float64)
        if not np.isfinite(x).all():
            cols = [f for f, ok in zip(self.features, np.isfinite(x).all(0)) if not ok][:5]
            raise InputError(f"features {cols} hold NaN or infinite values; drop them first "
                             "(morphoprof's feature selection does)")
        is_ref = _reference_mask(df, self.reference)
        self.params, self.warnings = {}, []
        refs = {}
        for key, rows in self._groups(df):
            ref = x[rows][is_ref[rows]]
            if len(ref) == 0:
                where = f"{self.by}={key!r}" if self.by else "the table"
                if self.fallback != "all":
                    raise InputError(f"{where}: no reference ({self.reference}) rows to normalise "
                                     "against (fallback='all' fits such groups on all their rows)")
                self.warnings.append(f"{where}: no control rows; fitted on all {len(rows)} rows")
                logger.warning(self.warnings[-1])
                ref = x[rows]
            refs[key] = ref
        target_mean = target = None
        if self.method == "coral":
            pooled = np.concatenate(list(refs.values()))
            target_mean = pooled.mean(0)
            target = _sqrtm(np.cov(pooled, rowvar=False).reshape(x.shape[1], -1), 0.5, self.eps)
        for key, ref in refs.items():
            self.params[key] = self._fit_group(key, ref, target_mean, target)
        return self

    def _fit_group(self, key: str, ref: np.ndarray, target_mean: np.ndarray | None,
                   target: np.ndarray | None) -> dict:
        """Per-group parameters; ``target_mean`` / ``target`` (the pooled controls' mean and
        covariance square root) are used by CORAL only."""
        m = self.method
        if m in ("spherize", "coral", "factor_analysis", "standardize") and len(ref) < 2:
            raise InputError(f"{self.by}={key!r}: {m} needs at least 2 reference rows, "
                             f"got {len(ref)}")
        if m == "center":
            return {"center": ref.mean(0), "scale": np.ones(ref.shape[1])}
        if m == "standardize":
            return {"center": ref.mean(0), "scale": np.maximum(ref.std(0), self.eps)}
        if m == "robust":
            med = np.median(ref, 0)
            mad = 1.4826 * np.median(np.abs(ref - med), 0)
            return {"center": med, "scale": np.maximum(mad, self.eps)}
        if m == "spherize":
            s = Spherize(self.spherize_mode, self.eps).fit(ref)
            return {"center": s.mean_, "matrix": s.matrix_}
        if m == "inverse_normal":
            qt = _quantile_transformer(min(1000, len(ref))).fit(ref)
            return {"quantiles": qt.quantiles_, "references": qt.references_}
        if m == "coral":
            cov = np.cov(ref, rowvar=False).reshape(ref.shape[1], -1)
            return {"center": ref.mean(0), "matrix": _sqrtm(cov, -0.5, self.eps) @ target,
                    "offset": target_mean}
        from sklearn.decomposition import FactorAnalysis

        k = min(self.n_factors, ref.shape[1], len(ref) - 1)
        mean, std = ref.mean(0), np.maximum(ref.std(0), self.eps)
        fa = FactorAnalysis(n_components=k, random_state=0).fit((ref - mean) / std)
        # factor scores E[z | x] = (x - mu) Psi^-1 W^T (I + W Psi^-1 W^T)^-1, as sklearn
        w, psi = fa.components_, fa.noise_variance_
        wpsi = w / psi
        proj = wpsi.T @ np.linalg.inv(np.eye(k) + wpsi @ w.T)
        return {"center": mean, "scale": std, "matrix": proj, "fa_mean": fa.mean_}

    # -- applying ------------------------------------------------------------------------------
    def output_features(self) -> list[str]:
        """Feature names of the transformed table."""
        if self.method == "factor_analysis" and self.params:
            k = next(iter(self.params.values()))["matrix"].shape[1]
            return [f"{FACTOR_PREFIX}{i + 1}" for i in range(k)]
        return list(self.features)

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Apply the fitted transform; returns a copy with float32 features. Rows of a group the
        normaliser was not fitted on raise InputError naming the group."""
        missing = [f for f in self.features if f not in df.columns]
        if missing:
            raise InputError(f"the table lacks {len(missing)} feature(s) the normaliser was "
                             f"fitted on, e.g. {missing[:3]}")
        if self.method == "none":
            return df.copy()
        if not self.params:
            raise InputError("the normaliser is not fitted")
        x = df[self.features].to_numpy(dtype=np.float64)
        out_feats = self.output_features()
        result = np.empty((len(df), len(out_feats)))
        for key, rows in self._groups(df):
            p = self.params.get(key)
            if p is None:
                raise InputError(f"{self.by}={key!r} was not in the data the normaliser was "
                                 f"fitted on (fitted: {sorted(self.params)[:5]})")
            xr = x[rows]
            if self.method in ("center", "standardize", "robust"):
                result[rows] = (xr - p["center"]) / p["scale"]
            elif self.method == "spherize":
                result[rows] = (xr - p["center"]) @ p["matrix"]
            elif self.method == "coral":
                result[rows] = (xr - p["center"]) @ p["matrix"] + p["offset"]
            elif self.method == "inverse_normal":
                qt = _quantile_transformer(len(p["references"]))
                qt.quantiles_, qt.references_ = p["quantiles"], p["references"]
                qt.n_quantiles_, qt.n_features_in_ = len(p["references"]), xr.shape[1]
                result[rows] = qt.transform(xr)
            else:
                z = (xr - p["center"]) / p["scale"]
                result[rows] = (z - p["fa_mean"]) @ p["matrix"]
        meta = [c for c in df.columns if c not in self.features]
        out = df[meta].copy()
        values = pd.DataFrame(result.astype(np.float32), columns=out_feats, index=df.index)
        return pd.concat([out, values], axis=1)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save the fitted normaliser (one ``.npz``: settings as JSON, arrays per group)."""
        header = {"method": self.method, "by": self.by, "reference": self.reference,
                  "eps": self.eps, "n_factors": self.n_factors, "fallback": self.fallback,
                  "spherize_mode": self.spherize_mode, "features": self.features,
                  "groups": list(self.params), "warnings": self.warnings}
        arrays = {f"{i}/{name}": v for i, p in enumerate(self.params.values())
                  for name, v in p.items()}
        return write_npz(path, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        """Load a normaliser written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"fitted normaliser not found: {path}")
        try:
            with load_array_file(path) as z:
                h = json.loads(str(z["header"]))
                obj = cls(h["method"], h["by"], h["reference"], h["eps"], h["n_factors"],
                          h["fallback"], h["spherize_mode"])
                obj.features, obj.warnings = h["features"], h["warnings"]
                for i, key in enumerate(h["groups"]):
                    prefix = f"{i}/"
                    obj.params[key] = {k[len(prefix):]: z[k] for k in z.files
                                       if k.startswith(prefix)}
        except (KeyError, ValueError, OSError) as exc:
            raise InputError(f"{path} is not a morphoprof normaliser: {exc}") from exc
        return obj


def normalize(
    df: pd.DataFrame,
    method: str = DEFAULT_METHOD,
    by: str | None = PLATE,
    reference: str = "controls",
    features: Sequence[str] | None = None,
    eps: float = 1e-6,
    n_factors: int = 50,
    fallback: str = "none",
) -> pd.DataFrame:
    """Fit a :class:`Normalizer` on ``df``'s reference rows and apply it to all of ``df``.

    Args:
        df: well (or field / cell) rows with ``Metadata_*`` columns and features.
        method: see :class:`Normalizer` (``center``, ``standardize``, ``robust`` or
            ``mad_robustize``, ``spherize``, ``coral``, ``factor_analysis``,
            ``inverse_normal``, ``none``).
        by: metadata column whose groups are normalised separately (``None``: all rows at once).
        reference: ``controls`` (rows with ``Metadata_control`` true) or ``all``.
        features: feature columns (default: every non-metadata column).
        eps: floor of the scale / covariance regulariser.

    Returns:
        A copy with normalised float32 features; groups without reference rows raise InputError
        unless ``fallback='all'``.
    """
    return Normalizer(method, by, reference, eps, n_factors, fallback).fit(df, features).transform(
        df)


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
        mean = x.mean(axis=0)
        return self.fit_moments(mean, np.cov(x - mean, rowvar=False).reshape(x.shape[1], -1))

    def fit_moments(self, mean: np.ndarray, cov: np.ndarray) -> Spherize:
        """Fit from the reference's ``(d,)`` mean and ``(d, d)`` covariance (e.g. accumulated
        over cells streamed from disk)."""
        cov = np.asarray(cov, dtype=np.float64)
        self.mean_ = np.asarray(mean, dtype=np.float64)
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
