"""Screens in: ``synth``, ``download``, ``import`` and ``validate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from morphoprof.cli.common import (
    add_command,
)
from morphoprof.datasets.download import BBBC021_BASE_URL, download_bbbc021, load_checksums
from morphoprof.datasets.source import SOURCE_ALIASES, SOURCES, DataSection, build_index_from_config
from morphoprof.datasets.synthetic import SynthConfig, generate_screen
from morphoprof.errors import MorphoprofError
from morphoprof.features.cellprofiler import CHUNK_SIZE, import_cellprofiler
from morphoprof.index import ExperimentIndex
from morphoprof.index.loaddata import illumination_files
from morphoprof.preprocess.illumination import import_illumination
from morphoprof.settings import add_options, from_options

# every screen source a config's data section takes, but the ones that do not import (a
# generated screen, an index), and CellProfiler's single-cell measurements
IMPORTERS = (*(s for s in SOURCES if s not in ("synthetic", "index")), "cellprofiler")


def cmd_synth(a: argparse.Namespace) -> int:
    cfg = from_options(SynthConfig, a, height=a.size[0], width=a.size[1])
    generate_screen(a.out, cfg, overwrite=a.overwrite)
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    checksums = load_checksums(a.checksums) if a.checksums else None
    plates = [p for item in a.plates or [] for p in item.split(",") if p] or None
    summary = download_bbbc021(a.dest, plates=plates, base_url=a.base_url or BBBC021_BASE_URL,
                               checksums=checksums, keep_zips=a.keep_zips)
    print(summary.summary_line())
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    layout = SOURCE_ALIASES.get(a.layout, a.layout)
    if layout == "cellprofiler":  # single-cell measurements, not an index
        summary = import_cellprofiler(a.path, a.out, plate=a.plate, platemap=a.platemap,
                                      platemap_well=a.platemap_well, overwrite=a.overwrite,
                                      chunk_size=a.chunk_size)
        print(summary.summary_line())
        return 0
    if a.plates and layout != "bbbc021":
        raise MorphoprofError("--plates applies to 'import bbbc021' only")
    if layout == "csv" and not (a.channel and (a.field or a.preset)):
        raise MorphoprofError("import csv needs --channel CHANNEL=COLUMN and --field "
                              "FIELD=COLUMN (each repeatable) or --preset NAME")
    data = DataSection(
        source=layout, path=a.path, image_csv=a.image_csv, moa_csv=a.moa_csv, plates=a.plates,
        only_present=a.only_present, check_shapes=a.check_shapes,
        columns=a.preset or _pairs(a.field, "--field") or None,
        channel_columns=_pairs(a.channel, "--channel") or None, sep=a.sep, root=a.root,
        mirror=a.mirror, metadata=a.metadata or [], channels=a.channels,
        platemap=a.platemap, platemap_well=a.platemap_well)
    index = build_index_from_config(data, Path(a.out).parent)
    index.write(a.out)
    what = "fields" if layout == "ome-zarr" else "image sets"
    print(f"{len(index)} {what}, channels {index.channels} -> {a.out}")
    if layout == "loaddata":
        _import_loaddata_illumination(a, index)
    return 0


def _import_loaddata_illumination(a: argparse.Namespace, index: ExperimentIndex) -> None:
    """The plates' CellProfiler illumination functions named by a LoadData CSV (or found
    under ``--illum``), stored for ``--illumination``."""
    files = illumination_files(a.path, index.channels, illum_dir=a.illum, root=a.root,
                               mirror=a.mirror)
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
    index = ExperimentIndex.read_parquet(a.index)
    index.validate(channels=a.channels, check_shapes=not a.no_shapes,
                   deep=a.deep)
    what = "every image read" if a.deep else "files present" + (
        "" if a.no_shapes else ", headers read")
    print(f"{a.index}: {len(index)} image sets, channels {index.channels}: OK ({what})")
    return 0


def _add_synth(sub) -> None:
    s = add_command(sub, "synth", "generate a synthetic screen with ground truth",
                    outputs=[("out", True)])
    s.add_argument("--out", required=True, help="folder for the screen")
    add_options(s, SynthConfig, ("n_moas", "compounds_per_moa", "n_batches", "plates_per_batch",
                                 "sites_per_well", "cells_per_field", "cell_scale", "seed"),
                flags={"n_moas": "--moas", "n_batches": "--batches",
                       "sites_per_well": "--sites", "cells_per_field": "--cells"})
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=[
        SynthConfig.model_fields["height"].default, SynthConfig.model_fields["width"].default],
                   help="field size, px")
    s.add_argument("--overwrite", action="store_true", help="replace an existing screen")
    s.set_defaults(func=cmd_synth)


def _add_download(sub) -> None:
    s = add_command(sub, "download", "download a public dataset (resumable, verified)",
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


def _add_import(sub) -> None:
    s = add_command(sub, "import", "build an experiment index (index.parquet)",
                    outputs=[("out", lambda a: a.layout == "cellprofiler")])  # it writes a folder
    s.add_argument("layout", choices=[*IMPORTERS, *SOURCE_ALIASES],
                   metavar="{" + ",".join(IMPORTERS) + "}",
                   help="bbbc021: the official layout; bbbc021-6moa: the 6-MoA PNG subset; "
                   "csv: any CSV with a column mapping; loaddata: a CellProfiler LoadData / JUMP "
                   "load_data.csv; ome-zarr: an OME-Zarr HCS plate; cellprofiler: CellProfiler "
                   "single-cell measurements (a folder of per-object CSVs or of batch "
                   "folders of them, or an ExportToDatabase / cytominer-database SQLite; "
                   "MyExpt_ name prefixes allowed) -> OUT/cells.parquet; an interrupted "
                   "import resumes when run again")
    s.add_argument("path", help="BBBC021 root, 6-MoA folder, CSV file, LoadData CSV, OME-Zarr "
                   "plate, or CellProfiler output")
    s.add_argument("--out", required=True, help="index.parquet to write (cellprofiler: a folder)")
    s.add_argument("--plate", help="cellprofiler: Metadata_plate where the source has no plate "
                   "metadata (default: its name)")
    s.add_argument("--platemap", help="cellprofiler / ome-zarr: CSV, one row per well, joined as "
                   "Metadata_<column> (e.g. compound, concentration, moa)")
    s.add_argument("--platemap-well", default=DataSection.model_fields["platemap_well"].default,
                   help="cellprofiler / ome-zarr: the plate map's well column")
    s.add_argument("--metadata", action="append", help="loaddata: a CSV joined onto the image "
                   "list by the Metadata_ columns both have (JUMP well.csv, plate.csv; repeatable)")
    s.add_argument("--illum", help="loaddata: folder of CellProfiler <plate>_Illum<Ch>.npy "
                   "(in it or in <plate>/), where the CSV has no FileName_Illum columns")
    s.add_argument("--illum-out", help="loaddata: where the plates' illumination functions are "
                   "stored for --illumination (default: 'illumination' beside --out)")
    s.add_argument("--overwrite", action="store_true", help="cellprofiler: replace an earlier "
                   "import in --out")
    s.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="cellprofiler: rows per "
                   "CytoTable chunk; memory grows with it, time falls a little (2.2 GB SQLite: "
                   "0.88 GB peak and 98 s at 5000, 0.94 GB and 82 s at 10000)")
    s.add_argument("--preset", help="csv: a column preset (deepprofiler, cytomining)")
    s.add_argument("--field", action="append", help="csv: FIELD=COLUMN, e.g. plate=Plate "
                   "(repeatable)")
    s.add_argument("--channel", action="append", help="csv: CHANNEL=COLUMN, e.g. DNA=FileDNA "
                   "(repeatable)")
    # the data section's own settings, as run and the trainers read them
    add_options(s, DataSection, ("image_csv", "moa_csv", "plates", "only_present",
                                 "check_shapes", "sep", "root", "mirror", "channels"))
    s.set_defaults(func=cmd_import)


def _add_validate(sub) -> None:
    s = add_command(sub, "validate", "check an experiment index and its files")
    s.add_argument("index", help="index.parquet")
    s.add_argument("--channels", nargs="*", help="channels the next stage needs (default: all)")
    s.add_argument("--no-shapes", action="store_true", help="do not read image headers")
    s.add_argument("--deep", action="store_true", help="read every image as extract will and "
                   "report truncated, unreadable and NaN/inf files with their rows")
    s.set_defaults(func=cmd_validate)


# this module's commands, in the order the help lists them
COMMANDS = (_add_synth, _add_download, _add_import, _add_validate)
