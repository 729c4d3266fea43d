"""``morphoprof train finetune|mil CONFIG.yaml``: index -> images -> cross-validated training ->
treatment-level accuracy, conformal sets, and (MIL) Jacobian-map overlays."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from morphoprof.datasets.source import build_index_from_config
from morphoprof.errors import InputError
from morphoprof.index.schema import ExperimentIndex, select_rows
from morphoprof.io_utils import NpyRows, noted_npy, read_parquet, remove_noted, write_json
from morphoprof.models.crossval import MODEL, CVConfig, cross_validate
from morphoprof.models.cv_result import CVResult
from morphoprof.models.settings import TrainConfig

if TYPE_CHECKING:
    from morphoprof.models.mil import MILConfig

KINDS = ("finetune", "mil")
IMAGES = "images.npy"  # a training's images ready for the network, while it runs


def module_factory(kind: str, cfg: TrainConfig, n_classes: int, in_chans: int):
    """``(make_module(fold), mean, std)`` for ``finetune`` and a validated config (``mil``:
    :func:`mil_setup`)."""
    seed = cfg.train.seed
    if kind == "finetune":
        from morphoprof.models.finetune import FineTuneConfig, finetune_module

        ft = FineTuneConfig(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            multilabel=cfg.multilabel, **cfg.model.model_dump())
        # Fold 0's network is built here (checking the settings before any training) and
        # handed out on its first request, so its weights are not loaded twice.
        first, mean, std = finetune_module(ft, n_classes, in_chans, seed)
        unused = {0: first}

        def make(fold: int):
            if fold in unused:
                return unused.pop(fold)
            return finetune_module(ft, n_classes, in_chans, seed + fold)[0]

        return make, mean, std
    raise InputError(f"training kind must be one of {KINDS}, got {kind!r}")


def mil_config(cfg: TrainConfig, n_classes: int, in_chans: int) -> MILConfig:
    """The ``mil`` section of a validated training config as a :class:`MILConfig`."""
    from morphoprof.models.mil import MILConfig

    return MILConfig(n_classes=n_classes, in_chans=in_chans, multilabel=cfg.multilabel,
                     seed=cfg.train.seed, **cfg.mil.network().model_dump())


def channel_stats(images: np.ndarray | NpyRows, chunk: int = 64
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``(N, C, H, W)`` images (Kraus normalised
    the inputs of networks trained from scratch with these). Images on disk
    (:class:`~morphoprof.io_utils.NpyRows`) are read ``chunk`` at a time, twice (the mean,
    then the squared deviations from it), in float64."""
    if isinstance(images, NpyRows):
        n = len(images) * images.shape[2] * images.shape[3]
        parts = range(0, len(images), chunk)
        mean = sum(images[i:i + chunk].sum(axis=(0, 2, 3), dtype=np.float64) for i in parts) / n
        dev = sum((((images[i:i + chunk] - mean[:, None, None]) ** 2)).sum(axis=(0, 2, 3))
                  for i in parts)
        std = np.sqrt(dev / n)
    else:
        mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
        std = images.std(axis=(0, 2, 3), dtype=np.float64)
    return tuple(float(v) for v in mean), tuple(float(v) if v > 0 else 1.0 for v in std)


@dataclass
class MILSetup:
    """How ``train mil`` trains: fresh seeded modules per fold, the input normalisation, and,
    for a frozen trunk, the datasets of its cached feature maps.

    Attributes:
        make: fold -> a fresh :class:`ImageClassifier` (the whole network, or only the MIL
            head when the trunk is frozen).
        mean, std: per-channel input normalisation.
        make_dataset: None (train on the images) or ``(rows, targets, train) -> Dataset`` over
            the cached maps.
        full_net: a trained module's state dict -> the whole :class:`MILNet` (trunk and head),
            for Jacobian maps.
        info: trunk, stage, weights, frozen, feature map shape, caching seconds.
    """

    make: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]
    make_dataset: Callable | None
    full_net: Callable
    info: dict


def mil_setup(cfg: TrainConfig, images: np.ndarray, n_classes: int, out: Path) -> MILSetup:
    """Build the MIL trunk named in ``cfg.mil``, choose the input normalisation (the
    pretrained trunk's own statistics, else the images' per-channel mean / std) and, when the
    trunk is frozen (default for pretrained timm trunks), compute or reuse its feature maps of
    ``images`` under the 8 rotations / reflections (1 without ``images.augment``), cached in
    ``mil.cache`` (default ``out/mil/trunk_maps``)."""
    import torch

    from morphoprof.models.mil import MILNet, make_trunk
    from morphoprof.models.training import ImageClassifier

    m, train, seed = cfg.mil, cfg.train, cfg.train.seed
    mcfg = mil_config(cfg, n_classes, images.shape[1])
    torch.manual_seed(seed)
    trunk = make_trunk(mcfg)
    if getattr(trunk, "mean", None) is not None:
        mean, std = tuple(trunk.mean), tuple(trunk.std)
    else:
        mean, std = channel_stats(images)
    pretrained = getattr(trunk, "source", "random") != "random"
    frozen = m.frozen if m.frozen is not None else (
        m.trunk not in ("plan", "kraus") and pretrained)
    info = {"trunk": getattr(trunk, "name", m.trunk), "stage": getattr(trunk, "stage", None),
            "weights": getattr(trunk, "source", "random"), "frozen": bool(frozen),
            "output_stride": int(trunk.reduction), "input_mean": list(mean),
            "input_std": list(std)}
    kw = dict(lr=train.lr, weight_decay=train.weight_decay, multilabel=cfg.multilabel,
              mil_weight=m.mil_weight)

    if not frozen:
        first = {0: trunk}

        def make(fold: int):
            torch.manual_seed(seed + fold)
            t = first.pop(fold) if fold in first else make_trunk(mcfg)
            return ImageClassifier(MILNet(mcfg, trunk=t), **kw)

        def full_net(state: dict):
            return load_mil_state(MILNet(mcfg), state, frozen=False)

        return MILSetup(make, mean, std, None, full_net, info)

    return _frozen_setup(cfg, trunk, mcfg, kw, images, mean, std, info, out)


def _frozen_setup(cfg: TrainConfig, trunk, mcfg, kw: dict, images: np.ndarray, mean, std,
                  info: dict, out: Path) -> MILSetup:
    """:func:`mil_setup` of a frozen trunk: its feature maps of ``images`` computed once (or
    read from the cache) and only the MIL head (and, with ``unfreeze_last_stage``, the
    trunk's last stage) trained on them."""
    import torch

    from morphoprof.models.mil import LastStageHead, MILHead, MILNet, TrunkPrefix
    from morphoprof.models.mil_cache import (
        CachedMapDataset,
        cache_compute_seconds,
        cache_key,
        cached_trunk_maps,
        trunk_map_batches,
    )
    from morphoprof.models.training import ImageClassifier

    m, seed = cfg.mil, cfg.train.seed
    for p in trunk.parameters():
        p.requires_grad_(False)
    last = m.unfreeze_last_stage
    if last:
        trunk.last_stage  # noqa: B018 (an error now, before any caching, if it cannot split)
    n_t = 8 if cfg.images.augment else 1
    key_info = {k: info[k] for k in ("trunk", "stage", "weights")}
    if last:
        key_info["part"] = "input of the last stage"
    key = cache_key(key_info, images, mean, std, n_t)
    folder = Path(m.cache) if m.cache else out / "mil" / "trunk_maps"
    t0 = time.perf_counter()
    source = TrunkPrefix(trunk) if last else trunk
    maps = cached_trunk_maps(folder, key, lambda: trunk_map_batches(source, images, mean, std,
                                                                     n_t), n=len(images))
    info.update(feature_maps=list(maps.shape[2:]), transforms=n_t, trained_last_stage=last,
                cache_seconds=time.perf_counter() - t0,
                cache_compute_seconds=cache_compute_seconds(folder), cache=str(folder))
    crop_px = cfg.images.crop
    stride = max(1, images.shape[-1] // maps.shape[-1])  # of the cached maps
    crop = None if crop_px is None else max(1, int(crop_px) // stride)

    def make(fold: int):
        torch.manual_seed(seed + fold)
        head = MILHead(mcfg, trunk.out_channels)
        if not last:
            return ImageClassifier(head, **kw)
        stage = copy.deepcopy(trunk.last_stage)  # each fold from the pretrained weights
        for p in stage.parameters():
            p.requires_grad_(True)
        return ImageClassifier(LastStageHead(stage, head), **kw)

    def make_dataset(rows, targets, is_train: bool):
        return CachedMapDataset(maps, rows, targets, train=is_train, crop=crop)

    def full_net(state: dict):
        # a copy of the trunk for a trained last stage: the shared one stays pretrained
        return load_mil_state(MILNet(mcfg, trunk=copy.deepcopy(trunk) if last else trunk),
                              state, frozen=True, last_stage=last)

    return MILSetup(make, mean, std, make_dataset, full_net, info)


def load_mil_state(net, state: dict, frozen: bool, last_stage: bool = False):
    """Load a trained :class:`ImageClassifier`'s ``state_dict`` (keys ``net.*``) into the whole
    :class:`MILNet` ``net``: into its head alone when the trunk was frozen (the module held only
    the head), into its trunk's last stage and its head when that stage was trained too
    (``last_stage``; the module was a :class:`~morphoprof.models.mil.LastStageHead`), else
    into all of it. Returns ``net``."""
    own = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    if frozen and last_stage:
        for part, module in (("last.", net.trunk.last_stage), ("head.", net.head)):
            module.load_state_dict({k[len(part):]: v for k, v in own.items()
                                    if k.startswith(part)})
        return net
    (net.head if frozen else net).load_state_dict(own)
    return net


def training_index(cfg: TrainConfig, folder: str | Path) -> ExperimentIndex:
    """The image sets a training config trains on: its ``data`` section (relative paths
    against ``folder``, the run's output) with its ``select`` applied."""
    return select_rows(build_index_from_config(cfg.data, folder), cfg.select)


def training_images(cfg: TrainConfig, index: ExperimentIndex, rows=None,
                    path: Path | None = None) -> np.ndarray | NpyRows:
    """``index``'s image sets (``rows``, default all) read as a training config reads them:
    its ``channels`` (default: the index's), ``images.size``, ``normalization`` and ``scale``;
    ``(N, C, S, S)`` float32 (see :func:`~morphoprof.models.data.load_images`). With ``path``,
    written to that ``.npy`` file and read from it memory-mapped; reused where an interrupted
    run with the same images and settings wrote it (:func:`~morphoprof.io_utils.noted_npy`)."""
    from morphoprof.models.data import load_images

    im, channels = cfg.images, cfg.channels or index.channels

    def load(target: Path | None):
        return load_images(index, rows, channels=channels, size=im.size,
                           normalization=im.normalization, scale=im.scale, path=target)

    if path is None:
        return load(None)
    return noted_npy(path, {"index": index.digest(), "rows": None if rows is None else
                            np.asarray(rows).tolist(), "channels": list(channels),
                            "images": im.model_dump(mode="json")}, load)


def run_training(kind: str, cfg: TrainConfig, config_text: str = "",
                 overwrite: bool = False) -> CVResult:
    """Run a validated training config end to end; results in ``cfg.output`` (``KIND/cv.json``
    is the returned :class:`~morphoprof.models.cv_result.CVResult`). Finished folds of an
    earlier run with the same settings and index are reused; a ``KIND`` folder made with
    others is refused, or emptied with ``overwrite`` (:func:`check_training_folder`)."""
    from morphoprof.models.training import check_training_folder

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    index = training_index(cfg, out)
    check_training_folder(out / kind, {**cfg.model_dump(mode="json"), "index": index.digest()},
                          overwrite, ignore=("mil.jacobian_images", "mil.cache")
                          if kind == "mil" else ("mil",), keep=("trunk_maps",))
    if config_text:
        (out / f"train_{kind}.yaml").write_text(config_text)
    if cfg.label not in index.table.columns:
        raise InputError(f"label column {cfg.label!r} is not in the index; found "
                         f"{list(index.table.columns)}")
    n_classes = index.table[cfg.label].astype(str).nunique()
    images = training_images(cfg, index, path=out / kind / IMAGES)
    setup = None
    if kind == "mil":
        setup = mil_setup(cfg, images, n_classes, out)
        make, mean, std = setup.make, setup.mean, setup.std
    else:
        make, mean, std = module_factory(kind, cfg, n_classes, images.shape[1])
    c = cfg.cv
    aggregate = c.aggregate or ("median" if kind == "mil" else "mean")
    im = cfg.images
    cv = CVConfig(**{**c.model_dump(), "aggregate": aggregate}, label=cfg.label,
                  seed=cfg.train.seed, augment=im.augment, crop=im.crop, mean=mean, std=std)
    result = cross_validate(index, images, make, out / kind, cv,
                            cfg.train,
                            make_dataset=setup.make_dataset if setup else None)
    overlays = None
    if setup is not None and cfg.mil.jacobian_images > 0:
        overlays = tuple(write_jacobian_overlays(out / kind, index, images, setup.full_net,
                                                 mean, std, cfg.mil.jacobian_images))
    result = result.with_run(kind=kind, trunk=setup.info if setup else None,
                             jacobian_overlays=overlays)
    write_json(out / kind / "cv.json", result.to_json())
    remove_noted(out / kind / IMAGES)
    return result


def write_jacobian_overlays(folder: Path, index: ExperimentIndex, images: np.ndarray,
                            full_net: Callable, mean, std, n: int) -> list[str]:
    """PNG overlays of fold 0's model's Jacobian maps and their MRF-denoised masks (contrast-
    sensitive: the image's edges weight the pairwise term, :func:`mrf_mask`) on the first
    ``n`` of its test images (``full_net``: the trained module's state dict -> the whole MIL
    network)."""
    import torch

    from morphoprof.models.jacobian import field_maps, mrf_mask, save_overlay

    state = torch.load(fold_model(folder, 0), map_location="cpu",
                       weights_only=False)["state_dict"]
    net = full_net(state)
    pred = read_parquet(folder / "predictions.parquet")
    rows = np.flatnonzero(pred["Metadata_fold"].to_numpy() == 0)[:n]
    paths = []
    for i, jmap in zip(rows, field_maps(net, images[rows], mean, std)):
        path = save_overlay(folder / "jacobian" / f"image_{i}.png", images[i], jmap,
                            mrf_mask(jmap, image=images[i]))
        paths.append(str(path))
    return paths


def fold_model(folder: Path, fold: int) -> Path:
    """The weights that made fold ``fold``'s predictions in a training's ``KIND`` folder:
    ``model.ckpt`` (best epoch, batch-norm statistics recomputed), or ``last.ckpt`` for folds
    finished before model.ckpt was written."""
    model = folder / f"fold{fold}" / MODEL
    return model if model.is_file() else folder / f"fold{fold}" / "checkpoints" / "last.ckpt"


def trained_mil(folder: str | Path, cfg: TrainConfig, fold: int = 0):
    """The whole trained MIL network (trunk and head, eval mode) of ``fold`` of a finished
    ``train mil`` run in ``folder`` (the run's ``output``) trained with the validated config
    ``cfg``, and its input ``(mean, std)``."""
    import torch

    from morphoprof.models.mil import MILNet

    folder = Path(folder)
    cv_file, ckpt = folder / "mil" / "cv.json", fold_model(folder / "mil", fold)
    for f in (cv_file, ckpt):
        if not f.is_file():
            raise InputError(f"not a finished train mil run: {f} not found")
    res = CVResult.from_json(json.loads(cv_file.read_text()))
    trunk = res.trunk
    n_chans = len(trunk["input_mean"])
    net = MILNet(mil_config(cfg, len(res.classes), n_chans))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    load_mil_state(net, state, trunk["frozen"], trunk.get("trained_last_stage", False))
    return net.eval(), tuple(trunk["input_mean"]), tuple(trunk["input_std"])
