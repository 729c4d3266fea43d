"""Profiles as AnnData: what scanpy / scverse users load."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest

from morphoprof.cli import main
from morphoprof.errors import InputError
from morphoprof.profiles.anndata_io import to_anndata, write_anndata
from tests.test_profiles_pycytominer_parity import _replicates


def _wells() -> pd.DataFrame:
    df = _replicates().assign(Metadata_plate="P1", Metadata_control=False,
                              Metadata_moa=lambda d: np.where(
                                  d["Metadata_compound"] < "c3", "m1", "m2"))
    df["Metadata_well"] = [f"W{i:02d}" for i in range(len(df))]
    return df


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_round_trip_keeps_features_and_metadata(tmp_path, fmt):
    df = _wells()
    path = write_anndata(tmp_path / f"w.{fmt}", df, fmt)
    adata = anndata.read_h5ad(path) if fmt == "h5ad" else anndata.read_zarr(path)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    assert adata.shape == (len(df), len(feats))
    assert list(adata.var_names) == feats
    np.testing.assert_array_equal(adata.X, df[feats].to_numpy(np.float32))
    assert list(adata.obs["Metadata_compound"]) == list(df["Metadata_compound"])
    assert adata.obs["Metadata_concentration"].dtype.kind == "f"
    assert adata.obs["Metadata_control"].dtype == bool


def test_zarr_profiles_are_format_2_without_a_library_notice(tmp_path):
    """The .zarr store is Zarr format 2 (what every anndata reader reads), also after
    anndata's default moves to 3, and writing it shows the user no warning about that."""
    import json
    import warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        path = write_anndata(tmp_path / "w.zarr", _wells(), "zarr")
    assert [str(w.message) for w in shown] == []
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    assert not (path / "zarr.json").exists()
    if hasattr(anndata.settings, "zarr_write_format"):
        with anndata.settings.override(zarr_write_format=3):  # a user's other default
            again = write_anndata(tmp_path / "v.zarr", _wells(), "zarr")
        assert (again / ".zgroup").is_file()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no feature columns"):
        to_anndata(pd.DataFrame({"Metadata_plate": ["P1"]}))
    with pytest.raises(InputError, match="format must be one of"):
        write_anndata(tmp_path / "x.loom", _wells(), "loom")


def test_aggregate_writes_anndata_beside_parquet(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _wells().to_parquet(src / "wells.parquet")
    assert main(["aggregate", str(src), "--out", str(tmp_path / "p"), "--format", "h5ad",
                 "--normalize", "none"]) == 0
    wells = pd.read_parquet(tmp_path / "p" / "wells.parquet")
    adata = anndata.read_h5ad(tmp_path / "p" / "wells.h5ad")
    feats = [c for c in wells.columns if not c.startswith("Metadata_")]
    np.testing.assert_array_equal(adata.X, wells[feats].to_numpy(np.float32))
    assert (tmp_path / "p" / "treatments.h5ad").is_file()
    assert anndata.read_h5ad(tmp_path / "p" / "treatments.h5ad").n_obs == 6


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_scanpy_reads_and_analyses_the_profiles(tmp_path, fmt):
    """What a scverse user does next: scanpy's reader (anndata's for Zarr, which scanpy does not
    wrap), then PCA and a neighbour graph."""
    sc = pytest.importorskip("scanpy")
    src = tmp_path / "in"
    src.mkdir()
    _wells().to_parquet(src / "wells.parquet")
    assert main(["aggregate", str(src), "--out", str(tmp_path / "p"), "--format", fmt]) == 0
    path = tmp_path / "p" / f"wells.{fmt}"
    adata = sc.read_h5ad(path) if fmt == "h5ad" else anndata.read_zarr(path)
    wells = pd.read_parquet(tmp_path / "p" / "wells.parquet")
    assert adata.n_obs == len(wells)
    assert list(adata.obs["Metadata_well"]) == list(wells["Metadata_well"])
    sc.pp.pca(adata, n_comps=2)
    # exact neighbours (scikit-learn) and Gaussian connectivities: no numba compilation
    sc.pp.neighbors(adata, n_neighbors=3, use_rep="X_pca", method="gauss",
                    transformer="sklearn")
    assert adata.obsm["X_pca"].shape == (adata.n_obs, 2)
    assert adata.obsp["connectivities"].shape == (adata.n_obs, adata.n_obs)
