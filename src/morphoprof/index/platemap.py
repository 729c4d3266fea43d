"""Plate maps: one row per well, the treatment metadata that image and cell tables lack.

A plate map is a CSV with a well column (``well`` unless told) and any other columns
(``compound``, ``concentration``, ``moa``, ...). Each other column becomes ``Metadata_<column>``
(a column already named ``Metadata_...`` keeps its name), the well column ``Metadata_well``, as
pycytominer's ``annotate`` joins a platemap to cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError


def read_platemap(path: str | Path, well_column: str = "well") -> pd.DataFrame:
    """Read a plate map as ``Metadata_well`` + ``Metadata_<column>`` columns, one row per well.

    Raises:
        InputError: the file is missing or unreadable, has no ``well_column``, or lists a well
            twice (naming the file and the row, 1-based line in the CSV).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"plate map not found: {path}")
    try:
        pm = pd.read_csv(path)
    except Exception as exc:  # pandas raises several parser errors
        raise InputError(f"cannot read plate map {path}: {exc}") from exc
    if well_column not in pm.columns:
        raise InputError(f"{path}: no column {well_column!r} (the well); it has "
                         f"{list(pm.columns)}")
    dup = pm[well_column].astype(str).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise InputError(f"{path} line {row + 2}: well {pm[well_column].iloc[row]} "
                         "appears twice")
    pm = pm.rename(columns={c: c if c.startswith("Metadata_") else f"Metadata_{c}"
                            for c in pm.columns if c != well_column})
    pm = pm.rename(columns={well_column: "Metadata_well"})
    pm["Metadata_well"] = pm["Metadata_well"].astype(str)
    return pm
