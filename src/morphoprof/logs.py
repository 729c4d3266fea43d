"""What a run tells its user: log records through :mod:`logging`, and progress bars.

Every module logs to ``logging.getLogger(__name__)``, under the ``morphoprof`` logger: a stage
announces what it does at INFO (``resuming: 3 of 4 shards already done``); something in the data
that the user should know but that does not stop the run (image sets left out of an import, a
plate without control wells, a shard recomputed, an unreadable file skipped) is a WARNING. These
are conditions of the data, which the calling code cannot remove, so they are log records rather
than :mod:`warnings` (the split the logging HOWTO recommends); the result files list them too.

As a library, morphoprof shows only what Python shows by default (WARNING and above, on
stderr); :func:`configure`, which the command line calls, prints INFO and above on stderr as
plain lines, warnings as ``warning: ...``. A command's result (a JSON summary, a path) is what
goes to stdout, so ``morphoprof extract ... > summary.json`` holds only the summary.

Progress bars (tqdm, on stderr; Lightning's during training) have one process-wide setting,
on by default: :func:`set_progress` or, for a block, ``with progress(False): ...``. Every stage
makes its bars with :func:`progress_bar`, so no function takes a ``progress`` argument.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

LOGGER = "morphoprof"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (so output
    redirected after :func:`configure`, as pytest's capture does, still receives it)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Plain(logging.Formatter):
    """The message alone; warnings prefixed ``warning:``."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


def configure(level: int = logging.INFO) -> None:
    """Show morphoprof's log records at ``level`` and above on stderr as plain lines (warnings
    as ``warning: ...``). Calling it again replaces the earlier set-up."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Plain())
    logger.addHandler(handler)
    logger.setLevel(level)


_PROGRESS = {"enabled": True}


def progress_enabled() -> bool:
    """Whether progress bars are shown (the one setting every stage reads)."""
    return _PROGRESS["enabled"]


def set_progress(enabled: bool) -> bool:
    """Show (True) or hide (False) every progress bar from now on; returns the earlier
    setting."""
    earlier, _PROGRESS["enabled"] = _PROGRESS["enabled"], bool(enabled)
    return earlier


@contextmanager
def progress(enabled: bool) -> Iterator[None]:
    """Show or hide progress bars inside a ``with`` block; the earlier setting is restored
    after it."""
    earlier = set_progress(enabled)
    try:
        yield
    finally:
        set_progress(earlier)


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm bar (``total``, ``desc``, ``unit``... as tqdm's own) that is hidden when progress
    is off (:func:`set_progress`)."""
    return tqdm(iterable, disable=not _PROGRESS["enabled"], **kwargs)
