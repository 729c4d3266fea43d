"""CellProfiler single-cell measurements in: per-object CSVs (ExportToSpreadsheet), ExportToDatabase
SQLite (``Per_Image`` / ``Per_Cells`` ...) and cytominer-database SQLite (``Image`` / ``Cells`` ...
with ``TableNumber``), converted to morphoprof's single-cell Parquet.

The engine is CytoTable (the cytomining project's converter): it joins the compartments per object
as pycytominer's ``SingleCells`` does, in chunks through DuckDB, so a large SQLite never sits in
memory. A SQLite is first split into part files of one chunk each (a CSV folder first staged into
one SQLite), so that reading the chunks takes one pass over the file, not one per chunk. DuckDB
downloads its ``sqlite_scanner`` / ``httpfs`` extensions at run time; here they come from their
PyPI wheels (``duckdb-extension-*``, the same version as ``duckdb``), so the import works offline.
CytoTable's output is then streamed once, in row batches, into ``cells.parquet``: image metadata
become ``Metadata_plate`` / ``Metadata_well`` / ``Metadata_site`` (+ the other ``Metadata_*``),
file names metadata too, other image-level measurements are dropped, a plate map (CSV, joined on
the well) adds treatment columns, and compartment features keep CellProfiler's names
(``Cells_AreaShape_Area``...), so ``aggregate`` / ``evaluate`` run on it unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from morphoprof import logs
from morphoprof.errors import InputError
from morphoprof.extras import require
from morphoprof.index.platemap import read_platemap
from morphoprof.io_utils import json_fields, quote_identifier, write_json

logger = logging.getLogger(__name__)

# source kind -> CytoTable preset
PRESETS = {
    "csv": "cellprofiler_csv",
    "sqlite": "cellprofiler_sqlite",
    "cytominer-database": "cell-health-cellprofiler-to-cytominer-database",
}
_CANONICAL = {"plate": "Metadata_plate", "well": "Metadata_well", "site": "Metadata_site"}
_FILE_COLUMNS = ("FileName_", "PathName_", "URL_")
# rows per CytoTable chunk by default (import_cellprofiler and import --chunk-size)
CHUNK_SIZE = 5000
_JOIN_ROWS = 2500  # objects per joined page and per written batch (~36 MB at 1,800 columns)


def detect_kind(path: str | Path) -> str:
    """``csv`` (a folder of ExportToSpreadsheet CSVs, in it or in folders below it, e.g. one
    per batch), ``sqlite`` (ExportToDatabase: ``Per_*`` tables) or ``cytominer-database``
    (``Image`` / ``Cells`` ... tables); InputError otherwise."""
    path = Path(path)
    if path.is_dir():
        names = {p.name.lower() for p in path.rglob("*.csv")}
        if "image.csv" in names and names & {"cells.csv", "nuclei.csv", "cytoplasm.csv"}:
            return "csv"
        raise InputError(f"{path}: a CellProfiler CSV folder needs Image.csv and Cells.csv / "
                         f"Nuclei.csv / Cytoplasm.csv; found {sorted(names) or 'no CSV'}")
    if not path.is_file():
        raise InputError(f"not found: {path}")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = {r[0].lower() for r in
                      con.execute("select name from sqlite_master where type='table'")}
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path}: not a CellProfiler CSV folder or SQLite file ({exc})") from exc
    if "per_image" in tables:
        return "sqlite"
    if "image" in tables and tables & {"cells", "nuclei", "cytoplasm"}:
        return "cytominer-database"
    raise InputError(f"{path}: a SQLite without CellProfiler tables (Per_Image / Image); it "
                     f"has {sorted(tables)}")


def _offline_duckdb_extensions() -> None:
    """Install DuckDB's sqlite_scanner and httpfs from their PyPI wheels (no download)."""
    import duckdb

    con = duckdb.connect()
    have = {r[0] for r in con.execute(
        "select extension_name from duckdb_extensions() where installed").fetchall()}
    for name in ("sqlite_scanner", "httpfs"):
        if name in have:
            continue
        try:
            module = importlib.import_module(f"duckdb_extension_{name}")
        except ImportError:
            continue  # DuckDB will try its own download
        files = sorted(Path(module.__file__).parent.rglob(f"{name}.duckdb_extension"))
        if files:
            try:
                con.execute(f"INSTALL '{files[0]}'")
            except duckdb.Error as exc:
                raise InputError(f"cannot install DuckDB's {name} extension from {files[0]} "
                                 f"into its extension folder (~/.duckdb): {exc}") from exc


def _rename(columns: list[str]) -> tuple[dict[str, str], list[str]]:
    """CytoTable's column names -> morphoprof's (``{old: new}``), and the dropped columns."""
    out, dropped = {}, []
    for c in columns:
        if c in ("Metadata_Plate", "Metadata_Well"):  # CytoTable's names in a CSV image table
            out[c] = _CANONICAL[c.removeprefix("Metadata_").lower()]
        elif c.startswith("Image_Metadata_"):
            key = c.removeprefix("Image_Metadata_")
            out[c] = _CANONICAL.get(key.lower(), f"Metadata_{key}")
        elif c.startswith("Image_") and c.removeprefix("Image_").startswith(_FILE_COLUMNS):
            out[c] = f"Metadata_{c}"
        elif c.startswith("Image_"):
            dropped.append(c)  # image-level measurements (counts, execution times...)
        else:
            out[c] = c
    return out, dropped


@dataclass(frozen=True)
class CellProfilerImport:
    """What :func:`import_cellprofiler` wrote; ``out/import.json`` is its :meth:`to_json`.

    Attributes:
        source: the CellProfiler output read.
        kind: its layout (:func:`detect_kind`).
        cytotable_preset: the CytoTable preset that read it.
        out: the cell table written (``out/cells.parquet``).
        rows: cells (rows) in it.
        features: measurement (non-``Metadata_``) columns.
        dropped_image_columns: per-image columns left out of the cell table.
        seconds: wall time, s.
        notes: what the user should know (lines starting ``warning: `` are warnings).
    """

    source: str
    kind: str
    cytotable_preset: str
    out: str
    rows: int
    features: int
    dropped_image_columns: int
    seconds: float
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """``import.json``: the fields."""
        return json_fields(self)

    def summary_line(self) -> str:
        """One line for the user: cells, features, layout, preset and the table written."""
        return (f"{self.rows} cells x {self.features} features ({self.kind}, CytoTable preset "
                f"{self.cytotable_preset}) -> {self.out}")


def import_cellprofiler(path: str | Path, out: str | Path, plate: str | None = None,
                        platemap: str | Path | None = None, platemap_well: str = "well",
                        chunk_size: int = CHUNK_SIZE, overwrite: bool = False
                        ) -> CellProfilerImport:
    """Convert CellProfiler single-cell outputs to ``out/cells.parquet`` (+ ``import.json``).

    Args:
        path: a folder of CellProfiler CSVs, or a SQLite file (see :func:`detect_kind`).
        out: output folder; refused when it holds an earlier import, unless ``overwrite``.
        plate: ``Metadata_plate`` for sources without plate metadata (default: the source's
            name).
        platemap: CSV with one row per well (``platemap_well`` column) whose other columns
            are joined to every cell as ``Metadata_<column>`` (pycytominer's annotate).
        chunk_size: rows per CytoTable chunk of each table; memory grows with it. A SQLite is
            first split into part files of ``chunk_size`` rows of each table
            (:func:`_split_sqlite`), so each chunk is one read of a small file and time grows
            in step with the file (CytoTable reading a chunk straight from a large SQLite scans
            the whole table, as DuckDB's sqlite scanner does not hand the filter to SQLite:
            time grew with the square of the file); a CSV folder is first copied into one
            SQLite (:func:`_stage_csv`: CytoTable parsed a whole CSV for every chunk). Needs
            free space in ``out`` about the size of the SQLite or CSVs while it runs.

    Returns:
        The :class:`CellProfilerImport` (also ``out/import.json``).
    """
    path, out = Path(path), Path(out)
    kind = detect_kind(path)
    target = out / "cells.parquet"
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists; use another --out or --overwrite")
    pm = read_platemap(platemap, platemap_well) if platemap is not None else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".cytotable-", dir=out))
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc}") from exc
    t0 = time.perf_counter()
    try:
        schema, pages = _convert(path, work, PRESETS[kind], chunk_size)
        names, dropped = _rename(schema.names)
        notes = [f"note: {path.name} has no plate metadata; Metadata_plate = "
                 f"{plate or path.stem!r}"] if "Metadata_plate" not in names.values() else []
        if "Metadata_well" not in names.values():
            notes.append(f"note: {path.name} has no well metadata; each image is its own well "
                         "(Metadata_well = image<ImageNumber>)")
        tmp = work / "cells.parquet"
        frames = (_cells_frame(t, schema.names, names, plate or path.stem, pm) for t in pages)
        rows, unmatched, written = _write_cells(frames, tmp, pm is not None)
        if rows is None:
            raise InputError(f"{path}: no objects to import")
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write {target}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if unmatched:
        notes.append(f"warning: {unmatched} cells in wells missing from {platemap}")
    seconds = time.perf_counter() - t0
    feats = [c for c in written if not c.startswith("Metadata_")]
    summary = CellProfilerImport(str(path), kind, PRESETS[kind], str(target), rows, len(feats),
                                 len(dropped), seconds, tuple(notes))
    write_json(out / "import.json", summary.to_json())
    for n in notes:
        if n.startswith("warning: "):
            logger.warning(n.removeprefix("warning: "))
        else:
            logger.info(n)
    return summary


def _write_cells(frames, path: Path, joined: bool) -> tuple[int | None, int, list[str]]:
    """Write cell frames into one Parquet file (the first frame's schema; later ones cast to
    it): (rows, rows without a plate-map well, column names); rows None when there were no
    frames. ``joined``: the frames carry ``_matched`` from the plate-map join."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, rows, unmatched = None, 0, 0
    try:
        for df in frames:
            if joined:
                unmatched += int((df.pop("_matched") == "left_only").sum())
            table = pa.Table.from_pandas(df, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += len(df)
    finally:
        if writer is not None:
            writer.close()  # also on an error: releases the file
    if writer is None:
        return None, 0, []
    return rows, unmatched, writer.schema.names


def _cells_frame(batch, columns: list[str], names: dict, plate: str, platemap):
    """One joined CytoTable batch as morphoprof's cell rows: renamed columns, plate and well
    filled in where the source has none, the plate map joined (``_matched`` says which rows
    found their well), metadata columns first."""
    df = batch.to_pandas().reindex(columns=columns).rename(columns=names)[list(names.values())]
    if "Metadata_plate" not in df.columns:
        df.insert(0, "Metadata_plate", plate)
    if "Metadata_well" not in df.columns:
        df.insert(1, "Metadata_well", "image" + df["Metadata_ImageNumber"].astype(str))
    df["Metadata_well"] = df["Metadata_well"].astype(str)
    if platemap is not None:
        df = df.merge(platemap, on="Metadata_well", how="left", validate="many_to_one",
                      indicator="_matched")
    meta = [c for c in _CANONICAL.values() if c in df.columns]
    meta += [c for c in df.columns if c.startswith("Metadata_") and c not in meta]
    return df[meta + [c for c in df.columns if c not in meta]]


def _convert(source: Path, dest: Path, preset: str, chunk_size: int):
    """CellProfiler tables -> (the joined schema, an iterator of joined Arrow pages in image
    order), from Parquet chunks of each table under ``dest``.

    A SQLite is first split into part files of one chunk of each table (:func:`_split_sqlite`),
    a CSV folder staged into one SQLite before (:func:`_stage_csv`).
    CytoTable converts each table (image, cells, nuclei, cytoplasm) to Parquet chunks, paged by
    image number, on a thread pool (a process pool costs ~10 s to start for no gain here;
    parsl's run records go in ``dest``, a temporary folder). The compartments are then joined
    here with CytoTable's own join SQL for the preset, one page of images at a time, every
    table filtered to the page (:func:`_paged_join`), as the caller reads the pages.
    CytoTable's own join filters only the cytoplasm to the page, so DuckDB hashed the whole
    cells / nuclei / image tables for every page (2.2 GB peak on a 2.2 GB SQLite); its
    concatenation held the whole table too.
    """
    require("cytotable")
    require("parsl")
    import cytotable
    import cytotable.presets
    from parsl.config import Config
    from parsl.executors import ThreadPoolExecutor

    _offline_duckdb_extensions()
    preset_config = cytotable.presets.config[preset]
    # Page every table by image number (CytoTable pages compartments by the per-image object
    # number, which repeats in every image), so a page of images is a few chunk files.
    page_keys = {name: "ImageNumber" for name in preset_config["CONFIG_PAGE_KEYS"]
                 if name != "join"}
    page_keys["join"] = "Metadata_ImageNumber"
    config = Config(executors=[ThreadPoolExecutor(max_threads=2,
                                                  label=f"morphoprof-{uuid.uuid4().hex[:8]}")],
                    run_dir=str(dest / "runinfo"))
    tables = dest / "tables"
    targets = (*preset_config["CONFIG_NAMES_COMPARTMENTS"], *preset_config["CONFIG_NAMES_METADATA"])
    parts, staged = dest / "parts", dest / "staged.sqlite"
    try:
        read_from = _linear_source(source, staged, parts, targets, chunk_size)
        try:
            # add_tablenumber=False: CytoTable would tell the part files apart by a checksum
            # column (it does so for several image tables); one SQLite gets none either way
            cytotable.convert(source_path=str(read_from), dest_path=str(tables),
                              dest_datatype="parquet", preset=preset, chunk_size=chunk_size,
                              page_keys=page_keys, join=False, concat=False,
                              parsl_config=config, add_tablenumber=False)
        except Exception as exc:  # CytoTable / DuckDB errors carry their own message
            raise InputError(f"{source}: CytoTable ({preset}) could not convert it: "
                             f"{_first_line(exc)}") from exc
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        staged.unlink(missing_ok=True)
    sql = preset_config["CONFIG_JOINS"]
    if preset == PRESETS["csv"]:
        sql = _with_image_metadata(sql, tables)
    schema, pages = _paged_join(sql, tables, _JOIN_ROWS)
    if schema is None:
        raise InputError(f"{source}: CytoTable ({preset}) found no objects to join")
    return schema, pages


def _with_image_metadata(sql: str, tables: Path) -> str:
    """CytoTable's ``cellprofiler_csv`` join plus the image table's metadata columns (plate,
    well, site...: ``Metadata_Plate`` / ``Metadata_Well`` as CytoTable names them in the image
    table, and ``Image_Metadata_*``), which that join leaves out: without them every image of a
    CSV screen was its own well."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((tables / "image").rglob("*.parquet"))
    anchor = "image.Metadata_ImageNumber,"
    if not files or anchor not in sql:
        return sql
    names = pa.unify_schemas([pq.read_schema(f) for f in files],
                             promote_options="permissive").names
    meta = [c for c in names if c in ("Metadata_Plate", "Metadata_Well")
            or c.startswith("Image_Metadata_")]
    return sql.replace(anchor, anchor + "".join(f"\n                image.{quote_identifier(c)},"
                                                for c in meta), 1)


def _linear_source(source: Path, staged: Path, parts: Path, targets: tuple[str, ...],
                   rows: int) -> Path:
    """What CytoTable reads so that its chunk reads take one pass over ``source``: the folder of
    SQLite parts (:func:`_split_sqlite`) of a SQLite, or of a CSV folder staged into one SQLite
    first (:func:`_stage_csv`); ``source`` itself where neither applies."""
    if source.is_file():
        return parts if _split_sqlite(source, parts, targets, rows) else source
    if not _stage_csv(source, staged, targets):
        return source
    try:
        return parts if _split_sqlite(staged, parts, targets, rows) else staged
    finally:
        if parts.is_dir():
            staged.unlink(missing_ok=True)  # the parts hold its rows


# the CSV column types that a SQLite declares and DuckDB's sqlite scanner reads back as such
_STAGED_TYPES = ("BIGINT", "DOUBLE", "VARCHAR")


def _stage_csv(source: Path, staged: Path, targets: tuple[str, ...]) -> bool:
    """Copy the CSVs under folder ``source`` that CytoTable reads (stem equal to one of
    ``targets``, more than a header line) into tables of one SQLite ``staged``, one table per
    stem, with the column types DuckDB's CSV reader gives them (those CytoTable casts its
    chunks to).

    CytoTable reads a chunk of a CSV by parsing the whole file and filtering on its page key,
    so an import took time growing with the square of the CSVs (1.2 GB: 155 s per GB, against
    120 at 0.3 GB). Staged, the tables are split into parts (:func:`_split_sqlite`) and read
    once. Several folders of the same CSVs (a run split into batches, each numbering its
    images from 1) become one table per stem, the images renumbered over the folders in path
    order (:func:`_csv_selects`); CytoTable, which joins on the image number alone, joined
    every folder's objects with every other's. Needs free space about the size of the CSVs in
    ``staged``'s folder (checked first).

    Returns:
        False (nothing written) where one folder's column reads as another type than BIGINT,
        DOUBLE or VARCHAR: that folder is left to CytoTable as it is.
    """
    import duckdb

    tables = _csv_tables(source, targets)
    if not tables:
        return False
    con = duckdb.connect()
    try:
        con.execute("SET threads TO 2")
        selects = _csv_selects(con, tables)
        if selects is None:
            return False
        _check_free_space(staged.parent, sum(p.stat().st_size for fs in tables.values()
                                             for p in fs))
        con.execute(f"ATTACH {_sql_string(staged)} AS staged (TYPE sqlite)")
        for stem in logs.progress_bar(list(selects), desc="staging", unit="table"):
            try:
                con.execute(f"CREATE TABLE staged.{quote_identifier(stem)} AS {selects[stem]}")
            except duckdb.IOException as exc:
                raise InputError(f"cannot write {staged}: {_first_line(exc)}") from exc
            except duckdb.Error as exc:
                raise InputError(f"{_csv_name(tables[stem])}: cannot read it as CSV: "
                                 f"{_first_line(exc)}") from exc
    finally:
        con.close()
    folders = len({p.parent for fs in tables.values() for p in fs})
    logger.info("staged %s into one SQLite%s", source.name, f" ({folders} folders of CSVs, "
                "images renumbered over them in path order)" if folders > 1 else "")
    return True


def _csv_tables(source: Path, targets: tuple[str, ...]) -> dict[str, list[Path]]:
    """The CSVs under ``source`` that CytoTable reads, by stem (those with more than a header
    line, in path order); InputError where the folders holding them do not hold the same
    stems."""
    wanted = {t.lower() for t in targets}
    found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() == ".csv"
                   and p.stem.lower() in wanted)
    stems: dict[Path, set[str]] = {}
    for p in found:
        stems.setdefault(p.parent, set()).add(p.stem)
    every = set().union(*stems.values())
    for folder, have in stems.items():
        if have != every:
            raise InputError(f"{folder}: has {', '.join(sorted(have))} CSVs but not "
                             f"{', '.join(sorted(every - have))}; every folder of CellProfiler "
                             "CSVs needs the same tables")
    tables: dict[str, list[Path]] = {}
    for p in found:
        if _has_rows(p):
            tables.setdefault(p.stem, []).append(p)
    return tables


_FILE = "__morphoprof_file"  # the column naming each row's CSV in a read of several


def _csv_selects(con, tables: dict[str, list[Path]]) -> dict[str, str] | None:
    """One ``SELECT`` per stem reading its CSVs with DuckDB (None where one folder's column
    has another type than BIGINT, DOUBLE or VARCHAR). Several folders' CSVs of a stem are read
    as one (columns unified by name), ``ImageNumber`` shifted by the images of the folders
    before (:func:`_image_offsets`) and other types cast to VARCHAR."""
    import duckdb

    several = any(len(files) > 1 for files in tables.values())
    offsets = _image_offsets(con, tables) if several else {}
    selects = {}
    for stem, files in tables.items():
        paths = ", ".join(_sql_string(p) for p in files)
        read = (f"read_csv_auto([{paths}], header=TRUE, delim=',', union_by_name=true, "
                f"filename='{_FILE}')" if several else
                f"read_csv_auto({paths}, header=TRUE, delim=',')")
        try:
            columns = con.execute(f"DESCRIBE SELECT * FROM {read}").fetchall()
        except duckdb.Error as exc:
            raise InputError(f"{_csv_name(files)}: cannot read it as CSV: "
                             f"{_first_line(exc)}") from exc
        odd = [c for c, t, *_ in columns if t not in _STAGED_TYPES and c != _FILE]
        if not several:
            if odd:
                logger.info("%s has columns of other types (%s); CytoTable reads the CSVs as "
                            "they are", files[0].name, ", ".join(odd[:3]))
                return None
            selects[stem] = f"SELECT * FROM {read}"
            continue
        if "ImageNumber" not in {c for c, *_ in columns}:
            raise InputError(f"{files[0]}: no ImageNumber column, which tells the folders' "
                             "images apart")
        shift = " ".join(f"WHEN {_sql_string(p)} THEN {offsets.get(p.parent, 0)}" for p in files)
        replace = [f"ImageNumber + CASE {_FILE} {shift} END AS ImageNumber",
                   *(f"CAST({quote_identifier(c)} AS VARCHAR) AS {quote_identifier(c)}"
                     for c in odd)]
        selects[stem] = f"SELECT * EXCLUDE ({_FILE}) REPLACE ({', '.join(replace)}) FROM {read}"
    return selects


def _image_offsets(con, tables: dict[str, list[Path]]) -> dict[Path, int]:
    """Each folder's shift of ``ImageNumber``: the images (largest ``ImageNumber`` of its
    ``Image.csv``) of the folders before it in path order. InputError where a folder has
    objects but no image rows."""
    images = {p.parent: p for stem, files in tables.items() if stem.lower() == "image"
              for p in files}
    offsets, total = {}, 0
    for folder in sorted({p.parent for files in tables.values() for p in files}):
        if folder not in images:
            raise InputError(f"{folder}: has objects but its Image CSV has no rows")
        offsets[folder] = total
        try:
            top = con.execute(f"SELECT max(ImageNumber) FROM read_csv_auto("
                              f"{_sql_string(images[folder])}, header=TRUE, delim=',')"
                              ).fetchone()[0]
        except Exception as exc:  # DuckDB: unreadable, or no ImageNumber column
            raise InputError(f"{images[folder]}: cannot read its ImageNumber: "
                             f"{_first_line(exc)}") from exc
        total += int(top or 0)
    return offsets


def _csv_name(files: list[Path]) -> str:
    """The CSV an error names: the file, or the first of several with ``(and N more)``."""
    return str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"


def _has_rows(path: Path) -> bool:
    """Whether a CSV has a line after its header (CytoTable skips those that have not)."""
    with path.open("rb") as f:
        return bool(f.readline() and f.readline())


def _sql_string(path: Path) -> str:
    """``path`` as a SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message (DuckDB's run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_CREATE_TABLE = re.compile(r'^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?'
                           r'(?:"(?:[^"]|"")+"|\[[^\]]+\]|`[^`]+`|[^\s(]+)', re.IGNORECASE)


def _split_sqlite(source: Path, dest: Path, targets: tuple[str, ...], rows: int) -> bool:
    """Copy ``source``'s tables that CytoTable reads into SQLite files of about ``rows`` rows
    of each table (cut where the image changes, :func:`_rowid_chunks`),
    ``dest/part-00000.sqlite``..., reading every table once in rowid order.

    CytoTable reads a chunk of a SQLite table with a filter on its page key, which DuckDB's
    sqlite scanner does not hand to SQLite: every chunk read the whole table, so an import took
    time growing with the square of the file. Each part file is one chunk, read in one scan of
    the part. The tables kept are those whose name holds one of ``targets`` (CytoTable's rule),
    with their declared schema. Needs free space about the size of ``source`` in ``dest``
    (checked first: InputError naming the import's output folder).

    Returns:
        False (nothing kept in ``dest``) when a table has no rowid (``WITHOUT ROWID``) or no
        table has rows: such a file is left to CytoTable as it is.
    """
    try:
        con = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{source}: cannot read it as SQLite ({exc})") from exc
    try:
        try:
            found = con.execute("select name, sql from sqlite_master where type = 'table'"
                                ).fetchall()
            keep = {n: sql for n, sql in found if any(t.lower() in n.lower() for t in targets)}
            chunks = {n: _rowid_chunks(con, n, rows) for n in keep}
        except sqlite3.DatabaseError as exc:
            if "rowid" in str(exc):  # "no such column: rowid": a WITHOUT ROWID table
                return False
            raise InputError(f"{source}: cannot read it as SQLite ({exc})") from exc
        n_parts = max([len(c) for c in chunks.values()] + [0])
        if n_parts == 0:
            return False
        _check_free_space(dest.parent, source.stat().st_size)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for k in logs.progress_bar(range(n_parts), desc="splitting", unit="part"):
                _write_part(con, dest / f"part-{k:05d}.sqlite", keep,
                            {n: c[k] for n, c in chunks.items() if k < len(c)})
        except (OSError, sqlite3.DatabaseError) as exc:
            raise InputError(f"cannot write {dest}: {exc}") from exc
    finally:
        con.close()
    logger.info("split %s into %d part files of about %d rows of each table; CytoTable converts "
                "them", source.name, n_parts, rows)
    return True


def _check_free_space(work: Path, needed: int) -> None:
    """InputError when the file system of ``work`` (a folder in the import's output folder) has
    fewer than ``needed`` bytes free."""
    free = shutil.disk_usage(work).free
    if free < needed:
        raise InputError(f"not enough free space in {work.parent}: the import needs about "
                         f"{_size(needed)} while it runs (the tables copied into parts), "
                         f"{_size(free)} free")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _rowid_chunks(con, table: str, rows: int) -> list[tuple[int, int]]:
    """``table``'s rowids cut into (first, last) ranges of about ``rows`` rows, in one pass over
    its rowids in order. A range is closed only where ``ImageNumber`` changes (where the table
    has one), so that an image's objects stored together stay in one part and the parts'
    image ranges do not overlap."""
    q = quote_identifier(table)
    cols = {r[1].lower() for r in con.execute(f"pragma table_info({q})")}
    image = "ImageNumber" if "imagenumber" in cols else "NULL"
    chunks, first, last, prev, n = [], None, None, None, 0
    for rowid, img in con.execute(f"select rowid, {image} from {q} order by rowid"):
        if n >= rows and (img is None or img != prev):
            chunks.append((first, last))
            n = 0
        if n == 0:
            first = rowid
        last, prev, n = rowid, img, n + 1
    if n:
        chunks.append((first, last))
    return chunks


def _write_part(con, part: Path, schemas: dict[str, str],
                ranges: dict[str, tuple[int, int]]) -> None:
    """The rows of each table in ``ranges`` (first, last rowid) into a new SQLite ``part``,
    with the table's declared schema (``schemas``: its ``CREATE TABLE`` statement)."""
    con.execute("attach database ? as part", (str(part),))
    try:
        con.execute("pragma part.journal_mode = off")
        con.execute("pragma part.synchronous = off")
        for name, (first, last) in ranges.items():
            q = quote_identifier(name)
            con.execute(_CREATE_TABLE.sub(f"CREATE TABLE part.{q}", schemas[name], count=1))
            con.execute(f"insert into part.{q} select * from main.{q} "
                        "where rowid between ? and ?", (first, last))
        con.commit()
    finally:
        con.execute("detach database part")


_READ_PARQUET = re.compile(r"read_parquet\('([\w.-]+)\.parquet'\)")


def _image_range(path: Path) -> tuple[int, int] | None:
    """(min, max) ``Metadata_ImageNumber`` of a Parquet file, from its statistics."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    col = meta.schema.names.index("Metadata_ImageNumber")
    lo, hi = None, None
    for i in range(meta.num_row_groups):
        st = meta.row_group(i).column(col).statistics
        if st is None or not st.has_min_max:
            return None
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    return None if lo is None else (int(lo), int(hi))


def _images(lo: int, hi: int) -> list[tuple]:
    """A pyarrow filter: ``lo <= Metadata_ImageNumber <= hi``."""
    return [("Metadata_ImageNumber", ">=", lo), ("Metadata_ImageNumber", "<=", hi)]


def _read_page(files: list[Path], lo: int, hi: int):
    """The rows of ``files`` (one table's chunks) with ``lo <= Metadata_ImageNumber <= hi``,
    as one Arrow table (columns unified by name across the chunks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [pq.read_table(f, filters=_images(lo, hi)) for f in files]
    return pa.concat_tables(parts, promote_options="permissive")


def _subpages(ids, lo: int, hi: int, rows: int) -> list[tuple[int, int]]:
    """``[lo, hi]`` cut at image boundaries into ranges of about ``rows`` objects, from the
    objects' image numbers ``ids`` (an array)."""
    import numpy as np

    ids = np.sort(np.asarray(ids))
    starts = np.unique(ids[::max(rows, 1)]) if len(ids) else np.array([lo])
    starts[0] = lo
    ends = np.append(starts[1:] - 1, hi)
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def _image_numbers(files: list[Path], lo: int, hi: int):
    """The ``Metadata_ImageNumber`` of ``files``' rows within ``[lo, hi]`` (an array), read
    from that column only."""
    import numpy as np
    import pyarrow.parquet as pq

    return np.concatenate([pq.read_table(f, columns=["Metadata_ImageNumber"],
                                         filters=_images(lo, hi)).column(0).to_numpy()
                           for f in files])


def _join_page(query: str, tables: dict):
    """``query`` (a join over ``"page_<name>"``) run by DuckDB on the Arrow ``tables``, in
    image order."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET threads TO 2")
        for name, table in tables.items():
            con.register(f"page_{name}", table)
        table = con.execute(query).to_arrow_table()
    finally:
        con.close()
    seen: set[str] = set()  # a name twice (image metadata CellProfiler also wrote into each
    keep = [i for i, n in enumerate(table.column_names)  # object table): the first kept
            if not (n in seen or seen.add(n))]
    if len(keep) < table.num_columns:
        table = table.select(keep)
    return table.sort_by("Metadata_ImageNumber")  # pyarrow: less memory than DuckDB's sort


def _paged_join(sql: str, tables: Path, rows: int = 1000):
    """Run a CytoTable join statement page by page, every table filtered to the page.

    The pages are the first table's chunks (the cytoplasm, which the join starts from), cut
    into runs of about ``rows`` objects at image boundaries. Each ``read_parquet('<table>.
    parquet')`` of ``sql`` becomes that table's rows of the page, read from its chunk files
    under ``tables/<table>/`` with pyarrow and handed to DuckDB as an Arrow table. Memory stays
    that of a page of each table. (DuckDB reading these ~600-column Parquet files itself takes
    a 256 KiB buffer per column and thread, ~0.5 GB a page, and its allocator kept growing over
    the pages: 2.2 GB peak on a 2.2 GB SQLite.)

    Returns:
        (schema, pages): the joined schema (the join run on no rows of each table's schema,
        unified over its chunk files) and an iterator of the joined pages (Arrow tables with
        rows, in image order); (None, None) when the first table has no chunk.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(_READ_PARQUET.findall(sql)))
    chunks: dict[str, list[tuple[int, int, Path]]] = {}
    for name in names:
        found = []
        for f in sorted((tables / name).rglob("*.parquet")):
            r = _image_range(f)
            if r is not None:
                found.append((*r, f))
        chunks[name] = sorted(found, key=lambda t: t[:2])
    if not names or not chunks[names[0]]:
        return None, None
    merged: list[list[int]] = []  # the first table's image ranges, overlaps merged
    for lo, hi, _ in chunks[names[0]]:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])

    def hits(name: str, lo: int, hi: int) -> list[Path]:
        found = [f for a, b, f in chunks[name] if a <= hi and b >= lo]
        # a table without these images: an empty page of it
        return found or ([chunks[name][0][2]] if chunks[name] else [])

    query = _READ_PARQUET.sub(lambda m: f'"page_{m[1]}"', sql)
    schema = _join_page(query, {n: pa.unify_schemas(
        [pq.read_schema(f) for *_, f in chunks[n]], promote_options="permissive").empty_table()
        for n in names}).schema

    def pages():
        for lo, hi in logs.progress_bar(merged, desc="joining", unit="chunk"):
            for a, b in _subpages(_image_numbers(hits(names[0], lo, hi), lo, hi), lo, hi, rows):
                table = _join_page(query, {n: _read_page(hits(n, a, b), a, b) for n in names})
                if table.num_rows:
                    yield table

    return schema, pages()
