"""Reading fields of OME-Zarr images (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3), lazily.

A field is a multiscale image group (``multiscales`` metadata; NGFF 0.5 nests it under ``ome``).
Only its full-resolution level (``datasets[0]``) is read, and only the channels asked for: the
chunks of one field's planes, never the plate. Axes are named by the metadata (``t, c, z, y, x``
or a subset); a field with several time points is read at ``t = 0``, a z-stack as its maximum
projection (the usual 2-D view of an HCS z-stack).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from morphoprof.errors import ImageReadError


def ome_attrs(attrs: dict) -> dict:
    """The NGFF metadata of a group's attributes (0.5 keeps it under ``"ome"``)."""
    return dict(attrs.get("ome", attrs))


def is_ome_zarr_image(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a Zarr group (v2 ``.zattrs`` or v3 ``zarr.json``)."""
    path = Path(path)
    return path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zattrs").is_file())


def _open(path: Path):
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        multiscales = ome_attrs(group.attrs.asdict())["multiscales"][0]
        axes = [a["name"] if isinstance(a, dict) else str(a)
                for a in multiscales.get("axes", ["t", "c", "z", "y", "x"])]
        array = group[multiscales["datasets"][0]["path"]]
    except Exception as exc:
        raise ImageReadError(path, f"not an OME-Zarr image ({type(exc).__name__}: {exc})"
                             ) from exc
    if len(axes) != array.ndim or not {"y", "x"} <= set(axes):
        raise ImageReadError(path, f"axes {axes} do not fit its array of shape {array.shape}")
    return group, axes, array


def field_shape(path: str | Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of a field's full-resolution level, from its metadata only."""
    _, axes, array = _open(Path(path))
    size = dict(zip(axes, array.shape, strict=True))
    return int(size.get("c", 1)), int(size["y"]), int(size["x"])


def field_channels(path: str | Path) -> list[str] | None:
    """The channel labels of a field (``omero.channels[].label``), or None when it has none."""
    group, _, _ = _open(Path(path))
    channels = ome_attrs(group.attrs.asdict()).get("omero", {}).get("channels")
    if not channels:
        return None
    labels = [str(c.get("label", "")) for c in channels]
    return labels if all(labels) and len(set(labels)) == len(labels) else None


def read_field(path: str | Path, channels: Sequence[int] | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Read channels of a field as a ``(C, H, W)`` array in the stored dtype.

    Args:
        path: the field's image group (e.g. ``plate.zarr/B/3/0``).
        channels: channel positions to read (default: all).
        max_pixels: refuse (from the metadata, before reading) a read of more pixels.

    Raises:
        ImageReadError: naming the field, when it is not an OME-Zarr image, a channel is out of
            range, or the read is too large.
    """
    path = Path(path)
    _, axes, array = _open(path)
    n = dict(zip(axes, array.shape, strict=True)).get("c", 1)
    chans = list(range(n)) if channels is None else [int(c) for c in channels]
    bad = [c for c in chans if not 0 <= c < n]
    if bad:
        raise ImageReadError(path, f"channel(s) {bad} out of range for {n} channels")
    sel: list = []
    for ax in axes:
        sel.append(0 if ax == "t" else chans if ax == "c" else slice(None))
    pixels = len(chans) * int(np.prod([array.shape[axes.index(a)] for a in axes
                                       if a in ("z", "y", "x")]))
    if max_pixels is not None and pixels > max_pixels:
        raise ImageReadError(path, f"a field of {pixels / 1e6:.0f} M pixels is above the "
                             f"{max_pixels / 1e6:.0f} M limit (raise MORPHOPROF_MAX_PIXELS)")
    try:
        if "c" in axes:
            data = np.stack([np.asarray(array[tuple(c if s is chans else s for s in sel)])
                             for c in chans])
        else:
            data = np.asarray(array[tuple(sel)])[None]
    except Exception as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
    rest = [a for a in axes if a not in ("t", "c")]
    if "z" in rest:
        data = data.max(axis=1 + rest.index("z"))
    return data
