"""Reading microscopy images: TIFF (tifffile), PNG/JPEG (Pillow) and OME-Zarr fields (zarr) into
float32 arrays.

Images are returned as ``(H, W)`` planes or ``(C, H, W)`` stacks of float32 in the file's own
intensity units (no rescaling: a uint16 TIFF gives values in 0..65535, an 8-bit PNG in 0..255).
A multi-channel file (an RGB PNG, a multi-page TIFF, an OME-Zarr field folder) holds several
channels; ``frame`` picks one.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from morphoprof.errors import ImageReadError, InputError
from morphoprof.images.ome_zarr import field_shape, is_ome_zarr_image, read_field

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = {".tif", ".tiff"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SUPPORTED_SUFFIXES = TIFF_SUFFIXES | PIL_SUFFIXES


class _ReaderNotes(logging.Filter):
    """Holds back what tifffile logs in a thread while it decodes a file for this module (its
    ``open`` notes, by thread), so that a failed read names tifffile's cause ("invalid offset
    to first page") in its one error line rather than beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[int, list[str]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        notes = self.open.get(record.thread)
        if notes is None:  # another thread's, or outside a read of this module: as usual
            return True
        notes.append(re.sub(r"^<[^>]*>\s*", "", record.getMessage()))  # without the object
        return False


_NOTES = _ReaderNotes()
logging.getLogger("tifffile").addFilter(_NOTES)


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """A block that decodes ``path``: any failure but an :class:`ImageReadError` becomes one
    naming the file, the notes tifffile logged while reading it, then the exception
    (``invalid offset to first page 1768453152; IndexError: list index out of range``). The
    notes of a file that reads are logged at DEBUG."""
    key = threading.get_ident()
    outer = _NOTES.open.get(key)  # a read inside another one's block
    notes = _NOTES.open[key] = []
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, "; ".join([*notes, f"{type(exc).__name__}: {exc}"])) from exc
    else:
        for note in notes:
            logger.debug("%s: %s", path, note)
    finally:
        if outer is None:
            del _NOTES.open[key]
        else:
            _NOTES.open[key] = outer


def encoding_hint(path: Path) -> str:
    """For a file that is not found: ``"; the folder has ..."`` when its folder holds the same
    name written in another encoding (a file named in cp1252 / Latin-1 on an old share while the
    table names it in UTF-8), else ``""``. Only called on the error path (lists the folder)."""
    wanted = unicodedata.normalize("NFC", path.name)
    try:
        names = os.listdir(os.fsencode(path.parent))
    except OSError:
        return ""
    for raw in names:
        try:
            raw.decode("utf-8")
            continue  # a UTF-8 name that differs is just another file
        except UnicodeDecodeError:
            pass
        for encoding in ("cp1252", "latin-1"):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError:
                continue
            if unicodedata.normalize("NFC", text) == wanted:
                return (f"; the folder has {ascii(raw)[1:]}, the same name encoded as "
                        f"{encoding}, not UTF-8: rename it to UTF-8 (e.g. 'convmv -f "
                        f"{encoding} -t utf-8 --notest')")
    return ""


def image_exists(path: str | Path) -> bool:
    """Whether an image the index names is there: a file, or an OME-Zarr field folder."""
    path = Path(path)
    return path.is_file() or is_ome_zarr_image(path)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ImageReadError(
            path, f"unsupported file type {suffix!r} (supported: {sorted(SUPPORTED_SUFFIXES)})"
        )
    return suffix


def _select_frame(arr: np.ndarray, frame: int | None, path: Path) -> np.ndarray:
    """Reduce a decoded array to one (H, W) plane.

    A 3-D array is channel-last when its last axis has at most 4 entries (RGB/RGBA PNG, HxWxC
    TIFF), otherwise channel-first (multi-page TIFF).
    """
    if arr.ndim == 2:
        if frame not in (None, 0):
            raise ImageReadError(path, f"frame {frame} requested but the image has one channel")
        return arr
    if arr.ndim != 3:
        raise ImageReadError(path, f"expected a 2-D or 3-D image, got shape {arr.shape}")
    channel_last = arr.shape[-1] <= 4
    n = arr.shape[-1] if channel_last else arr.shape[0]
    if frame is None:
        raise ImageReadError(
            path, f"the file holds {n} channels (shape {arr.shape}); the index must name a frame"
        )
    if not 0 <= frame < n:
        raise ImageReadError(path, f"frame {frame} out of range for {n} channels")
    return arr[..., frame] if channel_last else arr[frame]


def read_plane(path: str | Path, frame: int | None = None) -> np.ndarray:
    """Read one channel of an image file.

    Args:
        path: a TIFF, PNG or JPEG file.
        frame: channel index inside a multi-channel file (RGB PNG: 0=R, 1=G, 2=B); ``None`` for a
            single-channel file.

    Returns:
        ``(H, W)`` float32 array in the file's intensity units.

    Raises:
        ImageReadError: naming the file, when it is missing, truncated, corrupt or of an
            unsupported type or shape.
    """
    path = Path(path)
    return _to_float32(_select_frame(_read_full(path), frame, path), path)


def _checked_pixels(plane: np.ndarray, path: Path) -> np.ndarray:
    """``plane`` itself, refused (naming the file) unless its pixels are numbers."""
    if plane.dtype.kind not in "uifb":
        raise ImageReadError(path, f"unsupported pixel type {plane.dtype}")
    return plane


def _to_float32(plane: np.ndarray, path: Path) -> np.ndarray:
    return _checked_pixels(plane, path).astype(np.float32, copy=False)


def image_shape(path: str | Path, frame: int | None = None) -> tuple[int, int]:
    """Return the ``(H, W)`` of one channel of an image file, reading only its header."""
    path = Path(path)
    if is_ome_zarr_image(path):
        return field_shape(path)[1:]
    suffix = _suffix(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found" + encoding_hint(path))
    with _decoding(path):
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
        else:
            with Image.open(path) as im:
                w, h = im.size
                bands = len(im.getbands())
                shape = (h, w) if bands == 1 else (h, w, bands)
    shape = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1])) if shape[-1] <= 4 else (int(shape[1]), int(shape[2]))
    raise ImageReadError(path, f"expected a 2-D or 3-D image, got shape {shape}")


def read_planes(
    paths: Sequence[str | Path],
    frames: Sequence[int | None] | None = None,
    channel_names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Read several channels as ``(H, W)`` planes in their files' own pixel types (a uint16
    TIFF stays uint16: summing or thresholding them needs no float32 copy).

    Args:
        paths: one file per channel (the same file may appear several times with different frames).
        frames: per channel, the frame inside a multi-channel file, or ``None``.
        channel_names: used in error messages only.

    Raises:
        InputError: naming the files, when the channels' shapes differ, or when a floating-point
            plane holds NaN or infinite pixels (integer pixels are always finite, so only
            floating-point files are scanned).
    """
    frames = list(frames) if frames is not None else [None] * len(paths)
    names = list(channel_names) if channel_names is not None else list(map(str, range(len(paths))))
    decoded: dict[Path, np.ndarray] = {}  # a multi-channel file is decoded once
    zarr_planes: dict[tuple[Path, int], np.ndarray] = {}  # an OME-Zarr field: only these planes
    planes = []
    for path, frame in zip(paths, frames, strict=True):
        p = Path(path)
        if is_ome_zarr_image(p):
            if (p, frame or 0) not in zarr_planes:
                wanted = sorted({f or 0 for q, f in zip(paths, frames, strict=True)
                                 if Path(q) == p})
                zarr_planes.update({(p, c): plane for c, plane in
                                    zip(wanted, read_field(p, wanted, max_pixels()),
                                        strict=True)})
            planes.append(_checked_pixels(zarr_planes[(p, frame or 0)], p))
            continue
        if p not in decoded:
            decoded[p] = _read_full(p)
        planes.append(_checked_pixels(_select_frame(decoded[p], frame, p), p))
    shapes = {plane.shape for plane in planes}
    if len(shapes) > 1:
        desc = ", ".join(
            f"{n}={pl.shape} ({p})" for n, pl, p in zip(names, planes, paths, strict=True)
        )
        raise InputError(f"channels of one image set have different shapes: {desc}")
    bad = [(n, str(p)) for n, pl, p in zip(names, planes, paths, strict=True)
           if pl.dtype.kind == "f" and not np.isfinite(pl).all()]
    if bad:
        raise InputError(f"NaN or infinite pixels in channel(s) {[n for n, _ in bad]} "
                         f"({', '.join(sorted({f for _, f in bad}))})")
    return planes


def read_stack(
    paths: Sequence[str | Path],
    frames: Sequence[int | None] | None = None,
    channel_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Read several channels into one ``(C, H, W)`` float32 stack: :func:`read_planes`,
    each plane converted straight into the stack (one float32 copy, not two).

    Raises:
        InputError: as :func:`read_planes`.
    """
    planes = read_planes(paths, frames, channel_names)
    stack = np.empty((len(planes), *planes[0].shape) if planes else (0,), np.float32)
    for k, plane in enumerate(planes):
        stack[k] = plane
    return stack


def max_pixels() -> int:
    """The largest image (pixels x channels of one file) morphoprof decodes: 2**28 (1 GiB as
    float32) unless the ``MORPHOPROF_MAX_PIXELS`` environment variable says otherwise."""
    value = os.environ.get("MORPHOPROF_MAX_PIXELS", "")
    return int(value) if value.isdigit() else 2**28


def _read_full(path: Path) -> np.ndarray:
    """Decode a whole (possibly multi-channel) file, errors naming the file. Files larger than
    :func:`max_pixels` are refused from their header, before any memory is allocated."""
    suffix = _suffix(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found" + encoding_hint(path))
    limit = max_pixels()
    with _decoding(path):
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
                if int(np.prod(shape, dtype=np.int64)) > limit:
                    raise ImageReadError(path, _too_large(shape, limit))
                arr = tif.asarray()
        else:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
    return np.squeeze(arr) if arr.ndim > 3 else arr


def _too_large(shape: tuple, limit: int) -> str:
    n = int(np.prod(shape, dtype=np.int64))
    return (f"image of shape {shape} has {n / 1e6:.0f} M pixels, above the {limit / 1e6:.0f} M "
            "limit (tile or downsample it first, or raise MORPHOPROF_MAX_PIXELS)")


def read_image_set(index, i: int, channels: Sequence[str] | None = None,
                   illumination=None) -> np.ndarray:
    """Image set ``i`` of an :class:`~morphoprof.index.schema.ExperimentIndex` as ``(C, H, W)``
    float32, checked as every stage needs it: an unreadable file, or NaN / infinite pixels,
    raise :class:`InputError` naming the row (its source-table line where known) and file."""
    chans = list(channels or index.channels)
    try:
        return index.read(i, chans, illumination)
    except InputError as exc:
        raise InputError(f"{index.describe(i)}: {exc}") from exc


def read_image_planes(index, i: int, channels: Sequence[str] | None = None) -> list[np.ndarray]:
    """Image set ``i`` as one ``(H, W)`` plane per channel in the files' own pixel types (see
    :func:`read_planes`), checked and named as :func:`read_image_set` does; no illumination
    correction."""
    chans = list(channels or index.channels)
    try:
        return read_planes(index.paths(i, chans), index.frames(i, chans), chans)
    except InputError as exc:
        raise InputError(f"{index.describe(i)}: {exc}") from exc
