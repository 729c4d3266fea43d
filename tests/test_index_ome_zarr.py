"""OME-Zarr HCS plates in: NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3), written by ome-zarr-py."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

from morphoprof.cli import main
from morphoprof.datasets.source import DataSection, build_index_from_config
from morphoprof.errors import ImageReadError, InputError, ValidationError
from morphoprof.index import ExperimentIndex
from morphoprof.index.ome_zarr import import_ome_zarr

CHANNELS = ("DNA", "RNA", "AGP")
WELLS = (("B", "3"), ("B", "4"), ("C", "3"))


def _channel(label: str) -> dict:
    return {"label": label, "color": "FFFFFF", "active": True,
            "window": {"start": 0, "end": 4000, "min": 0, "max": 65535}}


def _field(w: int, site: int, h: int = 48, width: int = 64) -> np.ndarray:
    """(C, H, W) uint16: a constant per channel that encodes well, site and channel, and one
    bright disk (a nucleus) in the DNA channel."""
    img = np.stack([np.full((h, width), 100 * (w + 1) + 10 * site + c, np.uint16)
                    for c in range(len(CHANNELS))])
    yy, xx = np.mgrid[:h, :width]
    img[0][(yy - h // 2) ** 2 + (xx - width // 2) ** 2 < 36] = 3000
    return img


def _plate(path, fmt=None, labels=CHANNELS, sites=2):
    kw = {} if fmt is None else {"fmt": fmt}
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if fmt is not None else 3)
    write_plate_metadata(root, ["B", "C"], ["3", "4"], [f"{r}/{c}" for r, c in WELLS],
                         name="PL1", **kw)
    for w, (r, c) in enumerate(WELLS):
        well = root.require_group(r).require_group(c)
        write_well_metadata(well, [str(s) for s in range(sites)], **kw)
        for s in range(sites):
            write_image(_field(w, s + 1), well.require_group(str(s)), axes="cyx",
                        scale_factors=[2], omero={"channels": [_channel(x) for x in labels]},
                        storage_options={"chunks": (1, 48, 64)}, **kw)
    return path


@pytest.mark.parametrize("fmt", [None, FormatV04()], ids=["ngff0.5", "ngff0.4"])
def test_plate_imports_and_reads_each_field(tmp_path, fmt):
    plate = _plate(tmp_path / "plate.zarr", fmt)
    pd.DataFrame({"well": ["B03", "B04", "C03"], "compound": ["DMSO", "taxol", "taxol"],
                  "concentration": [0, 1.0, 3.0], "moa": ["", "MT", "MT"]}).to_csv(
        tmp_path / "map.csv", index=False)
    index = import_ome_zarr(plate, platemap=tmp_path / "map.csv")
    t = index.table
    assert len(index) == 6 and index.channels == list(CHANNELS)
    assert t["Metadata_plate"].unique().tolist() == ["PL1"]
    assert t["Metadata_well"].tolist() == ["B03", "B03", "B04", "B04", "C03", "C03"]
    assert t["Metadata_site"].tolist() == [1, 2] * 3
    assert t["Metadata_control"].tolist() == [True, True] + [False] * 4
    assert t["Metadata_concentration"].tolist() == [0, 0, 1, 1, 3, 3]
    for i in range(len(index)):
        w, site = i // 2, i % 2 + 1
        np.testing.assert_array_equal(index.read(i), _field(w, site).astype(np.float32))
    np.testing.assert_array_equal(index.read(3, ["AGP", "DNA"]),
                                  _field(1, 2)[[2, 0]].astype(np.float32))
    index.validate(check_shapes=True)


def test_only_the_channels_asked_for_are_read(tmp_path, monkeypatch):
    index = import_ome_zarr(_plate(tmp_path / "plate.zarr"))
    monkeypatch.setenv("MORPHOPROF_MAX_PIXELS", str(48 * 64))  # one plane
    assert index.read(0, ["RNA"]).shape == (1, 48, 64)
    with pytest.raises(ImageReadError, match="above the"):
        index.read(0)


def test_cli_import_then_segment_and_crop(tmp_path):
    plate = _plate(tmp_path / "plate.zarr")
    out = tmp_path / "index.parquet"
    assert main(["import", "ome-zarr", str(plate), "--out", str(out), "--channels", "DNA",
                 "RNA"]) == 0
    assert ExperimentIndex.read_parquet(out).channels == ["DNA", "RNA"]
    cells = tmp_path / "cells.parquet"
    assert main(["segment", str(out), "--out", str(cells), "--channel", "DNA",
                 "--min-area", "20"]) == 0
    assert len(pd.read_parquet(cells)) == 6  # one planted nucleus per field
    assert main(["crops", str(out), str(cells), "--out", str(tmp_path / "crops"),
                 "--size", "16"]) == 0
    assert (tmp_path / "crops" / "manifest.json").is_file()


def test_a_config_data_section_imports_the_plate_as_the_cli_does(tmp_path):
    plate = _plate(tmp_path / "plate.zarr")
    out = tmp_path / "index.parquet"
    assert main(["import", "ome_zarr", str(plate), "--out", str(out), "--channels", "RNA"]) == 0
    data = DataSection(source="ome_zarr", path=str(plate), channels=["RNA"])
    index = build_index_from_config(data, tmp_path)
    assert index.channels == ["RNA"] and len(index) == 6
    pd.testing.assert_frame_equal(index.table, ExperimentIndex.read_parquet(out).table)


def test_bad_plates_are_named(tmp_path):
    with pytest.raises(InputError, match="OME-Zarr plate not found"):
        import_ome_zarr(tmp_path / "absent.zarr")
    image = zarr.open_group(str(tmp_path / "image.zarr"), mode="w")
    write_image(_field(0, 1), image, axes="cyx", scale_factors=[])
    with pytest.raises(InputError, match="not an OME-Zarr HCS plate .*a single image"):
        import_ome_zarr(tmp_path / "image.zarr")
    plate = _plate(tmp_path / "plate.zarr")
    with pytest.raises(ValidationError, match="channel 'Mito' not in the plate"):
        import_ome_zarr(plate, channels=["Mito"])
    pd.DataFrame({"well": ["B03"], "compound": ["DMSO"]}).to_csv(tmp_path / "m.csv",
                                                                  index=False)
    with pytest.raises(InputError, match=r"m.csv: no row for well\(s\) \['B04', 'C03'\]"):
        import_ome_zarr(plate, platemap=tmp_path / "m.csv")
    other = _plate(tmp_path / "other.zarr", labels=("DNA", "ER", "AGP"))
    shutil.rmtree(plate / "C" / "3" / "1")
    shutil.copytree(other / "C" / "3" / "0", plate / "C" / "3" / "1")
    with pytest.raises(ValidationError, match=r"field C/3/1: channels \['DNA', 'ER', 'AGP'\]"):
        import_ome_zarr(plate)
    shutil.rmtree(plate / "C" / "3" / "1")
    with pytest.raises(ValidationError, match="C/3/1"):
        import_ome_zarr(plate)
    kept = import_ome_zarr(plate, only_present=True)
    assert len(kept) == 5
