"""Every evaluation of a profile table in one call: NSC / NSCB (1-NN and k-NN voting), mAP
(replicate activity against controls, MoA retrieval), nearest-neighbour replicate and group
accuracy, and conformal MoA prediction sets.

Input is either well profiles (several rows per treatment, controls included) or treatment
profiles (one row per compound x concentration). Well profiles are aggregated to treatments here
(median by default, as in the BBBC021 protocol) and also give the replicate metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
from pydantic import Field, PositiveInt

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

logger = logging.getLogger(__name__)

TREATMENT = [COMPOUND, CONCENTRATION]


class EvaluationConfig(Settings):
    """What :func:`evaluate` reports: a run config's ``evaluation`` section, the options of
    ``morphoprof evaluate``."""

    protocols: list[Literal["nsc", "nscb"]] = Field(
        ["nsc", "nscb"], description="1-NN MoA protocols reported: not-same-compound, and also "
        "not-same-batch")
    k: list[PositiveInt] = Field([3, 5], description="k of the extra k-NN voting runs")
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


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured; ``evaluation.json`` is its :meth:`to_json`.

    Attributes:
        level: ``wells`` (well profiles given: replicate accuracy and mAP over wells) or
            ``treatments``.
        n_treatments, n_annotated_treatments: treatments, and those with a MoA (scored).
        nsc, nscb: 1-NN MoA accuracy not matching the same compound (and batch):
            ``{"accuracy", "correct", "n", "per_moa", "confusion", "dropped_moas", ...}``
            (:func:`~morphoprof.evaluation.moa.nearest_neighbor_moa`; ``{"error"}`` where it
            cannot be computed); None when not evaluated.
        knn: ``{"k3": {"nsc": ..., "nscb": ...}}``, k-NN voting.
        map: ``{"moa": ..., "activity": ...}``, copairs mAP with p-values.
        group_accuracy: ``{column: {"accuracy", "correct", "n"}}``.
        conformal: split-conformal MoA sets (coverage, mean set size, per MoA).
        warnings: what could not be computed or scored, in words.
        replicate_accuracy: nearest treated well is a replicate (well level only).
    """

    level: Literal["wells", "treatments"] = "treatments"
    n_treatments: int = 0
    n_annotated_treatments: int = 0
    nsc: dict | None = None
    nscb: dict | None = None
    knn: dict = field(default_factory=dict)
    map: dict = field(default_factory=dict)
    replicate_accuracy: dict | None = None
    group_accuracy: dict = field(default_factory=dict)
    conformal: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """The evaluation as JSON types (the keys of ``evaluation.json``; a metric that was not
        computed is left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["warnings"] = list(self.warnings)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping) -> Evaluation:
        """An evaluation read back from its JSON (an ``evaluation.json``; keys it lacks keep
        their defaults, so the NSC / NSCB of :func:`~morphoprof.evaluation.moa.evaluate_moa`
        alone is one too)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["warnings"] = tuple(values.get("warnings") or ())
        return cls(**values)

    def protocols(self, keep: Sequence[str]) -> Evaluation:
        """This evaluation with only the 1-NN protocols in ``keep`` (``nsc``, ``nscb``)."""
        return dataclasses.replace(self, **{k: None for k in ("nsc", "nscb") if k not in keep})

    def scores(self) -> dict[str, dict]:
        """``{"nsc": ..., "nscb": ...}`` of the protocols that were evaluated."""
        return {k: v for k, v in (("nsc", self.nsc), ("nscb", self.nscb)) if v is not None}

    def summary_lines(self) -> list[str]:
        """The headline figures in words: NSC / NSCB counts, mAP, conformal coverage."""
        lines = [f"{key.upper()}: {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f}%"
                 for key, r in self.scores().items() if r.get("accuracy") is not None]
        lines += [f"mAP ({name}): {r['mean_map']:.3f}, retrieved {r['fraction_retrieved']:.0%}"
                  for name, r in self.map.items() if "mean_map" in r]
        c = self.conformal
        if "coverage" in c:
            lines.append(f"conformal: coverage {c['coverage']:.0%} (target "
                         f"{c['target_coverage']:.0%}), mean set size {c['mean_set_size']:.2f}")
        return lines


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
) -> Evaluation:
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
        An :class:`Evaluation`. A metric that cannot be computed on this table carries
        ``{"error": reason}`` and a warning instead of a number; every warning is also logged.
    """
    missing = [c for c in (COMPOUND, MOA) if c not in profiles.columns]
    if missing:
        raise InputError(f"profiles lack metadata column(s) {missing} needed to evaluate "
                         "(map other names with the column options)")
    if not feature_columns(profiles):
        raise InputError("profiles have no feature columns")
    warnings: list[str] = []
    wells, treatments = _levels(profiles, treatment_aggregation)
    result: dict = {"level": "wells" if wells is not None else "treatments"}
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
    result["knn"] = _knn(treatments, k_values)
    result["map"] = _map(wells, treatments, null_size, seed, warnings)
    if wells is not None:
        treated = wells[~wells[CONTROL].astype(bool)] if CONTROL in wells.columns else wells
        result["replicate_accuracy"] = _or_error(lambda: nn_accuracy(treated, TREATMENT))
    annotated = annotated_treatments(treatments)
    for col in group_columns:
        if col not in annotated.columns:
            raise InputError(f"group accuracy column {col!r} is not in the profiles")
    result["group_accuracy"] = {col: _or_error(lambda col=col: nn_accuracy(
        annotated, col, exclude_same=[COMPOUND])) for col in group_columns}
    result["conformal"] = _or_error(lambda: conformal_moa(treatments, alpha))
    if "error" in result["conformal"]:
        warnings.append(f"conformal: {result['conformal']['error']}")
    else:
        warnings += [f"conformal: {w}" for w in result["conformal"]["warnings"]]
    for w in warnings:
        logger.warning(w)
    return Evaluation(**result, warnings=tuple(warnings))


def _levels(profiles: pd.DataFrame, treatment_aggregation: str
            ) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """(well profiles or None, treatment profiles without controls) of an input table."""
    if is_well_level(profiles):
        wells = profiles.reset_index(drop=True)
        return wells, treatment_profiles(wells, treatment_aggregation)
    if CONTROL in profiles.columns:
        return None, profiles[~profiles[CONTROL].astype(bool)]
    return None, profiles


def _or_error(fn) -> dict:
    """``fn()``, or ``{"error": reason}`` when it cannot be computed on this table."""
    try:
        return fn()
    except InputError as exc:
        return {"error": str(exc)}


def _knn(treatments: pd.DataFrame, k_values: Sequence[int]) -> dict:
    """k-NN voting NSC (and NSCB where batches exist) for each k: ``{"k3": {"nsc": ...}}``."""
    modes = ("nsc", "nscb") if BATCH in treatments.columns else ("nsc",)
    keys = ("accuracy", "correct", "n", "per_moa")
    return {f"k{k}": {mode: _or_error(lambda mode=mode, k=k: {
        key: v for key, v in nearest_neighbor_moa(treatments, mode, k=k).items() if key in keys})
        for mode in modes} for k in k_values}


def _map(wells: pd.DataFrame | None, treatments: pd.DataFrame, null_size: int, seed: int,
         warnings: list[str]) -> dict:
    """mAP of MoA retrieval (treatments) and, on well input, of replicate activity against
    controls; a metric that cannot be computed is an error entry and a warning."""
    metrics = [("moa", lambda: consistency_map(treatments, null_size=null_size, seed=seed))]
    if wells is not None:
        metrics.append(("activity", lambda: activity_map(wells, null_size=null_size, seed=seed)))
    out = {}
    for name, fn in metrics:
        try:
            table, summary = fn()
            out[name] = {**summary, "groups": _records(table)}
        except InputError as exc:
            out[name] = {"error": str(exc)}
            warnings.append(f"mAP ({name}): {exc}")
            continue
        # copairs' p-values are (k + 1) / (null_size + 1): too few permutations and no group
        # can pass the threshold, whatever its mAP
        floor, threshold = 1 / (null_size + 1), summary["p_threshold"]
        if floor >= threshold:
            warnings.append(
                f"mAP ({name}): with {null_size} permutations no p-value can fall below "
                f"{threshold} (the smallest is {floor:.3g}), so no group counts as retrieved; "
                f"use a null size (--null-size, evaluation.null_size) of at least "
                f"{math.floor(1 / threshold)}")
    return out
