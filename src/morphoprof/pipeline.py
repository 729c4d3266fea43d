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

import datetime
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from morphoprof import __version__
from morphoprof.config import RunConfig
from morphoprof.datasets.source import build_index_from_config
from morphoprof.errors import InputError
from morphoprof.evaluation.evaluate import (
    Evaluation,
    EvaluationConfig,
    evaluate,
    is_well_level,
)
from morphoprof.extract import extract_stage
from morphoprof.index.schema import BATCH, PLATE, ExperimentIndex
from morphoprof.io_utils import (
    atomic_dir,
    atomic_path,
    check_writable,
    read_parquet,
    write_json,
    write_parquet,
)
from morphoprof.preprocess.illumination import compute_illumination
from morphoprof.preprocess.segmentation import (
    NucleiSection,
    SegmentationSummary,
    export_deepprofiler_locations,
    segment_index,
    write_overlays,
)
from morphoprof.profiles.aggregate import aggregate_parquet, treatment_profiles
from morphoprof.profiles.anndata_io import write_anndata
from morphoprof.profiles.cell_tvn import fit_cell_sphering
from morphoprof.profiles.columns import Columns
from morphoprof.profiles.normalize import NormalizationConfig, Normalizer
from morphoprof.profiles.select import select_features
from morphoprof.profiles.settings import ProfilesConfig
from morphoprof.registry import create_extractor
from morphoprof.report.html import profiles_summary, well_counts, write_report
from morphoprof.shards import RunSummary

logger = logging.getLogger(__name__)

NORMALIZE_BY = {"plate": PLATE, "batch": BATCH, "all": None}


def illumination_stage(index: ExperimentIndex, out: str | Path, settings, *, channels=None,
                       on_error: str = "fail"):
    """Compute (or reuse) per-plate illumination functions into ``out`` with ``settings`` (an
    :class:`~morphoprof.preprocess.illumination.IlluminationConfig`); each skipped image set is
    logged. The one illumination step of ``run`` and ``morphoprof illum``."""
    corr = compute_illumination(index, out, channels=channels, window=settings.window,
                                percentile=settings.percentile, n_jobs=settings.n_jobs,
                                on_error=on_error)
    for s in corr.skipped:
        logger.warning(f"skipped {s['reason']}")
    return corr


def segmentation_stage(index: ExperimentIndex, out: str | Path, nuclei, channel: str | None, *,
                       illumination=None, on_error: str = "fail", n_jobs: int = 0,
                       summary: str | Path | None = None,
                       overlays: int = 0, deepprofiler_locations: str | Path | None = None
                       ) -> SegmentationSummary:
    """Segment nuclei (``nuclei``: a :class:`NucleiConfig`) on ``channel`` into ``out`` (a
    cell table) and write its run summary to ``summary`` (default ``<out stem>_summary.json``).
    ``overlays``: that many evenly spaced fields drawn with their nucleus outlines beside the
    table; ``deepprofiler_locations``: the cells also as DeepProfiler location files. The first
    10 warnings and skipped files are logged. The one segmentation step of ``run`` and
    ``morphoprof segment``; returns the summary."""
    out = Path(out)
    result = segment_index(index, out, channel=channel, cfg=nuclei, illumination=illumination,
                           on_error=on_error, n_jobs=n_jobs)
    for w in result.warnings[:10]:  # the rest are in the summary file
        logger.warning(w)
    for s in result.skipped[:10]:
        logger.warning(f"skipped: {s['file']}: {s['reason']}")
    if overlays:
        folder = out.with_name(out.stem + "_overlays")
        step = max(len(index) // overlays, 1)
        paths = write_overlays(index, folder, channel, nuclei,
                               range(0, len(index), step)[:overlays], illumination)
        logger.info(f"{len(paths)} overlay(s) (nucleus outlines in red) -> {folder}")
    write_json(Path(summary) if summary else out.with_name(out.stem + "_summary.json"),
               result.to_json())
    if deepprofiler_locations:
        export_deepprofiler_locations(read_parquet(out), deepprofiler_locations)
    return result


def extract_features(index: ExperimentIndex, features, channels, out: Path, illumination=None,
                     segmentation=None, on_error: str = "fail",
                     overwrite: bool = False) -> RunSummary:
    """Run the configured extractor (``features``: a :class:`~morphoprof.config.FeaturesSection`;
    built by name, :mod:`morphoprof.registry`) over the index into ``out`` (a feature folder).

    ``transfer``: whole-field ImageNet features; ``classical``: cp_measure measurements of the
    nuclei segmented with the ``segmentation`` settings (a
    :class:`~morphoprof.preprocess.segmentation.NucleiSection`; default: its defaults), one
    row per cell.
    ``on_error`` (``preprocess.on_error``): ``skip`` leaves unreadable image sets out of the
    features (either extractor) and lists them in the summary.
    """
    seg = segmentation or NucleiSection()
    extractor = create_extractor(features.extractor, {
        **features.model_dump(), "channels": channels, "on_error": on_error,
        "nuclei": seg.nuclei(), "n_jobs": seg.n_jobs})
    return extractor.extract(index, out, illumination=illumination, overwrite=overwrite)


def cells_per_well(cells_path: Path, index: ExperimentIndex) -> pd.DataFrame:
    """Cell counts per well (wells with no cells get 0) from a cell table."""
    cells = read_parquet(cells_path, columns=[PLATE, "Metadata_well"])
    counts = cells.groupby([PLATE, "Metadata_well"]).size().rename("cells")
    wells = index.table[[PLATE, "Metadata_well"]].drop_duplicates().set_index(
        [PLATE, "Metadata_well"])
    return wells.join(counts).fillna(0).astype({"cells": int}).reset_index()


_NO_CONTROL_FIX = {
    "cli": ("--normalize center --reference all", "--normalize none"),
    "yaml": ("profiles.normalization.reference: all", "profiles.normalization.method: none"),
}


def resolve_normalization(norm: NormalizationConfig, has_controls: bool, what: str,
                          style: str = "cli") -> tuple[NormalizationConfig, str]:
    """The normalisation settings to run, and a note for the user ("" when none).

    ``method: None`` (the default) is ``center``, or ``none`` when ``what`` (the screen or
    table) has no control rows, with a note saying so and how to centre on all wells instead.
    An explicit method fitted on controls that do not exist is refused up front, naming the
    flag (``style="cli"``) or config key (``"yaml"``) to use.
    """
    all_fix, none_fix = _NO_CONTROL_FIX[style]
    needs_controls = norm.reference == "controls" and norm.fallback != "all"
    if norm.method is None:
        if has_controls or not needs_controls:
            return norm.replace(method="center"), ""
        return norm.replace(method="none"), (
            f"note: {what} has no control wells (Metadata_control is false everywhere), so "
            f"profiles are not normalised; to centre each plate on all its wells instead, use "
            f"{all_fix}")
    if norm.method != "none" and needs_controls and not has_controls:
        raise InputError(f"{what} has no control wells (Metadata_control is false everywhere) "
                         f"to fit the {norm.method!r} normalisation on: use {all_fix} (fit "
                         f"on every well), or {none_fix}")
    return norm, ""


def build_profiles(features_dir: str | Path, settings: ProfilesConfig | Mapping,
                   out_dir: str | Path, columns=None, style: str = "cli") -> tuple[Path, Path]:
    """Features -> selected, normalised well profiles -> treatment profiles (Parquet files).

    ``settings``: a :class:`~morphoprof.profiles.settings.ProfilesConfig` (or the mapping of
    one, validated here). Aggregation to wells streams the feature shards (never loaded whole);
    the fitted normaliser is saved as ``normalizer.npz`` to apply to new data; ``format``
    ``h5ad`` or ``zarr`` also writes both profile tables as AnnData. ``columns``
    (:class:`~morphoprof.profiles.columns.Columns`) maps other metadata names; the files keep
    the input's names. Every file is written into a temporary folder that replaces its
    outputs in ``out_dir`` only when all are written, so a failure leaves nothing partial.
    ``style`` picks how a settings problem names the fix (CLI flags or YAML keys)."""
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    cfg = settings if isinstance(settings, ProfilesConfig) else ProfilesConfig(**settings)
    cols = columns or Columns()
    tvn = cfg.cell_tvn
    sphering = None
    if tvn.reference:
        sphering = fit_cell_sphering(features_dir, reference=tvn.reference,
                                     eps=tvn.eps, control_column=cols.control,
                                     compound_column=cols.compound,
                                     control_values=cols.control_values,
                                     metadata=list(cols.mapping()))
        logger.info(sphering.note or f"cell TVN: sphering fitted on {sphering.n_cells} "
                    f"{sphering.reference} cells")
    wells = aggregate_parquet(features_dir, [cols.plate, cols.well],
                              cfg.well_aggregation, sphering=sphering,
                              metadata=list(cols.mapping()))
    wells = cols.to_canonical(wells, ("compound", "concentration", "control"),
                              source=str(features_dir))
    norm, note = resolve_normalization(cfg.normalization, bool(wells["Metadata_control"].any()),
                                       str(features_dir), style)
    if note:
        logger.info(note)
    wells, dropped = select_features(wells, cfg.feature_selection, blocklist=cfg.blocklist)
    normalizer = Normalizer(norm.method, NORMALIZE_BY.get(norm.by, norm.by), norm.reference,
                            norm.eps, norm.n_factors, norm.fallback).fit(wells)
    wells = normalizer.transform(wells)
    treatments = treatment_profiles(wells, cfg.treatment_aggregation)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "dropped_features.json", dropped)
        if sphering is not None:
            write_json(tmp / "cell_tvn.json", sphering.summary())
            sphering.sphering.save(tmp / "cell_tvn.npz")
        normalizer.save(tmp / "normalizer.npz")
        write_parquet(tmp / "wells.parquet", cols.from_canonical(wells))
        write_parquet(tmp / "treatments.parquet", cols.from_canonical(treatments))
        fmt = cfg.format
        if fmt != "parquet":  # an AnnData copy of each, for scanpy / scverse users
            write_anndata(tmp / f"wells.{fmt}", cols.from_canonical(wells), fmt)
            write_anndata(tmp / f"treatments.{fmt}", cols.from_canonical(treatments), fmt)
    return out_dir / "wells.parquet", out_dir / "treatments.parquet"


def evaluate_profiles(profiles_path: str | Path, out: str | Path, settings=None,
                      treatment_aggregation: str = "median") -> Evaluation:
    """Well or treatment profiles -> evaluation JSON (NSC / NSCB, k-NN, mAP, conformal), as
    ``settings`` (an :class:`~morphoprof.evaluation.evaluate.EvaluationConfig`; default: its
    defaults) asks."""
    cfg = settings or EvaluationConfig()
    profiles = read_parquet(profiles_path)
    result = evaluate(profiles, k_values=cfg.k, alpha=cfg.alpha, null_size=cfg.null_size,
                      treatment_aggregation=treatment_aggregation)
    result = result.protocols(cfg.protocols)
    write_json(out, result.to_json())
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


def extraction_summary(extraction: RunSummary, n_image_sets: int) -> str:
    """The report's line about feature extraction, true after a resumed run too: what was
    extracted in this run (image sets, or the cells of a run over segmented cells; time, rate)
    and how many shards were reused."""
    e = extraction
    parts = []
    if e.image_sets or e.cells:
        done = f"{e.image_sets}" if e.image_sets else f"{e.cells} cells"
        rate = (f"{e.cells} cells, {e.cells_per_s:.1f} cells/s" if e.image_sets and e.cells_per_s
                else f"{e.cells_per_s:.1f} cells/s" if e.cells_per_s
                else f"{e.fields_per_s:.1f} fields/s" if e.fields_per_s else "")
        parts.append(f"{done} extracted in this run in {e.seconds:.1f} s"
                     + (f" ({rate})" if rate else ""))
    if e.shards_skipped:
        parts.append(f"{e.shards_skipped} finished shard(s) reused from an earlier run")
    if e.n_skipped:
        parts.append(f"{e.n_skipped} skipped (unreadable)")
    return f"{n_image_sets} image sets: " + ("; ".join(parts) or "nothing to do")


def fields_per_well(index: ExperimentIndex) -> pd.DataFrame:
    """QC table (plate, well, cells = number of fields) of an index: what whole-field
    profiles summarise per well."""
    t = index.table
    return (t.groupby([PLATE, "Metadata_well"]).size().rename("cells").reset_index())


def applied_config(cfg: RunConfig) -> dict:
    """The settings that applied to a run, for the report: keys of other sources, of disabled
    stages and of the other extractor or normalisation methods are left out."""
    data = {k: v for k, v in cfg.data.model_dump(mode="json").items()
            if v not in (None, {}, False)}
    pre = {}
    for stage in ("illumination", "segmentation"):
        section = getattr(cfg.preprocess, stage)
        pre[stage] = section.model_dump(mode="json") if section.enabled else {"enabled": False}
    pre["on_error"] = cfg.preprocess.on_error
    feats = cfg.features.model_dump(mode="json")
    if not feats["checkpoint"]:
        feats.pop("checkpoint")
    if feats["extractor"] == "classical":
        feats = {k: feats[k] for k in ("extractor", "measurements")}
    else:
        feats.pop("measurements", None)
        if feats["channel_strategy"] != "rgb":
            feats.pop("rgb_channels", None)
        if feats["channel_strategy"] != "native":
            feats.pop("in_chans", None)
    norm = cfg.profiles.normalization.model_dump(mode="json")
    if norm["method"] == "none":
        norm = {"method": "none"}
    else:
        if norm["method"] != "factor_analysis":
            norm.pop("n_factors", None)
        if norm["reference"] == "all":
            norm.pop("fallback", None)
    profiles = {**cfg.profiles.model_dump(mode="json"), "normalization": norm}
    return {"data": data, "channels": cfg.channels, "preprocess": pre, "features": feats,
            "profiles": profiles, "evaluation": cfg.evaluation.model_dump(mode="json"),
            "output": cfg.output}


def report_header(inputs: dict[str, str], command: str | None = None) -> dict:
    """The report's header: date, morphoprof version, the command and the inputs."""
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "morphoprof": __version__,
            "command": command or " ".join(["morphoprof", *sys.argv[1:]]),
            **{k: str(v) for k, v in inputs.items() if v}}


def example_fields(index: ExperimentIndex, channels=None, per_moa: int = 2,
                   size: int = 160) -> list[dict]:
    """A few fields per MoA (controls as their own group) for the report, each
    ``{"moa", "label", "rgb"}`` with ``rgb`` a ``(size, size, 3)`` uint8 thumbnail: up to
    three stains mapped to colours (DNA blue, then green, red), each scaled to its own
    0.5-99.5 percentile range. Unreadable fields are left out (the report is not the place
    to fail)."""
    from skimage.transform import resize

    t = index.table
    chans = list(channels or index.channels)
    dna = [c for c in chans if c.lower() in ("dna", "dapi", "hoechst")]
    order = (dna + [c for c in chans if c not in dna])[:3]
    groups = t["Metadata_moa"].where(~t["Metadata_control"], "control (" +
                                     t["Metadata_compound"].astype(str) + ")")
    groups = groups.replace("", "(no MoA)")
    out = []
    for moa in sorted(groups.unique()):
        rows = np.flatnonzero((groups == moa).to_numpy()).tolist()
        picked = rows[:: max(1, len(rows) // per_moa)][:per_moa]
        for i in picked:
            try:
                img = index.read(i, order)
            except (InputError, OSError):
                continue
            rgb = np.zeros((*img.shape[1:], 3), np.float32)
            for k, plane in enumerate(img):  # DNA -> blue, next -> green, next -> red
                lo, hi = np.percentile(plane, [0.5, 99.5])
                rgb[..., 2 - k] = np.clip((plane - lo) / (hi - lo or 1), 0, 1)
            h, w = rgb.shape[:2]
            scale = size / max(h, w)
            thumb = resize(rgb, (max(1, round(h * scale)), max(1, round(w * scale))),
                           anti_aliasing=True)
            row = t.iloc[i]
            out.append({"moa": moa, "rgb": (thumb * 255).astype(np.uint8),
                        "label": f"{row['Metadata_compound']} {row['Metadata_concentration']:g}"
                                 f" · {row['Metadata_plate']} {row['Metadata_well']} "
                                 f"s{row['Metadata_site']}",
                        "channels": " / ".join(f"{c}={col}" for c, col in
                                               zip(order, ("blue", "green", "red")))})
    return out


def report_stage(out: str | Path, evaluation: str | Path, profiles: pd.DataFrame,
                 wells: pd.DataFrame | None = None, *, index: str | Path | None = None,
                 config: str | Path | None = None, inputs: Mapping[str, str] | None = None
                 ) -> Path:
    """The HTML report (``morphoprof report``) of profiles evaluated elsewhere: the evaluation
    JSON file ``evaluation``, the ``profiles`` it scored (well profiles are aggregated to
    treatments, and kept for the QC map when ``wells`` is not given), and, where given, the
    index (dataset summary, example fields) and the config file shown. ``inputs``: the files
    named in the header. Returns ``out``."""
    ev = Path(evaluation)
    if not ev.is_file():
        raise InputError(f"evaluation file not found: {ev}")
    try:
        data = json.loads(ev.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{ev} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not {"level", "nsc"} & data.keys():
        raise InputError(f"{ev} is not an evaluation (a JSON object of morphoprof evaluate)")
    result = Evaluation.from_json(data)
    if is_well_level(profiles):
        wells = profiles if wells is None else wells
        profiles = treatment_profiles(profiles)
    qc = well_counts(wells) if wells is not None and "Metadata_count" in wells.columns else None
    index_ = ExperimentIndex.read_parquet(index) if index else None
    summary = dataset_summary(index_) if index_ is not None else {}
    summary.update(profiles_summary(profiles, wells))
    try:
        config_text = Path(config).read_text() if config else ""
    except OSError as exc:
        raise InputError(f"cannot read {config}: {exc.strerror}") from exc
    write_report(out, result, profiles, summary, config_text=config_text, cells_per_well=qc,
                 header=report_header(dict(inputs or {})),
                 examples=example_fields(index_) if index_ is not None else None,
                 qc_title="rows per well profile (fields, or cells for per-cell features)")
    return Path(out)


@dataclass(frozen=True)
class RunResult:
    """What :func:`run_pipeline` did.

    Attributes:
        evaluation: the profiles' evaluation (also ``out/evaluation.json``).
        timings: seconds per stage (``index_s``, ``preprocess_s``, ``features_s``,
            ``profiles_s``, ``total_s``).
        extraction: the feature extraction's run summary (``out/features/run_summary.json``).
        out: the run's folder.
    """

    evaluation: Evaluation
    timings: dict[str, float]
    extraction: RunSummary
    out: Path

    def summary_lines(self) -> list[str]:
        """What a finished run tells its user: the evaluation's headline figures
        (:meth:`~morphoprof.evaluation.evaluate.Evaluation.summary_lines`) and the files
        written."""
        return [*self.evaluation.summary_lines(),
                f"wrote {self.out / 'evaluation.json'} and {self.out / 'report.html'} in "
                f"{self.timings['total_s']:.0f} s"]


def run_pipeline(cfg: RunConfig, config_text: str,
                 config_path: str | None = None, overwrite: bool = False) -> RunResult:
    """Run every stage of a validated config (each announced in this module's log); the
    :class:`RunResult` says what was done. A re-run reuses the finished work of an earlier
    one with the same settings; ``overwrite`` replaces a feature folder made with others
    (refused without it)."""
    out = check_writable(cfg.output, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(config_text)
    timings = {}
    t0 = time.perf_counter()
    logger.info("[1/7] experiment index")
    index = build_index_from_config(cfg.data, out)
    index.write(out / "index.parquet")
    timings["index_s"] = time.perf_counter() - t0
    # a screen without controls: decided now, not after hours of extraction
    norm, note = resolve_normalization(cfg.profiles.normalization,
                                       bool(index.table["Metadata_control"].any()),
                                       f"the screen ({cfg.data.source} "
                                       f"{cfg.data.path or ''})".replace(" )", ")"),
                                       "yaml")
    if note:
        logger.info(note)
    cfg = cfg.model_copy(update={"profiles": cfg.profiles.replace(normalization=norm)})

    pre = cfg.preprocess
    t = time.perf_counter()
    ill, segcfg = pre.illumination, pre.segmentation
    logger.info("[2/7] illumination correction" + ("" if ill.enabled else ": off"))
    illumination = illumination_stage(
        index, out / "illumination", ill.settings(), on_error=pre.on_error,
    ) if ill.enabled else None
    logger.info("[3/7] nuclei segmentation" + ("" if segcfg.enabled else ": off"))
    seg = segmentation_stage(
        index, out / "cells.parquet", segcfg.nuclei(), segcfg.channel,
        illumination=illumination, on_error=pre.on_error, n_jobs=segcfg.n_jobs,
        summary=out / "segmentation_summary.json",
    ) if segcfg.enabled else None
    timings["preprocess_s"] = time.perf_counter() - t

    t = time.perf_counter()
    feats = cfg.features
    logger.info("[4/7] features (" + (f"weak model {feats.checkpoint}" if feats.checkpoint else
                                      f"{feats.extractor}, {feats.model}") + ")")
    if feats.checkpoint:  # each segmented cell, cropped as in training
        extraction = extract_stage(out / "features", index=index, cells=out / "cells.parquet",
                                   checkpoint=feats.checkpoint, illumination=illumination,
                                   overwrite=overwrite,
                                   settings={**feats.model_dump(), "channels": cfg.channels,
                                             "batch_size": feats.batch_size if "batch_size"
                                             in feats.model_fields_set else None})
    else:
        extraction = extract_features(index, feats, cfg.channels, out / "features",
                                      illumination=illumination,
                                      segmentation=pre.segmentation, on_error=pre.on_error,
                                      overwrite=overwrite)
    timings["features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    logger.info("[5/7] profiles")
    wells, treatments = build_profiles(out / "features", cfg.profiles, out / "profiles",
                                       style="yaml")
    timings["profiles_s"] = time.perf_counter() - t

    logger.info("[6/7] evaluation")
    evaluation = evaluate_profiles(wells, out / "evaluation.json", cfg.evaluation,
                                   cfg.profiles.treatment_aggregation)
    logger.info("[7/7] report")
    _run_report(out, cfg, index, evaluation, treatments, seg, extraction, config_path)
    timings["total_s"] = time.perf_counter() - t0
    return RunResult(evaluation, timings, extraction, out)


def _run_report(out: Path, cfg: RunConfig, index: ExperimentIndex, evaluation: Evaluation,
                treatments: Path, seg: SegmentationSummary | None, extraction: RunSummary,
                config_path: str | None) -> None:
    """``out/report.html`` of a run: the dataset (and segmentation) summary, the QC plate map
    (segmented cells per well, else fields per well), the settings that applied, examples."""
    summary = dataset_summary(index)
    if seg is not None:
        summary["segmented cells"] = seg.cells
        summary["fields without cells"] = seg.image_sets_without_cells
        summary["skipped files"] = len(seg.skipped)
    summary["feature extraction"] = extraction_summary(extraction, len(index))
    qc = cells_per_well(out / "cells.parquet", index) if seg is not None else \
        fields_per_well(index)
    write_report(out / "report.html", evaluation, read_parquet(treatments), summary,
                 config_text=yaml.safe_dump(applied_config(cfg), sort_keys=False),
                 cells_per_well=qc, qc_title=("segmented cells per well" if seg is not None
                                              else "fields (image sets) per well"),
                 header=report_header(inputs={"configuration": config_path or "(built in)",
                                              "data": cfg.data.path or "",
                                              "output": str(out)}),
                 examples=example_fields(index, cfg.channels))
