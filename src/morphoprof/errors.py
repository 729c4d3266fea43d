"""Exceptions raised on bad input. Every message names the file, row or key at fault."""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any


class MorphoprofError(Exception):
    """Base class for errors a user can act on (bad input, bad config, failed download)."""


class InputError(MorphoprofError):
    """An input file or table is missing, unreadable or malformed."""


class ValidationError(MorphoprofError):
    """One or more problems found while validating a table or a config.

    ``problems`` holds one human-readable line per problem; each names the row, file or key.
    """

    def __init__(self, what: str, problems: list[str], max_shown: int = 20) -> None:
        self.what, self.max_shown = what, max_shown
        self.problems = list(problems)
        shown = self.problems[:max_shown]
        more = len(self.problems) - len(shown)
        lines = [f"{what}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in shown]
        if more > 0:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # as it was made: a worker process's error reaches its caller
        return type(self), (self.what, self.problems, self.max_shown)


class ImageReadError(InputError):
    """An image file could not be read or decoded."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class OutputError(MorphoprofError):
    """An output could not be written (permission, read-only or full disk, a path that is a
    file); the message is ``cannot write <path>: <reason>``."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot write {self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, MorphoprofError | None]:
    """``(fn(*args), None)``, or ``(None, the MorphoprofError it raised)``. Jobs run in a pool
    through it, so that their caller raises the first failing job's error in the jobs' order,
    whichever worker failed first: the file or row an error names does not depend on timing.
    Every MorphoprofError pickles, so it crosses from a worker process."""
    try:
        return fn(*args), None
    except MorphoprofError as exc:
        return None, exc


@contextmanager
def pool_results(results: Generator) -> Iterator[Generator]:
    """``with pool_results(pool(jobs)) as results: ...`` for a joblib
    ``Parallel(return_as="generator")`` whose caller may stop early, as when it raises a job's
    error (see :func:`outcome`): the jobs not read yet are cancelled on leaving the block,
    without joblib's warning that they were ("N tasks which were still being processed ...
    have been cancelled"), so the caller's error stays the one line a user reads."""
    try:
        yield results
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"\d+ tasks (have been successfully|which were)",
                                    UserWarning)
            results.close()


def os_reason(exc: OSError) -> str:
    """The human part of an OS error ("No space left on device"), without errno noise (Arrow
    reports "Error writing bytes to file. Detail: [errno 28] No space left on device")."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # h5py's strerror runs over several lines
        return os.strerror(exc.errno)
    text = exc.strerror or str(exc)
    if "[errno " in text:
        return text.rsplit("] ", 1)[-1].strip() or text
    if re.fullmatch(r"\d+ requested and \d+ written", text):  # numpy's short write (tofile)
        return f"No space left on device ({text})"
    return text


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (DuckDB's run over many), or its type's name
    where it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DownloadError(MorphoprofError):
    """A download failed, or its result did not verify."""


class ConfigError(ValidationError):
    """The YAML run configuration is invalid."""
