"""Aggregation of single-cell or field features into well and treatment profiles.

Input and output are DataFrames in the cytomining convention: ``Metadata_*`` columns, then
features. Cells -> sites -> wells -> treatments; each level carries ``Metadata_count``, the number
of rows it summarises, and the next level sums it (``Metadata_n_sites`` etc. are not invented).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.features.shards import feature_columns
from morphoprof.index.schema import BATCH, COMPOUND, CONCENTRATION, MOA, PLATE, WELL
from morphoprof.io_utils import all_utf8, arrow_file

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
    feats = list(features) if features is not None else feature_columns(df)
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
    ordered = [c for c in out.columns if c.startswith("Metadata_")] + feats
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
    from morphoprof.features.shards import MANIFEST, shard_files

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


def _file_sums(path: Path, by: list[str], feats: list[str],
               index: pd.Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(group codes, sums, non-NaN counts)`` of one Parquet file, read in row batches: sums
    and counts have one row per group present in the file (not per group of the screen), so a
    file's memory does not grow with the screen. A feature the file lacks is NaN there
    (skipped like any missing value)."""
    from scipy import sparse

    present = np.zeros(0, np.int64)
    sums = np.zeros((0, len(feats)))
    counts = np.zeros((0, len(feats)))
    for batch in _column_batches(path, by, feats):
        absent = set(feats).difference(batch.schema.names)
        codes = index.get_indexer(_key_index(batch.select(by).to_pandas(), by))
        if (codes < 0).any():
            raise InputError(f"{path}: rows whose {by} changed while reading")
        new = np.setdiff1d(np.unique(codes), present)
        if len(new):
            present = np.r_[present, new]
            sums = np.vstack([sums, np.zeros((len(new), len(feats)))])
            counts = np.vstack([counts, np.zeros((len(new), len(feats)))])
        sorter = np.argsort(present)
        local = sorter[np.searchsorted(present, codes, sorter=sorter)]
        n_groups = len(present)
        # (features, rows): each feature's values contiguous, so run sums are sequential reads
        nan_column = np.full(batch.num_rows, np.nan)
        x = np.stack([nan_column if f in absent else batch.column(f).to_numpy(
            zero_copy_only=False) for f in feats])
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        nan = np.isnan(x)
        has_nan = bool(nan.any())
        if has_nan:
            x = np.where(nan, 0, x)
        # rows of a group are usually contiguous (cells of one image, images of one well):
        # sum each run of equal codes in one pass, then add the runs into their groups
        starts = np.flatnonzero(np.r_[True, local[1:] != local[:-1]])
        if len(starts) <= len(local) // 4:
            run_sums = np.add.reduceat(x, starts, axis=1).T
            run_counts = (np.add.reduceat(~nan, starts, axis=1, dtype=np.int64).T if has_nan
                          else np.diff(np.r_[starts, len(local)])[:, None])
            target = local[starts]
            if len(np.unique(target)) == len(target):
                sums[target] += run_sums
                counts[target] += run_counts
            else:
                np.add.at(sums, target, run_sums)
                np.add.at(counts, target, np.broadcast_to(run_counts, run_sums.shape))
        else:
            onehot = sparse.csr_matrix((np.ones(len(local)), (local, np.arange(len(local)))),
                                       shape=(n_groups, len(local)))
            sums += onehot @ x.T.astype(np.float64)
            counts += onehot @ ((~nan).T.astype(np.float64) if has_nan
                                else np.ones((len(local), 1)))
    return present, sums, counts


def _streamed_means(files: list[Path], by: list[str], feats: list[str],
                    groups: pd.DataFrame, threads: int | None = None) -> pd.DataFrame:
    """Per-group means of ``feats`` (NaN skipped), reading the files in row batches, files in
    parallel threads (at most ``threads`` files in flight): memory is one batch and one file's
    groups per thread plus the (groups x features) result, whatever the number of rows."""
    from concurrent.futures import ThreadPoolExecutor

    index = _key_index(groups, by)
    # pandas builds an index's hash engine and its uniqueness flag lazily and not thread-safely:
    # a thread may see a half-built MultiIndex as "not unique". Build both here, before the threads
    index.get_indexer(index[:1])
    sums = np.zeros((len(groups), len(feats)))
    counts = np.zeros((len(groups), len(feats)))
    workers = max(1, min(len(files), threads or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), workers):
            for codes, s, c in pool.map(lambda f: _file_sums(f, by, feats, index),
                                        files[start:start + workers]):
                sums[codes] += s
                counts[codes] += c
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(sums, counts, out=sums)  # in place: no third groups x features array
    return pd.DataFrame(sums, columns=feats, copy=False)


def _q(name: str) -> str:
    """A double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _parquet_columns(files: list[Path]) -> tuple[list[str], bool]:
    """Union of the files' column names (first-seen order) from their footers only, and whether
    every file has the same columns. Raises InputError naming an unreadable file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: list[str] = []
    seen: set[str] = set()
    first: set[str] | None = None
    same = True
    for f in files:
        try:
            with arrow_file(f) as src:
                names = pq.read_schema(src).names
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{f}: not a readable Parquet file ({exc})") from exc
        same = same and (first is None or set(names) == first)
        first = set(names) if first is None else first
        for n in names:
            if n not in seen:
                seen.add(n)
                columns.append(n)
    return columns, same


_SUMMARY_ROWS = 100_000


def _metadata_table(batch, by: list[str], meta: list[str], count: bool):
    """A record batch's key, metadata and count columns as an Arrow table ready to group:
    dictionaries decoded, float NaN as null (a NaN is a missing value, as in pandas), columns
    absent from the file all-null."""
    import pyarrow as pa
    import pyarrow.compute as pc

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
    import pyarrow.parquet as pq

    with arrow_file(path) as src:
        reader = pq.ParquetFile(src)
        names = set(reader.schema_arrow.names)
        absent = [c for c in by if c not in names]
        if absent:
            raise InputError(f"{path}: no column(s) {absent} to aggregate by")
        read = by + [c for c in wanted if c in names and c not in by]
        yield from reader.iter_batches(_ROW_BATCH, columns=read, use_threads=False)


def _group_metadata(files: list[Path], by: list[str], meta: list[str],
                    has_count: bool) -> pd.DataFrame:
    """One row per group (sorted by ``by``, missing keys last): ``Metadata_count`` (rows
    counted, or their counts summed), ``__rows``, and per metadata column ``k`` its
    ``__min{k}``, ``__max{k}`` and non-null ``__n{k}``; ``__batches`` (sorted, ``;``-joined)
    when ``Metadata_batch`` is in ``meta``. Only these columns are read, in row batches, and
    grouped with Arrow; per-batch summaries are merged as they pile up, so memory follows the
    number of groups, not of rows."""
    import pyarrow as pa

    def reduce(table, first: bool):
        """Group a metadata table (first pass) or merge summaries (later passes)."""
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

    def distinct(table):
        return table.group_by(by + [BATCH], use_threads=False).aggregate([])

    summary, batches = None, None
    pending, pending_batches = [], []

    def merge() -> None:
        nonlocal summary, batches
        if summary is None and not pending:
            where = (str(files[0]) if len(files) == 1 else
                     f"{len(files)} files under {files[0].parent}" if files else "no files")
            raise InputError(f"cannot aggregate an empty table: {where} hold(s) no rows")
        # files may store a column with different types (string / large_string, int / float)
        summary = reduce(pa.concat_tables(([summary] if summary is not None else []) + pending,
                                          promote_options="permissive"), False)
        pending.clear()
        if pending_batches:
            batches = distinct(pa.concat_tables(([batches] if batches is not None else [])
                                                + pending_batches,
                                                promote_options="permissive"))
            pending_batches.clear()

    for f in files:
        try:
            for batch in _column_batches(f, by, meta + [COUNT]):
                table = _metadata_table(batch, by, meta, has_count)
                pending.append(reduce(table, True))
                if BATCH in meta:
                    pending_batches.append(distinct(
                        table.select(by + [BATCH]).set_column(
                            len(by), BATCH, table[BATCH].cast(pa.string()))))
                merged = len(summary) if summary is not None else 0
                if sum(map(len, pending)) > max(_SUMMARY_ROWS, merged):
                    merge()
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{f}: cannot read its metadata columns ({exc})") from exc
    merge()
    res = summary.to_pandas().sort_values(by, na_position="last", kind="stable")
    res = res.reset_index(drop=True)
    if BATCH in meta:
        pairs = batches.to_pandas().dropna(subset=[BATCH]).sort_values(BATCH)
        joined = pairs.groupby(by, dropna=False, sort=False)[BATCH].agg(";".join)
        res["__batches"] = joined.reindex(_key_index(res, by)).to_numpy()
    return res


def _arrow_block(files: list[Path], by: list[str], block: list[str]):
    """An Arrow table of ``by`` + ``block`` columns of every file (a column a file lacks is
    null there), read through Python file objects."""
    import pyarrow as pa

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
        keys = ", ".join(_q(c) for c in by)
        index = _key_index(groups, by)
        blocks = []
        # DuckDB plans a query with thousands of aggregates slowly: one query per block of
        # features (Parquet is columnar, so each reads only its columns).
        for start in range(0, len(feats), _FEATURE_BLOCK):
            block = feats[start:start + _FEATURE_BLOCK]
            cols = [f"median(nullif({_q(f)}, 'NaN'::DOUBLE))::FLOAT AS {_q(f)}"
                    for f in block]
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


def aggregate_parquet(
    source: str | Path | Sequence[str | Path],
    by: Sequence[str],
    how: str = "mean",
    features: Sequence[str] | None = None,
    threads: int | None = None,
    memory_limit: str | None = None,
    sphering=None,
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
    """
    if how not in ("mean", "median"):
        raise InputError(f"aggregation must be 'mean' or 'median', got {how!r}")
    if sphering is not None and how == "median":
        import tempfile

        from morphoprof.profiles.cell_tvn import sphere_parquet

        with tempfile.TemporaryDirectory(prefix="morphoprof-tvn-") as tmp:
            return aggregate_parquet(sphere_parquet(source, sphering, tmp), by, how, features,
                                     threads, memory_limit)
    by = list(by)
    files = parquet_sources(source)
    columns, same_columns = _parquet_columns(files)
    missing = [c for c in by if c not in columns]
    if missing:
        raise InputError(f"cannot aggregate by {missing}: not in the columns of {files[0]}")
    feats = list(features) if features is not None else [
        c for c in columns if not c.startswith(("Metadata_", "__index_level_"))]
    absent = [c for c in feats if c not in columns]
    if absent:
        raise InputError(f"feature column(s) {absent[:5]} not in {files[0]}")
    meta = [c for c in columns if c.startswith("Metadata_") and c not in by and c != COUNT]
    res = _group_metadata(files, by, meta, COUNT in columns)  # raises on a table with no rows
    if how == "mean":
        values = _streamed_means(files, by, feats, res[by], threads)
        if sphering is not None:
            sph = list(sphering.features)
            lacking = [f for f in sph if f not in feats]
            if lacking:
                raise InputError(f"{files[0]}: lacks feature(s) {lacking[:3]} the cell "
                                 "sphering was fitted on")
            values[sph] = sphering.transform(values[sph].to_numpy())
    else:
        values = _duckdb_medians(files, by, feats, same_columns, res[by], threads,
                                 memory_limit)
    out = res[by].copy()
    for k, c in enumerate(meta):
        lo, hi, n = res[f"__min{k}"], res[f"__max{k}"], res[f"__n{k}"]
        if ((n == 0) | ((n == res["__rows"]) & (lo == hi))).all():
            out[c] = lo
    if BATCH in meta and BATCH not in out.columns:
        out[BATCH] = res["__batches"]
    out[COUNT] = res[COUNT].astype(np.int64)
    values = values.astype(np.float32)
    values.index = res.index
    out = pd.concat([out, values], axis=1)
    ordered = [c for c in out.columns if c.startswith("Metadata_")] + feats
    return out[ordered]
