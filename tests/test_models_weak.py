"""Weak supervision (Caicedo 2018): sampling, mixup, GRU sequences, training, resume, embeddings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from morphoprof.errors import InputError
from morphoprof.io_utils import read_parquet
from morphoprof.models.weak_data import CellGroups, SequenceBatchSampler, WeakTrainSet
from morphoprof.preprocess.crops import CropDataset

S = 32


def toy_cells(n_per_well: int = 6, seed: int = 0):
    """3 labels x 3 plates (batches) x 2 wells; label k puts a bright square in channel k."""
    rng = np.random.default_rng(seed)
    rows, crops = [], []
    for lab in range(3):
        for plate in range(3):
            for well in range(2):
                for _ in range(n_per_well):
                    x = rng.uniform(0, 0.3, (3, S, S)).astype(np.float32)
                    y0, x0 = rng.integers(4, S - 14, 2)
                    x[lab, y0:y0 + 10, x0:x0 + 10] += 1.0
                    crops.append(x)
                    rows.append({"label": lab, "plate": f"P{plate}",
                                 "well": f"{'ABC'[lab]}0{well + 1}"})
    table = pd.DataFrame(rows)
    return np.stack(crops), table


def groups_of(table: pd.DataFrame) -> CellGroups:
    return CellGroups(table["label"].to_numpy(), pd.factorize(table["plate"])[0],
                      pd.factorize(table["plate"] + table["well"])[0], 3)


def test_sequences_mix_batches_and_wells_and_balance_labels():
    crops, table = toy_cells()
    # make label 0 rare: balance must come from drawing the label first
    keep = ~((table["label"] == 0) & (table.index % 6 != 0))
    crops, table = crops[keep.to_numpy()], table[keep].reset_index(drop=True)
    g = groups_of(table)
    rng = np.random.default_rng(1)
    seen = []
    for length in (3, 5, 8):
        for _ in range(200):
            lab, cells = g.draw_sequence(rng, length)
            seen.append(lab)
            assert (g.labels[cells] == lab).all()
            batches = g.batches[cells]
            # 3 batches: the first 3 cells come from 3 different batches, and every batch is
            # used as evenly as possible
            assert len(set(batches[:3].tolist())) == 3
            assert np.bincount(batches, minlength=3).max() - \
                np.bincount(batches, minlength=3).min() <= 1
            wells = g.wells[cells]
            # 6 wells per label: sequences up to 6 long never repeat a well
            assert len(set(wells[:6].tolist())) == min(length, 6)
    counts = np.bincount(seen, minlength=3) / len(seen)
    assert np.allclose(counts, 1 / 3, atol=0.05), counts


def test_sequence_order_is_random():
    _, table = toy_cells()
    g = groups_of(table)
    rng = np.random.default_rng(2)
    firsts = {int(g.batches[g.draw_sequence(rng, 3, label=1)[1][0]]) for _ in range(60)}
    assert firsts == {0, 1, 2}


def test_mixup_targets_sum_to_one_and_follow_lambda():
    crops, table = toy_cells()
    ds = WeakTrainSet(crops, groups_of(table), mixup_alpha=0.4, augment=False)
    lams = []
    for seed in range(40):
        it = ds.item(seed, 5)
        y = it["y"].numpy()
        assert np.allclose(y.sum(1), 1.0, atol=1e-6)
        assert np.allclose(it["y_seq"].numpy().sum(), 1.0, atol=1e-6)
        for k, (c, p, lam) in enumerate(zip(it["cells"], it["partners"], it["lam"],
                                            strict=True)):
            want = np.zeros(3)
            want[table["label"][c]] += lam
            want[table["label"][p]] += 1 - lam
            assert np.allclose(y[k], want, atol=1e-6)
            # the partner comes from another batch (there are 3)
            assert table["plate"][c] != table["plate"][p]
            assert torch.allclose(it["x"][k], lam * torch.from_numpy(crops[c]) +
                                  (1 - lam) * torch.from_numpy(crops[p]), atol=1e-6)
        lams.extend(it["lam"])
    lams = np.asarray(lams)
    assert 0 < lams.min() and lams.max() < 1 and 0.4 < lams.mean() < 0.6  # Beta(a, a)
    plain = WeakTrainSet(crops, groups_of(table), mixup_alpha=0.0, augment=False).item(3, 5)
    assert set(np.unique(plain["y"].numpy())) <= {0.0, 1.0} and len(plain["partners"]) == 0


def test_items_and_batches_are_pure_functions_of_their_keys():
    crops, table = toy_cells()
    ds = WeakTrainSet(crops, groups_of(table), mixup_alpha=0.2, shift=3)
    a, b = ds[(123, 5)], ds[(123, 5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(ds[(124, 5)][0], a[0])
    s = SequenceBatchSampler(10, 16, (3, 5, 8), seed=4)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(3)
    assert list(s) != first
    s.set_epoch(2)
    assert list(s) == first
    for batch in first:
        length = batch[0][1]
        assert length in (3, 5, 8) and len(batch) == 16 // length


def test_a_training_set_read_from_disk_gives_the_items_of_one_held_in_memory(tmp_path):
    """Crops memory-mapped from a file (as ``train weak`` reads them) are not loaded, and
    give the very items (augmentation and mixup included) the in-memory crops give."""
    from morphoprof.io_utils import NpyRows, write_npy_chunks

    crops, table = toy_cells()
    write_npy_chunks(tmp_path / "c.npy", crops.shape, np.float32, [crops])
    on_disk = WeakTrainSet(NpyRows(tmp_path / "c.npy"), groups_of(table), mixup_alpha=0.2,
                           shift=3)
    held = WeakTrainSet(crops, groups_of(table), mixup_alpha=0.2, shift=3)
    assert isinstance(on_disk.crops, NpyRows) and isinstance(held.crops, torch.Tensor)
    for key in [(3, 5), (11, 1), (123, 8)]:
        assert all(torch.equal(u, v) for u, v in zip(on_disk[key], held[key], strict=True))


def test_prepared_crops_are_written_in_pieces_identical_to_a_whole_preparation(tmp_path):
    """``train weak`` prepares its crops a chunk at a time into a file: the same values as
    preparing them all in memory, a peak of Python-side memory far below the whole, and an
    interrupted run's file reused only where it was made with the same settings."""
    import subprocess
    import sys

    from morphoprof.models.weak_run import prepare_crops, prepare_crops_file

    raw, _ = toy_cells(n_per_well=40)  # 720 crops of 3 x 32 x 32
    raw *= 1000
    asked = []

    def read(ks):
        asked.append(len(ks))
        return raw[ks]

    path = tmp_path / "weak" / "crops.npy"
    resized = prepare_crops_file(read, len(raw), 24, "max", path, {"v": 1}, chunk=50)
    np.testing.assert_array_equal(np.asarray(resized), prepare_crops(raw, 24, "max"))
    assert max(asked) == 50 and resized.shape == (720, 3, 24, 24)
    stamp, asked[:] = path.stat().st_mtime_ns, []
    assert prepare_crops_file(read, len(raw), 24, "max", path, {"v": 1}).shape == resized.shape
    assert asked == [] and path.stat().st_mtime_ns == stamp  # reused: nothing read
    whole = prepare_crops_file(read, len(raw), None, "max", path, {"v": 2}, chunk=20)
    assert whole.shape == raw.shape and path.stat().st_mtime_ns != stamp  # made again
    np.testing.assert_array_equal(whole[[0, 719]], prepare_crops(raw[[0, 719]], None, "max"))
    # the peak of Python-side memory while preparing, in a process of its own: in this one,
    # threads left by earlier tests allocate inside the window too
    np.save(tmp_path / "raw.npy", raw)
    measure = f"""
import tracemalloc, numpy as np
from morphoprof.models.weak_run import prepare_crops_file
raw = np.load({str(tmp_path / "raw.npy")!r})
prepare_crops_file(lambda ks: raw[ks], 1, None, "max", {str(tmp_path / "warm.npy")!r}, {{}})
tracemalloc.start()
prepare_crops_file(lambda ks: raw[ks], len(raw), None, "max", {str(tmp_path / "m.npy")!r},
                   {{}}, chunk=20)
print(tracemalloc.get_traced_memory()[1])
"""
    done = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True,
                          check=True)
    peak = int(done.stdout.split()[-1])
    assert peak < raw.nbytes / 4, (peak, raw.nbytes)
    with pytest.raises(InputError, match="no cells to train on"):
        prepare_crops_file(read, 0, None, "max", tmp_path / "none.npy", {})


def test_bad_groups_are_refused():
    with pytest.raises(InputError, match="label code"):
        CellGroups(np.array([0, 0]), np.array([0, 1]), np.array([0, 1]), 2)
    with pytest.raises(InputError, match="lengths"):
        SequenceBatchSampler(2, 8, (0,))


def tiny_module(gru: bool = True, seed: int = 0):
    from morphoprof.models.weak import WeakModule

    return WeakModule("resnet18", "random", 3, ["a", "b", "c"], gru=gru, gru_hidden=32,
                      lr=1e-3, crop_size=S, channels=["c0", "c1", "c2"], seed=seed)


@pytest.mark.filterwarnings("ignore:You are trying to .self.log:UserWarning")  # no Trainer here
def test_training_steps_reduce_the_loss():
    crops, table = toy_cells()
    torch.manual_seed(0)
    module = tiny_module()
    ds = WeakTrainSet(crops, groups_of(table), mixup_alpha=0.2, augment=True,
                      mean=module.input_mean, std=module.input_std)
    batch = [torch.stack(v) for v in zip(*[ds[(s, 3)] for s in range(8)], strict=True)]
    assert batch[0].shape == (8, 3, 3, S, S)
    opt = module.configure_optimizers()
    losses = []
    module.train()
    for _ in range(12):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses
    assert module.gru.weight_ih_l0.grad is not None  # the GRU is trained with the CNN


def weak_yaml(npz, csv, **over) -> str:
    weak = {"mixup_alpha": 0.2, "gru": True, "gru_hidden": 32, "lengths": [3, 5]}
    weak.update(over.pop("weak", {}))
    train = {"epochs": 2, "batch_size": 15, "lr": 0.002, "seed": 1, "patience": 0,
             "accelerator": "cpu"}
    train.update(over.pop("train", {}))
    import yaml

    return yaml.safe_dump({
        "data": {"source": "crops", "path": str(npz), "table": str(csv)},
        "channels": ["c0", "c1", "c2"], "label": ["Metadata_label"],
        "holdout": {"column": "Metadata_plate", "values": ["P2"], "val_fraction": 0.0},
        "model": {"name": "resnet18", "weights": "random"},
        "weak": weak, "train": train, "features": {"batch_size": 32}, **over})


@pytest.fixture(scope="module")
def crop_files(tmp_path_factory):
    crops, table = toy_cells(n_per_well=5)
    folder = tmp_path_factory.mktemp("crops")
    raw = np.moveaxis((crops * 1000).astype(np.uint16), 1, -1)  # (N, S, S, C) like BBBC021
    np.savez(folder / "crops.npz", crops=raw)
    table.assign(crop=np.arange(len(table)), compound=table["label"].map(
        {0: "DMSO", 1: "x", 2: "y"})).to_csv(folder / "index.csv", index=False)
    return folder / "crops.npz", folder / "index.csv"


def test_resume_continues_from_the_saved_epoch_identically(crop_files, tmp_path):
    from morphoprof.train import train_weak_from_yaml

    npz, csv = crop_files
    full = train_weak_from_yaml(weak_yaml(npz, csv), tmp_path / "full")
    train_weak_from_yaml(weak_yaml(npz, csv, train={"epochs": 1}), tmp_path / "half")
    resumed = train_weak_from_yaml(weak_yaml(npz, csv), tmp_path / "half", fresh=False)
    a = torch.load(full.checkpoint, map_location="cpu", weights_only=False)
    b = torch.load(resumed.checkpoint, map_location="cpu", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    m = pd.read_csv(tmp_path / "half" / "weak" / "metrics.csv")
    assert sorted(m["epoch"].dropna().unique()) == [0, 1]
    from morphoprof.shards import read_features

    fa = read_features(tmp_path / "full" / "features")
    fb = read_features(tmp_path / "half" / "features")
    pd.testing.assert_frame_equal(fa, fb)


def test_weak_run_learns_and_writes_embeddings(crop_files, tmp_path):
    from morphoprof.shards import feature_columns, read_features
    from morphoprof.train import train_weak_from_yaml

    npz, csv = crop_files
    s = train_weak_from_yaml(weak_yaml(npz, csv, train={"epochs": 4}), tmp_path / "run")
    assert s.cells == {"train": 60, "val": 0, "test": 30}
    assert s.heldout_cell_accuracy >= 0.8, s  # chance is 1/3
    assert s.layer == "layer3" and s.train_cells_per_s > 0
    assert not list((tmp_path / "run" / "weak").glob("crops.npy*"))  # removed when finished
    assert s.heldout.n == 30 and s.wall_seconds > s.train_seconds
    written = json.loads((tmp_path / "run" / "weak" / "weak.json").read_text())
    assert written == {k: v for k, v in s.to_json().items() if k != "wall_seconds"}
    assert written["heldout_cell_accuracy"] == s.heldout_cell_accuracy
    feats = read_features(tmp_path / "run" / "features")
    assert len(feats) == 90 and set(feats["Metadata_split"]) == {"train", "test"}
    cols = feature_columns(feats)
    assert len(cols) == 256  # resnet18 layer3 channels
    # the embedding separates the labels: nearest neighbours share them
    x = feats[cols].to_numpy()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    lab = feats["Metadata_label"].to_numpy()
    assert np.mean(lab[d.argmin(1)] == lab) > 0.8


def test_extract_with_checkpoint_matches_the_training_run(tiny_screen, tmp_path, capsys):
    """Train on a screen's segmented cells, then `morphoprof extract --cells --checkpoint` on
    the same cells gives the embeddings the training run wrote."""
    import yaml

    from morphoprof.cli import main
    from morphoprof.shards import feature_columns, read_features

    folder, index = tiny_screen
    index.write(tmp_path / "index.parquet")
    cfg = {"data": {"source": "index", "path": str(tmp_path / "index.parquet")},
           "cells": {"crop_size": 32, "segmentation": {"min_distance": 3}},
           "holdout": {"val_fraction": 0.0},
           "weak": {"gru_hidden": 16, "lengths": [3]},
           "train": {"epochs": 1, "batch_size": 12, "accelerator": "cpu"},
           "output": str(tmp_path / "weak")}
    (tmp_path / "weak.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "weak", str(tmp_path / "weak.yaml"), "--quiet"]) == 0
    assert "embeddings (layer3)" in capsys.readouterr().out
    ckpt = tmp_path / "weak" / "weak" / "checkpoints" / "last.ckpt"
    assert main(["extract", str(tmp_path / "index.parquet"), "--out", str(tmp_path / "again"),
                 "--cells", str(tmp_path / "weak" / "cells.parquet"), "--checkpoint",
                 str(ckpt)]) == 0
    key = ["Metadata_plate", "Metadata_well", "Metadata_site", "Nuclei_Location_Center_X",
           "Nuclei_Location_Center_Y"]
    a = read_features(tmp_path / "weak" / "features").sort_values(key).reset_index(drop=True)
    b = read_features(tmp_path / "again").sort_values(key).reset_index(drop=True)
    cols = feature_columns(a)
    assert len(a) == len(b) > 20 and cols == feature_columns(b)
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-4, atol=1e-5)
    # `morphoprof run` with the checkpoint: the same cells segmented, the same embeddings,
    # profiles and an evaluation made of them (a relative checkpoint path is the config's)
    run = {"data": cfg["data"], "output": "run",
           "preprocess": {"segmentation": {"enabled": True, "min_distance": 3}},
           "features": {"checkpoint": "weak/weak/checkpoints/last.ckpt"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    c = read_features(tmp_path / "run" / "features").sort_values(key).reset_index(drop=True)
    assert feature_columns(c) == cols and len(c) == len(a)
    np.testing.assert_allclose(a[cols].to_numpy(), c[cols].to_numpy(), rtol=1e-4, atol=1e-5)
    assert "NSC:" in capsys.readouterr().out
    assert (tmp_path / "run" / "report.html").is_file()
    del run["preprocess"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["run", str(tmp_path / "run.yaml")]) == 2
    assert "features.checkpoint: embeds the segmented cells" in capsys.readouterr().err


def test_the_screens_cells_follow_the_segmentation_settings(tiny_screen, tmp_path):
    """A weak run on a screen segments its cells again when ``cells.segmentation`` changes
    (an existing cells.parquet was used whatever settings had made it), and reuses them when
    it does not."""
    import yaml

    from morphoprof.config import load_weak_config
    from morphoprof.models.weak_run import crops_from_screen

    _, index = tiny_screen
    index.write(tmp_path / "index.parquet")

    def cells(**segmentation):
        cfg = {"data": {"source": "index", "path": str(tmp_path / "index.parquet")},
               "cells": {"crop_size": 32, "segmentation": segmentation},
               "output": str(tmp_path / "weak")}
        (tmp_path / "weak.yaml").write_text(yaml.safe_dump(cfg))
        return crops_from_screen(load_weak_config(tmp_path / "weak.yaml")[0], tmp_path / "weak")

    few = cells(min_distance=3, min_area=150)[1]
    screen, many, names = cells(min_distance=3)
    crops = screen.crops(np.arange(len(screen)))  # cut as asked, not held
    assert len(many) > len(few) > 0
    # the crops are each cell's own, as the dataset cuts them one at a time
    ds = CropDataset(index, read_parquet(tmp_path / "weak" / "cells.parquet"), 32, names,
                     normalization="none")
    assert crops.shape == (len(many), len(names), 32, 32) and crops.dtype == np.float32
    for k in (0, len(many) // 2, len(many) - 1):
        np.testing.assert_array_equal(crops[k], ds[k][0].numpy())
    assert (crops.reshape(len(crops), -1).max(1) > 0).all()
    stamp = (tmp_path / "weak" / "cells.parquet").stat().st_mtime_ns
    assert len(cells(min_distance=3)[1]) == len(many)
    assert (tmp_path / "weak" / "cells.parquet").stat().st_mtime_ns == stamp  # reused


def test_other_cells_under_the_same_settings_are_refused(crop_files, tmp_path):
    """A weak training folder continues only on the cells it began with: three crops fewer
    (the same config) would have resumed the checkpoint on another training set."""
    import shutil

    from morphoprof.train import train_weak_from_yaml

    npz, csv = crop_files
    shutil.copy(npz, tmp_path / "crops.npz")
    table = pd.read_csv(csv)
    table.to_csv(tmp_path / "index.csv", index=False)
    text = weak_yaml(tmp_path / "crops.npz", tmp_path / "index.csv", train={"epochs": 1})
    train_weak_from_yaml(text, tmp_path / "run")
    table.iloc[:-3].to_csv(tmp_path / "index.csv", index=False)
    with pytest.raises(InputError, match=r"holds a training with other settings \(cells: '"):
        train_weak_from_yaml(text, tmp_path / "run", fresh=False)


def test_bad_weak_inputs(crop_files, tmp_path):
    from morphoprof.cli import main
    from morphoprof.config import load_weak_config
    from morphoprof.errors import ConfigError
    from morphoprof.models.weak import checkpoint_hparams
    from morphoprof.models.weak_run import load_crop_array

    npz, csv = crop_files
    bad = tmp_path / "bad.yaml"
    bad.write_text(weak_yaml(npz, csv, weak={"mixup_alpah": 1.0, "lengths": [0]}))
    with pytest.raises(ConfigError) as err:
        load_weak_config(bad)
    assert "did you mean 'mixup_alpha'" in str(err.value) and "weak.lengths" in str(err.value)
    table = pd.read_csv(csv)
    table.loc[7, "crop"] = 10_000
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match="row 7: crop 10000 is outside"):
        load_crop_array(npz, tmp_path / "t.csv", ["c0", "c1", "c2"], ["DMSO"])
    with pytest.raises(InputError, match="do not have 2 channels"):
        load_crop_array(npz, csv, ["c0", "c1"], ["DMSO"])
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(InputError, match="not a morphoprof weak-supervision checkpoint"):
        checkpoint_hparams(tmp_path / "plain.ckpt")
    assert main(["extract", "nowhere.parquet", "--out", str(tmp_path / "x"), "--checkpoint",
                 str(tmp_path / "missing.ckpt")]) == 2
    # a table without the label column, or with a row without a label: file and row named
    from morphoprof.train import train_weak_from_yaml

    pd.read_csv(csv).drop(columns="label").to_csv(tmp_path / "nolabel.csv", index=False)
    with pytest.raises(InputError, match=r"nolabel.csv: no label column label"):
        train_weak_from_yaml(weak_yaml(npz, tmp_path / "nolabel.csv"), tmp_path / "r1")
    t = pd.read_csv(csv).astype({"label": float})
    t.loc[11, "label"] = np.nan
    t.to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(InputError, match=r"gap.csv row 11: no value in label column label"):
        train_weak_from_yaml(weak_yaml(npz, tmp_path / "gap.csv"), tmp_path / "r2")


def test_two_process_ddp_run_on_cpu(crop_files, tmp_path):
    """Lightning DDP with the gloo backend: two CPU processes, each taking half the batches."""
    import os
    import subprocess
    import sys

    npz, csv = crop_files
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(weak_yaml(npz, csv, train={"epochs": 1, "devices": 2, "strategy": "ddp"},
                             output=str(tmp_path / "out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "morphoprof", "train", "weak", str(cfg),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "weak" / "weak.json").read_text())
    assert s["world_size"] == 2
    # 60 training cells in batches of 15: 4 batches, 2 per process
    assert s["train_batches_per_epoch"] == 4 and s["train_batches_per_epoch_per_process"] == 2
    assert (tmp_path / "out" / "weak" / "checkpoints" / "last.ckpt").is_file()
    assert "weak: 3 labels, 1 epochs" in proc.stdout
