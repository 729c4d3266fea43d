"""Training on PyTorch Lightning: one module for image classifiers (fine-tuned timm networks and
MIL networks), one :func:`fit` that checkpoints every epoch, resumes, stops early and is seeded.
CPU or GPU (mixed precision), one or several devices / nodes through Lightning's strategies."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from morphoprof.errors import InputError
from morphoprof.extras import require
from morphoprof.io_utils import RowBuffer, atomic_path, write_json
from morphoprof.logs import progress_enabled
from morphoprof.models.data import EpochSampler
from morphoprof.models.mil import mil_loss
from morphoprof.models.settings import TrainSection
from morphoprof.shards import describe_changes

logger = logging.getLogger(__name__)

L = require("lightning")


# settings that decide how fast a training runs, not what it learns: a training folder may be
# resumed with other values of these
RUN_TIME_SETTINGS = ("output", "train.num_workers", "train.accelerator", "train.devices",
                     "train.num_nodes", "train.strategy", "train.channels_last")
SETTINGS_FILE = "settings.json"


def check_training_folder(folder: str | Path, settings: dict, overwrite: bool = False,
                          ignore: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> None:
    """Make sure the training in ``folder`` is resumed only by the settings that began it.

    ``settings`` (a config's ``model_dump``, nested) is flattened to dotted keys, without
    :data:`RUN_TIME_SETTINGS` and ``ignore``, and kept in ``folder/settings.json``. A folder
    whose file holds other settings would mix two trainings (finished folds reported under
    the new settings, a checkpoint of another network resumed): where it holds anything
    besides that file, it raises InputError naming the differences, or with ``overwrite`` is
    emptied first; so is a folder with files but without the record (its settings cannot be
    told). ``keep``: entries of the folder that check themselves (a cache keyed by its
    inputs): not a training, and kept when the folder is emptied."""
    folder = Path(folder)
    skip = (*RUN_TIME_SETTINGS, *ignore)

    def counted(d: dict) -> dict:
        return {k: v for k, v in d.items() if not any(k == s or k.startswith(f"{s}.")
                                                      for s in skip)}

    now = counted(_dotted(json.loads(json.dumps(settings, default=str))))
    record = folder / SETTINGS_FILE
    problem = None
    # a folder holding nothing but the record (the last run stopped at bad input, say) is new
    entries = [p for p in folder.iterdir() if p.name not in keep] if folder.is_dir() else []
    work = any(p.name != SETTINGS_FILE for p in entries)
    if work and record.is_file():
        try:
            saved = counted(json.loads(record.read_text()))
        except (OSError, ValueError, AttributeError) as exc:
            raise InputError(f"cannot read {record}: {exc}") from exc
        if saved != now:
            problem = f"holds a training with other settings ({describe_changes(saved, now)})"
    elif work:
        problem = f"holds a training without a record of its settings ({SETTINGS_FILE})"
    if problem and not overwrite:
        raise InputError(f"{folder} {problem}; train into another output folder, or add "
                         "--overwrite to delete it and start over")
    if problem:
        logger.info("%s %s: deleted (--overwrite)", folder, problem)
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record, now)


def _dotted(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _dotted(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


class ImageClassifier(L.LightningModule):
    """A network returning ``{"logits": (B, K), ...}`` (MIL networks add ``pooled``), trained
    with Adam on cross-entropy (single-label, targets ``(B,)``) or sigmoid cross-entropy
    (multi-label, targets ``(B, K)``); networks with ``pooled`` get the joint MIL loss."""

    def __init__(self, net: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0,
                 multilabel: bool = False, mil_weight: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.lr, self.weight_decay = lr, weight_decay
        self.multilabel, self.mil_weight = multilabel, mil_weight

    channels_last = False  # set by :func:`fit` from ``train.channels_last``

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        return out if isinstance(out, dict) else {"logits": out}

    def loss(self, out: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        if "pooled" in out:
            return mil_loss(out, y, self.multilabel, self.mil_weight)
        if self.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(out["logits"], y.float())
        return nn.functional.cross_entropy(out["logits"], y)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=len(x), sync_dist=stage == "val")
        if not self.multilabel:
            acc = (out["logits"].argmax(1) == y).float().mean()
            self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True,
                     batch_size=len(x), sync_dist=stage == "val")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class EpochSeed(L.Callback):
    """Re-seed torch's global generator at the start of every epoch from (seed, epoch), so
    dropout and any other global randomness are the same whether or not the run was resumed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.manual_seed(int(np.random.default_rng([self.seed, trainer.current_epoch, 7])
                              .integers(0, 2**62)))


class AtomicCheckpointIO(L.pytorch.plugins.io.TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each checkpoint beside its name and renaming it
    into place (:func:`~morphoprof.io_utils.atomic_path`). Lightning's own writes to the
    system's temporary folder and copies across; on a full disk that copy left a truncated
    ``best.ckpt`` and an error naming the temporary file. Here a checkpoint is whole or absent
    and a failed write is an OutputError naming it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by AtomicCheckpointIO")
        write_torch(path, checkpoint)


def write_torch(path: str | Path, obj) -> None:
    """``torch.save`` ``obj`` to ``path`` whole or not at all (:func:`atomic_path`); a failed
    write is an OutputError naming ``path``."""
    buffer = io.BytesIO()  # serialised first (as Lightning does): torch's zip writer
    torch.save(obj, buffer)  # reports a full disk as a bare RuntimeError
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*treespec.*")
    warnings.filterwarnings("ignore", ".*but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*exists and is not empty.*")


def _keep_earlier_epochs(metrics_csv: Path, earlier: pd.DataFrame) -> None:
    """Lightning's CSV logger starts a fresh file on resume: put the earlier epochs' rows
    (those before the first new epoch) back in front."""
    new = pd.read_csv(metrics_csv) if metrics_csv.is_file() else earlier.iloc[:0]
    first = new["epoch"].min() if len(new) else np.inf
    merged = pd.concat([earlier[earlier["epoch"] < first], new], ignore_index=True)
    with atomic_path(metrics_csv) as tmp:
        merged.to_csv(tmp, index=False)


def _callbacks(cfg: TrainSection, ckpt_dir: Path, validated: bool) -> list:
    """The epoch seed, best.ckpt (lowest validation loss, else training loss), last.ckpt
    (every epoch) and, with validation and ``cfg.patience``, early stopping."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    # Two checkpoints: Lightning's save_last writes last.ckpt only in epochs that also improve
    # the monitored loss, so a run whose loss rose at its end would resume (and be read back)
    # from an earlier epoch. A second, unmonitored checkpoint overwrites last.ckpt every epoch.
    callbacks = [
        EpochSeed(cfg.seed),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", mode="min", every_n_epochs=1,
                        monitor="val_loss" if validated else "train_loss",
                        enable_version_counter=False),
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_epochs=1,
                        enable_version_counter=False),
    ]
    if validated and cfg.patience > 0:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min"))
    return callbacks


def fit(
    module: L.LightningModule,
    train: Dataset | DataLoader,
    out_dir: str | Path,
    cfg: TrainSection | None = None,
    val: Dataset | None = None,
) -> dict:
    """Train ``module`` on ``train`` (a Dataset, served in epoch-keyed shuffled batches, or a
    ready DataLoader whose sampler is epoch-keyed and rank-aware), validating on ``val`` each
    epoch, writing to ``out_dir``:
    ``checkpoints/last.ckpt`` (every epoch), ``checkpoints/best.ckpt`` (lowest validation loss;
    training loss without ``val``)
    and ``metrics.csv`` (per-epoch metrics). A run whose ``last.ckpt`` exists resumes from it, so
    an interrupted or extended run (more epochs) continues where it stopped.

    Returns:
        ``{"epochs_run", "best_checkpoint", "last_checkpoint", "metrics_csv", "seconds",
        "resumed_from", "global_rank", "world_size", "train_batches_per_epoch"}`` (batches
        of this process).
    """
    from lightning.pytorch.loggers import CSVLogger

    cfg = cfg or TrainSection()
    _quiet_lightning()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if isinstance(train, DataLoader):
        train_loader = train
    else:
        train_loader = DataLoader(train, batch_size=cfg.batch_size,
                                  sampler=EpochSampler(len(train), cfg.seed),
                                  num_workers=cfg.num_workers,
                                  drop_last=len(train) > cfg.batch_size,
                                  persistent_workers=cfg.num_workers > 0)
    val_loader = (DataLoader(val, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
                  if val is not None and len(val) else None)
    callbacks = _callbacks(cfg, ckpt_dir, val_loader is not None)
    if cfg.channels_last:
        module.channels_last = True
        module.to(memory_format=torch.channels_last)
    precision = cfg.precision if cfg.precision != "auto" else (
        "bf16-mixed" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "32-true")
    trainer = L.Trainer(
        max_epochs=cfg.epochs, default_root_dir=out_dir, callbacks=callbacks,
        logger=CSVLogger(out_dir, name="", version=""), accelerator=cfg.accelerator,
        devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
        precision=precision, enable_progress_bar=progress_enabled(),
        enable_model_summary=False,
        deterministic="warn", num_sanity_val_steps=0, log_every_n_steps=1,
        use_distributed_sampler=False,
        # strategies that shard the model (fsdp, deepspeed) write checkpoints their own way
        plugins=[AtomicCheckpointIO()] if cfg.strategy.startswith(("auto", "ddp")) else None,
    )
    last = ckpt_dir / "last.ckpt"
    resumed = str(last) if last.is_file() else None
    if resumed:
        logger.info(f"resuming from {last}")
    metrics_csv = out_dir / "metrics.csv"
    earlier = pd.read_csv(metrics_csv) if resumed and metrics_csv.is_file() else None
    t0 = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=resumed)
    seconds = time.perf_counter() - t0
    if earlier is not None and trainer.global_rank == 0:
        _keep_earlier_epochs(metrics_csv, earlier)
    best = ckpt_dir / "best.ckpt"
    return {"epochs_run": int(trainer.current_epoch), "best_checkpoint": str(best),
            "last_checkpoint": str(last), "metrics_csv": str(metrics_csv),
            "seconds": seconds, "resumed_from": resumed,
            "global_rank": int(trainer.global_rank), "world_size": int(trainer.world_size),
            "train_batches_per_epoch": int(trainer.num_training_batches)}


@torch.no_grad()
def recalibrate_batch_norm(module: nn.Module, data: Dataset, batch_size: int = 32) -> int:
    """Recompute the running mean and variance of ``module``'s trained batch-norm layers as
    plain averages over ``data`` (one forward pass, no gradients; the "precise BN" of Wu &
    Johnson 2021). After a short fine-tuning the running averages (momentum 0.1) still mix the
    pretrained network's statistics with those of the last few batches, and eval-mode
    predictions suffer. Layers whose weights are frozen keep their statistics; dropout is off
    during the pass.

    Args:
        data: ``(x, y)`` items as the network sees them at test time (``x`` ``(C, H, W)``
            or, for cached maps, whatever the module takes), e.g. the training images without
            augmentation.

    Returns:
        The number of layers recomputed (0: the module has none, or ``data`` is empty).
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and (m.weight is None or m.weight.requires_grad)]
    if not layers or not len(data):
        return 0
    was_training, momenta = module.training, [m.momentum for m in layers]
    module.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    device = next(module.parameters()).device
    loader = DataLoader(data, batch_size=batch_size, drop_last=len(data) > batch_size)
    for x, _ in loader:
        module(x.to(device))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    module.train(was_training)
    return len(layers)


@torch.inference_mode()
def predict_proba(module: ImageClassifier, data: Dataset, batch_size: int = 32) -> np.ndarray:
    """Class probabilities ``(N, K)`` (softmax, or sigmoid for multi-label) in eval mode."""
    module.eval()
    probs = RowBuffer(len(data), np.float64)
    for x, _ in DataLoader(data, batch_size=batch_size):
        logits = module(x.to(module.device))["logits"].float()
        p = torch.sigmoid(logits) if module.multilabel else torch.softmax(logits, 1)
        probs.add(p.cpu().numpy())
    return probs.result(np.zeros((0, 0)))
