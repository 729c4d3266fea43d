import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from morphoprof.errors import InputError
from morphoprof.index.schema import ExperimentIndex
from morphoprof.preprocess.crops import (
    CropConfig,
    CropDataset,
    crop_cells,
    export_crops,
    normalize_crops,
)
from morphoprof.preprocess.segmentation import segment_index
from morphoprof.shards import read_features


def test_crop_geometry_and_edge_policies():
    img = np.arange(2 * 20 * 30, dtype=np.float32).reshape(2, 20, 30)
    centers = np.array([[15.0, 10.0], [1.0, 1.0]])  # x, y
    crops, kept = crop_cells(img, centers, size=8, edge="pad")
    assert crops.shape == (2, 2, 8, 8) and kept.tolist() == [0, 1]
    np.testing.assert_array_equal(crops[0], img[:, 6:14, 11:19])  # centred on (row 10, col 15)
    assert (crops[1][:, :3, :] == 0).all()  # padded outside the image
    crops, kept = crop_cells(img, centers, size=8, edge="skip")
    assert kept.tolist() == [0] and crops.shape == (1, 2, 8, 8)
    with pytest.raises(InputError, match="edge policy"):
        crop_cells(img, centers, edge="wrap")


def test_neighbour_masking():
    img = np.ones((1, 10, 10), np.float32)
    labels = np.zeros((10, 10), np.int32)
    labels[2:5, 2:5] = 1
    labels[5:8, 5:8] = 2
    crops, _ = crop_cells(img, np.array([[3.0, 3.0]]), size=10, labels=labels, object_ids=[1])
    c = crops[0, 0]  # crop pixel (i, j) is image pixel (i - 2, j - 2)
    assert c[8, 8] == 0  # image (6, 6) belongs to object 2: masked
    assert c[5, 5] == 1  # image (3, 3), its own nucleus, is kept
    assert c[2, 8] == 1  # background stays


def test_normalizations():
    x = np.stack([np.linspace(0, 10, 64).reshape(1, 8, 8), np.zeros((1, 8, 8))]).astype(
        np.float32)
    m = normalize_crops(x, "max")
    assert m[0].max() == pytest.approx(1.0) and (m[1] == 0).all()
    p = normalize_crops(x, "percentile")
    assert p.min() >= 0 and p.max() <= 1 and p[0].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(normalize_crops(x, "none"), x)
    with pytest.raises(InputError, match="crop normalization"):
        normalize_crops(x, "zscore")


def test_dataset_streams_crops_with_workers(tmp_path, tiny_screen):
    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    ds = CropDataset(index, cells, size=24, normalization="max")
    assert len(ds) == len(cells)
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    n = 0
    for batch, k in loader:
        assert batch.shape[1:] == (3, 24, 24) and batch.dtype == torch.float32
        assert float(batch.amax()) <= 1.0 + 1e-6
        n += len(k)
    assert n == len(cells)
    # the crop's centre pixel in DNA is inside a bright nucleus
    crop, _ = ds[0]
    assert crop[0, 12, 12] > crop[0].mean()
    skip = CropDataset(index, cells, size=40, edge="skip")
    assert 0 < len(skip) < len(cells)
    bad = cells.copy()
    bad.loc[0, "Metadata_well"] = "Z99"
    with pytest.raises(InputError, match="row 0: image set .*Z99.* is not in the index"):
        CropDataset(index, bad)


def test_export_crops_shards_and_resume(tmp_path, tiny_screen):
    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    out = tmp_path / "crops"
    s = export_crops(index, cells, out, CropConfig(size=16), shard_size=20)
    assert s.cells == len(cells) and s.shards_written == -(-len(cells) // 20)
    table = read_features(out)
    assert len(table) == len(cells)
    row = table.iloc[25]
    with np.load(out / row["Metadata_crop_file"]) as z:
        arr = z["crops"]
    assert arr.dtype == np.float16 and arr.shape[1:] == (3, 16, 16)
    img = index.read(int(np.flatnonzero(
        (index.table[["Metadata_plate", "Metadata_well", "Metadata_site"]] ==
         row[["Metadata_plate", "Metadata_well", "Metadata_site"]].to_numpy()).all(axis=1))[0]))
    ref, _ = crop_cells(img, row[["Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"]]
                        .to_numpy(float)[None], 16)
    np.testing.assert_allclose(arr[int(row["Metadata_crop_index"])], ref[0], rtol=1e-3)
    (out / "shards" / "00001.parquet").unlink()
    again = export_crops(index, cells, out, CropConfig(size=16), shard_size=20)
    assert again.cells == 20 and again.shards_written == 1
    assert again.shards_skipped == s.shards_written - 1  # the other crops reused
    # as many cells, segmented otherwise: not mixed with the crops of the first ones
    moved = cells.assign(Nuclei_Location_Center_X=cells["Nuclei_Location_Center_X"] + 1)
    with pytest.raises(InputError, match=r"other parameters \(cells: '[0-9a-f]{16}' -> "):
        export_crops(index, moved, out, CropConfig(size=16), shard_size=20)
    redone = export_crops(index, moved, out, CropConfig(size=16), shard_size=20,
                          overwrite=True)
    assert redone.shards_skipped == 0 and redone.cells == len(cells)


def test_export_crops_writes_a_shard_piece_by_piece_to_the_same_files(tmp_path, tiny_screen,
                                                                      monkeypatch):
    """A shard's crops are cut CROP_CHUNK cells at a time in a thread and deflated as they
    come: 7 cells a piece (pieces across image sets and a short last one) writes the same
    bytes as one piece per shard; a piece that fails (an unreadable image) leaves no npz."""
    from morphoprof.preprocess import crops as crops_module

    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    export_crops(index, cells, tmp_path / "whole", CropConfig(size=16), shard_size=20)
    monkeypatch.setattr(crops_module, "CROP_CHUNK", 7)
    export_crops(index, cells, tmp_path / "pieces", CropConfig(size=16), shard_size=20)
    files = sorted(p.name for p in (tmp_path / "whole" / "shards").glob("*.npz"))
    assert len(files) > 1
    for name in files:
        assert ((tmp_path / "whole" / "shards" / name).read_bytes()
                == (tmp_path / "pieces" / "shards" / name).read_bytes())
    broken = index.table.loc[index.table.index[-1], "Path_DNA"]
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    table = index.table.copy()
    table.loc[table.index[-1], "Path_DNA"] = str(bad)
    assert broken != str(bad)
    with pytest.raises(InputError, match="bad.tif"):
        export_crops(ExperimentIndex(table, index.root), cells, tmp_path / "failed",
                     CropConfig(size=16), shard_size=20)
    done = sorted(p.name for p in (tmp_path / "failed" / "shards").glob("*.npz"))
    assert done == files[:len(done)] and len(done) < len(files)
    assert not list((tmp_path / "failed").rglob(".*tmp*"))


def test_dataset_masks_neighbouring_nuclei(tmp_path, tiny_screen):
    from morphoprof.preprocess.segmentation import NucleiConfig

    _, index = tiny_screen
    cfg = NucleiConfig()
    segment_index(index, tmp_path / "cells.parquet", cfg=cfg)
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    plain = CropDataset(index, cells, size=48, normalization="none")
    masked = CropDataset(index, cells, size=48, normalization="none", mask_neighbours=cfg)
    changed = 0
    for k in range(len(cells)):
        a, _ = plain[k]
        b, _ = masked[k]
        assert b[:, 24, 24].tolist() == a[:, 24, 24].tolist()  # own nucleus untouched
        changed += int((a != b).any())
    assert changed > 0  # some crops contained neighbours, now blanked
    # a field at a time (export_crops): the crops of the items one by one, in the order asked
    ks = np.r_[np.arange(len(cells)), [5, 0, 5, len(cells) - 1]]
    for ds in (masked, CropDataset(index, cells, size=48, normalization="max")):
        np.testing.assert_array_equal(ds.crops(ks), np.stack([ds[k][0].numpy() for k in ks]))
    assert masked.crops(np.arange(0)).shape == (0, 3, 48, 48)
    with pytest.raises(InputError, match="Metadata_object"):
        CropDataset(index, cells.drop(columns=["Metadata_object"]), mask_neighbours=cfg)


def crop_folder(tmp_path, index) -> tuple:
    """The tiny screen's nuclei cut into 16-px crops, 20 to a shard: (folder, cell table)."""
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    export_crops(index, cells, tmp_path / "crops", CropConfig(size=16), shard_size=20)
    return tmp_path / "crops", cells


def test_load_crop_shards_round_trip_and_errors(tmp_path, tiny_screen):
    from morphoprof.preprocess.crops import load_crop_shards

    _, index = tiny_screen
    out, cells = crop_folder(tmp_path, index)
    crops, table, channels = load_crop_shards(out)
    assert crops.shape == (len(cells), 3, 16, 16) and len(table) == len(cells)
    assert channels == index.channels and "Metadata_crop_index" not in table.columns
    ds = CropDataset(index, table.iloc[[27]], 16, normalization="none")  # the 28th row
    np.testing.assert_allclose(crops[27], ds[0][0].numpy(), rtol=1e-3)
    part = pd.read_parquet(out / "shards" / "00001.parquet")
    part.loc[3, "Metadata_crop_index"] = 999
    part.to_parquet(out / "shards" / "00001.parquet")
    with pytest.raises(InputError, match=r"00001.parquet row 3: crop 999 is outside"):
        load_crop_shards(out)
    (out / "shards" / "00001.npz").unlink()
    with pytest.raises(InputError, match="00001.npz"):
        load_crop_shards(out)
    with pytest.raises(InputError, match="not a crop folder"):
        load_crop_shards(tmp_path)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16, np.float16, np.float32,
                                   np.float64])
def test_max_normalisation_in_one_pass_equals_converting_first(dtype):
    rng = np.random.default_rng(1)
    x = (rng.random((6, 3, 10, 10)) * 3000 - (400 if dtype == np.int16 else 0)).astype(dtype)
    x[2, 1] = 0  # a blank channel stays 0
    if dtype == np.int16:
        x[3, 0] = -7  # no positive peak: divided by 1
    want = x.astype(np.float32)
    peak = want.max(axis=(2, 3), keepdims=True)
    want /= np.where(peak > 0, peak, 1.0)
    got = normalize_crops(x, "max")
    assert got.dtype == np.float32 and got is not x
    np.testing.assert_array_equal(got, want)
    if dtype == np.float32:  # copy=False: in place
        assert normalize_crops(x, "max", copy=False) is x
        np.testing.assert_array_equal(x, want)


def test_crop_folder_is_read_a_shard_at_a_time_and_indexes_as_numpy(tmp_path, tiny_screen):
    import pickle

    from morphoprof.preprocess.crops import CropShards, load_crop_shards

    _, index = tiny_screen
    crops, table, _ = load_crop_shards(crop_folder(tmp_path, index)[0])
    assert isinstance(crops, CropShards) and len(crops._files) >= 4
    assert crops.dtype == np.float16 and crops.shape == (len(table), 3, 16, 16)
    assert not crops._cache  # nothing decompressed until asked for
    every = np.asarray(crops)
    assert every.dtype == np.float16 and every.shape == crops.shape
    rng = np.random.default_rng(0)
    mask = rng.random(len(crops)) < 0.3
    for key in (5, -1, slice(3, 50, 7), slice(None), rng.integers(0, len(crops), 40),
                np.array([len(crops) - 1, 0, 0, 21]), mask, [2, -3]):
        np.testing.assert_array_equal(crops[key], every[key])
    assert len(crops._cache) <= 2  # at most two shards held decompressed
    with pytest.raises(IndexError):
        crops[np.array([len(crops)])]
    with pytest.raises(IndexError):
        crops[mask[:-1]]
    clone = pickle.loads(pickle.dumps(crops))  # to worker processes: no cache travels
    assert not clone._cache
    np.testing.assert_array_equal(clone[10:30], every[10:30])
    crops._cache.clear()
    crops._files[1].unlink()  # gone after the folder was opened: named when it is read
    with pytest.raises(InputError, match=f"cannot read crop shard {crops._files[1]}"):
        crops[np.flatnonzero(crops._shard == 1)[:1]]
