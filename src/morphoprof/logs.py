"""What a run tells its user, through :mod:`logging`.

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
"""

from __future__ import annotations

import logging
import sys

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
