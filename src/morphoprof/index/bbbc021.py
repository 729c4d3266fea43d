"""Importers for BBBC021 (Caie et al. 2010; Ljosa et al. 2012): the official layout and the 6-MoA
PNG subset.

Official layout (as the Broad Bioimage Benchmark Collection distributes it, and as
``morphoprof download bbbc021`` unpacks it)::

    ROOT/BBBC021_v1_image.csv[.gz]     one row per field of view
    ROOT/BBBC021_v1_moa.csv            compound, concentration, moa
    ROOT/Week1/Week1_22123/G10_s1_w1....tif   Image_PathName_<ch>/Image_FileName_<ch>

Batch = the ``WeekN`` prefix of the plate name. Concentrations are in µM.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError, ValidationError
from morphoprof.index.schema import (
    BATCH,
    COMPOUND,
    CONCENTRATION,
    FRAME_PREFIX,
    MOA,
    PATH_PREFIX,
    PLATE,
    SITE,
    WELL,
    ExperimentIndex,
    build_index,
    finish_import,
)

BBBC021_CHANNELS = ("DAPI", "Tubulin", "Actin")
SIX_MOA_CHANNELS = ("Actin", "Tubulin", "DAPI")  # R, G, B of the PNGs
_SITE_RE = re.compile(r"_s(\d+)(?:_|\.|$)")
_BATCH_RE = re.compile(r"^(Week\d+)_")


def read_csv_checked(path: str | Path, required: list[str], **kwargs) -> pd.DataFrame:
    """Read a CSV (optionally gzipped); raise InputError naming the file and any missing column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"table not found: {path}")
    try:
        df = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{path} is empty") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.object[exc.start:exc.end]!r} at "
                         f"offset {exc.start}); save it as UTF-8") from exc
    except Exception as exc:
        raise InputError(f"cannot parse {path}: {type(exc).__name__}: {exc}") from exc
    if len(df) == 0:
        raise InputError(f"{path} has a header but no rows")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; found columns {list(df.columns)}"
        )
    return df


def batch_of_plate(plate: str) -> str | None:
    """``Week4_27481`` -> ``Week4``; None when the plate name has no ``WeekN_`` prefix."""
    m = _BATCH_RE.match(str(plate))
    return m.group(1) if m else None


def moa_lookup(moa_csv: str | Path) -> dict[tuple[str, float], str]:
    """Read ``BBBC021_v1_moa.csv`` into {(compound, concentration): moa}."""
    moa = read_csv_checked(moa_csv, ["compound", "concentration", "moa"])
    out: dict[tuple[str, float], str] = {}
    for line, row in zip(range(2, len(moa) + 2), moa.itertuples(index=False)):
        try:
            conc = float(row.concentration)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{moa_csv} line {line}: concentration {row.concentration!r} is not a number"
            ) from exc
        out[(str(row.compound), round(conc, 9))] = str(row.moa)
    return out


def find_bbbc021_table(root: Path, stem: str) -> Path:
    """Find ``stem`` (.csv or .csv.gz) in ``root`` or ``root/metadata``."""
    for folder in (root, root / "metadata"):
        for suffix in (".csv", ".csv.gz"):
            p = folder / f"{stem}{suffix}"
            if p.is_file():
                return p
    raise InputError(f"{stem}.csv not found in {root} or {root / 'metadata'}")


def import_bbbc021(
    image_root: str | Path,
    image_csv: str | Path | None = None,
    moa_csv: str | Path | None = None,
    validate: bool = True,
    check_shapes: bool = False,
    plates: Sequence[str] | None = None,
    only_present: bool = False,
) -> ExperimentIndex:
    """Build the experiment index of BBBC021 from its official tables.

    Args:
        image_root: folder holding ``Week*/Week*_NNNNN/*.tif`` (the tables' ``Image_PathName``
            entries are relative to it).
        image_csv: ``BBBC021_v1_image.csv[.gz]``; default: looked up in ``image_root`` and
            ``image_root/metadata``.
        moa_csv: ``BBBC021_v1_moa.csv``; default: looked up likewise.
        validate: check that every file exists (and, with ``check_shapes``, that all images
            share one shape); problems are raised together, each naming its row and file.
        check_shapes: read every TIFF header (slow on the full 39,600 files).
        plates: keep only these plates (e.g. the ones ``download --plates`` fetched); an
            unknown name is an error listing the table's plates.
        only_present: keep the image sets whose three files all exist and list the others in
            the index's ``left_out``, instead of refusing the folder.

    Returns:
        An index with channels DAPI, Tubulin, Actin; ``Metadata_moa`` from the MoA table (empty
        for unannotated treatments), ``Metadata_control`` true for DMSO, ``Metadata_batch`` the
        ``WeekN`` prefix, plus ``Metadata_replicate`` and ``Metadata_image_number``.
    """
    root = Path(image_root)
    image_csv = Path(image_csv) if image_csv else find_bbbc021_table(root, "BBBC021_v1_image")
    moa_csv = Path(moa_csv) if moa_csv else find_bbbc021_table(root, "BBBC021_v1_moa")
    cols = [f"Image_{kind}_{ch}" for ch in BBBC021_CHANNELS for kind in ("FileName", "PathName")]
    cols += [
        "Image_Metadata_Plate_DAPI",
        "Image_Metadata_Well_DAPI",
        "Image_Metadata_Compound",
        "Image_Metadata_Concentration",
    ]
    table = read_csv_checked(image_csv, cols)
    table["morphoprof_line"] = np.arange(len(table)) + 2  # header is line 1
    if plates:
        table = _keep_plates(table, plates, image_csv)
    moas = moa_lookup(moa_csv)

    df = _bbbc021_table(table, image_csv, moas)
    index = build_index(df, BBBC021_CHANNELS, root, controls=("DMSO",), source=image_csv,
                        lines=table["morphoprof_line"].to_numpy())
    try:
        return finish_import(index, validate, check_shapes, only_present)
    except ValidationError as exc:
        hint = _partial_download_hint(index, root, plates)
        if hint:
            raise ValidationError(f"{exc.what} ({hint})", exc.problems) from exc
        raise


def _bbbc021_table(table: pd.DataFrame, image_csv: Path, moas: dict) -> pd.DataFrame:
    """The index rows (canonical metadata and ``Path_<channel>`` columns) of BBBC021's image
    table; a file name without a site or a plate without a ``WeekN_`` prefix is a problem
    naming its line, all raised together."""
    problems: list[str] = []
    sites = np.zeros(len(table), dtype=np.int64)
    batches = []
    for i, row in enumerate(table.itertuples(index=False)):
        line = row.morphoprof_line
        fname = str(row.Image_FileName_DAPI)
        m = _SITE_RE.search(fname)
        if m:
            sites[i] = int(m.group(1))
        else:
            problems.append(f"{image_csv} line {line}: cannot parse the site from {fname!r}")
        batch = batch_of_plate(row.Image_Metadata_Plate_DAPI)
        if batch is None:
            problems.append(
                f"{image_csv} line {line}: plate {row.Image_Metadata_Plate_DAPI!r} has no "
                "WeekN_ prefix (the batch)"
            )
        batches.append(batch or "")
    if problems:
        raise ValidationError(f"BBBC021 image table {image_csv}", problems)

    df = pd.DataFrame(
        {
            PLATE: table["Image_Metadata_Plate_DAPI"].astype(str),
            WELL: table["Image_Metadata_Well_DAPI"].astype(str),
            SITE: sites,
            BATCH: batches,
            COMPOUND: table["Image_Metadata_Compound"].astype(str),
            CONCENTRATION: table["Image_Metadata_Concentration"].astype(float),
        }
    )
    df[MOA] = [
        moas.get((c, round(float(x), 9)), "")
        for c, x in zip(df[COMPOUND], df[CONCENTRATION], strict=True)
    ]
    if "Replicate" in table.columns:
        df["Metadata_replicate"] = table["Replicate"]
    if "ImageNumber" in table.columns:
        df["Metadata_image_number"] = table["ImageNumber"]
    for ch in BBBC021_CHANNELS:
        df[PATH_PREFIX + ch] = [
            f"{p}/{f}"
            for p, f in zip(
                table[f"Image_PathName_{ch}"].astype(str),
                table[f"Image_FileName_{ch}"].astype(str),
                strict=True,
            )
        ]
    return df


def _keep_plates(table: pd.DataFrame, plates: Sequence[str], image_csv: Path) -> pd.DataFrame:
    """The rows of the image table on ``plates`` (names may be comma separated)."""
    wanted = [p for item in plates for p in str(item).split(",") if p]
    have = table["Image_Metadata_Plate_DAPI"].astype(str)
    unknown = sorted(set(wanted) - set(have))
    if unknown:
        raise InputError(f"{image_csv}: unknown plate(s) {unknown}; its plates are "
                         f"{sorted(have.unique())}")
    return table[have.isin(wanted).to_numpy()]


def _partial_download_hint(index: ExperimentIndex, root: Path,
                           plates: Sequence[str] | None) -> str:
    """When files are missing because only some plates are in ``root``: what to pass."""
    if plates:
        return ""
    on_disk = sorted(p for p in index.table[PLATE].unique()
                     if (root / (batch_of_plate(p) or "") / p).is_dir())
    n_plates = index.table[PLATE].nunique()
    if not on_disk or len(on_disk) == n_plates:
        return ""
    return (f"only {len(on_disk)} of the table's {n_plates} plates are under {root}: pass "
            f"--plates {' '.join(on_disk)} (YAML: data.plates), or --only-present "
            f"(data.only_present: true) to keep every complete image set")


def import_fields_6moa(folder: str | Path, validate: bool = True,
                       only_present: bool = False) -> ExperimentIndex:
    """Index the 6-MoA BBBC021 PNG subset (pharmbio/big-data_deeplearning).

    Layout: ``folder/labels.csv`` (``;``-separated; unnamed first column = image number ``i``;
    columns compound, concentration, moa, plate, well, replicate) and
    ``folder/images/bbbc021v1_{i}.png``, RGB = Actin, Tubulin, DAPI. Each RGB file supplies three
    channels (``Frame_*`` columns 0, 1, 2). Sites are numbered 1.. in image-number order within a
    well. The PNG intensities are preprocessed (Anscombe, per-plate DMSO normalisation, 8 bit).
    """
    folder = Path(folder)
    labels = folder / "labels.csv"
    table = read_csv_checked(
        labels,
        ["compound", "concentration", "moa", "plate", "well"],
        sep=";",
        index_col=0,
    )
    table["morphoprof_line"] = np.arange(len(table)) + 2  # header is line 1
    table = table.sort_index()
    problems = []
    for line_no, i, plate in zip(table["morphoprof_line"], table.index, table["plate"]):
        if batch_of_plate(plate) is None:
            problems.append(f"{labels} line {line_no} (image {i}): plate {plate!r} has no WeekN_")
    if problems:
        raise ValidationError(f"6-MoA labels {labels}", problems)
    df = pd.DataFrame(
        {
            PLATE: table["plate"].astype(str).to_numpy(),
            WELL: table["well"].astype(str).to_numpy(),
            BATCH: [batch_of_plate(p) for p in table["plate"]],
            COMPOUND: table["compound"].astype(str).to_numpy(),
            CONCENTRATION: table["concentration"].astype(float).to_numpy(),
            MOA: table["moa"].astype(str).to_numpy(),
            "Metadata_image_number": table.index.to_numpy(),
        }
    )
    if "replicate" in table.columns:
        df["Metadata_replicate"] = table["replicate"].to_numpy()
    df[SITE] = df.groupby([PLATE, WELL], sort=False).cumcount() + 1
    for frame, ch in enumerate(SIX_MOA_CHANNELS):
        df[PATH_PREFIX + ch] = [f"images/bbbc021v1_{i}.png" for i in table.index]
        df[FRAME_PREFIX + ch] = frame
    index = build_index(df, SIX_MOA_CHANNELS, folder, controls=("DMSO",), source=labels,
                        lines=table["morphoprof_line"].to_numpy())
    return finish_import(index, validate, only_present=only_present)
