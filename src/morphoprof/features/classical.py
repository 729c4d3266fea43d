"""The classical baseline: CellProfiler measurements per segmented cell, via cp_measure.

Nuclei are segmented on the DNA channel (:mod:`morphoprof.preprocess.segmentation`), then measured
with cp_measure's CellProfiler-equivalent functions: shape (``sizeshape``, once per object) and,
for every channel, ``intensity``, ``texture`` and ``granularity`` (optionally ``zernike``,
``feret``, ``radial_distribution``). Rows are cells with the image set's ``Metadata_*`` columns, the
nucleus centre, and features named ``<label>_<channel>_<measurement>`` (``<label>_Nuclei_...``
for shape), written as Parquet shards like every other extractor's, so deep and classical
features are compared on the same cells.

Pixels are scaled to [0, 1] per channel with one experiment-wide range (as CellProfiler scales
by bit depth), because texture and granularity quantise intensities.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.features.shards import ShardWriter, shard_key
from morphoprof.index.schema import PLATE, ExperimentIndex
from morphoprof.preprocess.segmentation import (
    CENTER_X,
    CENTER_Y,
    OBJECT,
    NucleiConfig,
    dna_channel,
    object_table,
    segment_nuclei,
)

SHAPE_MEASUREMENTS = ("sizeshape", "zernike", "feret")
DEFAULT_MEASUREMENTS = ("sizeshape", "intensity", "texture", "granularity")


@dataclass
class ClassicalConfig:
    """Settings of the classical extractor."""

    measurements: tuple[str, ...] = DEFAULT_MEASUREMENTS
    label: str = "classical"
    channels: list[str] | None = None
    nuclei: NucleiConfig = field(default_factory=NucleiConfig)
    n_jobs: int = 1
    on_error: str = "fail"  # unreadable / non-finite image sets: fail, or skip (and list them)


def _cp_functions(names: Sequence[str]) -> dict:
    try:
        from cp_measure.bulk import get_core_measurements
    except ImportError as exc:  # pragma: no cover - a dependency
        raise InputError("the classical baseline needs cp_measure (pip install it)") from exc
    available = get_core_measurements()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InputError(f"unknown measurement(s) {unknown}; cp_measure offers {sorted(available)}")
    return {n: available[n] for n in names}


def measure_objects(
    image: np.ndarray,
    labels: np.ndarray,
    channels: Sequence[str],
    measurements: Sequence[str] = DEFAULT_MEASUREMENTS,
    label: str = "classical",
) -> pd.DataFrame:
    """CellProfiler measurements of every object of ``labels`` in a ``(C, H, W)`` image in [0, 1].

    Returns:
        One row per object (``Metadata_object`` = label id, ascending), float32 features.
    """
    import warnings

    funcs = _cp_functions(measurements)
    labels = np.asarray(labels, dtype=np.int32)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    cols: dict[str, np.ndarray] = {OBJECT: ids.astype(np.int64)}
    if len(ids) == 0:
        return pd.DataFrame(cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 for objects of one pixel, etc.
        for name, fn in funcs.items():
            if name in SHAPE_MEASUREMENTS:
                for key, v in fn(labels, image[0]).items():
                    cols[f"{label}_Nuclei_{key}"] = np.asarray(v, np.float32)
                continue
            for c, ch in enumerate(channels):
                for key, v in fn(labels, image[c]).items():
                    cols[f"{label}_{ch}_{key}"] = np.asarray(v, np.float32)
    n = len(ids)
    bad = [k for k, v in cols.items() if len(v) != n]
    if bad:
        raise InputError(f"cp_measure returned {bad[0]} for a different number of objects")
    return pd.DataFrame(cols)


def _process(index, rows, channels, dna, ranges, cfg: ClassicalConfig, illumination):
    meta_cols = [c for c in index.table.columns if c.startswith("Metadata_")]
    lo = np.array([r[0] for r in ranges], np.float32)[:, None, None]
    span = np.array([r[1] - r[0] for r in ranges], np.float32)[:, None, None]
    from morphoprof.images.dataset import ImageSetDataset

    frames, skipped = [], []
    data = ImageSetDataset(index, channels, rows, None, illumination, cfg.on_error)
    for i, img in data.arrays(skipped):
        labels = segment_nuclei(img[channels.index(dna)], cfg.nuclei)
        scaled = np.clip((img - lo) / span, 0.0, 1.0)
        feats = measure_objects(scaled, labels, channels, cfg.measurements, cfg.label)
        loc = object_table(labels)[[OBJECT, CENTER_X, CENTER_Y]]
        feats = loc.merge(feats, on=OBJECT, how="inner")
        meta = index.table.iloc[[i] * len(feats)][meta_cols].reset_index(drop=True)
        frames.append(pd.concat([meta, feats.reset_index(drop=True)], axis=1))
    return frames, skipped


class ClassicalExtractor:
    """Segment nuclei and measure them with cp_measure, plate by plate, into a feature folder."""

    def __init__(self, cfg: ClassicalConfig | None = None) -> None:
        self.cfg = cfg or ClassicalConfig()
        _cp_functions(self.cfg.measurements)

    def extract(self, index: ExperimentIndex, out: str | Path, illumination=None,
                overwrite: bool = False, progress: bool = True, log=print) -> dict:
        """Write one shard of per-cell classical features per plate; resumable like
        :meth:`morphoprof.features.transfer.TransferExtractor.extract`."""
        from joblib import Parallel, delayed
        from tqdm.auto import tqdm

        from morphoprof.features.transfer import estimate_intensity_range

        channels = list(self.cfg.channels or index.channels)
        index.validate(channels=channels, check_files=False, check_shapes=False)
        dna = dna_channel(channels)
        params = {"extractor": "classical", **asdict(self.cfg), "channels": channels,
                  "illumination": str(illumination.folder) if illumination else None,
                  "n_image_sets": len(index)}
        params.pop("n_jobs")
        params.pop("on_error")
        ranges = estimate_intensity_range(index, channels, (0.0, 99.99),
                                          illumination=illumination, on_error=self.cfg.on_error)
        params["intensity_ranges"] = [list(r) for r in ranges]
        writer = ShardWriter(out, params, overwrite=overwrite)
        groups = index.table.groupby(PLATE, sort=True).indices
        todo = [(shard_key(p, 0), np.sort(r)) for p, r in groups.items()
                if not writer.done(shard_key(p, 0))]
        n_todo = int(sum(len(r) for _, r in todo))
        bar = tqdm(total=n_todo, desc="classical features", unit="field", disable=not progress)
        t0, n_cells = time.perf_counter(), 0
        with Parallel(n_jobs=self.cfg.n_jobs) as pool:
            for key, rows in todo:
                chunks = np.array_split(rows, max(1, min(len(rows), 4 * self.cfg.n_jobs)))
                parts = pool(
                    delayed(_process)(index, c, channels, dna, ranges, self.cfg, illumination)
                    for c in chunks if len(c))
                frames = [f for part, _ in parts for f in part]
                skipped = [s for _, part in parts for s in part]
                df = (pd.concat(frames, ignore_index=True) if frames
                      else pd.DataFrame(columns=[c for c in index.table.columns
                                                 if c.startswith("Metadata_")]))
                writer.write(key, df, skipped)
                n_cells += len(df)
                bar.update(len(rows))
        bar.close()
        seconds = time.perf_counter() - t0
        return writer.finish({"out": str(out), "shards_written": len(todo), "image_sets": n_todo,
                              "cells": n_cells, "seconds": seconds,
                              "cells_per_s": n_cells / seconds if seconds > 0 and n_cells
                              else None}, self.cfg.on_error, log)
