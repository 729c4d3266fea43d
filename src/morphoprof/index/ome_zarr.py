"""Import an OME-Zarr HCS plate (the NGFF plate / well / field layout) as an experiment index.

The plate group's ``plate`` metadata lists its wells (``"B/3"``: row ``B``, column ``3``, read as
well ``B03``); each well group's ``well`` metadata lists its fields (``images[].path``), which
become sites 1, 2, ... in that order. Each field is a multiscale image whose channels are named by
its ``omero.channels[].label`` (else ``ch0``, ``ch1``, ...). The index names each field's folder
with the channel's position as its frame, so later stages read one field at a time, and only its
full-resolution level (:mod:`morphoprof.images.ome_zarr`). Treatments come from a plate map
(:func:`~morphoprof.index.platemap.read_platemap`), since NGFF has no treatment metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError, ValidationError
from morphoprof.images.ome_zarr import field_channels, field_shape, is_ome_zarr_image, ome_attrs
from morphoprof.index.platemap import read_platemap
from morphoprof.index.schema import (
    COMPOUND,
    CONCENTRATION,
    DEFAULT_CONTROLS,
    FRAME_PREFIX,
    PATH_PREFIX,
    PLATE,
    SITE,
    WELL,
    ExperimentIndex,
    build_index,
    finish_import,
)


def well_name(row: str, column: str) -> str:
    """``("B", "3")`` -> ``"B03"``: the row letters, then the column zero-padded to 2 digits."""
    return f"{row}{int(column):02d}" if str(column).isdigit() else f"{row}{column}"


def _attrs(path: Path) -> dict:
    import zarr

    try:
        return ome_attrs(zarr.open_group(str(path), mode="r").attrs.asdict())
    except Exception as exc:
        raise InputError(f"cannot open the Zarr group {path}: {type(exc).__name__}: {exc}"
                         ) from exc


def plate_fields(plate_path: str | Path) -> tuple[str, pd.DataFrame]:
    """The plate's name and its fields: one row per field with ``well`` (``B03``), ``site``
    (1-based, in the well's order) and ``path`` (the field folder, relative to the plate).

    Raises:
        InputError: the folder is not an HCS plate, or a well lists no fields (named).
    """
    plate_path = Path(plate_path)
    if not plate_path.is_dir():
        raise InputError(f"OME-Zarr plate not found: {plate_path}")
    meta = _attrs(plate_path)
    if "plate" not in meta:
        what = "a single image" if "multiscales" in meta else f"keys {sorted(meta)}"
        raise InputError(f"{plate_path} is not an OME-Zarr HCS plate (no 'plate' metadata; it "
                         f"has {what})")
    plate = meta["plate"]
    rows = [r["name"] for r in plate.get("rows", [])]
    cols = [c["name"] for c in plate.get("columns", [])]
    name = str(plate.get("name") or plate_path.name.removesuffix(".zarr"))
    records = []
    for w in plate.get("wells", []):
        rel = str(w["path"]).strip("/")
        parts = rel.split("/")
        if "rowIndex" in w and "columnIndex" in w and rows and cols:
            r, c = rows[int(w["rowIndex"])], cols[int(w["columnIndex"])]
        elif len(parts) == 2:
            r, c = parts
        else:
            raise InputError(f"{plate_path}: well path {rel!r} is not ROW/COLUMN")
        images = _attrs(plate_path / rel).get("well", {}).get("images", [])
        if not images:
            raise InputError(f"{plate_path / rel}: the well lists no fields ('well.images')")
        for site, image in enumerate(images, start=1):
            records.append({"well": well_name(r, c), "site": site,
                            "path": f"{rel}/{str(image['path']).strip('/')}"})
    if not records:
        raise InputError(f"{plate_path}: the plate lists no wells")
    return name, pd.DataFrame(records)


def import_ome_zarr(
    plate_path: str | Path,
    platemap: str | Path | None = None,
    platemap_well: str = "well",
    channels: Sequence[str] | None = None,
    controls: Sequence[str] = DEFAULT_CONTROLS,
    validate: bool = True,
    only_present: bool = False,
) -> ExperimentIndex:
    """Build an experiment index from an OME-Zarr HCS plate, one row per field.

    Args:
        plate_path: the plate's Zarr folder (e.g. ``plate.zarr``).
        platemap: CSV, one row per well, with ``compound`` (and ``concentration``, ``moa``,
            ``batch``, ...) columns; without it every field's compound is empty.
        channels: keep these channels (by label), in this order (default: all).
        controls, validate, only_present: as :func:`~morphoprof.index.import_csv`.

    Raises:
        InputError / ValidationError: not a plate, fields whose channels differ from the first
            field's (named), a channel asked for that the plate lacks, a bad plate map.
    """
    plate_path = Path(plate_path)
    name, fields = plate_fields(plate_path)
    first = next((plate_path / p for p in fields["path"] if is_ome_zarr_image(plate_path / p)),
                 None)
    if first is None:
        raise InputError(f"{plate_path}: none of its {len(fields)} fields is present")
    n = field_shape(first)[0]
    labels = field_channels(first) or [f"ch{i}" for i in range(n)]
    problems = []
    for p in fields["path"]:
        f = plate_path / p
        if f != first and is_ome_zarr_image(f):
            other = field_channels(f) or [f"ch{i}" for i in range(field_shape(f)[0])]
            if other != labels:
                problems.append(f"field {p}: channels {other}, the first field ({first.name}) "
                                f"has {labels}")
    chans = list(channels or labels)
    problems += [f"channel {c!r} not in the plate (it has {labels})" for c in chans
                 if c not in labels]
    if problems:
        raise ValidationError(f"importing {plate_path}", problems[:20])
    df = pd.DataFrame({PLATE: name, WELL: fields["well"], SITE: fields["site"]})
    if platemap is not None:
        pm = read_platemap(platemap, platemap_well)
        df = df.merge(pm, on=WELL, how="left", validate="many_to_one")
        unmatched = sorted(set(fields["well"]) - set(pm[WELL]))
        if unmatched:
            raise InputError(f"{platemap}: no row for well(s) {unmatched[:10]} of {plate_path}")
    if COMPOUND not in df.columns:
        df[COMPOUND] = ""
    df[COMPOUND] = df[COMPOUND].fillna("").astype(str)
    if CONCENTRATION not in df.columns:
        df[CONCENTRATION] = np.nan
    for ch in chans:
        df[PATH_PREFIX + ch] = fields["path"].to_numpy()
        df[FRAME_PREFIX + ch] = labels.index(ch)
    index = build_index(df, chans, plate_path, controls=controls)
    return finish_import(index, validate, only_present=only_present)
