import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from morphoprof.errors import InputError, ValidationError
from morphoprof.index.schema import ExperimentIndex, build_index


def _records(tmp_path, n=3, shape=(16, 16)):
    rows = []
    for i in range(n):
        for ch in ("DNA", "Actin"):
            tifffile.imwrite(tmp_path / f"w{i}_{ch}.tif", np.zeros(shape, np.uint16))
        rows.append({
            "Metadata_plate": "P1", "Metadata_well": f"B0{i + 2}", "Metadata_site": 1,
            "Metadata_compound": "DMSO" if i == 0 else "taxol",
            "Metadata_concentration": 0 if i == 0 else 1.0,
            "Path_DNA": f"w{i}_DNA.tif", "Path_Actin": f"w{i}_Actin.tif",
        })
    return pd.DataFrame(rows)


def _problems(index, **kw):
    with pytest.raises(ValidationError) as err:
        index.validate(**kw)
    return err.value.problems


def test_build_defaults_and_valid_index(tmp_path):
    index = build_index(_records(tmp_path), ["DNA", "Actin"], tmp_path)
    assert index.channels == ["DNA", "Actin"]
    t = index.table
    assert t["Metadata_control"].tolist() == [True, False, False]
    assert t["Metadata_batch"].tolist() == ["P1"] * 3 and t["Metadata_moa"].tolist() == [""] * 3
    index.validate()
    assert index.read(1).shape == (2, 16, 16)


def test_roundtrip_keeps_relative_root_when_moved(tmp_path):
    src = tmp_path / "exp"
    src.mkdir()
    index = build_index(_records(src), ["DNA", "Actin"], src)
    index.write(src / "index.parquet")
    moved = tmp_path / "moved"
    shutil.move(src, moved)
    again = ExperimentIndex.read_parquet(moved / "index.parquet")
    assert again.root == moved.resolve()
    again.validate()
    pd.testing.assert_frame_equal(again.table, index.table)


def test_empty_table(tmp_path):
    index = ExperimentIndex(_records(tmp_path).iloc[:0], tmp_path)
    assert _problems(index) == ["the experiment index is empty (no image sets)"]


def test_missing_columns_and_no_channels(tmp_path):
    df = _records(tmp_path).drop(columns=["Path_DNA", "Path_Actin", "Metadata_compound"])
    problems = _problems(ExperimentIndex(df, tmp_path))
    assert any("missing required column(s)" in p and "Metadata_compound" in p for p in problems)
    assert any("no channel columns" in p for p in problems)


def test_duplicated_image_sets_named(tmp_path):
    df = build_index(_records(tmp_path), ["DNA", "Actin"], tmp_path).table
    df = pd.concat([df, df.iloc[[1]]], ignore_index=True)
    problems = _problems(ExperimentIndex(df, tmp_path))
    assert any("rows [1, 3]" in p and "well B03" in p for p in problems)


def test_missing_unreadable_and_unknown_channel(tmp_path):
    index = build_index(_records(tmp_path), ["DNA", "Actin"], tmp_path)
    (tmp_path / "w1_Actin.tif").unlink()
    (tmp_path / "w2_DNA.tif").write_bytes(b"not a tiff at all")
    problems = _problems(index)
    assert any("row 1 (P1 B03 1), channel Actin: file not found" in p and "w1_Actin.tif" in p
               for p in problems)
    assert any("row 2" in p and "unreadable file" in p and "w2_DNA.tif" in p for p in problems)
    assert any("unknown channel 'GFP'" in p for p in _problems(index, channels=["GFP"]))


def test_inconsistent_shapes(tmp_path):
    index = build_index(_records(tmp_path, n=4), ["DNA", "Actin"], tmp_path)
    tifffile.imwrite(tmp_path / "w1_Actin.tif", np.zeros((16, 20), np.uint16))  # within a row
    tifffile.imwrite(tmp_path / "w2_DNA.tif", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(tmp_path / "w2_Actin.tif", np.zeros((32, 32), np.uint16))  # across rows
    problems = _problems(index)
    assert any("row 1" in p and "channel shapes differ" in p and "w1_Actin.tif" in p
               for p in problems)
    assert any("row 2" in p and "differs from the experiment's (16, 16)" in p for p in problems)
    assert len(problems) == 2


def test_empty_path_value(tmp_path):
    df = _records(tmp_path)
    df.loc[2, "Path_DNA"] = None
    problems = _problems(build_index(df, ["DNA", "Actin"], tmp_path))
    assert any("row 2" in p and "empty value in column Path_DNA" in p for p in problems)


def test_read_parquet_rejects_foreign_files(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(InputError, match="not a morphoprof experiment index"):
        ExperimentIndex.read_parquet(tmp_path / "x.parquet")
    with pytest.raises(InputError, match="not found"):
        ExperimentIndex.read_parquet(tmp_path / "nope.parquet")
