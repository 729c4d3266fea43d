import numpy as np
import pandas as pd
import pytest
import tifffile

from morphoprof.errors import ValidationError
from morphoprof.index.csv_mapping import import_csv


def _deepprofiler_layout(tmp_path):
    """A DeepProfiler-style index.csv: Metadata_Plate/Well/Site, Treatment, one path column per
    channel relative to the images folder."""
    rows = []
    for well, treatment in (("A01", "DMSO"), ("A02", "taxol")):
        for site in (1, 2):
            rec = {"Metadata_Plate": "P1", "Metadata_Well": well, "Metadata_Site": site,
                   "Treatment": treatment, "Replicate": 1}
            for ch in ("DNA", "RNA"):
                rel = f"P1/{well}_s{site}_{ch}.tif"
                (tmp_path / "P1").mkdir(exist_ok=True)
                tifffile.imwrite(tmp_path / rel, np.full((8, 8), site, np.uint16))
                rec[ch] = rel
            rows.append(rec)
    pd.DataFrame(rows).to_csv(tmp_path / "index.csv", index=False)


def test_deepprofiler_preset(tmp_path):
    _deepprofiler_layout(tmp_path)
    index = import_csv(tmp_path / "index.csv", {"DNA": "DNA", "RNA": "RNA"}, "deepprofiler",
                       check_shapes=True)
    assert len(index) == 4 and index.channels == ["DNA", "RNA"]
    assert index.table["Metadata_control"].tolist() == [True, True, False, False]
    assert index.read(3)[0, 0, 0] == 2.0  # A02 site 2


def test_explicit_mapping_defaults_site_and_batch(tmp_path):
    _deepprofiler_layout(tmp_path)
    df = pd.read_csv(tmp_path / "index.csv").drop(columns=["Metadata_Site"])
    df.to_csv(tmp_path / "nosite.csv", sep=";", index=False)
    index = import_csv(tmp_path / "nosite.csv", {"DNA": "DNA"},
                       {"plate": "Metadata_Plate", "well": "Metadata_Well",
                        "compound": "Treatment"}, sep=";")
    assert index.table["Metadata_site"].tolist() == [1, 2, 1, 2]
    assert index.table["Metadata_batch"].tolist() == ["P1"] * 4
    assert index.table["Metadata_concentration"].isna().all()


def test_mapping_errors_name_keys_and_columns(tmp_path):
    _deepprofiler_layout(tmp_path)
    with pytest.raises(ValidationError) as err:
        import_csv(tmp_path / "index.csv", {"DNA": "DAPI_path"},
                   {"plate": "Plate", "well": "Metadata_Well", "dose": "X"})
    text = str(err.value)
    assert "fields.plate: column 'Plate' not in" in text
    assert "fields.dose: unknown field" in text
    assert "fields.compound: required but not mapped" in text
    assert "channels.DNA: column 'DAPI_path' not in" in text
    with pytest.raises(ValidationError, match="unknown preset 'cellprofiler'"):
        import_csv(tmp_path / "index.csv", {"DNA": "DNA"}, "cellprofiler")


def test_missing_file_named(tmp_path):
    _deepprofiler_layout(tmp_path)
    (tmp_path / "P1" / "A02_s1_RNA.tif").unlink()
    with pytest.raises(ValidationError, match="A02_s1_RNA.tif"):
        import_csv(tmp_path / "index.csv", {"DNA": "DNA", "RNA": "RNA"}, "deepprofiler")
