"""The feature extraction stage of ``morphoprof extract``, callable from Python: whole fields
with any registered extractor, single-cell crops around segmented nuclei, or crops a user
already has, each with a registered extractor or a model trained by ``train weak``.

:func:`morphoprof.pipeline.extract_features` is the narrower step ``run`` takes (whole fields,
settings from the config's ``features`` section).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from morphoprof.errors import InputError, OutputError, os_reason
from morphoprof.index.schema import ExperimentIndex
from morphoprof.io_utils import read_input_parquet
from morphoprof.models.weak_run import load_crop_array
from morphoprof.preprocess.crops import CELL_TABLE_COLUMNS
from morphoprof.profiles.anndata_io import write_anndata
from morphoprof.registry import create_extractor
from morphoprof.shards import RunSummary, read_features

# batch size of cells and crops: a crop is ~50x fewer pixels than a field, so the fields'
# batches of 16 would leave the network idle
CROP_BATCH_SIZE = 256


def extract_stage(out: str | Path, *, index: ExperimentIndex | None = None,
                  cells: str | Path | None = None, crops: str | Path | None = None,
                  crop_table: str | Path | None = None, extractor: str = "transfer",
                  settings: Mapping | None = None, checkpoint: str | Path | None = None,
                  crop_size: int | None = None, normalization: str | None = None,
                  controls: Sequence[str] = ("DMSO",), illumination=None,
                  scheduler: str | None = None, overwrite: bool = False,
                  fmt: Literal["parquet", "h5ad", "zarr"] = "parquet") -> RunSummary:
    """Extract features into the feature folder ``out``; returns the run's
    :class:`~morphoprof.shards.RunSummary`.

    The input is one of:

    - ``index``: whole fields, one row per image set (``classical``: per segmented cell);
    - ``index`` and ``cells`` (a cell table from ``segment``): a ``crop_size`` px crop around
      each cell (default: the extractor's, or the checkpoint's), one row per cell;
    - ``crops``: a crop folder from ``morphoprof crops``, or an ``.npz`` holding ``crops``
      with its ``crop_table`` (``controls``: compounds that mark control cells), one row per
      crop.

    ``extractor`` names a registered extractor (:mod:`morphoprof.registry`) built from
    ``settings`` (its settings' keys); ``checkpoint`` instead embeds with a ``train weak``
    model (its channels, crop size, normalisation and embedding layer; ``settings`` keys
    ``layer``, ``batch_size``, ``device``, ``num_workers``, ``precision`` apply).
    ``batch_size`` absent or None: :data:`CROP_BATCH_SIZE` for cells and crops, the
    extractor's own for fields. ``normalization``: per-crop (default ``max``, or the
    checkpoint's). ``fmt`` ``h5ad`` / ``zarr`` also writes the folder as one AnnData
    (``out/features.<fmt>``).
    """
    settings = dict(settings or {})
    if settings.get("batch_size") is None:  # by input
        settings.pop("batch_size", None)
        if cells is not None or crops is not None:
            settings["batch_size"] = CROP_BATCH_SIZE
    if crops is not None:  # read (and checked) before any model is built
        arrays = load_crop_array(crops, crop_table, settings.get("channels"), list(controls))
    elif index is None:
        raise InputError("extraction needs an index (fields, or cells with a cell table) or "
                         "crops")
    if extractor == "classical":  # measures the nuclei it segments itself: no model, no cells
        if checkpoint is not None:
            raise InputError("the classical extractor measures cells, it embeds nothing: give "
                             "no checkpoint")
        summary = _classical(out, index, arrays if crops is not None else None, settings,
                             illumination, overwrite)
        return write_features_anndata(out, fmt, summary)
    model, crop_size, normalization = _model(extractor, settings, checkpoint, crop_size,
                                             normalization,
                                             arrays[0] if crops is not None else None, crops)
    # crop settings given (or the checkpoint's); the others are the extractor's own defaults
    given = {k: v for k, v in (("size", crop_size), ("normalization", normalization)) if v}
    if crops is not None:
        x, table, names = arrays
        summary = model.extract_crops(x, table, names, out, overwrite=overwrite,
                                      **{k: v for k, v in given.items() if k != "size"})
    elif cells is not None:
        table = read_input_parquet(cells, "cell table", require=CELL_TABLE_COLUMNS)
        summary = model.extract_cells(index, table, out, illumination=illumination,
                                      overwrite=overwrite, **given)
    else:
        summary = model.extract(index, out, overwrite=overwrite, illumination=illumination,
                                scheduler=scheduler)
    return write_features_anndata(out, fmt, summary)


def _classical(out, index, arrays, settings: dict, illumination, overwrite: bool
               ) -> RunSummary:
    """The classical extractor on fields (``index``) or on crops (``arrays``)."""
    if arrays is not None:
        x, table, names = arrays
        return create_extractor("classical", {**settings, "channels": names}).extract_crops(
            x, table, names, out, overwrite=overwrite)
    return create_extractor("classical", settings).extract(
        index, out, illumination=illumination, overwrite=overwrite)


def _model(extractor: str, settings: dict, checkpoint, crop_size, normalization, crops,
           crops_path) -> tuple:
    """(the embedding model, crop size, normalisation): a registered extractor, or a weak
    checkpoint with its own crop settings (the crops must match its size)."""
    if checkpoint is None:
        return create_extractor(extractor, settings), crop_size, normalization
    from morphoprof.models.weak import extractor_from_checkpoint

    model, hp = extractor_from_checkpoint(checkpoint, settings.get("layer"),
                                          settings.get("batch_size", CROP_BATCH_SIZE),
                                          settings.get("device"), settings.get("num_workers", 0),
                                          precision=settings.get("precision", "auto"))
    channels = settings.get("channels")
    if channels and list(channels) != hp["channels"]:
        raise InputError(f"{checkpoint} was trained on channels {hp['channels']}, not "
                         f"{list(channels)}")
    if crops is not None and crops.shape[-1] != hp["crop_size"]:
        raise InputError(f"{crops_path}: crops are {crops.shape[-1]} px; {checkpoint} was "
                         f"trained on {hp['crop_size']} px crops")
    return model, crop_size or hp["crop_size"], normalization or hp["normalization"]


def write_features_anndata(folder: str | Path, fmt: str, summary: RunSummary) -> RunSummary:
    """With ``fmt`` ``h5ad`` / ``zarr``, write the feature folder as one AnnData
    (``folder/features.<fmt>``: written whole, then renamed) and return ``summary`` with its
    path as ``anndata``; ``parquet``: ``summary`` as it is."""
    if fmt == "parquet":
        return summary

    target = Path(folder) / f"features.{fmt}"
    tmp = target.with_name(f".{target.name}.tmp")
    _discard(tmp)  # left by a killed run
    try:
        write_anndata(tmp, read_features(folder), fmt)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(target, os_reason(exc)) from exc
    finally:  # a part-written file would hold the space a rerun needs (10 MB of 16 here)
        _discard(tmp)
    return replace(summary, anndata=str(target))


def _discard(path: Path) -> None:
    """Remove ``path``, a file (``.h5ad``) or a folder (``.zarr``), where it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
