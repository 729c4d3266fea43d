"""``morphoprof train``: a BBBC014-style two-class translocation task from a config alone, the
compound-held-out CV outputs on the synthetic screen, and bad input named clearly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from morphoprof.cli import main
from morphoprof.features.backbones import create_backbone
from morphoprof.models.crossval import group_conformal, treatment_probabilities


def translocation_screen(folder, n_wells: int = 8, sites: int = 3, size: int = 48) -> None:
    """BBBC014-like: a DNA stain, and a reporter that is nuclear in the positive control and
    cytoplasmic in the negative control. PNG per channel, a plain CSV listing them."""
    rng = np.random.default_rng(0)
    rows = []
    yy, xx = np.mgrid[:size, :size]
    for w in range(n_wells):
        positive = w % 2 == 0
        for s in range(sites):
            dna = np.zeros((size, size))
            rep = np.zeros((size, size))
            for _ in range(4):
                cy, cx = rng.uniform(8, size - 8, 2)
                r = np.hypot(yy - cy, xx - cx)
                nucleus, cell = r < 4, (r >= 4) & (r < 8)
                dna[nucleus] = 200
                rep[nucleus if positive else cell] = 150
            for name, arr in (("dna", dna), ("rep", rep)):
                arr = np.clip(arr + rng.normal(20, 5, arr.shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"w{w}_s{s}_{name}.png")
            rows.append({"plate": "P1", "well": f"A{w:02d}", "site": s + 1,
                         "treatment": "TNFa" if positive else "neg",
                         "dna": f"w{w}_s{s}_dna.png", "reporter": f"w{w}_s{s}_rep.png"})
    pd.DataFrame(rows).to_csv(folder / "plates.csv", index=False)


CONFIG_2CLASS = """\
data:
  source: csv
  path: plates.csv
  columns: {plate: plate, well: well, site: site, compound: treatment}
  channel_columns: {DNA: dna, Reporter: reporter}
label: Metadata_compound          # positive vs negative control
images: {size: 48, normalization: none, scale: 255}
model: {name: tf_efficientnet_lite0, weights: offline}   # ImageNet, first conv adapted
train: {epochs: 4, batch_size: 4, lr: 0.001, seed: 0}
cv: {group: Metadata_well, folds: 2, treatment: [Metadata_plate, Metadata_well]}
output: out
"""


def test_two_class_translocation_from_a_config_alone(tmp_path, capsys):
    translocation_screen(tmp_path)
    (tmp_path / "train.yaml").write_text(CONFIG_2CLASS)
    assert main(["train", "finetune", str(tmp_path / "train.yaml"), "--quiet"]) == 0
    res = json.loads((tmp_path / "out" / "finetune" / "cv.json").read_text())
    assert res["classes"] == ["TNFa", "neg"]
    assert res["treatment"]["n"] == 8 and res["treatment"]["accuracy"] >= 0.875
    assert res["image_accuracy"] >= 0.8
    preds = pd.read_parquet(tmp_path / "out" / "finetune" / "predictions.parquet")
    for f in (0, 1):  # wells held out whole
        test_wells = set(preds.loc[preds["Metadata_fold"] == f, "Metadata_well"])
        assert test_wells.isdisjoint(preds.loc[preds["Metadata_fold"] != f, "Metadata_well"])
    assert "treatment accuracy" in capsys.readouterr().out
    # the images were read into finetune/images.npy for the run, and deleted after it
    assert not list((tmp_path / "out" / "finetune").glob("images.npy*"))
    # Each fold keeps the network that made its predictions: the trained weights, with batch-norm
    # statistics recomputed over its training images (the running averages of 4 short epochs
    # still hold ImageNet's)
    for f in (0, 1):
        fold = tmp_path / "out" / "finetune" / f"fold{f}"
        model = torch.load(fold / "model.ckpt", weights_only=False)["state_dict"]
        last = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        assert model.keys() == last.keys()
        stats = [k for k in model if k.endswith(("running_mean", "running_var"))]
        assert len(stats) == 2 * json.loads((fold / "fit.json").read_text())[
            "recalibrated_bn_layers"] > 0
        assert all(torch.equal(model[k], last[k]) for k in model
                   if k not in stats and not k.endswith("num_batches_tracked"))
        assert not any(torch.allclose(model[k], last[k]) for k in stats)
    # ... and loads as the transfer extractor's weights (the head left behind)
    backbone = create_backbone("tf_efficientnet_lite0", str(fold / "model.ckpt"), in_chans=2)
    own = backbone.model.state_dict()
    assert all(torch.equal(own[k.removeprefix("net.")], model[k]) for k in stats)
    # A re-run reuses the finished folds (resume) and gives the same numbers.
    assert main(["train", "finetune", str(tmp_path / "train.yaml"), "--quiet"]) == 0
    again = json.loads((tmp_path / "out" / "finetune" / "cv.json").read_text())
    assert again["treatment"] == res["treatment"]
    # Other settings would have reported the finished folds as theirs: refused, naming them
    capsys.readouterr()
    assert main(["train", "finetune", str(tmp_path / "train.yaml"), "--quiet",
                 "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "finetune holds a training with other settings (train.epochs: 4 -> 5)" in err
    assert "--overwrite" in err and err.count("\n") == 1
    # the same settings on other images (a field left out) are other settings too
    table = pd.read_csv(tmp_path / "plates.csv")
    table.iloc[1:].to_csv(tmp_path / "plates.csv", index=False)
    assert main(["train", "finetune", str(tmp_path / "train.yaml"), "--quiet"]) == 2
    assert "other settings (index: '" in capsys.readouterr().err


def test_mil_on_the_synthetic_screen_with_compound_held_out(tmp_path, tiny_screen):
    folder, _ = tiny_screen
    (tmp_path / "mil.yaml").write_text(f"""\
data: {{source: index, path: {folder / 'index.parquet'}}}
select: {{Metadata_control: ['False']}}
images: {{size: 64, normalization: percentile}}
mil: {{trunk: plan, pooling: noisy_and, hidden: 16, plan: [[8, 1], [16, 2], [16, 1]],
      jacobian_images: 2}}
train: {{epochs: 2, batch_size: 8, lr: 0.003}}
cv: {{folds: 2, alpha: 0.2}}
output: out
""")
    assert main(["train", "mil", str(tmp_path / "mil.yaml"), "--quiet"]) == 0
    res = json.loads((tmp_path / "out" / "mil" / "cv.json").read_text())
    assert len(res["classes"]) == 3 and res["treatment"]["n"] == 6
    preds = pd.read_parquet(tmp_path / "out" / "mil" / "predictions.parquet")
    by_fold = preds.groupby("Metadata_compound")["Metadata_fold"].nunique()
    assert (by_fold == 1).all()  # a compound is tested in one fold only, never trained on
    probs = preds.filter(like="p_").to_numpy()
    assert np.allclose(probs.sum(1), 1.0)
    assert set(res["conformal"]) >= {"coverage", "mean_set_size", "target_coverage"}
    pngs = res["jacobian_overlays"]
    assert len(pngs) == 2 and all(open(p, "rb").read(4) == b"\x89PNG" for p in pngs)
    assert not list((tmp_path / "out" / "mil").glob("images.npy*"))


def test_treatment_probabilities_mean_and_median():
    meta = pd.DataFrame({"Metadata_compound": ["a"] * 4 + ["b"] * 2,
                         "Metadata_plate": ["P"] * 6,
                         "Metadata_well": ["w1", "w1", "w2", "w3", "w4", "w4"]})
    probs = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.2, 0.8], [0.4, 0.6]], float)
    keys, p = treatment_probabilities(meta, probs, ["Metadata_compound"], "mean")
    assert list(keys["Metadata_compound"]) == ["a", "b"]
    np.testing.assert_allclose(p, [[0.75, 0.25], [0.3, 0.7]])
    _, pm = treatment_probabilities(meta, probs, ["Metadata_compound"], "median")
    # wells of a: w1 (0.5, 0.5), w2 (1, 0), w3 (1, 0) -> median (1, 0)
    np.testing.assert_allclose(pm, [[1.0, 0.0], [0.3, 0.7]])
    # a treatment that is a well (control-only screens): the median of one well mean
    keys, pw = treatment_probabilities(meta, probs, ["Metadata_plate", "Metadata_well"],
                                       "median")
    assert list(keys["Metadata_well"]) == ["w1", "w2", "w3", "w4"]
    np.testing.assert_allclose(pw[0], [0.5, 0.5])


def test_group_conformal_covers_held_out_groups():
    rng = np.random.default_rng(0)
    covs = []
    for _ in range(20):
        n, k = 300, 4
        true = rng.integers(0, k, n)
        logits = rng.normal(0, 1, (n, k))
        logits[np.arange(n), true] += 1.0  # a mediocre classifier
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        groups = rng.integers(0, 30, n)
        sets = group_conformal(probs, true, groups, alpha=0.1)
        covs.append(sets[np.arange(n), true].mean())
        assert sets.sum(1).mean() < k  # informative: not every label every time
    assert np.mean(covs) == pytest.approx(0.9, abs=0.03)


def test_bad_input_is_named(tmp_path, capsys):
    translocation_screen(tmp_path, n_wells=4, sites=1)
    cfg = tmp_path / "t.yaml"
    # A class with a single compound cannot be held out.
    cfg.write_text(CONFIG_2CLASS.replace("group: Metadata_well", "group: Metadata_compound"))
    assert main(["train", "finetune", str(cfg), "--quiet"]) == 2
    assert "single 'Metadata_compound'" in capsys.readouterr().err
    # A section only the other trainer reads is an error, not silently ignored.
    assert main(["train", "mil", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model: not used by train mil" in err and "mil.trunk" in err
    cfg.write_text(CONFIG_2CLASS + "mil: {pooling: max}\n")
    assert main(["train", "finetune", str(cfg), "--quiet"]) == 2
    assert "mil: not used by train finetune" in capsys.readouterr().err
    mil_2class = CONFIG_2CLASS.replace(
        "model: {name: tf_efficientnet_lite0, weights: offline}   # ImageNet, first conv adapted",
        "mil: {trunk: plan}")
    cfg.write_text(mil_2class.replace("mil: {trunk: plan}", "mil: {plan: [[8, 1]]}"))
    assert main(["train", "mil", str(cfg), "--quiet"]) == 2
    assert "mil.plan: only used with mil.trunk: plan" in capsys.readouterr().err
    # Images smaller than the MIL network's receptive field (45 px by default).
    cfg.write_text(mil_2class.replace("size: 48", "size: 32"))
    assert main(["train", "mil", str(cfg), "--quiet"]) == 2
    assert "receptive field" in capsys.readouterr().err
    # A label file that does not match the images: a listed file is missing.
    table = pd.read_csv(tmp_path / "plates.csv")
    table.loc[2, "dna"] = "missing.png"
    table.to_csv(tmp_path / "plates.csv", index=False)
    cfg.write_text(CONFIG_2CLASS)
    assert main(["train", "finetune", str(cfg), "--quiet"]) == 2
    assert "missing.png" in capsys.readouterr().err
    # A label column that is not there, and a typo in the config.
    cfg.write_text(CONFIG_2CLASS.replace("label: Metadata_compound", "label: Metadata_moa2"))
    translocation_screen(tmp_path, n_wells=4, sites=1)
    assert main(["train", "finetune", str(cfg), "--quiet"]) == 2
    assert "Metadata_moa2" in capsys.readouterr().err
    cfg.write_text(CONFIG_2CLASS.replace("epochs: 4", "epoch: 4"))
    assert main(["train", "finetune", str(cfg), "--quiet"]) == 2
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in capsys.readouterr().err
