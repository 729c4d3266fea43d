"""Profiles out: ``aggregate``, ``normalize``, ``evaluate`` and ``report``."""

from __future__ import annotations

import argparse
from pathlib import Path

from morphoprof.cli.common import (
    add_column_options,
    add_command,
    columns_from,
)
from morphoprof.errors import MorphoprofError
from morphoprof.evaluation.evaluate import EvaluationConfig, evaluate
from morphoprof.io_utils import read_input_parquet, write_json, write_parquet
from morphoprof.pipeline import NORMALIZE_BY, build_profiles, report_stage
from morphoprof.profiles.cell_tvn import CellTVNConfig
from morphoprof.profiles.normalize import (
    DEFAULT_METHOD,
    METHOD_ALIASES,
    METHODS,
    NormalizationConfig,
    Normalizer,
)
from morphoprof.profiles.select import OPERATIONS, select_features
from morphoprof.profiles.settings import ProfilesConfig
from morphoprof.settings import add_options, from_options
from morphoprof.shards import require_numeric_features


def _read_profiles(path: str, cols, required=()):
    df = cols.to_canonical(read_input_parquet(path, "profiles file"), required,
                           source=str(path))
    require_numeric_features(df, path)
    return df


def _by(value: str):
    return NORMALIZE_BY.get(value, value)


def cmd_aggregate(a: argparse.Namespace) -> int:
    settings = from_options(ProfilesConfig, a,
                            cell_tvn=from_options(CellTVNConfig, a, prefix="cell_tvn_"),
                            normalization=from_options(NormalizationConfig, a))
    wells, treatments = build_profiles(Path(a.features), settings, Path(a.out), columns_from(a))
    print(f"wrote {wells} and {treatments}")
    return 0


def cmd_normalize(a: argparse.Namespace) -> int:
    cols = columns_from(a)
    df = _read_profiles(a.profiles, cols)
    if a.apply:
        normalizer = Normalizer.load(a.apply)
    else:
        if a.select:
            df, dropped = select_features(df, a.select, blocklist=a.blocklist)
            for op, feats in dropped.items():
                print(f"feature selection ({op}): dropped {len(feats)}")
        norm = from_options(NormalizationConfig, a)
        normalizer = Normalizer(norm.method, _by(norm.by), norm.reference, norm.eps,
                                norm.n_factors, norm.fallback).fit(df)
    result = cols.from_canonical(normalizer.transform(df))
    existed = Path(a.out).exists()
    out = write_parquet(a.out, result)
    if a.save and not a.apply:
        try:
            print(f"wrote {normalizer.save(a.save)}")
        except MorphoprofError:
            if not existed:  # both outputs or neither
                out.unlink(missing_ok=True)
            raise
    print(f"wrote {out} ({len(df)} rows, {len(normalizer.output_features())} features)")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    profiles = _read_profiles(a.profiles, columns_from(a), ("compound", "moa"))
    settings = from_options(EvaluationConfig, a)
    result = evaluate(profiles, k_values=settings.k, alpha=settings.alpha,
                      null_size=settings.null_size,
                      treatment_aggregation=a.treatment_aggregation, group_columns=a.group)
    result = result.protocols(settings.protocols)
    write_json(a.out, result.to_json())
    print("\n".join([*result.summary_lines(), f"wrote {a.out}"]))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    cols = columns_from(a)
    profiles = _read_profiles(a.profiles, cols)
    wells = _read_profiles(a.wells, cols) if a.wells else None
    report_stage(a.out, a.evaluation, profiles, wells, index=a.index, config=a.config,
                 inputs={"profiles": a.profiles, "evaluation": a.evaluation,
                         "wells": a.wells or "", "index": a.index or "",
                         "configuration": a.config or ""})
    print(f"wrote {a.out}")
    return 0


def _add_aggregate(sub) -> None:
    s = add_command(sub, "aggregate", "features -> normalised well and treatment profiles",
                    outputs=[("out", True)],
                    description="Aggregate cell or field features (a feature folder or "
                    "Parquet files, streamed out of core) to wells, select features, "
                    "normalise, and aggregate to treatments.")
    s.add_argument("features", help="feature folder, Parquet file or folder of Parquet files")
    s.add_argument("--out", required=True, help="profiles folder")
    add_options(s, ProfilesConfig, ("well_aggregation", "treatment_aggregation",
                                    "feature_selection", "blocklist", "format"),
                flags={"feature_selection": "--select"})
    add_options(s, CellTVNConfig, flags={"reference": "--cell-tvn", "eps": "--cell-tvn-eps"},
                prefix="cell_tvn_")
    add_options(s, NormalizationConfig, flags={"method": "--normalize",
                                               "n_factors": "--factors"})
    add_column_options(s)
    s.set_defaults(func=cmd_aggregate)


def _add_normalize(sub) -> None:
    s = add_command(sub, "normalize", "normalise profiles against controls (or apply a saved "
                    "normaliser)", outputs=[("out", False), ("save", False)])
    s.add_argument("profiles", help="profiles Parquet (wells, sites or cells)")
    s.add_argument("--out", required=True, help="normalised profiles Parquet")
    # this command's own default method (DEFAULT_METHOD), and no selection
    s.add_argument("--method", default=DEFAULT_METHOD, choices=[*METHODS, *METHOD_ALIASES],
                   help="normalisation, fitted on the reference rows")
    add_options(s, NormalizationConfig, ("by", "reference", "eps", "n_factors", "fallback"),
                flags={"n_factors": "--factors"})
    s.add_argument("--select", nargs="*", default=[], choices=list(OPERATIONS),
                   help="feature selection before fitting (default: none)")
    add_options(s, ProfilesConfig, ("blocklist",))
    s.add_argument("--save", help="save the fitted normaliser here (.npz)")
    s.add_argument("--apply", help="apply a saved normaliser instead of fitting one")
    add_column_options(s)
    s.set_defaults(func=cmd_normalize)


def _add_evaluate(sub) -> None:
    s = add_command(sub, "evaluate", "NSC / NSCB, k-NN, mAP, conformal MoA sets",
                    outputs=[("out", False)])
    s.add_argument("profiles", help="wells.parquet or treatments.parquet")
    s.add_argument("--out", required=True, help="evaluation.json")
    add_options(s, EvaluationConfig, ("k", "alpha", "null_size"))
    add_options(s, ProfilesConfig, ("treatment_aggregation",))
    s.add_argument("--group", nargs="*", default=[],
                   help="metadata columns for nearest-neighbour group accuracy")
    add_column_options(s)
    s.set_defaults(func=cmd_evaluate)


def _add_report(sub) -> None:
    s = add_command(sub, "report", "write a self-contained HTML report", outputs=[("out", False)])
    s.add_argument("--profiles", required=True, help="wells.parquet (for QC) or "
                   "treatments.parquet")
    s.add_argument("--evaluation", required=True, help="evaluation.json")
    s.add_argument("--out", required=True, help="report.html")
    s.add_argument("--wells", help="well profiles for the QC heatmaps (Metadata_count), when "
                   "--profiles holds treatments")
    s.add_argument("--index", help="the experiment index: dataset summary and example fields "
                   "per MoA")
    s.add_argument("--config", help="the run's configuration file, shown in the report")
    add_column_options(s)
    s.set_defaults(func=cmd_report)


# this module's commands, in the order the help lists them
COMMANDS = (_add_aggregate, _add_normalize, _add_evaluate, _add_report)
