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

COUNT = "Metadata_count"
WELL_KEY = [PLATE, WELL]
TREATMENT_KEY = [COMPOUND, CONCENTRATION]


def aggregate(
    df: pd.DataFrame,
    by: Sequence[str],
    how: str = "mean",
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Average (``mean``) or take the median (``median``) of features within groups.

    Metadata columns that are constant within every group are kept (others are dropped, except
    ``Metadata_batch``, which becomes a sorted ``;``-joined list of the group's batches).
    ``Metadata_count`` is the number of input rows per group (or their summed counts).

    Args:
        df: rows to aggregate, ``Metadata_*`` columns plus features.
        by: metadata columns defining a group, e.g. ``[Metadata_plate, Metadata_well]``.
        how: ``mean`` or ``median``.
        features: feature columns (default: every non-metadata column).

    Returns:
        One row per group, sorted by ``by``.
    """
    if how not in ("mean", "median"):
        raise InputError(f"aggregation must be 'mean' or 'median', got {how!r}")
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise InputError(f"cannot aggregate by {missing}: not in the table's columns")
    if len(df) == 0:
        raise InputError("cannot aggregate an empty table")
    feats = list(features) if features is not None else feature_columns(df)
    groups = df.groupby(list(by), sort=True, dropna=False)
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


def _file_sums(path: Path, by: list[str], feats: list[str],
               index: pd.Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(group codes, sums, non-NaN counts)`` of one Parquet file, read in row batches: sums
    and counts have one row per group present in the file (not per group of the screen), so a
    file's memory does not grow with the screen."""
    import pyarrow.parquet as pq
    from scipy import sparse

    present = np.zeros(0, np.int64)
    sums = np.zeros((0, len(feats)))
    counts = np.zeros((0, len(feats)))
    for batch in pq.ParquetFile(path).iter_batches(_ROW_BATCH, columns=by + feats):
        keys = batch.select(by).to_pandas()
        codes = index.get_indexer(pd.MultiIndex.from_frame(keys) if len(by) > 1
                                  else keys[by[0]])
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
        x = np.stack([batch.column(f).to_numpy(zero_copy_only=False) for f in feats])
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

    index = pd.MultiIndex.from_frame(groups) if len(by) > 1 else pd.Index(groups[by[0]])
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
        means = sums / counts
    return pd.DataFrame(means, columns=feats)


def _q(name: str) -> str:
    """A double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def aggregate_parquet(
    source: str | Path | Sequence[str | Path],
    by: Sequence[str],
    how: str = "mean",
    features: Sequence[str] | None = None,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> pd.DataFrame:
    """Out-of-core :func:`aggregate` over Parquet files with DuckDB (streamed, never loaded whole).

    Same output as :func:`aggregate` on the concatenated table: one row per group sorted by
    ``by``, constant metadata kept, ``Metadata_batch`` ``;``-joined, ``Metadata_count`` counted
    (or summed), float32 features; NaN feature values are skipped like pandas does. A screen of
    10^7 cells x 10^3 features aggregates in bounded memory (``mean``: a running sum per group;
    ``median`` holds each group's values, so prefer ``mean`` at that scale).

    Args:
        source: feature folder, Parquet file, folder of Parquet files, or list of files.
        by: metadata columns defining a group.
        how: ``mean`` or ``median``.
        features: feature columns (default: every non-``Metadata_`` column).
        threads: DuckDB threads (default: all cores).
        memory_limit: DuckDB memory limit, e.g. ``"4GB"`` (default: DuckDB's, 80% of RAM).
    """
    import duckdb

    if how not in ("mean", "median"):
        raise InputError(f"aggregation must be 'mean' or 'median', got {how!r}")
    files = parquet_sources(source)
    con = duckdb.connect()
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET preserve_insertion_order = false")
        scan = "read_parquet(?, union_by_name = true)"
        params = [[str(f) for f in files]]
        try:
            schema = con.execute(f"DESCRIBE SELECT * FROM {scan}", params).df()
        except duckdb.Error as exc:
            raise InputError(f"cannot read Parquet {files[0].parent}: {exc}") from exc
        columns = schema["column_name"].tolist()
        missing = [c for c in by if c not in columns]
        if missing:
            raise InputError(f"cannot aggregate by {missing}: not in the columns of {files[0]}")
        feats = list(features) if features is not None else [
            c for c in columns if not c.startswith(("Metadata_", "__index_level_"))]
        absent = [c for c in feats if c not in columns]
        if absent:
            raise InputError(f"feature column(s) {absent[:5]} not in {files[0]}")
        meta = [c for c in columns if c.startswith("Metadata_") and c not in by and c != COUNT]
        keys = ", ".join(_q(c) for c in by)
        order = ", ".join(_q(c) + " NULLS LAST" for c in by)
        sel = [_q(c) for c in by]
        sel.append(f"sum({_q(COUNT)})::BIGINT AS {_q(COUNT)}" if COUNT in columns
                   else f"count(*)::BIGINT AS {_q(COUNT)}")
        sel.append("count(*) AS __rows")
        for k, c in enumerate(meta):
            sel += [f"min({_q(c)}) AS __min{k}", f"max({_q(c)}) AS __max{k}",
                    f"count({_q(c)}) AS __n{k}"]
        if BATCH in meta:
            sel.append(f"array_to_string(list_sort(list_distinct(list(CAST({_q(BATCH)} AS "
                       f"VARCHAR)))), ';') AS __batches")
        try:
            res = con.execute(f"SELECT {', '.join(sel)} FROM {scan} GROUP BY {keys} "
                              f"ORDER BY {order}", params).df()
            if how == "median":
                # DuckDB plans a query with thousands of aggregates slowly: one query per block
                # of features (Parquet is columnar, so each reads only its columns).
                blocks = []
                for start in range(0, len(feats), _FEATURE_BLOCK):
                    block = feats[start:start + _FEATURE_BLOCK]
                    cols = [f"median(nullif({_q(f)}, 'NaN'::DOUBLE))::FLOAT AS {_q(f)}"
                            for f in block]
                    blocks.append(con.execute(
                        f"SELECT {', '.join(cols)} FROM {scan} GROUP BY {keys} ORDER BY {order}",
                        params).df())
                values = pd.concat(blocks, axis=1) if blocks else pd.DataFrame(index=res.index)
        except duckdb.Error as exc:
            raise InputError(f"aggregation of {len(files)} Parquet file(s) failed: {exc}") from exc
        if how == "mean":
            values = _streamed_means(files, list(by), feats, res[list(by)], threads)
    finally:
        con.close()
    if res.empty:
        raise InputError("cannot aggregate an empty table")
    out = res[list(by)].copy()
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
