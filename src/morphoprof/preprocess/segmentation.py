"""Nuclei segmentation on the DNA channel: Otsu threshold, distance-transform watershed to split
touching nuclei, size filters, optional clearing of border objects (as in Caicedo et al. 2018,
after CellProfiler's IdentifyPrimaryObjects).

The cell table (one row per nucleus) carries the image set's ``Metadata_*`` columns plus
``Metadata_object`` (label id), ``Nuclei_Location_Center_X/Y`` (px, column / row of the centroid),
``Nuclei_AreaShape_Area`` (px) and the bounding box ``Nuclei_AreaShape_BoundingBox{Minimum,
Maximum}_{X,Y}`` (half-open, px). DeepProfiler's location CSVs are read and written too.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field

from morphoprof.errors import InputError, MorphoprofError, pool_results
from morphoprof.images.read import read_planes
from morphoprof.index.schema import IMAGE_SET_KEY, PLATE, SITE, WELL, ExperimentIndex
from morphoprof.io_utils import (
    atomic_path,
    check_writable,
    frame_digest,
    json_fields,
    parquet_notes,
    read_parquet,
    write_parquet,
)
from morphoprof.machine import resolve_jobs
from morphoprof.settings import Settings, check_on_error
from morphoprof.shards import ShardWriter, run_shards, shard_key, with_metadata

CENTER_X = "Nuclei_Location_Center_X"
CENTER_Y = "Nuclei_Location_Center_Y"
AREA = "Nuclei_AreaShape_Area"
BBOX = [
    "Nuclei_AreaShape_BoundingBoxMinimum_Y",
    "Nuclei_AreaShape_BoundingBoxMinimum_X",
    "Nuclei_AreaShape_BoundingBoxMaximum_Y",
    "Nuclei_AreaShape_BoundingBoxMaximum_X",
]
OBJECT = "Metadata_object"
logger = logging.getLogger(__name__)
SHARD_FIELDS = 64  # image sets per resumable part of segment_index (~4 s of BBBC021 fields)
_NOTE = "morphoprof.segmentation"  # the cell table's Parquet note: settings and summary


class NucleiConfig(Settings):
    """Settings of :func:`segment_nuclei` (pixel units): the ``preprocess.segmentation``
    section of a run config, the options of ``morphoprof segment``."""

    smoothing: float = Field(1.0, ge=0, description="Gaussian sigma before thresholding, px")
    threshold_scale: float = Field(1.0, gt=0, description="multiply Otsu's threshold by this "
                                   "(below 1: dimmer nuclei kept)")
    min_area: int = Field(30, ge=0, description="smaller objects are dropped, px")
    max_area: int = Field(5000, ge=1, description="larger objects are dropped, px")
    min_distance: int = Field(5, ge=1, description="px between watershed seeds (about a "
                              "nucleus radius)")
    clear_border: bool = Field(False, description="drop nuclei touching the border")
    fill_holes: bool = Field(True, description="fill holes inside each nucleus")
    downsample: int = Field(1, ge=1, description="segment a block-averaged copy at 1/N "
                            "resolution (2: 4x fewer pixels); labels upsampled")


class NucleiSection(NucleiConfig):
    """Nuclei segmentation of a screen: the :class:`NucleiConfig`, the channel segmented and the
    threads (``morphoprof segment``'s options; a weak config's ``cells.segmentation``)."""

    channel: str | None = Field(None, description="DNA channel (default: DNA / DAPI / Hoechst)")
    n_jobs: int = Field(0, ge=0, description="parallel jobs: threads for segmentation, "
                        "processes for the classical extractor's measurements (0: one per "
                        "usable core)")

    def nuclei(self) -> NucleiConfig:
        """The :class:`NucleiConfig` part (what :func:`segment_nuclei` reads)."""
        return self.project(NucleiConfig)


def image_quality(plane: np.ndarray, path: object = "") -> list[str]:
    """Problems of a DNA plane that make segmentation meaningless; empty when fine.

    NaN / infinite pixels raise InputError naming ``path``; a blank (constant) image or one mostly
    saturated is reported as a warning string.
    """
    plane = np.asarray(plane)
    if plane.dtype.kind == "f" and not np.isfinite(plane).all():  # integers always are
        raise InputError(f"{path}: image holds NaN or infinite pixels")
    warnings = []
    lo, hi = float(plane.min()), float(plane.max())
    if hi - lo <= 0:
        warnings.append(f"{path}: blank image (constant value {lo:g}); no nuclei")
    elif hi > 0 and (saturated := np.count_nonzero(plane == hi) / plane.size) > 0.25:
        warnings.append(f"{path}: {100 * saturated:.0f}% of pixels saturated at {hi:g}")
    return warnings


def segment_nuclei(dna: np.ndarray, cfg: NucleiConfig | None = None) -> np.ndarray:
    """Segment nuclei in one DNA image.

    Args:
        dna: ``(H, W)`` intensities (any units; illumination-corrected is better).
        cfg: thresholds and sizes, in full-resolution pixels (also with ``downsample``).

    Returns:
        ``(H, W)`` int32 label image, 0 = background, objects numbered 1..N
        (in the order of their seeds, highest distance-map peak first).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    cfg = cfg or NucleiConfig()
    img = np.asarray(dna, dtype=np.float32)
    if img.ndim != 2:
        raise InputError(f"segment_nuclei expects a 2-D image, got shape {img.shape}")
    f = int(cfg.downsample)
    if f > 1:
        # Segment at lower resolution with sizes scaled to match, then upsample the labels.
        h, w = img.shape
        low = _segment_downsampled(img, cfg)
        hs, ws = low.shape
        up = np.broadcast_to(low[:, None, :, None], (hs, f, ws, f)).reshape(hs * f, ws * f)
        return up[:h, :w]
    if img.max() - img.min() <= 0:
        return np.zeros(img.shape, np.int32)
    smooth = ndi.gaussian_filter(img, cfg.smoothing) if cfg.smoothing else img
    # Otsu's threshold from a 1-in-4 pixel sample (the histogram is the same to within noise).
    sample = smooth[::2, ::2] if smooth.size > 250_000 else smooth
    mask = smooth > threshold_otsu(sample) * cfg.threshold_scale
    if cfg.fill_holes:
        # Holes = background components that do not touch the image border.
        bg, n_bg = ndi.label(~mask)
        edge = np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]])
        hole = np.ones(n_bg + 1, bool)
        hole[edge] = False
        hole[0] = False
        mask |= hole[bg]
    comp, _ = ndi.label(mask)
    small = np.bincount(comp.ravel()) < cfg.min_area  # debris would seed spurious nuclei
    small[0] = False
    mask &= ~small[comp]
    if not mask.any():
        return np.zeros(img.shape, np.int32)
    # Octagonal chamfer distance (mean of chessboard and city-block): ~8x faster than the exact
    # Euclidean transform and, once smoothed, as good for placing one seed per nucleus.
    dist = 0.5 * (ndi.distance_transform_cdt(mask, metric="chessboard")
                  + ndi.distance_transform_cdt(mask, metric="taxicab")).astype(np.float32)
    # Seeds: maxima of the smoothed distance map at least min_distance apart.
    dist_s = ndi.gaussian_filter(dist, 1.0)
    peaks = local_maxima(dist_s, max(int(cfg.min_distance), 1), threshold=1.0)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist_s, markers, mask=mask)
    return keep_objects(labels, cfg.min_area, cfg.max_area, cfg.clear_border)


def keep_objects(labels: np.ndarray, min_area: int, max_area: int,
                 clear_border: bool = False) -> np.ndarray:
    """The objects of a 2-D label image whose area (px) is within ``[min_area, max_area]`` and,
    with ``clear_border``, that do not touch the image's edge, renumbered 1..N in their order:
    ``skimage.segmentation.clear_border``, then the area filter, then the renumbering, in one
    look-up table (each label one connected object, as a watershed gives).

    Returns:
        ``(H, W)`` int32 labels.
    """
    areas = np.bincount(labels.ravel())
    keep = (areas >= min_area) & (areas <= max_area) & (areas > 0)
    keep[0] = False
    if clear_border:
        keep[labels[[0, -1], :]] = False
        keep[labels[:, [0, -1]]] = False
    lut = np.zeros(len(areas), np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def local_maxima(image: np.ndarray, min_distance: int, threshold: float) -> np.ndarray:
    """Peaks of a 2-D ``image``: the coordinates ``(N, 2)`` (row, col) that
    ``skimage.feature.peak_local_max(image, min_distance, threshold_abs=threshold,
    exclude_border=False)`` returns, in its order (highest first).

    A pixel is a peak where it equals the maximum of its ``2 * min_distance + 1`` square and
    exceeds ``threshold``; going down the peaks by height, each one kept drops the later ones
    closer than ``min_distance`` (Chebyshev). scikit-image's spacing step checks each peak's
    neighbours in a Python loop with a distance call; here the close pairs come from one k-d
    tree query and the loop runs only over peaks that have a close one (2.5x faster at
    BBBC021's 1/4 resolution, and most of it outside the GIL)."""
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    image_max = ndi.maximum_filter(image, size=2 * min_distance + 1, mode="nearest")
    peak = image == image_max
    if peak.all():  # a flat image has no peak
        return np.zeros((0, 2), np.intp)
    peak &= image > threshold
    coord = np.transpose(np.nonzero(peak))
    coord = coord[np.argsort(-image[peak], kind="stable")]
    if min_distance <= 1 or len(coord) < 2:
        return coord
    # pixel coordinates are integers: Chebyshev distance < min_distance <=> <= min_distance - 1
    pairs = cKDTree(coord).query_pairs(r=min_distance - 0.5, p=np.inf, output_type="ndarray")
    if not len(pairs):
        return coord
    pairs = np.sort(pairs, axis=1)  # (higher peak, lower peak)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    heads, starts, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    dropped = np.zeros(len(coord), bool)
    for i, a, n in zip(heads.tolist(), starts.tolist(), counts.tolist()):
        if not dropped[i]:
            dropped[pairs[a:a + n, 1]] = True
    return coord[~dropped]


def _segment_downsampled(img: np.ndarray, cfg: NucleiConfig) -> np.ndarray:
    """Labels of the ``cfg.downsample`` x ``cfg.downsample`` block means of a 2-D float32
    image (edge-padded to whole blocks), segmented with the sizes scaled to match: one label
    pixel per block."""
    f = int(cfg.downsample)
    h, w = img.shape
    hs, ws = -(-h // f), -(-w // f)
    if (hs * f, ws * f) != (h, w):
        img = np.pad(img, ((0, hs * f - h), (0, ws * f - w)), mode="edge")
    small = np.zeros((hs, ws), np.float32)
    for dy in range(f):  # block mean as f*f strided adds (faster than a 4-D reduction)
        for dx in range(f):
            small += img[dy::f, dx::f]
    small /= f * f
    scaled = cfg.replace(downsample=1, smoothing=cfg.smoothing / f,
                     min_area=max(int(cfg.min_area / f**2), 1),
                     max_area=max(int(cfg.max_area / f**2), 1),
                     min_distance=max(int(round(cfg.min_distance / f)), 1))
    return segment_nuclei(small, scaled)


def nuclei_table(dna: np.ndarray, cfg: NucleiConfig | None = None) -> pd.DataFrame:
    """``object_table(segment_nuclei(dna, cfg))``, the same numbers, without building the
    full-resolution label image when ``cfg.downsample`` > 1: the table is computed on the
    segmentation's own blocks, each weighted by the full-resolution pixels it stands for (4x
    fewer pixels at ``downsample=2``).

    Args:
        dna: ``(H, W)`` intensities.
        cfg: as for :func:`segment_nuclei`.

    Returns:
        The :func:`object_table` of the nuclei, in full-resolution pixels.
    """
    cfg = cfg or NucleiConfig()
    img = np.asarray(dna, dtype=np.float32)
    if int(cfg.downsample) <= 1 or img.ndim != 2:
        return object_table(segment_nuclei(img, cfg))
    return object_table(_segment_downsampled(img, cfg), block=int(cfg.downsample),
                        shape=img.shape)


def object_table(labels: np.ndarray, block: int = 1,
                 shape: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per labelled object: object id, centre x / y, area, bounding box (px).

    Works inside each object's bounding box (``find_objects``), so the cost follows the objects'
    area, not the image's.

    Args:
        labels: ``(h, w)`` label image.
        block: each label pixel stands for a ``block`` x ``block`` block of a full-resolution
            image of ``shape`` ``(H, W)`` (the last blocks cut at its edge), as
            :func:`segment_nuclei` upsamples its labels: the table is that of the upsampled
            labels, in full-resolution pixels.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    objects = ndi.find_objects(labels) if labels.size and labels.max() > 0 else []
    if block > 1:
        arr = _block_rows(labels, objects, block, shape)
    else:
        rows = []
        for k, sl in enumerate(objects):
            if sl is None:
                continue
            ys, xs = np.nonzero(labels[sl] == k + 1)
            rows.append((k + 1, xs.mean() + sl[1].start, ys.mean() + sl[0].start, len(ys),
                         sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
        arr = np.array(rows, dtype=np.float64).reshape(-1, 8)
    columns = {OBJECT: arr[:, 0].astype(np.int64), CENTER_X: arr[:, 1], CENTER_Y: arr[:, 2],
               AREA: arr[:, 3].astype(np.int64)}
    columns.update({col: arr[:, 4 + j].astype(np.int64) for j, col in enumerate(BBOX)})
    return pd.DataFrame(columns)  # built at once: a column at a time costs more than the rest


@functools.lru_cache(maxsize=8)
def _block_weights(hs: int, ws: int, block: int, h: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``(hs, ws)`` labels of ``block`` x ``block`` blocks of an ``(h, w)`` image: each
    label pixel's full-resolution pixel count, and that count times the mean row / column of
    its pixels (flat, float64, read-only). The same for every field of a screen: computed once
    per shape."""
    starts_y, starts_x = np.arange(hs) * block, np.arange(ws) * block
    n_y = np.clip(h - starts_y, 0, block)  # full-resolution rows / columns of each block
    n_x = np.clip(w - starts_x, 0, block)
    mid_y, mid_x = starts_y + (n_y - 1) / 2, starts_x + (n_x - 1) / 2
    weight = np.outer(n_y, n_x).astype(np.float64)
    out = (weight.ravel(), (weight * mid_y[:, None]).ravel(), (weight * mid_x[None, :]).ravel())
    for a in out:
        a.flags.writeable = False
    return out


def _block_rows(labels: np.ndarray, objects: list, block: int,
                shape: tuple[int, int] | None) -> np.ndarray:
    """:func:`object_table`'s numbers ``(N, 8)`` for labels at 1/``block`` resolution: every
    label pixel weighted by the full-resolution pixels of its block (fewer in the last row /
    column of blocks), all objects at once by weighted counts (the labels are small)."""
    hs, ws = labels.shape
    h, w = shape if shape is not None else (hs * block, ws * block)
    weight, weight_y, weight_x = _block_weights(hs, ws, block, h, w)
    flat, n = labels.ravel(), len(objects) + 1
    area = np.bincount(flat, weight, n)
    sum_y = np.bincount(flat, weight_y, n)
    sum_x = np.bincount(flat, weight_x, n)
    ids = np.array([k + 1 for k, sl in enumerate(objects) if sl is not None], np.int64)
    box = np.array([(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
                    for sl in objects if sl is not None], np.float64).reshape(-1, 4) * block
    box[:, 2] = np.minimum(box[:, 2], h)
    box[:, 3] = np.minimum(box[:, 3], w)
    return np.column_stack([ids, sum_x[ids] / area[ids], sum_y[ids] / area[ids], area[ids],
                            box])


def _segment_chunk(index: ExperimentIndex, rows: Sequence[int], channel: str, cfg: NucleiConfig,
                   illumination
                   ) -> list[tuple[int, pd.DataFrame | None, list[str], MorphoprofError | None]]:
    """Segment image sets ``rows``: per row (row, object table or None, warnings, the error
    that row raised, as raised: an unreadable file's :class:`ImageReadError`)."""
    out = []
    for i in rows:
        path = index.paths(int(i), [channel])[0]
        try:
            plane = read_planes([path], index.frames(int(i), [channel]), [channel])[0]
            warnings = image_quality(plane, path)  # on the file's own pixels (uint16: faster)
            dna = np.empty(plane.shape, np.float32)
            if illumination is not None:  # converted and corrected in one pass
                plate = index.table[PLATE].iloc[int(i)]
                illumination.apply(plane[None], plate, [channel], out=dna[None])
            else:
                dna[:] = plane
            out.append((int(i), nuclei_table(dna, cfg), warnings, None))
        except MorphoprofError as exc:
            out.append((int(i), None, [], exc))
    return out


@dataclass(frozen=True)
class SegmentationSummary:
    """What :func:`segment_index` did; the cell table's ``<stem>_summary.json`` is its
    :meth:`to_json`.

    Attributes:
        image_sets: image sets of the index.
        cells: rows of the cell table (nuclei found).
        image_sets_without_cells: image sets read where no nucleus was found.
        channel: the DNA channel segmented.
        config: the segmentation settings.
        warnings: data warnings (blank or saturated fields...), one line each.
        skipped: unreadable image sets left out under ``on_error="skip"``,
            ``{"file", "reason"}`` each.
    """

    image_sets: int
    cells: int
    image_sets_without_cells: int
    channel: str
    config: NucleiConfig
    warnings: tuple[str, ...] = ()
    skipped: tuple[dict, ...] = ()

    def to_json(self) -> dict:
        """The summary file: the fields, ``config`` as its settings."""
        return {**json_fields(self), "config": self.config.model_dump()}

    @classmethod
    def from_json(cls, d: dict) -> SegmentationSummary:
        """The summary :meth:`to_json` wrote."""
        return cls(int(d["image_sets"]), int(d["cells"]), int(d["image_sets_without_cells"]),
                   str(d["channel"]), NucleiConfig(**d["config"]), tuple(d["warnings"]),
                   tuple(d["skipped"]))

    def summary_line(self) -> str:
        """One line for the user: cells, image sets, empty and skipped ones, warnings."""
        return (f"{self.cells} cells in {self.image_sets} image sets "
                f"({self.image_sets_without_cells} without cells, {len(self.skipped)} skipped, "
                f"{len(self.warnings)} warnings)")


def segment_index(
    index: ExperimentIndex,
    out: str | Path,
    channel: str | None = None,
    cfg: NucleiConfig | None = None,
    illumination=None,
    on_error: str = "fail",
    n_jobs: int = 0,
    chunk: int = 4,
) -> SegmentationSummary:
    """Segment the nuclei of every image set and write one cell table (Parquet).

    The work is done in parts of :data:`SHARD_FIELDS` image sets, kept (with their warnings and
    skipped files) in ``<out>.parts/`` until the table is written: a run that was stopped
    resumes after the parts it finished when run again with the same index and settings (other
    settings start it over). The folder is removed once ``out`` is written. The table keeps
    the settings and the summary in its Parquet metadata, so a run with the same index and
    settings as the one that wrote it reuses it (e.g. ``morphoprof run`` again after a later
    stage failed) instead of segmenting again.

    Args:
        index: the experiment.
        out: the cell table to write (atomically, once every image set is done).
        channel: the DNA channel (default: the first of DNA / DAPI / Hoechst found, else the first).
        cfg: segmentation settings.
        illumination: an :class:`~morphoprof.preprocess.illumination.IlluminationCorrection`
            applied before segmenting, or None.
        on_error: ``fail`` (raise, naming the file) or ``skip`` (log and go on) for unreadable or
            NaN images.
        n_jobs: threads (joblib; 0: one per usable core), each segmenting ``chunk`` image sets
            at a time: reading, filtering and the watershed release the GIL, and threads start
            at once where worker processes would import the libraries again (80 BBBC021-size
            fields at 1/4 resolution: 0.9 s on 2 threads, 1.6 s on 2 processes).

    Returns:
        The :class:`SegmentationSummary`.
    """
    from joblib import Parallel

    check_on_error(on_error)
    cfg = cfg or NucleiConfig()
    channel = channel or dna_channel(index.channels)
    if channel not in index.channels:
        raise InputError(f"unknown channel {channel!r}; the index has {index.channels}")
    out = check_writable(out)
    meta_cols = [c for c in index.table.columns if c.startswith("Metadata_")]
    parts = out.with_name(out.name + ".parts")
    params = {"stage": "segment", "channel": channel, "nuclei": cfg.model_dump(),
              "on_error": on_error, "index": index.digest(images_only=True),
              "illumination": str(illumination.folder) if illumination is not None else None}
    earlier = _reuse(out, params, index)
    if earlier is not None:
        shutil.rmtree(parts, ignore_errors=True)  # left if a run stopped right after the table
        return earlier
    writer = ShardWriter(parts, params, overwrite=True)  # other settings: start over
    plan = [(shard_key("fields", f"{k:07d}"), np.arange(k, min(k + SHARD_FIELDS, len(index))))
            for k in range(0, len(index), SHARD_FIELDS)]
    with Parallel(n_jobs=resolve_jobs(n_jobs), return_as="generator", prefer="threads") as pool:
        run_shards(plan, _segment_shard, writer, desc="segmenting nuclei", unit="field",
                   shared={"index": index, "channel": channel, "cfg": cfg,
                           "illumination": illumination, "on_error": on_error,
                           "meta_cols": meta_cols, "chunk": chunk, "pool": pool})
    frames = [read_parquet(parts / writer.shards[key]["file"])
              for key, _ in plan if writer.shards[key]["rows"]]
    # parts of an earlier run carry the annotations the index had then
    cells = (with_metadata(pd.concat(frames, ignore_index=True), index.metadata(),
                           IMAGE_SET_KEY) if frames else _no_cells(meta_cols))
    notes = [writer.notes(key) for key, _ in plan]
    summary = SegmentationSummary(
        len(index), int(len(cells)), sum(n.get("without_cells", 0) for n in notes), channel,
        cfg, tuple(w for n in notes for w in n.get("warnings", [])), tuple(writer.skipped()))
    _write_cells(out, cells, params, summary, index)
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _write_cells(out: Path, cells: pd.DataFrame, params: dict, summary: SegmentationSummary,
                 index: ExperimentIndex) -> None:
    """The cell table, noting the settings, the summary and the annotations' digest."""
    write_parquet(out, cells, notes={_NOTE: json.dumps({
        "params": params, "summary": summary.to_json(),
        "annotations": frame_digest(index.metadata())[:16]})})


def _reuse(out: Path, params: dict, index: ExperimentIndex) -> SegmentationSummary | None:
    """The summary of ``out`` where :func:`segment_index` wrote it from these images with
    these ``params``, its annotations first brought up to date with ``index``'s; else None."""
    earlier = _finished(out, params)
    if earlier is None:
        return None
    summary, annotations = earlier
    logger.info("%s: segmented from the same images with the same settings; reused "
                "(delete it to segment again)", out)
    if annotations != frame_digest(index.metadata())[:16]:  # corrected since: updated
        _write_cells(out, with_metadata(read_parquet(out), index.metadata(), IMAGE_SET_KEY),
                     params, summary, index)
        logger.info("%s: the index's annotations changed since; updated", out)
    return summary


def _finished(out: Path, params: dict) -> tuple[SegmentationSummary, str | None] | None:
    """The summary of the cell table ``out`` and the digest of the annotations it holds,
    where it was written by :func:`segment_index` with these ``params`` (JSON-normalised),
    else None."""
    note = parquet_notes(out).get(_NOTE)
    try:
        record = json.loads(note) if note else {}
        if record.get("params") != json.loads(json.dumps(params)):
            return None
        return SegmentationSummary.from_json(record["summary"]), record.get("annotations")
    except (ValueError, KeyError, TypeError):  # a note of another version: segment again
        return None


def _segment_shard(rows: np.ndarray, bar, *, index: ExperimentIndex, channel: str,
                   cfg: NucleiConfig, illumination, on_error: str, meta_cols: list[str],
                   chunk: int, pool) -> tuple[pd.DataFrame, list[dict], dict]:
    """One part of :func:`segment_index` (:func:`~morphoprof.shards.run_shards`' shard): the
    cells of image sets ``rows`` (``Metadata_*`` columns first), the unreadable ones
    (``{"file", "reason"}``) and notes ``{"warnings", "without_cells"}``; ``pool`` is a
    joblib ``Parallel`` returning a generator."""
    from joblib import delayed

    tables, rows_of, skipped, warnings, empty = [], [], [], [], 0
    chunks = [rows[k : k + chunk] for k in range(0, len(rows), chunk)]
    jobs = (delayed(_segment_chunk)(index, c, channel, cfg, illumination) for c in chunks)
    with pool_results(pool(jobs)) as results:
        for result in results:
            for i, t, warn, error in result:
                warnings += warn
                if error is not None:
                    if on_error == "fail":  # the first in row order, as it was raised
                        raise error
                    skipped.append({"file": str(index.paths(i, [channel])[0]),
                                    "reason": str(error)})
                elif len(t):
                    tables.append(t)
                    rows_of.append(np.full(len(t), i))
                else:
                    empty += 1
            if bar is not None:
                bar.update(len(result))
    if not tables:
        return _no_cells(meta_cols), skipped, {"warnings": warnings, "without_cells": empty}
    # each cell's image-set metadata, joined once for the part
    meta = index.table[meta_cols].iloc[np.concatenate(rows_of)].reset_index(drop=True)
    cells = pd.concat([meta, pd.concat(tables, ignore_index=True)], axis=1)
    return cells, skipped, {"warnings": warnings, "without_cells": empty}


def _no_cells(meta_cols: list[str]) -> pd.DataFrame:
    """An empty cell table: the index's metadata columns and the object table's."""
    return pd.DataFrame(
        columns=meta_cols + list(object_table(np.zeros((1, 1), np.int32)).columns))


def write_overlays(index: ExperimentIndex, folder: str | Path, channel: str | None = None,
                   cfg: NucleiConfig | None = None, rows: Sequence[int] | None = None,
                   illumination=None, scale: int = 3) -> list[Path]:
    """PNG overlays for a person to check the segmentation: the DNA plane (1st-99.8th
    percentile stretch, grey) with each nucleus outline in red, enlarged ``scale`` times.

    Args:
        index: the experiment; ``rows`` picks image sets (default: the first 4).
        folder: where ``<plate>_<well>_s<site>.png`` files are written (created).
        channel, cfg, illumination: as for :func:`segment_index`.

    Returns:
        The paths written.
    """
    from skimage.segmentation import find_boundaries

    cfg = cfg or NucleiConfig()
    channel = channel or dna_channel(index.channels)
    folder = check_writable(folder, folder=True)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in rows if rows is not None else range(min(4, len(index))):
        dna = index.read(int(i), [channel])[0].astype(np.float32)
        row = index.table.iloc[int(i)]
        if illumination is not None:
            dna = illumination.apply(dna[None], row[PLATE], [channel])[0]
        labels = segment_nuclei(dna, cfg)
        lo, hi = np.percentile(dna, [1.0, 99.8])
        grey = np.clip((dna - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = (np.repeat(grey[..., None], 3, axis=2) * 255).astype(np.uint8)
        if scale > 1:
            rgb = np.kron(rgb, np.ones((scale, scale, 1), np.uint8))
            labels = np.kron(labels, np.ones((scale, scale), labels.dtype))
        rgb[find_boundaries(labels, mode="inner")] = (255, 40, 40)
        name = f"{row[PLATE]}_{row[WELL]}_s{row.get('Metadata_site', i)}.png"
        path = folder / name.replace("/", "-")
        with atomic_path(path) as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
        written.append(path)
    return written


def dna_channel(channels: Sequence[str]) -> str:
    """The DNA stain among ``channels`` (DNA, DAPI, Hoechst; case-insensitive), else the first."""
    for name in channels:
        if name.lower() in ("dna", "dapi", "hoechst", "nuclei"):
            return name
    return channels[0]


def export_deepprofiler_locations(cells: pd.DataFrame, folder: str | Path) -> int:
    """Write DeepProfiler location files: ``folder/<plate>/<well>-<site>-Nuclei.csv`` with columns
    ``Nuclei_Location_Center_X, Nuclei_Location_Center_Y``. Returns the number of files."""
    folder = Path(folder)
    n = 0
    for (plate, well, site), g in cells.groupby(IMAGE_SET_KEY, sort=True):
        path = folder / str(plate) / f"{well}-{site}-Nuclei.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            g[[CENTER_X, CENTER_Y]].to_csv(tmp, index=False)
        n += 1
    return n


def import_deepprofiler_locations(index: ExperimentIndex, folder: str | Path) -> pd.DataFrame:
    """Read DeepProfiler location files for every image set of ``index`` into a cell table.

    A missing file means no cells for that image set; a file without the two centre columns raises
    InputError naming it.
    """
    folder = Path(folder)
    meta_cols = [c for c in index.table.columns if c.startswith("Metadata_")]
    frames = []
    for i, row in enumerate(index.table.itertuples(index=False)):
        r = dict(zip(index.table.columns, row, strict=True))
        path = folder / str(r[PLATE]) / f"{r[WELL]}-{r[SITE]}-Nuclei.csv"
        if not path.is_file():
            continue
        try:
            loc = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        missing = [c for c in (CENTER_X, CENTER_Y) if c not in loc.columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}")
        meta = index.table.iloc[[i] * len(loc)][meta_cols].reset_index(drop=True)
        loc = loc[[CENTER_X, CENTER_Y]].astype(np.float64).reset_index(drop=True)
        loc.insert(0, OBJECT, np.arange(1, len(loc) + 1))
        frames.append(pd.concat([meta, loc], axis=1))
    if not frames:
        return pd.DataFrame(columns=meta_cols + [OBJECT, CENTER_X, CENTER_Y])
    return pd.concat(frames, ignore_index=True)
