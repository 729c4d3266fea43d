"""Feature extractors by name, as timm registers its models: ``extract``, ``run`` and the config
look an extractor up here instead of branching on its kind.

An extractor module registers a builder with :func:`register_extractor`; a builder takes the
settings (a mapping: a config's ``features`` section plus what the run adds, such as channels
and the error policy) and keeps the keys its own settings class has. The built-in extractors
are imported the first time they are asked for, so naming one never imports torch or
cp_measure for the other.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from morphoprof.errors import InputError

# name -> the module that registers it (imported on first use)
BUILTIN_EXTRACTORS = {
    "transfer": "morphoprof.features.transfer",
    "classical": "morphoprof.features.classical",
}
_BUILDERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {}


def register_extractor(name: str):
    """Decorator: register ``builder(settings) -> extractor`` under ``name``."""

    def wrap(builder: Callable[[Mapping[str, Any]], Any]):
        _BUILDERS[name] = builder
        return builder

    return wrap


def extractor_names() -> tuple[str, ...]:
    """Every extractor that can be asked for by name (built in first, then registered ones)."""
    return (*BUILTIN_EXTRACTORS, *sorted(set(_BUILDERS) - set(BUILTIN_EXTRACTORS)))


def create_extractor(name: str, settings: Mapping[str, Any]) -> Any:
    """The extractor ``name`` built from ``settings`` (keys it does not use are ignored).

    Raises:
        InputError: an unknown name (with the closest known one).
    """
    if name not in _BUILDERS and name in BUILTIN_EXTRACTORS:
        importlib.import_module(BUILTIN_EXTRACTORS[name])
    if name not in _BUILDERS:
        names = extractor_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown extractor {name!r}{hint}; known: {', '.join(names)}")
    return _BUILDERS[name](settings)


def settings_for(cls: type, settings: Mapping[str, Any], **fixed: Any) -> Any:
    """An instance of the settings model ``cls`` (a :class:`~morphoprof.settings.Settings`)
    from the keys of ``settings`` it has (``fixed`` overrides them); a bad value is an
    InputError naming it."""
    known = set(cls.model_fields)
    return cls(**{**{k: v for k, v in settings.items() if k in known}, **fixed})
