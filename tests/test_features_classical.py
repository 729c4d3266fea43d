import numpy as np
import pandas as pd
import pytest

from morphoprof.datasets.synthetic import load_ground_truth
from morphoprof.errors import InputError
from morphoprof.features.classical import ClassicalConfig, ClassicalExtractor, measure_objects
from morphoprof.shards import read_features


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
    summary = ClassicalExtractor(cfg).extract(index, tmp_path / "cp")
    df = read_features(tmp_path / "cp")
    assert summary.cells == len(df) > 0
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
    again = ClassicalExtractor(cfg).extract(index, tmp_path / "cp")
    assert again.shards_written == 0  # resumed: nothing left to do


def test_classical_features_of_crops_measure_the_central_nucleus(tmp_path, capsys):
    """extract --extractor classical --crops: the nucleus at each crop's centre is measured (not
    a neighbour cut by the crop's edge), its area and intensity as planted; a crop with no
    nucleus is left out and listed; a rerun resumes."""
    import json

    from morphoprof.cli import main
    from morphoprof.features.classical import central_nucleus_mask

    rng = np.random.default_rng(0)
    s, radii = 32, [4, 5, 6, 7, 5, 6]
    yy, xx = np.mgrid[:s, :s]
    crops = rng.integers(90, 110, (len(radii) + 1, s, s, 2)).astype(np.uint16)  # (N, S, S, C)
    for k, r in enumerate(radii):
        crops[k, ..., 0][(yy - 16) ** 2 + (xx - 16) ** 2 <= r * r] = 3000 + 200 * k
        crops[k, ..., 0][(yy - 2) ** 2 + (xx - 30) ** 2 <= 16] = 4000  # a neighbour, cut
        crops[k, ..., 1] = 500 + 100 * k
    crops[-1] = 100  # no nucleus at all
    np.savez(tmp_path / "c.npz", crops=crops)
    pd.DataFrame({"plate": ["P1"] * 4 + ["P2"] * 3, "well": [f"A0{k}" for k in range(7)],
                  "compound": ["x"] * 7}).to_csv(tmp_path / "c.csv", index=False)
    args = ["extract", "--extractor", "classical", "--crops", str(tmp_path / "c.npz"),
            "--crop-table", str(tmp_path / "c.csv"), "--channels", "DNA", "Actin",
            "--out", str(tmp_path / "f")]
    assert main(args) == 0
    assert "skipped crop 6: no nucleus" in capsys.readouterr().err  # the log, not the JSON
    summary = json.loads((tmp_path / "f" / "run_summary.json").read_text())
    assert summary["cells"] == len(radii) and summary["n_skipped"] == 1
    assert "crop 6: no nucleus" in summary["skipped"][0]["reason"]
    feats = read_features(tmp_path / "f").sort_values("Metadata_well")
    area = feats["classical_Nuclei_Area"].to_numpy()
    np.testing.assert_allclose(area, np.pi * np.array(radii) ** 2, rtol=0.15)
    assert feats["Metadata_well"].tolist() == [f"A0{k}" for k in range(6)]
    # DNA intensity inside the nucleus rises with k as planted; Actin is flat per crop
    assert np.all(np.diff(feats["classical_DNA_Intensity_MeanIntensity"].to_numpy()) > 0)
    assert feats["classical_Actin_Intensity_StdIntensity"].max() < 1e-6
    assert central_nucleus_mask(np.zeros((s, s))).sum() == 0
    # resumable: a second run finds both plates done
    assert main(args) == 0
    assert json.loads((tmp_path / "f" / "run_summary.json").read_text())["shards_skipped"] == 2


def _slow_first_chunk_fails(rows):
    import time

    time.sleep(0.5 if rows[0] == 0 else 0.0)  # a later chunk, in another process, fails first
    raise InputError(f"bad chunk starting at row {rows[0]}")


def test_worker_processes_raise_the_first_chunks_error_whichever_fails_first(tmp_path):
    from morphoprof.shards import ShardWriter

    ex = ClassicalExtractor(ClassicalConfig(measurements=("sizeshape",), n_jobs=2))
    writer = ShardWriter(tmp_path / "f", {"extractor": "test"})
    with pytest.raises(InputError, match="bad chunk starting at row 0$"):
        ex._plates(writer, pd.Series(["P1"] * 16), _slow_first_chunk_fails, pd.DataFrame(),
                   "test", "cell")
