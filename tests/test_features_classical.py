import numpy as np
import pandas as pd
import pytest

from morphoprof.datasets.synthetic import load_ground_truth
from morphoprof.errors import InputError
from morphoprof.features.classical import ClassicalConfig, ClassicalExtractor, measure_objects
from morphoprof.features.shards import read_features


def test_measure_objects_shapes_and_names():
    img = np.zeros((2, 40, 40), np.float32)
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1
    labels[20:36, 20:30] = 2
    img[0][labels == 1] = 0.8
    img[0][labels == 2] = 0.2
    img[1] = 0.5
    t = measure_objects(img, labels, ["DNA", "Actin"], ("sizeshape", "intensity"))
    assert t["Metadata_object"].tolist() == [1, 2]
    assert t["classical_Nuclei_Area"].tolist() == [100, 160]
    np.testing.assert_allclose(t["classical_DNA_Intensity_MeanIntensity"], [0.8, 0.2], rtol=1e-5)
    np.testing.assert_allclose(t["classical_Actin_Intensity_MeanIntensity"], [0.5, 0.5], rtol=1e-5)
    with pytest.raises(InputError, match="unknown measurement"):
        measure_objects(img, labels, ["DNA", "Actin"], ("haralick",))


def test_extract_per_cell_features_matching_ground_truth(tmp_path, tiny_screen):
    folder, index = tiny_screen
    cfg = ClassicalConfig(measurements=("sizeshape", "intensity", "texture"), n_jobs=1)
    summary = ClassicalExtractor(cfg).extract(index, tmp_path / "cp", progress=False, log=None)
    df = read_features(tmp_path / "cp")
    assert summary["cells"] == len(df) > 0
    truth = load_ground_truth(folder)["cells"]
    assert abs(len(df) - len(truth)) <= 0.05 * len(truth)
    feats = [c for c in df.columns if not c.startswith(("Metadata_", "Nuclei_Location"))]
    assert any(c.startswith("classical_Tubulin_") for c in feats)
    assert np.isfinite(df[feats].to_numpy()).mean() > 0.95
    # the measured nucleus area follows the ground truth of the same cells
    key = ["Metadata_plate", "Metadata_well", "Metadata_site"]
    merged = pd.merge_asof(
        df.sort_values("Nuclei_Location_Center_X"),
        truth.sort_values("center_x"), left_on="Nuclei_Location_Center_X",
        right_on="center_x", by=key, tolerance=2.0, direction="nearest").dropna(
        subset=["nucleus_area"])
    assert len(merged) > 0.8 * len(df)
    r = np.corrcoef(merged["classical_Nuclei_Area"], merged["nucleus_area"])[0, 1]
    assert r > 0.9
    again = ClassicalExtractor(cfg).extract(index, tmp_path / "cp", progress=False, log=None)
    assert again["shards_written"] == 0  # resumed: nothing left to do
