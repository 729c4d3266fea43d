"""Retrospective illumination correction (Singh et al., J Microsc 2014).

Per plate and channel, the illumination function is the mean of the plate's images of that
channel, smoothed with a large median filter and rescaled by a robust minimum (a low percentile)
so that it is >= 1; images are divided by it. The mean is accumulated one image at a time (a plate
is never held in memory whole). The median filter runs on a block-averaged copy of the mean image
(``downsample`` x fewer pixels per side) with a window of ``window / downsample``, and the result
is interpolated back to full size: the function is smooth by construction, and a 500-px median on
a 1280x1024 field would otherwise take minutes.

Functions are saved as ``<folder>/<plate>.npy`` (``(C, H, W)`` float32, channel order in
``<folder>/illumination.json``), reused on later runs, and computed in parallel over plates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from morphoprof.errors import InputError, outcome, pool_results
from morphoprof.index.schema import PLATE, ExperimentIndex
from morphoprof.io_utils import load_array_file, write_json, write_npy
from morphoprof.logs import progress_bar
from morphoprof.machine import resolve_jobs
from morphoprof.settings import Settings
from morphoprof.shards import shard_key

DEFAULT_WINDOW = 500  # px; Singh 2014 used windows of this order for 1280x1024 fields
DEFAULT_PERCENTILE = 2.0
_PARTIAL = 32  # images summed in float32 before each float64 fold (mean_image)


class IlluminationConfig(Settings):
    """Settings of :func:`compute_illumination`: the ``preprocess.illumination`` section of a
    run config, the options of ``morphoprof illum``."""

    window: int = Field(DEFAULT_WINDOW, ge=1, description="median filter window, px (500 suits "
                        "1280x1024 fields)")
    percentile: float = Field(DEFAULT_PERCENTILE, ge=0, le=100, description="robust minimum "
                              "percentile: the function is divided by it and floored at 1")
    n_jobs: int = Field(0, ge=0, description="plates computed in parallel (threads; 0: one "
                        "per usable core)")


def smooth_illumination(
    mean_image: np.ndarray,
    window: int = DEFAULT_WINDOW,
    percentile: float = DEFAULT_PERCENTILE,
    downsample: int | None = None,
) -> np.ndarray:
    """Turn an average image into an illumination function.

    Args:
        mean_image: ``(H, W)`` average of many images of one channel (any units).
        window: median filter window in full-resolution pixels (clipped to the image size).
        percentile: the robust minimum; the function is divided by this percentile of itself and
            floored at 1.
        downsample: block size for the fast median (default: about ``window / 25``, at least 1).

    Returns:
        ``(H, W)`` float32 illumination function, >= 1.
    """
    from scipy.ndimage import median_filter

    img = np.asarray(mean_image, dtype=np.float64)
    if img.ndim != 2:
        raise InputError(f"illumination: expected a 2-D mean image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise InputError("illumination: the mean image holds NaN or infinite values")
    h, w = img.shape
    window = max(1, min(int(window), h, w))
    factor = max(1, int(downsample) if downsample else window // 25)
    hs, ws = max(h // factor, 1), max(w // factor, 1)
    small = img[: hs * factor, : ws * factor].reshape(hs, factor, ws, factor).mean(axis=(1, 3))
    size = max(1, window // factor)
    smoothed = median_filter(small, size=size, mode="reflect")
    full = upsample_linear(smoothed, (h, w))
    low = np.percentile(full, percentile)
    if not np.isfinite(low) or low <= 0:
        raise InputError(
            "illumination: the smoothed mean image is <= 0 at its robust minimum (blank images?)"
        )
    full /= low
    return np.maximum(full, 1.0, out=full)


def _linear_weights(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (below, above) and the weight of the one above, for each of ``m``
    output pixels spread over ``n`` input pixels (pixel centres aligned, edges repeated)."""
    x = np.clip((np.arange(m) + 0.5) * (n / m) - 0.5, 0, n - 1)
    below = np.floor(x).astype(np.intp)
    return below, np.minimum(below + 1, n - 1), x - below


def upsample_linear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D ``image`` to ``shape`` ``(H, W)``, float32: the numbers of
    ``skimage.transform.resize(image, shape, order=1, mode="edge", anti_aliasing=False)`` (to
    float32 rounding), computed as two separable passes, about 7x faster on a 1280x1024
    field."""
    (y0, y1, wy), (x0, x1, wx) = (_linear_weights(n, m) for n, m in zip(image.shape, shape))
    small = np.asarray(image, dtype=np.float64)
    rows = (small[:, x0] * (1 - wx) + small[:, x1] * wx).astype(np.float32)
    wy = wy.astype(np.float32)[:, None]
    out = rows[y0]
    out *= 1 - wy
    out += rows[y1] * wy
    return out


def mean_image(index: ExperimentIndex, rows: Sequence[int], channels: Sequence[str],
               on_error: str = "fail", skipped: list | None = None) -> np.ndarray:
    """Streaming mean ``(C, H, W)`` float64 of the image sets ``rows`` (one image in memory,
    in its files' own pixel type: a uint16 plane is added without a float32 copy).

    An unreadable image set, or one with NaN / inf pixels, raises (naming its row and file), or
    with ``on_error="skip"`` is left out of the mean and appended to ``skipped`` as
    ``{"row", "reason"}``."""
    from morphoprof.preprocess.fields import ImageSetDataset

    data = ImageSetDataset(index, channels, rows, None, None, on_error)
    left_out: list[dict] = []
    total, part, n = None, None, 0
    for i, planes in data.arrays(left_out, planes=True):
        shape = (len(planes), *planes[0].shape)
        if total is None:
            total, part = np.zeros(shape, np.float64), np.zeros(shape, np.float32)
        elif shape != total.shape:
            raise InputError(
                f"illumination: {index.paths(i)[0]} has shape {shape[1:]}, the plate's "
                f"other images {total.shape[1:]}"
            )
        # float32 partial sums of _PARTIAL images (rounding <= _PARTIAL x 6e-8 of the sum),
        # folded into float64: 3x less memory traffic per image than a float64 sum
        for acc, plane in zip(part, planes, strict=True):
            acc += plane
        n += 1
        if n % _PARTIAL == 0:
            total += part
            part[:] = 0
    if part is not None:
        total += part
    if skipped is not None:
        skipped.extend({"row": s["row"], "reason": f"illumination: {s['reason']}"}
                       for s in left_out)
    if total is None:
        raise InputError("illumination: no images to average")
    return total / n


def plate_function(
    index: ExperimentIndex,
    rows: Sequence[int],
    channels: Sequence[str],
    window: int = DEFAULT_WINDOW,
    percentile: float = DEFAULT_PERCENTILE,
    on_error: str = "fail",
    skipped: list | None = None,
) -> np.ndarray:
    """The ``(C, H, W)`` float32 illumination functions of one plate's image sets (see
    :func:`mean_image` for ``on_error`` and ``skipped``)."""
    mean = mean_image(index, rows, channels, on_error, skipped)
    return np.stack([smooth_illumination(m, window, percentile) for m in mean])


def _read_function(path: Path) -> np.ndarray:
    """An illumination function saved as ``.npy``; InputError naming the file where it is
    truncated or not numpy's."""
    try:
        return load_array_file(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read illumination function {path}: {exc}") from exc


class IlluminationCorrection:
    """Per-plate illumination functions stored in a folder.

    Args:
        folder: where ``<plate>.npy`` files and ``illumination.json`` live.
        channels: channel order of the stored functions.
    """

    def __init__(self, folder: str | Path, channels: Sequence[str]) -> None:
        self.folder = Path(folder)
        self.channels = list(channels)
        self.skipped: list[dict] = []  # image sets left out by compute_illumination
        self._cache: dict[str, np.ndarray] = {}

    def path(self, plate: str) -> Path:
        """Where the illumination function of ``plate`` is stored (``<plate key>.npy``)."""
        return self.folder / f"{shard_key(plate)}.npy"

    def function(self, plate: str) -> np.ndarray:
        """The ``(C, H, W)`` illumination function of ``plate``."""
        if plate not in self._cache:
            p = self.path(plate)
            if not p.is_file():
                raise InputError(f"no illumination function for plate {plate!r} ({p})")
            self._cache[plate] = _read_function(p)
        return self._cache[plate]

    def apply(self, image: np.ndarray, plate: str, channels: Sequence[str] | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
        """Divide a ``(C, H, W)`` image of ``plate`` by its illumination function (into ``out``,
        e.g. ``image`` itself, where given; else into a new array). With ``out``, the division
        is done in ``out``'s type: a uint16 image into a float32 ``out`` gives the numbers of
        converting it to float32 first, in one pass."""
        f = self.function(plate)
        if channels is not None and list(channels) != self.channels:
            f = f[[self.channels.index(c) for c in channels]]
        if f.shape != image.shape:
            raise InputError(
                f"illumination function of plate {plate!r} has shape {f.shape}, image {image.shape}"
            )
        return np.divide(image, f, out=out, dtype=None if out is None else out.dtype)

    @classmethod
    def load(cls, folder: str | Path) -> IlluminationCorrection:
        folder = Path(folder)
        meta = folder / "illumination.json"
        if not meta.is_file():
            raise InputError(f"{folder} holds no illumination functions (no illumination.json)")
        return cls(folder, json.loads(meta.read_text())["channels"])


def compute_illumination(
    index: ExperimentIndex,
    folder: str | Path,
    channels: Sequence[str] | None = None,
    window: int = DEFAULT_WINDOW,
    percentile: float = DEFAULT_PERCENTILE,
    n_jobs: int = 0,
    on_error: str = "fail",
) -> IlluminationCorrection:
    """Compute (or reuse) the illumination function of every plate of ``index``.

    Plates whose function already exists with the same parameters, made from the same images
    (a digest of the plate's image files is kept in ``illumination.json``; annotations do not
    count), are skipped; the others are computed in parallel (``n_jobs`` threads, via joblib:
    reading and averaging release the GIL, and threads start at once where worker processes
    would import the libraries again), written atomically and recorded one by one, so a stopped run
    resumes after the plates it finished. With ``on_error="skip"`` unreadable image sets are
    left out of their plate's mean; the returned object's ``skipped`` lists those of every
    plate of ``index`` (also in ``illumination_skipped.json``).
    """
    from joblib import Parallel, delayed

    folder = Path(folder)
    chans = list(channels or index.channels)
    params = {"channels": chans, "window": int(window), "percentile": float(percentile)}
    meta = folder / "illumination.json"
    saved = json.loads(meta.read_text()) if meta.is_file() else {}
    if saved.get("params") != params:
        for old in folder.glob("*.npy"):
            old.unlink()  # functions made with other parameters are stale
        saved = {}
    plates = dict(saved.get("plates", {}))  # plate -> {"images": digest, "skipped": [...]}
    folder.mkdir(parents=True, exist_ok=True)

    def record() -> None:
        write_json(meta, {"params": params, "channels": chans, "plates": plates})

    record()
    corr = IlluminationCorrection(folder, chans)
    groups = index.table.groupby(PLATE, sort=True).indices
    images = {p: index.digest(rows, images_only=True) for p, rows in groups.items()}
    todo = [(p, rows) for p, rows in groups.items()
            if not corr.path(p).is_file() or plates.get(p, {}).get("images") != images[p]]

    def work(plate: str, rows: np.ndarray) -> list:
        skipped: list = []
        write_npy(corr.path(plate), plate_function(index, rows, chans, window, percentile,
                                                   on_error, skipped))
        return skipped

    jobs = (delayed(outcome)(work, p, rows) for p, rows in todo)
    bar = progress_bar(total=len(todo), desc="illumination functions", unit="plate")
    pool = Parallel(n_jobs=resolve_jobs(n_jobs), prefer="threads", return_as="generator")
    with pool_results(pool(jobs)) as results:
        for (plate, _), (skipped, error) in zip(todo, results, strict=True):
            if error is not None:  # in plate order, not the first to fail
                raise error
            plates[plate] = {"images": images[plate], "skipped": skipped}
            record()
            bar.update(1)
    bar.close()
    corr.skipped = [s for p in groups for s in plates[p]["skipped"]]
    write_json(folder / "illumination_skipped.json", corr.skipped)
    return corr


def import_illumination(
    files: dict[str, dict[str, Path]],
    folder: str | Path,
    channels: Sequence[str],
) -> IlluminationCorrection:
    """Store CellProfiler illumination functions (``<plate>_Illum<Ch>.npy``, one ``(H, W)`` array
    a channel, as JUMP ships them) as morphoprof's per-plate ``(C, H, W)`` functions.

    CellProfiler's ``CorrectIlluminationApply`` divides by the function, as
    :meth:`IlluminationCorrection.apply` does, so the arrays are stored unchanged (float32).

    Args:
        files: {plate: {channel: npy file}}, e.g. from
            :func:`~morphoprof.index.loaddata.illumination_files`.
        folder: where the ``<plate>.npy`` files and ``illumination.json`` are written.
        channels: channel order of the stored functions.

    Raises:
        InputError: a file that is unreadable, not 2-D, of another shape than the plate's other
            channels, or with values that are not finite and positive (naming the file).
    """
    folder = Path(folder)
    chans = list(channels)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write illumination functions to {folder}: {exc}") from exc
    corr = IlluminationCorrection(folder, chans)
    for plate, per_channel in sorted(files.items()):
        planes = []
        for ch in chans:
            path = Path(per_channel[ch])
            arr = np.squeeze(_read_function(path))
            if arr.ndim != 2 or (planes and arr.shape != planes[0].shape):
                want = "a 2-D array" if not planes else f"shape {planes[0].shape}"
                raise InputError(f"{path}: illumination function of shape {arr.shape}, "
                                 f"expected {want}")
            if not (np.isfinite(arr).all() and (arr > 0).all()):
                raise InputError(f"{path}: illumination function has zero, negative or "
                                 "non-finite values (images are divided by it)")
            planes.append(arr.astype(np.float32))
        write_npy(corr.path(plate), np.stack(planes))
    write_json(folder / "illumination.json",
               {"params": {"source": "cellprofiler", "plates": sorted(files)}, "channels": chans})
    return corr
