"""Multiple-instance learning (Kraus 2016) on the real BBBC021 6-MoA fields: pooling functions
side by side under compound-held-out cross-validation.

Reads ../shared/data/bbbc021/fields_6moa (660 fields, 18 compounds, 55 treatments, 6 MoAs). For
each pooling (Noisy-AND, max, mean, LSE) a fully convolutional MIL network is trained from
scratch with field labels only (3 folds; every compound of a test fold is absent from training);
a treatment's MoA is the mean of its fields' probabilities. Fold 0's Noisy-AND model also writes
Jacobian-map overlays (PNG, git-ignored: images of real data).

CPU budget (2 cores): fields resized from 256 to SIZE px, EPOCHS epochs per fold, and a
128-unit 1x1 layer instead of Kraus's 1000.

    python benchmarks/mil_6moa.py [--resume]   # writes benchmarks/results/mil_6moa.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "mil_6moa.json"
WORK = Path(tempfile.gettempdir()) / "morphoprof_bench" / "mil_6moa"
POOLINGS = ("noisy_and", "max", "mean", "lse")
EPOCHS = 6
SIZE = 96

CONFIG = """\
data: {{source: bbbc021_6moa, path: {data}}}
label: Metadata_moa
images: {{size: {size}, normalization: none, scale: 255, augment: true}}
mil: {{pooling: {pooling}, r: 5.0, a: 10.0, hidden: 128, jacobian_images: {jacobian}}}
train: {{epochs: {epochs}, batch_size: 16, lr: 0.001, seed: 0, accelerator: cpu}}
cv: {{group: Metadata_compound, folds: 3, aggregate: mean, alpha: 0.1}}
"""


def run(pooling: str, resume: bool) -> dict:
    from morphoprof.models.run import train_from_yaml

    text = CONFIG.format(data=DATA, size=SIZE, pooling=pooling, epochs=EPOCHS,
                         jacobian=4 if pooling == "noisy_and" else 0)
    return train_from_yaml("mil", text, WORK / pooling, fresh=not resume)


def main() -> int:
    from morphoprof.io_utils import write_json
    from morphoprof.models.crossval import cv_summary

    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    resume = "--resume" in sys.argv
    runs = {}
    for pooling in POOLINGS:
        res = run(pooling, resume)
        runs[pooling] = cv_summary(res)
        overlays = res.get("jacobian_overlays", [])
        if overlays:
            runs[pooling]["jacobian_overlays"] = len(overlays)
            shutil.rmtree(HERE / "results" / "mil_jacobian", ignore_errors=True)
            shutil.copytree(Path(overlays[0]).parent, HERE / "results" / "mil_jacobian")
        r = runs[pooling]
        print(f"{pooling:10s} {r['treatment_counts']} treatments, image acc "
              f"{r['image_accuracy']:.3f}, {r['train_seconds']:.0f} s", flush=True)
    transfer = HERE / "results" / "transfer_6moa.json"
    nsc = json.loads(transfer.read_text())["nsc"] if transfer.is_file() else None
    out = {
        "dataset": str(DATA), "image_size": SIZE, "epochs": EPOCHS, "folds": 3,
        "cv": "compound-grouped, stratified by MoA", "network": "MILNet default plan "
        "(7 valid 3x3 convs, receptive field 45 px), 1x1 hidden 128, 1x1 class maps",
        "treatment_accuracy": {p: r["treatment_accuracy"] for p, r in runs.items()},
        "image_accuracy": {p: r["image_accuracy"] for p, r in runs.items()},
        "conformal_coverage": {p: r["conformal"]["coverage"] for p, r in runs.items()},
        "train_seconds": sum(r["train_seconds"] for r in runs.values()),
        "train_seconds_per_pooling": {p: r["train_seconds"] for p, r in runs.items()},
        "transfer_nsc_same_set": nsc,
        "runs": runs, "hardware": "2 CPU cores",
    }
    write_json(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
