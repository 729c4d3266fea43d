"""Profiles as AnnData (the scverse container read by scanpy): features in ``X``, the
``Metadata_*`` columns in ``obs``, feature names in ``var``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.shards import feature_columns

FORMATS = ("h5ad", "zarr")


def to_anndata(df: pd.DataFrame):
    """A cytomining-convention table (``Metadata_*`` columns + features) as an AnnData.

    Args:
        df: ``(n_profiles, n_columns)``; every non-``Metadata_`` column is a feature.

    Returns:
        ``anndata.AnnData`` with ``X`` ``(n_profiles, n_features)`` float32, ``obs`` the
        metadata columns (names kept, index ``"0".."n-1"``) and ``var`` indexed by feature name.
    """
    try:
        import anndata
    except ModuleNotFoundError:
        raise InputError("AnnData output needs the anndata package: pip install anndata") from None
    feats = feature_columns(df)
    if not feats:
        raise InputError("no feature columns to write as AnnData")
    obs = df[[c for c in df.columns if c not in feats]].reset_index(drop=True)
    for c in obs.columns:  # h5ad stores text columns as strings or categories, not objects
        if obs[c].dtype == object or pd.api.types.is_string_dtype(obs[c]):
            obs[c] = obs[c].astype(str)
    obs.index = obs.index.astype(str)
    return anndata.AnnData(X=df[feats].to_numpy(np.float32), obs=obs,
                           var=pd.DataFrame(index=pd.Index(feats, dtype=str)))


def write_anndata(path: str | Path, df: pd.DataFrame, fmt: str = "h5ad") -> Path:
    """Write ``df`` (see :func:`to_anndata`) as ``.h5ad`` (one HDF5 file) or ``.zarr`` (a
    folder). The caller writes into a temporary folder (see
    :func:`morphoprof.io_utils.atomic_dir`), so nothing half-written is left."""
    if fmt not in FORMATS:
        raise InputError(f"AnnData format must be one of {FORMATS}, got {fmt!r}")
    adata = to_anndata(df)
    path = Path(path)
    if fmt == "h5ad":
        adata.write_h5ad(path)
    else:
        _write_zarr_v2(adata, path)
    return path


def _write_zarr_v2(adata, path: Path) -> None:
    """``adata`` as a Zarr format 2 store, whatever anndata's default (it is to become format
    3): every anndata release since 0.8, and the R and Julia readers, read format 2. The
    notice anndata gives users about that change of default is not shown: the format is
    chosen here."""
    import anndata

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Writing zarr v2 data will no longer be the default",
                                UserWarning)
        if hasattr(anndata.settings, "zarr_write_format"):  # anndata >= 0.11
            with anndata.settings.override(zarr_write_format=2):
                adata.write_zarr(path)
        else:
            adata.write_zarr(path)
