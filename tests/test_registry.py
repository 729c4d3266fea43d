"""Extractors by name: the built-ins come from their modules on first use, settings keep only
the keys an extractor has, an unknown name is an error with a suggestion, and the config and
the CLI offer exactly the registered names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from morphoprof.cli import build_parser
from morphoprof.config import validate_config
from morphoprof.errors import ConfigError, InputError
from morphoprof.preprocess.segmentation import NucleiConfig
from morphoprof.registry import create_extractor, extractor_names, register_extractor


def test_builtins_are_built_from_settings_with_unused_keys_ignored():
    settings = {"extractor": "x", "model": "resnet18", "weights": "random", "batch_size": 7,
                "channels": ["DNA"], "on_error": "skip", "measurements": ["intensity"],
                "nuclei": NucleiConfig(min_area=11), "n_jobs": 2, "unrelated": 1}
    t = create_extractor("transfer", settings)
    assert type(t).__name__ == "TransferExtractor"
    assert (t.cfg.model, t.cfg.batch_size, t.cfg.on_error) == ("resnet18", 7, "skip")
    c = create_extractor("classical", settings)
    assert type(c).__name__ == "ClassicalExtractor"
    assert c.cfg.measurements == ("intensity",) and c.cfg.nuclei.min_area == 11
    assert (c.cfg.n_jobs, c.cfg.channels, c.cfg.on_error) == (2, ["DNA"], "skip")


def test_unknown_name_and_a_registered_one():
    with pytest.raises(InputError, match="did you mean 'classical'"):
        create_extractor("clasical", {})

    @register_extractor("echo_for_test")
    def _echo(settings):
        return dict(settings)

    try:
        assert create_extractor("echo_for_test", {"a": 1}) == {"a": 1}
        # a run config accepts a name registered after the config module was imported
        cfg = validate_config({"data": {"source": "synthetic"}, "output": "o",
                               "features": {"extractor": "echo_for_test"}})
        assert cfg.features.extractor == "echo_for_test"
        assert extractor_names()[:2] == ("transfer", "classical")
        assert "echo_for_test" in extractor_names()
    finally:
        from morphoprof import registry

        registry._BUILDERS.pop("echo_for_test")


def test_config_and_cli_offer_the_registered_names():
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"source": "synthetic"}, "output": "o",
                         "features": {"extractor": "deep"}})
    assert err.value.problems == [f"features.extractor: 'deep' is not one of "
                                  f"{list(extractor_names())}"]
    extract = next(a for a in build_parser()._subparsers._group_actions[0].choices["extract"]
                   ._actions if a.dest == "extractor")
    assert tuple(extract.choices) == extractor_names()


def test_naming_an_extractor_imports_only_its_module():
    code = ("import sys; from morphoprof.registry import create_extractor; "
            "create_extractor('classical', {}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
