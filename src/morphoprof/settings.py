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
import threading
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from morphoprof.errors import InputError

_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string",
               "string": "a string", "list": "a list", "dict": "a mapping", "tuple": "a list",
               "model": "a mapping"}


OnError = Literal["fail", "skip"]
"""What an unreadable image set (or one with NaN / inf pixels) does to a stage: ``fail`` stops
it, naming the file; ``skip`` leaves the image set out and lists it with its reason."""
ON_ERROR_CHOICES: tuple[str, ...] = typing.get_args(OnError)
ON_ERROR_DEFAULT: OnError = "fail"


def check_on_error(value: str) -> str:
    """``value`` if it is one of :data:`ON_ERROR_CHOICES`, else an InputError."""
    if value not in ON_ERROR_CHOICES:
        raise InputError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {value!r}")
    return value


_BUILDING = threading.local()  # set while a top-level Settings is being validated


class Settings(BaseModel):
    """Base of every stage's settings: unknown keys are errors, values are not coerced from
    other types (``"5"`` is not an integer, ``true`` is not a number), instances are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def __init__(self, **values: Any) -> None:
        """Build from keyword values; a bad one is an :class:`~morphoprof.errors.InputError`
        naming each setting at fault (``precision must be one of ['auto', 'fp32', 'bf16'], got
        'fp16'``). Nested settings are validated as part of the outer one, so every problem is
        reported with its full path."""
        if getattr(_BUILDING, "active", False):  # a nested model: pydantic collects its errors
            super().__init__(**values)
            return
        _BUILDING.active = True
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InputError(f"{type(self).__name__}: " + "; ".join(
                field_problems(exc, type(self), style="python"))) from exc
        finally:
            _BUILDING.active = False

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = self.check()
        if problems:  # one error carrying every (setting, problem) pair: see field_problems
            raise PydanticCustomError("settings", "{problems}", {"problems": problems})
        return self

    def check(self) -> list[tuple[str, str]]:
        """Problems between settings that no single field's type can express, as ``(setting
        name, what is wrong)`` pairs (e.g. ``("path", "required for source 'csv'")``); each is
        reported under its own dotted path. Subclasses override it; the base has none."""
        return []

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with ``changes`` applied."""
        return type(self)(**{**self.model_dump(), **changes})

    def project(self, model: type[Settings]) -> Settings:
        """This object's values of ``model``'s fields as a ``model`` (e.g. the stage settings
        inside a config section that adds ``enabled``, ``channel``...)."""
        return model.model_validate(self.model_dump(include=set(model.model_fields)))


def field_problems(exc: ValidationError, model: type[BaseModel], path: str = "",
                   style: Literal["yaml", "python"] = "yaml") -> list[str]:
    """``exc``'s errors as one line each, naming the setting by its dotted path (prefixed with
    ``path``). ``yaml``: ``a.b: <what is wrong>``, in the words the config reader uses
    everywhere (unknown keys get a did-you-mean hint); ``python``: ``b must be ..., got ...``.
    A value that fits no member of a union setting is one line naming every member."""
    problems, seen = [], set()
    for err in exc.errors():
        loc, union, annotation = _setting_loc(model, err["loc"])
        where = path + ".".join(loc) if loc else path.rstrip(".") or "config"
        kind, value = err["type"], err.get("input")
        if union is not None:
            if tuple(loc) in seen:
                continue
            seen.add(tuple(loc))
            want = " or ".join(_describe(a) for a in typing.get_args(union))
        elif kind == "extra_forbidden":
            known = list(getattr(_setting_loc(model, err["loc"][:-1])[2], "model_fields", {}))
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {sorted(known)})"
            problems.append(f"{where}: unknown key{hint}" if style == "yaml"
                            else f"{where} is not a setting{hint}")
            continue
        elif kind == "settings":  # pairs from Settings.check, each under its own path
            for name, what in err["ctx"]["problems"]:
                problems.append(f"{path}{'.'.join([*loc, name])}: {what}")
            continue
        elif kind == "missing":
            problems.append(f"{where}: required" if style == "yaml" else f"{where} is required")
            continue
        elif kind in ("too_short", "too_long"):
            ctx = err["ctx"]
            bound = (f"at least {ctx['min_length']}" if kind == "too_short"
                     else f"at most {ctx['max_length']}")
            problems.append(f"{where}: expected {bound} item(s), got {ctx['actual_length']}"
                            if style == "yaml" else f"{where} must have {bound} item(s), got "
                            f"{ctx['actual_length']}")
            continue
        elif kind == "literal_error":
            choices = list(typing.get_args(_unwrap(annotation)))
            problems.append(f"{where}: {value!r} is not one of {choices}" if style == "yaml"
                            else f"{where} must be one of {choices}, got {value!r}")
            continue
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            want = _TYPE_NAMES.get(kind.split("_")[0], kind.split("_")[0])
        elif kind in _BOUNDS:
            want = f"{_BOUNDS[kind]} {next(iter(err['ctx'].values()))}"
            problems.append(f"{where}: must be {want}, got {value!r}" if style == "yaml"
                            else f"{where} must be {want}, got {value!r}")
            continue
        else:  # a validator's own message
            problems.append(f"{where}: {err['msg']}")
            continue
        problems.append(f"{where}: expected {want}, got {value!r}" if style == "yaml"
                        else f"{where} must be {want}, got {value!r}")
    return problems


def _setting_loc(model: type[BaseModel], loc: tuple) -> tuple[list[str], Any, Any]:
    """(the dotted path of the setting an error is about, its union annotation when the error
    is about one member of a union (else None), the annotation of the value at fault):
    pydantic's member tags are left out."""
    out: list[str] = []
    annotation: Any = model
    for part in loc:
        fields = getattr(annotation, "model_fields", None)
        if isinstance(annotation, type) and fields is not None:
            out.append(str(part))
            annotation = _unwrap(fields[part].annotation) if part in fields else None
        elif isinstance(part, int):  # an item of a list
            out[-1] = f"{out[-1]}[{part}]" if out else str(part)
            args = typing.get_args(annotation)
            annotation = args[0] if args else None
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            return out, annotation, annotation
    return out, None, annotation


def _describe(annotation: Any) -> str:
    """How a union member reads in a message: ``true/false``, ``'auto'``, ``an integer``."""
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    return _TYPE_NAMES.get(getattr(annotation, "__name__", ""), str(annotation))


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}


def validate_section(model: type[Settings], raw: Any, path: str, problems: list[str]
                     ) -> Settings | None:
    """``raw`` (a YAML mapping; None: empty) as a ``model`` instance; its problems are added to
    ``problems`` (each prefixed with ``path``, e.g. ``preprocess.segmentation.``, or ``""`` for
    a whole config) and the defaults are returned in their place (None where ``model`` has
    required settings). A key left empty in YAML (``window:``) takes its default, at any
    depth."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{path.rstrip('.') or 'config'}: expected a mapping, got "
                        f"{type(raw).__name__}")
        return _defaults(model)
    got, exc = _validated(model, _without_empty(model, raw))
    if exc is not None:
        problems.extend(field_problems(exc, model, path))
        return _defaults(model)
    return got


def _without_empty(model: type[BaseModel], raw: Mapping) -> dict:
    """``raw`` without the keys left empty (None) that ``model`` does not allow to be None, in
    it and in its nested settings sections: those take their defaults."""
    out = {}
    for key, value in raw.items():
        info = model.model_fields.get(key) if isinstance(key, str) else None
        if value is None and not _optional(model, key):
            continue
        inner = _unwrap(info.annotation) if info is not None else None
        if isinstance(value, Mapping) and isinstance(inner, type) and issubclass(inner, BaseModel):
            value = _without_empty(inner, value)
        out[key] = value
    return out


def _defaults(model: type[Settings]) -> Settings | None:
    """``model()``, or None where it has required settings."""
    if any(info.is_required() for info in model.model_fields.values()):
        return None
    return model()


def add_options(parser: argparse.ArgumentParser, model: type[Settings],
                names: Iterable[str] | None = None,
                flags: Mapping[str, str] | None = None, prefix: str = "") -> None:
    """Add one option per field of ``model`` (``names``: only these) to ``parser``: flag
    ``--<name-with-dashes>`` (or ``flags[name]``), dest ``prefix`` + the field name, default,
    help and choices from the field. Booleans get ``--x / --no-x``. Record the model on the
    parser, so :func:`from_options` and the CLI's consistency test find it."""
    flags = flags or {}
    names = tuple(names or model.model_fields)
    shown_flags = dict(parser.get_default("settings_flags") or {})  # dest -> flag, for errors
    for name in names:
        info = model.model_fields[name]
        kind, choices, many = _cli_type(info.annotation)
        kw: dict[str, Any] = {"dest": prefix + name, "default": info.get_default(
            call_default_factory=True), "help": info.description or name}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if choices:
                kw["choices"] = choices
            if many:
                kw["nargs"] = "*"
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if kind is not bool and not choices:
            kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(flag, **kw)
        shown_flags[prefix + name] = flag
    shown = parser.get_default("settings_models") or ()
    parser.set_defaults(settings_models=(*shown, (model, names, prefix)),
                        settings_flags=shown_flags)


def from_options(model: type[Settings], args: argparse.Namespace, prefix: str = "",
                 **fixed: Any) -> Settings:
    """The ``model`` instance of parsed options (the fields :func:`add_options` added with
    ``prefix``; the others keep their defaults), with ``fixed`` values on top; a bad value is
    a :class:`~morphoprof.errors.InputError` naming its option."""
    values = {name: getattr(args, prefix + name) for name in model.model_fields
              if hasattr(args, prefix + name)}
    got, exc = _validated(model, {**values, **fixed})
    if exc is not None:
        shown = getattr(args, "settings_flags", None) or {}
        lines = []
        for line in field_problems(exc, model):
            name = line.split(":")[0]
            flag = shown.get(prefix + name, "--" + name.replace("_", "-"))
            lines.append(flag + line[len(name):])
        raise InputError("; ".join(lines)) from exc
    return got


def _validated(model: type[Settings], values: Mapping[str, Any]
               ) -> tuple[Settings | None, ValidationError | None]:
    """(the instance, None) or (None, pydantic's errors) for ``values``."""
    try:
        return model.model_validate(dict(values)), None
    except InputError as exc:  # raised by Settings.__init__ from pydantic's errors
        if isinstance(exc.__cause__, ValidationError):
            return None, exc.__cause__
        raise
    except ValidationError as exc:
        return None, exc


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
        inner, choices, _ = _cli_type(typing.get_args(annotation)[0])
        return inner, choices, True
    return annotation, None, False
