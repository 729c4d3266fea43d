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
    assert cfg.features.model == "tf_efficientnet_lite0"
    assert cfg.features.num_workers == 0  # default filled in
    assert cfg.output == str(tmp_path / ".")
    assert cfg.data.path == str(tmp_path / "synthetic_screen")


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
        "data.source: 'ftp' is not one of ['synthetic', 'bbbc021', 'bbbc021-6moa', 'csv', "
        "'loaddata', 'ome-zarr', 'index']"
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
    assert cfg.data.source == "bbbc021-6moa"
    assert cfg.profiles.normalization.method is None  # decided from the controls
    (tmp_path / "train.yaml").write_text(f"data: {{source: {spelling}, path: f}}\n"
                                         "label: Metadata_moa\noutput: o\n")
    assert load_train_config(tmp_path / "train.yaml")[0].data.source == "bbbc021-6moa"
    cfg = validate_config({"data": {"source": "bbbc021", "path": "d", "plates": ["Week1_22123"],
                                    "only_present": True}, "output": "o"})
    assert cfg.data.plates == ["Week1_22123"] and cfg.data.only_present is True
    assert "data.plates" in _problems({"data": {"source": "bbbc021", "path": "d",
                                                "plates": 3}, "output": "o"})[0]


def test_training_configs_are_typed_sections_with_dotted_errors(tmp_path):
    from morphoprof.config import load_train_config, load_weak_config
    from morphoprof.models.settings import MilSection, TrainSection, WeakTrainSection

    (tmp_path / "t.yaml").write_text("data: {source: synthetic}\nmil: {pooling: max, "
                                     "cache: maps}\ntrain: {epochs: 2}\noutput: o\n")
    cfg, _ = load_train_config(tmp_path / "t.yaml", "mil")
    assert isinstance(cfg.mil, MilSection) and cfg.mil.pooling == "max"
    assert cfg.mil.cache == str(tmp_path / "maps") and cfg.output == str(tmp_path / "o")
    assert (cfg.train.epochs, cfg.train.batch_size) == (2, TrainSection().batch_size)
    (tmp_path / "bad.yaml").write_text(
        "data: {source: synthetic}\nmil: {dropout: 1.5, a: -2, pooling: avg, plan: [[8, 1, 2]]}\n"
        "train: {epochs: 0, devices: 2}\ncv: {aggregate: max}\noutput: o\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(tmp_path / "bad.yaml", "mil")
    problems = err.value.problems
    assert "mil.dropout: must be < 1.0, got 1.5" in problems
    assert "mil.a: must be > 0.0, got -2" in problems  # a Noisy-AND slope turned round
    assert any(p.startswith("mil.pooling: 'avg' is not one of ['max',") for p in problems)
    assert "mil.plan[0]: expected at most 2 item(s), got 3" in problems
    assert "train.epochs: must be >= 1, got 0" in problems
    assert any(p.startswith("cv.aggregate: ") and "'max'" in p for p in problems)
    assert not any(p.startswith("train.devices") for p in problems)  # an integer or a name
    # a weak config: its own defaults for the shared train section, values of any scalar type
    (tmp_path / "w.yaml").write_text("data: {source: crops, path: c.npz, table: c.csv}\n"
                                     "holdout: {column: Metadata_replicate, values: [3]}\n"
                                     "output: o\n")
    weak, _ = load_weak_config(tmp_path / "w.yaml")
    assert isinstance(weak.train, WeakTrainSection) and weak.train.batch_size == 64
    assert weak.holdout.values == [3] and weak.data.table == str(tmp_path / "c.csv")
    (tmp_path / "w.yaml").write_text("data: {source: crops, path: c.npz}\noutput: o\n")
    with pytest.raises(ConfigError, match="data.table: required for source 'crops'"):
        load_weak_config(tmp_path / "w.yaml")


def test_the_readme_training_examples_are_valid_configs():
    import re
    from pathlib import Path

    import yaml

    from morphoprof.models.settings import TrainConfig, WeakConfig
    from morphoprof.settings import validate_section

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    kinds = {"finetune": 0, "mil": 0, "weak": 0}
    for block in blocks:
        if not isinstance(block, dict) or "label" not in block:
            continue  # not a training config
        kind = "weak" if "weak" in block else "mil" if "mil" in block else "finetune"
        problems: list[str] = []
        validate_section(WeakConfig if kind == "weak" else TrainConfig, block, "", problems)
        assert problems == [], f"README {kind} example: {problems}"
        kinds[kind] += 1
    assert all(kinds.values()), kinds


def test_knn_k_below_one_is_refused_up_front(tmp_path, capsys):
    """k of the extra k-NN runs: 0 or less was accepted and wrote 'k must be >= 1' into
    evaluation.json, unseen; now the config and the command line refuse it, naming the item."""
    from morphoprof.cli import main
    from tests.test_evaluation_evaluate import make_wells

    make_wells().to_parquet(tmp_path / "w.parquet")
    assert _problems({"data": {"source": "synthetic"}, "evaluation": {"k": [3, 0]},
                      "output": "o"}) == ["evaluation.k[1]: must be > 0, got 0"]
    assert main(["evaluate", str(tmp_path / "w.parquet"), "--out", str(tmp_path / "e.json"),
                 "--k", "-1"]) == 2
    assert "--k[0]: must be > 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
