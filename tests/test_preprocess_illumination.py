import json

import numpy as np
import pytest
import tifffile

from morphoprof.datasets.synthetic import SynthConfig, generate_screen, load_ground_truth
from morphoprof.errors import InputError
from morphoprof.preprocess import illumination
from morphoprof.preprocess.illumination import (
    IlluminationCorrection,
    compute_illumination,
    mean_image,
    smooth_illumination,
    upsample_linear,
)
from tests.conftest import shared


@pytest.fixture(scope="module")
def uneven_screen(tmp_path_factory):
    """Two plates of 100 128x128 fields each under strong, known illumination fields."""
    cfg = SynthConfig(n_moas=2, compounds_per_moa=1, concentrations=(1.0,), n_batches=2,
                      plates_per_batch=1, dmso_wells_per_plate=24, sites_per_well=4,
                      height=128, width=128, cells_per_field=30, illumination_strength=0.5,
                      seed=7)
    out = tmp_path_factory.mktemp("illum") / "screen"
    return out, generate_screen(out, cfg)


def test_recovers_the_true_illumination_field(tmp_path, uneven_screen):
    folder, index = uneven_screen
    corr = compute_illumination(index, tmp_path / "illum", window=64, n_jobs=2)
    truth = load_ground_truth(folder)["illumination"]
    for plate, true in truth.items():
        est = corr.function(plate)
        assert est.shape == true.shape and est.dtype == np.float32 and est.min() >= 1.0
        for c, ch in enumerate(index.channels):
            r = np.corrcoef(est[c].ravel(), true[c].ravel())[0, 1]
            print(f"{plate} {ch}: correlation with the true field {r:.3f}")
            assert r > 0.9, (plate, ch, r)
    # correcting flattens the plate's average image: its spread across the field shrinks in
    # every channel (not to zero: the camera offset is not shaded by the illumination)
    plate = next(iter(truth))
    rows = np.flatnonzero(index.table["Metadata_plate"] == plate)
    raw = np.mean([index.read(int(i)) for i in rows], axis=0)
    fixed = np.mean([corr.apply(index.read(int(i)), plate) for i in rows], axis=0)
    cv_raw = raw.std(axis=(1, 2)) / raw.mean(axis=(1, 2))
    cv_fixed = fixed.std(axis=(1, 2)) / fixed.mean(axis=(1, 2))
    assert (cv_fixed < 0.85 * cv_raw).all(), (cv_raw, cv_fixed)


def test_functions_are_saved_reused_and_invalidated(tmp_path, uneven_screen):
    _, index = uneven_screen
    folder = tmp_path / "illum"
    compute_illumination(index, folder, window=64)
    files = sorted(folder.glob("*.npy"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    compute_illumination(index, folder, window=64)  # reused
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # a plate's function made from other image sets (a subset tried first, say) is made
    # again; the other plate's is reused
    plate = index.table["Metadata_plate"].iloc[0]
    fewer = index.subset(np.arange(len(index)) != 0)
    compute_illumination(fewer, folder, window=64)
    changed = [f.stat().st_mtime_ns != t for f, t in zip(files, stamps, strict=True)]
    assert changed == [f == IlluminationCorrection(folder, []).path(plate) for f in files]
    compute_illumination(index, folder, window=64)
    stamps = [f.stat().st_mtime_ns for f in files]
    loaded = IlluminationCorrection.load(folder)
    assert loaded.channels == index.channels
    compute_illumination(index, folder, window=32)  # other params: recomputed
    assert json.loads((folder / "illumination.json").read_text())["params"]["window"] == 32
    assert [f.stat().st_mtime_ns for f in files] != stamps
    with pytest.raises(InputError, match="no illumination function for plate 'nope'"):
        loaded.function("nope")
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated (a copy cut short)
    plate = next(p for p in index.table["Metadata_plate"].unique() if loaded.path(p) == files[0])
    with pytest.raises(InputError, match=f"cannot read illumination function {files[0]}"):
        IlluminationCorrection.load(folder).function(plate)


def test_smooth_illumination_rejects_bad_input():
    with pytest.raises(InputError, match="NaN"):
        smooth_illumination(np.full((32, 32), np.nan))
    with pytest.raises(InputError, match="blank"):
        smooth_illumination(np.zeros((32, 32)))
    f = smooth_illumination(np.ones((40, 50)) * 7)
    assert f.shape == (40, 50) and np.allclose(f, 1.0)


def test_real_raw_field_gives_a_smooth_function_at_least_one():
    raw = shared("bbbc021", "raw", "Week1_150607_C02_s3_w1E54F0108-F44A-4F6E-9637-6A9DE80F0823.tif")
    img = tifffile.imread(raw).astype(np.float32)
    f = smooth_illumination(img)  # one field only: a poor estimate, but it must behave
    assert f.shape == (1024, 1280) and f.min() >= 1.0 and np.isfinite(f).all()
    # smooth: neighbouring pixels differ by far less than the raw nuclei edges do
    assert np.abs(np.diff(f, axis=1)).max() < 0.05 * f.max()


@pytest.mark.parametrize("small, shape", [((51, 64), (1024, 1280)), ((7, 9), (30, 50)),
                                          ((3, 4), (10, 13)), ((40, 50), (40, 50))])
def test_upsample_linear_is_skimage_bilinear_resize(small, shape):
    from skimage.transform import resize

    img = np.random.default_rng(0).random(small) * 100 + 1
    want = resize(img, shape, order=1, mode="edge", anti_aliasing=False)
    got = upsample_linear(img, shape)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mean_image_folds_float32_partial_sums_exactly_enough(monkeypatch, uneven_screen):
    _, index = uneven_screen
    rows = np.arange(23)
    exact = np.mean([index.read(int(i)).astype(np.float64) for i in rows], axis=0)
    monkeypatch.setattr(illumination, "_PARTIAL", 5)  # 4 folds and a remainder of 3 images
    got = mean_image(index, rows, index.channels)
    assert got.dtype == np.float64 and got.shape == exact.shape
    np.testing.assert_allclose(got, exact, rtol=1e-6)


def test_mean_image_of_uint16_files_and_apply_into_float32_match_the_float32_path(
        tmp_path, uneven_screen):
    """mean_image adds the files' uint16 planes without a float32 copy, and apply divides a
    uint16 image into a float32 ``out`` in one pass: the same numbers as converting first."""
    _, index = uneven_screen
    rows = np.arange(10)
    assert tifffile.imread(index.paths(0)[0]).dtype == np.uint16
    stacks = [index.read(int(i)) for i in rows]  # float32 stacks
    want = np.zeros(stacks[0].shape, np.float32)
    for s in stacks:
        want += s
    np.testing.assert_array_equal(mean_image(index, rows, index.channels),
                                  want.astype(np.float64) / len(rows))
    corr = compute_illumination(index, tmp_path / "illum", window=32)
    plate = index.table["Metadata_plate"].iat[0]
    raw = np.stack([tifffile.imread(p) for p in index.paths(0)])
    out = np.empty(raw.shape, np.float32)
    corr.apply(raw, plate, out=out)
    np.testing.assert_array_equal(out, corr.apply(raw.astype(np.float32), plate))


def test_parallel_plates_raise_the_first_plates_error_whichever_fails_first(
        tmp_path, uneven_screen, monkeypatch):
    import time

    _, index = uneven_screen
    plates = sorted(index.table["Metadata_plate"].unique())
    assert len(plates) >= 2

    def failing(index_, rows, *args, **kwargs):
        plate = index_.table["Metadata_plate"].iat[int(rows[0])]
        time.sleep(0.3 if plate == plates[0] else 0.0)  # the later plate fails first
        raise InputError(f"bad images in {plate}")

    monkeypatch.setattr(illumination, "plate_function", failing)
    with pytest.raises(InputError, match=f"bad images in {plates[0]}$"):
        compute_illumination(index, tmp_path / "illum", window=32, n_jobs=2)
