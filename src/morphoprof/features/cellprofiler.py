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
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from morphoprof import logs
from morphoprof.errors import InputError, first_line, os_reason
from morphoprof.extras import require
from morphoprof.features.cellprofiler_parts import (
    csv_files,
    csv_prefix,
    linear_source,
    sqlite_prefix,
)
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
# plate and well as CytoTable names them in a CSV image table (identifying columns: no prefix)
_CSV_IMAGE_KEYS = ("Metadata_Plate", "Metadata_Well")
# rows per CytoTable chunk by default (import_cellprofiler and import --chunk-size)
CHUNK_SIZE = 5000
_JOIN_ROWS = 2500  # objects per joined page and per written batch (~36 MB at 1,800 columns)


def detect_kind(path: str | Path) -> str:
    """``csv`` (a folder of ExportToSpreadsheet CSVs, in it or in folders below it, e.g. one
    per batch), ``sqlite`` (ExportToDatabase: ``Per_*`` tables) or ``cytominer-database``
    (``Image`` / ``Cells`` ... tables); InputError otherwise."""
    path = Path(path)
    if path.is_dir():
        names = sorted({p.name for p in csv_files(path)})
        try:
            if csv_prefix([n[:-len(".csv")] for n in names]) is not None:
                return "csv"
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc
        raise InputError(f"{path}: a CellProfiler CSV folder needs Image.csv and Cells.csv / "
                         f"Nuclei.csv / Cytoplasm.csv (or their names after one prefix, "
                         f"MyExpt_Image.csv...); found {names[:20] or 'no CSV'}")
    if not path.is_file():
        raise InputError(f"not found: {path}")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = {r[0].lower() for r in
                      con.execute("select name from sqlite_master where type='table'")}
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path}: not a CellProfiler CSV folder or SQLite file ({exc})") from exc
    prefix = sqlite_prefix(sorted(tables)).lower()
    if f"{prefix}per_image" in tables:
        if not tables & {f"{prefix}per_{c}" for c in ("cells", "nuclei", "cytoplasm")}:
            raise InputError(f"{path}: an ExportToDatabase SQLite without Per_Cells / "
                             f"Per_Nuclei / Per_Cytoplasm tables (it has {sorted(tables)}); "
                             "export one table per object type (a single Per_Object table is "
                             "not read)")
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
        if c in _CSV_IMAGE_KEYS:
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
            first split into part files of ``chunk_size`` rows of each table, a folder of CSVs
            first copied into one SQLite (``cellprofiler_parts.linear_source``), so each chunk
            is one read of a small file and time grows in step with the source (CytoTable
            reading a chunk straight from a SQLite scans the whole table, from a CSV parses the
            whole file: time grew with the square of the source). Needs free space in ``out``
            about the size of the SQLite or CSVs while it runs.

    The work goes on in ``out/.import-work``, removed at the end or on an error. An import
    interrupted (Ctrl-C, a killed process) leaves it: run the same command again and the
    tables it had converted (the longest part) are reused, where the source, preset and
    chunk size are unchanged (:func:`_work_folder`).

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
        files = [path] if path.is_file() else csv_files(path)
        work = _work_folder(out / ".import-work", path, files, PRESETS[kind], chunk_size)
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc}") from exc
    t0 = time.perf_counter()
    keep = False
    try:
        schema, pages = _convert(path, work, PRESETS[kind], chunk_size)
        names, dropped = _rename(schema.names)
        notes = _source_notes(path, files, set(names.values()), plate or path.stem)
        tmp = work / "cells.parquet"
        frames = (_cells_frame(t, schema.names, names, plate or path.stem, pm) for t in pages)
        rows, unmatched, written = _write_cells(frames, tmp, pm is not None)
        if rows is None:
            raise InputError(f"{path}: no objects to import")
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write {target}: {os_reason(exc)}") from exc
    except InputError:
        raise
    except BaseException:  # interrupted (Ctrl-C...): the next run resumes from the work folder
        keep = True
        raise
    finally:
        if not keep:
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


def _source_notes(path: Path, files: list[Path], columns: set[str], plate: str) -> list[str]:
    """What the user should know about the cells' metadata: a plate or well the source lacks
    (``columns``: the cell table's), image numbers counted over batch folders of CSVs
    (``files``: the source's CSVs, where it is a folder)."""
    notes = []
    if "Metadata_plate" not in columns:
        notes.append(f"note: {path.name} has no plate metadata; Metadata_plate = {plate!r}")
    if "Metadata_well" not in columns:
        notes.append(f"note: {path.name} has no well metadata; each image is its own well "
                     "(Metadata_well = image<ImageNumber>)")
    image = f"{csv_prefix([f.stem for f in files]) or ''}image".lower() if path.is_dir() else ""
    folders = len({f.parent for f in files if f.stem.lower() == image})
    if folders > 1:
        notes.append(f"note: {path.name} holds {folders} folders of CSVs; Metadata_ImageNumber "
                     "counts the images over them in path order")
    return notes


def _work_folder(work: Path, source: Path, files: list[Path], preset: str,
                 chunk_size: int) -> Path:
    """The import's work folder ``work``, kept from an interrupted import of the same source
    (path, and size and modification time of its ``files``), preset and chunk size that had
    converted its tables (``tables.done``), so that they are reused (:func:`_convert`);
    emptied otherwise (an interrupted split or conversion starts over). Its ``source.json``
    says what it holds."""
    stats = [f.stat() for f in files]
    stamp = {"format": 1, "source": str(source.resolve()), "preset": preset,
             "chunk_size": chunk_size, "files": len(stats),
             "bytes": sum(st.st_size for st in stats),
             "modified_ns": max((st.st_mtime_ns for st in stats), default=0)}
    manifest = work / "source.json"
    if work.is_dir():
        try:
            if json.loads(manifest.read_text()) == stamp and (work / "tables.done").exists():
                return work
        except (OSError, ValueError):
            pass
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_json(manifest, stamp)
    return work


def _write_cells(frames, path: Path, joined: bool) -> tuple[int | None, int, list[str]]:
    """Write cell frames into one Parquet file (the first frame's schema; later ones cast to
    it): (rows, rows without a plate-map well, column names); rows None when there were no
    frames. ``joined``: the frames carry ``_matched`` from the plate-map join."""
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
    """CellProfiler tables -> (the joined schema, an iterator of joined Arrow pages in image order),
    from Parquet chunks of each table under ``dest``.

    A SQLite is first split into part files of one chunk of each table, a CSV folder staged
    into one SQLite before (:func:`~morphoprof.features.cellprofiler_parts.linear_source`).
    CytoTable converts each table (image, cells, nuclei, cytoplasm) to Parquet chunks, paged by
    image number, on a thread pool (a process pool costs ~10 s to start for no gain here;
    parsl's run records go in ``dest``, the import's work folder). Converted tables are marked
    done (``dest/tables.done``): a rerun after an interruption reuses them. The compartments
    are then joined here with CytoTable's own join SQL for the preset (plus the image metadata,
    :func:`_with_image_metadata`), one page of images at a time, every table filtered to the
    page (:func:`_paged_join`), as the caller reads the pages. CytoTable's own join filters
    only the cytoplasm to the page, so DuckDB hashed the whole cells / nuclei / image tables
    for every page (2.2 GB peak on a 2.2 GB SQLite); its concatenation held the whole table
    too.
    """
    require("cytotable")
    require("parsl")
    import cytotable
    import cytotable.presets
    import duckdb
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
    done = dest / "tables.done"
    if done.exists():
        logger.info("resuming: the tables an interrupted import of %s converted are reused (%s)",
                    source.name, tables)
    else:
        _cytotable_convert(source, dest, preset, chunk_size, page_keys, config, targets)
        done.touch()
    sql = _with_image_metadata(preset_config["CONFIG_JOINS"], tables)
    try:
        schema, pages = _paged_join(sql, tables, _JOIN_ROWS)
    except duckdb.Error as exc:  # a column the preset's join names is missing
        raise InputError(f"{source}: its tables do not join as CytoTable's {preset} preset "
                         f"expects: {first_line(exc)}") from exc
    if schema is None:
        raise InputError(f"{source}: CytoTable ({preset}) found no objects to join")
    return schema, pages


def _cytotable_convert(source: Path, dest: Path, preset: str, chunk_size: int,
                       page_keys: dict, config, targets: tuple[str, ...]) -> None:
    """CytoTable's conversion of ``source``'s tables to Parquet chunks under ``dest/tables``,
    read from its parts (:func:`~morphoprof.features.cellprofiler_parts.linear_source`), which
    are removed after."""
    import cytotable

    parts, staged = dest / "parts", dest / "staged.sqlite"
    try:
        read_from = linear_source(source, staged, parts, targets, chunk_size)
        try:
            # add_tablenumber=False: CytoTable would tell the part files apart by a checksum
            # column (it does so for several image tables); one SQLite gets none either way
            cytotable.convert(source_path=str(read_from), dest_path=str(dest / "tables"),
                              dest_datatype="parquet", preset=preset, chunk_size=chunk_size,
                              page_keys=page_keys, join=False, concat=False,
                              parsl_config=config, add_tablenumber=False)
        except Exception as exc:  # CytoTable / DuckDB errors carry their own message
            raise InputError(f"{source}: CytoTable ({preset}) could not convert it: "
                             f"{first_line(exc)}") from exc
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        staged.unlink(missing_ok=True)


_IMAGE_ID = re.compile(r"^(\s*)(\w*image)\.Metadata_ImageNumber,\n", re.MULTILINE)


def _with_image_metadata(sql: str, tables: Path) -> str:
    """A CytoTable join with the image metadata columns the image table has: plate, well,
    site... (``Image_Metadata_*``, and ``Metadata_Plate`` / ``Metadata_Well`` as CytoTable names
    them in a CSV image table). The presets name fixed columns instead: the CSV one none (every
    image of a CSV screen was its own well), the SQLite ones well and plate (a SQLite without
    plate metadata failed to join)."""
    found = _IMAGE_ID.search(sql)
    files = sorted((tables / found[2]).rglob("*.parquet")) if found else []
    if not files:
        return sql
    alias, indent = found[2], found[1]
    names = pa.unify_schemas([pq.read_schema(f) for f in files],
                             promote_options="permissive").names
    meta = [c for c in names if c in _CSV_IMAGE_KEYS or c.startswith("Image_Metadata_")]
    sql = re.sub(rf"^\s*{alias}\.Image_Metadata_\w+,\n", "", sql, flags=re.MULTILINE)
    return sql.replace(found[0], found[0] + "".join(
        f"{indent}{alias}.{quote_identifier(c)},\n" for c in meta), 1)


_READ_PARQUET = re.compile(r"read_parquet\('([\w.-]+)\.parquet'\)")


def _image_range(path: Path) -> tuple[int, int] | None:
    """(min, max) ``Metadata_ImageNumber`` of a Parquet file, from its statistics."""
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
    parts = [pq.read_table(f, filters=_images(lo, hi)) for f in files]
    return pa.concat_tables(parts, promote_options="permissive")


def _subpages(ids, lo: int, hi: int, rows: int) -> list[tuple[int, int]]:
    """``[lo, hi]`` cut at image boundaries into ranges of about ``rows`` objects, from the
    objects' image numbers ``ids`` (an array)."""
    ids = np.sort(np.asarray(ids))
    starts = np.unique(ids[::max(rows, 1)]) if len(ids) else np.array([lo])
    starts[0] = lo
    ends = np.append(starts[1:] - 1, hi)
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def _image_numbers(files: list[Path], lo: int, hi: int):
    """The ``Metadata_ImageNumber`` of ``files``' rows within ``[lo, hi]`` (an array), read
    from that column only."""
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
