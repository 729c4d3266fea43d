"""Typed settings: one pydantic model per stage is its defaults, YAML schema and CLI options.

A stage's settings class derives from :class:`Settings`. Each field's default, type, allowed
values (``Literal``), bounds (``ge`` / ``le``) and ``description`` are written once, there:

- a YAML config section is validated against it (:func:`validate_section`), with every problem
  named by its dotted key path (``preprocess.segmentation.min_area: expected an integer, got
  'big'``, ``...: unknown key (did you mean 'min_area'?)``);
- a CLI sub-command exposes it with :func:`add_options` (flag ``--min-area``, default and help
  from the field) and builds it back with :func:`from_options`.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string",
               "list": "a list", "dict": "a mapping", "tuple": "a list"}


class Settings(BaseModel):
    """Base of every stage's settings: unknown keys are errors, values are not coerced from
    other types (``"5"`` is not an integer, ``true`` is not a number), instances are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with ``changes`` applied."""
        return type(self).model_validate({**self.model_dump(), **changes})


def field_problems(exc: ValidationError, model: type[BaseModel], path: str = "") -> list[str]:
    """``exc``'s errors as one line each, ``<dotted.path>: <what is wrong>``, in the words the
    YAML reader uses everywhere (unknown keys get a did-you-mean hint)."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "lax-"))]
        where = path + ".".join(loc) if loc else path.rstrip(".") or "config"
        kind, value = err["type"], err.get("input")
        if kind == "extra_forbidden":
            known = _field_names(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {sorted(known)})"
            problems.append(f"{where}: unknown key{hint}")
        elif kind == "missing":
            problems.append(f"{where}: required")
        elif kind == "literal_error":
            choices = list(typing.get_args(_annotation(model, loc)))
            problems.append(f"{where}: {value!r} is not one of {choices}")
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            want = _TYPE_NAMES.get(kind.split("_")[0], kind.split("_")[0])
            problems.append(f"{where}: expected {want}, got {value!r}")
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
                    "less_than": "<"}[kind]
            bound = next(iter(err["ctx"].values()))
            problems.append(f"{where}: must be {sign} {bound}, got {value!r}")
        else:
            problems.append(f"{where}: {err['msg']}")
    return problems


def validate_section(model: type[Settings], raw: Any, path: str, problems: list[str]) -> Settings:
    """``raw`` (a YAML mapping; None: empty) as a ``model`` instance; its problems are added to
    ``problems`` (each prefixed with ``path``, e.g. ``preprocess.segmentation.``) and the
    defaults are returned in their place."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{path.rstrip('.')}: expected a mapping, got {type(raw).__name__}")
        return model()
    raw = {k: v for k, v in raw.items() if v is not None or _optional(model, k)}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems.extend(field_problems(exc, model, path))
        return model()


def add_options(parser: argparse.ArgumentParser, model: type[Settings],
                names: Iterable[str] | None = None,
                flags: Mapping[str, str] | None = None) -> None:
    """Add one option per field of ``model`` (``names``: only these) to ``parser``: flag
    ``--<name-with-dashes>`` (or ``flags[name]``), dest the field name, default, help and
    choices from the field. Booleans get ``--x / --no-x``. Record the model on the parser, so
    :func:`from_options` and the CLI's consistency test find it."""
    flags = flags or {}
    for name in names or model.model_fields:
        info = model.model_fields[name]
        kind, choices, many = _cli_type(info.annotation)
        kw: dict[str, Any] = {"dest": name, "default": info.default,
                              "help": info.description or name}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if choices:
                kw["choices"] = choices
            if many:
                kw["nargs"] = "*"
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if kind is not bool:
            kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(flag, **kw)
    shown = parser.get_default("settings_models") or ()
    parser.set_defaults(settings_models=(*shown, (model, tuple(names or model.model_fields))))


def from_options(model: type[Settings], args: argparse.Namespace, **fixed: Any) -> Settings:
    """The ``model`` instance of parsed options (the fields :func:`add_options` added; the
    others keep their defaults), with ``fixed`` values on top; a bad value is a
    :class:`~morphoprof.errors.InputError` naming its option."""
    from morphoprof.errors import InputError

    values = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        return model.model_validate({**values, **fixed})
    except ValidationError as exc:
        lines = [p.replace(p.split(":")[0], "--" + p.split(":")[0].replace("_", "-"), 1)
                 for p in field_problems(exc, model)]
        raise InputError("; ".join(lines)) from exc


def _annotation(model: type[BaseModel], loc: list[str]) -> Any:
    annotation: Any = model
    for part in loc:
        fields = getattr(annotation, "model_fields", None)
        if fields is None or part not in fields:
            break
        annotation = _unwrap(fields[part].annotation)
    return annotation


def _field_names(model: type[BaseModel], loc: list[str]) -> list[str]:
    inner = _annotation(model, loc) if loc else model
    return list(getattr(inner, "model_fields", {}))


def _optional(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields.get(name)
    return info is None or type(None) in typing.get_args(info.annotation)


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _cli_type(annotation: Any) -> tuple[type, list | None, bool]:
    """(argparse type, choices, whether a list) of a field annotation."""
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices, False
    if origin in (list, tuple):
        inner = typing.get_args(annotation)[0]
        return inner, None, True
    return annotation, None, False
