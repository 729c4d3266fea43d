"""``morphoprof train weak CONFIG.yaml``: single-cell crops -> weakly supervised CNN (mixup, GRU
set regularizer) -> held-out accuracy -> embeddings written as a feature folder.

Cells come either from a crop array (``data.source: crops``: an ``.npz`` holding ``crops``
``(N, H, W, C)`` or ``(N, C, H, W)`` and a CSV / Parquet table with one row per crop), or from a
screen (any run-config source): nuclei are segmented and a crop is cut around each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.classification import ClassificationSummary
from morphoprof.datasets.source import build_index_from_config
from morphoprof.errors import InputError
from morphoprof.index.schema import (
    BATCH,
    COMPOUND,
    CONTROL,
    PLATE,
    WELL,
    select_mask,
    select_rows,
)
from morphoprof.io_utils import (
    NpyRows,
    RowBuffer,
    file_digest,
    frame_digest,
    load_array_file,
    noted_npy,
    read_parquet,
    remove_noted,
    write_json,
    write_npy_chunks,
)
from morphoprof.logs import progress_bar
from morphoprof.models.settings import HoldoutSection, WeakConfig
from morphoprof.models.weak_result import WeakResult
from morphoprof.preprocess.crops import (
    CropDataset,
    CropShards,
    load_crop_shards,
    normalize_crops,
)
from morphoprof.preprocess.segmentation import segment_index
from morphoprof.shards import ShardWriter, plate_shards, run_shards

logger = logging.getLogger(__name__)

FEATURES = "features"
CROPS = "crops.npy"  # a weak run's crops ready for the network, while it trains


def _prefixed(table: pd.DataFrame) -> pd.DataFrame:
    """Columns not already ``Metadata_*`` or ``Nuclei_*`` get a ``Metadata_`` prefix."""
    return table.rename(columns={c: c if str(c).startswith(("Metadata_", "Nuclei_"))
                                 else f"Metadata_{c}" for c in table.columns})


def load_crop_array(path: str | Path, table_path: str | Path | None, channels: list[str] | None,
                    controls: list[str]) -> tuple[np.ndarray | CropShards, pd.DataFrame,
                                                  list[str]]:
    """Crops ``(N, C, S, S)`` (original dtype) and their table from an ``.npz`` + table, or
    from a crop folder written by ``morphoprof crops`` (``path`` a folder, no ``table_path``;
    the crops are then a :class:`~morphoprof.preprocess.crops.CropShards`, read from disk as
    they are indexed).

    The table's columns get a ``Metadata_`` prefix (``plate`` -> ``Metadata_plate``); a
    ``crop`` column, when present, is the row of each cell in the array (else rows in order).
    ``Metadata_control`` is added from ``controls`` when missing.
    """
    if Path(path).is_dir():
        arr, table, names = load_crop_shards(path)
        if channels and list(channels) != names:
            raise InputError(f"{path} holds channels {names}, not {list(channels)}")
        if CONTROL not in table.columns and COMPOUND in table.columns:
            table[CONTROL] = table[COMPOUND].astype(str).isin([str(c) for c in controls])
        return arr, table, names
    if table_path is None:
        raise InputError(f"{path}: a crop array needs its table (one row per crop)")
    path, table_path = Path(path), Path(table_path)
    for p in (path, table_path):
        if not p.is_file():
            raise InputError(f"file not found: {p}")
    try:
        with load_array_file(path) as z:
            if "crops" not in z.files:
                raise InputError(f"{path} holds {z.files}, not an array named 'crops'")
            arr = z["crops"]
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if arr.ndim != 4:
        raise InputError(f"{path}: crops must be 4-D (N, H, W, C) or (N, C, H, W), got "
                         f"{arr.shape}")
    n_ch = len(channels) if channels else min(arr.shape[1], arr.shape[-1])
    if n_ch not in (arr.shape[1], arr.shape[-1]):
        raise InputError(f"{path}: crops of shape {arr.shape} do not have {n_ch} channels "
                         f"(channels: {channels}) on axis 1 or 3")
    if arr.shape[-1] == n_ch and arr.shape[1] != n_ch:
        arr = np.moveaxis(arr, -1, 1)
    try:
        table = (read_parquet(table_path) if table_path.suffix == ".parquet"
                 else pd.read_csv(table_path))
    except Exception as exc:
        raise InputError(f"cannot read {table_path}: {exc}") from exc
    rows = table["crop"].to_numpy() if "crop" in table.columns else np.arange(len(table))
    bad = np.flatnonzero((rows < 0) | (rows >= len(arr)))
    if len(bad):
        raise InputError(f"{table_path} row {int(bad[0])}: crop {rows[bad[0]]} is outside the "
                         f"{len(arr)} crops of {path}")
    table = _prefixed(table.drop(columns=[c for c in ("crop",) if c in table.columns]))
    for need in (PLATE, WELL):
        if need not in table.columns:
            raise InputError(f"{table_path} needs a {need.removeprefix('Metadata_')} column")
    if CONTROL not in table.columns and COMPOUND in table.columns:
        table[CONTROL] = table[COMPOUND].astype(str).isin([str(c) for c in controls])
    names = list(channels) if channels else [f"ch{k}" for k in range(arr.shape[1])]
    return arr[rows], table.reset_index(drop=True), names


def crops_from_screen(cfg: WeakConfig, out: Path) -> tuple[CropDataset, pd.DataFrame, list]:
    """Segment the screen's nuclei (``cells.segmentation`` settings) and cut a ``crop_size``
    crop (zero-padded at edges) around each: the :class:`CropDataset` of raw intensities
    (``ds.crops(ks)`` cuts ``(len(ks), C, S, S)`` float32 as asked), the cells' table in the
    same order and the channel names."""
    index = select_rows(build_index_from_config(cfg.data, out), cfg.select)
    channels = cfg.channels or index.channels
    seg = cfg.cells.segmentation
    cells_path = out / "cells.parquet"
    # reused where it was segmented from this index with these settings, else made again
    segment_index(index, cells_path, channel=seg.channel, cfg=seg.nuclei(), n_jobs=seg.n_jobs)
    cells = read_parquet(cells_path)
    ds = CropDataset(index, cells, cfg.cells.crop_size, channels, normalization="none")
    if not len(ds):
        raise InputError(f"no cells were segmented in {cells_path}")
    meta = [c for c in index.table.columns if c.startswith("Metadata_")
            and c not in ds.cells.columns]
    key = [PLATE, WELL, "Metadata_site"]
    table = ds.cells.merge(index.table[key + meta].drop_duplicates(key), on=key, how="left")
    return ds, table, list(channels)


def prepare_crops(crops: np.ndarray, size: int | None, normalization: str) -> np.ndarray:
    """Float32 crops normalised per crop, then resized to ``size`` (antialiased)."""
    import torch

    x = normalize_crops(crops, normalization)
    if size and tuple(x.shape[-2:]) != (size, size):
        # normalised first, then resized: the order morphoprof extract --cells uses
        parts = [torch.nn.functional.interpolate(torch.from_numpy(x[i:i + 2048]), (size, size),
                                                 mode="bilinear", antialias=True).numpy()
                 for i in range(0, len(x), 2048)]
        x = np.concatenate(parts)
    return x


def prepare_crops_file(read: Callable[[np.ndarray], np.ndarray], n: int, size: int | None,
                       normalization: str, path: Path, params: dict,
                       chunk: int = 2048) -> NpyRows:
    """The ``n`` crops that ``read(ks)`` gives (raw ``(len(ks), C, S, S)``, cells ``ks`` in
    order) made ready for the network as :func:`prepare_crops` makes them, written chunk by
    chunk to the ``.npy`` file ``path`` and memory-mapped (float32): a screen's cells are
    never all held in memory, only ``chunk`` of them at a time. A file written with the same
    ``params`` (an interrupted run's) is reused (:func:`~morphoprof.io_utils.noted_npy`)."""
    if n == 0:
        raise InputError("no cells to train on (check select:)")

    def write(target: Path) -> None:
        bar = progress_bar(total=n, desc="preparing crops", unit="cell")

        def pieces():
            for i in range(0, n, chunk):
                x = prepare_crops(read(np.arange(i, min(i + chunk, n))), size, normalization)
                bar.update(len(x))
                yield x

        write_npy_chunks(target, n, np.float32, pieces())
        bar.close()

    return noted_npy(path, params, write)


def label_codes(table: pd.DataFrame, columns: list[str], source: str = "the cell table"
                ) -> tuple[np.ndarray, list[str]]:
    """Integer label per cell from the values of ``columns`` (joined with ``@``); ``source``
    names the table in errors (a missing column, a row without a label)."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        names = [c.removeprefix("Metadata_") for c in missing]
        raise InputError(f"{source}: no label column {', '.join(names)} (label: {columns}); "
                         f"it has {[c.removeprefix('Metadata_') for c in table.columns]}")
    empty = np.flatnonzero(table[columns].isna().any(axis=1).to_numpy())
    if len(empty):
        col = next(c for c in columns if pd.isna(table[c].iloc[empty[0]]))
        raise InputError(f"{source} row {int(empty[0])}: no value in label column "
                         f"{col.removeprefix('Metadata_')} ({len(empty)} such rows)")
    text = table[columns].astype(str).agg("@".join, axis=1)
    classes = sorted(text.unique())
    return pd.Categorical(text, categories=classes).codes.astype(np.int64), classes


def split_cells(table: pd.DataFrame, labels: np.ndarray, holdout: HoldoutSection, seed: int
                ) -> np.ndarray:
    """``"train"`` / ``"val"`` / ``"test"`` per cell, by whole wells.

    ``holdout.column`` / ``holdout.values``: cells whose column holds one of the values are
    the test set (e.g. one replicate). Of the remaining wells, ``val_fraction`` of each label's
    wells (rounded, keeping at least one training well per label) are for validation.
    """
    part = np.full(len(table), "train", dtype=object)
    if holdout.column:
        col = holdout.column
        if col not in table.columns:
            raise InputError(f"holdout.column {col!r} not in the cell table")
        values = [str(v) for v in holdout.values]
        part[table[col].astype(str).isin(values).to_numpy()] = "test"
    wells = (table[PLATE].astype(str) + "/" + table[WELL].astype(str)).to_numpy()
    rng = np.random.default_rng(seed)
    for lab in np.unique(labels):
        here = (labels == lab) & (part == "train")
        if not here.any():
            raise InputError(f"label {lab} has no training cells outside the held-out set")
        own = np.unique(wells[here])
        n_val = min(int(round(holdout.val_fraction * len(own))), len(own) - 1)
        for w in rng.permutation(own)[:n_val]:
            part[here & (wells == w)] = "val"
    return part


def run_weak(cfg: WeakConfig, config_text: str = "", overwrite: bool = False
             ) -> WeakResult | None:
    """Run a validated weak-supervision config (:class:`~morphoprof.models.settings.WeakConfig`).

    Writes ``output/weak/`` (checkpoints, metrics.csv, weak.json) and ``output/features/``
    (embeddings of every cell, one Parquet shard per plate, with a manifest). Returns the
    :class:`~morphoprof.models.weak_result.WeakResult` (``weak.json``); None in every process
    of a multi-process run but the first.
    """
    import torch

    from morphoprof.models.data import ImageTensorDataset
    from morphoprof.models.training import check_training_folder, fit
    from morphoprof.models.weak import embed_crops, extractor_from_checkpoint

    out = Path(cfg.output)
    folder = out / "weak"
    read, table, channels, raw_size, source = _weak_cells(cfg, out)
    # the cells' identity counts too; more epochs continue the training, and another
    # embedding layer needs none
    check_training_folder(folder, {**cfg.model_dump(mode="json"),
                                   "cells": frame_digest(table)[:16]}, overwrite,
                          ignore=("train.epochs", "features", "cells.segmentation.n_jobs"))
    if config_text:
        (out / "train_weak.yaml").write_text(config_text)
    labels, classes = label_codes(table, cfg.label, source)
    crops = prepare_crops_file(read, len(table), cfg.cells.size, cfg.cells.normalization,
                               folder / CROPS, _crop_params(cfg, table))
    batch_col = cfg.batch_column or (BATCH if BATCH in table.columns else PLATE)
    if batch_col not in table.columns:
        raise InputError(f"batch_column {batch_col!r} not in the cell table")
    part = split_cells(table, labels, cfg.holdout, cfg.train.seed)
    train, val, test = (np.flatnonzero(part == p) for p in ("train", "val", "test"))
    logger.info(f"{len(crops)} cells {crops.shape[1:]}, {len(classes)} labels; train {len(train)}, "
                f"val {len(val)}, test {len(test)} cells (split by well)")
    module = _weak_module(cfg, classes, channels, raw_size, int(crops.shape[-1]))
    mean, std = module.input_mean, module.input_std
    loader, sampler = _weak_loader(cfg, table, batch_col, crops, labels, train, len(classes),
                                   mean, std, cfg.train)
    val_set = (ImageTensorDataset(crops.subset(val), labels[val], mean=mean, std=std)
               if len(val) else None)
    start = _resume_epoch(folder / "checkpoints" / "last.ckpt")
    result = fit(module, loader, folder, cfg.train, val_set)
    if result["global_rank"] != 0:  # not the first process of a multi-process run
        return None
    ckpt = Path(result["best_checkpoint"] if len(val) else result["last_checkpoint"])
    extractor, _ = extractor_from_checkpoint(ckpt, cfg.features.layer, cfg.features.batch_size)
    module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    module.eval()
    heldout = (ClassificationSummary.from_indices(labels[test], predict_labels(
        module, crops.subset(test), mean, std), classes) if len(test) else None)
    feats, seconds = embed_crops(extractor, crops, channels)
    meta = table[[col for col in table.columns if str(col).startswith(("Metadata_",
                                                                       "Nuclei_Loc"))]]
    _write_embeddings(out / FEATURES, meta.assign(Metadata_split=part), feats,
                      extractor.column_names(channels, feats.shape[1]),
                      {"extractor": "weak", "checkpoint": str(ckpt),
                       "checkpoint_sha256": file_digest(ckpt), "layer": extractor.cfg.layer,
                       "n_cells": len(crops)})
    cells_trained = _cells_seen(sampler, start, result["epochs_run"])
    summary = WeakResult(
        classes=tuple(classes), channels=tuple(channels), batch_column=batch_col,
        cells={"train": len(train), "val": len(val), "test": len(test)},
        mixup_alpha=cfg.weak.mixup_alpha, gru=cfg.weak.gru, checkpoint=str(ckpt),
        layer=extractor.cfg.layer, epochs_run=result["epochs_run"],
        world_size=result["world_size"],
        train_batches_per_epoch_per_process=result["train_batches_per_epoch"],
        train_batches_per_epoch=sampler.n_batches, train_seconds=result["seconds"],
        train_cells_per_s=cells_trained / result["seconds"] if cells_trained else None,
        heldout=heldout,
        extract_cells_per_s=len(crops) / seconds if seconds > 0 else None,
        features=str(out / FEATURES), metrics_csv=result["metrics_csv"])
    write_json(folder / "weak.json", summary.to_json())
    remove_noted(folder / CROPS)
    return summary


def _crop_params(cfg: WeakConfig, table: pd.DataFrame) -> dict:
    """What the prepared crops of a weak run depend on: the cells (their table's digest),
    where their pixels come from and how they are cut, normalised and resized."""
    return {"cells": frame_digest(table)[:16], "data": cfg.data.model_dump(mode="json"),
            "select": cfg.select, "channels": cfg.channels,
            "crops": cfg.cells.model_dump(mode="json", exclude={"segmentation": {"n_jobs"}})}


def _weak_cells(cfg: WeakConfig, out: Path
                ) -> tuple[Callable[[np.ndarray], np.ndarray], pd.DataFrame, list[str], int, str]:
    """(``read(ks)``: the raw crops ``(len(ks), C, S, S)`` of cells ``ks``, their table,
    channel names, the raw crop size, where the labels come from) of a weak config: a crop
    array or folder the user gives (``data.source: crops``) or the screen's segmented cells.
    Nothing is read yet: a crop folder's shards are read as the cells are asked for."""
    data = cfg.data
    if data.source != "crops":
        ds, table, channels = crops_from_screen(cfg, out)
        return ds.crops, table, channels, int(cfg.cells.crop_size), "the screen's cell table"
    raw, table, channels = load_crop_array(data.path, data.table, cfg.channels, data.controls)
    keep = np.flatnonzero(select_mask(table, cfg.select))
    return (lambda ks: raw[keep[ks]], table.iloc[keep].reset_index(drop=True), channels,
            int(raw.shape[-1]), str(data.table or data.path))


def _resume_epoch(last: Path) -> int:
    """The epoch a training resumed from checkpoint ``last`` starts at (0 without one)."""
    import torch

    if not last.is_file():
        return 0
    return int(torch.load(last, map_location="cpu", weights_only=False)["epoch"]) + 1


def _cells_seen(sampler, start: int, stop: int) -> int:
    """Cells the sequence batches of epochs ``start`` to ``stop`` served (this run's)."""
    n = 0
    for epoch in range(start, stop):
        sampler.set_epoch(epoch)
        n += sum(len(b) * b[0][1] for b in sampler.batches())
    return n


def _weak_loader(cfg: WeakConfig, table: pd.DataFrame, batch_col: str, crops: NpyRows,
                 labels: np.ndarray, train: np.ndarray, n_classes: int, mean, std, fcfg):
    """(the training DataLoader, its sequence batch sampler): batches of same-label sequences
    drawn across batches (``batch_col``) and wells, with mixup and augmentation."""
    from torch.utils.data import DataLoader

    from morphoprof.models.weak_data import CellGroups, SequenceBatchSampler, WeakTrainSet

    w = cfg.weak
    batch_codes = pd.factorize(table[batch_col].astype(str))[0]
    well_codes = pd.factorize(table[PLATE].astype(str) + "/" + table[WELL].astype(str))[0]
    groups = CellGroups(labels[train], batch_codes[train], well_codes[train], n_classes)
    train_set = WeakTrainSet(crops.subset(train), groups, w.mixup_alpha, w.shift, w.augment,
                             mean, std)
    per_epoch = w.cells_per_epoch or len(train)
    sampler = SequenceBatchSampler(-(-per_epoch // fcfg.batch_size), fcfg.batch_size,
                                   w.lengths if w.gru else [1], cfg.train.seed)
    return DataLoader(train_set, batch_sampler=sampler, num_workers=fcfg.num_workers,
                      persistent_workers=fcfg.num_workers > 0), sampler


def _weak_module(cfg: WeakConfig, classes: list, channels: list[str], raw_size: int,
                 input_size: int):
    """The :class:`~morphoprof.models.weak.WeakModule` a weak config describes."""
    from morphoprof.models.weak import WeakModule

    w, m, c = cfg.weak, cfg.model, cfg.cells
    return WeakModule(m.name, m.weights, len(channels), classes, gru=w.gru,
                      gru_hidden=w.gru_hidden, gru_weight=w.gru_weight, lr=cfg.train.lr,
                      weight_decay=cfg.train.weight_decay, val_length=w.val_length,
                      layer=m.layer, crop_size=int(c.crop_size if cfg.data.source != "crops"
                                                   else raw_size), input_size=input_size,
                      normalization=c.normalization, channels=channels, seed=cfg.train.seed,
                      drop_rate=m.drop_rate)


def _write_embeddings(folder: Path, meta: pd.DataFrame, feats: np.ndarray, cols: list[str],
                      params: dict) -> None:
    """Every cell's embedding, one shard per plate, into the feature folder ``folder``. The
    checkpoint's checksum is one of the ``params``: a resumed training rewrites last.ckpt under
    the same name, and its embeddings must replace the earlier ones, not be taken as done."""
    writer = ShardWriter(folder, params, overwrite=True)

    def shard(rows, bar):  # the embeddings are computed: a shard is a plate's slice of them
        return pd.concat([meta.iloc[rows].reset_index(drop=True),
                          pd.DataFrame(feats[rows], columns=cols)], axis=1), []

    run_shards(plate_shards(meta[PLATE]), shard, writer)


def predict_labels(module, crops: np.ndarray, mean, std, batch_size: int = 256) -> np.ndarray:
    """Predicted class index per crop ``(N,)`` (the CNN head; no GRU, no augmentation)."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    out = RowBuffer(len(crops), np.int64)
    with torch.inference_mode():
        for i in range(0, len(crops), batch_size):
            x = (torch.from_numpy(crops[i:i + batch_size]) - m) / s
            out.add(module(x.to(module.device)).argmax(1).cpu().numpy())
    return out.result(np.zeros(0, np.int64))
