"""``morphoprof train finetune|mil CONFIG.yaml``: index -> images -> cross-validated training ->
treatment-level accuracy, conformal sets, and (MIL) Jacobian-map overlays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from morphoprof.errors import InputError
from morphoprof.index.schema import ExperimentIndex
from morphoprof.io_utils import read_parquet, write_json
from morphoprof.models.crossval import CVConfig, cross_validate
from morphoprof.models.training import FitConfig

KINDS = ("finetune", "mil")


def select_mask(table, select: dict) -> np.ndarray:
    """Rows whose column holds one of the listed values (``{column: [values]}``), as a mask."""
    mask = np.ones(len(table), bool)
    for col, values in (select or {}).items():
        if col not in table.columns:
            raise InputError(f"select: the table has no column {col!r}; found "
                             f"{list(table.columns)}")
        values = values if isinstance(values, list) else [values]
        have = table[col].astype(str)
        absent = [v for v in values if str(v) not in set(have)]
        if absent:
            raise InputError(f"select: {col} has no rows with value(s) {absent}")
        mask &= have.isin([str(v) for v in values]).to_numpy()
    return mask


def select_rows(index: ExperimentIndex, select: dict) -> ExperimentIndex:
    """Keep the index rows chosen by :func:`select_mask`."""
    mask = select_mask(index.table, select)
    return index.subset(mask) if not mask.all() else index


def fit_config(train: dict, progress: bool = True) -> FitConfig:
    """The ``train`` section as a :class:`FitConfig`."""
    keys = ("epochs", "batch_size", "patience", "seed", "num_workers", "accelerator", "devices",
            "num_nodes", "strategy", "precision")
    return FitConfig(**{k: train[k] for k in keys}, progress=progress)


def module_factory(kind: str, cfg: dict, n_classes: int, in_chans: int):
    """``(make_module(fold), mean, std)`` for a training kind and a validated config."""
    seed = cfg["train"]["seed"]
    if kind == "finetune":
        from morphoprof.models.finetune import FineTuneConfig, finetune_module

        ft = FineTuneConfig(model=cfg["model"]["name"], weights=cfg["model"]["weights"],
                            lr=cfg["train"]["lr"], weight_decay=cfg["train"]["weight_decay"],
                            drop_rate=cfg["model"]["drop_rate"], multilabel=cfg["multilabel"])
        # Fold 0's network is built here (checking the settings before any training) and
        # handed out on its first request, so its weights are not loaded twice.
        first, mean, std = finetune_module(ft, n_classes, in_chans, seed)
        unused = {0: first}

        def make(fold: int):
            if fold in unused:
                return unused.pop(fold)
            return finetune_module(ft, n_classes, in_chans, seed + fold)[0]

        return make, mean, std
    if kind == "mil":
        import torch

        from morphoprof.models.mil import MILConfig, MILNet
        from morphoprof.models.training import ImageClassifier

        m = cfg["mil"]
        extra = {}
        if m["plan"]:
            try:
                extra["plan"] = tuple((int(c), int(s)) for c, s in m["plan"])
            except (TypeError, ValueError) as exc:
                raise InputError(f"mil.plan must list [channels, stride] pairs, got "
                                 f"{m['plan']!r}") from exc
        mcfg = MILConfig(n_classes=n_classes, in_chans=in_chans, pooling=m["pooling"], r=m["r"],
                         a=m["a"], hidden=m["hidden"], multilabel=cfg["multilabel"], **extra)

        def make(fold: int):
            torch.manual_seed(seed + fold)
            return ImageClassifier(MILNet(mcfg), lr=cfg["train"]["lr"],
                                   weight_decay=cfg["train"]["weight_decay"],
                                   multilabel=cfg["multilabel"], mil_weight=m["mil_weight"])

        return make, (0.5,) * in_chans, (0.25,) * in_chans
    raise InputError(f"training kind must be one of {KINDS}, got {kind!r}")


def run_training(kind: str, cfg: dict, config_text: str = "", progress: bool = True,
                 log: Callable[[str], None] | None = print) -> dict:
    """Run a validated training config end to end; results in ``cfg['output']``."""
    from morphoprof.models.data import load_images
    from morphoprof.pipeline import build_index_from_config

    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    if config_text:
        (out / f"train_{kind}.yaml").write_text(config_text)
    index = build_index_from_config(cfg["data"], out, progress=progress, log=log)
    index = select_rows(index, cfg["select"])
    channels = cfg["channels"] or index.channels
    im = cfg["images"]
    images = load_images(index, channels=channels, size=im["size"],
                         normalization=im["normalization"], scale=im["scale"],
                         progress=progress, log=log)
    if cfg["label"] not in index.table.columns:
        raise InputError(f"label column {cfg['label']!r} is not in the index; found "
                         f"{list(index.table.columns)}")
    n_classes = index.table[cfg["label"]].astype(str).nunique()
    make, mean, std = module_factory(kind, cfg, n_classes, len(channels))
    c = cfg["cv"]
    cv = CVConfig(label=cfg["label"], group=c["group"], folds=c["folds"],
                  treatment=tuple(c["treatment"]), aggregate=c["aggregate"], alpha=c["alpha"],
                  val_fraction=c["val_fraction"], seed=cfg["train"]["seed"],
                  augment=im["augment"], crop=im["crop"], mean=mean, std=std)
    result = cross_validate(index, images, make, out / kind, cv, fit_config(cfg["train"],
                                                                            progress), log=log)
    result["kind"] = kind
    if kind == "mil" and cfg["mil"]["jacobian_images"] > 0:
        result["jacobian_overlays"] = write_jacobian_overlays(
            out / kind, index, images, make, mean, std, cfg["mil"]["jacobian_images"])
    write_json(out / kind / "cv.json", result)
    return result


def train_from_yaml(kind: str, text: str, folder: str | Path, fresh: bool = True,
                    progress: bool = False) -> dict:
    """Write a training config's ``text`` to ``folder/config.yaml`` and run it, with
    ``output`` set to ``folder``. ``fresh`` empties the folder first; otherwise finished folds
    are reused (resume)."""
    from morphoprof.config import load_train_config

    cfg, text = load_train_config(write_config(text, folder, fresh))
    return run_training(kind, cfg, text, progress=progress)


def write_config(text: str, folder: str | Path, fresh: bool = True) -> Path:
    """Write a config's ``text`` to ``folder/config.yaml`` with ``output`` set to ``folder``
    (emptied first when ``fresh``); returns the file's path."""
    import shutil

    folder = Path(folder)
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(f"{text.rstrip()}\noutput: {folder.resolve()}\n")
    return path


def write_jacobian_overlays(folder: Path, index: ExperimentIndex, images: np.ndarray, make,
                            mean, std, n: int) -> list[str]:
    """PNG overlays of fold 0's model's Jacobian maps on the first ``n`` of its test images."""
    import torch

    from morphoprof.models.jacobian import jacobian_maps, jacobian_mask, save_overlay

    module = make(0)
    state = torch.load(folder / "fold0" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    module.load_state_dict(state)
    pred = read_parquet(folder / "predictions.parquet")
    rows = np.flatnonzero(pred["Metadata_fold"].to_numpy() == 0)[:n]
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    paths = []
    for i in rows:
        x = (torch.from_numpy(images[i]) - m) / s
        jmap = jacobian_maps(module.net, x[None])[0]
        path = save_overlay(folder / "jacobian" / f"image_{i}.png", images[i], jmap,
                            jacobian_mask(jmap))
        paths.append(str(path))
    return paths
