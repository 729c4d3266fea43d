import gzip
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from morphoprof.errors import InputError, ValidationError
from morphoprof.index.bbbc021 import import_bbbc021, import_fields_6moa
from tests.conftest import shared


def test_real_bbbc021_tables(tmp_path):
    meta = shared("bbbc021", "metadata")
    index = import_bbbc021(tmp_path, meta / "BBBC021_v1_image.csv.gz",
                           meta / "BBBC021_v1_moa.csv", validate=False)
    t = index.table
    assert len(t) == 13200
    assert t["Metadata_plate"].nunique() == 55
    assert sorted(t["Metadata_batch"].unique(), key=lambda b: int(b[4:])) == [
        f"Week{k}" for k in range(1, 11)
    ]
    assert t["Metadata_compound"].nunique() == 113
    labelled = t[(t["Metadata_moa"] != "") & ~t["Metadata_control"]]
    treatments = labelled.groupby(["Metadata_compound", "Metadata_concentration"]).ngroups
    assert treatments == 103
    assert labelled["Metadata_moa"].nunique() == 12
    assert labelled["Metadata_compound"].nunique() == 38
    assert t.loc[t["Metadata_compound"] == "DMSO", "Metadata_control"].all()
    assert set(t["Metadata_site"]) == {1, 2, 3, 4}
    assert not t.duplicated(["Metadata_plate", "Metadata_well", "Metadata_site"]).any()
    row = t.iloc[0]
    assert row["Path_DAPI"].startswith(row["Metadata_batch"] + "/" + row["Metadata_plate"] + "/")
    # validation against an empty image root reports each absent plate folder once, with the
    # number of image sets it holds and the first CSV line that needs it
    with pytest.raises(ValidationError) as err:
        index.validate(check_shapes=False)
    problems = err.value.problems
    assert len(problems) == 55
    assert all(p.startswith("folder not found: ") for p in problems)
    assert sum(int(p.split("needed by ")[1].split()[0]) for p in problems) == 13200
    assert "BBBC021_v1_image.csv.gz" in problems[0] and "first: line " in problems[0]


def _tiny_layout(root, meta_dir):
    """Three BBBC021 rows (two plates, DMSO + taxol) with tiny TIFFs in the official layout."""
    image = pd.read_csv(meta_dir / "BBBC021_v1_image.csv.gz")
    rows = pd.concat([
        image[image["Image_Metadata_Compound"] == "DMSO"].head(2),
        image[(image["Image_Metadata_Compound"] == "taxol")
              & (image["Image_Metadata_Concentration"] == 0.3)].head(1),
    ])
    rng = np.random.default_rng(0)
    for _, r in rows.iterrows():
        for ch in ("DAPI", "Tubulin", "Actin"):
            p = root / r[f"Image_PathName_{ch}"] / r[f"Image_FileName_{ch}"]
            p.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(p, rng.integers(0, 4000, (12, 16), dtype=np.uint16))
    rows.to_csv(root / "BBBC021_v1_image.csv", index=False)
    shutil.copy(meta_dir / "BBBC021_v1_moa.csv", root / "BBBC021_v1_moa.csv")
    return rows


def test_tiny_tiffs_in_official_layout(tmp_path):
    meta = shared("bbbc021", "metadata")
    rows = _tiny_layout(tmp_path, meta)
    index = import_bbbc021(tmp_path, check_shapes=True)
    assert len(index) == 3 and index.channels == ["DAPI", "Tubulin", "Actin"]
    taxol = index.table[index.table["Metadata_compound"] == "taxol"]
    assert taxol["Metadata_moa"].iloc[0] == "Microtubule stabilizers"
    i = int(taxol.index[0])
    img = index.read(i)
    r = rows[rows["Image_Metadata_Compound"] == "taxol"].iloc[0]
    ref = tifffile.imread(tmp_path / r["Image_PathName_Tubulin"] / r["Image_FileName_Tubulin"])
    assert img.shape == (3, 12, 16)
    np.testing.assert_array_equal(img[1], ref.astype(np.float32))
    # the index finds its files again after a round trip through Parquet
    index.write(tmp_path / "index.parquet")
    from morphoprof.index import ExperimentIndex

    ExperimentIndex.read_parquet(tmp_path / "index.parquet").validate(check_shapes=True)


def test_missing_file_in_layout_is_named(tmp_path):
    meta = shared("bbbc021", "metadata")
    rows = _tiny_layout(tmp_path, meta)
    r = rows.iloc[1]
    (tmp_path / r["Image_PathName_Actin"] / r["Image_FileName_Actin"]).unlink()
    with pytest.raises(ValidationError, match=r["Image_FileName_Actin"]):
        import_bbbc021(tmp_path)


def test_bad_tables_are_reported(tmp_path):
    meta = shared("bbbc021", "metadata")
    shutil.copy(meta / "BBBC021_v1_moa.csv", tmp_path / "BBBC021_v1_moa.csv")
    (tmp_path / "BBBC021_v1_image.csv").write_text("")
    with pytest.raises(InputError, match="BBBC021_v1_image.csv is empty"):
        import_bbbc021(tmp_path)
    with gzip.open(meta / "BBBC021_v1_image.csv.gz", "rt") as f:
        image = pd.read_csv(f, nrows=3)
    image.drop(columns=["Image_FileName_Actin"]).to_csv(tmp_path / "BBBC021_v1_image.csv",
                                                        index=False)
    with pytest.raises(InputError, match=r"missing column\(s\) \['Image_FileName_Actin'\]"):
        import_bbbc021(tmp_path)
    image.loc[1, "Image_Metadata_Plate_DAPI"] = "Plate7"
    image.to_csv(tmp_path / "BBBC021_v1_image.csv", index=False)
    with pytest.raises(ValidationError, match="line 3: plate 'Plate7' has no WeekN_"):
        import_bbbc021(tmp_path, validate=False)


def test_real_six_moa_pngs():
    folder = shared("bbbc021", "fields_6moa")
    index = import_fields_6moa(folder)
    t = index.table
    assert len(t) == 660
    assert t["Metadata_moa"].nunique() == 6 and t["Metadata_compound"].nunique() == 18
    assert t.groupby(["Metadata_compound", "Metadata_concentration"]).ngroups == 55
    assert t["Metadata_plate"].nunique() == 30
    assert sorted(t["Metadata_batch"].unique()) == sorted(
        ["Week1", "Week2", "Week3", "Week4", "Week8", "Week9", "Week10"])
    assert set(t["Metadata_site"]) == {1, 2, 3, 4}
    assert index.channels == ["Actin", "Tubulin", "DAPI"]
    img = index.read(0)
    assert img.shape == (3, 256, 256) and img.max() <= 255
    from PIL import Image

    png = np.asarray(Image.open(index.paths(0)[0]))
    np.testing.assert_array_equal(img[2], png[..., 2].astype(np.float32))  # DAPI = blue
    index.validate(check_shapes=True)
