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
    assert cfg["features"].model == "tf_efficientnet_lite0"
    assert cfg["features"].num_workers == 0  # default filled in
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
        "data.source: 'ftp' is not one of ['synthetic', 'bbbc021', 'bbbc021-6moa', 'csv', 'index']"
    ]
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("spelling", ["bbbc021-6moa", "bbbc021_6moa"])
def test_six_moa_source_has_two_spellings_and_partial_download_keys(tmp_path, spelling):
    from morphoprof.config import load_train_config

    (tmp_path / "run.yaml").write_text(f"data: {{source: {spelling}, path: f}}\noutput: o\n")
    cfg, _ = load_config(tmp_path / "run.yaml")
    assert cfg["data"]["source"] == "bbbc021-6moa"
    assert cfg["profiles"].normalization.method is None  # decided from the controls
    (tmp_path / "train.yaml").write_text(f"data: {{source: {spelling}, path: f}}\n"
                                         "label: Metadata_moa\noutput: o\n")
    assert load_train_config(tmp_path / "train.yaml")[0]["data"]["source"] == "bbbc021-6moa"
    cfg = validate_config({"data": {"source": "bbbc021", "path": "d", "plates": ["Week1_22123"],
                                    "only_present": True}, "output": "o"})
    assert cfg["data"]["plates"] == ["Week1_22123"] and cfg["data"]["only_present"] is True
    assert "data.plates" in _problems({"data": {"source": "bbbc021", "path": "d",
                                                "plates": 3}, "output": "o"})[0]
