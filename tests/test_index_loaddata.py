"""CellProfiler LoadData / JUMP load_data.csv import, with JUMP metadata and Illum functions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from morphoprof.cli import main
from morphoprof.config import load_config
from morphoprof.datasets.source import build_index_from_config
from morphoprof.errors import InputError, ValidationError
from morphoprof.index import ExperimentIndex
from morphoprof.index.loaddata import illumination_files, import_loaddata
from morphoprof.preprocess.illumination import IlluminationCorrection
from tests.conftest import shared

CHANNELS = ("DNA", "RNA", "Mito")
PLATES = ("BR001", "BR002")
WELLS = {"A01": "JCP2022_033924", "A02": "JCP2022_085227", "B01": "JCP2022_999999"}
PERT = {"JCP2022_033924": "negcon", "JCP2022_085227": "poscon", "JCP2022_999999": "trt"}


def _value(plate: int, well: int, site: int, ch: int) -> int:
    return 1000 * (plate + 1) + 100 * well + 10 * site + ch


def _jump_layout(tmp_path, urls: bool = True):
    """A Cell Painting Gallery copy: mirror/cellpainting-gallery/<...>/images/<plate>/Images/
    TIFFs, a load_data.csv naming them by s3:// PathName_Orig<Ch>, JUMP's well.csv and a
    compound table with Metadata_pert_type, and illum/<plate>/<plate>_Illum<Ch>.npy."""
    mirror = tmp_path / "mirror"
    rel = "cpg0016-jump/source_4/images/2021_batch1"
    rows, wells = [], []
    for p, plate in enumerate(PLATES):
        folder = mirror / "cellpainting-gallery" / rel / "images" / plate / "Images"
        folder.mkdir(parents=True)
        for w, well in enumerate(WELLS):
            wells.append({"Metadata_Source": "source_4", "Metadata_Plate": plate,
                          "Metadata_Well": well, "Metadata_JCP2022": WELLS[well]})
            for site in (1, 2):
                rec = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site}
                for c, ch in enumerate(CHANNELS):
                    name = f"r{w + 1:02d}c01f{site:02d}p01-ch{c + 1}sk1fk1fl1.tiff"
                    tifffile.imwrite(folder / name, np.full((12, 16), _value(p, w, site, c),
                                                            np.uint16))
                    base = f"s3://cellpainting-gallery/{rel}/images/{plate}/Images/"
                    rec[f"FileName_Orig{ch}"] = name
                    rec[f"PathName_Orig{ch}"] = base if urls else str(folder)
                rows.append(rec)
        illum = tmp_path / "illum" / plate
        illum.mkdir(parents=True)
        for c, ch in enumerate(CHANNELS):
            np.save(illum / f"{plate}_Illum{ch}.npy", np.full((12, 16), 2.0 + c + p, np.float32))
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    pd.DataFrame(wells).to_csv(tmp_path / "well.csv", index=False)
    pd.DataFrame({"Metadata_JCP2022": list(PERT), "Metadata_pert_type": list(PERT.values())}
                 ).to_csv(tmp_path / "compound.csv", index=False)
    return mirror


def test_jump_load_data_with_metadata_and_mirror(tmp_path):
    mirror = _jump_layout(tmp_path)
    index = import_loaddata(tmp_path / "load_data.csv", mirror=mirror,
                            metadata=[tmp_path / "well.csv", tmp_path / "compound.csv"],
                            check_shapes=True)
    t = index.table
    assert len(index) == 12 and index.channels == list(CHANNELS)
    assert set(t["Metadata_batch"]) == {"source_4"}  # JUMP's source is the batch
    assert dict(zip(t["Metadata_well"], t["Metadata_compound"])) == WELLS
    negcon = t["Metadata_compound"] == "JCP2022_033924"
    assert t["Metadata_control"].tolist() == negcon.tolist()  # poscon is not a control
    assert set(t.loc[~negcon, "Metadata_pert_type"]) == {"poscon", "trt"}
    assert "Metadata_Plate" not in t.columns  # consumed, not duplicated
    i = int(np.flatnonzero((t["Metadata_plate"] == "BR002") & (t["Metadata_well"] == "A02")
                           & (t["Metadata_site"] == 2))[0])
    np.testing.assert_array_equal(index.read(i)[:, 0, 0],
                                  [_value(1, 1, 2, c) for c in range(3)])
    only = import_loaddata(tmp_path / "load_data.csv", mirror=mirror, channels=["Mito", "DNA"],
                           metadata=[tmp_path / "well.csv"])
    assert only.channels == ["Mito", "DNA"]
    np.testing.assert_array_equal(only.read(i)[:, 0, 0], [_value(1, 1, 2, 2), _value(1, 1, 2, 0)])


def test_cli_import_loaddata_stores_the_illumination_functions(tmp_path, capsys):
    mirror = _jump_layout(tmp_path)
    out = tmp_path / "run" / "index.parquet"
    assert main(["import", "loaddata", str(tmp_path / "load_data.csv"), "--out", str(out),
                 "--mirror", str(mirror), "--metadata", str(tmp_path / "well.csv"),
                 "--illum", str(tmp_path / "illum")]) == 0
    assert "illumination functions of 2 plate(s)" in capsys.readouterr().out
    index = ExperimentIndex.read_parquet(out)
    corr = IlluminationCorrection.load(tmp_path / "run" / "illumination")
    assert corr.channels == list(CHANNELS)
    for i in range(len(index)):
        p = PLATES.index(index.table["Metadata_plate"].iloc[i])
        raw = index.read(i)
        fixed = index.read(i, illumination=corr)
        divisor = 2.0 + np.arange(3) + p  # as _jump_layout wrote them
        np.testing.assert_allclose(fixed, raw / divisor[:, None, None])
    # the stored functions drive a stage unchanged
    seg = tmp_path / "run" / "nuclei"
    assert main(["segment", str(out), "--out", str(seg), "--illumination",
                 str(tmp_path / "run" / "illumination"), "--channel", "DNA",
                 "--min-area", "1"]) == 0


def test_a_run_config_reads_the_same_loaddata_index_as_the_import(tmp_path):
    mirror = _jump_layout(tmp_path)
    out = tmp_path / "imported.parquet"
    assert main(["import", "loaddata", str(tmp_path / "load_data.csv"), "--out", str(out),
                 "--mirror", str(mirror), "--metadata", str(tmp_path / "well.csv"),
                 "--channels", "Mito", "DNA"]) == 0
    (tmp_path / "run.yaml").write_text(
        f"data: {{source: loaddata, path: load_data.csv, mirror: {mirror.name}, "
        "metadata: [well.csv], channels: [Mito, DNA]}\noutput: out\n")
    cfg, _ = load_config(tmp_path / "run.yaml")
    index = build_index_from_config(cfg.data, tmp_path / "out")
    imported = ExperimentIndex.read_parquet(out)
    assert index.channels == imported.channels == ["Mito", "DNA"]
    pd.testing.assert_frame_equal(index.table, imported.table)


def test_illum_columns_in_the_table_and_partial_functions(tmp_path):
    _jump_layout(tmp_path, urls=False)
    table = pd.read_csv(tmp_path / "load_data.csv")
    for ch in CHANNELS:
        table[f"PathName_Illum{ch}"] = [str(tmp_path / "illum" / p) for p in
                                        table["Metadata_Plate"]]
        table[f"FileName_Illum{ch}"] = [f"{p}_Illum{ch}.npy" for p in table["Metadata_Plate"]]
    table.to_csv(tmp_path / "with_illum.csv", index=False)
    files = illumination_files(tmp_path / "with_illum.csv", list(CHANNELS))
    assert files["BR002"]["RNA"] == tmp_path / "illum" / "BR002" / "BR002_IllumRNA.npy"
    (tmp_path / "illum" / "BR001" / "BR001_IllumMito.npy").unlink()
    with pytest.raises(InputError, match="BR001_IllumMito.npy"):
        illumination_files(tmp_path / "with_illum.csv", list(CHANNELS))
    with pytest.raises(InputError, match=r"plate BR001: .*\['Mito'\] not found"):
        illumination_files(tmp_path / "load_data.csv", list(CHANNELS),
                           illum_dir=tmp_path / "illum")
    assert illumination_files(tmp_path / "load_data.csv", list(CHANNELS)) == {}


def test_bad_tables_are_named(tmp_path):
    mirror = _jump_layout(tmp_path)
    with pytest.raises(InputError, match=r"load_data.csv line 2: s3://.*--mirror"):
        import_loaddata(tmp_path / "load_data.csv", metadata=[tmp_path / "well.csv"])
    with pytest.raises(ValidationError, match="no treatment column"):
        import_loaddata(tmp_path / "load_data.csv", mirror=mirror)
    with pytest.raises(ValidationError, match="channel 'AGP' not in the table"):
        import_loaddata(tmp_path / "load_data.csv", mirror=mirror, channels=["AGP"],
                        metadata=[tmp_path / "well.csv"])
    well = pd.read_csv(tmp_path / "well.csv")
    pd.concat([well, well.iloc[[3]]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(InputError, match="dup.csv line 8: a second row"):
        import_loaddata(tmp_path / "load_data.csv", mirror=mirror, metadata=[tmp_path / "dup.csv"])
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "nothing.csv", index=False)
    with pytest.raises(InputError, match="nothing.csv: shares no Metadata_ column"):
        import_loaddata(tmp_path / "load_data.csv", mirror=mirror,
                        metadata=[tmp_path / "nothing.csv"])
    pd.read_csv(tmp_path / "load_data.csv").filter(like="Metadata_").to_csv(
        tmp_path / "nochannels.csv", index=False)
    with pytest.raises(ValidationError, match="no image channel"):
        import_loaddata(tmp_path / "nochannels.csv")


def test_real_bbbc021_fields_through_a_loaddata_csv(tmp_path):
    """The real raw BBBC021 TIFFs named by a CellProfiler LoadData CSV (as BBBC021's own
    CellProfiler pipelines read them): both complete image sets import and read at 1024x1280."""
    folder = shared("bbbc021", "images", "Week2", "Week2_24381")
    rows = []
    for site in (1, 2):
        rec = {"Metadata_Plate": "Week2_24381", "Metadata_Well": "B02", "Metadata_Site": site,
               "Metadata_Compound": "DMSO"}
        for w, ch in (("w1", "DAPI"), ("w2", "Tubulin"), ("w4", "Actin")):
            name = next(folder.glob(f"Week2_180607_B02_s{site}_{w}*.tif")).name
            rec[f"FileName_Orig{ch}"], rec[f"PathName_Orig{ch}"] = name, str(folder)
        rows.append(rec)
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    index = import_loaddata(tmp_path / "load_data.csv", check_shapes=True)
    assert index.channels == ["DAPI", "Tubulin", "Actin"]
    assert index.table["Metadata_control"].all()
    image = index.read(0)
    assert image.shape == (3, 1024, 1280) and image.max() > image.min()
