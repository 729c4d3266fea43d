"""Image stages: ``illum``, ``segment``, ``crops`` and ``extract``."""

from __future__ import annotations

import argparse
from pathlib import Path

from morphoprof.cli.common import (
    add_command,
    add_on_error,
    load_illumination,
    print_json,
)
from morphoprof.config import FeaturesSection, NucleiSection
from morphoprof.errors import MorphoprofError
from morphoprof.extract import CROP_BATCH_SIZE, extract_stage
from morphoprof.features.transfer import TransferConfig
from morphoprof.index import ExperimentIndex
from morphoprof.io_utils import read_input_parquet
from morphoprof.pipeline import illumination_stage, segmentation_stage
from morphoprof.preprocess.crops import CELL_TABLE_COLUMNS, CropConfig, export_crops
from morphoprof.preprocess.illumination import IlluminationConfig
from morphoprof.registry import extractor_names
from morphoprof.settings import add_options, from_options

# the TransferConfig settings that are options of extract, with the model's defaults
EXTRACT_OPTIONS = ("model", "weights", "channel_strategy", "tiles", "layer", "image_size",
                   "device", "precision", "backend", "max_shard_rows", "min_shard_rows")


def cmd_illum(a: argparse.Namespace) -> int:
    settings = from_options(IlluminationConfig, a)
    index = ExperimentIndex.read_parquet(a.index)
    corr = illumination_stage(index, a.out, settings, channels=a.channels, on_error=a.on_error)
    print(f"illumination functions of {index.table['Metadata_plate'].nunique()} plate(s) "
          f"-> {a.out}" + (f"; {len(corr.skipped)} image set(s) skipped (listed in "
                           f"{Path(a.out) / 'illumination_skipped.json'})"
                           if corr.skipped else ""))
    return 0


def cmd_segment(a: argparse.Namespace) -> int:
    settings = from_options(NucleiSection, a)
    index = ExperimentIndex.read_parquet(a.index)
    summary = segmentation_stage(index, a.out, settings.nuclei(), settings.channel,
                                 illumination=load_illumination(a.illumination),
                                 on_error=a.on_error, n_jobs=settings.n_jobs, overlays=a.overlays,
                                 deepprofiler_locations=a.deepprofiler_locations)
    print(f"{summary.summary_line()} -> {a.out}")
    return 0


def cmd_crops(a: argparse.Namespace) -> int:
    index = ExperimentIndex.read_parquet(a.index)
    cells = read_input_parquet(a.cells, "cell table", require=CELL_TABLE_COLUMNS)
    summary = export_crops(index, cells, a.out, from_options(CropConfig, a),
                           illumination=load_illumination(a.illumination), overwrite=a.overwrite)
    print_json(summary.to_json())
    return 0


def cmd_extract(a: argparse.Namespace) -> int:
    if a.crops and (a.index or a.cells):
        raise MorphoprofError("--crops takes the crops themselves: give no index and no --cells")
    if not a.crops and not a.index:
        raise MorphoprofError("extract needs an index.parquet, or --crops")
    settings = {**{k: getattr(a, k) for k in EXTRACT_OPTIONS}, "batch_size": a.batch_size,
                "num_workers": a.workers, "n_jobs": a.workers or 1, "channels": a.channels,
                "on_error": a.on_error}
    print_json(extract_stage(
        a.out, index=ExperimentIndex.read_parquet(a.index) if a.index else None,
        cells=a.cells, crops=a.crops, crop_table=a.crop_table, extractor=a.extractor,
        settings=settings, checkpoint=a.checkpoint, crop_size=a.crop_size,
        normalization=a.normalization, controls=a.control_value or ["DMSO"],
        illumination=load_illumination(a.illumination), scheduler=a.scheduler,
        overwrite=a.overwrite, fmt=a.format).to_json())
    return 0


def _add_illum(sub) -> None:
    s = add_command(sub, "illum", "per-plate illumination functions (Singh 2014)",
                    outputs=[("out", True)])
    s.add_argument("index", help="index.parquet")
    s.add_argument("--out", required=True, help="folder for <plate>.npy functions")
    s.add_argument("--channels", nargs="*", help="channels (default: all)")
    add_options(s, IlluminationConfig, flags={"n_jobs": "--jobs"})
    add_on_error(s, "leave it out of its plate's mean")
    s.set_defaults(func=cmd_illum)


def _add_segment(sub) -> None:
    s = add_command(sub, "segment", "segment nuclei into a cell table (Parquet)",
                    outputs=[("out", False), ("deepprofiler_locations", True)])
    s.add_argument("index", help="index.parquet")
    s.add_argument("--out", required=True, help="cells.parquet to write")
    s.add_argument("--illumination", help="folder of illumination functions (morphoprof illum)")
    add_options(s, NucleiSection, flags={"n_jobs": "--jobs"})
    add_on_error(s, "leave it out")
    s.add_argument("--deepprofiler-locations", help="also write DeepProfiler location CSVs here")
    s.add_argument("--overlays", type=int, default=0, metavar="N",
                   help="also write N PNGs (image sets spread over the index) with the nucleus "
                   "outlines, to OUT's name + _overlays/, for a person to check")
    s.set_defaults(func=cmd_segment)


def _add_crops(sub) -> None:
    s = add_command(sub, "crops", "export single-cell crops to compressed shards",
                    outputs=[("out", True)])
    s.add_argument("index", help="index.parquet")
    s.add_argument("cells", help="cells.parquet from morphoprof segment")
    s.add_argument("--out", required=True, help="crop folder")
    add_options(s, CropConfig)
    s.add_argument("--illumination", help="folder of illumination functions (morphoprof illum)")
    s.add_argument("--overwrite", action="store_true", help="replace crops made with other "
                   "settings, index or cells (a folder of such crops is refused otherwise)")
    s.set_defaults(func=cmd_crops)


def _add_extract(sub) -> None:
    s = add_command(sub, "extract", "extract features (resumable)", outputs=[("out", True)])
    s.add_argument("index", nargs="?", help="index.parquet (none with --crops)")
    s.add_argument("--out", required=True, help="feature folder")
    s.add_argument("--extractor", default=FeaturesSection.model_fields["extractor"].default,
                   choices=extractor_names(),
                   help="transfer: ImageNet CNN on whole fields; classical: cp_measure per cell")
    add_options(s, TransferConfig, EXTRACT_OPTIONS)
    # defaults that depend on the input, so not the TransferConfig's own
    s.add_argument("--batch-size", type=int, help="images per network batch (default: "
                   f"{TransferConfig.model_fields['batch_size'].default} fields, "
                   f"{CROP_BATCH_SIZE} cells and crops)")
    s.add_argument("--workers", type=int,
                   default=TransferConfig.model_fields["num_workers"].default,
                   help="DataLoader worker processes (classical: processes)")
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
    add_on_error(s, "leave it out")
    s.add_argument("--scheduler", help="run on Dask distributed: local:N (a LocalCluster of N "
                   "worker processes) or tcp://HOST:PORT (a running cluster); one task per "
                   "shard")
    s.add_argument("--checkpoint", help="a model trained by 'morphoprof train weak': its CNN, "
                   "channels, crop settings and embedding layer (--layer overrides)")
    s.add_argument("--overwrite", action="store_true", help="replace features made with other "
                   "parameters")
    s.set_defaults(func=cmd_extract)


# this module's commands, in the order the help lists them
COMMANDS = (_add_illum, _add_segment, _add_crops, _add_extract)
