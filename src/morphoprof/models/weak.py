"""Weakly supervised single-cell embeddings (Caicedo et al. 2018).

A timm CNN (``resnet18`` by default, any timm name; input channels = the screen's stains; random
or ImageNet initialisation) learns to tell single-cell crops apart by their treatment, a weak
label for their phenotype. Training batches are sequences of same-label cells (see
:mod:`~morphoprof.models.weak_data`); every cell's CNN logits get the (soft, with mixup)
cross-entropy, and with the GRU set regularizer the sequence of CNN features also goes through a
GRU (256 units) whose last step predicts the sequence's label. The GRU is only a training-time
regularizer: it is dropped when features are extracted.

Embeddings come from an intermediate block (global-average pooled), through the same
:class:`~morphoprof.features.transfer.TransferExtractor` as ``morphoprof extract --checkpoint``,
so aggregation, normalisation and evaluation apply unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from morphoprof.errors import InputError
from morphoprof.extras import require
from morphoprof.features.backbones import create_backbone, read_weights_file
from morphoprof.features.transfer import TransferConfig, TransferExtractor
from morphoprof.logs import progress_bar
from morphoprof.models.data import ImageTensorDataset

L = require("lightning")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(B, K)`` logits against ``(B, K)`` target distributions."""
    return -(target * torch.log_softmax(logits.float(), dim=1)).sum(1).mean()


def default_layer(net: nn.Module) -> str:
    """The second-to-last feature stage of a timm model (e.g. ``layer3`` of a ResNet): Caicedo
    found intermediate layers gave the best profiles."""
    info = getattr(net, "feature_info", None)
    names = [f["module"] for f in info] if info else []
    if len(names) >= 2:
        return str(names[-2])
    raise InputError(f"{type(net).__name__} lists no feature stages; name a layer explicitly")


def input_stats(backbone, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel input normalisation ``(mean, std)`` matching the transfer extractor's
    ``native`` strategy: the network's own statistics for 3 channels, else 0.5 / 0.5."""
    if in_chans == 3:
        return tuple(backbone.mean), tuple(backbone.std)
    return (0.5,) * in_chans, (0.5,) * in_chans


class WeakModule(L.LightningModule):
    """CNN + (optional) GRU set regularizer, trained on treatment labels.

    Args:
        model: timm model name.
        weights: ``random`` | ``offline`` | ``imagenet`` | ``auto`` | a checkpoint path.
        in_chans: input channels (the stains, in ``channels`` order).
        classes: the label values, in logit order.
        gru: use the GRU regularizer (its loss is weighted by ``gru_weight``).
        gru_hidden: GRU units (Caicedo: 256).
        val_length: validation feeds each cell repeated this many times to the GRU.
        layer: the block whose pooled output is the embedding (default: :func:`default_layer`).
        crop_size, input_size, normalization, channels: how crops were made (cut at
            ``crop_size``, normalised, resized to ``input_size``), kept with the checkpoint so
            ``morphoprof extract --checkpoint`` makes them the same way.

    Training batches are ``(x (S, L, C, H, W), y (S, L, K), y_seq (S, K))``; validation batches
    ``(x (B, C, H, W), y (B,))`` with class indices.
    """

    def __init__(self, model: str = "resnet18", weights: str = "random", in_chans: int = 3,
                 classes: Sequence[str] = ("a", "b"), gru: bool = True, gru_hidden: int = 256,
                 gru_weight: float = 1.0, lr: float = 1e-3, weight_decay: float = 1e-5,
                 val_length: int = 3, layer: str | None = None, crop_size: int = 64,
                 input_size: int | None = None, normalization: str = "max",
                 channels: Sequence[str] = (), seed: int = 0, drop_rate: float = 0.0) -> None:
        super().__init__()
        classes = [str(c) for c in classes]
        if len(classes) < 2:
            raise InputError(f"weak supervision needs >= 2 treatment labels, got {classes}")
        backbone = create_backbone(model, weights, in_chans=in_chans, seed=seed,
                                   num_classes=len(classes))
        self.net = backbone.model
        if hasattr(self.net, "drop_rate"):
            self.net.drop_rate = drop_rate
        self.net.train()
        layer = layer or default_layer(self.net)
        if layer not in dict(self.net.named_modules()):
            raise InputError(f"layer {layer!r} is not a module of {backbone.name}")
        mean, std = input_stats(backbone, in_chans)
        self.save_hyperparameters({
            "kind": "weak", "model": backbone.name, "weights": str(weights),
            "in_chans": int(in_chans), "classes": classes, "gru": bool(gru),
            "gru_hidden": int(gru_hidden), "gru_weight": float(gru_weight), "lr": float(lr),
            "weight_decay": float(weight_decay), "val_length": int(val_length), "layer": layer,
            "crop_size": int(crop_size), "input_size": int(input_size or crop_size),
            "normalization": normalization,
            "channels": [str(c) for c in channels], "seed": int(seed),
            "drop_rate": float(drop_rate), "input_mean": list(mean), "input_std": list(std),
        })
        k, d = len(classes), int(self.net.num_features)
        self.gru = nn.GRU(d, gru_hidden, batch_first=True) if gru else None
        self.gru_head = nn.Linear(gru_hidden, k) if gru else None

    @property
    def input_mean(self) -> tuple[float, ...]:
        return tuple(self.hparams["input_mean"])

    @property
    def input_std(self) -> tuple[float, ...]:
        return tuple(self.hparams["input_std"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``(B, D)`` of normalised crops ``(B, C, H, W)``."""
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)``."""
        return self.net.get_classifier()(self.features(x))

    def sequence_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """GRU logits ``(S, K)`` from the last step of feature sequences ``(S, L, D)``."""
        with torch.autocast(device_type=feats.device.type, enabled=False):
            out, _ = self.gru(feats.float())
            return self.gru_head(out[:, -1])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, y_seq = batch
        s, length = x.shape[:2]
        feats = self.features(x.flatten(0, 1))
        logits = self.net.get_classifier()(feats)
        flat_y = y.flatten(0, 1)
        cell_loss = soft_cross_entropy(logits, flat_y)
        loss = cell_loss
        log = dict(on_step=False, on_epoch=True, batch_size=len(flat_y))
        if self.gru is not None:
            gru_loss = soft_cross_entropy(self.sequence_logits(feats.view(s, length, -1)), y_seq)
            loss = cell_loss + self.hparams["gru_weight"] * gru_loss
            self.log("train_gru_loss", gru_loss, **log)
        self.log("train_cell_loss", cell_loss, **log)
        self.log("train_loss", loss, prog_bar=True, **log)
        acc = (logits.argmax(1) == flat_y.argmax(1)).float().mean()
        self.log("train_acc", acc, prog_bar=True, **log)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        feats = self.features(x)
        logits = self.net.get_classifier()(feats)
        log = dict(on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("val_loss", nn.functional.cross_entropy(logits.float(), y), prog_bar=True,
                 **log)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, **log)
        if self.gru is not None:
            seq = feats[:, None].expand(-1, self.hparams["val_length"], -1)
            self.log("val_gru_acc", (self.sequence_logits(seq).argmax(1) == y).float().mean(),
                     **log)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"],
                                weight_decay=self.hparams["weight_decay"])


def checkpoint_hparams(path: str | Path) -> dict:
    """The hyperparameters stored in a weak-supervision checkpoint (InputError otherwise)."""
    ckpt = read_weights_file(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or hp.get("kind") != "weak":
        raise InputError(f"{path} is not a morphoprof weak-supervision checkpoint (no "
                         "hyperparameters with kind 'weak'); pass it as --weights instead")
    return dict(hp)


def extractor_from_checkpoint(path: str | Path, layer: str | None = None,
                              batch_size: int = 64, device: str = "auto",
                              num_workers: int = 0, label: str = "weak",
                              precision: str = "auto"):
    """A :class:`~morphoprof.features.transfer.TransferExtractor` for a trained weak model:
    the checkpoint's CNN (GRU dropped), its channels, ``native`` strategy, pooled output of
    ``layer`` (default: the layer it was trained to embed with). Returns ``(extractor, hparams)``.
    """
    hp = checkpoint_hparams(path)
    cfg = TransferConfig(model=hp["model"], weights=str(path), channel_strategy="native",
                         in_chans=hp["in_chans"], layer=layer or hp["layer"],
                         channels=hp["channels"] or None, batch_size=batch_size,
                         image_size=hp["input_size"] if hp["input_size"] != hp["crop_size"]
                         else None,
                         device=device, num_workers=num_workers, label=label,
                         precision=precision)
    return TransferExtractor(cfg), hp


def embed_crops(extractor, crops: np.ndarray, channels: Sequence[str]) -> tuple[np.ndarray, float]:
    """Embeddings ``(N, D)`` of crops ``(N, C, S, S)`` (intensities already normalised to
    [0, 1]; in memory, or an :class:`~morphoprof.io_utils.NpyRows` read batch by batch) and
    the seconds it took."""
    data = ImageTensorDataset(crops, np.arange(len(crops)))
    bar = progress_bar(total=len(crops), desc="embeddings", unit="cell")
    t0 = time.perf_counter()
    feats, keys = extractor.features_for_dataset(data, channels, bar)
    seconds = time.perf_counter() - t0
    bar.close()
    out = np.empty_like(feats)
    out[keys] = feats
    return out, seconds
