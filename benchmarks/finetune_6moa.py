"""Fine-tuned pretrained CNN (Kensert 2019) on the real BBBC021 6-MoA fields, compound-held-out.

Reads ../shared/data/bbbc021/fields_6moa (660 fields, 18 compounds, 55 treatments, 6 MoAs) and
runs 3-fold cross-validation in which every compound of a test fold is absent from training.
EfficientNet-Lite0 with offline ImageNet weights gets a new 6-way head and is trained end to end
(Adam, flips and 90-degree rotations); the same settings from random initialisation are the
control. A treatment's prediction is the mean of its fields' probabilities; conformal sets are
calibrated on the out-of-fold scores of the other compounds.

CPU budget (2 cores): fields are resized from 256 to 128 px and each fold trains for EPOCHS
epochs (Kensert trained full-size images for many more epochs on a GPU).

    python benchmarks/finetune_6moa.py [--resume]   # writes benchmarks/results/finetune_6moa.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "finetune_6moa.json"
WORK = Path(tempfile.gettempdir()) / "morphoprof_bench" / "finetune_6moa"
EPOCHS = 8
SIZE = 128

CONFIG = """\
data: {{source: bbbc021_6moa, path: {data}}}
label: Metadata_moa
images: {{size: {size}, normalization: none, scale: 255, augment: true}}
model: {{name: tf_efficientnet_lite0, weights: {weights}, drop_rate: 0.2}}
train: {{epochs: {epochs}, batch_size: 16, lr: 0.0002, seed: 0, accelerator: cpu}}
cv: {{group: Metadata_compound, folds: 3, aggregate: mean, alpha: 0.1}}
"""


def run(weights: str, resume: bool):
    from morphoprof.train import train_from_yaml

    text = CONFIG.format(data=DATA, size=SIZE, weights=weights, epochs=EPOCHS)
    return train_from_yaml("finetune", text, WORK / weights, fresh=not resume)


def main() -> int:
    from morphoprof.io_utils import write_json

    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    resume = "--resume" in sys.argv
    pre = run("offline", resume).summary()
    print(f"pretrained: {pre['treatment_counts']} treatments, image acc "
          f"{pre['image_accuracy']:.3f}, {pre['train_seconds']:.0f} s", flush=True)
    rnd = run("random", resume).summary()
    print(f"random init: {rnd['treatment_counts']} treatments, image acc "
          f"{rnd['image_accuracy']:.3f}, {rnd['train_seconds']:.0f} s", flush=True)
    transfer = HERE / "results" / "transfer_6moa.json"
    nsc = json.loads(transfer.read_text())["nsc"] if transfer.is_file() else None
    out = {
        "dataset": os.path.relpath(DATA, HERE.parent), "model": "tf_efficientnet_lite0",
        "image_size": SIZE,
        "epochs": EPOCHS, "folds": 3, "cv": "compound-grouped, stratified by MoA",
        "treatment_accuracy": pre["treatment_accuracy"],
        "treatment_accuracy_random_init": rnd["treatment_accuracy"],
        "train_seconds": pre["train_seconds"],
        "train_seconds_random_init": rnd["train_seconds"],
        "conformal_coverage": pre["conformal"]["coverage"],
        "conformal_mean_set_size": pre["conformal"]["mean_set_size"],
        "transfer_nsc_same_set": nsc,
        "pretrained": pre, "random_init": rnd,
        "machine": describe_machine(),
    }
    write_json(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
