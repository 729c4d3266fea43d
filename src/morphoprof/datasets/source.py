"""The experiment index a config's ``data`` section describes: a synthetic screen generated
on the spot, or a screen imported from its own layout (BBBC021, the 6-MoA fields, a CSV) or
from an index Parquet file. Shared by ``morphoprof run`` and every trainer."""

from __future__ import annotations

from pathlib import Path

from morphoprof.datasets.synthetic import SynthConfig, generate_screen
from morphoprof.index import import_bbbc021, import_csv, import_fields_6moa
from morphoprof.index.schema import ExperimentIndex, summarize_left_out


def build_index_from_config(data: dict, out: Path, progress: bool = True, log=print
                            ) -> ExperimentIndex:
    """Create (or import) the experiment index described by the ``data`` section (a validated
    config's ``data`` dict); a synthetic screen without a ``path`` is written under ``out``.
    ``log`` receives one line per image set left out of an import (None: silent)."""
    source = data["source"]
    if source == "synthetic":
        screen = Path(data["path"]) if data["path"] else out / "synthetic_screen"
        return generate_screen(screen, SynthConfig(**(data["synthetic"] or {})),
                               progress=progress, log=log)
    if source == "bbbc021":
        index = import_bbbc021(data["path"], data["image_csv"], data["moa_csv"],
                               progress=progress, plates=data.get("plates"),
                               only_present=data.get("only_present", False))
    elif source == "bbbc021-6moa":
        index = import_fields_6moa(data["path"], only_present=data.get("only_present", False))
    elif source == "csv":
        index = import_csv(data["path"], data["channel_columns"], data["columns"],
                           sep=data["sep"], controls=data["controls"],
                           only_present=data.get("only_present", False))
    else:
        index = ExperimentIndex.read_parquet(data["path"])
        index.validate(check_shapes=False)
    if log:
        for line in summarize_left_out(index):
            log(line)
    return index
