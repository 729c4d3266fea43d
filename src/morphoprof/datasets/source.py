"""The experiment index a config's ``data`` section describes: a synthetic screen generated
on the spot, or a screen imported from its own layout (BBBC021, the 6-MoA fields, a CSV) or
from an index Parquet file. Shared by ``morphoprof run`` and every trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from morphoprof.datasets.synthetic import SynthConfig, generate_screen
from morphoprof.index import import_bbbc021, import_csv, import_fields_6moa
from morphoprof.index.schema import ExperimentIndex
from morphoprof.settings import Settings

logger = logging.getLogger(__name__)

SOURCE_ALIASES = {"bbbc021_6moa": "bbbc021-6moa"}  # one spelling printed, both accepted


class DataSection(Settings):
    """``data``: where a run's (or a trainer's) screen comes from."""

    source: Literal["synthetic", "bbbc021", "bbbc021-6moa", "csv", "index"] = Field(
        description="synthetic | bbbc021 | bbbc021-6moa (or bbbc021_6moa) | csv | index")
    path: str | None = Field(None, description="synthetic: where to generate (reused if "
                             "present); bbbc021: root; bbbc021-6moa: folder; csv: the CSV; "
                             "index: index.parquet")
    image_csv: str | None = Field(None, description="bbbc021: BBBC021_v1_image.csv[.gz] "
                                  "(default: found under path)")
    moa_csv: str | None = Field(None, description="bbbc021: BBBC021_v1_moa.csv (default: found "
                                "under path)")
    plates: list[str] | None = Field(None, description="bbbc021: the plates to keep (default: "
                                     "all)")
    only_present: bool = Field(False, description="keep only image sets whose files all exist; "
                               "list the others")
    columns: dict[str, str] | str | None = Field(None, description="csv: {plate: .., well: .., "
                                                 "...} or a preset name")
    channel_columns: dict[str, str] | None = Field(None, description="csv: {DNA: column "
                                                   "holding the DNA file path, ...}")
    sep: str = Field(",", description="csv: field separator")
    controls: list[str] = Field(["DMSO"], description="compounds that mark control wells")
    synthetic: SynthConfig | None = Field(None, description="synthetic: the screen's "
                                          "SynthConfig (default: SynthConfig())")

    @field_validator("source", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        return SOURCE_ALIASES.get(value, value) if isinstance(value, str) else value

    def check(self) -> list[tuple[str, str]]:
        """A source's own requirements: a path (all but synthetic), the csv mappings."""
        out = []
        if self.source in ("bbbc021", "bbbc021-6moa", "csv", "index") and not self.path:
            out.append(("path", f"required for source {self.source!r}"))
        if self.source == "csv":
            if not self.columns:
                out.append(("columns", "required for source 'csv' (a mapping or a preset "
                                       "name)"))
            if not self.channel_columns:
                out.append(("channel_columns", "required for source 'csv'"))
        return out


def build_index_from_config(data: DataSection, out: Path) -> ExperimentIndex:
    """Create (or import) the experiment index described by a config's ``data`` section; a
    synthetic screen without a ``path`` is written under ``out``."""
    source = data.source
    if source == "synthetic":
        screen = Path(data.path) if data.path else out / "synthetic_screen"
        return generate_screen(screen, data.synthetic or SynthConfig())
    if source == "bbbc021":
        index = import_bbbc021(data.path, data.image_csv, data.moa_csv,
                               plates=data.plates, only_present=data.only_present)
    elif source == "bbbc021-6moa":
        index = import_fields_6moa(data.path, only_present=data.only_present)
    elif source == "csv":
        index = import_csv(data.path, data.channel_columns, data.columns, sep=data.sep,
                           controls=data.controls, only_present=data.only_present)
    else:
        index = ExperimentIndex.read_parquet(data.path)
        index.validate(check_shapes=False)
    return index
