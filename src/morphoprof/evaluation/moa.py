"""Mechanism-of-action matching on treatment profiles: 1-NN NSC and NSCB (BBBC021 protocol).

- Treatment = compound x concentration; DMSO / controls are not treatments.
- Similarity = cosine; each query takes the MoA of its most similar allowed neighbour.
- NSC (not-same-compound): neighbours exclude every treatment of the query's compound.
- NSCB (not-same-compound-or-batch): also exclude every treatment that shares a batch with the
  query; MoAs present in only one batch are dropped, as queries and as neighbours.

Accuracy is reported with counts, per MoA, and as a confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from morphoprof.classification import ClassificationSummary
from morphoprof.errors import InputError
from morphoprof.index.schema import BATCH, COMPOUND, CONTROL, MOA
from morphoprof.shards import feature_columns


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> rows scaled to unit length (zero rows stay zero), float64."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def cosine_similarity_matrix(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, N) cosine similarities (rows with zero norm get similarity 0)."""
    unit = unit_rows(x)
    return unit @ unit.T


def feature_matrix(df: pd.DataFrame, features: Sequence[str] | None = None) -> np.ndarray:
    """The (rows, features) float64 matrix of a profile table; InputError when there are no
    feature columns or a row holds NaN / infinite values (the first such rows are named)."""
    feats = list(features) if features is not None else feature_columns(df)
    if not feats:
        raise InputError("profiles have no feature columns")
    x = df[feats].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))[:5].tolist()
        raise InputError(f"profiles have NaN or infinite features (rows {rows})")
    return x


def has_moa(df: pd.DataFrame, moa_col: str = MOA) -> np.ndarray:
    """Boolean mask of rows with a non-empty MoA."""
    return (df[moa_col].fillna("").astype(str).str.len() > 0).to_numpy()


def annotated_treatments(df: pd.DataFrame, moa_col: str = MOA) -> pd.DataFrame:
    """Rows that are not controls (``Metadata_control``) and have a MoA, re-indexed 0..n-1."""
    keep = has_moa(df, moa_col)
    if CONTROL in df.columns:
        keep = keep & ~df[CONTROL].astype(bool).to_numpy()
    return df[keep].reset_index(drop=True)


def single_compound_moas(df: pd.DataFrame, moa_col: str = MOA,
                         compound_col: str = COMPOUND) -> list[str]:
    """MoAs represented by a single compound (unmatchable when a query's compound is held out)."""
    n = df.groupby(moa_col)[compound_col].nunique()
    return sorted(n.index[n < 2])


def _batches(values: pd.Series) -> list[frozenset[str]]:
    return [frozenset(str(v).split(";")) for v in values]


def nearest_neighbor_moa(
    profiles: pd.DataFrame,
    mode: str = "nsc",
    features: Sequence[str] | None = None,
    moa_col: str = MOA,
    compound_col: str = COMPOUND,
    batch_col: str = BATCH,
    k: int = 1,
) -> dict:
    """1-NN (or k-NN voting) MoA prediction under NSC or NSCB exclusion.

    Args:
        profiles: one row per treatment with MoA, compound and (for NSCB) batch columns; a batch
            cell may list several batches joined by ``;``. Rows with an empty MoA are ignored.
        mode: ``nsc`` or ``nscb``.
        features: feature columns (default: every non-metadata column).
        k: neighbours that vote (k > 1: the most frequent MoA among the k most similar allowed
            treatments wins; ties go to the MoA with the larger summed similarity).

    Returns:
        ``{"accuracy", "correct", "n", "per_moa": {moa: {"accuracy", "correct", "n"}},
        "confusion": {"labels": [...], "matrix": [[...]]}, "predictions": [...],
        "dropped_moas": [...], "warnings": [...]}``; the confusion matrix has true MoAs as rows.
        A MoA with a single compound cannot be matched under NSC (its only compound is
        excluded): it is kept, as in the literature, and named in ``warnings``.
    """
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    if mode not in ("nsc", "nscb"):
        raise InputError(f"mode must be 'nsc' or 'nscb', got {mode!r}")
    need = [moa_col, compound_col] + ([batch_col] if mode == "nscb" else [])
    missing = [c for c in need if c not in profiles.columns]
    if missing:
        raise InputError(f"profiles lack column(s) {missing} needed for {mode.upper()}")
    df = profiles[has_moa(profiles, moa_col)].reset_index(drop=True)
    feats = list(features) if features is not None else feature_columns(df)
    if not feats:
        raise InputError("profiles have no feature columns")
    dropped: list[str] = []
    if mode == "nscb":  # a MoA seen in a single batch has no other-batch match
        moa_batches: dict[str, set[str]] = {}
        for moa, b in zip(df[moa_col], _batches(df[batch_col]), strict=True):
            moa_batches.setdefault(moa, set()).update(b)
        dropped = sorted(m for m, b in moa_batches.items() if len(b) < 2)
        df = df[~df[moa_col].isin(dropped)].reset_index(drop=True)
    if len(df) < 2:
        raise InputError(f"{mode.upper()} needs at least two annotated treatments, got {len(df)}")
    sim = cosine_similarity_matrix(feature_matrix(df, feats))
    compounds = df[compound_col].astype(str).to_numpy()
    allowed = compounds[:, None] != compounds[None, :]
    if mode == "nscb":
        batches = _batches(df[batch_col])
        allowed &= ~np.array([[bool(a & b) for b in batches] for a in batches])
    moas = df[moa_col].astype(str).to_numpy()
    concs = (df["Metadata_concentration"].to_numpy() if "Metadata_concentration" in df.columns
             else np.full(len(df), np.nan))
    warnings = []
    lonely = single_compound_moas(df, moa_col, compound_col)
    if lonely:
        warnings.append(f"MoA(s) {lonely} have a single compound: under {mode.upper()} their "
                        "treatments have no same-MoA neighbour and count as errors")
    preds, records = _predict(sim, allowed, moas, compounds, concs, k)
    scored = [(t, p) for t, p in zip(moas, preds, strict=True) if p is not None]
    summary = ClassificationSummary.from_names([t for t, _ in scored], [p for _, p in scored],
                                               labels=sorted(set(moas)))
    scores = summary.to_json()
    return {
        "accuracy": scores["accuracy"],
        "correct": scores["correct"],
        "n": scores["n"],
        "per_moa": scores["per_class"],
        "confusion": scores["confusion"],
        "predictions": records,
        "dropped_moas": dropped,
        "unmatched": int(sum(p is None for p in preds)),
        "k": int(k),
        "warnings": warnings,
    }


def _predict(sim: np.ndarray, allowed: np.ndarray, moas: np.ndarray, compounds: np.ndarray,
             concs: np.ndarray, k: int) -> tuple[list, list[dict]]:
    """Each treatment's predicted MoA from its most similar allowed treatments (None when none
    is allowed), and one record per prediction (its nearest neighbour and similarity)."""
    preds, records = [], []
    for i in range(len(moas)):
        cand = np.flatnonzero(allowed[i])
        if len(cand) == 0:
            preds.append(None)
            continue
        order = cand[np.argsort(-sim[i, cand], kind="stable")]
        j = order[0]
        preds.append(moas[j] if k == 1 else _vote(moas, sim[i], order[:k]))
        records.append({"compound": compounds[i], "concentration": float(concs[i]),
                        "moa": moas[i], "predicted": preds[-1],
                        "neighbour": f"{compounds[j]}@{concs[j]}",
                        "similarity": float(sim[i, j])})
    return preds, records


def _vote(moas: np.ndarray, similarity: np.ndarray, neighbours: np.ndarray) -> str:
    """The MoA most frequent among ``neighbours``; ties go to the larger summed similarity."""
    votes: dict[str, list[float]] = {}
    for t in neighbours:
        v = votes.setdefault(moas[t], [0, 0.0])
        v[0] += 1
        v[1] += similarity[t]
    return max(votes, key=lambda m: (votes[m][0], votes[m][1]))


def evaluate_moa(profiles: pd.DataFrame, features: Sequence[str] | None = None) -> dict:
    """NSC and NSCB (NSCB where a batch column exists) for treatment profiles."""
    out = {"nsc": nearest_neighbor_moa(profiles, "nsc", features)}
    if out["nsc"]["unmatched"]:
        out["nsc"]["warnings"].append(f"{out['nsc']['unmatched']} treatment(s) had no allowed "
                                      "neighbour and are not scored")
    if BATCH in profiles.columns:
        try:
            out["nscb"] = nearest_neighbor_moa(profiles, "nscb", features)
        except InputError as exc:
            out["nscb"] = {"accuracy": None, "correct": 0, "n": 0, "error": str(exc)}
    return out
