"""Settings of the profiling stage: features -> well profiles -> treatment profiles."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from morphoprof.profiles.cell_tvn import CellTVNConfig
from morphoprof.profiles.normalize import NormalizationConfig
from morphoprof.profiles.select import OPERATIONS
from morphoprof.settings import Settings


class ProfilesConfig(Settings):
    """What :func:`~morphoprof.pipeline.build_profiles` does: a run config's ``profiles``
    section, the options of ``morphoprof aggregate``."""

    well_aggregation: Literal["mean", "median"] = Field(
        "mean", description="rows (cells or fields) -> wells")
    treatment_aggregation: Literal["mean", "median", "modz"] = Field(
        "median", description="wells -> treatments (modz: CMap's moderated z-score consensus, "
        "replicates weighted by their agreement)")
    feature_selection: list[Literal[OPERATIONS]] = Field(
        ["nonfinite"], description="feature selection steps, in order")
    blocklist: str | None = Field(
        None, description="blocklist selection: features to drop, one per line (default: "
        "pycytominer's list of unreliable CellProfiler features)")
    format: Literal["parquet", "h5ad", "zarr"] = Field(
        "parquet", description="h5ad / zarr: also write wells and treatments as AnnData "
        "(features in X, metadata in obs) for scanpy; Parquet is always written")
    cell_tvn: CellTVNConfig = Field(default_factory=CellTVNConfig,
                                    description="cell-level TVN before aggregation")
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig,
                                               description="well-level normalisation")
