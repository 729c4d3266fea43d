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

import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from morphoprof.errors import InputError, outcome
from morphoprof.extras import require
from morphoprof.features.transfer import estimate_intensity_range
from morphoprof.index.schema import IMAGE_SET_KEY, PLATE, ExperimentIndex
from morphoprof.machine import resolve_jobs
from morphoprof.preprocess.segmentation import (
    CENTER_X,
    CENTER_Y,
    OBJECT,
    NucleiConfig,
    dna_channel,
    object_table,
    segment_nuclei,
)
from morphoprof.registry import register_extractor, settings_for
from morphoprof.settings import ON_ERROR_DEFAULT, OnError, Settings
from morphoprof.shards import RunSummary, ShardRun, ShardWriter, plate_shards, run_shards

SHAPE_MEASUREMENTS = ("sizeshape", "zernike", "feret")
DEFAULT_MEASUREMENTS = ("sizeshape", "intensity", "texture", "granularity")


class ClassicalConfig(Settings):
    """Settings of the classical extractor (the ``features`` section's ``measurements`` with
    ``extractor: classical``; the nuclei come from ``preprocess.segmentation``)."""

    measurements: tuple[str, ...] = Field(DEFAULT_MEASUREMENTS, strict=False,
                                          description="cp_measure measurement families")
    label: str = Field("classical", description="prefix of the feature columns")
    channels: list[str] | None = Field(None, description="stains to measure (default: all)")
    nuclei: NucleiConfig = Field(default_factory=NucleiConfig, description="how nuclei are "
                                 "segmented")
    n_jobs: int = Field(1, ge=0, description="worker processes (0: one per usable core)")
    on_error: OnError = Field(
        ON_ERROR_DEFAULT,
        description="unreadable / non-finite image sets: fail, or skip (and list them)")


def _cp_functions(names: Sequence[str]) -> dict:
    require("cp_measure")
    from cp_measure.bulk import get_core_measurements

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
    from morphoprof.preprocess.fields import ImageSetDataset

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


def central_nucleus_mask(dna: np.ndarray) -> np.ndarray:
    """The nucleus a crop is centred on: ``(S, S)`` DNA intensities -> ``(S, S)`` int32 mask
    (1 on the nucleus, 0 elsewhere).

    Otsu threshold of the crop, connected components, and the component under the centre pixel
    (else the one nearest to it); all zeros when the crop has no intensity range."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    dna = np.asarray(dna, np.float32)
    if not np.isfinite(dna).all() or float(dna.max() - dna.min()) <= 0:
        return np.zeros(dna.shape, np.int32)
    comp, n = ndi.label(dna > threshold_otsu(dna))
    if n == 0:
        return np.zeros(dna.shape, np.int32)
    cy, cx = dna.shape[0] // 2, dna.shape[1] // 2
    pick = comp[cy, cx]
    if pick == 0:  # the centre fell on background: the nearest foreground pixel's component
        _, (iy, ix) = ndi.distance_transform_edt(comp == 0, return_indices=True)
        pick = comp[iy[cy, cx], ix[cy, cx]]
    return (comp == pick).astype(np.int32)


def _crop_rows(crops, rows, meta, channels, dna, lo, span, cfg: ClassicalConfig):
    """Features of crops ``rows`` (one nucleus each) after their ``meta`` rows, and the rows
    without a nucleus."""
    frames, skipped = [], []
    for r in rows:
        x = np.clip((np.asarray(crops[r], np.float32) - lo) / span, 0.0, 1.0)
        mask = central_nucleus_mask(x[dna])
        if not mask.any():
            skipped.append({"row": int(r), "reason": f"crop {int(r)}: no nucleus above the "
                            f"Otsu threshold of channel {channels[dna]}"})
            continue
        f = measure_objects(x, mask, channels, cfg.measurements, cfg.label)
        frames.append(pd.concat([meta.iloc[[r]].reset_index(drop=True), f.drop(columns=OBJECT)],
                                axis=1))
    return frames, skipped


class ClassicalExtractor:
    """Segment nuclei and measure them with cp_measure, plate by plate, into a feature folder."""

    def __init__(self, cfg: ClassicalConfig | None = None) -> None:
        self.cfg = cfg or ClassicalConfig()
        _cp_functions(self.cfg.measurements)

    def _plates(self, writer: ShardWriter, plates: pd.Series, job, empty: pd.DataFrame,
                desc: str, unit: str) -> ShardRun:
        """One shard per plate not yet in ``writer``: ``job(rows) -> (frames, skipped)`` over
        chunks of the plate's rows (``plates``: the plate of each row) in ``n_jobs``
        processes, the frames concatenated (``empty`` when there are none)."""
        from joblib import Parallel, delayed

        n_jobs = resolve_jobs(self.cfg.n_jobs)

        def shard(rows, bar, pool):
            chunks = np.array_split(rows, max(1, min(len(rows), 4 * n_jobs)))
            parts = []
            for part, error in pool(delayed(outcome)(job, c) for c in chunks if len(c)):
                if error is not None:  # the first in row order, whichever worker failed first
                    raise error
                parts.append(part)
            frames = [f for part, _ in parts for f in part]
            skipped = [s for _, part in parts for s in part]
            return (pd.concat(frames, ignore_index=True) if frames else empty), skipped

        with Parallel(n_jobs=n_jobs) as pool:
            return run_shards(plate_shards(plates), shard, writer, shared={"pool": pool},
                              desc=desc, unit=unit)

    def extract(self, index: ExperimentIndex, out: str | Path, illumination=None,
                overwrite: bool = False) -> RunSummary:
        """Write one shard of per-cell classical features per plate; resumable like
        :meth:`morphoprof.features.transfer.TransferExtractor.extract`."""
        channels = list(self.cfg.channels or index.channels)
        index.validate(channels=channels, check_files=False, check_shapes=False)
        dna = dna_channel(channels)
        params = {"extractor": "classical", **self.cfg.model_dump(), "channels": channels,
                  "illumination": str(illumination.folder) if illumination else None,
                  "n_image_sets": len(index), "index": index.digest(images_only=True)}
        params.pop("n_jobs")
        params.pop("on_error")
        ranges = estimate_intensity_range(index, channels, (0.0, 99.99),
                                          illumination=illumination, on_error=self.cfg.on_error)
        params["intensity_ranges"] = [list(r) for r in ranges]
        writer = ShardWriter(out, params, overwrite=overwrite)
        writer.refresh_metadata(index.metadata(), IMAGE_SET_KEY)
        job = partial(_process, index, channels=channels, dna=dna, ranges=ranges, cfg=self.cfg,
                      illumination=illumination)
        empty = pd.DataFrame(columns=[c for c in index.table.columns if c.startswith("Metadata_")])
        run = self._plates(writer, index.table[PLATE], job, empty,
                           "classical features", "field")
        return writer.finish(run, self.cfg.on_error, image_sets=run.items, cells=run.rows)

    def extract_crops(self, crops: np.ndarray, table: pd.DataFrame, channels: Sequence[str],
                      out: str | Path, overwrite: bool = False) -> RunSummary:
        """Classical features of crops a user already has, one nucleus per crop.

        Args:
            crops: ``(N, C, S, S)`` raw intensities, one cell centred in each.
            table: one row per crop (``Metadata_*`` and ``Nuclei_Location*`` columns kept).
            channels: names of the C channels; the DNA one (:func:`dna_channel`) is segmented.

        The nucleus is the Otsu-thresholded object at each crop's centre
        (:func:`central_nucleus_mask`); pixels are scaled to [0, 1] with one range per channel
        over the whole crop set (percentiles 0 and 99.99 of a sample, as for fields), then
        measured with cp_measure like nuclei of fields. Crops without a nucleus are left out
        and listed as skipped. One shard per plate, resumable, the folder ``extract`` writes.
        """
        channels = list(channels)
        if crops.ndim != 4 or crops.shape[1] != len(channels):
            raise InputError(f"crops must be (N, {len(channels)}, S, S) for channels {channels}, "
                             f"got {crops.shape}")
        if len(crops) != len(table):
            raise InputError(f"{len(crops)} crops but {len(table)} table rows")
        dna = channels.index(dna_channel(channels))
        sample = np.asarray(crops[np.linspace(0, len(crops) - 1, min(len(crops), 2000))
                                  .astype(int)], np.float32)
        lo = np.array([np.percentile(sample[:, c], 0.0) for c in range(len(channels))],
                      np.float32)[:, None, None]
        hi = np.array([np.percentile(sample[:, c], 99.99) for c in range(len(channels))],
                      np.float32)[:, None, None]
        span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
        params = {"extractor": "classical_crops", "measurements": list(self.cfg.measurements),
                  "label": self.cfg.label, "channels": channels, "size": int(crops.shape[-1]),
                  "n_cells": len(crops), "intensity_ranges": [[float(a), float(b)] for a, b in
                                                              zip(lo.ravel(), hi.ravel())]}
        writer = ShardWriter(out, params, overwrite=overwrite)
        meta = table[[c for c in table.columns
                      if str(c).startswith(("Metadata_", "Nuclei_Loc"))]]
        job = partial(_crop_rows, crops, meta=meta, channels=channels, dna=dna, lo=lo, span=span,
                      cfg=self.cfg)
        run = self._plates(writer, table[PLATE], job, meta.iloc[:0],
                           "classical crop features", "cell")
        return writer.finish(run, "skip", cells=run.rows)


@register_extractor("classical")
def _build(settings) -> ClassicalExtractor:
    """``classical``: the :class:`ClassicalConfig` keys of ``settings``."""
    return ClassicalExtractor(settings_for(ClassicalConfig, settings))
