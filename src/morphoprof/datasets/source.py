"""The experiment index a config's ``data`` section describes: a synthetic screen generated
on the spot, or a screen imported from its own layout (BBBC021, the 6-MoA fields, a CSV, a
CellProfiler LoadData CSV, an OME-Zarr plate) or from an index Parquet file. One importer per
source in :data:`SOURCES`, shared by ``morphoprof run``, every trainer and ``morphoprof
import``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from morphoprof.datasets.synthetic import SynthConfig, generate_screen
from morphoprof.index import import_bbbc021, import_csv, import_fields_6moa
from morphoprof.index.loaddata import import_loaddata
from morphoprof.index.ome_zarr import import_ome_zarr
from morphoprof.index.schema import DEFAULT_CONTROLS, ExperimentIndex
from morphoprof.settings import Settings

logger = logging.getLogger(__name__)

# one spelling printed, both accepted
SOURCE_ALIASES = {"bbbc021_6moa": "bbbc021-6moa", "ome_zarr": "ome-zarr"}


# the screen sources, each with its importer in SOURCES
SourceName = Literal["synthetic", "bbbc021", "bbbc021-6moa", "csv", "loaddata", "ome-zarr",
                     "index"]


class DataSection(Settings):
    """``data``: where a run's (or a trainer's) screen comes from."""

    source: SourceName = Field(
        description="synthetic | bbbc021 | bbbc021-6moa (or bbbc021_6moa) | csv | loaddata | "
                    "ome-zarr (or ome_zarr) | index")
    path: str | None = Field(None, description="synthetic: where to generate (reused if "
                             "present); bbbc021: root; bbbc021-6moa: folder; csv: the CSV; "
                             "loaddata: the LoadData CSV; ome-zarr: the plate; index: "
                             "index.parquet")
    image_csv: str | None = Field(None, description="bbbc021: BBBC021_v1_image.csv[.gz] "
                                  "(default: found under path)")
    moa_csv: str | None = Field(None, description="bbbc021: BBBC021_v1_moa.csv (default: found "
                                "under path)")
    plates: list[str] | None = Field(None, description="bbbc021: the plates to keep (default: "
                                     "all)")
    only_present: bool = Field(False, description="keep only image sets whose files all exist; "
                               "list the others")
    check_shapes: bool = Field(False, description="bbbc021 / csv / loaddata: read every "
                               "image header")
    columns: dict[str, str] | str | None = Field(None, description="csv: {plate: .., well: .., "
                                                 "...} or a preset name")
    channel_columns: dict[str, str] | None = Field(None, description="csv: {DNA: column "
                                                   "holding the DNA file path, ...}")
    sep: str = Field(",", description="csv: field separator")
    root: str | None = Field(None, description="csv / loaddata: folder that relative paths "
                             "start from (default: the CSV's folder)")
    mirror: str | None = Field(None, description="loaddata: local copy of the images behind "
                               "s3:// or https:// URL_ columns")
    metadata: list[str] = Field([], description="loaddata: CSVs joined onto the image list by "
                                "the Metadata_ columns both have (JUMP well.csv, plate.csv)")
    channels: list[str] | None = Field(None, description="loaddata / ome-zarr: keep these "
                                       "channels, in this order (default: all)")
    platemap: str | None = Field(None, description="ome-zarr: CSV, one row per well, joined "
                                 "as Metadata_<column>")
    platemap_well: str = Field("well", description="ome-zarr: the plate map's well column")
    controls: list[str] = Field(list(DEFAULT_CONTROLS), description="compounds that mark "
                                "control wells")
    synthetic: SynthConfig | None = Field(None, description="synthetic: the screen's "
                                          "SynthConfig (default: SynthConfig())")

    @field_validator("source", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        return SOURCE_ALIASES.get(value, value) if isinstance(value, str) else value

    def check(self) -> list[tuple[str, str]]:
        """A source's own requirements: a path (all but synthetic), the csv mappings."""
        out = []
        if self.source != "synthetic" and not self.path:
            out.append(("path", f"required for source {self.source!r}"))
        if self.source == "csv":
            if not self.columns:
                out.append(("columns", "required for source 'csv' (a mapping or a preset "
                                       "name)"))
            if not self.channel_columns:
                out.append(("channel_columns", "required for source 'csv'"))
        return out


def _synthetic(data: DataSection, out: Path) -> ExperimentIndex:
    screen = Path(data.path) if data.path else out / "synthetic_screen"
    return generate_screen(screen, data.synthetic or SynthConfig())


def _bbbc021(data: DataSection, out: Path) -> ExperimentIndex:
    return import_bbbc021(data.path, data.image_csv, data.moa_csv, check_shapes=data.check_shapes,
                          plates=data.plates, only_present=data.only_present)


def _fields_6moa(data: DataSection, out: Path) -> ExperimentIndex:
    return import_fields_6moa(data.path, only_present=data.only_present)


def _csv(data: DataSection, out: Path) -> ExperimentIndex:
    return import_csv(data.path, data.channel_columns, data.columns, root=data.root,
                      sep=data.sep, controls=data.controls, check_shapes=data.check_shapes,
                      only_present=data.only_present)


def _loaddata(data: DataSection, out: Path) -> ExperimentIndex:
    return import_loaddata(data.path, root=data.root, mirror=data.mirror,
                           metadata=data.metadata, channels=data.channels,
                           controls=data.controls, check_shapes=data.check_shapes,
                           only_present=data.only_present)


def _ome_zarr(data: DataSection, out: Path) -> ExperimentIndex:
    return import_ome_zarr(data.path, platemap=data.platemap, platemap_well=data.platemap_well,
                           channels=data.channels, controls=data.controls,
                           only_present=data.only_present)


def _index(data: DataSection, out: Path) -> ExperimentIndex:
    index = ExperimentIndex.read_parquet(data.path)
    index.validate(check_shapes=data.check_shapes)
    return index


# source -> (data section, the run's folder) -> its experiment index
SOURCES: dict[str, Callable[[DataSection, Path], ExperimentIndex]] = {
    "synthetic": _synthetic, "bbbc021": _bbbc021, "bbbc021-6moa": _fields_6moa, "csv": _csv,
    "loaddata": _loaddata, "ome-zarr": _ome_zarr, "index": _index}


def build_index_from_config(data: DataSection, out: Path) -> ExperimentIndex:
    """Create (or import) the experiment index described by a config's ``data`` section (the
    importer :data:`SOURCES` holds for its ``source``); a synthetic screen without a ``path``
    is written under ``out``."""
    return SOURCES[data.source](data, Path(out))
