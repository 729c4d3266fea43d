"""Typed settings: one model per stage gives the YAML checks, the CLI options and the defaults."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import Field, ValidationError

from morphoprof.cli import build_parser
from morphoprof.config import SegmentationSection, validate_config
from morphoprof.datasets.source import DataSection
from morphoprof.errors import ConfigError, InputError
from morphoprof.evaluation.evaluate import EvaluationConfig
from morphoprof.features.transfer import TransferConfig
from morphoprof.models.crossval import CVConfig
from morphoprof.models.finetune import FineTuneConfig
from morphoprof.models.mil import MILConfig
from morphoprof.models.run import mil_config
from morphoprof.models.settings import (
    CVSection,
    ImagesSection,
    MilNetwork,
    ModelSection,
    TrainConfig,
    TrainSection,
)
from morphoprof.preprocess.illumination import IlluminationConfig
from morphoprof.preprocess.segmentation import NucleiConfig
from morphoprof.profiles.cell_tvn import CellTVNConfig
from morphoprof.profiles.normalize import NormalizationConfig
from morphoprof.profiles.settings import ProfilesConfig
from morphoprof.settings import Settings, add_options, from_options, validate_section


class Toy(Settings):
    size: int = Field(96, ge=1, description="crop side, px")
    scale: float = Field(1.0, description="a factor")
    mode: Literal["pad", "skip"] = Field("pad", description="edge handling")
    name: str | None = Field(None, description="an optional name")
    flag: bool = Field(False, description="a switch")
    tags: list[str] = Field(default_factory=list, description="labels")


def test_section_problems_name_the_key_in_the_readers_words():
    problems: list[str] = []
    got = validate_section(Toy, {"sise": 3, "scale": "big", "mode": "wrap", "flag": 1,
                                 "size": 0}, "toy.", problems)
    assert got == Toy()  # the defaults stand in for a section with problems
    assert "toy.sise: unknown key (did you mean 'size'?)" in problems
    assert "toy.scale: expected a number, got 'big'" in problems
    assert "toy.mode: 'wrap' is not one of ['pad', 'skip']" in problems
    assert "toy.flag: expected true/false, got 1" in problems
    assert "toy.size: must be >= 1, got 0" in problems
    assert len(problems) == 5
    problems = []
    assert validate_section(Toy, [1], "toy.", problems) == Toy()
    assert problems == ["toy: expected a mapping, got list"]
    # an int is a number; null means the default; valid values come through
    ok = validate_section(Toy, {"scale": 2, "size": None, "name": "a"}, "toy.", problems := [])
    assert problems == [] and ok.scale == 2.0 and ok.size == 96 and ok.name == "a"


def test_options_come_from_the_model_and_build_it_back():
    parser = argparse.ArgumentParser()
    add_options(parser, Toy, flags={"size": "--crop-size"})
    a = parser.parse_args([])
    assert from_options(Toy, a) == Toy()
    a = parser.parse_args(["--crop-size", "12", "--mode", "skip", "--flag", "--tags", "x", "y"])
    assert from_options(Toy, a) == Toy(size=12, mode="skip", flag=True, tags=["x", "y"])
    with pytest.raises(SystemExit):  # argparse refuses a value outside the Literal
        parser.parse_args(["--mode", "wrap"])
    # the error names the flag the user typed
    with pytest.raises(InputError, match=r"^--crop-size: must be >= 1, got 0$"):
        from_options(Toy, parser.parse_args(["--crop-size", "0"]))
    assert "crop side, px (default: 96)" in _help(parser)


def _help(parser: argparse.ArgumentParser) -> str:
    from morphoprof.cli import _HelpFormatter

    parser.formatter_class = _HelpFormatter
    return " ".join(parser.format_help().split())


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_settings_model_on_the_cli_has_its_defaults_there():
    """No default is written twice: each command that shows a settings model exposes every one
    of its fields with the model's own default, and the YAML sections fill the same ones."""
    shown = {}
    for name, parser in _subcommands().items():
        for model, fields, prefix in parser.get_default("settings_models") or ():
            shown.setdefault(model, []).append(name)
            dests = {a.dest: a for a in parser._actions}
            for field in fields:
                want = model.model_fields[field].get_default(call_default_factory=True)
                assert prefix + field in dests, f"{name}: no option for {model.__name__}.{field}"
                assert dests[prefix + field].default == want, (
                    f"{name} --{field}: {dests[prefix + field].default!r} vs the model's "
                    f"{want!r}")
            shown.setdefault((model, name), set(fields))
    from morphoprof.config import NucleiSection

    assert shown[NucleiSection] == ["segment"] and shown[IlluminationConfig] == ["illum"]
    assert shown[TransferConfig] == ["extract"]
    assert shown[ProfilesConfig] == ["aggregate", "normalize", "evaluate"]
    assert shown[EvaluationConfig] == ["evaluate"]
    assert shown[NormalizationConfig] == ["aggregate", "normalize"]
    assert shown[CellTVNConfig] == ["aggregate"]
    # the stage commands show every setting; extract leaves out what other options carry
    # (--batch-size and --workers default by input, --channels, --on-error)
    assert shown[(NucleiSection, "segment")] == set(NucleiSection.model_fields)
    assert shown[(IlluminationConfig, "illum")] == set(IlluminationConfig.model_fields)
    assert set(TransferConfig.model_fields) - shown[(TransferConfig, "extract")] == {
        "rgb_channels", "in_chans", "jit", "intensity_percentiles", "batch_size", "num_workers",
        "label", "channels", "seed", "on_error"}
    # every NucleiConfig setting reaches segment and the YAML (threshold_scale and fill_holes
    # could be set from neither before)
    segment = _subcommands()["segment"]
    a = segment.parse_args(["i.parquet", "--out", "o", "--threshold-scale", "0.8",
                            "--no-fill-holes", "--jobs", "3"])
    got = from_options(NucleiSection, a)
    assert got.nuclei() == NucleiConfig(threshold_scale=0.8, fill_holes=False)
    assert got.n_jobs == 3
    cfg = validate_config({"data": {"source": "synthetic"}, "output": "o", "preprocess": {
        "segmentation": {"enabled": True, "threshold_scale": 0.8, "fill_holes": False}}})
    seg = cfg.preprocess.segmentation
    assert isinstance(seg, SegmentationSection) and seg.enabled
    assert seg.nuclei() == got.nuclei()
    defaults = validate_config({"data": {"source": "synthetic"}, "output": "o"}).preprocess
    assert defaults.segmentation.nuclei() == NucleiConfig()
    assert defaults.illumination.settings() == IlluminationConfig()


def test_yaml_sections_of_typed_settings_report_dotted_paths():
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"source": "synthetic"}, "output": "o", "preprocess": {
            "segmentation": {"min_ares": 3, "downsample": 0},
            "illumination": {"window": "big", "enabled": "yes"}}})
    problems = err.value.problems
    assert "preprocess.segmentation.min_ares: unknown key (did you mean 'min_area'?)" in problems
    assert "preprocess.segmentation.downsample: must be >= 1, got 0" in problems
    assert "preprocess.illumination.window: expected an integer, got 'big'" in problems
    assert "preprocess.illumination.enabled: expected true/false, got 'yes'" in problems


def test_settings_are_frozen_and_replace_validates():
    cfg = NucleiConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.min_area = 3
    assert cfg.replace(min_area=3).min_area == 3 and cfg.min_area == 30
    with pytest.raises(InputError, match=r"NucleiConfig: min_area must be >= 0, got -1"):
        cfg.replace(min_area=-1)
    with pytest.raises(InputError, match=r"min_ares is not a setting \(did you mean 'min_area'"):
        NucleiConfig(min_ares=3)


def test_the_readme_yaml_reference_shows_the_models_defaults():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## YAML config reference.*?```yaml\n(.*?)```", readme, re.S).group(1)
    shown = yaml.safe_load(block)
    cfg = validate_config({"data": {"source": "synthetic"}, "output": "o"})
    sections = {("preprocess", "illumination"): cfg.preprocess.illumination,
                ("preprocess", "segmentation"): cfg.preprocess.segmentation,
                ("features",): cfg.features, ("profiles",): cfg.profiles,
                ("evaluation",): cfg.evaluation}
    # the data section: every key shown, with its default (source and path are examples)
    data = cfg.data.model_dump(mode="json")
    assert set(shown["data"]) == set(data)
    assert {k: v for k, v in shown["data"].items() if k not in ("source", "path")} == {
        k: v for k, v in data.items() if k not in ("source", "path")}
    for where, model in sections.items():
        doc = shown
        for part in where:
            doc = doc[part]
        defaults = model.model_dump(mode="json")
        assert set(doc) == set(defaults), f"{'.'.join(where)}: README keys differ"
        for key, value in doc.items():
            assert value == defaults[key], f"{'.'.join(where)}.{key}: README shows {value!r}"


def _trainer_api_pairs():
    return [(MILConfig, (MilNetwork, TrainSection, TrainConfig)),
            (FineTuneConfig, (ModelSection, TrainSection, TrainConfig)),
            (CVConfig, (CVSection, ImagesSection, TrainSection, TrainConfig))]


def test_the_trainers_python_configs_share_the_sections_settings():
    """MILConfig, FineTuneConfig and CVConfig (the Python API of the trainers) hold no copy of
    a training config's setting: each shared field is the section's own (default and help)."""
    resolved = {("CVConfig", "aggregate")}  # the section leaves it to the kind; here resolved
    for api, sections in _trainer_api_pairs():
        shared = 0
        for section in sections:
            for name, field in section.model_fields.items():
                if name not in api.model_fields or (api.__name__, name) in resolved:
                    continue
                if section is TrainConfig and name in TrainSection.model_fields:
                    continue
                mine = api.model_fields[name]
                assert (mine.default, mine.description) == (field.default, field.description), (
                    f"{api.__name__}.{name} differs from {section.__name__}.{name}")
                shared += 1
        assert shared >= 3, api.__name__


def test_a_default_training_config_builds_the_default_python_configs():
    cfg = TrainConfig(data=DataSection(source="index", path="index.parquet"), output="out")
    assert mil_config(cfg, 6, 3) == MILConfig(n_classes=6)
    assert MILConfig(n_classes=6).trunk == "tf_efficientnet_lite0"  # the paper's head on it
    assert (MILConfig(n_classes=6).hidden, MILConfig(n_classes=6).dropout) == (1000, 0.5)
    assert FineTuneConfig(**cfg.model.model_dump()) == FineTuneConfig()
    with pytest.raises(InputError, match="plan"):
        MILConfig(n_classes=2, plan=[[8, 1]])  # a plan with a timm trunk
