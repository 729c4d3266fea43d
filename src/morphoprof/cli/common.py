"""What every command module shares: option groups, printing, the help format."""

from __future__ import annotations

import argparse
import json

from morphoprof.preprocess.illumination import IlluminationCorrection
from morphoprof.profiles.columns import Columns
from morphoprof.settings import ON_ERROR_CHOICES, ON_ERROR_DEFAULT


def print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2, default=str))


def load_illumination(folder: str | None):
    if not folder:
        return None

    return IlluminationCorrection.load(folder)


def columns_from(a: argparse.Namespace):
    return Columns(plate=a.plate_col, well=a.well_col, compound=a.compound_col,
                   concentration=a.concentration_col, moa=a.moa_col, batch=a.batch_col,
                   control=a.control_col, control_values=tuple(a.control_value or ["DMSO"]))


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or not action.option_strings or default is None
                or default is False or default == [] or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


def add_command(sub, name: str, help: str, outputs=(), **kw) -> argparse.ArgumentParser:
    """A sub-command whose ``outputs`` ((attribute, is_folder), ...) are checked for
    writability before it runs; ``is_folder`` is a bool or a function of the parsed arguments."""
    s = sub.add_parser(name, help=help, description=kw.pop("description", help[:1].upper()
                       + help[1:] + "."), formatter_class=_HelpFormatter, **kw)
    s.set_defaults(outputs=tuple(outputs))
    return s


def add_column_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("metadata column names (defaults: morphoprof's)")
    for field, default in (("plate", "Metadata_plate"), ("well", "Metadata_well"),
                           ("compound", "Metadata_compound"),
                           ("concentration", "Metadata_concentration"),
                           ("moa", "Metadata_moa"), ("batch", "Metadata_batch"),
                           ("control", "Metadata_control")):
        g.add_argument(f"--{field}-col", default=default, metavar="COLUMN",
                       help=f"column holding the {field}")
    g.add_argument("--control-value", action="append", metavar="VALUE",
                   help="compound value marking controls when there is no control column "
                   "(default: DMSO; repeatable)")


def add_on_error(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--on-error", default=ON_ERROR_DEFAULT, choices=ON_ERROR_CHOICES,
                   help="an unreadable image set or one with NaN/inf pixels: stop (fail), or "
                   f"{what} and list it with its reason (skip)")
