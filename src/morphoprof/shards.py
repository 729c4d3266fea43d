"""Feature output as Parquet shards plus a manifest, so long runs resume and never half-write.

Layout of a feature folder::

    OUT/manifest.json            {"params": {...}, "shards": {key: {"file", "rows", "sha256"}}}
    OUT/shards/<key>.parquet     Metadata_* columns, then feature columns

A shard is written to a temporary name and renamed; the manifest is rewritten (atomically) after
each shard. A re-run with the same parameters skips the shards already in the manifest (when the
file is there with its recorded SHA-256; otherwise the shard is recomputed); a re-run
with different parameters is refused unless the folder is cleared. :func:`run_shards` is the one
loop every sharded stage runs, in process or on Dask.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphoprof.distributed import dask_client
from morphoprof.errors import InputError
from morphoprof.io_utils import (
    file_digest,
    frame_digest,
    read_parquet,
    write_json,
    write_parquet,
)
from morphoprof.logs import progress_bar

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# the files a sharded stage writes beside shards/ (extract --format adds the AnnData)
STAGE_FILES = (MANIFEST, "run_summary.json", "features.h5ad", "features.zarr")


def shard_key(*parts: object) -> str:
    """A file-name-safe shard key from plate names, chunk numbers..."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(p)) for p in parts)


def plate_shards(plates: pd.Series, min_rows: int = 1, max_rows: int | None = None,
                 min_shards: int = 8) -> list[tuple[str, np.ndarray]]:
    """The shard plan of a stage that writes a shard per plate: ``[(key, rows)]``.

    Args:
        plates: ``(N,)`` the plate of each row (an index's ``Metadata_plate`` column).
        min_rows: consecutive plates (in sorted order) of fewer rows are packed into one shard
            until it holds at least this many (key ``<first>-to-<last>``). A Parquet file of
            thousands of feature columns costs ~50 ms of CPU to write, whatever its rows
            (arrow sets up a writer per column): a 22-field plate would pay 2-3 ms per field
            for it, as much as reading the field, beside ~35 core-ms of network.
        max_rows: a plate of more rows is split into shards of this many (keys
            ``<plate>-0``, ``<plate>-1``...); None: never split.
        min_shards: packing stops at ``len(plates) / min_shards`` rows, so a small screen
            still makes about this many shards: work for every worker of a cluster (one Dask
            task per shard) and a resume that does not start over.

    Returns:
        Shards in plate order, each ``(key, sorted row positions (int64))``; a plate of
        ``min_rows`` or more, not split, has the key ``<plate>-0``.
    """
    if min_rows < 1 or min_shards < 1 or (max_rows is not None and max_rows < 1):
        raise InputError(f"shard sizes must be >= 1, got min {min_rows}, max {max_rows}, "
                         f"min_shards {min_shards}")
    min_rows = min(min_rows, max(1, -(-len(plates) // min_shards)))
    plan: list[tuple[str, np.ndarray]] = []
    pack: list[tuple[object, np.ndarray]] = []

    def flush() -> None:
        if pack:
            key = (shard_key(pack[0][0], 0) if len(pack) == 1
                   else shard_key(pack[0][0], "to", pack[-1][0]))
            plan.append((key, np.sort(np.concatenate([r for _, r in pack])).astype(np.int64)))
            pack.clear()

    plates = pd.Series(np.asarray(plates))
    for plate, rows in plates.groupby(plates, sort=True).indices.items():
        rows = np.sort(rows).astype(np.int64)
        if len(rows) >= min_rows:
            flush()
            step = max_rows or len(rows)
            plan += [(shard_key(plate, k // step), rows[k : k + step])
                     for k in range(0, len(rows), step)]
            continue
        if max_rows is not None and sum(len(r) for _, r in pack) + len(rows) > max_rows:
            flush()
        pack.append((plate, rows))
        if sum(len(r) for _, r in pack) >= min_rows:
            flush()
    flush()
    return plan


class ShardWriter:
    """Write feature shards into ``out`` and keep its manifest.

    Args:
        out: the feature folder.
        params: everything that determines the features (model, weights, sizes...); a folder
            holding shards made with other params is refused.
        overwrite: clear a folder made with other params instead of refusing.
    """

    def __init__(self, out: str | Path, params: dict, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.params = json.loads(json.dumps(params))  # normalise tuples etc. for comparison
        manifest = self.out / MANIFEST
        self.shards: dict[str, dict] = {}
        self.recomputed: list[str] = []  # finished shards found damaged: computed again
        self.metadata: dict = {}  # {"digest", "columns"} of the annotations in the shards
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved.get("params") != self.params:
                if not overwrite:
                    raise InputError(
                        f"{self.out} was made with other parameters "
                        f"({describe_changes(saved.get('params', {}), self.params)}); use "
                        "another output folder or --overwrite"
                    )
                self._clear()
            else:
                # a listed shard counts as done only if its file is there with its checksum
                # (a file replaced or damaged since is recomputed)
                for k, v in saved.get("shards", {}).items():
                    path = self.out / v["file"]
                    if not path.is_file():
                        self.recomputed.append(f"{path}: missing since the last run")
                    elif file_digest(path) != v.get("sha256"):
                        self.recomputed.append(f"{path}: changed since the last run (its "
                                               "SHA-256 differs from the manifest's)")
                    else:
                        self.shards[k] = v
                self.metadata = saved.get("metadata", {})
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        # temporary files of a run that was killed before it could rename them (one run per
        # folder at a time: a second run would also remove the first one's)
        for stale in [*self.out.glob(".*.tmp-*"), *(self.out / "shards").glob(".*.tmp-*")]:
            stale.unlink(missing_ok=True)

    def _clear(self) -> None:
        """Remove what a sharded stage wrote in the folder (:data:`STAGE_FILES`, ``shards/``)
        and nothing else: ``--overwrite`` on a folder that also holds a user's own files (an
        ``--out`` given by mistake) keeps them."""
        shutil.rmtree(self.out / "shards", ignore_errors=True)
        for name in STAGE_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def done(self, key: str) -> bool:
        """Whether shard ``key`` was finished by an earlier run."""
        return key in self.shards

    def write(self, key: str, df: pd.DataFrame, skipped: list | None = None,
              notes: dict | None = None) -> Path:
        """Write one shard atomically and record it in the manifest, with the inputs it
        ``skipped`` (``[{"row", "reason"}]``) and the stage's ``notes`` about it (JSON)."""
        info = write_shard(self.out, key, df)
        self.record(key, {**info, "skipped": skipped or [], "notes": notes or {}})
        return self.out / info["file"]

    def record(self, key: str, info: dict) -> None:
        """Record a shard written by :func:`write_shard` (e.g. on a cluster worker)."""
        self.shards[key] = {k: info[k] for k in ("file", "rows", "sha256")}
        for extra in ("skipped", "notes"):
            if info.get(extra):
                self.shards[key][extra] = info[extra]
        self._save()

    def notes(self, key: str) -> dict:
        """The notes a finished shard was recorded with (``{}`` if none)."""
        return self.shards[key].get("notes", {})

    def skipped(self) -> list[dict]:
        """Every input skipped by the shards in the manifest (this run's and earlier runs')."""
        return [s for info in self.shards.values() for s in info.get("skipped", [])]

    def finish(self, run: ShardRun, on_error: str, *, image_sets: int | None = None,
               cells: int | None = None, dropped_at_edge: int | None = None) -> RunSummary:
        """The :class:`RunSummary` of ``run`` (the counts a stage reports: ``image_sets``,
        ``cells``, ``dropped_at_edge``), with the on-error policy and every skipped input (this
        run's and earlier runs'); each skip is logged as a warning and the summary written as
        ``run_summary.json`` in the folder."""
        skipped = self.skipped()
        for s in skipped:
            logger.warning("skipped %s", s["reason"])
        for r in self.recomputed:
            logger.warning("shard %s: recomputed", r)
        summary = RunSummary(str(self.out), run.shards_written, run.shards_skipped, run.seconds,
                             on_error, image_sets=image_sets, cells=cells,
                             dropped_at_edge=dropped_at_edge, skipped=tuple(skipped),
                             shards_recomputed=tuple(self.recomputed))
        write_json(self.out / "run_summary.json", summary.to_json())
        return summary

    def refresh_metadata(self, meta: pd.DataFrame, key: Sequence[str]) -> int:
        """Bring the annotations of the finished shards up to date with ``meta`` (one row per
        ``key``: the index's ``Metadata_*`` columns) where they changed since the shards were
        written (a corrected MoA, a plate map joined again), instead of computing the shards
        again: each shard's annotation columns are replaced by ``meta``'s, joined on ``key``,
        in ``meta``'s order, before the stage's own columns. Returns the shards rewritten."""
        now = {"digest": frame_digest(meta)[:16], "columns": [str(c) for c in meta.columns]}
        if self.metadata == now:
            return 0
        stale = list(self.shards) if self.metadata else []  # none recorded: a new folder
        for k in stale:
            df = with_metadata(read_parquet(self.out / self.shards[k]["file"]), meta, key,
                               drop=self.metadata["columns"])
            self.shards[k] = {**self.shards[k], **{
                f: v for f, v in write_shard(self.out, k, df).items() if f != "key"}}
        if stale:
            changed = sorted(set(now["columns"]) ^ set(self.metadata["columns"])) or [
                "their values"]
            logger.info("the index's annotations changed since the last run (%s): %d "
                        "finished shard(s) updated", ", ".join(changed[:5]), len(stale))
        self.metadata = now
        self._save()
        return len(stale)

    def _save(self) -> None:
        write_json(self.out / MANIFEST, {"params": self.params, "shards": self.shards,
                                         **({"metadata": self.metadata} if self.metadata
                                            else {})})


def with_metadata(df: pd.DataFrame, meta: pd.DataFrame, key: Sequence[str],
                  drop: Sequence[str] = ()) -> pd.DataFrame:
    """``df`` with the annotations ``meta`` (one row per ``key``, e.g. an index's
    ``Metadata_*`` columns) joined on ``key`` in place of its own copies of them and of the
    columns ``drop`` (annotations no longer in ``meta``): ``meta``'s columns first, in its
    order, then ``df``'s others, as a stage writing ``df`` from ``meta`` lays them out."""
    key = list(key)
    own = [c for c in df.columns if c not in meta.columns and c not in drop and c not in key]
    fresh = df[key].merge(meta, on=key, how="left", validate="many_to_one")
    return pd.concat([fresh[list(meta.columns)].reset_index(drop=True),
                      df[own].reset_index(drop=True)], axis=1)


def write_shard(out: str | Path, key: str, df: pd.DataFrame) -> dict:
    """Write ``df`` as shard ``key`` of the feature folder ``out`` (atomically) and return its
    manifest entry ``{"key", "file", "rows", "sha256"}``; the manifest itself is not touched."""
    rel = f"shards/{key}.parquet"
    path = write_parquet(Path(out) / rel, df)
    digest = file_digest(path)
    return {"key": key, "file": rel, "rows": int(len(df)), "sha256": digest}


def describe_changes(a: dict, b: dict) -> str:
    """The keys whose values differ from ``a`` to ``b``, for a refusal: ``k: old -> new``,
    sorted, the first 5 (``, ...`` after them when there are more); ``?`` when none."""
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    text = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:5]) or "?"
    return text + (", ..." if len(keys) > 5 else "")


def shard_files(folder: str | Path) -> list[Path]:
    """The shard files of a feature folder, in manifest order. Raises InputError naming the
    folder when it has no manifest, the manifest lists no shards, or a listed shard is missing."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{folder} is not a feature folder (no {MANIFEST})")
    shards = json.loads(manifest.read_text()).get("shards", {})
    if not shards:
        raise InputError(f"{folder}: the manifest lists no shards")
    files = []
    for key, info in shards.items():
        path = folder / info["file"]
        if not path.is_file():
            raise InputError(f"{folder}: shard {key} is listed but {path} is missing")
        files.append(path)
    return files


def read_features(folder: str | Path) -> pd.DataFrame:
    """Concatenate a feature folder's shards (in manifest order) into one DataFrame.

    Also accepts a single Parquet file. Raises InputError naming the folder when it has no
    manifest or a shard is missing.
    """
    folder = Path(folder)
    if folder.is_file():
        return read_parquet(folder)
    return pd.concat([read_parquet(f) for f in shard_files(folder)], ignore_index=True)


def feature_columns(df: pd.DataFrame) -> list[str]:
    """All non-metadata columns (cytomining convention: metadata columns start ``Metadata_``)."""
    return [c for c in df.columns if not c.startswith("Metadata_")]


def not_a_feature(source: str | Path, columns: Sequence[str], kind: str) -> str:
    """The message for feature columns (``columns``, the first named) of ``source`` that hold
    ``kind`` values (a pandas or Arrow type name; strings are called text), not numbers."""
    kind = "text" if kind in ("object", "string", "large_string", "str") else kind
    more = f" (and {len(columns) - 1} more)" if len(columns) > 1 else ""
    return (f"{source}: column {columns[0]!r}{more} holds {kind}, not numbers, so it cannot be "
            "a feature (metadata columns are named 'Metadata_...'; is this a feature table?)")


def require_numeric_features(df: pd.DataFrame, source: str | Path,
                             exclude: Sequence[str] = ()) -> None:
    """InputError naming ``source`` and the column where one of ``df``'s
    :func:`feature_columns` (but ``exclude``) is not numeric or boolean (a path or a label
    without the ``Metadata_`` prefix, or a table that is not profiles at all)."""
    dtypes = df.dtypes[[c for c in feature_columns(df) if c not in exclude]]
    bad = [c for c, d in dtypes.items()
           if not (pd.api.types.is_numeric_dtype(d) or pd.api.types.is_bool_dtype(d))]
    if bad:
        raise InputError(not_a_feature(source, bad, str(dtypes[bad[0]])))


@dataclass(frozen=True)
class ShardRun:
    """What one :func:`run_shards` call did.

    Attributes:
        shards_written: shards computed and written by this call.
        shards_skipped: shards of the plan an earlier run had finished (not computed again).
        items: plan items (image sets, cells...) of the shards written: the sum of
            ``len(payload)``.
        rows: table rows written (items minus those skipped or without objects, plus one per
            object where a shard has several rows per item).
        seconds: wall time of the loop, s.
        skipped: this call's skipped inputs, ``{"row", "reason"}`` each.
    """

    shards_written: int
    shards_skipped: int
    items: int
    rows: int
    seconds: float
    skipped: tuple[dict, ...] = ()


def _rate(n: int | None, seconds: float) -> float | None:
    return n / seconds if n and seconds > 0 else None


@dataclass(frozen=True)
class RunSummary:
    """What a run of a sharded stage (feature extraction, crop export) did; the folder's
    ``run_summary.json`` is its :meth:`to_json`.

    Attributes:
        out: the folder written.
        shards_written, shards_skipped: shards computed by this run / finished by an earlier
            one (not computed again).
        seconds: wall time of the shard loop, s.
        on_error: the policy for unreadable inputs (``fail`` / ``skip``).
        image_sets: image sets (fields) this run computed; None for runs over cells.
        cells: cells (table rows) this run wrote; None for runs that write one row per field.
        dropped_at_edge: crop export only: cells whose box left the field.
        skipped: every skipped input of the folder (this run's and earlier runs'),
            ``{"row", "reason"}`` each.
        shards_recomputed: finished shards found missing or changed, computed again.
        anndata: the folder also written as one AnnData file (``extract --format``), or None.
    """

    out: str
    shards_written: int
    shards_skipped: int
    seconds: float
    on_error: str
    image_sets: int | None = None
    cells: int | None = None
    dropped_at_edge: int | None = None
    skipped: tuple[dict, ...] = ()
    shards_recomputed: tuple[str, ...] = ()
    anndata: str | None = None

    @property
    def fields_per_s(self) -> float | None:
        """Image sets per second of this run (None when it computed none)."""
        return _rate(self.image_sets, self.seconds)

    @property
    def cells_per_s(self) -> float | None:
        """Cells per second of this run (None when it wrote none)."""
        return _rate(self.cells, self.seconds)

    @property
    def n_skipped(self) -> int:
        """How many inputs the folder's runs skipped."""
        return len(self.skipped)

    def to_json(self) -> dict:
        """``run_summary.json``: the fields (those that are None left out) and the rates."""
        out: dict[str, Any] = {"out": self.out, "shards_written": self.shards_written,
                               "shards_skipped": self.shards_skipped, "seconds": self.seconds}
        if self.image_sets is not None:
            out |= {"image_sets": self.image_sets, "fields_per_s": self.fields_per_s}
        if self.cells is not None:
            out |= {"cells": self.cells, "cells_per_s": self.cells_per_s}
        if self.dropped_at_edge is not None:
            out["dropped_at_edge"] = self.dropped_at_edge
        out |= {"on_error": self.on_error, "n_skipped": self.n_skipped,
                "skipped": list(self.skipped), "shards_recomputed": list(self.shards_recomputed)}
        if self.anndata is not None:
            out["anndata"] = self.anndata
        return out


def run_shards(
    plan: Sequence[tuple[str, Any]],
    shard_fn: Callable[..., tuple[pd.DataFrame, list[dict]]],
    writer: ShardWriter,
    scheduler: str | None = None,
    *,
    shared: dict | None = None,
    prepare: Callable[[Any], Any] | None = None,
    desc: str = "shards",
    unit: str = "item",
) -> ShardRun:
    """Compute and write every shard of ``plan`` that ``writer`` has not finished yet.

    Args:
        plan: ``[(key, payload)]`` in output order; ``len(payload)`` is the shard's size in
            progress units (e.g. an array of index rows).
        shard_fn: ``shard_fn(payload, bar, **shared) -> (table, skipped)``: the shard's
            DataFrame and its skipped inputs (``[{"row", "reason"}]``), optionally a third
            item: notes about the shard (a JSON-able dict, e.g. data warnings) kept in the
            manifest for :meth:`ShardWriter.notes`, so a resumed run still reports them.
            ``bar`` is the run's tqdm bar (``None`` on a Dask worker); it may advance it inside
            a shard, and the loop sets it to the shard's end afterwards. With ``prepare`` it
            also gets ``ahead=``.
        writer: the feature folder's :class:`ShardWriter`.
        scheduler: ``local:N`` or a Dask scheduler address (see :mod:`morphoprof.distributed`):
            one task per shard, each written by its worker; ``shard_fn`` and ``shared`` must
            pickle (``shared`` is sent to every worker once).
        shared: keyword arguments of every ``shard_fn`` call.
        prepare: in process, ``prepare(payload)`` is called for the next shard before the
            current one is computed (e.g. to start reading its images) and handed to
            ``shard_fn`` as ``ahead=``; an unused result with a ``close()`` is closed on error.
        desc, unit: the progress bar (shown unless progress is off,
            :func:`morphoprof.logs.set_progress`).

    "resuming" and the Dask dashboard are announced in this module's log.

    In process, a shard is written (Parquet encoding, checksum, manifest) in a thread while the
    next one is computed, one write at a time, so the manifest grows in plan order; the shards
    finished before an error stay recorded, and a re-run resumes after them.

    Returns:
        A :class:`ShardRun`.
    """
    shared = shared or {}
    todo = [(key, payload) for key, payload in plan if not writer.done(key)]
    if len(todo) < len(plan):
        logger.info("resuming: %d of %d shards already done", len(plan) - len(todo), len(plan))
    items = int(sum(len(payload) for _, payload in todo))
    bar = progress_bar(total=items, desc=desc, unit=unit)
    t0 = time.perf_counter()
    try:
        if scheduler:
            rows, skipped = _run_on_dask(todo, shard_fn, writer, scheduler, shared, bar)
        else:
            rows, skipped = _run_in_process(todo, shard_fn, writer, shared, prepare, bar)
    finally:
        bar.close()
    return ShardRun(len(todo), len(plan) - len(todo), items, rows, time.perf_counter() - t0,
                    tuple(skipped))


def _run_in_process(todo, shard_fn, writer: ShardWriter, shared: dict, prepare, bar
                    ) -> tuple[int, list[dict]]:
    rows, skipped, done = 0, [], 0
    ahead = prepare(todo[0][1]) if prepare and todo else None
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        try:
            for k, (key, payload) in enumerate(todo):
                kwargs = dict(shared)
                if prepare:
                    kwargs["ahead"], ahead = ahead, (prepare(todo[k + 1][1])
                                                     if k + 1 < len(todo) else None)
                df, shard_skipped, *notes = shard_fn(payload, bar, **kwargs)
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write, key, df, shard_skipped, *notes)
                rows += len(df)
                skipped += shard_skipped
                done += len(payload)
                bar.update(done - bar.n)
            if pending is not None:
                pending.result()
        finally:
            if hasattr(ahead, "close"):
                ahead.close()
    return rows, skipped


def _remote_shard(key: str, payload, shard_fn, out: str, **shared) -> dict:
    """Dask task: one shard computed and written (atomically) by the worker."""
    df, skipped, *notes = shard_fn(payload, None, **shared)
    return {**write_shard(out, key, df), "skipped": list(skipped), "items": len(payload),
            "notes": notes[0] if notes else {}}


def _run_on_dask(todo, shard_fn, writer: ShardWriter, scheduler: str, shared: dict, bar
                 ) -> tuple[int, list[dict]]:
    from distributed import as_completed

    rows, skipped = 0, []
    with dask_client(scheduler) as client:
        logger.info("Dask: %d shards on %s", len(todo), client.dashboard_link or scheduler)
        if not todo:
            return rows, skipped
        scattered = {k: client.scatter(v, broadcast=True, hash=False) for k, v in shared.items()}
        run = uuid.uuid4().hex[:8]
        futures = [client.submit(_remote_shard, key, payload, shard_fn, str(writer.out),
                                 **scattered, key=f"morphoprof-{run}-{key}", pure=False)
                   for key, payload in todo]
        try:
            for fut in as_completed(futures):
                info = fut.result()
                writer.record(info["key"], info)
                rows += info["rows"]
                skipped += info["skipped"]
                bar.update(info["items"])
        except BaseException:  # a failing task stops the run; finished shards stay recorded
            client.cancel(futures)
            raise
    return rows, skipped
