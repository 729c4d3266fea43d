"""Which metadata columns of a profile table hold the plate, well, compound, concentration, MoA,
batch and control flag.

morphoprof writes the canonical names (``Metadata_plate``, ``Metadata_compound``...), but profiles
from elsewhere use others (pycytominer's ``Metadata_Plate``, ``Metadata_broad_sample``,
``Metadata_mmoles_per_liter``...). :class:`Columns` maps a user's names onto the canonical ones on
the way in (:meth:`Columns.to_canonical`) and back on the way out (:meth:`Columns.from_canonical`),
so everything inside works on one set of names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pandas as pd

from morphoprof.errors import InputError
from morphoprof.index.schema import (
    BATCH,
    COMPOUND,
    CONCENTRATION,
    CONTROL,
    DEFAULT_CONTROLS,
    MOA,
    PLATE,
    WELL,
)

_CANONICAL = {"plate": PLATE, "well": WELL, "compound": COMPOUND,
              "concentration": CONCENTRATION, "moa": MOA, "batch": BATCH, "control": CONTROL}


@dataclass(frozen=True)
class Columns:
    """The user's column names (defaults: morphoprof's canonical names).

    ``control_values``: compound values that mark control rows, used when the table has no
    control column (default: DMSO).
    """

    plate: str = PLATE
    well: str = WELL
    compound: str = COMPOUND
    concentration: str = CONCENTRATION
    moa: str = MOA
    batch: str = BATCH
    control: str = CONTROL
    control_values: tuple[str, ...] = DEFAULT_CONTROLS

    def mapping(self) -> dict[str, str]:
        """user name -> canonical name, for the names that differ."""
        return {getattr(self, f.name): _CANONICAL[f.name] for f in fields(self)
                if f.name in _CANONICAL and getattr(self, f.name) != _CANONICAL[f.name]}

    def to_canonical(self, df: pd.DataFrame, required: tuple[str, ...] = (),
                     source: str = "the table") -> pd.DataFrame:
        """Rename the user's columns to canonical ones and add ``Metadata_control`` from
        ``control_values`` when it is missing.

        Args:
            required: field names (``"compound"``, ``"moa"``...) that must be present; a missing
                one raises InputError naming the column and ``source``.
        """
        missing = [getattr(self, r) for r in required if getattr(self, r) not in df.columns
                   and not (r == "control" and self.compound in df.columns)]
        if missing:
            present = [c for c in df.columns if c.startswith("Metadata_")]
            raise InputError(f"{source} lacks metadata column(s) {missing} "
                             f"(metadata columns present: {present})")
        mapping = self.mapping()
        clash = [c for u, c in mapping.items() if u in df.columns and c in df.columns]
        if clash:
            raise InputError(f"{source} has both {clash} and the column(s) mapped onto them")
        out = df.rename(columns=mapping)
        if CONTROL not in out.columns and COMPOUND in out.columns:
            out[CONTROL] = out[COMPOUND].astype(str).isin(self.control_values)
        elif CONTROL in out.columns and out[CONTROL].dtype != bool:
            out[CONTROL] = _as_bool(out[CONTROL], source)
        return out

    def from_canonical(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rename canonical columns back to the user's names."""
        back = {c: u for u, c in self.mapping().items() if c in df.columns}
        return df.rename(columns=back)


def _as_bool(s: pd.Series, source: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(s):
        return s.fillna(0).astype(bool)
    text = s.astype(str).str.strip().str.lower()
    known = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False,
             "": False, "nan": False, "none": False}
    bad = sorted(set(text) - set(known))
    if bad:
        raise InputError(f"{source}: control column has values {bad[:5]} that are not booleans")
    return text.map(known).astype(bool)
