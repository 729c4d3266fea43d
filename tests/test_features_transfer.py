import json

import numpy as np
import pandas as pd
import pytest
import torch

from morphoprof.errors import InputError
from morphoprof.features.transfer import TransferConfig, TransferExtractor
from morphoprof.index.schema import ExperimentIndex
from morphoprof.shards import read_features

# one shard per plate (the tiny screen's plates are smaller than the default min_shard_rows)
FAST = dict(image_size=64, batch_size=8, min_shard_rows=1)


@pytest.fixture(scope="module")
def extractor():
    return TransferExtractor(TransferConfig(**FAST))


def test_extract_writes_shards_with_metadata_and_named_columns(tmp_path, tiny_screen, extractor):
    _, index = tiny_screen
    summary = extractor.extract(index, tmp_path / "f")
    assert summary.shards_written == index.table["Metadata_plate"].nunique()
    df = read_features(tmp_path / "f")
    assert len(df) == len(index)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    assert len(feats) == 3 * 1280
    assert feats[0] == "transfer_DNA_0" and feats[-1] == "transfer_Actin_1279"
    assert np.isfinite(df[feats].to_numpy()).all()
    key = ["Metadata_plate", "Metadata_well", "Metadata_site"]
    assert sorted(map(tuple, df[key].to_numpy())) == sorted(map(tuple, index.table[key].to_numpy()))
    # features of a row equal those of the same image fed directly
    i = 5
    row = index.table.iloc[i]
    from morphoprof.features.transfer import FieldTransform

    ranges = json.loads((tmp_path / "f" / "manifest.json").read_text())["params"][
        "intensity_ranges"]
    x = FieldTransform(ranges, (64, 64))(index.read(i))[None]
    direct = extractor.features_from_batch(x, index.channels)[0]
    got = df[(df[key] == row[key]).all(axis=1)][feats].to_numpy()[0]
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)


def test_rerun_skips_and_resumes_missing_shards(tmp_path, tiny_screen, extractor):
    _, index = tiny_screen
    out = tmp_path / "f"
    extractor.extract(index, out)
    first = read_features(out)
    manifest = json.loads((out / "manifest.json").read_text())
    lost = sorted(manifest["shards"])[1]
    (out / manifest["shards"][lost]["file"]).unlink()  # as if killed before this shard
    summary = extractor.extract(index, out)
    assert summary.shards_written == 1
    assert summary.shards_skipped == len(manifest["shards"]) - 1
    again = read_features(out)
    np.testing.assert_array_equal(
        again.sort_values(list(again.columns[:3])).iloc[:, 10:].to_numpy(),
        first.sort_values(list(first.columns[:3])).iloc[:, 10:].to_numpy(),
    )


def test_small_plates_are_packed_into_fewer_shards_with_the_same_features(tmp_path,
                                                                         tiny_screen, extractor):
    _, tiny = tiny_screen
    # 40 plates of 5 fields (the tiny screen's 4 plates, 10 times over, renamed)
    table = pd.concat([tiny.table.assign(Metadata_plate=tiny.table["Metadata_plate"] + f"_{k}")
                       for k in range(10)], ignore_index=True)
    index = ExperimentIndex(table, tiny.root)
    per_plate = extractor.extract(index, tmp_path / "p")
    packed = TransferExtractor(TransferConfig(**{**FAST, "min_shard_rows": 128}))
    packed.backbone, packed.model = extractor.backbone, extractor.model  # the same network
    summary = packed.extract(index, tmp_path / "f")
    # packs stop at 200 / 8 = 25 fields: 8 shards of 5 plates (a cluster keeps work for 8)
    assert per_plate.shards_written == 40 and summary.shards_written == 8
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert [v["rows"] for v in manifest["shards"].values()] == [25] * 8
    assert next(iter(manifest["shards"])) == "Week1_P101_0-to-Week1_P101_4"
    assert manifest["params"]["min_shard_rows"] == 128
    key = ["Metadata_plate", "Metadata_well", "Metadata_site"]
    a = read_features(tmp_path / "p").sort_values(key).reset_index(drop=True)
    b = read_features(tmp_path / "f").sort_values(key).reset_index(drop=True)
    assert len(b) == len(index) and not b.duplicated(key).any()
    np.testing.assert_allclose(b.iloc[:, 10:].to_numpy(), a.iloc[:, 10:].to_numpy(),
                               rtol=1e-5, atol=1e-5)
    # another packing is other parameters: refused, as a re-run would mix two plans
    with pytest.raises(InputError, match="min_shard_rows"):
        extractor.extract(index, tmp_path / "f")


def test_other_parameters_refused(tmp_path, tiny_screen, extractor):
    _, index = tiny_screen
    extractor.extract(index, tmp_path / "f")
    other = TransferExtractor(TransferConfig(image_size=48, batch_size=8),
                              backbone=extractor.backbone)
    with pytest.raises(InputError, match="other parameters"):
        other.extract(index, tmp_path / "f")
    # another index of as many image sets (other plates): its features would have joined the
    # first index's shards in the folder
    renamed = ExperimentIndex(index.table.assign(
        Metadata_plate=index.table["Metadata_plate"] + "_b"), index.root)
    with pytest.raises(InputError, match=r"other parameters \(index: '[0-9a-f]{16}' -> "):
        extractor.extract(renamed, tmp_path / "f")


def test_corrected_annotations_update_the_finished_shards_instead_of_recomputing(
        tmp_path, tiny_screen, extractor, caplog):
    """The same images with corrected annotations (a MoA fixed, a plate-map column added):
    the finished features are kept and their metadata brought up to date, the folder as a
    clean run on the corrected index would write it."""
    _, index = tiny_screen
    first = extractor.extract(index, tmp_path / "f")
    table = index.table.copy()
    table["Metadata_moa"] = table["Metadata_moa"].where(table["Metadata_control"], "fixed")
    table.insert(3, "Metadata_cell_line", "U2OS")
    fixed = ExperimentIndex(table, index.root)
    with caplog.at_level("INFO", logger="morphoprof.shards"):
        again = extractor.extract(fixed, tmp_path / "f")
    assert again.shards_written == 0 and again.shards_skipped == first.shards_written
    assert "annotations changed since the last run (Metadata_cell_line)" in caplog.text
    extractor.extract(fixed, tmp_path / "clean")
    pd.testing.assert_frame_equal(read_features(tmp_path / "f"),
                                  read_features(tmp_path / "clean"))
    assert (read_features(tmp_path / "f")["Metadata_cell_line"] == "U2OS").all()


def test_rgb_strategy_and_intermediate_layer(tiny_screen, extractor):
    _, index = tiny_screen
    x = torch.rand(2, 3, 64, 64)
    rgb = TransferExtractor(TransferConfig(channel_strategy="rgb", **FAST),
                            backbone=extractor.backbone)
    assert rgb.features_from_batch(x, index.channels).shape == (2, 1280)
    mid = TransferExtractor(TransferConfig(layer="blocks.3", **FAST), backbone=extractor.backbone)
    assert mid.features_from_batch(x, index.channels).shape == (2, 3 * 80)
    with pytest.raises(InputError, match="layer 'blocks.99'"):
        TransferExtractor(TransferConfig(layer="blocks.99", **FAST), backbone=extractor.backbone)


def test_tiles_average_over_tiles(tiny_screen, extractor):
    _, index = tiny_screen
    tiled = TransferExtractor(TransferConfig(tiles=2, **FAST), backbone=extractor.backbone)
    x = torch.rand(1, 3, 128, 128)
    got = tiled.features_from_batch(x, index.channels)
    parts = [extractor.features_from_batch(x[:, :, r:r + 64, c:c + 64], index.channels)
             for r in (0, 64) for c in (0, 64)]
    np.testing.assert_allclose(got, np.mean(parts, axis=0), rtol=1e-4, atol=1e-5)


def test_native_strategy_and_channel_count_checked_before_work(tmp_path, tiny_screen):
    _, index = tiny_screen
    native = TransferExtractor(TransferConfig(model="resnet18", weights="random",
                                              channel_strategy="native", in_chans=3, **FAST))
    assert native.features_from_batch(torch.rand(2, 3, 64, 64), index.channels).shape == (2, 512)
    two = TransferExtractor(TransferConfig(model="resnet18", weights="random",
                                           channel_strategy="native", in_chans=2, **FAST))
    with pytest.raises(InputError, match=r"takes 2 input channels, the images have 3"):
        two.extract(index, tmp_path / "f")
    assert not (tmp_path / "f").exists()  # refused before any work
    with pytest.raises(InputError, match="rgb strategy needs 3 of the channels"):
        TransferExtractor(TransferConfig(channel_strategy="rgb",
                                         rgb_channels=["DNA", "GFP", "Actin"], **FAST),
                          backbone=None).check_channels(index.channels)


def test_unknown_model_lists_close_matches():
    from morphoprof.features.backbones import create_backbone

    with pytest.raises(InputError, match="close matches: .*resnet50"):
        create_backbone("resnet05", weights="random")


def test_single_cell_crop_features(tmp_path, tiny_screen, extractor):
    import pandas as pd

    from morphoprof.preprocess.segmentation import segment_index

    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    cellx = TransferExtractor(TransferConfig(batch_size=32), backbone=extractor.backbone)
    s = cellx.extract_cells(index, cells, tmp_path / "cf", size=32)
    df = read_features(tmp_path / "cf")
    assert s.cells == len(df) == len(cells)
    assert "Nuclei_Location_Center_X" in df.columns and "transfer_DNA_0" in df.columns
    assert np.isfinite(df.filter(like="transfer_").to_numpy()).all()


def test_single_cell_features_skip_cells_of_unreadable_image_sets(tmp_path, tiny_screen,
                                                                  extractor):
    import pandas as pd

    from morphoprof.index.schema import ExperimentIndex
    from morphoprof.preprocess.segmentation import segment_index

    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet").iloc[::-1]  # not in plate order
    table = index.table.copy()
    table.loc[0, "Path_DNA"] = "gone/missing.tif"
    broken = ExperimentIndex(table, index.root)
    key = ["Metadata_plate", "Metadata_well", "Metadata_site"]
    lost = (cells[key].astype(str).agg("|".join, axis=1)
            == "|".join(table.loc[0, key].astype(str))).to_numpy()
    assert 0 < lost.sum() < len(cells)
    fail = TransferExtractor(TransferConfig(batch_size=32), backbone=extractor.backbone)
    with pytest.raises(InputError, match="missing.tif"):
        fail.extract_cells(broken, cells, tmp_path / "fail", size=32)
    skip = TransferExtractor(TransferConfig(batch_size=32, on_error="skip"),
                             backbone=extractor.backbone)
    s = skip.extract_cells(broken, cells, tmp_path / "cf", size=32)
    # each skipped cell named by its row of the table given, with the file that was missing
    assert sorted(r["row"] for r in s.skipped) == np.flatnonzero(lost).tolist()
    assert all("missing.tif" in r["reason"] for r in s.skipped)
    df = read_features(tmp_path / "cf")
    assert s.cells == len(df) == len(cells) - lost.sum()
    saved = json.loads((tmp_path / "cf" / "run_summary.json").read_text())
    assert saved["n_skipped"] == lost.sum() and saved["on_error"] == "skip"
    assert saved == s.to_json()
    # a re-run finds every shard done and still reports the skipped cells
    again = skip.extract_cells(broken, cells, tmp_path / "cf", size=32)
    assert again.shards_written == 0 and again.n_skipped == lost.sum()


def test_traced_network_matches_eager(tiny_screen, extractor):
    _, index = tiny_screen
    eager = TransferExtractor(TransferConfig(jit=False, **FAST), backbone=extractor.backbone)
    traced = TransferExtractor(TransferConfig(jit=True, **FAST), backbone=extractor.backbone)
    x = torch.rand(3, 3, 64, 64)
    np.testing.assert_allclose(traced.features_from_batch(x, index.channels),
                               eager.features_from_batch(x, index.channels),
                               rtol=1e-3, atol=1e-4)
    # a second input size gets its own trace (TF 'same' padding depends on the size)
    y = torch.rand(2, 3, 96, 96)
    np.testing.assert_allclose(traced.features_from_batch(y, index.channels),
                               eager.features_from_batch(y, index.channels),
                               rtol=1e-3, atol=1e-4)
    assert len(traced._traced) == 2 and not eager._traced


def test_layer_cut_computes_only_up_to_the_layer_and_matches_a_hook(extractor):
    """An intermediate layer is embedded by a graph cut at it: the later stages never run, the
    pooled output equals the full network's layer output (kept by a hook), traced or not."""
    mid = TransferExtractor(TransferConfig(layer="blocks.3", jit=False, **FAST),
                            backbone=extractor.backbone)
    traced = TransferExtractor(TransferConfig(layer="blocks.3", jit=True, **FAST),
                               backbone=extractor.backbone)
    kept = {}
    model = extractor.backbone.model
    handle = model.blocks[3].register_forward_hook(lambda m, i, o: kept.update(out=o))
    blocks5 = model.blocks[5].register_forward_hook(lambda m, i, o: kept.update(late=True))
    x = torch.rand(4, 1, 64, 64)
    try:
        got = mid.features_from_batch(x, ["a"])
        assert "late" not in kept  # the cut graph stopped before blocks.5
        with torch.inference_mode():
            model((x.expand(-1, 3, -1, -1) - mid._mean) / mid._std)
        want = kept["out"].mean(dim=(2, 3)).numpy()
    finally:
        handle.remove()
        blocks5.remove()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(traced.features_from_batch(x, ["a"]), want, rtol=1e-3, atol=1e-4)


def test_bf16_precision_close_to_fp32_and_checked(extractor):
    fp32 = TransferExtractor(TransferConfig(precision="fp32", **FAST), backbone=extractor.backbone)
    bf16 = TransferExtractor(TransferConfig(precision="bf16", **FAST), backbone=extractor.backbone)
    x = torch.rand(4, 1, 64, 64)
    a, b = fp32.features_from_batch(x, ["a"]), bf16.features_from_batch(x, ["a"])
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # it really ran in bf16
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99
    with pytest.raises(InputError, match="precision must be"):
        TransferConfig(precision="fp16")


def _relative_error(a, b):
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def test_onnxruntime_engine_matches_torch(tiny_screen, extractor):
    """The ONNX Runtime engine gives torch's features (per-row relative error <= 1e-3) for the
    whole network at two input sizes (one export each) and for a layer cut."""
    _, index = tiny_screen
    eager = TransferExtractor(TransferConfig(jit=False, backend="torch", **FAST),
                              backbone=extractor.backbone)
    fast = TransferExtractor(TransferConfig(backend="onnxruntime", **FAST),
                             backbone=extractor.backbone)
    for shape in ((3, 3, 64, 64), (2, 3, 96, 96)):
        x = torch.rand(*shape)
        got = fast.features_from_batch(x, index.channels)
        assert got.shape == eager.features_from_batch(x, index.channels).shape
        assert _relative_error(got, eager.features_from_batch(x, index.channels)).max() < 1e-3
    assert len(fast._sessions) == 2 and not eager._sessions
    assert not extractor.backbone.model.training  # exporting left the shared network in eval
    cut = TransferExtractor(TransferConfig(layer="blocks.3", backend="onnxruntime", **FAST),
                            backbone=extractor.backbone)
    ref = TransferExtractor(TransferConfig(layer="blocks.3", backend="torch", jit=False, **FAST),
                            backbone=extractor.backbone)
    x = torch.rand(4, 1, 64, 64)
    assert _relative_error(cut.features_from_batch(x, ["a"]),
                           ref.features_from_batch(x, ["a"])).max() < 1e-3


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_onnx_sessions_side_by_side_give_the_batch_in_order(tiny_screen, extractor, monkeypatch,
                                                            workers):
    """Each batch is split between the pool's sessions (uneven parts, fewer inputs than
    sessions) and comes back in order, equal to torch's features."""
    from morphoprof.features import transfer

    _, index = tiny_screen
    monkeypatch.setattr(transfer, "ort_layout", lambda threads: (workers, 1))
    fast = TransferExtractor(TransferConfig(backend="onnxruntime", **FAST),
                             backbone=extractor.backbone)
    eager = TransferExtractor(TransferConfig(jit=False, backend="torch", **FAST),
                              backbone=extractor.backbone)
    for n in (5, 1):  # 15 greyscale inputs (uneven parts), then 3 (one each for 3 sessions)
        x = torch.rand(n, 3, 64, 64)
        assert _relative_error(fast.features_from_batch(x, index.channels),
                               eager.features_from_batch(x, index.channels)).max() < 1e-3
    (pool,) = fast._sessions.values()
    assert len(pool.sessions) == workers


def test_onnx_layout_splits_the_threads_between_two_sessions():
    from morphoprof.features.transfer import ort_layout

    assert ort_layout(1) == (1, 1)
    assert ort_layout(2) == (2, 1)
    assert ort_layout(16) == (2, 8)


def test_backend_choice_and_fallback(extractor, monkeypatch):
    """auto picks ONNX Runtime for runs of >= 500 network inputs and torch for smaller ones;
    a network that does not export falls back to torch under auto and is an error when
    onnxruntime was asked for; an unknown backend is refused."""
    from torch.utils.data import TensorDataset

    with pytest.raises(InputError, match="backend must be"):
        TransferConfig(backend="tensorrt")
    data = TensorDataset(torch.rand(4, 3, 64, 64), torch.arange(4))
    auto = TransferExtractor(TransferConfig(**FAST), backbone=extractor.backbone)
    auto.features_for_dataset(data, ["a", "b", "c"], run_size=100)
    assert not auto._ort and not auto._sessions  # 300 inputs: torch
    x_big, _ = auto.features_for_dataset(data, ["a", "b", "c"], run_size=1000)
    assert auto._ort and auto._sessions
    x_small, _ = TransferExtractor(TransferConfig(backend="torch", **FAST),
                                   backbone=extractor.backbone).features_for_dataset(
        data, ["a", "b", "c"])
    assert _relative_error(x_big, x_small).max() < 1e-3

    def no_export(*a, **k):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    monkeypatch.setenv("MORPHOPROF_CACHE", "off")  # a cached graph would need no export
    fallback = TransferExtractor(TransferConfig(**FAST), backbone=extractor.backbone)
    x_fb, _ = fallback.features_for_dataset(data, ["a", "b", "c"], run_size=1000)
    assert not fallback._ort and _relative_error(x_fb, x_small).max() < 1e-3
    strict = TransferExtractor(TransferConfig(backend="onnxruntime", **FAST),
                               backbone=extractor.backbone)
    with pytest.raises(InputError, match="cannot run on ONNX Runtime.*unsupported operator"):
        strict.features_from_batch(torch.rand(1, 3, 64, 64), ["a", "b", "c"])


def test_onnxruntime_engine_matches_torch_for_native_channels():
    """Native strategy (2 channels, normalised by 0.5 / 0.5 inside the ONNX graph): the same
    features as torch."""
    from morphoprof.features.backbones import create_backbone

    bb = create_backbone("resnet18", "random", in_chans=2)
    cfg = dict(channel_strategy="native", in_chans=2, batch_size=4)
    fast = TransferExtractor(TransferConfig(backend="onnxruntime", **cfg), backbone=bb)
    ref = TransferExtractor(TransferConfig(backend="torch", jit=False, **cfg), backbone=bb)
    x = torch.rand(6, 2, 48, 48)  # 6 > batch_size: cut into batches of 4 and 2
    assert _relative_error(fast.features_from_batch(x, ["a", "b"]),
                           ref.features_from_batch(x, ["a", "b"])).max() < 1e-3


def test_exported_graphs_are_cached_on_disk_and_reused(tmp_path, extractor, monkeypatch):
    """The first ONNX session of a network and input shape writes its graph to
    $MORPHOPROF_CACHE/onnx; another extractor loads it without exporting and gives the same
    features; another layer, shape or stain count is another graph; a damaged file is
    exported again; an unwritable cache only costs the export."""
    from morphoprof.features import transfer

    monkeypatch.setenv("MORPHOPROF_CACHE", str(tmp_path / "cache"))
    x = torch.rand(3, 3, 64, 64)
    first = TransferExtractor(TransferConfig(backend="onnxruntime", **FAST),
                              backbone=extractor.backbone)
    want = first.features_from_batch(x, ["a", "b", "c"])
    graphs = sorted((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(graphs) == 1 and graphs[0].stat().st_size > 1e6

    exports = []
    real_export = transfer._export_onnx
    monkeypatch.setattr(transfer, "_export_onnx",
                        lambda *a: exports.append(a) or real_export(*a))
    again = TransferExtractor(TransferConfig(backend="onnxruntime", **FAST),
                              backbone=extractor.backbone)
    np.testing.assert_allclose(again.features_from_batch(x, ["a", "b", "c"]), want, rtol=1e-6)
    assert not exports  # loaded, not exported
    cut = TransferExtractor(TransferConfig(layer="blocks.3", backend="onnxruntime", **FAST),
                            backbone=extractor.backbone)
    cut.features_from_batch(x, ["a", "b", "c"])
    cut.features_from_batch(torch.rand(2, 3, 96, 96), ["a", "b", "c"])
    assert len(exports) == 2 and len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 3

    graphs[0].write_bytes(b"not an onnx graph")
    damaged = TransferExtractor(TransferConfig(backend="onnxruntime", **FAST),
                                backbone=extractor.backbone)
    np.testing.assert_allclose(damaged.features_from_batch(x, ["a", "b", "c"]), want, rtol=1e-6)
    assert len(exports) == 3 and graphs[0].stat().st_size > 1e6  # exported and replaced

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("MORPHOPROF_CACHE", str(blocked))  # onnx/ cannot be made under a file
    nowhere = TransferExtractor(TransferConfig(backend="onnxruntime", **FAST),
                                backbone=extractor.backbone)
    np.testing.assert_allclose(nowhere.features_from_batch(x, ["a", "b", "c"]), want, rtol=1e-6)


def test_the_reader_thread_runs_torch_on_one_thread_and_leaves_the_caller_alone():
    from morphoprof.features.transfer import _reader_thread_setup
    from morphoprof.prefetch import Prefetched

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def items():
            for k in range(3):
                seen.append(torch.get_num_threads())
                yield k

        assert list(Prefetched(items(), setup=_reader_thread_setup)) == [0, 1, 2]
        assert torch.get_num_threads() == 2  # the caller's (the network's) threads
        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            assert seen == [1, 1, 1]
    finally:
        torch.set_num_threads(before)


def test_extract_crops_normalises_a_batch_at_a_time_with_the_same_features(tmp_path):
    """Crops of two plates, 4 to a batch (several batches a plate, the last one short): the
    features are those of the whole plate's normalised crops in one dataset, in table order."""
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 4000, (22, 2, 24, 24)).astype(np.uint16)
    crops[5] = 0  # a blank crop: divided by 1
    table = pd.DataFrame({"Metadata_plate": ["P2"] * 9 + ["P1"] * 13,
                          "Metadata_crop": np.arange(22)})
    ex = TransferExtractor(TransferConfig(model="resnet18", weights="random", batch_size=4,
                                          backend="torch"))
    summary = ex.extract_crops(crops, table, ["a", "b"], tmp_path / "f")
    assert summary.cells == 22
    feats = read_features(tmp_path / "f").sort_values("Metadata_crop")
    cols = [c for c in feats.columns if not c.startswith("Metadata_")]
    from morphoprof.preprocess.crops import normalize_crops

    x = torch.from_numpy(normalize_crops(crops, "max"))
    want, keys = ex.features_for_dataset(torch.utils.data.TensorDataset(x, torch.arange(22)),
                                         ["a", "b"])
    np.testing.assert_array_equal(keys, np.arange(22))
    np.testing.assert_allclose(feats[cols].to_numpy(), want, rtol=1e-5, atol=1e-6)


def test_cell_features_and_crops_take_a_corrected_label_without_cutting_cells_again(
        tmp_path, tiny_screen, extractor):
    """A MoA corrected in the index, the cell table segmented again (segment rewrites its
    labels): extract --cells and crops keep their finished shards and take the new labels,
    as clean runs would write them; other cells (a moved centre) are still refused."""
    from morphoprof.preprocess.crops import CropConfig, export_crops, load_crop_shards
    from morphoprof.preprocess.segmentation import segment_index

    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    cellx = TransferExtractor(TransferConfig(batch_size=32), backbone=extractor.backbone)
    first = cellx.extract_cells(index, cells, tmp_path / "cf", size=32)
    export_crops(index, cells, tmp_path / "crops", CropConfig(size=16), shard_size=25)
    npz = sorted((tmp_path / "crops" / "shards").glob("*.npz"))
    stamps = [f.stat().st_mtime_ns for f in npz]
    table = index.table.copy()
    table["Metadata_moa"] = table["Metadata_moa"].where(table["Metadata_control"], "fixed")
    fixed = ExperimentIndex(table, index.root)
    segment_index(fixed, tmp_path / "cells.parquet")  # reused, its labels rewritten
    relabelled = pd.read_parquet(tmp_path / "cells.parquet")
    assert (relabelled["Metadata_moa"] != cells["Metadata_moa"]).any()
    again = cellx.extract_cells(fixed, relabelled, tmp_path / "cf", size=32)
    assert again.shards_written == 0 and again.shards_skipped == first.shards_written
    cellx.extract_cells(fixed, relabelled, tmp_path / "cf_clean", size=32)
    pd.testing.assert_frame_equal(read_features(tmp_path / "cf"),
                                  read_features(tmp_path / "cf_clean"))
    crops = export_crops(fixed, relabelled, tmp_path / "crops", CropConfig(size=16),
                         shard_size=25)
    assert crops.shards_written == 0
    assert [f.stat().st_mtime_ns for f in npz] == stamps  # no crop cut again
    export_crops(fixed, relabelled, tmp_path / "crops_clean", CropConfig(size=16),
                 shard_size=25)
    got, want = load_crop_shards(tmp_path / "crops"), load_crop_shards(tmp_path / "crops_clean")
    pd.testing.assert_frame_equal(got[1], want[1])
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    moved = relabelled.copy()
    moved.loc[0, "Nuclei_Location_Center_X"] += 3
    with pytest.raises(InputError, match="other parameters.*cells"):
        cellx.extract_cells(fixed, moved, tmp_path / "cf", size=32)
    with pytest.raises(InputError, match="other parameters.*cells"):
        export_crops(fixed, moved, tmp_path / "crops", CropConfig(size=16), shard_size=25)
