"""Fixed-size single-cell crops centred on nuclei (Caicedo et al. 2018), with an edge policy,
optional masking of neighbouring cells and per-crop intensity normalisation.

- :func:`crop_cells`: crops of one image set, ``(N, C, S, S)`` float32.
- :class:`CropDataset`: a streaming torch Dataset over (image set, cell) pairs; each worker keeps
  the last decoded image set, so cells sorted by image set cost one read per field.
- :func:`export_crops`: crops to compressed ``.npz`` shards plus a Parquet table, resumable.
"""

from __future__ import annotations

import json
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from morphoprof.errors import InputError
from morphoprof.images.read import image_shape as header_shape
from morphoprof.images.read import read_image_set
from morphoprof.index.schema import IMAGE_SET_KEY, ExperimentIndex
from morphoprof.io_utils import frame_digest, load_array_file, read_parquet, write_npz_chunks
from morphoprof.prefetch import Prefetched
from morphoprof.preprocess.segmentation import (
    CENTER_X,
    CENTER_Y,
    OBJECT,
    dna_channel,
    segment_nuclei,
)
from morphoprof.settings import Settings, check_on_error
from morphoprof.shards import RunSummary, ShardWriter, run_shards

NORMALIZATIONS = ("none", "max", "percentile")
EDGE_POLICIES = ("pad", "skip")


def normalize_crops(crops: np.ndarray, method: str = "max",
                    percentiles: tuple[float, float] = (1.0, 99.0),
                    copy: bool = True) -> np.ndarray:
    """Per-crop, per-channel intensity normalisation of ``(N, C, S, S)`` crops.

    ``max`` divides each channel by its maximum (Caicedo 2018's best); ``percentile`` maps the
    low / high percentiles to 0 / 1 and clips; ``none`` leaves intensities as they are.
    ``copy=False`` normalises float32 ``crops`` in place (and returns them).
    """
    if method not in NORMALIZATIONS:
        raise InputError(f"crop normalization must be one of {NORMALIZATIONS}, got {method!r}")
    if method == "max" and len(crops):
        # the peaks in the crops' own type, then converted and divided in one float32 pass
        # (the numbers of converting first: the conversion is exact or monotonic)
        peak = crops.max(axis=(2, 3), keepdims=True)
        peak = np.where(peak > 0, peak, 1).astype(np.float32)
        inplace = not copy and crops.dtype == np.float32
        out = crops if inplace else np.empty(crops.shape, np.float32)
        return np.divide(crops, peak, out=out, dtype=np.float32)
    x = crops.astype(np.float32, copy=copy)
    if method == "percentile" and len(x):
        flat = x.reshape(*x.shape[:2], -1)
        lo, hi = np.percentile(flat, percentiles, axis=2)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        x = np.clip((x - lo[..., None, None]) / span[..., None, None], 0.0, 1.0)
    return x


def crop_boxes(centers_xy: np.ndarray, size: int) -> np.ndarray:
    """Top-left corners ``(N, 2)`` as (row, col) of ``size`` boxes centred on (x, y) points."""
    c = np.asarray(centers_xy, dtype=np.float64).reshape(-1, 2)
    return np.column_stack([np.round(c[:, 1]) - size // 2, np.round(c[:, 0]) - size // 2]).astype(
        np.int64
    )


def crop_cells(
    image: np.ndarray,
    centers_xy: np.ndarray,
    size: int = 96,
    edge: str = "pad",
    labels: np.ndarray | None = None,
    object_ids: Sequence[int] | None = None,
    normalization: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``size`` x ``size`` crops centred on each cell.

    Args:
        image: ``(C, H, W)`` image set.
        centers_xy: ``(N, 2)`` nucleus centres, x (column) then y (row), px.
        size: crop side, px.
        edge: ``pad`` (zeros outside the image) or ``skip`` (drop crops not fully inside).
        labels: ``(H, W)`` object labels; with ``object_ids``, pixels of *other* objects are set
            to 0 in each crop (masking of neighbouring cells).
        object_ids: the label of each cell in ``labels``.
        normalization: see :func:`normalize_crops`.

    Returns:
        ``(crops (M, C, size, size) float32, kept (M,) indices into the N cells)``.
    """
    if edge not in EDGE_POLICIES:
        raise InputError(f"edge policy must be one of {EDGE_POLICIES}, got {edge!r}")
    if image.ndim != 3:
        raise InputError(f"crop_cells expects a (C, H, W) image, got shape {image.shape}")
    c, h, w = image.shape
    boxes = crop_boxes(centers_xy, size)
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 0] + size <= h) & (
        boxes[:, 1] + size <= w
    )
    kept = np.flatnonzero(inside) if edge == "skip" else np.arange(len(boxes))
    masking = labels is not None and object_ids is not None
    # np.empty, not np.zeros: only the boxes that leave the image are zeroed (a fresh zeroed
    # array costs a page fault per 4 KiB on first touch, as much as the copies themselves)
    out = np.empty((len(kept), c, size, size), np.float32)
    for k, (r, q) in enumerate(boxes[kept].tolist()):
        # The part of the box inside the image; the rest is 0 (zero padding).
        r0, q0, r1, q1 = max(r, 0), max(q, 0), min(r + size, h), min(q + size, w)
        if (r0, q0, r1, q1) != (r, q, r + size, q + size):
            out[k] = 0
            if r0 >= r1 or q0 >= q1:
                continue
        win = out[k][:, r0 - r : r1 - r, q0 - q : q1 - q]
        win[:] = image[:, r0:r1, q0:q1]
        if masking:
            own = labels[r0:r1, q0:q1]
            win[:, (own != 0) & (own != object_ids[kept[k]])] = 0
    return normalize_crops(out, normalization, copy=False), kept


#: what a cell table needs for its crops to be cut: the image set and the nucleus centre (px)
CELL_TABLE_COLUMNS = [*IMAGE_SET_KEY, CENTER_X, CENTER_Y]


class CropDataset:
    """A torch-compatible Dataset of single-cell crops, one item per row of a cell table.

    Items are ``(crop, k)``: a ``(C, size, size)`` float32 tensor and the cell's row position in
    ``cells``. With ``edge="skip"`` the cells whose box leaves the image are dropped up front
    (``self.cells`` holds the kept rows). Picklable for DataLoader workers; each worker caches the
    last image set it decoded.

    ``mask_neighbours`` (a :class:`~morphoprof.preprocess.segmentation.NucleiConfig`, the one the
    cell table was made with) re-segments each image set once and blanks the pixels of the other
    nuclei in every crop; the cell table must then carry ``Metadata_object``.

    ``on_error``: ``fail`` raises on an unreadable image set or one with NaN / infinite pixels
    (naming the row and file); ``skip`` serves ``(None, k, message)`` for each of its cells
    instead, which :func:`~morphoprof.preprocess.fields.collate_skipping` drops and reports.
    ``self.kept``: the positions in ``cells`` of the rows served (all but the ones
    ``edge="skip"`` drops).
    """

    def __init__(
        self,
        index: ExperimentIndex,
        cells: pd.DataFrame,
        size: int = 96,
        channels: Sequence[str] | None = None,
        edge: str = "pad",
        normalization: str = "max",
        illumination=None,
        image_shape: tuple[int, int] | None = None,
        mask_neighbours=None,
        on_error: str = "fail",
    ) -> None:
        self.index = index
        self.channels = list(channels or index.channels)
        self.size = int(size)
        self.edge = edge
        self.normalization = normalization
        self.illumination = illumination
        self.mask_neighbours = mask_neighbours
        check_on_error(on_error)
        self.on_error = on_error
        need = CELL_TABLE_COLUMNS + ([OBJECT] if mask_neighbours else [])
        missing = [c for c in need if c not in cells.columns]
        if missing:
            raise InputError(f"cell table lacks column(s) {missing}")
        key = index.table[IMAGE_SET_KEY].astype(str).agg("|".join, axis=1)
        pos = pd.Series(np.arange(len(index)), index=key.to_numpy())
        ckey = cells[IMAGE_SET_KEY].astype(str).agg("|".join, axis=1)
        unknown = ~ckey.isin(pos.index)
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise InputError(f"cell table row {i}: image set {ckey.iloc[i]} is not in the index")
        rows = pos[ckey.to_numpy()].to_numpy()
        self.kept = np.arange(len(cells))
        if edge == "skip":
            h, w = image_shape or header_shape(index.paths(0, self.channels)[0],
                                               index.frames(0, self.channels)[0])
            boxes = crop_boxes(cells[[CENTER_X, CENTER_Y]].to_numpy(), self.size)
            ok = (boxes >= 0).all(1) & (boxes[:, 0] + size <= h) & (boxes[:, 1] + size <= w)
            cells, rows, self.kept = cells[ok], rows[ok], self.kept[ok]
        self.cells = cells.reset_index(drop=True)
        self.rows = rows
        self.centers = self.cells[[CENTER_X, CENTER_Y]].to_numpy(np.float64)
        self.objects = self.cells[OBJECT].to_numpy(np.int64) if mask_neighbours else None
        self._cached: tuple[int, np.ndarray, np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.cells)

    def image(self, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The (illumination-corrected) image set at index row ``row`` and, when masking, its
        nucleus labels; cached."""
        if self._cached is None or self._cached[0] != row:
            img = read_image_set(self.index, row, self.channels, self.illumination)
            labels = None
            if self.mask_neighbours is not None:
                dna = self.channels.index(dna_channel(self.channels))
                labels = segment_nuclei(img[dna], self.mask_neighbours)
            self._cached = (row, img, labels)
        return self._cached[1], self._cached[2]

    def crops(self, ks: np.ndarray) -> np.ndarray:
        """The crops of items ``ks`` (positions), ``(len(ks), C, size, size)`` float32, as
        ``self[k]`` gives them one at a time, cut with one :func:`crop_cells` call per run of
        cells of the same image set (cells sorted by image set: one call per field, not per
        cell). An unreadable image set raises."""
        ks = np.asarray(ks, dtype=np.intp)
        out = np.empty((len(ks), len(self.channels), self.size, self.size), np.float32)
        rows = self.rows[ks]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(ks) else []
        for a, b in zip(starts, [*starts[1:], len(ks)]):
            img, labels = self.image(int(rows[a]))
            sel = ks[a:b]
            out[a:b] = crop_cells(img, self.centers[sel], self.size, "pad", labels=labels,
                                  object_ids=None if labels is None else self.objects[sel],
                                  normalization=self.normalization)[0]
        return out

    def __getitem__(self, k: int):
        import torch

        try:
            img, labels = self.image(int(self.rows[k]))
        except InputError as exc:
            if self.on_error == "skip":
                return None, k, str(exc)
            raise
        ids = None if labels is None else self.objects[k : k + 1]
        crop, _ = crop_cells(img, self.centers[k : k + 1], self.size, "pad", labels=labels,
                             object_ids=ids, normalization=self.normalization)
        return torch.from_numpy(crop[0]), k


class CropConfig(Settings):
    """Settings of :func:`export_crops` (``morphoprof crops``' options)."""

    size: int = Field(96, ge=1, description="crop side, px")
    edge: Literal["pad", "skip"] = Field("pad", description="cells near the border: zero-pad "
                                         "the crop, or leave the cell out")
    normalization: Literal["none", "max", "percentile"] = Field(
        "none", description="per-crop intensity normalisation")


def cell_table_identity(cells: pd.DataFrame, index: ExperimentIndex
                        ) -> tuple[str, pd.DataFrame | None]:
    """What identifies the cells of a per-cell run, and what may change under it.

    Returns:
        ``(digest, annotations)``: a digest of everything but the cell table's copy of the
        index's annotations (the image-set key, object ids, centres, sizes: what the crops are
        cut from), and those annotations, one row per image set (``IMAGE_SET_KEY`` and the
        index's other ``Metadata_*`` columns the table holds), which a finished run brings up
        to date (:meth:`~morphoprof.shards.ShardWriter.refresh_metadata`) instead of cutting
        and embedding the cells again when a label is corrected. Without the key columns
        (refused later by :class:`CropDataset`), the digest of the whole table and None.
    """
    key = list(IMAGE_SET_KEY)
    if not set(key) <= set(cells.columns):
        return frame_digest(cells)[:16], None
    cols = [c for c in index.metadata().columns if c in cells.columns]
    labels = [c for c in cols if c not in key]
    return (frame_digest(cells.drop(columns=labels))[:16],
            cells[cols].drop_duplicates(subset=key, ignore_index=True))


#: cells cut per piece of a crop shard (27 MB of float16 at 96 px and 3 stains)
CROP_CHUNK = 500


def export_crops(
    index: ExperimentIndex,
    cells: pd.DataFrame,
    out: str | Path,
    settings: CropConfig | None = None,
    channels: Sequence[str] | None = None,
    illumination=None,
    shard_size: int = 5000,
    overwrite: bool = False,
) -> RunSummary:
    """Write crops (``settings``: size, edge, normalization; default :class:`CropConfig`) to
    ``out/shards/<k>.npz`` (``crops`` (n, C, S, S) float16, compressed) with a Parquet table
    per shard (the cells' metadata, centres, and ``Metadata_crop_index``, the row inside the
    npz). Resumable: finished shards are skipped on a re-run with the same settings, index
    and cells; a folder made with others is refused, or with ``overwrite`` cleared.

    Returns:
        The :class:`~morphoprof.shards.RunSummary` (``cells``: crops this run wrote;
        ``dropped_at_edge``; shards reused from an earlier run), also the folder's
        ``run_summary.json``.
    """
    s = settings or CropConfig()
    ds = CropDataset(index, cells.sort_values(IMAGE_SET_KEY, kind="stable"), s.size, channels,
                     s.edge, s.normalization, illumination)
    cells_digest, annotations = cell_table_identity(cells, index)
    params = {"kind": "crops", "size": s.size, "channels": ds.channels, "edge": s.edge,
              "normalization": s.normalization, "n_cells": len(ds), "cells": cells_digest,
              "index": index.digest(images_only=True), "illumination": illumination is not None}
    writer = ShardWriter(out, params, overwrite=overwrite)
    if annotations is not None:  # a corrected label: written into the finished shards
        writer.refresh_metadata(annotations, IMAGE_SET_KEY)

    def shard(cells_k: range, bar) -> tuple[pd.DataFrame, list]:
        key = f"{cells_k.start // shard_size:05d}"
        # cut in a thread, CROP_CHUNK cells at a time, while the last piece is deflated: the
        # two overlap (zlib releases the GIL), and a shard is never held whole in float32
        starts = range(cells_k.start, cells_k.stop, CROP_CHUNK)
        pieces = Prefetched(
            ds.crops(np.arange(a, min(a + CROP_CHUNK, cells_k.stop))).astype(np.float16)
            for a in starts)
        try:
            write_npz_chunks(Path(out) / "shards" / f"{key}.npz", "crops",
                             (len(cells_k), len(ds.channels), s.size, s.size), np.float16,
                             pieces, compressed=True)
        finally:
            pieces.close()
        table = ds.cells.iloc[cells_k.start:cells_k.stop].reset_index(drop=True).copy()
        table["Metadata_crop_index"] = np.arange(len(table))
        table["Metadata_crop_file"] = f"shards/{key}.npz"
        return table, []

    plan = [(f"{start // shard_size:05d}", range(start, min(start + shard_size, len(ds))))
            for start in range(0, len(ds), shard_size)]
    run = run_shards(plan, shard, writer, desc="cropping cells", unit="cell")
    return writer.finish(run, "fail", cells=run.items, dropped_at_edge=int(len(cells) - len(ds)))


class CropShards:
    """The crops of an :func:`export_crops` folder as an ``(N, C, S, S)`` array-like in their
    stored type (float16), read from disk as they are indexed: a shard is decompressed when
    one of its rows is first asked for and the last two are kept, so extracting a screen's
    crops holds a shard at a time, not all of them (2 M cells of 96 px are 110 GB as float16).

    Indexing with an int, a slice, an int array or a boolean mask gives a numpy array, as
    numpy's own indexing would; ``np.asarray`` reads every crop. It pickles without its cache
    (worker processes read their own shards).
    """

    _KEEP = 2  # shards kept decompressed

    def __init__(self, files: Sequence[Path], shard: np.ndarray, local: np.ndarray,
                 crop_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._files, self._shard, self._local = list(files), shard, local
        self.shape = (len(shard), *crop_shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = _positions(key, len(self))
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        shards = self._shard[rows]
        for k in np.unique(shards):
            sel = shards == k
            out[sel] = self._read(int(k))[self._local[rows[sel]]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        every = self[:]
        return every if dtype is None else every.astype(dtype)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _cache={}, _lock=threading.Lock())

    def _read(self, k: int) -> np.ndarray:
        """Shard ``k``'s crops (every one in its npz), kept among the last :attr:`_KEEP`."""
        with self._lock:
            if k not in self._cache:
                npz = self._files[k]
                try:
                    with load_array_file(npz) as z:
                        arr = z["crops"]
                except Exception as exc:  # deleted or cut short since the folder was opened
                    raise InputError(f"cannot read crop shard {npz}: {exc}") from exc
                while len(self._cache) >= self._KEEP:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[k] = arr
            return self._cache[k]


def _positions(key, n: int) -> np.ndarray:
    """The row positions ``np.arange(n)[key]`` selects (a slice, a boolean mask, integers,
    negative ones counted from the end), without building ``np.arange(n)``."""
    if isinstance(key, slice):
        return np.arange(*key.indices(n))
    key = np.asarray(key)
    if key.dtype == bool:
        if key.shape != (n,):
            raise IndexError(f"boolean index of shape {key.shape} for {n} crops")
        return np.flatnonzero(key)
    rows = key.astype(np.intp, copy=False).ravel()
    if len(rows) and (rows.min() < -n or rows.max() >= n):
        raise IndexError(f"crop index out of range for {n} crops")
    return np.where(rows < 0, rows + n, rows)


def _npz_header(npz: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and type of the ``crops`` array of a crop shard, from its header alone."""
    try:
        with zipfile.ZipFile(npz) as zf, zf.open("crops.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read crop shard {npz}: {exc}") from exc
    if len(shape) != 4:
        raise InputError(f"crop shard {npz} holds crops of shape {shape}, not (n, C, S, S)")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def load_crop_shards(folder: str | Path) -> tuple[CropShards, pd.DataFrame, list[str]]:
    """Every crop of an :func:`export_crops` folder, in manifest order.

    Returns:
        ``(crops, table (N rows: the cells' metadata and centres), channel names)``; ``crops``
        is a :class:`CropShards`, ``(N, C, S, S)`` in the stored type, read from disk as it is
        indexed. The shards' tables and the headers of their arrays are read here: a shard
        listed in the manifest but missing or unreadable, or a table row pointing past its
        shard's crops, is an error naming it.
    """
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{folder}: not a crop folder (no manifest.json; write one with "
                         f"morphoprof crops)")
    try:
        meta = json.loads(manifest.read_text())
        params, shards = meta["params"], meta["shards"]
    except (ValueError, KeyError) as exc:
        raise InputError(f"{manifest}: not a morphoprof manifest ({exc})") from exc
    if params.get("kind") != "crops":
        raise InputError(f"{folder} holds {params.get('kind', 'features')!r} shards, not crops")
    files, tables, locals_, headers = [], [], [], set()
    for key in sorted(shards):
        table_path = folder / shards[key]["file"]
        npz = table_path.with_suffix(".npz")
        try:
            table = read_parquet(table_path)
        except Exception as exc:  # missing file, bad Parquet
            raise InputError(f"cannot read crop shard {table_path}: {exc}") from exc
        shape, dtype = _npz_header(npz)
        rows = table["Metadata_crop_index"].to_numpy()
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
            bad = int(np.flatnonzero((rows < 0) | (rows >= shape[0]))[0])
            raise InputError(f"{table_path} row {bad}: crop {rows[bad]} is outside the "
                             f"{shape[0]} crops of {npz}")
        headers.add((shape[1:], dtype))
        files.append(npz)
        locals_.append(rows)
        tables.append(table.drop(columns=["Metadata_crop_index", "Metadata_crop_file"],
                                 errors="ignore"))
    if not files:
        raise InputError(f"{folder}: the crop folder holds no shards")
    if len(headers) > 1:
        raise InputError(f"{folder}: its shards hold crops of different shapes or types "
                         f"{sorted(map(str, headers))}")
    (crop_shape, dtype), = headers
    shard = np.concatenate([np.full(len(r), k, np.int32) for k, r in enumerate(locals_)])
    crops = CropShards(files, shard, np.concatenate(locals_).astype(np.intp), crop_shape, dtype)
    return crops, pd.concat(tables, ignore_index=True), list(params.get("channels") or [])
