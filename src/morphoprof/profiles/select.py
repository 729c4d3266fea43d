"""Feature selection on profiles. For now: drop features that are not finite everywhere."""

from __future__ import annotations

import numpy as np
import pandas as pd

from morphoprof.features.shards import feature_columns


def drop_nonfinite(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Remove feature columns holding NaN or infinite values in any row.

    Classical measurements are undefined for some objects (texture of a one-pixel object...);
    after aggregation such a feature can stay NaN for a whole well. Returns the cleaned frame and
    the dropped column names (to be reported, never dropped silently).
    """
    feats = feature_columns(df)
    x = df[feats].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(x).all(axis=0)
    dropped = [f for f, b in zip(feats, bad) if b]
    return (df.drop(columns=dropped) if dropped else df), dropped
