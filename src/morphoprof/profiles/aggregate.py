"""Aggregation of single-cell or field features into well and treatment profiles.

Input and output are DataFrames in the cytomining convention: ``Metadata_*`` columns, then
features. Cells -> sites -> wells -> treatments; each level carries ``Metadata_count``, the number
of rows it summarises, and the next level sums it (``Metadata_n_sites`` etc. are not invented).
"""

from __future__ import annotations

from collections.abc import Sequence

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
