"""Conformal MoA prediction: prediction sets with a stated coverage for compounds never seen.

Split conformal prediction (Vovk; Angelopoulos & Bates 2021) turns any score of "how unusual is
label y for sample x" (the nonconformity score) into prediction sets that contain the true label
with probability >= 1 - alpha, if calibration and test samples are exchangeable. For MoA prediction
the unit that must be new is the compound, so calibration is leave-one-compound-out: the sets of a
held-out compound's treatments are calibrated on the scores of all *other* compounds' treatments,
each scored against a reference that excludes both its own compound and the held-out one.

The generic pieces (:func:`~morphoprof.classification.conformal_threshold`,
:func:`~morphoprof.classification.prediction_sets`, :func:`~morphoprof.classification.set_metrics`)
take score matrices and live in :mod:`morphoprof.classification`, so any classifier
(1 - softmax probability, in cross-validation) reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from morphoprof.classification import conformal_threshold, prediction_sets, set_metrics
from morphoprof.errors import InputError
from morphoprof.evaluation.moa import (
    annotated_treatments,
    cosine_similarity_matrix,
    feature_matrix,
    single_compound_moas,
)
from morphoprof.index.schema import COMPOUND, MOA


def conformal_moa(
    treatments: pd.DataFrame,
    alpha: float = 0.1,
    features: Sequence[str] | None = None,
) -> dict:
    """Leave-one-compound-out conformal MoA prediction sets on treatment profiles.

    Nonconformity of MoA m for treatment i, given a set of allowed reference treatments:
    ``1 - max cosine similarity`` between i and the allowed treatments of MoA m (the 1-NN rule
    of NSC turned into a score). For each compound c in turn: the calibration scores are those of
    every other compound's treatments against references excluding their own compound and c; the
    sets of c's treatments use references excluding c only.

    Args:
        treatments: one row per treatment with ``Metadata_compound``, ``Metadata_moa`` and
            features; controls and rows without MoA are left out. MoAs with a single compound
            cannot be predicted for a held-out compound and are left out (named in ``warnings``).
        alpha: miscoverage; sets aim at >= 1 - alpha coverage.

    Returns:
        ``{"alpha", "target_coverage", "coverage", "mean_set_size", "singleton_fraction", "n",
        "per_moa": {moa: {"coverage", "mean_set_size", "n"}}, "sets": [{compound, moa, set}],
        "warnings"}``.
    """
    need = [c for c in (MOA, COMPOUND) if c not in treatments.columns]
    if need:
        raise InputError(f"conformal MoA prediction needs column(s) {need}")
    df = annotated_treatments(treatments)
    warnings = []
    lonely = single_compound_moas(df)
    if lonely:
        warnings.append(f"MoA(s) {lonely} have a single compound and are left out of conformal "
                        "prediction (no other compound to calibrate or predict them)")
        df = df[~df[MOA].isin(lonely)]
    df = df.reset_index(drop=True)
    labels = sorted(df[MOA].astype(str).unique())
    if len(labels) < 2:
        raise InputError(f"conformal MoA prediction needs >= 2 MoAs with >= 2 compounds each, "
                         f"got {labels}")
    sim = cosine_similarity_matrix(feature_matrix(df, features))
    cpd = df[COMPOUND].astype(str).to_numpy()
    moa = df[MOA].astype(str).to_numpy()
    true = np.array([labels.index(m) for m in moa])
    onehot = np.stack([moa == m for m in labels], axis=1)  # (n, K)

    def scores(rows: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """(len(rows), K) nonconformity; allowed: (len(rows), n) reference mask."""
        out = np.full((len(rows), len(labels)), np.inf)
        for k in range(len(labels)):
            ok = allowed & onehot[:, k][None, :]
            s = np.where(ok, sim[rows], -np.inf).max(1)
            out[:, k] = 1.0 - s
        return out

    all_sets = np.zeros((len(df), len(labels)), bool)
    for c in np.unique(cpd):
        test = np.flatnonzero(cpd == c)
        cal = np.flatnonzero(cpd != c)
        cal_allowed = (cpd[None, :] != cpd[cal][:, None]) & (cpd[None, :] != c)
        cal_scores = scores(cal, cal_allowed)[np.arange(len(cal)), true[cal]]
        cal_scores = cal_scores[np.isfinite(cal_scores)]
        thr = conformal_threshold(cal_scores, alpha)
        test_scores = scores(test, np.broadcast_to(cpd[None, :] != c, (len(test), len(df))))
        all_sets[test] = prediction_sets(test_scores, thr)
    metrics = set_metrics(all_sets, true)
    per_moa = {}
    for k, m in enumerate(labels):
        sel = true == k
        pm = set_metrics(all_sets[sel], true[sel])
        per_moa[m] = {"coverage": pm["coverage"], "mean_set_size": pm["mean_set_size"],
                      "n": pm["n"]}
    concs = (df["Metadata_concentration"].to_numpy(np.float64)
             if "Metadata_concentration" in df.columns else np.full(len(df), np.nan))
    sets = [{"compound": cpd[i], "concentration": float(concs[i]), "moa": moa[i],
             "set": [labels[k] for k in np.flatnonzero(all_sets[i])]} for i in range(len(df))]
    return {"alpha": alpha, "target_coverage": 1 - alpha, **metrics, "labels": labels,
            "per_moa": per_moa, "sets": sets, "warnings": warnings}
