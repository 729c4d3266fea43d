"""Every evaluation of a profile table in one call: NSC / NSCB (1-NN and k-NN voting), mAP
(replicate activity against controls, MoA retrieval), nearest-neighbour replicate and group
accuracy, and conformal MoA prediction sets.

Input is either well profiles (several rows per treatment, controls included) or treatment
profiles (one row per compound x concentration). Well profiles are aggregated to treatments here
(median by default, as in the BBBC021 protocol) and also give the replicate metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pandas as pd
from pydantic import Field

from morphoprof.errors import InputError
from morphoprof.evaluation.conformal import conformal_moa
from morphoprof.evaluation.moa import (
    annotated_treatments,
    evaluate_moa,
    has_moa,
    nearest_neighbor_moa,
)
from morphoprof.evaluation.retrieval import activity_map, consistency_map, nn_accuracy
from morphoprof.index.schema import BATCH, COMPOUND, CONCENTRATION, CONTROL, MOA
from morphoprof.profiles.aggregate import treatment_profiles
from morphoprof.settings import Settings
from morphoprof.shards import feature_columns

TREATMENT = [COMPOUND, CONCENTRATION]


class EvaluationConfig(Settings):
    """What :func:`evaluate` reports: a run config's ``evaluation`` section, the options of
    ``morphoprof evaluate``."""

    protocols: list[Literal["nsc", "nscb"]] = Field(
        ["nsc", "nscb"], description="1-NN MoA protocols reported: not-same-compound, and also "
        "not-same-batch")
    k: list[int] = Field([3, 5], description="k of the extra k-NN voting runs")
    alpha: float = Field(0.1, gt=0, lt=1, description="conformal miscoverage (0.1: prediction "
                         "sets aim at 90 percent coverage)")
    null_size: int = Field(10000, ge=0, description="mAP null permutations")


_DEFAULTS = EvaluationConfig()


def is_well_level(profiles: pd.DataFrame) -> bool:
    """True when the table holds controls or several rows per treatment (well profiles)."""
    if CONTROL in profiles.columns and profiles[CONTROL].astype(bool).any():
        return True
    keys = [c for c in TREATMENT if c in profiles.columns]
    return bool(keys) and profiles.duplicated(keys).any()


def _records(table: pd.DataFrame) -> list[dict]:
    return table.astype(object).where(table.notna(), None).to_dict(orient="records")


def evaluate(
    profiles: pd.DataFrame,
    k_values: Sequence[int] = tuple(_DEFAULTS.k),
    alpha: float = _DEFAULTS.alpha,
    null_size: int = _DEFAULTS.null_size,
    treatment_aggregation: str = "median",
    group_columns: Sequence[str] = (),
    seed: int = 0,
) -> dict:
    """Evaluate profiles (canonical ``Metadata_`` names; see
    :class:`morphoprof.profiles.columns.Columns` to map others).

    Args:
        profiles: well or treatment profiles.
        k_values: k of the extra k-NN voting runs (NSC, and NSCB where batches exist).
        alpha: conformal miscoverage (sets aim at 1 - alpha coverage).
        null_size: permutations of copairs' null distribution for mAP p-values.
        group_columns: extra metadata columns for nearest-neighbour group accuracy on treatment
            profiles (neighbours of the same compound excluded), e.g. a compound-family column.

    Returns:
        ``{"nsc": {"accuracy", "correct", "n", "per_moa", "confusion", ...}, "nscb": {...},
        "knn": {"k3": {"nsc": ..., "nscb": ...}}, "map": {"moa": {...}, "activity": {...}},
        "replicate_accuracy": {...}, "group_accuracy": {...}, "conformal": {...},
        "n_treatments", "level", "warnings": [...]}``. A metric that cannot be computed on this
        table carries ``{"error": reason}`` and a warning instead of a number.
    """
    missing = [c for c in (COMPOUND, MOA) if c not in profiles.columns]
    if missing:
        raise InputError(f"profiles lack metadata column(s) {missing} needed to evaluate "
                         "(map other names with the column options)")
    if not feature_columns(profiles):
        raise InputError("profiles have no feature columns")
    warnings: list[str] = []
    result: dict = {}
    well_level = is_well_level(profiles)
    result["level"] = "wells" if well_level else "treatments"
    if well_level:
        wells = profiles.reset_index(drop=True)
        treatments = treatment_profiles(wells, treatment_aggregation)
    else:
        wells = None
        treatments = profiles
        if CONTROL in treatments.columns:
            treatments = treatments[~treatments[CONTROL].astype(bool)]
    no_moa = treatments[~has_moa(treatments)]
    if len(no_moa):
        names = sorted(no_moa[COMPOUND].astype(str).unique())
        warnings.append(f"{len(no_moa)} treatment(s) have no MoA and are not scored: "
                        f"{names[:10]}{' ...' if len(names) > 10 else ''}")
    result["n_treatments"] = int(len(treatments))
    result["n_annotated_treatments"] = int(len(treatments) - len(no_moa))

    moa = evaluate_moa(treatments)
    result.update(moa)
    for key in ("nsc", "nscb"):
        warnings += [f"{key.upper()}: {w}" for w in moa.get(key, {}).get("warnings", [])]
        if moa.get(key, {}).get("error"):
            warnings.append(f"{key.upper()}: {moa[key]['error']}")

    knn = {}
    for k in k_values:
        entry = {}
        for mode in ("nsc", "nscb"):
            if mode == "nscb" and BATCH not in treatments.columns:
                continue
            try:
                r = nearest_neighbor_moa(treatments, mode, k=k)
                entry[mode] = {key: r[key] for key in ("accuracy", "correct", "n", "per_moa")}
            except InputError as exc:
                entry[mode] = {"error": str(exc)}
        knn[f"k{k}"] = entry
    result["knn"] = knn

    result["map"] = {}
    metrics = [("moa", lambda: consistency_map(treatments, null_size=null_size, seed=seed))]
    if wells is not None:
        metrics.append(("activity", lambda: activity_map(wells, null_size=null_size, seed=seed)))
    for name, fn in metrics:
        try:
            table, summary = fn()
            result["map"][name] = {**summary, "groups": _records(table)}
        except InputError as exc:
            result["map"][name] = {"error": str(exc)}
            warnings.append(f"mAP ({name}): {exc}")

    if wells is not None:
        treated = wells[~wells[CONTROL].astype(bool)] if CONTROL in wells.columns else wells
        try:
            result["replicate_accuracy"] = nn_accuracy(treated, TREATMENT)
        except InputError as exc:
            result["replicate_accuracy"] = {"error": str(exc)}
    annotated = annotated_treatments(treatments)
    group = {}
    for col in group_columns:
        if col not in annotated.columns:
            raise InputError(f"group accuracy column {col!r} is not in the profiles")
        try:
            group[col] = nn_accuracy(annotated, col, exclude_same=[COMPOUND])
        except InputError as exc:
            group[col] = {"error": str(exc)}
    result["group_accuracy"] = group

    try:
        result["conformal"] = conformal_moa(treatments, alpha)
        warnings += [f"conformal: {w}" for w in result["conformal"]["warnings"]]
    except InputError as exc:
        result["conformal"] = {"error": str(exc)}
        warnings.append(f"conformal: {exc}")
    result["warnings"] = warnings
    return result
