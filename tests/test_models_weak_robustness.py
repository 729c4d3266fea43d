"""The weak-supervision recipe is not tuned to one crop set: a crop array of a different shape
(over a hundred treatments, unbalanced: 1 to 14 cells, one or two wells each; 40-px crops) trains
with the default recipe and scores through the CLI (extract --crops, aggregate with cell TVN,
evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import yaml

from morphoprof.cli import main

N_TREATMENTS, S = 110, 40


def unbalanced_screen(seed: int = 0):
    """110 treatments of 22 compounds (5 doses each) and 4 MoAs; MoA m puts a bright blob in
    channel m % 3, MoA 3 a ring; cells per treatment drawn from a long-tailed distribution."""
    rng = np.random.default_rng(seed)
    crops, rows = [], []
    yy, xx = np.mgrid[:S, :S]
    for t in range(N_TREATMENTS):
        compound, dose = divmod(t, 5)
        moa = compound % 4
        n = int(min(14, rng.zipf(1.6)))  # many treatments with 1-3 cells, a few with 14
        wells = 1 + int(n > 4)
        for k in range(n):
            x = rng.gamma(2.0, 40.0, (3, S, S))
            cy, cx = rng.uniform(14, S - 14, 2)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            ch = moa % 3
            if moa < 3:
                x[ch] += 900 * np.exp(-r2 / (2 * (4 + dose) ** 2))
            else:
                x[ch] += 900 * np.exp(-((np.sqrt(r2) - 8) ** 2) / 4)
            crops.append(x.astype(np.uint16))
            rows.append({"plate": f"P{t % 3}", "well": f"W{t:03d}_{k % wells}",
                         "compound": f"cmpd{compound}", "concentration": float(dose + 1),
                         "moa": f"moa{moa}"})
    return np.stack(crops), pd.DataFrame(rows)


def test_unbalanced_crop_set_with_over_100_treatments_trains_and_scores(tmp_path, capsys):
    crops, table = unbalanced_screen()
    counts = table.groupby(["compound", "concentration"]).size()
    assert len(counts) == N_TREATMENTS and counts.min() == 1 and counts.max() >= 10
    np.savez(tmp_path / "crops.npz", crops=crops)
    table.assign(crop=np.arange(len(table))).to_csv(tmp_path / "cells.csv", index=False)
    # the default recipe; only the epochs are cut (2 of the default 10) to keep the test short
    (tmp_path / "weak.yaml").write_text(yaml.safe_dump({
        "data": {"source": "crops", "path": "crops.npz", "table": "cells.csv"},
        "train": {"epochs": 2, "accelerator": "cpu"}, "output": "run"}))
    assert main(["train", "weak", str(tmp_path / "weak.yaml"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "weak" / "weak.json").read_text())
    assert len(summary["classes"]) == N_TREATMENTS, summary
    assert summary["cells"]["train"] + summary["cells"]["val"] == len(table)
    capsys.readouterr()

    assert main(["extract", "--crops", str(tmp_path / "crops.npz"), "--crop-table",
                 str(tmp_path / "cells.csv"), "--checkpoint", summary["checkpoint"],
                 "--out", str(tmp_path / "feats")]) == 0
    assert json.loads(capsys.readouterr().out)["cells"] == len(table)
    assert main(["aggregate", str(tmp_path / "feats"), "--out", str(tmp_path / "prof"),
                 "--normalize", "none", "--cell-tvn", "all"]) == 0
    assert main(["evaluate", str(tmp_path / "prof" / "wells.parquet"), "--out",
                 str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["nsc"]["n"] == N_TREATMENTS
    # 4 MoAs, so chance is about 1/4; two epochs of the default recipe already beat it clearly
    assert result["nsc"]["accuracy"] >= 0.5, result["nsc"]
