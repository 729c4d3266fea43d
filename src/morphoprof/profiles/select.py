"""Feature selection on profiles: NaN / infinite columns, near-constant features, redundant
(highly correlated) features. Every dropped feature is reported with its reason, never dropped
silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.shards import feature_columns

OPERATIONS = ("blocklist", "nonfinite", "variance", "correlation")


def read_blocklist(path: str | Path | None = None) -> list[str]:
    """Feature names to drop, one per line (blank lines, ``#`` comments and a first line
    ``blocklist``, the header of pycytominer's file, are ignored). ``None``: pycytominer's
    bundled list of CellProfiler features known to be unreliable in Cell Painting (Way 2019)."""
    if path is None:
        try:
            path = Path(str(files("pycytominer") / "data" / "blocklist_features.txt"))
        except ModuleNotFoundError:
            raise InputError("the default feature blocklist is pycytominer's, which is not "
                             "installed: pip install pycytominer, or give a blocklist file "
                             "(--blocklist FILE, YAML profiles.blocklist)") from None
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"feature blocklist not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read feature blocklist {path}: {exc}") from exc
    names = [ln.split("#", 1)[0].strip() for ln in lines]
    if names and names[0] == "blocklist":
        names = names[1:]
    return [n for n in names if n]


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


def low_variance(x: np.ndarray, freq_cut: float = 0.05, unique_cut: float = 0.01) -> np.ndarray:
    """Boolean mask of near-constant columns of ``(n, d)`` ``x``.

    A column is near-constant when it has a single value, or when the second most common value is
    rarer than ``freq_cut`` times the most common one *and* the number of distinct values is at most
    ``unique_cut`` times the number of rows (the caret ``nearZeroVar`` rule pycytominer uses).
    """
    n, d = x.shape
    out = np.zeros(d, bool)
    for j in range(d):
        vals, counts = np.unique(x[:, j], return_counts=True)
        if len(vals) <= 1:
            out[j] = True
            continue
        top2 = np.sort(counts)[-2:]
        out[j] = (top2[0] / top2[1] < freq_cut) and (len(vals) / n <= unique_cut)
    return out


def correlated(x: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Boolean mask of columns to drop so that no two kept columns of ``(n, d)`` ``x`` have
    ``|Pearson r| > threshold``. Greedy: repeatedly drops, among the pairs above the threshold,
    the column with the largest mean absolute correlation to all others (constant columns,
    correlation undefined, are never dropped here: the variance filter handles them)."""
    d = x.shape[1]
    std = x.std(0)
    ok = std > 0
    corr = np.zeros((d, d))
    if ok.sum() > 1:
        corr[np.ix_(ok, ok)] = np.abs(np.corrcoef(x[:, ok], rowvar=False))
    np.fill_diagonal(corr, 0.0)
    drop = np.zeros(d, bool)
    mean_corr = corr.mean(1)
    while True:
        live = ~drop
        sub = corr[np.ix_(live, live)]
        if sub.size == 0 or sub.max() <= threshold:
            return drop
        idx = np.flatnonzero(live)
        i, j = np.unravel_index(np.argmax(sub), sub.shape)
        a, b = idx[i], idx[j]
        drop[a if mean_corr[a] >= mean_corr[b] else b] = True


def select_features(
    df: pd.DataFrame,
    operations: Sequence[str] = OPERATIONS,
    features: Sequence[str] | None = None,
    freq_cut: float = 0.05,
    unique_cut: float = 0.01,
    corr_threshold: float = 0.9,
    na_cutoff: float = 0.0,
    blocklist: str | Path | None = None,
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Drop uninformative features.

    Args:
        df: profiles (``Metadata_*`` columns + features).
        operations: any of ``blocklist`` (the features named in ``blocklist``, see
            :func:`read_blocklist`), ``nonfinite`` (more than ``na_cutoff`` of the rows NaN /
            infinite), ``variance`` (:func:`low_variance`), ``correlation``
            (:func:`correlated`), applied in that order.
        na_cutoff: fraction of NaN / infinite rows a feature may have (0: none). Features kept
            with some NaN must be imputed or dropped before normalisation.
        blocklist: the blocklist file (default: pycytominer's).

    Returns:
        The reduced table and ``{operation: [dropped features]}``.
    """
    unknown = [o for o in operations if o not in OPERATIONS]
    if unknown:
        raise InputError(f"unknown feature selection operation(s) {unknown}; "
                         f"choose from {OPERATIONS}")
    feats = list(features) if features is not None else feature_columns(df)
    if not feats:
        raise InputError("no feature columns to select from")
    report: dict[str, list[str]] = {}
    kept = list(feats)
    for op in OPERATIONS:
        if op not in operations:
            continue
        if op == "blocklist":
            listed = set(read_blocklist(blocklist))
            report[op] = [f for f in kept if f in listed]
            kept = [f for f in kept if f not in listed]
            continue
        x = df[kept].to_numpy(dtype=np.float64)
        if op == "nonfinite":
            bad = (~np.isfinite(x)).mean(0) > na_cutoff
        else:
            finite = np.isfinite(x).all(0)
            bad = np.zeros(len(kept), bool)
            sub = x[:, finite]
            mask = low_variance(sub, freq_cut, unique_cut) if op == "variance" else correlated(
                sub, corr_threshold)
            bad[np.flatnonzero(finite)[mask]] = True
        report[op] = [f for f, b in zip(kept, bad) if b]
        kept = [f for f, b in zip(kept, bad) if not b]
    if not kept:
        raise InputError(f"feature selection dropped every feature ({report})")
    dropped = {f for v in report.values() for f in v}
    return df.drop(columns=[f for f in feats if f in dropped]), report
