"""Lightning training: loss goes down, per-epoch metrics and checkpoints, resume gives the same
weights as an uninterrupted run; fine-tuning a pretrained timm network learns a toy task."""

from __future__ import annotations

import resource
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from morphoprof.errors import InputError, OutputError
from morphoprof.models.data import ImageTensorDataset
from morphoprof.models.finetune import FineTuneConfig, finetune_module
from morphoprof.models.mil import MILConfig, MILNet
from morphoprof.models.settings import TrainSection
from morphoprof.models.training import (
    AtomicCheckpointIO,
    ImageClassifier,
    fit,
    predict_proba,
    recalibrate_batch_norm,
)
from tests.test_models_mil import adam_steps, toy_batch

PLAN = ((8, 1), (16, 2), (16, 1))


def toy_data(n: int = 64, seed: int = 0):
    x, y, _ = toy_batch(n, np.random.default_rng(seed))
    return x.numpy(), y.numpy()


def mil_module(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(MILNet(MILConfig(n_classes=2, in_chans=2, trunk="plan", plan=PLAN,
                                            hidden=16, dropout=0.0, pooling="noisy_and")),
                           lr=3e-3)


def state(module: ImageClassifier) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fit_writes_metrics_checkpoints_and_resumes_identically(tmp_path):
    x, y = toy_data()
    cfg = TrainSection(epochs=3, batch_size=16, seed=3)
    full = mil_module()
    info = fit(full, ImageTensorDataset(x, y, augment=True), tmp_path / "full", cfg)
    assert info["epochs_run"] == 3 and info["resumed_from"] is None
    metrics = pd.read_csv(info["metrics_csv"])
    losses = metrics.dropna(subset=["train_loss"])["train_loss"].to_numpy()
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "full" / "checkpoints" / "last.ckpt").is_file()

    # Interrupted after 1 epoch, then the same command with 3 epochs resumes from epoch 1.
    part = mil_module()
    fit(part, ImageTensorDataset(x, y, augment=True), tmp_path / "part",
        TrainSection(epochs=1, batch_size=16, seed=3))
    resumed = mil_module()
    info2 = fit(resumed, ImageTensorDataset(x, y, augment=True), tmp_path / "part", cfg)
    assert info2["resumed_from"].endswith("last.ckpt") and info2["epochs_run"] == 3
    resumed_metrics = pd.read_csv(info2["metrics_csv"]).dropna(subset=["train_loss"])
    assert list(resumed_metrics["epoch"]) == [0, 1, 2]  # earlier epochs kept on resume
    np.testing.assert_allclose(resumed_metrics["train_loss"], losses, rtol=1e-6)
    a, b = state(full), state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


class RisingLoss(ImageClassifier):
    """The MIL toy module with one more unit of loss every epoch: the monitored training loss
    is lowest in epoch 0 and never improves after it."""

    def loss(self, out, y):
        return super().loss(out, y) + float(self.current_epoch)


def test_last_checkpoint_is_the_final_epoch_even_when_the_loss_rose(tmp_path):
    """last.ckpt holds the final epoch's weights (what fit() leaves in the module and what a
    resume continues from), best.ckpt the epoch of the lowest loss; Lightning's own save_last
    wrote last.ckpt only in improving epochs, so here it would have stayed at epoch 0."""
    x, y = toy_data()
    torch.manual_seed(0)
    module = RisingLoss(mil_module().net, lr=3e-3)
    info = fit(module, ImageTensorDataset(x, y), tmp_path, TrainSection(epochs=3, batch_size=16,
                                                                        seed=3))
    losses = pd.read_csv(info["metrics_csv"]).dropna(subset=["train_loss"])["train_loss"]
    assert losses.is_monotonic_increasing
    last = torch.load(info["last_checkpoint"], map_location="cpu", weights_only=False)
    best = torch.load(info["best_checkpoint"], map_location="cpu", weights_only=False)
    assert (last["epoch"], best["epoch"]) == (2, 0)
    final = state(module)
    for k, v in last["state_dict"].items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0, msg=k)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt",
                                                                           "last.ckpt"]
    # Extended to 4 epochs, the run resumes from epoch 2's end and trains only epoch 3.
    again = fit(RisingLoss(mil_module().net, lr=3e-3), ImageTensorDataset(x, y), tmp_path,
                TrainSection(epochs=4, batch_size=16, seed=3))
    assert again["resumed_from"] == info["last_checkpoint"]
    epochs = pd.read_csv(again["metrics_csv"]).dropna(subset=["train_loss"])["epoch"]
    assert list(epochs) == [0, 1, 2, 3]


def test_channels_last_trains_the_same_network(tmp_path):
    """``train.channels_last`` only changes the memory layout: the convolutions' weights are
    stored channels-last and the run ends where the NCHW run does (up to float rounding)."""
    x, y = toy_data()
    runs = {}
    for cl in (False, True):
        module = mil_module()
        info = fit(module, ImageTensorDataset(x, y, augment=True), tmp_path / str(cl),
                   TrainSection(epochs=2, batch_size=16, seed=3, channels_last=cl))
        runs[cl] = (module, pd.read_csv(info["metrics_csv"]).dropna(subset=["train_loss"]))
    conv = next(m for m in runs[True][0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # really another layout, not a no-op
    np.testing.assert_allclose(runs[True][1]["train_loss"], runs[False][1]["train_loss"],
                               rtol=1e-4)
    a, b = state(runs[False][0]), state(runs[True][0])
    for k in a:
        torch.testing.assert_close(b[k].contiguous(), a[k], rtol=1e-3, atol=1e-5, msg=k)
    # and it predicts as a module that never left NCHW
    np.testing.assert_allclose(predict_proba(runs[True][0], ImageTensorDataset(x, y)),
                               predict_proba(runs[False][0], ImageTensorDataset(x, y)),
                               atol=1e-4)


def test_early_stopping_on_validation_loss(tmp_path):
    x, y = toy_data(48)
    xv, yv = toy_data(16, seed=1)
    module = mil_module()
    module.lr = 0.0  # nothing improves: stops after `patience` epochs without improvement
    info = fit(module, ImageTensorDataset(x, y), tmp_path, TrainSection(
        epochs=20, batch_size=16, patience=2), ImageTensorDataset(xv, yv))
    assert info["epochs_run"] < 20
    metrics = pd.read_csv(info["metrics_csv"])
    assert "val_loss" in metrics.columns and metrics["val_loss"].notna().sum() >= 3
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_finetuning_pretrained_network_reduces_the_loss():
    x, y = toy_data(32)
    x3 = np.concatenate([x, x[:, :1] * 0], axis=1)  # 3 channels for ImageNet weights
    module, mean, std = finetune_module(FineTuneConfig(lr=1e-3), n_classes=2, in_chans=3)
    assert len(mean) == 3
    data = ImageTensorDataset(x3, y, mean=mean, std=std)
    xb, yb = next(iter(torch.utils.data.DataLoader(data, batch_size=32)))
    losses = adam_steps(module, xb, yb, 8)
    assert losses[-1] < 0.5 * losses[0], losses
    p = predict_proba(module, data)
    assert p.shape == (32, 2) and np.allclose(p.sum(1), 1.0)


def test_recalibrated_batch_norm_holds_the_statistics_of_the_data_given():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 3, 1),
                              torch.nn.BatchNorm2d(3))
    frozen = net[5]
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.running_mean.fill_(7.0)
    net[1].running_mean.fill_(-3.0)  # as if left over from a pretrained network
    x = torch.randn(12, 2, 8, 8) * 3 + 1
    data = torch.utils.data.TensorDataset(x, torch.zeros(12))
    net.train()
    assert recalibrate_batch_norm(net, data, batch_size=4) == 1
    assert net.training and net[1].momentum == 0.1  # the module's state is given back
    with torch.no_grad():
        h = net[0](x)
    # the plain average of the three batches' means and (unbiased) variances
    assert torch.allclose(net[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    batch_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in h.split(4)])
    assert torch.allclose(net[1].running_var, batch_var.mean(0), atol=1e-4)
    assert torch.equal(frozen.running_mean, torch.full((3,), 7.0))  # frozen: left alone
    empty = torch.utils.data.TensorDataset(x[:0], torch.zeros(0))
    assert recalibrate_batch_norm(net, empty) == 0


def test_dataset_augmentation_keeps_labels_and_content():
    x, y = toy_data(4)
    ds = ImageTensorDataset(x, y, augment=True, crop=24)
    torch.manual_seed(0)
    for k in range(4):
        img, label = ds[k]
        assert img.shape == (2, 24, 24) and int(label) == int(y[k])
        assert float(img.sum()) <= float(x[k].sum()) + 1e-6  # a window of the same image
    full = ImageTensorDataset(x, y, augment=True)
    img, _ = full[0]
    assert float(img.sum()) == float(x[0].sum())  # flips/rotations move, never change pixels


def test_a_checkpoint_that_cannot_be_written_is_absent_and_named(tmp_path):
    """A write the OS refuses part-way (a file size limit here; a full disk the same): an
    OutputError naming the checkpoint, and no file under its name or a temporary one.
    Lightning's own writer left a truncated best.ckpt on a full disk."""
    path = tmp_path / "checkpoints" / "best.ckpt"
    ckpt = {"state_dict": {"w": torch.arange(200_000, dtype=torch.float32)}}  # ~800 kB
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OutputError, match=f"cannot write {path}: File too large"):
            AtomicCheckpointIO().save_checkpoint(ckpt, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert list(tmp_path.iterdir()) == []  # nor the folder made for it
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"],
                       ckpt["state_dict"]["w"])


def test_a_training_folder_is_resumed_only_by_the_settings_that_began_it(tmp_path):
    from morphoprof.models.training import check_training_folder

    folder = tmp_path / "finetune"
    settings = {"output": "a", "model": {"name": "resnet18"},
                "train": {"epochs": 2, "num_workers": 0, "lr": 0.001}}
    check_training_folder(folder, {**settings, "model": {"name": "typo"}})
    check_training_folder(folder, settings)  # nothing trained under the first: a new start
    (folder / "fold0").mkdir()
    # the same settings, or other run-time ones (workers, output path): resumed
    check_training_folder(folder, {**settings, "output": "b",
                                   "train": {**settings["train"], "num_workers": 4}})
    other = {**settings, "model": {"name": "tf_efficientnet_lite0"},
             "train": {**settings["train"], "lr": 0.01}}
    with pytest.raises(InputError, match=r"holds a training with other settings \("
                                         r"model.name: 'resnet18' -> 'tf_efficientnet_lite0', "
                                         r"train.lr: 0.001 -> 0.01\); train into another"):
        check_training_folder(folder, other)
    assert (folder / "fold0").is_dir()  # refused: nothing deleted
    check_training_folder(folder, other, ignore=("model", "train.lr"))  # those do not count
    (folder / "trunk_maps").mkdir()  # a cache keyed by its own inputs
    with pytest.raises(InputError):
        check_training_folder(folder, settings, keep=("trunk_maps",))
    check_training_folder(folder, settings, overwrite=True, keep=("trunk_maps",))
    assert sorted(p.name for p in folder.iterdir()) == ["settings.json", "trunk_maps"]
    check_training_folder(folder, other, keep=("trunk_maps",))  # the cache alone: no training
    check_training_folder(folder, settings, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["settings.json"]
    check_training_folder(folder, other)
    # a folder with files but no record of its settings cannot be told apart
    (tmp_path / "old" / "fold0").mkdir(parents=True)
    with pytest.raises(InputError, match="without a record of its settings"):
        check_training_folder(tmp_path / "old", settings)
