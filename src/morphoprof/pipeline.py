"""Wiring of the stages for ``morphoprof run`` and ``morphoprof demo``.

Each stage reads the previous stage's files and writes its own, so any stage can be re-run alone::

    OUT/index.parquet                   experiment index
    OUT/illumination/                   per-plate illumination functions (if enabled)
    OUT/cells.parquet                   segmented nuclei, one row per cell (if enabled)
    OUT/segmentation_summary.json       cells found, empty fields, warnings, skipped files
    OUT/features/                       feature shards + manifest (resumable)
    OUT/profiles/wells.parquet          per-well profiles (normalised)
    OUT/profiles/treatments.parquet     per-treatment profiles (controls excluded)
    OUT/profiles/dropped_features.json  features removed by feature selection, per reason
    OUT/profiles/normalizer.npz         the fitted normalisation, to apply to new data
    OUT/evaluation.json                 NSC / NSCB (counts, per-MoA, confusion), k-NN, mAP,
                                        replicate accuracy, conformal MoA sets
    OUT/report.html                     self-contained report
    OUT/config.yaml                     the configuration that was run
"""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

import pandas as pd
import yaml

from morphoprof.index.schema import BATCH, PLATE, ExperimentIndex
from morphoprof.io_utils import atomic_path, read_parquet, write_json, write_parquet

NORMALIZE_BY = {"plate": PLATE, "batch": BATCH, "all": None}


def build_index_from_config(data: dict, out: Path, progress: bool = True, log=print):
    """Create (or import) the experiment index described by the ``data`` section."""
    from morphoprof.index import import_bbbc021, import_csv, import_fields_6moa

    source = data["source"]
    if source == "synthetic":
        from morphoprof.datasets.synthetic import SynthConfig, generate_screen

        params = dict(data["synthetic"] or {})
        for key in ("concentrations", "channels"):
            if key in params:
                params[key] = tuple(params[key])
        screen = Path(data["path"]) if data["path"] else out / "synthetic_screen"
        return generate_screen(screen, SynthConfig(**params), progress=progress, log=log)
    if source == "bbbc021":
        return import_bbbc021(data["path"], data["image_csv"], data["moa_csv"], progress=progress)
    if source == "bbbc021_6moa":
        return import_fields_6moa(data["path"])
    if source == "csv":
        return import_csv(data["path"], data["channel_columns"], data["columns"],
                          sep=data["sep"], controls=data["controls"])
    index = ExperimentIndex.read_parquet(data["path"])
    index.validate(check_shapes=False)
    return index


def illumination_stage(index: ExperimentIndex, cfg: dict, out: Path, progress: bool = True,
                       on_error: str = "fail", log=print):
    """Compute (or reuse) per-plate illumination functions; None when disabled."""
    if not cfg["enabled"]:
        return None
    from morphoprof.preprocess.illumination import compute_illumination

    corr = compute_illumination(index, out, window=cfg["window"], percentile=cfg["percentile"],
                                n_jobs=cfg["n_jobs"], progress=progress, on_error=on_error)
    if log:
        for s in corr.skipped:
            log(f"skipped {s['reason']}")
    return corr


def nuclei_config(segmentation: dict):
    """The :class:`NucleiConfig` of a config's ``preprocess.segmentation`` section."""
    from morphoprof.preprocess.segmentation import NucleiConfig

    return NucleiConfig(**{k: v for k, v in segmentation.items()
                           if k not in ("enabled", "channel", "n_jobs")})


def segmentation_stage(index: ExperimentIndex, cfg: dict, on_error: str, out: Path,
                       illumination=None, progress: bool = True) -> dict | None:
    """Segment nuclei into ``out`` (cells.parquet) and write its run summary; None if disabled."""
    if not cfg["enabled"]:
        return None
    from morphoprof.preprocess.segmentation import segment_index

    summary = segment_index(index, out, channel=cfg["channel"], cfg=nuclei_config(cfg),
                            illumination=illumination, on_error=on_error, progress=progress,
                            n_jobs=cfg["n_jobs"])
    write_json(out.with_name("segmentation_summary.json"), summary)
    return summary


def extract_features(index: ExperimentIndex, features: dict, channels, out: Path,
                     progress: bool = True, log=print, illumination=None,
                     segmentation: dict | None = None, on_error: str = "fail") -> dict:
    """Run the configured extractor over the index into ``out`` (a feature folder).

    ``transfer``: whole-field ImageNet features; ``classical``: cp_measure measurements of the
    nuclei segmented with the ``segmentation`` settings (one row per cell). ``on_error``
    (``preprocess.on_error``): ``skip`` leaves unreadable image sets out of the features (either
    extractor) and lists them in the summary.
    """
    from morphoprof.features.transfer import TransferConfig, TransferExtractor

    if features["extractor"] == "classical":
        from morphoprof.features.classical import ClassicalConfig, ClassicalExtractor

        cfg = ClassicalConfig(measurements=tuple(features["measurements"]), channels=channels,
                              nuclei=nuclei_config(segmentation or {}),
                              n_jobs=(segmentation or {}).get("n_jobs", 1), on_error=on_error)
        return ClassicalExtractor(cfg).extract(index, out, illumination=illumination,
                                               progress=progress, log=log)
    known = {f.name for f in fields(TransferConfig)}
    cfg = TransferConfig(**{k: v for k, v in features.items() if k in known}, channels=channels,
                         on_error=on_error)
    return TransferExtractor(cfg).extract(index, out, progress=progress, log=log,
                                          illumination=illumination)


def cells_per_well(cells_path: Path, index: ExperimentIndex) -> pd.DataFrame:
    """Cell counts per well (wells with no cells get 0) from a cell table."""
    cells = read_parquet(cells_path, columns=[PLATE, "Metadata_well"])
    counts = cells.groupby([PLATE, "Metadata_well"]).size().rename("cells")
    wells = index.table[[PLATE, "Metadata_well"]].drop_duplicates().set_index(
        [PLATE, "Metadata_well"])
    return wells.join(counts).fillna(0).astype({"cells": int}).reset_index()


def build_profiles(features_dir: Path, profiles_cfg: dict, out_dir: Path,
                   columns=None) -> tuple[Path, Path]:
    """Features -> selected, normalised well profiles -> treatment profiles (Parquet files).

    Aggregation to wells streams the feature shards through DuckDB (never loaded whole); the
    fitted normaliser is saved as ``normalizer.npz`` to apply to new data. ``columns``
    (:class:`~morphoprof.profiles.columns.Columns`) maps other metadata names; the files keep
    the input's names."""
    from morphoprof.profiles.aggregate import aggregate_parquet, treatment_profiles
    from morphoprof.profiles.columns import Columns
    from morphoprof.profiles.normalize import Normalizer
    from morphoprof.profiles.select import select_features

    cols = columns or Columns()
    wells = aggregate_parquet(features_dir, [cols.plate, cols.well],
                              profiles_cfg["well_aggregation"])
    wells = cols.to_canonical(wells, ("compound", "concentration", "control"),
                              source=str(features_dir))
    wells, dropped = select_features(wells, profiles_cfg.get("feature_selection", ["nonfinite"]))
    write_json(out_dir / "dropped_features.json", dropped)
    norm = profiles_cfg["normalization"]
    normalizer = Normalizer(norm["method"], NORMALIZE_BY[norm["by"]], norm["reference"],
                            norm.get("eps", 1e-6), norm.get("n_factors", 50),
                            norm.get("fallback", "none")).fit(wells)
    for w in normalizer.warnings:
        print(f"warning: {w}")
    normalizer.save(out_dir / "normalizer.npz")
    wells = normalizer.transform(wells)
    treatments = treatment_profiles(wells, profiles_cfg["treatment_aggregation"])
    w = write_parquet(out_dir / "wells.parquet", cols.from_canonical(wells))
    t = write_parquet(out_dir / "treatments.parquet", cols.from_canonical(treatments))
    return w, t


def evaluate_profiles(profiles_path: Path, out: Path, protocols=("nsc", "nscb"),
                      evaluation_cfg: dict | None = None,
                      treatment_aggregation: str = "median") -> dict:
    """Well or treatment profiles -> evaluation JSON (NSC / NSCB, k-NN, mAP, conformal)."""
    from morphoprof.evaluation.evaluate import evaluate

    cfg = evaluation_cfg or {}
    profiles = read_parquet(profiles_path)
    result = evaluate(profiles, k_values=cfg.get("k", (3, 5)), alpha=cfg.get("alpha", 0.1),
                      null_size=cfg.get("null_size", 10000),
                      treatment_aggregation=treatment_aggregation)
    for key in ("nsc", "nscb"):
        if key not in protocols:
            result.pop(key, None)
    write_json(out, result)
    return result


def dataset_summary(index: ExperimentIndex) -> dict:
    t = index.table
    treated = t[~t["Metadata_control"]]
    return {
        "image sets (fields)": len(t),
        "plates": t[PLATE].nunique(),
        "batches": t[BATCH].nunique(),
        "wells": len(t.groupby([PLATE, "Metadata_well"])),
        "channels": ", ".join(index.channels),
        "compounds (excl. controls)": treated["Metadata_compound"].nunique(),
        "treatments (compound x concentration)": len(
            treated.groupby(["Metadata_compound", "Metadata_concentration"])
        ),
        "MoAs": treated["Metadata_moa"].replace("", pd.NA).dropna().nunique(),
        "control image sets": int(t["Metadata_control"].sum()),
    }


def run_pipeline(cfg: dict, config_text: str, progress: bool = True, log=print) -> dict:
    """Run every stage of a validated config; returns the evaluation dict (plus timings)."""
    from morphoprof.report.html import write_report

    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(config_text)
    timings = {}
    t0 = time.perf_counter()
    log("[1/7] experiment index")
    index = build_index_from_config(cfg["data"], out, progress=progress, log=log)
    index.write(out / "index.parquet")
    timings["index_s"] = time.perf_counter() - t0

    pre = cfg["preprocess"]
    t = time.perf_counter()
    log("[2/7] illumination correction" + ("" if pre["illumination"]["enabled"] else ": off"))
    illumination = illumination_stage(index, pre["illumination"], out / "illumination", progress,
                                      pre["on_error"], log)
    log("[3/7] nuclei segmentation" + ("" if pre["segmentation"]["enabled"] else ": off"))
    seg = segmentation_stage(index, pre["segmentation"], pre["on_error"], out / "cells.parquet",
                             illumination, progress)
    timings["preprocess_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[4/7] features ({cfg['features']['extractor']}, {cfg['features']['model']})")
    extraction = extract_features(index, cfg["features"], cfg["channels"], out / "features",
                                  progress=progress, log=log, illumination=illumination,
                                  segmentation=pre["segmentation"], on_error=pre["on_error"])
    timings["features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[5/7] profiles")
    wells, treatments = build_profiles(out / "features", cfg["profiles"], out / "profiles")
    timings["profiles_s"] = time.perf_counter() - t

    log("[6/7] evaluation")
    evaluation = evaluate_profiles(wells, out / "evaluation.json",
                                   cfg["evaluation"]["protocols"], cfg["evaluation"],
                                   cfg["profiles"]["treatment_aggregation"])
    for w in evaluation["warnings"]:
        log(f"warning: {w}")
    log("[7/7] report")
    summary = dataset_summary(index)
    qc = None
    if seg is not None:
        summary["segmented cells"] = seg["cells"]
        summary["fields without cells"] = seg["image_sets_without_cells"]
        summary["skipped files"] = len(seg["skipped"])
        qc = cells_per_well(out / "cells.parquet", index)
    rate = extraction.get("fields_per_s") or extraction.get("cells_per_s")
    unit = "fields/s" if extraction.get("fields_per_s") else "cells/s"
    summary["feature extraction"] = (
        f"{extraction['image_sets']} fields in {extraction['seconds']:.1f} s"
        + (f" ({rate:.1f} {unit})" if rate else "")
    )
    write_report(out / "report.html", evaluation, read_parquet(treatments), summary,
                 config_text=yaml.safe_dump(cfg, sort_keys=False), cells_per_well=qc,
                 qc_title="segmented cells per well")
    timings["total_s"] = time.perf_counter() - t0
    for key in ("nsc", "nscb"):
        r = evaluation.get(key)
        if r and r.get("accuracy") is not None:
            log(f"{key.upper()}: {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f}%")
    log(f"wrote {out / 'evaluation.json'} and {out / 'report.html'} "
        f"in {timings['total_s']:.0f} s")
    return {"evaluation": evaluation, "timings": timings, "extraction": extraction}
