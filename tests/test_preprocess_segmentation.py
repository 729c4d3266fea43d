import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.optimize import linear_sum_assignment

from morphoprof.datasets.synthetic import load_ground_truth
from morphoprof.errors import ImageReadError, InputError
from morphoprof.index import ExperimentIndex
from morphoprof.preprocess.segmentation import (
    CENTER_X,
    CENTER_Y,
    NucleiConfig,
    export_deepprofiler_locations,
    image_quality,
    import_deepprofiler_locations,
    keep_objects,
    local_maxima,
    nuclei_table,
    object_table,
    segment_index,
    segment_nuclei,
)
from tests.conftest import SHARED_DATA, shared

SHARED_RAW = (SHARED_DATA / "bbbc021" / "raw"
              / "Week1_150607_C02_s3_w1E54F0108-F44A-4F6E-9637-6A9DE80F0823.tif")


def detection_f1(pred: np.ndarray, truth: np.ndarray, radius: float = 5.0) -> float:
    """F1 of a one-to-one matching of predicted and true centres within ``radius`` px."""
    if len(pred) == 0 or len(truth) == 0:
        return float(len(pred) == len(truth))
    d = np.linalg.norm(pred[:, None] - truth[None], axis=2)
    a, b = linear_sum_assignment(d)
    tp = int((d[a, b] <= radius).sum())
    return 2 * tp / (len(pred) + len(truth))


def test_detection_f1_on_synthetic_screen(tmp_path, tiny_screen):
    folder, index = tiny_screen
    summary = segment_index(index, tmp_path / "cells.parquet")
    assert summary.channel == "DNA"
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    truth = load_ground_truth(folder)["cells"]
    key = ["Metadata_plate", "Metadata_well", "Metadata_site"]
    pred_all, true_all, tp_total = 0, 0, 0.0
    for k, g in truth.groupby(key):
        p = cells[(cells[key] == pd.Series(k, index=key)).all(axis=1)]
        f1 = detection_f1(p[[CENTER_X, CENTER_Y]].to_numpy(),
                          g[["center_x", "center_y"]].to_numpy())
        tp_total += f1 * (len(p) + len(g)) / 2
        pred_all += len(p)
        true_all += len(g)
    f1 = 2 * tp_total / (pred_all + true_all)
    print(f"synthetic detection F1 = {f1:.3f} ({pred_all} found, {true_all} true)")
    assert f1 >= 0.9
    assert set(key) <= set(cells.columns) and cells["Metadata_object"].min() == 1


def test_parallel_and_downsampled_runs(tmp_path, tiny_screen):
    _, index = tiny_screen
    segment_index(index, tmp_path / "one.parquet")
    segment_index(index, tmp_path / "two.parquet", n_jobs=2, chunk=3)
    one = pd.read_parquet(tmp_path / "one.parquet")
    pd.testing.assert_frame_equal(one, pd.read_parquet(tmp_path / "two.parquet"))
    img = index.read(0, ["DNA"])[0]
    full = segment_nuclei(img)
    half = segment_nuclei(img, NucleiConfig(downsample=2))
    assert half.shape == full.shape and abs(int(half.max()) - int(full.max())) <= 1


def test_nuclei_table_from_blocks_equals_the_upsampled_labels_table(tiny_screen):
    """The table computed on the downsampled segmentation's blocks (no full-resolution label
    image) equals object_table of the upsampled labels, also where the image is not a whole
    number of blocks (the edge blocks stand for fewer pixels) and for a real-screen field."""
    _, index = tiny_screen
    img = index.read(0, ["DNA"])[0]
    for crop, f in (((slice(None), slice(None)), 2), ((slice(0, 61), slice(3, 100)), 2),
                    ((slice(0, 61), slice(3, 100)), 3)):
        part = np.ascontiguousarray(img[crop])
        cfg = NucleiConfig(downsample=f, min_area=8, min_distance=3)
        want = object_table(segment_nuclei(part, cfg))
        got = nuclei_table(part, cfg)
        assert len(want) > 0 and list(got.columns) == list(want.columns)
        pd.testing.assert_frame_equal(got, want, check_dtype=False, atol=1e-9)
    # an object in the last, partial block row: 1 full-resolution row, not 3
    labels = np.zeros((3, 3), np.int32)
    labels[2, 1] = 1
    t = object_table(labels, block=3, shape=(7, 9))
    assert t.iloc[0][["Nuclei_AreaShape_Area", CENTER_X, CENTER_Y]].tolist() == [3, 4.0, 6.0]
    assert t.iloc[0]["Nuclei_AreaShape_BoundingBoxMaximum_Y"] == 7


def test_touching_nuclei_are_split():
    yy, xx = np.mgrid[:60, :80]
    img = ((yy - 30) ** 2 + (xx - 28) ** 2 < 12**2) | ((yy - 30) ** 2 + (xx - 50) ** 2 < 12**2)
    labels = segment_nuclei(img.astype(np.float32) * 1000 + 100, NucleiConfig(min_distance=5))
    assert labels.max() == 2
    merged = segment_nuclei(img.astype(np.float32) * 1000 + 100, NucleiConfig(min_distance=30))
    assert merged.max() == 1


def test_size_filter_and_border_clearing():
    img = np.full((64, 64), 10.0, np.float32)
    img[30:34, 30:34] = 500  # 16 px: below min_area
    img[0:14, 20:34] = 500  # touches the border
    img[40:56, 40:56] = 500
    labels = segment_nuclei(img, NucleiConfig(min_area=30, clear_border=True, smoothing=0))
    assert labels.max() == 1 and labels[48, 48] == 1
    assert segment_nuclei(img, NucleiConfig(min_area=30, smoothing=0)).max() == 2


def test_blank_nan_and_no_cells(tmp_path, tiny_screen):
    folder, _ = tiny_screen
    shutil.copytree(folder, tmp_path / "copy")
    index = ExperimentIndex.read_parquet(tmp_path / "copy" / "index.parquet")
    assert segment_nuclei(np.zeros((32, 32))).max() == 0
    assert image_quality(np.zeros((8, 8)), "x.tif") == [
        "x.tif: blank image (constant value 0); no nuclei"]
    sat = np.full((8, 8), 65535.0)
    sat[0, 0] = 0
    assert "saturated" in image_quality(sat, "s.tif")[0]
    bad = np.ones((8, 8))
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="y.tif: image holds NaN"):
        image_quality(bad, "y.tif")
    # a field with no cells yields zero rows; a broken file fails or is skipped by policy
    sub = index.subset(np.arange(len(index)) < 3)
    dna0 = sub.paths(0, ["DNA"])[0]
    tifffile.imwrite(dna0, np.full((96, 96), 100, np.uint16))
    broken = sub.paths(1, ["DNA"])[0]
    broken.write_bytes(b"II*\x00broken")
    with pytest.raises(ImageReadError, match=broken.name) as failed:  # the reader's own error
        segment_index(sub, tmp_path / "c.parquet")
    assert not (tmp_path / "c.parquet").exists()  # nothing half-written
    s = segment_index(sub, tmp_path / "c.parquet", on_error="skip")
    assert s.skipped == ({"file": str(broken), "reason": str(failed.value)},)
    assert s.image_sets_without_cells == 1 and "blank image" in s.warnings[0]
    assert s.summary_line() == (f"{s.cells} cells in 3 image sets (1 without cells, 1 skipped, "
                                f"{len(s.warnings)} warnings)")
    cells = pd.read_parquet(tmp_path / "c.parquet")
    assert set(cells["Metadata_well"]) == {sub.table["Metadata_well"].iloc[2]}


def test_a_stopped_segmentation_resumes_with_its_warnings(tmp_path, tiny_screen, monkeypatch,
                                                          caplog):
    """A run that stopped part-way keeps its finished parts: run again, it segments only the
    rest, and its summary still has the warnings and empty fields of the parts done before.
    A finished table is reused by a run with the same index and settings; other settings or
    another index start over."""
    from morphoprof.preprocess import segmentation

    folder, _ = tiny_screen
    shutil.copytree(folder, tmp_path / "copy")
    index = ExperimentIndex.read_parquet(tmp_path / "copy" / "index.parquet")
    sub = index.subset(np.arange(len(index)) < 6)
    monkeypatch.setattr(segmentation, "SHARD_FIELDS", 2)  # parts: rows 0-1, 2-3, 4-5
    tifffile.imwrite(sub.paths(0, ["DNA"])[0], np.full((96, 96), 100, np.uint16))  # blank
    broken = sub.paths(3, ["DNA"])[0]
    good = broken.read_bytes()
    broken.write_bytes(b"II*\x00broken")
    out = tmp_path / "cells.parquet"
    with pytest.raises(InputError, match=broken.name):
        segment_index(sub, out)
    assert not out.exists() and (tmp_path / "cells.parquet.parts").is_dir()
    broken.write_bytes(good)  # the user mends the file and runs again
    sub = ExperimentIndex(sub.table.assign(Metadata_moa="fixed"), sub.root)  # and a label

    seen, chunk_fn = [], segmentation._segment_chunk
    monkeypatch.setattr(segmentation, "_segment_chunk",
                        lambda index, rows, *a: seen.extend(rows) or chunk_fn(index, rows, *a))
    with caplog.at_level("INFO", logger="morphoprof.shards"):
        summary = segment_index(sub, out)
    assert "resuming: 1 of 3 shards already done" in caplog.text
    assert sorted(seen) == [2, 3, 4, 5]
    assert summary.image_sets_without_cells == 1 and "blank image" in summary.warnings[0]
    assert not (tmp_path / "cells.parquet.parts").exists()
    fresh = segment_index(sub, tmp_path / "fresh.parquet")
    # the part done before the label was fixed carries the fixed label too
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(tmp_path / "fresh.parquet"))
    assert summary == fresh

    seen.clear()  # finished with the same images and settings: the table is reused
    assert segment_index(sub, out) == summary and seen == []
    relabelled = ExperimentIndex(sub.table.assign(Metadata_moa="again"), sub.root)
    assert segment_index(relabelled, out) == summary and seen == []  # labels updated in place
    assert (pd.read_parquet(out)["Metadata_moa"] == "again").all()
    out.unlink()
    broken.write_bytes(b"II*\x00broken")
    with pytest.raises(InputError):
        segment_index(sub, out)
    broken.write_bytes(good)
    seen.clear()
    segment_index(sub, out, cfg=NucleiConfig(min_area=40))  # other settings: all again
    assert sorted(seen) == list(range(6))
    seen.clear()
    segment_index(sub.subset(np.arange(6) < 5), out, cfg=NucleiConfig(min_area=40))
    assert sorted(seen) == list(range(5))  # another index: segmented again


def test_deepprofiler_locations_roundtrip(tmp_path, tiny_screen):
    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    n = export_deepprofiler_locations(cells, tmp_path / "locations")
    assert n == cells.groupby(["Metadata_plate", "Metadata_well", "Metadata_site"]).ngroups
    first = next((tmp_path / "locations").rglob("*-Nuclei.csv"))
    assert list(pd.read_csv(first).columns) == [CENTER_X, CENTER_Y]
    back = import_deepprofiler_locations(index, tmp_path / "locations")
    assert len(back) == len(cells)
    np.testing.assert_allclose(np.sort(back[CENTER_X]), np.sort(cells[CENTER_X]))
    first.write_text("x,y\n1,2\n")
    with pytest.raises(InputError, match="missing column"):
        import_deepprofiler_locations(index, tmp_path / "locations")


def test_real_dapi_field_count_is_plausible():
    raw = shared("bbbc021", "raw", "Week1_150607_C02_s3_w1E54F0108-F44A-4F6E-9637-6A9DE80F0823.tif")
    labels = segment_nuclei(tifffile.imread(raw).astype(np.float32))
    n = int(labels.max())
    print(f"real BBBC021 DAPI field: {n} nuclei")
    assert 50 <= n <= 300
    areas = np.bincount(labels.ravel())[1:]
    assert 300 < np.median(areas) < 2500  # MCF-7 nuclei at 0.65 um/px


def test_object_table_matches_regionprops(tiny_screen):
    from skimage.measure import regionprops_table

    from morphoprof.preprocess.segmentation import AREA, BBOX, object_table

    _, index = tiny_screen
    labels = segment_nuclei(index.read(0, ["DNA"])[0])
    t = object_table(labels)
    ref = regionprops_table(labels, properties=("label", "centroid", "area", "bbox"))
    assert t["Metadata_object"].tolist() == ref["label"].tolist()
    np.testing.assert_allclose(t[CENTER_X], ref["centroid-1"])
    np.testing.assert_allclose(t[CENTER_Y], ref["centroid-0"])
    np.testing.assert_array_equal(t[AREA], ref["area"])
    for k, col in enumerate(BBOX):
        np.testing.assert_array_equal(t[col], ref[f"bbox-{k}"])


def test_write_overlays_outlines_the_nuclei(tmp_path, tiny_screen):
    from PIL import Image

    from morphoprof.preprocess.segmentation import write_overlays

    _, index = tiny_screen
    paths = write_overlays(index, tmp_path / "ov", rows=[0, 1], scale=2)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    img = np.asarray(Image.open(paths[0]))
    h, w = index.read(0).shape[1:]
    assert img.shape == (2 * h, 2 * w, 3)
    red = (img[..., 0] == 255) & (img[..., 1] == 40)
    assert red.sum() > 20  # outlines drawn


def test_segmentation_at_the_256px_scale_finds_planted_nuclei():
    """A full-resolution field of planted nuclei (~24 px across), block-averaged 3x to the
    6-MoA scale (~8 px across), segmented with the README's 256-px settings."""
    from skimage.draw import ellipse

    from morphoprof.preprocess.segmentation import NucleiConfig, object_table, segment_nuclei

    rng = np.random.default_rng(3)
    full = rng.normal(30, 3, (768, 768)).astype(np.float32)
    centres = []
    while len(centres) < 60:
        c = rng.uniform(20, 748, 2)
        if all(np.hypot(*(c - p)) > 30 for p in centres):
            centres.append(c)
            rr, cc = ellipse(c[0], c[1], rng.uniform(9, 13), rng.uniform(9, 13), full.shape,
                             rotation=rng.uniform(0, np.pi))
            full[rr, cc] += rng.uniform(80, 160)
    small = full.reshape(256, 3, 256, 3).mean(axis=(1, 3))
    cfg = NucleiConfig(smoothing=0.5, min_area=6, max_area=200, min_distance=2)
    found = object_table(segment_nuclei(small, cfg))
    xy = found[["Nuclei_Location_Center_Y", "Nuclei_Location_Center_X"]].to_numpy()
    truth = np.asarray(centres) / 3 - 1 / 3  # block centres
    d = np.hypot(*(truth[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    rows, cols = linear_sum_assignment(d)
    hits = int(np.sum(d[rows, cols] < 2.0))
    assert hits >= 57 and len(found) <= 63  # >= 95 % found, few spurious


def _distance_map(img: np.ndarray, block: int) -> np.ndarray:
    """The smoothed distance map segment_nuclei seeds from, at 1/``block`` resolution."""
    from scipy import ndimage as ndi

    h, w = img.shape[0] // block * block, img.shape[1] // block * block
    small = img[:h, :w].reshape(h // block, block, w // block, block).mean((1, 3))
    mask = small > np.percentile(small, 70)
    dist = 0.5 * (ndi.distance_transform_cdt(mask, metric="chessboard")
                  + ndi.distance_transform_cdt(mask, metric="taxicab"))
    return ndi.gaussian_filter(dist.astype(np.float32), 1.0)


def test_local_maxima_are_skimage_peak_local_max_in_its_order():
    from skimage.feature import peak_local_max

    raw = shared("bbbc021", "raw", "Week1_150607_C02_s3_w1E54F0108-F44A-4F6E-9637-6A9DE80F0823.tif")
    dna = tifffile.imread(raw).astype(np.float32)
    rng = np.random.default_rng(3)
    images = [_distance_map(dna, b) for b in (1, 2, 4)]
    # small integer images: plateaus, ties and peaks at exactly min_distance
    images += [rng.integers(0, 4, (40, 50)).astype(np.float32) for _ in range(40)]
    images.append(np.full((20, 20), 2.0, np.float32))  # flat: no peak
    for k, image in enumerate(images):
        for md in (1, 2, 3, 5):
            want = peak_local_max(image, min_distance=md, threshold_abs=1.0,
                                  exclude_border=False)
            got = local_maxima(image, md, threshold=1.0)
            assert np.array_equal(got, want), (k, md, len(got), len(want))


@pytest.mark.parametrize("clear", [False, True])
def test_keep_objects_is_skimage_clear_border_size_filter_and_renumbering(clear):
    """One look-up table does what clear_border, the area filter and the renumbering did, on
    the watershed labels of the real DAPI field (and of a synthetic one, where it is absent)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import clear_border, watershed

    raw = SHARED_RAW if SHARED_RAW.is_file() else None
    if raw is not None:
        img = tifffile.imread(raw).astype(np.float32)
    else:
        img = np.zeros((300, 300), np.float32)
        yy, xx = np.mgrid[:300, :300]
        for k, (y, x) in enumerate(np.random.default_rng(0).integers(0, 300, (60, 2))):
            img += 100.0 * (((yy - y) ** 2 + (xx - x) ** 2) < (4 + k % 9) ** 2)
    mask = img > np.percentile(img, 80)
    dist = ndi.distance_transform_edt(mask)
    markers, _ = ndi.label(dist > 0.6 * ndi.maximum_filter(dist, 9))
    labels = watershed(-dist, markers, mask=mask)
    want = clear_border(labels) if clear else labels.copy()
    areas = np.bincount(want.ravel())
    bad = (areas < 30) | (areas > 2000)
    bad[0] = False
    want[bad[want]] = 0
    _, want = np.unique(want, return_inverse=True)  # renumbered 1..N in label order
    got = keep_objects(labels, 30, 2000, clear_border=clear)
    assert got.dtype == np.int32 and got.max() > 10
    if clear:  # some objects touched the edge and are gone
        assert got.max() < keep_objects(labels, 30, 2000).max()
    np.testing.assert_array_equal(got, want.reshape(labels.shape))


def test_image_quality_reads_the_files_own_pixels():
    plane = np.full((20, 20), 4095, np.uint16)
    plane[:10] = 7
    assert image_quality(plane, "a.tif") == image_quality(plane.astype(np.float32), "a.tif") \
        == ["a.tif: 50% of pixels saturated at 4095"]
    assert image_quality(np.zeros((8, 8), np.uint8), "z.tif") == [
        "z.tif: blank image (constant value 0); no nuclei"]
