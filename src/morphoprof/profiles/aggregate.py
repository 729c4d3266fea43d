"""Aggregation of single-cell or field features into well and treatment profiles.

Input and output are DataFrames in the cytomining convention: ``Metadata_*`` columns, then
features. Cells -> sites -> wells -> treatments; each level carries ``Metadata_count``, the number
of rows it summarises, and the next level sums it (``Metadata_n_sites`` etc. are not invented).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.types as pt

from morphoprof.errors import InputError
from morphoprof.index.schema import BATCH, COMPOUND, CONCENTRATION, MOA, PLATE, WELL
from morphoprof.io_utils import all_utf8, arrow_file, quote_identifier
from morphoprof.logs import progress_bar
from morphoprof.shards import (
    MANIFEST,
    feature_columns,
    not_a_feature,
    require_numeric_features,
    shard_files,
)

COUNT = "Metadata_count"
WELL_KEY = [PLATE, WELL]
TREATMENT_KEY = [COMPOUND, CONCENTRATION]


AGGREGATIONS = ("mean", "median", "modz")


def modz(x: np.ndarray, min_weight: float = 0.01, precision: int | None = 4) -> np.ndarray:
    """The moderated z-score (MODZ) consensus of replicate profiles (CMap, Subramanian 2017):
    a weighted mean whose weights favour the replicates that agree with the others.

    Each replicate's weight is its mean Spearman correlation (over features) with the other
    replicates, negative correlations counted as 0, floored at ``min_weight``, the weights
    normalised to sum to 1 and, as pycytominer's ``modz`` does, rounded to ``precision``
    decimals (``None``: not rounded).

    Args:
        x: ``(n_replicates, n_features)`` profiles.

    Returns:
        ``(n_features,)`` consensus profile (one replicate: itself).
    """
    from scipy.stats import rankdata

    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return x[0].copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(rankdata(x, axis=1))  # constant replicates: NaN, counted as 0
    corr = np.nan_to_num(np.clip(corr, 0, None), nan=0.0)
    np.fill_diagonal(corr, 0.0)
    raw = np.maximum(corr.sum(1) / (len(x) - 1), min_weight)
    weights = raw / raw.sum()
    if precision is not None:
        weights = np.round(weights, precision)
    return weights @ x


def aggregate(
    df: pd.DataFrame,
    by: Sequence[str],
    how: str = "mean",
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Average (``mean``), take the median (``median``) or the MODZ consensus (``modz``, see
    :func:`modz`) of features within groups.

    Metadata columns that are constant within every group are kept (others are dropped, except
    ``Metadata_batch``, which becomes a sorted ``;``-joined list of the group's batches).
    ``Metadata_count`` is the number of input rows per group (or their summed counts).

    Args:
        df: rows to aggregate, ``Metadata_*`` columns plus features.
        by: metadata columns defining a group, e.g. ``[Metadata_plate, Metadata_well]``.
        how: ``mean``, ``median`` or ``modz``.
        features: feature columns (default: every non-metadata column).

    Returns:
        One row per group, sorted by ``by``.
    """
    if how not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise InputError(f"cannot aggregate by {missing}: not in the table's columns")
    if len(df) == 0:
        raise InputError("cannot aggregate an empty table")
    if features is None:
        require_numeric_features(df, "the table", exclude=by)
    feats = list(features) if features is not None else [
        c for c in feature_columns(df) if c not in by]
    groups = df.groupby(list(by), sort=True, dropna=False)
    if how == "modz":
        agg = groups[feats].apply(lambda g: pd.Series(modz(g.to_numpy()), index=feats))
    else:
        agg = groups[feats].agg(how)
    values = pd.DataFrame(agg.to_numpy(np.float32), index=agg.index, columns=feats)
    meta_cols = [c for c in df.columns if c.startswith("Metadata_") and c not in by and c != COUNT]
    constant = groups[meta_cols].nunique(dropna=False).le(1).all()
    keep = [c for c in meta_cols if constant[c]]
    meta = groups[keep].first() if keep else pd.DataFrame(index=values.index)
    if BATCH in meta_cols and BATCH not in keep:
        meta[BATCH] = groups[BATCH].agg(lambda s: ";".join(sorted(set(map(str, s)))))
    count = groups[COUNT].sum() if COUNT in df.columns else groups.size()
    meta[COUNT] = count.astype(np.int64)
    out = pd.concat([meta, values], axis=1).reset_index()
    ordered = [c for c in out.columns if c.startswith("Metadata_") or c in by] + feats
    return out[ordered]


def well_profiles(df: pd.DataFrame, how: str = "mean") -> pd.DataFrame:
    """Per-well profiles (plate x well) from field or cell rows."""
    return aggregate(df, WELL_KEY, how)


def treatment_profiles(
    wells: pd.DataFrame, how: str = "median", exclude_controls: bool = True
) -> pd.DataFrame:
    """Per-treatment (compound x concentration) profiles from well profiles.

    ``Metadata_batch`` lists the treatment's batches (``;``-joined); ``Metadata_moa`` is kept when
    consistent. DMSO / control rows are dropped by default, as in the BBBC021 protocol.
    """
    rows = wells
    if exclude_controls and "Metadata_control" in rows.columns:
        rows = rows[~rows["Metadata_control"].astype(bool)]
    if len(rows) == 0:
        raise InputError("no treated wells to build treatment profiles from")
    out = aggregate(rows, TREATMENT_KEY, how)
    if MOA in out.columns:
        out[MOA] = out[MOA].fillna("").astype(str)
    return out


def parquet_sources(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve a feature folder (its manifest's shards), a Parquet file, a folder of Parquet files
    or a list of files into the list of Parquet files to read. Raises InputError naming what is
    missing."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise InputError(f"{path}: no such Parquet file or feature folder")
        if (path / MANIFEST).is_file():
            return shard_files(path)
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise InputError(f"{path}: no manifest and no *.parquet files")
    else:
        files = [Path(p) for p in source]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"Parquet file(s) missing: {', '.join(missing[:5])}")
    return files


_FEATURE_BLOCK = 256
_ROW_BATCH = 65536


def _key_index(df: pd.DataFrame, by: list[str]) -> pd.Index:
    """The group keys of ``df``'s rows as an index (a MultiIndex for several ``by`` columns)."""
    return pd.MultiIndex.from_frame(df[by]) if len(by) > 1 else pd.Index(df[by[0]])


def _runs(codes: np.ndarray) -> np.ndarray:
    """Start positions of the runs of equal values in ``codes`` (1-D)."""
    return np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])


def _key_runs(table, by: list[str]) -> np.ndarray:
    """Start rows of the runs of rows with equal ``by`` keys in an Arrow table (nulls equal
    each other), compared in Arrow without converting the keys to Python objects."""
    n = table.num_rows
    if n == 0:
        return np.zeros(0, np.int64)
    changed = np.zeros(n - 1, bool)
    for c in by:
        col = table.column(c)
        a, b = col.slice(1), col.slice(0, n - 1)
        differ = pc.fill_null(pc.not_equal(a, b), False)
        differ = pc.or_(differ, pc.xor(pc.is_null(a), pc.is_null(b)))
        changed |= differ.to_numpy(zero_copy_only=False)
    return np.flatnonzero(np.r_[True, changed])


def _column_run_sums(column, starts: np.ndarray, lengths: np.ndarray,
                     order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 sums and non-NaN counts of one Arrow column over the runs that begin at
    ``starts`` (after reordering the rows by ``order`` where given); NaN values are skipped.
    A float column without nulls is read in place, without a copy."""
    v = column.to_numpy(zero_copy_only=False)
    if v.dtype.kind != "f":
        v = v.astype(np.float64)
    if order is not None:
        v = v[order]
    sums = np.add.reduceat(v, starts, dtype=np.float64)
    if not np.isnan(sums).any():
        return sums, lengths
    nan = np.isnan(v)  # only a column that holds NaN pays for the mask
    return (np.add.reduceat(np.where(nan, 0, v), starts, dtype=np.float64),
            lengths - np.add.reduceat(nan, starts, dtype=np.int64))


class _GroupSums:
    """Running per-group sums and non-NaN counts of ``n_features`` columns, for groups added
    as they are met (a pandas index of their keys); storage grows by doubling."""

    def __init__(self, n_features: int) -> None:
        self.keys: pd.Index | None = None
        self.sums = np.zeros((0, n_features))
        self.counts = np.zeros((0, n_features))

    def codes(self, keys: pd.Index) -> np.ndarray:
        """Rows of ``keys`` (unique or not), adding the groups not met before."""
        if self.keys is None:
            self.keys = keys.unique()
        else:
            new = keys[self.keys.get_indexer(keys) < 0].unique()
            if len(new):
                self.keys = self.keys.append(new)
        n = len(self.keys)
        if n > len(self.sums):
            grown = max(n, 2 * len(self.sums))
            for name in ("sums", "counts"):
                old = getattr(self, name)
                arr = np.zeros((grown, old.shape[1]))
                arr[:len(old)] = old
                setattr(self, name, arr)
        return self.keys.get_indexer(keys)

    def add(self, keys: pd.Index, sums: np.ndarray, counts: np.ndarray) -> None:
        """Add another tally's groups (unique ``keys``, rows of ``sums`` / ``counts``)."""
        at = self.codes(keys)
        self.sums[at] += sums
        self.counts[at] += counts

    def means(self, keys: pd.Index) -> np.ndarray:
        """``(len(keys), n_features)`` means (NaN where a group has no value) in the order of
        ``keys``."""
        at = self.keys.get_indexer(keys) if self.keys is not None else np.full(len(keys), -1)
        if (at < 0).any():
            raise InputError("groups were found in the metadata but not among the features")
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[at] / self.counts[at]


def _add_batch_sums(tally: _GroupSums, batch, table, by: list[str], feats: list[str]) -> None:
    """Add a record batch's feature sums per group to ``tally``; ``table`` is the batch's
    metadata table (keys decoded as :func:`_metadata_table` does).

    Each feature column is summed in place over the runs of rows of one group (cells of one
    image, images of one well are usually contiguous): only the keys at the run starts become
    Python objects. A batch whose groups are interleaved is put in group order first."""
    if not table.num_rows:
        return
    starts = _key_runs(table, by)
    local = tally.codes(_key_index(table.select(by).take(starts).to_pandas(), by))
    order = None
    if len(np.unique(local)) < len(local):  # a group in several runs
        rows = np.repeat(local, np.diff(np.r_[starts, table.num_rows]))
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        starts = _runs(rows)
        local = rows[starts]
    lengths = np.diff(np.r_[starts, table.num_rows])
    position = {name: i for i, name in enumerate(batch.schema.names)}
    sums = np.zeros((len(feats), len(starts)))
    counts = np.zeros((len(feats), len(starts)))
    for j, f in enumerate(feats):
        if f in position:
            sums[j], counts[j] = _column_run_sums(batch.column(position[f]), starts, lengths,
                                                  order)
    # the runs' groups are distinct here, so a plain fancy-indexed add is exact
    tally.sums[local] += sums.T
    tally.counts[local] += counts.T


def _parquet_columns(files: list[Path]) -> tuple[list[str], bool, int,
                                                 dict[str, tuple[Path, str]]]:
    """Union of the files' column names (first-seen order) from their footers only, whether
    every file has the same columns, their rows (for a progress bar), and each column that is
    not numeric (nor boolean) in some file: ``{column: (file, arrow type name)}``. Raises
    InputError naming an unreadable file."""
    columns: list[str] = []
    seen: set[str] = set()
    first: set[str] | None = None
    same, rows = True, 0
    non_numeric: dict[str, tuple[Path, str]] = {}
    for f in files:
        try:
            with arrow_file(f) as src:
                footer = pq.ParquetFile(src).metadata
            schema = footer.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{f}: not a readable Parquet file ({exc})") from exc
        names = schema.names
        rows += footer.num_rows
        same = same and (first is None or set(names) == first)
        first = set(names) if first is None else first
        for field in schema:
            t = field.type
            if not (pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t)
                    or pt.is_null(t) or pt.is_decimal(t)):
                non_numeric.setdefault(field.name, (f, str(t)))
        for n in names:
            if n not in seen:
                seen.add(n)
                columns.append(n)
    return columns, same, rows, non_numeric


def _feature_columns(columns: list[str], non_numeric: dict[str, tuple[Path, str]],
                     features: Sequence[str] | None = None,
                     metadata: Sequence[str] = ()) -> list[str]:
    """``features``, or every column but ``Metadata_*``, the other ``metadata`` names and
    pandas' index; InputError naming the file and column where one of them is not numeric (a
    path or a label that lacks the ``Metadata_`` prefix, or a table that is not features)."""
    feats = list(features) if features is not None else [
        c for c in columns
        if not c.startswith(("Metadata_", "__index_level_")) and c not in metadata]
    bad = [c for c in feats if c in non_numeric]
    if bad:
        source, kind = non_numeric[bad[0]]
        raise InputError(not_a_feature(source, bad, kind))
    return feats


_SUMMARY_ROWS = 100_000


def _metadata_table(batch, by: list[str], meta: list[str], count: bool):
    """A record batch's key, metadata and count columns as an Arrow table ready to group:
    dictionaries decoded, float NaN as null (a NaN is a missing value, as in pandas), columns
    absent from the file all-null."""
    names = set(batch.schema.names)
    cols = {}
    for c in by + meta + ([COUNT] if count else []):
        if c not in names:
            cols[c] = pa.nulls(batch.num_rows, pa.int64() if c == COUNT else pa.string())
            continue
        col = batch.column(c)
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if pa.types.is_null(col.type):
            col = col.cast(pa.string())
        if pa.types.is_floating(col.type):
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        cols[c] = col
    return pa.table(cols)


def _column_batches(path: Path, by: list[str], wanted: list[str]):
    """Row batches (65,536 rows) of a Parquet file's ``by`` columns (all required) and those
    of ``wanted`` it has; a path that is not UTF-8 is read through a Python file."""
    with arrow_file(path) as src:
        # memory-mapped, a file's pages are decoded straight from the page cache, without a
        # copy into a read buffer first (~1.4x faster decoding)
        reader = pq.ParquetFile(src, memory_map=isinstance(src, str))
        names = set(reader.schema_arrow.names)
        absent = [c for c in by if c not in names]
        if absent:
            raise InputError(f"{path}: no column(s) {absent} to aggregate by")
        read = by + [c for c in wanted if c in names and c not in by]
        yield from reader.iter_batches(_ROW_BATCH, columns=read, use_threads=False)


def _reduce_metadata(table, by: list[str], meta: list[str], has_count: bool, first: bool):
    """Group a metadata table (``first``: rows from :func:`_metadata_table`) or merge earlier
    summaries into one row per group: ``__rows``, ``Metadata_count`` and per metadata column
    ``k`` its ``__min{k}``, ``__max{k}`` and non-null ``__n{k}``."""
    aggs = [([], "count_all") if first else ("__rows", "sum"),
            (COUNT, "sum") if has_count or not first else ([], "count_all")]
    names = ["__rows", COUNT]
    for k, c in enumerate(meta):
        src = (c, c, c) if first else (f"__min{k}", f"__max{k}", f"__n{k}")
        aggs += [(src[0], "min"), (src[1], "max"), (src[2], "count" if first else "sum")]
        names += [f"__min{k}", f"__max{k}", f"__n{k}"]
    try:
        out = table.group_by(by, use_threads=False).aggregate(aggs)
    except pa.ArrowException as exc:
        raise InputError(f"cannot group metadata columns {meta}: {exc}") from exc
    # keys and aggregates come back in an order that varies between Arrow versions
    keys = [out.schema.get_field_index(c) for c in by]
    values = [i for i in range(out.num_columns) if i not in keys]
    return out.select(values + keys).rename_columns(names + by)


def _distinct_batches(table, by: list[str]):
    """The distinct (group keys, ``Metadata_batch``) pairs of an Arrow table."""
    return table.group_by(by + [BATCH], use_threads=False).aggregate([])


class _MetadataSummary:
    """Metadata summaries and (group, batch) pairs piled up and merged as they grow, so that
    memory follows the number of groups, not of rows."""

    def __init__(self, by: list[str], meta: list[str], has_count: bool) -> None:
        self.by, self.meta, self.has_count = by, meta, has_count
        self.summary = self.batches = None
        self.pending: list = []
        self.pending_batches: list = []

    def add(self, summaries: list, pairs: list) -> None:
        """Add summaries (from :func:`_reduce_metadata`) and (group, batch) pair tables."""
        self.pending += summaries
        self.pending_batches += pairs
        merged = len(self.summary) if self.summary is not None else 0
        if sum(map(len, self.pending)) > max(_SUMMARY_ROWS, merged):
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        # files may store a column with different types (string / large_string, int / float)
        self.summary = _reduce_metadata(pa.concat_tables(
            ([self.summary] if self.summary is not None else []) + self.pending,
            promote_options="permissive"), self.by, self.meta, self.has_count, False)
        self.pending.clear()
        if self.pending_batches:
            self.batches = _distinct_batches(pa.concat_tables(
                ([self.batches] if self.batches is not None else []) + self.pending_batches,
                promote_options="permissive"), self.by)
            self.pending_batches.clear()


def _file_pass(path: Path, by: list[str], meta: list[str], has_count: bool,
               feats: list[str], advance: Callable[[int], object] | None = None
               ) -> tuple[_MetadataSummary, _GroupSums]:
    """One Parquet file read once, in row batches: its metadata summary and, for ``feats``
    (may be empty), its feature sums per group; ``advance(rows)`` after each batch."""
    summary = _MetadataSummary(by, meta, has_count)
    tally = _GroupSums(len(feats))
    try:
        for batch in _column_batches(path, by, meta + [COUNT] + feats):
            table = _metadata_table(batch, by, meta, has_count)
            summary.add([_reduce_metadata(table, by, meta, has_count, True)],
                        [_distinct_batches(table.select(by + [BATCH]).set_column(
                            len(by), BATCH, table[BATCH].cast(pa.string())), by)]
                        if BATCH in meta else [])
            if feats:
                _add_batch_sums(tally, batch, table, by, feats)
            if advance is not None:
                advance(batch.num_rows)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read its metadata or feature columns ({exc})") from exc
    summary.merge()
    return summary, tally


def _group_metadata(files: list[Path], by: list[str], meta: list[str], has_count: bool,
                    feats: Sequence[str] = (), threads: int | None = None,
                    rows: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One row per group (sorted by ``by``, missing keys last): ``Metadata_count`` (rows
    counted, or their counts summed), ``__rows``, and per metadata column ``k`` its
    ``__min{k}``, ``__max{k}`` and non-null ``__n{k}``; ``__batches`` (sorted, ``;``-joined)
    when ``Metadata_batch`` is in ``meta``. With ``feats``, also the groups' means of those
    columns (NaN skipped; one row per group in the same order), from the same single read.

    ``rows``: the files' rows, the total of the progress bar.

    Files are read in parallel threads (``threads``, default all cores), each in row batches
    of only the columns needed; the per-file summaries are merged as they come, so memory is
    one batch per thread plus the (groups x features) sums, whatever the number of rows."""
    feats = list(feats)
    summary = _MetadataSummary(by, meta, has_count)
    total = _GroupSums(len(feats))
    workers = max(1, min(len(files), threads or os.cpu_count() or 1))
    bar = progress_bar(total=rows, desc="aggregating", unit="row", unit_scale=True)
    lock = threading.Lock()

    def advance(n: int) -> None:  # from the reader threads
        with lock:
            bar.update(n)

    with ThreadPoolExecutor(workers) as pool:
        try:
            for part, tally in pool.map(
                    lambda f: _file_pass(f, by, meta, has_count, feats, advance), files):
                if part.summary is not None:
                    summary.add([part.summary],
                                [part.batches] if part.batches is not None else [])
                if feats and tally.keys is not None:
                    n = len(tally.keys)
                    total.add(tally.keys, tally.sums[:n], tally.counts[:n])
        finally:
            bar.close()
    summary.merge()
    if summary.summary is None or not len(summary.summary):
        where = (str(files[0]) if len(files) == 1 else
                 f"{len(files)} files under {files[0].parent}" if files else "no files")
        raise InputError(f"cannot aggregate an empty table: {where} hold(s) no rows")
    res = summary.summary.to_pandas().sort_values(by, na_position="last", kind="stable")
    res = res.reset_index(drop=True)
    if BATCH in meta:
        pairs = summary.batches.to_pandas().dropna(subset=[BATCH]).sort_values(BATCH)
        joined = pairs.groupby(by, dropna=False, sort=False)[BATCH].agg(";".join)
        res["__batches"] = joined.reindex(_key_index(res, by)).to_numpy()
    values = (pd.DataFrame(total.means(_key_index(res[by], by)), columns=feats, copy=False)
              if feats else None)
    return res, values


def _arrow_block(files: list[Path], by: list[str], block: list[str]):
    """An Arrow table of ``by`` + ``block`` columns of every file (a column a file lacks is
    null there), read through Python file objects."""
    tables = []
    for f in files:
        for batch in _column_batches(f, by, block):
            table = pa.table(batch)
            for c in block:
                if c not in table.column_names:
                    table = table.append_column(c, pa.nulls(len(table), pa.float32()))
            tables.append(table.select(by + block))
    return pa.concat_tables(tables, promote_options="permissive")


def _duckdb_medians(files: list[Path], by: list[str], feats: list[str], same_columns: bool,
                    groups: pd.DataFrame, threads: int | None,
                    memory_limit: str | None) -> pd.DataFrame:
    """Per-group medians of ``feats`` (NaN skipped) with DuckDB, one query per block of
    features, rows in the order of ``groups``."""
    import duckdb

    con = duckdb.connect()
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET preserve_insertion_order = false")
        scan = ("read_parquet(?)" if same_columns
                else "read_parquet(?, union_by_name = true)")
        params = [[str(f) for f in files]]
        readable = all_utf8(files)  # else DuckDB cannot open the paths: Arrow reads each block
        keys = ", ".join(quote_identifier(c) for c in by)
        index = _key_index(groups, by)
        blocks = []
        # DuckDB plans a query with thousands of aggregates slowly: one query per block of
        # features (Parquet is columnar, so each reads only its columns).
        for start in range(0, len(feats), _FEATURE_BLOCK):
            block = feats[start:start + _FEATURE_BLOCK]
            cols = [f"median(nullif({q}, 'NaN'::DOUBLE))::FLOAT AS {q}"
                    for q in map(quote_identifier, block)]
            if readable:
                got = con.execute(f"SELECT {keys}, {', '.join(cols)} FROM {scan} "
                                  f"GROUP BY {keys}", params).df()
            else:
                con.register("__block", _arrow_block(files, by, block))
                got = con.execute(f"SELECT {keys}, {', '.join(cols)} FROM __block "
                                  f"GROUP BY {keys}").df()
                con.unregister("__block")
            at = _key_index(got, by).get_indexer(index)
            blocks.append(got[block].iloc[at].reset_index(drop=True))
    except duckdb.Error as exc:
        raise InputError(f"median of {len(files)} Parquet file(s) failed: {exc}") from exc
    finally:
        con.close()
    return pd.concat(blocks, axis=1) if blocks else pd.DataFrame(index=groups.index)


def _group_metadata_columns(res: pd.DataFrame, by: list[str], meta: list[str]) -> pd.DataFrame:
    """The metadata of each group from the per-group summary ``res``: the ``by`` keys, every
    other metadata column constant within all groups, ``Metadata_batch`` joined, the count."""
    out = res[by].copy()
    for k, c in enumerate(meta):
        lo, hi, n = res[f"__min{k}"], res[f"__max{k}"], res[f"__n{k}"]
        if ((n == 0) | ((n == res["__rows"]) & (lo == hi))).all():
            out[c] = lo
    if BATCH in meta and BATCH not in out.columns:
        out[BATCH] = res["__batches"]
    out[COUNT] = res[COUNT].astype(np.int64)
    return out


def aggregate_parquet(
    source: str | Path | Sequence[str | Path],
    by: Sequence[str],
    how: str = "mean",
    features: Sequence[str] | None = None,
    threads: int | None = None,
    memory_limit: str | None = None,
    sphering=None,
    metadata: Sequence[str] = (),
) -> pd.DataFrame:
    """Out-of-core :func:`aggregate` over Parquet files (streamed, never loaded whole).

    Same output as :func:`aggregate` on the concatenated table: one row per group sorted by
    ``by``, constant metadata kept, ``Metadata_batch`` ``;``-joined, ``Metadata_count`` counted
    (or summed), float32 features; NaN feature values are skipped like pandas does. Files may
    have different columns (missing values count as absent). Memory is bounded by row batches
    and the number of groups, not rows: ``mean`` keeps a running sum per group (a screen of
    10^7 cells x 10^3 features is fine); ``median`` (DuckDB) holds each group's values, so
    prefer ``mean`` at that scale.

    Args:
        source: feature folder, Parquet file, folder of Parquet files, or list of files.
        by: metadata columns defining a group.
        how: ``mean`` or ``median``.
        features: feature columns (default: every non-``Metadata_`` column).
        threads: reader threads for ``mean`` / DuckDB threads for ``median`` (default: all
            cores).
        memory_limit: DuckDB memory limit for ``median``, e.g. ``"4GB"`` (default: DuckDB's,
            80% of RAM).
        sphering: a fitted :class:`~morphoprof.profiles.cell_tvn.CellSphering` applied to
            every row before aggregation (cell-level TVN). Sphering is affine, so for ``mean``
            it is applied to the group means (the same result for rows without NaN, without
            a second pass); for ``median`` the rows are sphered into temporary Parquet files
            first.
        metadata: other metadata columns named without ``Metadata_`` (a column a
            :class:`~morphoprof.profiles.columns.Columns` maps; ``by`` columns always are):
            kept like ``Metadata_*`` columns, never read as features.
    """
    if how not in ("mean", "median"):
        raise InputError(f"aggregation must be 'mean' or 'median', got {how!r}")
    if sphering is not None and how == "median":
        from morphoprof.profiles.cell_tvn import sphere_parquet

        with tempfile.TemporaryDirectory(prefix="morphoprof-tvn-") as tmp:
            return aggregate_parquet(sphere_parquet(source, sphering, tmp), by, how, features,
                                     threads, memory_limit, metadata=metadata)
    by = list(by)
    metadata = [*metadata, *by]  # grouping columns are keys whatever their names, as in memory
    files = parquet_sources(source)
    columns, same_columns, rows, non_numeric = _parquet_columns(files)
    missing = [c for c in by if c not in columns]
    if missing:
        raise InputError(f"cannot aggregate by {missing}: not in the columns of {files[0]}")
    absent = [c for c in features or () if c not in columns]
    if absent:
        raise InputError(f"feature column(s) {absent[:5]} not in {files[0]}")
    feats = _feature_columns(columns, non_numeric, features, metadata)
    meta = [c for c in columns if (c.startswith("Metadata_") or c in metadata)
            and c not in by and c != COUNT]
    # one read of the files gives the groups, their metadata and (for a mean) the sums;
    # raises on a table with no rows
    res, values = _group_metadata(files, by, meta, COUNT in columns,
                                  feats if how == "mean" else (), threads, rows)
    if how == "mean" and sphering is not None:
        sph = list(sphering.features)
        lacking = [f for f in sph if f not in feats]
        if lacking:
            raise InputError(f"{files[0]}: lacks feature(s) {lacking[:3]} the cell "
                             "sphering was fitted on")
        values[sph] = sphering.transform(values[sph].to_numpy())
    elif how == "median":
        values = _duckdb_medians(files, by, feats, same_columns, res[by], threads,
                                 memory_limit)
    out = _group_metadata_columns(res, by, meta)
    values = values.astype(np.float32)
    values.index = res.index
    out = pd.concat([out, values], axis=1)
    ordered = [c for c in out.columns if c.startswith("Metadata_") or c in metadata] + feats
    return out[ordered]
