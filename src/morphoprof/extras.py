"""Optional dependencies, installed as extras of the package (``pip install 'morphoprof[X]'``).

A user who only profiles (import, aggregate, normalise, evaluate, transfer features) needs none
of them. Each is imported through :func:`require`, so a missing one is one ``error:`` line naming
the extra to install, not a traceback. ``EXTRAS`` is the one list of them; a test checks that
``pyproject.toml`` declares the same.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from morphoprof.errors import MorphoprofError

# extra: {module imported: (the distribution that provides it, what it serves)}
EXTRAS: dict[str, dict[str, tuple[str, str]]] = {
    "classical": {"cp_measure": ("cp_measure", "extract --extractor classical")},
    "cellprofiler": {"cytotable": ("cytotable", "import cellprofiler"),
                     "parsl": ("parsl", "import cellprofiler")},
    "train": {"lightning": ("lightning", "training (train finetune / mil / weak, and extract "
                                         "from a weak checkpoint)")},
    "distributed": {"distributed": ("dask", "extract --scheduler (Dask)")},
    "mil": {"maxflow": ("PyMaxflow", "MRF denoising of Jacobian masks")},
}


class MissingExtra(MorphoprofError):
    """An optional dependency is not installed; the message names the extra to install."""


def extra_of(module: str) -> str:
    """The extra that provides ``module`` (a key of :data:`EXTRAS`)."""
    return next(e for e, mods in EXTRAS.items() if module in mods)


def require(module: str) -> ModuleType:
    """Import ``module`` (one listed in :data:`EXTRAS`), or raise :class:`MissingExtra`
    naming what needs it and the ``pip install`` command that provides it."""
    extra = extra_of(module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{EXTRAS[extra][module][1]} needs {module}, which is not installed: "
            f"pip install 'morphoprof[{extra}]' (or 'morphoprof[all]')") from exc
