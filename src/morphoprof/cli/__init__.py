"""The ``morphoprof`` command line: a thin layer over the stage functions.

One module per group of commands (:mod:`.run`, :mod:`.data`, :mod:`.stages`,
:mod:`.profiles`), each listing its parser builders (``COMMANDS``) and holding their
handlers; options that are a stage's settings come from its settings model
(:func:`morphoprof.settings.add_options`).
"""

from __future__ import annotations

import argparse
import sys

from morphoprof import __version__
from morphoprof.cli import data, profiles, run, stages
from morphoprof.cli.common import _HelpFormatter
from morphoprof.errors import MorphoprofError, os_reason
from morphoprof.io_utils import check_writable
from morphoprof.logs import configure as configure_logging

__all__ = ["build_parser", "main", "_HelpFormatter"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="morphoprof",
        description="Deep-learning morphological profiling of high-content screens.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"morphoprof {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (run, data, stages, profiles):  # the order of the help's command list
        for add in group.COMMANDS:
            add(sub)
    return p


def _check_outputs(a: argparse.Namespace) -> None:
    """Before any work: every output path the command was given can be written (a parent that
    is a file, a read-only folder... is one ``cannot write`` error, not a failure after hours)."""
    for attr, folder in getattr(a, "outputs", ()):
        value = getattr(a, attr, None)
        if callable(folder):
            folder = folder(a)
        if value:
            check_writable(value, folder=folder)


def _close_progress_bars() -> None:
    """End any progress bar a failed stage left open, so that the error is on its own line."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # a path that is not UTF-8 (a folder named in Latin-1) is printed escaped, not a crash
        if hasattr(stream, "reconfigure") and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    configure_logging()  # the stages' log records as plain lines on stderr
    try:
        _check_outputs(args)
        return args.func(args)
    except MorphoprofError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an OS error no stage turned into a named one: still one line
        _close_progress_bars()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{os_reason(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, re-run to resume", file=sys.stderr)
        return 130
