"""The extract stage from Python: the same call the CLI makes, one input of three."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from morphoprof.errors import InputError
from morphoprof.extract import extract_stage
from morphoprof.shards import read_features


def test_crops_from_python_with_anndata_and_bad_requests_named(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", crops=rng.integers(0, 999, (6, 20, 20, 2)).astype(np.uint16))
    pd.DataFrame({"plate": ["P1"] * 3 + ["P2"] * 3, "well": ["A01"] * 6,
                  "compound": ["DMSO"] * 6}).to_csv(tmp_path / "c.csv", index=False)
    s = extract_stage(tmp_path / "f", crops=tmp_path / "c.npz", crop_table=tmp_path / "c.csv",
                      settings={"model": "resnet18", "weights": "random", "batch_size": 4},
                      fmt="h5ad")
    feats = read_features(tmp_path / "f")
    assert s.cells == len(feats) == 6 and s.anndata == str(tmp_path / "f" / "features.h5ad")
    assert feats["Metadata_control"].all()  # DMSO, the default control
    with pytest.raises(InputError, match="needs an index"):
        extract_stage(tmp_path / "g")
    with pytest.raises(InputError, match="give no checkpoint"):
        extract_stage(tmp_path / "g", crops=tmp_path / "c.npz", crop_table=tmp_path / "c.csv",
                      extractor="classical", checkpoint=tmp_path / "w.ckpt")


def test_an_anndata_write_that_fails_leaves_no_part_file(tmp_path, monkeypatch):
    """A full disk while writing features.h5ad: one line (h5py's own runs over several), and
    the part-written file removed: it held the space the next command needed."""
    import errno

    from morphoprof import extract
    from morphoprof.errors import OutputError

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", crops=rng.integers(0, 999, (4, 20, 20, 1)).astype(np.uint16))
    pd.DataFrame({"plate": ["P1"] * 4, "well": ["A01"] * 4,
                  "compound": ["DMSO"] * 4}).to_csv(tmp_path / "c.csv", index=False)

    def full_disk(path, table, fmt):
        path.write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed:\n"
                                    "errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(extract, "write_anndata", full_disk)
    with pytest.raises(OutputError) as got:
        extract_stage(tmp_path / "f", crops=tmp_path / "c.npz", crop_table=tmp_path / "c.csv",
                      settings={"model": "resnet18", "weights": "random"}, fmt="h5ad")
    assert str(got.value) == f"cannot write {tmp_path / 'f' / 'features.h5ad'}: " \
                             "No space left on device"
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "manifest.json", "run_summary.json", "shards"]
