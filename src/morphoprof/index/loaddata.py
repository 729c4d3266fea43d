"""CellProfiler LoadData CSVs, the image lists of JUMP and the Cell Painting Gallery.

One row per image set. Per channel ``<Ch>`` the file is ``PathName_Orig<Ch>`` /
``FileName_Orig<Ch>`` (the ``Orig`` prefix is JUMP's; ``PathName_<Ch>`` / ``FileName_<Ch>`` too), or
``URL_Orig<Ch>`` where the table gives URLs: ``file://`` URLs are local paths; ``s3://`` /
``https://`` URLs are read from a local copy under ``mirror`` (the URL's bucket path under it, as
``aws s3 sync s3://cellpainting-gallery/cpg0016-jump/ MIRROR/cpg0016-jump/`` lays it out).
``Frame_Orig<Ch>`` gives a channel's frame inside a multi-frame file.

Metadata (JUMP names first; the first column present wins):

- plate, well, site: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` (site defaults to
  the row's order within its well);
- batch: ``Metadata_Batch``, then ``Metadata_Source`` (the JUMP partner), else the plate;
- compound: ``Metadata_JCP2022``, ``Metadata_Compound``, ``Metadata_broad_sample``,
  ``Metadata_pert_iname``, ``Metadata_Treatment``;
- concentration: ``Metadata_Concentration``, ``Metadata_mmoles_per_liter``, ``Metadata_mg_per_ml``;
- moa: ``Metadata_moa``, ``Metadata_MoA``;
- control: ``Metadata_pert_type == "negcon"`` where that column exists (``poscon`` rows stay
  treatments, the column is kept), else the compound is one of ``controls``.

JUMP keeps treatments in separate tables (``well.csv``, ``plate.csv``, ``compound.csv``, the
control lists); ``metadata`` joins each onto the image list by the ``Metadata_`` columns they
share. Illumination functions (CellProfiler's ``<plate>_Illum<Ch>.npy``, one ``(H, W)`` array a
channel) are located per plate from ``PathName_Illum<Ch>`` / ``FileName_Illum<Ch>`` where the table
has them, else under ``illum_dir`` (``<plate>_Illum<Ch>.npy`` there or in ``<plate>/``, the
Cell Painting Gallery's ``illum/<plate>/`` layout); see :func:`illumination_files`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from morphoprof.errors import InputError, ValidationError
from morphoprof.index.bbbc021 import read_csv_checked
from morphoprof.index.schema import (
    BATCH,
    COMPOUND,
    CONCENTRATION,
    CONTROL,
    DEFAULT_CONTROLS,
    FRAME_PREFIX,
    MOA,
    PATH_PREFIX,
    PLATE,
    SITE,
    WELL,
    ExperimentIndex,
    build_index,
    default_site_and_concentration,
    finish_import,
)

# morphoprof field: LoadData / JUMP columns that may hold it, in order of preference.
METADATA_NAMES: dict[str, tuple[str, ...]] = {
    PLATE: ("Metadata_Plate",),
    WELL: ("Metadata_Well",),
    SITE: ("Metadata_Site",),
    BATCH: ("Metadata_Batch", "Metadata_Source"),
    COMPOUND: ("Metadata_JCP2022", "Metadata_Compound", "Metadata_broad_sample",
               "Metadata_pert_iname", "Metadata_Treatment"),
    CONCENTRATION: ("Metadata_Concentration", "Metadata_mmoles_per_liter",
                    "Metadata_mg_per_ml"),
    MOA: ("Metadata_moa", "Metadata_MoA"),
}
PERT_TYPE = "Metadata_pert_type"
NEGCON = "negcon"
_FILE = re.compile(r"^FileName_(?:Orig)?(?P<ch>.+)$")
_URL = re.compile(r"^URL_(?:Orig)?(?P<ch>.+)$")


def loaddata_channels(columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """{channel: {"file": FileName column, "path": PathName column} or {"url": URL column}} for
    the image channels of a LoadData header, in column order (``Illum`` channels excluded)."""
    cols = set(columns)
    out: dict[str, dict[str, str]] = {}
    for c in columns:
        m = _FILE.match(c)
        if m and not m["ch"].startswith("Illum"):
            out[m["ch"]] = {"file": c, "path": "PathName_" + c[len("FileName_"):]}
    for c in columns:
        m = _URL.match(c)
        if m and not m["ch"].startswith("Illum") and m["ch"] not in out:
            out[m["ch"]] = {"url": c}
    for ch, spec in out.items():
        if "file" in spec and spec["path"] not in cols:
            url = [c for c in columns if _URL.match(c) and _URL.match(c)["ch"] == ch]
            out[ch] = {"url": url[0]} if url else {"file": spec["file"]}
    return out


def _local_path(value: str, mirror: Path | None, where: str) -> str:
    """A LoadData URL or path as a local path (see the module docstring)."""
    u = urlparse(value)
    if u.scheme in ("", "file") or (len(u.scheme) == 1 and value[1:3] in (":\\", ":/")):
        return unquote(u.path) if u.scheme == "file" else value
    if mirror is None:
        raise InputError(f"{where}: {value} is a remote URL; morphoprof reads local files only: "
                         "copy the images and give --mirror FOLDER (the URL's bucket path is "
                         "looked up under it)")
    return str(mirror / u.netloc / PurePosixPath(unquote(u.path)).relative_to("/"))


def _join(folder, name) -> str:
    """``PathName`` + ``FileName`` (a folder, an s3:// prefix or empty) as one path or URL."""
    folder = "" if pd.isna(folder) else str(folder)
    return f"{folder.rstrip('/')}/{name}" if folder else str(name)


def join_metadata(table: pd.DataFrame, tables: Sequence[str | Path]) -> pd.DataFrame:
    """Left-join each metadata CSV onto ``table`` by the ``Metadata_`` columns both have.

    Raises:
        InputError: a file shares no ``Metadata_`` column with the table, or has two rows for
            one key (naming the file and line), so a join never multiplies image sets.
    """
    for path in tables:
        path = Path(path)
        meta = read_csv_checked(path, [], dtype=str)
        keys = [c for c in meta.columns if c.startswith("Metadata_") and c in table.columns]
        if not keys:
            raise InputError(f"{path}: shares no Metadata_ column with the image list (it has "
                             f"{list(meta.columns)})")
        dup = meta.duplicated(keys).to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise InputError(f"{path} line {row + 2}: a second row for "
                             f"{dict(meta[keys].iloc[row])}")
        table = table.astype({k: str for k in keys}).merge(meta, on=keys, how="left")
    return table


def import_loaddata(
    csv_path: str | Path,
    root: str | Path | None = None,
    mirror: str | Path | None = None,
    metadata: Sequence[str | Path] = (),
    channels: Sequence[str] | None = None,
    controls: Sequence[str] = DEFAULT_CONTROLS,
    validate: bool = True,
    check_shapes: bool = False,
    only_present: bool = False,
) -> ExperimentIndex:
    """Build an experiment index from a CellProfiler LoadData CSV (JUMP ``load_data.csv``).

    Args:
        csv_path: the LoadData CSV, one row per image set.
        root: folder that relative ``PathName_`` values start from (default: the CSV's folder).
        mirror: local copy of remote ``URL_`` images (see the module docstring).
        metadata: CSVs joined onto the image list (JUMP ``well.csv``, ``plate.csv``, ...).
        channels: keep these channels, in this order (default: all, in column order).
        controls: compound names that mark controls where there is no ``Metadata_pert_type``.
        validate, check_shapes, only_present: as :func:`~morphoprof.index.import_csv`.

    Raises:
        ValidationError: no image channel, a required metadata column missing, a channel
            asked for that the table lacks; each named with the file.
        InputError: a remote URL without ``mirror``, a bad metadata table.
    """
    csv_path = Path(csv_path)
    table = read_csv_checked(csv_path, [])
    table = join_metadata(table, metadata)
    found = loaddata_channels(list(table.columns))
    problems = []
    if not found:
        problems.append("no image channel: expected FileName_Orig<Ch> + PathName_Orig<Ch> or "
                        "URL_Orig<Ch> columns")
    chans = list(channels or found)
    problems += [f"channel {c!r} not in the table (it has {list(found)})" for c in chans
                 if c not in found]
    source_of = {f: next((c for c in names if c in table.columns), None)
                 for f, names in METADATA_NAMES.items()}
    for f in (PLATE, WELL):
        if source_of[f] is None:
            problems.append(f"no {METADATA_NAMES[f][0]} column")
    if source_of[COMPOUND] is None and PERT_TYPE not in table.columns:
        problems.append(f"no treatment column (one of {list(METADATA_NAMES[COMPOUND])}); "
                        "join the JUMP well.csv with --metadata")
    if problems:
        raise ValidationError(f"importing {csv_path}", problems)

    df = pd.DataFrame({f: table[c].to_numpy() for f, c in source_of.items() if c is not None})
    if COMPOUND not in df.columns:
        df[COMPOUND] = table[PERT_TYPE].to_numpy()
    df[COMPOUND] = df[COMPOUND].fillna("").astype(str)
    df = default_site_and_concentration(df, csv_path)
    if PERT_TYPE in table.columns:
        df[CONTROL] = table[PERT_TYPE].astype(str).str.lower().eq(NEGCON).to_numpy()
    used = {c for c in source_of.values() if c is not None}
    for c in table.columns:
        if c.startswith("Metadata_") and c not in used and c.lower() not in {
                x.lower() for x in df.columns}:
            df[c] = table[c].to_numpy()
    mirror_path = Path(mirror) if mirror is not None else None
    for ch in chans:
        spec = found[ch]
        if "url" in spec:
            values = [_local_path(str(v), mirror_path, f"{csv_path} line {i + 2}")
                      for i, v in enumerate(table[spec["url"]])]
        else:
            folders = table[spec["path"]] if "path" in spec else [""] * len(table)
            values = [_local_path(_join(p, f), mirror_path, f"{csv_path} line {i + 2}")
                      for i, (p, f) in enumerate(zip(folders, table[spec["file"]], strict=True))]
        df[PATH_PREFIX + ch] = values
        frame = f"Frame_Orig{ch}" if f"Frame_Orig{ch}" in table.columns else f"Frame_{ch}"
        if frame in table.columns:
            df[FRAME_PREFIX + ch] = pd.to_numeric(table[frame], errors="coerce").fillna(-1)
    index = build_index(df, chans, root or csv_path.parent, controls=controls, source=csv_path,
                        lines=np.arange(len(df)) + 2)
    return finish_import(index, validate, check_shapes, only_present=only_present)


def illumination_files(
    csv_path: str | Path,
    channels: Sequence[str],
    illum_dir: str | Path | None = None,
    root: str | Path | None = None,
    mirror: str | Path | None = None,
) -> dict[str, dict[str, Path]]:
    """{plate: {channel: its ``<plate>_Illum<Ch>.npy``}} for the plates of a LoadData CSV.

    Taken from ``PathName_Illum<Ch>`` / ``FileName_Illum<Ch>`` columns where present (relative
    to ``root``, default the CSV's folder; URLs read under ``mirror``), else looked up as
    ``<illum_dir>/<plate>_Illum<Ch>.npy`` or ``<illum_dir>/<plate>/<plate>_Illum<Ch>.npy``.
    A plate is listed only when every channel has a function; returns ``{}`` when the CSV
    names none and ``illum_dir`` is not given.

    Raises:
        InputError: a plate with functions for some channels but not others, naming the file
            that is missing; an ``Illum`` file named in the table that does not exist.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    table = read_csv_checked(csv_path, ["Metadata_Plate"], dtype=str)
    out: dict[str, dict[str, Path]] = {}
    for plate, rows in table.groupby("Metadata_Plate", sort=True):
        found: dict[str, Path] = {}
        missing: list[Path] = []
        for ch in channels:
            fcol = f"FileName_Illum{ch}"
            if fcol in rows.columns:
                first = rows.iloc[0]
                pcol = "PathName_" + fcol[len("FileName_"):]
                where = f"{csv_path} line {int(rows.index[0]) + 2}"
                p = Path(_local_path(_join(first.get(pcol, ""), first[fcol]),
                                     Path(mirror) if mirror is not None else None, where))
                p = p if p.is_absolute() else base / p
                if not p.is_file():
                    raise InputError(f"{csv_path}: illumination function of plate {plate}, "
                                     f"channel {ch} not found: {p}")
                found[ch] = p
            elif illum_dir is not None:
                name = f"{plate}_Illum{ch}.npy"
                hits = [d / name for d in (Path(illum_dir), Path(illum_dir) / str(plate))
                        if (d / name).is_file()]
                if hits:
                    found[ch] = hits[0]
                else:
                    missing.append(Path(illum_dir) / str(plate) / name)
        if found and missing:
            raise InputError(f"plate {plate}: illumination function of channel(s) "
                             f"{[c for c in channels if c not in found]} not found "
                             f"(looked for {missing[0]})")
        if found:
            out[str(plate)] = found
    return out
