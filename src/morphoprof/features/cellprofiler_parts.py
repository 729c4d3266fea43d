"""Making CellProfiler outputs quick for CytoTable to read: a SQLite split into part files of one
chunk each, a folder (or batch folders) of CSVs first staged into one SQLite.

CytoTable reads a chunk of a table with a filter on its page key. Neither DuckDB's sqlite scanner
nor its CSV reader can skip to the chunk: each read scans the whole table (a SQLite) or parses the
whole file (a CSV), so an import took time growing with the square of the source. Each part file
here is one chunk, read in one scan of the part.
"""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
from pathlib import Path

from morphoprof import logs
from morphoprof.errors import InputError, first_line
from morphoprof.io_utils import quote_identifier

logger = logging.getLogger(__name__)


def linear_source(source: Path, staged: Path, parts: Path, targets: tuple[str, ...],
                  rows: int) -> Path:
    """What CytoTable should read so that reading its chunks takes one pass over ``source``.

    Args:
        source: a CellProfiler SQLite, or a folder of CSVs (or of batch folders of them).
        staged: where a CSV folder's tables are first copied (one SQLite; removed once split).
        parts: the folder the part files go to (the caller removes it when CytoTable is done).
        targets: the table names CytoTable reads (its preset's compartments and metadata).
        rows: about how many rows of each table a part holds (CytoTable's chunk size).

    Returns:
        ``parts`` (:func:`_split_sqlite` of the SQLite, or of the CSVs staged by
        :func:`_stage_csv`), ``staged`` where its split was not possible, or ``source`` where
        neither applies (a ``WITHOUT ROWID`` table; a CSV column of another type).
    """
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

    tables, prefix = _csv_tables(source, targets)
    if not tables:
        return False
    con = duckdb.connect()
    try:
        con.execute("SET threads TO 2")
        selects = _csv_selects(con, tables, source, prefix)
        if selects is None:
            return False
        _check_free_space(staged.parent, sum(p.stat().st_size for fs in tables.values()
                                             for p in fs))
        con.execute(f"ATTACH {_sql_string(staged)} AS staged (TYPE sqlite)")
        for stem in logs.progress_bar(list(selects), desc="staging", unit="table"):
            try:
                con.execute(f"CREATE TABLE staged.{quote_identifier(stem)} AS {selects[stem]}")
            except duckdb.Error as exc:  # SQLite's "database or disk is full" among them
                if isinstance(exc, duckdb.IOException) or "disk" in str(exc).lower():
                    raise InputError(f"cannot write {staged}: {first_line(exc)}") from exc
                raise InputError(f"{_csv_name(tables[stem])}: cannot read it as CSV: "
                                 f"{first_line(exc)}") from exc
    finally:
        con.close()
    folders = len({p.parent for fs in tables.values() for p in fs})
    logger.info("staged %s into one SQLite%s", source.name, f" ({folders} folders of CSVs, "
                "images renumbered over them in path order)" if folders > 1 else "")
    return True


def csv_prefix(stems: list[str]) -> str | None:
    """The prefix CellProfiler's ExportToSpreadsheet put before its tables' names (``MyExpt_``
    by default: ``MyExpt_Image.csv``, ``MyExpt_Cells.csv``...) among CSV file stems: ``""``
    for unprefixed names, None where no image table has a compartment table beside it.
    InputError where several prefixes do."""
    lower = {s.lower() for s in stems}
    found = {s[:-len("image")] for s in stems if s.lower().endswith("image")
             and any(f"{s[:-len('image')]}{c}".lower() in lower
                     for c in ("cells", "nuclei", "cytoplasm"))}
    if "" in found or not found:
        return "" if found else None
    if len(found) > 1:
        raise InputError(f"CSVs of several CellProfiler exports side by side (file name "
                         f"prefixes {', '.join(sorted(found))}); import each on its own")
    return found.pop()


def csv_files(folder: Path) -> list[Path]:
    """The CSV files in ``folder`` and the folders below it, in path order (``.csv`` in any
    case: ``Image.CSV`` too)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".csv")


def _csv_tables(source: Path, targets: tuple[str, ...]) -> tuple[dict[str, list[Path]], str]:
    """The CSVs under ``source`` that CytoTable reads (those with more than a header line, in
    path order) by table name (the stem without the export's prefix, :func:`csv_prefix`), and
    the prefix; InputError where the folders holding them do not hold the same tables."""
    csvs = csv_files(source)
    prefix = csv_prefix([p.stem for p in csvs]) or ""
    wanted = {f"{prefix}{t}".lower() for t in targets}
    found = [p for p in csvs if p.stem.lower() in wanted]
    names: dict[Path, set[str]] = {}
    for p in found:
        names.setdefault(p.parent, set()).add(p.stem[len(prefix):])
    every = set().union(*names.values())
    for folder, have in names.items():
        if have != every:
            raise InputError(f"{folder}: has {', '.join(sorted(have))} CSVs but not "
                             f"{', '.join(sorted(every - have))}; every folder of CellProfiler "
                             "CSVs needs the same tables")
    tables: dict[str, list[Path]] = {}
    for p in found:
        if _has_rows(p):
            tables.setdefault(p.stem[len(prefix):], []).append(p)
    return tables, prefix


_FILE = "__morphoprof_file"  # the column naming each row's CSV in a read of several


def _csv_selects(con, tables: dict[str, list[Path]], source: Path,
                 prefix: str) -> dict[str, str] | None:
    """One ``SELECT`` per table reading its CSVs with DuckDB. Several folders' CSVs of a table
    are read as one (columns unified by name), ``ImageNumber`` shifted by the images of the
    folders before (:func:`_image_offsets`), and the image table gains ``Metadata_Folder``,
    each image's folder below ``source`` (the cells' ``Metadata_Folder``), unless it has such
    a column. Columns of another type than BIGINT, DOUBLE or VARCHAR are cast to VARCHAR where
    the CSVs must be staged (several folders, or an export ``prefix`` that CytoTable does not
    read); None otherwise (one folder: CytoTable reads it as it is)."""
    import duckdb

    several = any(len(files) > 1 for files in tables.values())
    offsets = _image_offsets(con, tables) if several else {}
    selects = {}
    for name, files in tables.items():
        paths = ", ".join(_sql_string(p) for p in files)
        read = (f"read_csv_auto([{paths}], header=TRUE, delim=',', union_by_name=true, "
                f"filename='{_FILE}')" if several else
                f"read_csv_auto({paths}, header=TRUE, delim=',')")
        try:
            types = {c: t for c, t, *_ in con.execute(f"DESCRIBE SELECT * FROM {read}")
                     .fetchall()}
        except duckdb.Error as exc:
            raise InputError(f"{_csv_name(files)}: cannot read it as CSV: "
                             f"{first_line(exc)}") from exc
        columns = list(types)
        odd = [c for c in columns if types[c] not in _STAGED_TYPES and c != _FILE]
        if odd and not (several or prefix):
            logger.info("%s has columns of other types (%s); CytoTable reads the CSVs as "
                        "they are", files[0].name, ", ".join(odd[:3]))
            return None
        replace = [f"CAST({quote_identifier(c)} AS VARCHAR) AS {quote_identifier(c)}"
                   for c in odd]
        extra = ""
        if several:
            replace.append(_shifted_image_number(files, columns, offsets))
            if name.lower() == "image" and "Metadata_Folder" not in columns:
                folders = " ".join(f"WHEN {_sql_string(p)} THEN "
                                   f"{_sql_string(p.parent.relative_to(source).as_posix())}"
                                   for p in files)
                extra = f", CASE {_FILE} {folders} END AS Metadata_Folder"
        select = f"SELECT * EXCLUDE ({_FILE})" if several else "SELECT *"
        if replace:
            select += f" REPLACE ({', '.join(replace)})"
        selects[name] = f"{select}{extra} FROM {read}"
    return selects


def _shifted_image_number(files: list[Path], columns: list[str],
                          offsets: dict[Path, int]) -> str:
    """The ``REPLACE`` item giving each row of ``files`` (read as one) its image number shifted
    by its folder's offset."""
    if "ImageNumber" not in columns:
        raise InputError(f"{files[0]}: no ImageNumber column, which tells the folders' images "
                         "apart")
    shift = " ".join(f"WHEN {_sql_string(p)} THEN {offsets.get(p.parent, 0)}" for p in files)
    return f"ImageNumber + CASE {_FILE} {shift} END AS ImageNumber"


def _image_offsets(con, tables: dict[str, list[Path]]) -> dict[Path, int]:
    """Each folder's shift of ``ImageNumber``: the images (largest ``ImageNumber`` of its
    ``Image.csv``) of the folders before it in path order. InputError where a folder has
    objects but no image rows."""
    import duckdb

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
        except duckdb.Error as exc:  # unreadable, or no ImageNumber column
            raise InputError(f"{images[folder]}: cannot read its ImageNumber: "
                             f"{first_line(exc)}") from exc
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
            prefix = sqlite_prefix([n for n, _ in found])
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
                _write_part(con, dest / f"part-{k:05d}.sqlite", keep, prefix,
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


def sqlite_prefix(tables: list[str]) -> str:
    """The prefix CellProfiler's ExportToDatabase put before its table names (its "add a
    prefix to table names" setting: ``MyExpt_Per_Image``...), ``""`` where none."""
    return next((t[:-len("per_image")] for t in tables if t.lower().endswith("per_image")), "")


def _write_part(con, part: Path, schemas: dict[str, str], prefix: str,
                ranges: dict[str, tuple[int, int]]) -> None:
    """The rows of each table in ``ranges`` (first, last rowid) into a new SQLite ``part``,
    with the table's declared schema (``schemas``: its ``CREATE TABLE`` statement), named
    without the export's ``prefix`` (the names CytoTable's presets join)."""
    con.execute("attach database ? as part", (str(part),))
    try:
        con.execute("pragma part.journal_mode = off")
        con.execute("pragma part.synchronous = off")
        for name, (first, last) in ranges.items():
            bare = name[len(prefix):] if name.lower().startswith(prefix.lower()) else name
            q = quote_identifier(bare)
            con.execute(_CREATE_TABLE.sub(f"CREATE TABLE part.{q}", schemas[name], count=1))
            con.execute(f"insert into part.{q} select * from main.{quote_identifier(name)} "
                        "where rowid between ? and ?", (first, last))
        con.commit()
    finally:
        con.execute("detach database part")
