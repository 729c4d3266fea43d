"""Experiment index: one table describing a screen, one row per field of view, and importers."""

from morphoprof.index.bbbc021 import import_bbbc021, import_fields_6moa
from morphoprof.index.csv_mapping import PRESETS, import_csv
from morphoprof.index.schema import ExperimentIndex, build_index

__all__ = [
    "ExperimentIndex",
    "PRESETS",
    "build_index",
    "import_bbbc021",
    "import_csv",
    "import_fields_6moa",
]
