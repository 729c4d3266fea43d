"""The ``morphoprof`` command line: a thin layer over the stage functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morphoprof import __version__
from morphoprof.config import FeaturesSection, NucleiSection
from morphoprof.errors import MorphoprofError, os_reason
from morphoprof.evaluation.evaluate import EvaluationConfig
from morphoprof.features.transfer import TransferConfig
from morphoprof.preprocess.illumination import IlluminationConfig
from morphoprof.profiles.cell_tvn import CellTVNConfig
from morphoprof.profiles.normalize import METHOD_ALIASES, METHODS, NormalizationConfig
from morphoprof.profiles.select import OPERATIONS
from morphoprof.profiles.settings import ProfilesConfig
from morphoprof.registry import create_extractor, extractor_names
from morphoprof.settings import add_options, from_options
from morphoprof.shards import read_features

# the TransferConfig settings that are options of extract, with the model's defaults
EXTRACT_OPTIONS = ("model", "weights", "channel_strategy", "tiles", "layer", "image_size",
                   "device", "precision", "backend")


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_synth(a: argparse.Namespace) -> int:
    from morphoprof.datasets.synthetic import SynthConfig, generate_screen

    cfg = SynthConfig(
        n_moas=a.moas, compounds_per_moa=a.compounds_per_moa, n_batches=a.batches,
        plates_per_batch=a.plates_per_batch, sites_per_well=a.sites, height=a.size[0],
        width=a.size[1], cells_per_field=a.cells, cell_scale=a.cell_scale, seed=a.seed,
    )
    generate_screen(a.out, cfg, overwrite=a.overwrite)
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from morphoprof.datasets.download import BBBC021_BASE_URL, download_bbbc021, load_checksums

    checksums = load_checksums(a.checksums) if a.checksums else None
    plates = [p for item in a.plates or [] for p in item.split(",") if p] or None
    summary = download_bbbc021(a.dest, plates=plates, base_url=a.base_url or BBBC021_BASE_URL,
                               checksums=checksums, keep_zips=a.keep_zips)
    print(f"fetched {len(summary['fetched'])} plate(s), {len(summary['skipped'])} already "
          f"complete, into {a.dest}")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from morphoprof.index import import_bbbc021, import_csv, import_fields_6moa
    from morphoprof.index.schema import summarize_left_out

    layout = IMPORTER_ALIASES.get(a.layout, a.layout)
    if layout == "cellprofiler":
        from morphoprof.features.cellprofiler import import_cellprofiler

        summary = import_cellprofiler(a.path, a.out, plate=a.plate, platemap=a.platemap,
                                      platemap_well=a.platemap_well, overwrite=a.overwrite,
                                      chunk_size=a.chunk_size)
        print(f"{summary['rows']} cells x {summary['features']} features ({summary['kind']}, "
              f"CytoTable preset {summary['cytotable_preset']}) -> {summary['out']}")
        return 0
    if layout == "loaddata":
        return _import_loaddata(a)
    if layout == "ome-zarr":
        from morphoprof.index.ome_zarr import import_ome_zarr

        index = import_ome_zarr(a.path, platemap=a.platemap, platemap_well=a.platemap_well,
                                channels=a.channels, only_present=a.only_present)
        index.write(a.out)
        print(f"{len(index)} fields, channels {index.channels} -> {a.out}")
        return 0
    if a.plates and layout != "bbbc021":
        raise MorphoprofError("--plates applies to 'import bbbc021' only")
    if layout == "bbbc021":
        index = import_bbbc021(a.path, a.image_csv, a.moa_csv, check_shapes=a.check_shapes,
                               progress=True, plates=a.plates, only_present=a.only_present)
    elif layout == "bbbc021-6moa":
        index = import_fields_6moa(a.path, only_present=a.only_present)
    else:
        fields: dict | str = a.preset or {}
        if not a.preset:
            fields = _pairs(a.field, "--field")
        index = import_csv(a.path, _pairs(a.channel, "--channel"), fields, root=a.root,
                           sep=a.sep, check_shapes=a.check_shapes, only_present=a.only_present)
    for line in summarize_left_out(index):
        print(line)
    index.write(a.out)
    print(f"{len(index)} image sets, channels {index.channels} -> {a.out}")
    return 0


def _import_loaddata(a: argparse.Namespace) -> int:
    from morphoprof.index.loaddata import illumination_files, import_loaddata
    from morphoprof.index.schema import summarize_left_out
    from morphoprof.preprocess.illumination import import_illumination

    index = import_loaddata(a.path, root=a.root, mirror=a.mirror, metadata=a.metadata or (),
                            channels=a.channels, check_shapes=a.check_shapes,
                            only_present=a.only_present)
    files = illumination_files(a.path, index.channels, illum_dir=a.illum, root=a.root,
                               mirror=a.mirror)
    for line in summarize_left_out(index):
        print(line)
    index.write(a.out)
    print(f"{len(index)} image sets, channels {index.channels} -> {a.out}")
    plates = set(index.table["Metadata_plate"])
    if files:
        folder = Path(a.illum_out or Path(a.out).parent / "illumination")
        import_illumination(files, folder, index.channels)
        lacking = sorted(plates - set(files))
        print(f"illumination functions of {len(files)} plate(s) -> {folder} (give "
              f"--illumination {folder} to illum-using stages)"
              + (f"; none for plate(s) {lacking}" if lacking else ""))
    elif a.illum:
        print(f"note: no <plate>_Illum<channel>.npy for these plates under {a.illum}")
    return 0


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["A=B", ...]`` -> {A: B}; a malformed item is an error naming the flag."""
    out = {}
    for kv in items or []:
        key, sep, value = kv.partition("=")
        if not sep or not key or not value:
            raise MorphoprofError(f"{flag} {kv!r}: expected NAME=COLUMN")
        out[key] = value
    return out


def cmd_validate(a: argparse.Namespace) -> int:
    from morphoprof.index import ExperimentIndex

    index = ExperimentIndex.read_parquet(a.index)
    index.validate(channels=a.channels, check_shapes=not a.no_shapes, progress=True,
                   deep=a.deep)
    what = "every image read" if a.deep else "files present" + (
        "" if a.no_shapes else ", headers read")
    print(f"{a.index}: {len(index)} image sets, channels {index.channels}: OK ({what})")
    return 0


def _illumination(folder: str | None):
    if not folder:
        return None
    from morphoprof.preprocess.illumination import IlluminationCorrection

    return IlluminationCorrection.load(folder)


def cmd_illum(a: argparse.Namespace) -> int:
    from morphoprof.index import ExperimentIndex
    from morphoprof.pipeline import illumination_stage

    settings = from_options(IlluminationConfig, a)
    index = ExperimentIndex.read_parquet(a.index)
    corr = illumination_stage(index, a.out, settings, channels=a.channels, on_error=a.on_error)
    print(f"illumination functions of {index.table['Metadata_plate'].nunique()} plate(s) "
          f"-> {a.out}" + (f"; {len(corr.skipped)} image set(s) skipped (listed in "
                           f"{Path(a.out) / 'illumination_skipped.json'})"
                           if corr.skipped else ""))
    return 0


def cmd_segment(a: argparse.Namespace) -> int:
    from morphoprof.index import ExperimentIndex
    from morphoprof.pipeline import segmentation_stage

    settings = from_options(NucleiSection, a)
    index = ExperimentIndex.read_parquet(a.index)
    summary = segmentation_stage(index, a.out, settings.nuclei(), settings.channel,
                                 illumination=_illumination(a.illumination),
                                 on_error=a.on_error, n_jobs=settings.n_jobs, overlays=a.overlays,
                                 deepprofiler_locations=a.deepprofiler_locations)
    print(f"{summary['cells']} cells in {summary['image_sets']} image sets "
          f"({summary['image_sets_without_cells']} without cells, {len(summary['skipped'])} "
          f"skipped, {len(summary['warnings'])} warnings) -> {a.out}")
    for w in summary["warnings"][:10]:
        print(f"warning: {w}", file=sys.stderr)
    for s in summary["skipped"][:10]:
        print(f"skipped: {s['file']}: {s['reason']}", file=sys.stderr)
    return 0


def cmd_crops(a: argparse.Namespace) -> int:
    from morphoprof.index import ExperimentIndex
    from morphoprof.io_utils import read_parquet
    from morphoprof.preprocess.crops import export_crops

    index = ExperimentIndex.read_parquet(a.index)
    summary = export_crops(index, read_parquet(a.cells), a.out, size=a.size, edge=a.edge,
                           normalization=a.normalization,
                           illumination=_illumination(a.illumination))
    _print_json(summary)
    return 0


def _extracted(a: argparse.Namespace, summary: dict) -> None:
    """Print an extraction's summary; with ``--format h5ad|zarr`` also write the feature folder
    as one AnnData (``OUT/features.h5ad`` or ``.zarr``; written whole, then renamed)."""
    if a.format != "parquet":
        import os
        import shutil

        from morphoprof.profiles.anndata_io import write_anndata

        target = Path(a.out) / f"features.{a.format}"
        tmp = target.with_name(f".{target.name}.tmp")
        if tmp.is_dir():  # left by a killed run
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
        try:
            write_anndata(tmp, read_features(a.out), a.format)
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except OSError as exc:
            raise MorphoprofError(f"cannot write {target}: {exc}") from exc
        summary = {**summary, "anndata": str(target)}
    _print_json(summary)


def cmd_extract(a: argparse.Namespace) -> int:
    from morphoprof.index import ExperimentIndex

    if a.crops and (a.index or a.cells):
        raise MorphoprofError("--crops takes the crops themselves: give no index and no --cells")
    if not a.crops and not a.index:
        raise MorphoprofError("extract needs an index.parquet, or --crops")
    if a.crops:  # read (and checked) before any model is built
        from morphoprof.models.weak_run import load_crop_array

        crops, table, names = load_crop_array(a.crops, a.crop_table, a.channels,
                                              a.control_value or ["DMSO"])
    index = ExperimentIndex.read_parquet(a.index) if a.index else None  # before any model
    size, normalization = a.crop_size, a.normalization
    # a crop is ~50x fewer pixels than a field: batches of 16 would leave the network idle
    batch_size = a.batch_size or (256 if a.crops or a.cells else 16)
    settings = {**{k: getattr(a, k) for k in EXTRACT_OPTIONS}, "batch_size": batch_size,
                "num_workers": a.workers, "n_jobs": a.workers or 1, "channels": a.channels,
                "on_error": a.on_error}
    if a.extractor == "classical":  # measures the nuclei it segments itself: no model, no cells
        extractor = create_extractor("classical", {**settings, "channels": names} if a.crops
                                     else settings)
        _extracted(a, extractor.extract_crops(crops, table, names, a.out, overwrite=a.overwrite)
                   if a.crops else extractor.extract(
                       index, a.out, illumination=_illumination(a.illumination),
                       overwrite=a.overwrite))
        return 0
    if a.checkpoint:
        from morphoprof.models.weak import extractor_from_checkpoint

        extractor, hp = extractor_from_checkpoint(a.checkpoint, a.layer, batch_size, a.device,
                                                  a.workers, precision=a.precision)
        if a.channels and list(a.channels) != hp["channels"]:
            raise MorphoprofError(f"{a.checkpoint} was trained on channels {hp['channels']}, "
                                  f"not {a.channels}")
        size = size or hp["crop_size"]
        normalization = normalization or hp["normalization"]
        if a.crops and crops.shape[-1] != hp["crop_size"]:
            raise MorphoprofError(f"{a.crops}: crops are {crops.shape[-1]} px; {a.checkpoint} "
                                  f"was trained on {hp['crop_size']} px crops")
    else:
        extractor = create_extractor(a.extractor, settings)
    if a.crops:
        _extracted(a, extractor.extract_crops(crops, table, names, a.out,
                                              normalization or "max", overwrite=a.overwrite))
        return 0
    illumination = _illumination(a.illumination)
    if a.cells:
        from morphoprof.io_utils import read_parquet

        cells_path = Path(a.cells)
        if not cells_path.is_file():
            raise MorphoprofError(f"cell table not found: {cells_path}")
        _extracted(a, extractor.extract_cells(
            index, read_parquet(cells_path), a.out, size=size or 96,
            normalization=normalization or "max", illumination=illumination,
            overwrite=a.overwrite))
    else:
        _extracted(a, extractor.extract(index, a.out, overwrite=a.overwrite,
                                        illumination=illumination, scheduler=a.scheduler))
    return 0


def _columns(a: argparse.Namespace):
    from morphoprof.profiles.columns import Columns

    return Columns(plate=a.plate_col, well=a.well_col, compound=a.compound_col,
                   concentration=a.concentration_col, moa=a.moa_col, batch=a.batch_col,
                   control=a.control_col, control_values=tuple(a.control_value or ["DMSO"]))


def _read_profiles(path: str, cols, required=()):
    from morphoprof.io_utils import read_parquet

    p = Path(path)
    if not p.is_file():
        raise MorphoprofError(f"profiles file not found: {p}")
    try:
        df = read_parquet(p)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise MorphoprofError(f"cannot read {p} as Parquet: {exc}") from exc
    return cols.to_canonical(df, required, source=str(p))


def _by(value: str):
    from morphoprof.pipeline import NORMALIZE_BY

    return NORMALIZE_BY.get(value, value)


def cmd_aggregate(a: argparse.Namespace) -> int:
    from morphoprof.pipeline import build_profiles

    settings = from_options(ProfilesConfig, a,
                            cell_tvn=from_options(CellTVNConfig, a, prefix="cell_tvn_"),
                            normalization=from_options(NormalizationConfig, a))
    wells, treatments = build_profiles(Path(a.features), settings, Path(a.out), _columns(a))
    print(f"wrote {wells} and {treatments}")
    return 0


def cmd_normalize(a: argparse.Namespace) -> int:
    from morphoprof.io_utils import write_parquet
    from morphoprof.profiles.normalize import Normalizer
    from morphoprof.profiles.select import select_features

    cols = _columns(a)
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
        for w in normalizer.warnings:
            print(f"warning: {w}")
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
    from morphoprof.evaluation.evaluate import evaluate
    from morphoprof.io_utils import write_json

    profiles = _read_profiles(a.profiles, _columns(a), ("compound", "moa"))
    settings = from_options(EvaluationConfig, a)
    result = evaluate(profiles, k_values=settings.k, alpha=settings.alpha,
                      null_size=settings.null_size,
                      treatment_aggregation=a.treatment_aggregation, group_columns=a.group)
    write_json(a.out, result)
    for key in ("nsc", "nscb"):
        r = result.get(key, {})
        if r.get("accuracy") is not None:
            print(f"{key.upper()}: {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f}%")
    for name, r in result["map"].items():
        if "mean_map" in r:
            print(f"mAP ({name}): {r['mean_map']:.3f}, retrieved {r['fraction_retrieved']:.0%}")
    conf = result.get("conformal", {})
    if "coverage" in conf:
        print(f"conformal: coverage {conf['coverage']:.0%} (target {conf['target_coverage']:.0%}),"
              f" mean set size {conf['mean_set_size']:.2f}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {a.out}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from morphoprof.evaluation.evaluate import is_well_level
    from morphoprof.pipeline import dataset_summary, example_fields, report_header
    from morphoprof.profiles.aggregate import treatment_profiles
    from morphoprof.report.html import profiles_summary, well_counts, write_report

    cols = _columns(a)
    ev = Path(a.evaluation)
    if not ev.is_file():
        raise MorphoprofError(f"evaluation file not found: {ev}")
    try:
        evaluation = json.loads(ev.read_text())
    except json.JSONDecodeError as exc:
        raise MorphoprofError(f"{ev} is not JSON: {exc}") from exc
    profiles = _read_profiles(a.profiles, cols)
    wells = _read_profiles(a.wells, cols) if a.wells else None
    if is_well_level(profiles):
        wells = profiles if wells is None else wells
        profiles = treatment_profiles(profiles)
    qc = well_counts(wells) if wells is not None and "Metadata_count" in wells.columns else None
    index = examples = None
    if a.index:
        from morphoprof.index import ExperimentIndex

        index = ExperimentIndex.read_parquet(a.index)
        examples = example_fields(index)
    summary = dataset_summary(index) if index is not None else {}
    summary.update(profiles_summary(profiles, wells))
    config_text = ""
    if a.config:
        try:
            config_text = Path(a.config).read_text()
        except OSError as exc:
            raise MorphoprofError(f"cannot read {a.config}: {exc.strerror}") from exc
    header = report_header({"profiles": a.profiles, "evaluation": a.evaluation,
                            "wells": a.wells or "", "index": a.index or "",
                            "configuration": a.config or ""})
    write_report(a.out, evaluation, profiles, summary, config_text=config_text,
                 cells_per_well=qc, header=header, examples=examples,
                 qc_title="rows per well profile (fields, or cells for per-cell "
                 "features)")
    print(f"wrote {a.out}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from morphoprof.config import load_config
    from morphoprof.pipeline import run_pipeline

    cfg, text = load_config(a.config)
    run_pipeline(cfg, text, config_path=str(Path(a.config).resolve()))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from morphoprof.config import load_train_config
    from morphoprof.io_utils import check_writable
    from morphoprof.models.run import run_training

    if a.kind == "weak":
        return _train_weak(a)
    cfg, text = load_train_config(a.config, a.kind)
    check_writable(Path(cfg["output"]) / a.kind, folder=True)
    if a.epochs is not None:
        cfg["train"]["epochs"] = a.epochs
    result = run_training(a.kind, cfg, text, progress=not a.quiet)
    t = result["treatment"]
    print(f"{a.kind}: treatment accuracy {t['correct']}/{t['n']} = {t['accuracy']:.3f} "
          f"(image accuracy {result['image_accuracy']:.3f}); conformal coverage "
          f"{result['conformal']['coverage']:.3f} at target "
          f"{result['conformal']['target_coverage']:.2f}, mean set size "
          f"{result['conformal']['mean_set_size']:.2f}; results in "
          f"{Path(cfg['output']) / a.kind / 'cv.json'}")
    return 0


def _train_weak(a: argparse.Namespace) -> int:
    from morphoprof.config import load_weak_config
    from morphoprof.io_utils import check_writable
    from morphoprof.models.weak_run import run_weak

    cfg, text = load_weak_config(a.config)
    check_writable(Path(cfg["output"]) / "weak", folder=True)
    if a.epochs is not None:
        cfg["train"]["epochs"] = a.epochs
    s = run_weak(cfg, text, progress=not a.quiet)
    if "classes" not in s:  # not the first process of a multi-process run
        return 0
    acc = s.get("heldout_cell_accuracy")
    held = (f"held-out cell accuracy {acc:.3f} (chance {s['chance_accuracy']:.3f}); "
            if acc is not None else "")
    print(f"weak: {len(s['classes'])} labels, {s['epochs_run']} epochs, {held}"
          f"{s['train_cells_per_s']:.0f} training cells/s; embeddings ({s['layer']}) in "
          f"{s['features']}; summary in {Path(cfg['output']) / 'weak' / 'weak.json'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import yaml

    from morphoprof.config import DEMO_CONFIG, validate_config
    from morphoprof.pipeline import run_pipeline

    out = Path(a.out).resolve()
    raw = yaml.safe_load(DEMO_CONFIG)
    raw["output"] = str(out)
    raw["data"]["path"] = str(out / "synthetic_screen")
    cfg = validate_config(raw, "built-in demo")
    text = yaml.safe_dump(raw, sort_keys=False)
    print(f"morphoprof demo -> {out}")
    run_pipeline(cfg, text)
    return 0


IMPORTERS = ("bbbc021", "bbbc021-6moa", "csv", "loaddata", "ome-zarr", "cellprofiler")
# the YAML spellings, accepted here too
IMPORTER_ALIASES = {"bbbc021_6moa": "bbbc021-6moa", "ome_zarr": "ome-zarr"}


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or not action.option_strings or default is None
                or default is False or default == [] or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


def _parser(sub, name: str, help: str, outputs=(), **kw) -> argparse.ArgumentParser:
    """A sub-command whose ``outputs`` ((attribute, is_folder), ...) are checked for
    writability before it runs; ``is_folder`` is a bool or a function of the parsed arguments."""
    s = sub.add_parser(name, help=help, description=kw.pop("description", help[:1].upper()
                       + help[1:] + "."), formatter_class=_HelpFormatter, **kw)
    s.set_defaults(outputs=tuple(outputs))
    return s


def _column_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("metadata column names (defaults: morphoprof's)")
    for field, default in (("plate", "Metadata_plate"), ("well", "Metadata_well"),
                           ("compound", "Metadata_compound"),
                           ("concentration", "Metadata_concentration"),
                           ("moa", "Metadata_moa"), ("batch", "Metadata_batch"),
                           ("control", "Metadata_control")):
        g.add_argument(f"--{field}-col", default=default, metavar="COLUMN",
                       help=f"column holding the {field}")
    g.add_argument("--control-value", action="append", metavar="VALUE",
                   help="compound value marking controls when there is no control column "
                   "(default: DMSO; repeatable)")


def _on_error(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="an unreadable image set or one with NaN/inf pixels: stop (fail), or "
                   f"{what} and list it with its reason (skip)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="morphoprof",
        description="Deep-learning morphological profiling of high-content screens.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"morphoprof {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _parser(sub, "demo", "run the whole pipeline on the built-in synthetic screen",
                outputs=[("out", True)])
    s.add_argument("--out", default="demo_out", help="output folder")
    s.set_defaults(func=cmd_demo)

    s = _parser(sub, "run", "run the pipeline described by a YAML config (keys: the README's "
                "'YAML config reference')")
    s.add_argument("config", help="the run configuration (YAML)")
    s.set_defaults(func=cmd_run)

    s = _parser(sub, "train", "train a network: finetune (Kensert 2019) or mil (Kraus 2016) "
                "on whole images with group-held-out cross-validation, or weak (Caicedo 2018) "
                "on single cells, then embeddings")
    s.add_argument("kind", choices=["finetune", "mil", "weak"],
                   help="finetune / mil: whole images, cross-validated; weak: single cells on "
                   "treatment labels, then embeddings")
    s.add_argument("config", help="training YAML; its keys are described in the README "
                   "sections 'Training whole-image classifiers' (finetune, mil) and 'Weakly "
                   "supervised single-cell embeddings' (weak)")
    s.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = _parser(sub, "synth", "generate a synthetic screen with ground truth",
                outputs=[("out", True)])
    s.add_argument("--out", required=True, help="folder for the screen")
    s.add_argument("--moas", type=int, default=4, help="mechanisms of action")
    s.add_argument("--compounds-per-moa", type=int, default=3, help="compounds per MoA")
    s.add_argument("--batches", type=int, default=3, help="batches (weeks)")
    s.add_argument("--plates-per-batch", type=int, default=3, help="plates per batch")
    s.add_argument("--sites", type=int, default=2, help="fields of view per well")
    s.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help="field size, px")
    s.add_argument("--cells", type=float, default=24.0, help="mean cells per field")
    s.add_argument("--cell-scale", type=float, default=1.0, help="cell size multiplier")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--overwrite", action="store_true", help="replace an existing screen")
    s.set_defaults(func=cmd_synth)

    s = _parser(sub, "download", "download a public dataset (resumable, verified)",
                outputs=[("dest", True)])
    s.add_argument("dataset", choices=["bbbc021"], help="the dataset")
    s.add_argument("--dest", required=True, help="folder to download into")
    s.add_argument("--plates", nargs="*", help="plate names, space or comma separated "
                   "(default: all 55)")
    s.add_argument("--checksums", help="file of expected checksums (JSON or md5sum format)")
    s.add_argument("--keep-zips", action="store_true", help="keep the plate zips after "
                   "unpacking")
    s.add_argument("--base-url", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_download)

    s = _parser(sub, "import", "build an experiment index (index.parquet)",
                outputs=[("out", lambda a: a.layout == "cellprofiler")])  # it writes a folder
    s.add_argument("layout", choices=[*IMPORTERS, *IMPORTER_ALIASES],
                   metavar="{" + ",".join(IMPORTERS) + "}",
                   help="bbbc021: the official layout; bbbc021-6moa: the 6-MoA PNG subset; "
                   "csv: any CSV with a column mapping; loaddata: a CellProfiler LoadData / JUMP "
                   "load_data.csv; ome-zarr: an OME-Zarr HCS plate; cellprofiler: CellProfiler "
                   "single-cell "
                   "measurements (a folder of per-object CSVs, or an ExportToDatabase / "
                   "cytominer-database SQLite) -> OUT/cells.parquet")
    s.add_argument("path", help="BBBC021 root, 6-MoA folder, CSV file, LoadData CSV, OME-Zarr "
                   "plate, or CellProfiler output")
    s.add_argument("--out", required=True, help="index.parquet to write (cellprofiler: a folder)")
    s.add_argument("--plate", help="cellprofiler: Metadata_plate where the source has no plate "
                   "metadata (default: its name)")
    s.add_argument("--platemap", help="cellprofiler / ome-zarr: CSV, one row per well, joined as "
                   "Metadata_<column> (e.g. compound, concentration, moa)")
    s.add_argument("--platemap-well", default="well", help="cellprofiler / ome-zarr: the plate "
                   "map's well column")
    s.add_argument("--metadata", action="append", help="loaddata: a CSV joined onto the image "
                   "list by the Metadata_ columns both have (JUMP well.csv, plate.csv; repeatable)")
    s.add_argument("--mirror", help="loaddata: local copy of the images behind s3:// or https:// "
                   "URL_ columns (the URL's bucket/path under it)")
    s.add_argument("--illum", help="loaddata: folder of CellProfiler <plate>_Illum<Ch>.npy "
                   "(in it or in <plate>/), where the CSV has no FileName_Illum columns")
    s.add_argument("--illum-out", help="loaddata: where the plates' illumination functions are "
                   "stored for --illumination (default: 'illumination' beside --out)")
    s.add_argument("--channels", nargs="*", help="loaddata / ome-zarr: keep these channels, in "
                   "this order (default: all)")
    s.add_argument("--overwrite", action="store_true", help="cellprofiler: replace an earlier "
                   "import in --out")
    s.add_argument("--chunk-size", type=int, default=5000, help="cellprofiler: rows per "
                   "CytoTable chunk; memory grows with it, time falls (2.2 GB SQLite: 0.74 GB "
                   "peak and 227 s at 5000, 0.93 GB and 149 s at 10000)")
    s.add_argument("--image-csv", help="bbbc021: BBBC021_v1_image.csv[.gz] (default: found "
                   "under PATH or PATH/metadata)")
    s.add_argument("--moa-csv", help="bbbc021: BBBC021_v1_moa.csv (default: found likewise)")
    s.add_argument("--plates", nargs="*", help="bbbc021: keep only these plates (space or comma "
                   "separated), e.g. the ones a 'download --plates' fetched")
    s.add_argument("--only-present", action="store_true", help="bbbc021 / csv / loaddata / "
                   "ome-zarr: keep the image sets whose files are all present and list the "
                   "others, instead of refusing")
    s.add_argument("--preset", help="csv: a column preset (deepprofiler, cytomining)")
    s.add_argument("--field", action="append", help="csv: FIELD=COLUMN, e.g. plate=Plate "
                   "(repeatable)")
    s.add_argument("--channel", action="append", help="csv: CHANNEL=COLUMN, e.g. DNA=FileDNA "
                   "(repeatable)")
    s.add_argument("--root", help="csv / loaddata: folder that relative paths start from "
                   "(default: the CSV's folder)")
    s.add_argument("--sep", default=",", help="csv: field separator")
    s.add_argument("--check-shapes", action="store_true", help="read every image header")
    s.set_defaults(func=cmd_import)

    s = _parser(sub, "validate", "check an experiment index and its files")
    s.add_argument("index", help="index.parquet")
    s.add_argument("--channels", nargs="*", help="channels the next stage needs (default: all)")
    s.add_argument("--no-shapes", action="store_true", help="do not read image headers")
    s.add_argument("--deep", action="store_true", help="read every image as extract will and "
                   "report truncated, unreadable and NaN/inf files with their rows")
    s.set_defaults(func=cmd_validate)

    s = _parser(sub, "illum", "per-plate illumination functions (Singh 2014)",
                outputs=[("out", True)])
    s.add_argument("index", help="index.parquet")
    s.add_argument("--out", required=True, help="folder for <plate>.npy functions")
    s.add_argument("--channels", nargs="*", help="channels (default: all)")
    add_options(s, IlluminationConfig, flags={"n_jobs": "--jobs"})
    _on_error(s, "leave it out of its plate's mean")
    s.set_defaults(func=cmd_illum)

    s = _parser(sub, "segment", "segment nuclei into a cell table (Parquet)",
                outputs=[("out", False), ("deepprofiler_locations", True)])
    s.add_argument("index", help="index.parquet")
    s.add_argument("--out", required=True, help="cells.parquet to write")
    s.add_argument("--illumination", help="folder of illumination functions (morphoprof illum)")
    add_options(s, NucleiSection, flags={"n_jobs": "--jobs"})
    _on_error(s, "leave it out")
    s.add_argument("--deepprofiler-locations", help="also write DeepProfiler location CSVs here")
    s.add_argument("--overlays", type=int, default=0, metavar="N",
                   help="also write N PNGs (image sets spread over the index) with the nucleus "
                   "outlines, to OUT's name + _overlays/, for a person to check")
    s.set_defaults(func=cmd_segment)

    s = _parser(sub, "crops", "export single-cell crops to compressed shards",
                outputs=[("out", True)])
    s.add_argument("index", help="index.parquet")
    s.add_argument("cells", help="cells.parquet from morphoprof segment")
    s.add_argument("--out", required=True, help="crop folder")
    s.add_argument("--size", type=int, default=96, help="crop side, px")
    s.add_argument("--edge", default="pad", choices=["pad", "skip"],
                   help="cells near the border: zero-pad the crop, or leave the cell out")
    s.add_argument("--normalization", default="none", choices=["none", "max", "percentile"],
                   help="per-crop intensity normalisation")
    s.add_argument("--illumination", help="folder of illumination functions (morphoprof illum)")
    s.set_defaults(func=cmd_crops)

    s = _parser(sub, "extract", "extract features (resumable)", outputs=[("out", True)])
    s.add_argument("index", nargs="?", help="index.parquet (none with --crops)")
    s.add_argument("--out", required=True, help="feature folder")
    s.add_argument("--extractor", default=FeaturesSection.model_fields["extractor"].default,
                   choices=extractor_names(),
                   help="transfer: ImageNet CNN on whole fields; classical: cp_measure per cell")
    add_options(s, TransferConfig, EXTRACT_OPTIONS)
    # defaults that depend on the input, so not the TransferConfig's own
    s.add_argument("--batch-size", type=int, help="images per network batch (default: 16 "
                   "fields, 256 cell crops)")
    s.add_argument("--workers", type=int, default=0, help="DataLoader worker processes "
                   "(classical: processes)")
    s.add_argument("--format", default="parquet", choices=["parquet", "h5ad", "zarr"],
                   help="h5ad / zarr: also write the features as one AnnData, OUT/features.h5ad "
                   "or .zarr (features in X, metadata in obs; read whole) for scanpy")
    s.add_argument("--channels", nargs="*", help="channels (default: all)")
    s.add_argument("--illumination", help="folder of illumination functions (morphoprof illum)")
    s.add_argument("--cells", help="cell table (morphoprof segment): features of single-cell "
                   "crops, one row per cell, instead of whole fields")
    s.add_argument("--crops", help="crops you already have: a crop folder (morphoprof crops) or "
                   "an .npz holding 'crops' (N, H, W, C) or (N, C, H, W) with --crop-table; "
                   "one feature row per crop")
    s.add_argument("--crop-table", help="--crops .npz: its table (CSV / Parquet, one row per "
                   "crop, plate and well columns; a 'crop' column gives the row in the array)")
    s.add_argument("--control-value", action="append", metavar="VALUE",
                   help="--crops: compound value of control cells (default: DMSO)")
    s.add_argument("--crop-size", type=int, help="--cells: crop side, px (default 96, or the "
                   "checkpoint's)")
    s.add_argument("--normalization", choices=["none", "max", "percentile"],
                   help="--cells, --crops: per-crop normalisation (default max, or the "
                   "checkpoint's)")
    _on_error(s, "leave it out")
    s.add_argument("--scheduler", help="run on Dask distributed: local:N (a LocalCluster of N "
                   "worker processes) or tcp://HOST:PORT (a running cluster); one task per "
                   "shard")
    s.add_argument("--checkpoint", help="a model trained by 'morphoprof train weak': its CNN, "
                   "channels, crop settings and embedding layer (--layer overrides)")
    s.add_argument("--overwrite", action="store_true", help="replace features made with other "
                   "parameters")
    s.set_defaults(func=cmd_extract)

    s = _parser(sub, "aggregate", "features -> normalised well and treatment profiles",
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
    _column_args(s)
    s.set_defaults(func=cmd_aggregate)

    s = _parser(sub, "normalize", "normalise profiles against controls (or apply a saved "
                "normaliser)", outputs=[("out", False), ("save", False)])
    s.add_argument("profiles", help="profiles Parquet (wells, sites or cells)")
    s.add_argument("--out", required=True, help="normalised profiles Parquet")
    # this command's own default method (robust, as pycytominer's normalize), and no selection
    s.add_argument("--method", default="robust", choices=[*METHODS, *METHOD_ALIASES],
                   help="normalisation, fitted on the reference rows")
    add_options(s, NormalizationConfig, ("by", "reference", "eps", "n_factors", "fallback"),
                flags={"n_factors": "--factors"})
    s.add_argument("--select", nargs="*", default=[], choices=list(OPERATIONS),
                   help="feature selection before fitting (default: none)")
    add_options(s, ProfilesConfig, ("blocklist",))
    s.add_argument("--save", help="save the fitted normaliser here (.npz)")
    s.add_argument("--apply", help="apply a saved normaliser instead of fitting one")
    _column_args(s)
    s.set_defaults(func=cmd_normalize)

    s = _parser(sub, "evaluate", "NSC / NSCB, k-NN, mAP, conformal MoA sets",
                outputs=[("out", False)])
    s.add_argument("profiles", help="wells.parquet or treatments.parquet")
    s.add_argument("--out", required=True, help="evaluation.json")
    add_options(s, EvaluationConfig, ("k", "alpha", "null_size"))
    add_options(s, ProfilesConfig, ("treatment_aggregation",))
    s.add_argument("--group", nargs="*", default=[],
                   help="metadata columns for nearest-neighbour group accuracy")
    _column_args(s)
    s.set_defaults(func=cmd_evaluate)

    s = _parser(sub, "report", "write a self-contained HTML report", outputs=[("out", False)])
    s.add_argument("--profiles", required=True, help="wells.parquet (for QC) or "
                   "treatments.parquet")
    s.add_argument("--evaluation", required=True, help="evaluation.json")
    s.add_argument("--out", required=True, help="report.html")
    s.add_argument("--wells", help="well profiles for the QC heatmaps (Metadata_count), when "
                   "--profiles holds treatments")
    s.add_argument("--index", help="the experiment index: dataset summary and example fields "
                   "per MoA")
    s.add_argument("--config", help="the run's configuration file, shown in the report")
    _column_args(s)
    s.set_defaults(func=cmd_report)
    return p


def _check_outputs(a: argparse.Namespace) -> None:
    """Before any work: every output path the command was given can be written (a parent that
    is a file, a read-only folder... is one ``cannot write`` error, not a failure after hours)."""
    from morphoprof.io_utils import check_writable

    for attr, folder in getattr(a, "outputs", ()):
        value = getattr(a, attr, None)
        if callable(folder):
            folder = folder(a)
        if value:
            check_writable(value, folder=folder)


def _close_progress_bars() -> None:
    """End any progress bar a failed stage left open, so that the error is on its own line."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # a path that is not UTF-8 (a folder named in Latin-1) is printed escaped, not a crash
        if hasattr(stream, "reconfigure") and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        _check_outputs(args)
        return args.func(args)
    except MorphoprofError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an OS error no stage turned into a named one: still one line
        _close_progress_bars()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{os_reason(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
