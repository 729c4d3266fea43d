"""Import any CSV that lists image sets, given a mapping from morphoprof fields to its columns.

A mapping names, for each morphoprof field, the CSV column that holds it::

    fields:   {plate: Metadata_Plate, well: Metadata_Well, site: Metadata_Site,
               compound: Treatment, concentration: Concentration, moa: MoA, batch: Batch}
    channels: {DNA: DNA, RNA: RNA, ER: ER, AGP: AGP, Mito: Mito}

``plate``, ``well``, ``compound`` and at least one channel are required; ``site`` defaults to the
row's order within its well, ``batch`` to the plate, ``concentration`` to NaN, ``moa`` to empty.
Channel columns hold file paths, relative to ``root`` unless absolute. Presets cover common
layouts (:data:`PRESETS`), among them DeepProfiler's ``index.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import ValidationError
from morphoprof.index.bbbc021 import read_csv_checked
from morphoprof.index.schema import (
    BATCH,
    COMPOUND,
    CONCENTRATION,
    DEFAULT_CONTROLS,
    MOA,
    PATH_PREFIX,
    PLATE,
    SITE,
    WELL,
    ExperimentIndex,
    build_index,
    default_site_and_concentration,
    finish_import,
)

FIELDS = {
    "plate": PLATE,
    "well": WELL,
    "site": SITE,
    "batch": BATCH,
    "compound": COMPOUND,
    "concentration": CONCENTRATION,
    "moa": MOA,
}
REQUIRED_FIELDS = ("plate", "well", "compound")

# DeepProfiler's index.csv: Metadata_Plate/Well/Site, one column per channel holding a path
# relative to the images folder, and a treatment column.
PRESETS: dict[str, dict[str, str]] = {
    "deepprofiler": {
        "plate": "Metadata_Plate",
        "well": "Metadata_Well",
        "site": "Metadata_Site",
        "compound": "Treatment",
    },
    "cytomining": {
        "plate": "Metadata_Plate",
        "well": "Metadata_Well",
        "site": "Metadata_Site",
        "compound": "Metadata_Compound",
        "concentration": "Metadata_Concentration",
        "moa": "Metadata_MoA",
        "batch": "Metadata_Batch",
    },
}


def import_csv(
    csv_path: str | Path,
    channels: Mapping[str, str],
    fields: Mapping[str, str] | str,
    root: str | Path | None = None,
    sep: str = ",",
    controls: Sequence[str] = DEFAULT_CONTROLS,
    validate: bool = True,
    check_shapes: bool = False,
    only_present: bool = False,
) -> ExperimentIndex:
    """Build an experiment index from a CSV and a column mapping.

    Args:
        csv_path: the table, one row per image set.
        channels: {channel name: CSV column holding that channel's file path}, in channel order.
        fields: {morphoprof field: CSV column}, or the name of a preset in :data:`PRESETS`.
        root: folder that relative paths are resolved against (default: the CSV's folder).
        sep: field separator.
        controls: compound names that mark control wells (``Metadata_control``).
        validate: check files exist (and with ``check_shapes`` that shapes agree).
        only_present: keep the rows whose files all exist (the others are listed in the
            index's ``left_out``) instead of refusing the table.

    Raises:
        ValidationError: unknown fields, columns not in the CSV, or no channels — each named.
    """
    csv_path = Path(csv_path)
    if isinstance(fields, str):
        if fields not in PRESETS:
            raise ValidationError(
                "column mapping", [f"unknown preset {fields!r}; presets: {sorted(PRESETS)}"]
            )
        fields = PRESETS[fields]
    table = read_csv_checked(csv_path, [], sep=sep)
    problems = []
    for key, col in fields.items():
        if key not in FIELDS:
            problems.append(f"fields.{key}: unknown field; known fields: {sorted(FIELDS)}")
        elif col not in table.columns:
            problems.append(
                f"fields.{key}: column {col!r} not in {csv_path} (columns: {list(table.columns)})"
            )
    for key in REQUIRED_FIELDS:
        if key not in fields:
            problems.append(f"fields.{key}: required but not mapped")
    if not channels:
        problems.append("channels: at least one channel must be mapped to a path column")
    for ch, col in channels.items():
        if col not in table.columns:
            problems.append(
                f"channels.{ch}: column {col!r} not in {csv_path} (columns: {list(table.columns)})"
            )
    if problems:
        raise ValidationError(f"importing {csv_path}", problems)

    df = default_site_and_concentration(
        pd.DataFrame({FIELDS[k]: table[c].to_numpy() for k, c in fields.items()}), csv_path)
    for ch, col in channels.items():
        df[PATH_PREFIX + ch] = table[col].astype(str).to_numpy()
    index = build_index(df, list(channels), root or csv_path.parent, controls=controls,
                        source=csv_path, lines=np.arange(len(df)) + 2)
    return finish_import(index, validate, check_shapes, only_present=only_present)
