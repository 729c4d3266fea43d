import pytest

from morphoprof.config import DEMO_CONFIG, load_config, validate_config
from morphoprof.errors import ConfigError


def _problems(raw):
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    return err.value.problems


def test_demo_config_is_valid_and_defaults_filled(tmp_path):
    (tmp_path / "c.yaml").write_text(DEMO_CONFIG)
    cfg, text = load_config(tmp_path / "c.yaml")
    assert cfg["features"]["model"] == "tf_efficientnet_lite0"
    assert cfg["features"]["num_workers"] == 0  # default filled in
    assert cfg["output"] == str(tmp_path / ".")
    assert cfg["data"]["path"] == str(tmp_path / "synthetic_screen")


def test_bad_keys_types_and_values_are_named():
    problems = _problems({
        "data": {"source": "synthetic", "synthetic": {"n_moa": 3}},
        "features": {"modle": "resnet18", "batch_size": "big", "channel_strategy": "cmyk"},
        "profiles": {"normalization": {"method": "zscore"}},
        "evaluation": {"protocols": ["nsc", "loo"]},
        "outptu": "x",
    })
    text = "\n".join(problems)
    assert "features.modle: unknown key (did you mean 'model'?)" in text
    assert "features.batch_size: expected an integer, got 'big'" in text
    assert "features.channel_strategy: 'cmyk' is not one of ['greyscale', 'rgb', 'native']" in text
    assert "profiles.normalization.method: 'zscore' is not one of" in text
    assert "evaluation.protocols[1]: 'loo'" in text
    assert "outptu: unknown key (did you mean 'output'?)" in text
    assert "output: required" in text
    assert "data.synthetic.n_moa: unknown key (did you mean 'n_moas'?)" in text


def test_source_specific_requirements_and_yaml_errors(tmp_path):
    problems = _problems({"data": {"source": "csv"}, "output": "o"})
    assert "data.path: required for source 'csv'" in problems
    assert any(p.startswith("data.columns: required") for p in problems)
    assert _problems({"data": {"source": "ftp"}, "output": "o"}) == [
        "data.source: 'ftp' is not one of ['synthetic', 'bbbc021', 'bbbc021_6moa', 'csv', 'index']"
    ]
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "none.yaml")
