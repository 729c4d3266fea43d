"""Kraus et al. (2016), Fig. 3: MIL on cluttered hand-written digits, every pooling.

Canvases from the 10,000 real MNIST digits in ../shared/data/mnist/mnist_10k.npz
(morphoprof.datasets.cluttered_digits, Kraus's settings): 512x512 px, 100 digits each; a
canvas of class d (1..9) holds 10*d digits d and 100 - 10*d zeros as distractors; 50 training
and 10 test canvases per class, drawn from disjoint digits. Only canvas labels are used.

Network: offline ImageNet EfficientNet-Lite0 (first convolution summed to one channel) cut at
feature stage 3, frozen (its 32x32 maps of every canvas computed once and cached), and the MIL
head (1x1xHIDDEN + ReLU + 50% dropout, 1x1x9 sigmoid maps, pooling, FC) trained for EPOCHS
epochs per pooling. Writes the test error per pooling and, for Noisy-AND, overlays of the
predicted class's map on test canvases (PNG under results/mil_digits/, git-ignored: MNIST
images).

    python benchmarks/mil_digits.py [--only=POOLING,...]  # writes results/mil_digits.json
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from morphoprof.machine import describe_machine
from morphoprof.models.mil import POOLINGS as MIL_POOLINGS

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "mnist" / "mnist_10k.npz"
RESULTS = HERE / "results" / "mil_digits.json"
WORK = Path(tempfile.gettempdir()) / "morphoprof_bench" / "mil_digits"
POOLINGS = ("noisy_and", *(p for p in MIL_POOLINGS if p != "noisy_and"))  # Noisy-AND first
EPOCHS = 30
LR = 1e-2  # head-only training on cached maps: at 1e-3 Noisy-AND underfits (23% test error)
HIDDEN = 256  # the head's 1x1 layer (Kraus: 1000; 4x the CPU time on 32x32 maps)


def overlay(path: Path, canvas: np.ndarray, cmap: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    axes[0].imshow(canvas, cmap="gray")
    axes[0].set_title(title)
    axes[1].imshow(canvas, cmap="gray")
    axes[1].imshow(cmap, cmap="inferno", alpha=0.55, extent=(0, canvas.shape[1],
                                                             canvas.shape[0], 0))
    axes[1].set_title("class map p_ij of the predicted class")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    import torch

    from morphoprof.datasets.cluttered_digits import DigitsConfig, cluttered_digits, load_digits_npz
    from morphoprof.io_utils import write_json
    from morphoprof.models.mil import MILConfig, MILHead, TimmTrunk
    from morphoprof.models.mil_cache import (
        CachedMapDataset,
        cache_key,
        cached_trunk_maps,
        trunk_maps,
    )
    from morphoprof.models.settings import TrainSection
    from morphoprof.models.training import ImageClassifier, fit, predict_proba

    if not DATA.is_file():
        print(f"skipped: real data not found at {DATA}")
        return 0
    digits, labels = load_digits_npz(DATA)
    dcfg = DigitsConfig(seed=0)
    t0 = time.perf_counter()
    canvases, table = cluttered_digits(digits, labels, dcfg)
    gen_seconds = time.perf_counter() - t0
    classes = sorted(table["Metadata_label"].unique(), key=int)
    y = table["Metadata_label"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    train = np.flatnonzero(table["Metadata_split"] == "train")
    test = np.flatnonzero(table["Metadata_split"] == "test")
    print(f"{len(train)} training and {len(test)} test canvases of {dcfg.size} px "
          f"({gen_seconds:.0f} s)", flush=True)

    base = MILConfig(n_classes=len(classes), in_chans=1, trunk="tf_efficientnet_lite0", stage=3,
                     weights="offline", hidden=HIDDEN, dropout=0.5)
    trunk = TimmTrunk(base)
    for p in trunk.parameters():
        p.requires_grad_(False)
    key = cache_key({"trunk": trunk.name, "stage": trunk.stage, "weights": trunk.source},
                    canvases, trunk.mean, trunk.std, 1)
    t0 = time.perf_counter()
    maps = cached_trunk_maps(WORK / "trunk_maps", key, lambda: trunk_maps(
        trunk, canvases, trunk.mean, trunk.std, transforms=1, batch_size=8))
    cache_seconds = time.perf_counter() - t0

    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")),
                None)
    errors, seconds, runs = {}, {}, {}
    for pooling in [p for p in POOLINGS if only is None or p in only]:
        cfg = base.replace(pooling=pooling)
        torch.manual_seed(0)
        module = ImageClassifier(MILHead(cfg, trunk.out_channels), lr=LR)
        fit_cfg = TrainSection(epochs=EPOCHS, batch_size=16, seed=0, accelerator="cpu")
        folder = WORK / pooling
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        info = fit(module, CachedMapDataset(maps, train, y[train], train=True), folder,
                   fit_cfg)
        probs = predict_proba(module, CachedMapDataset(maps, test, y[test]), batch_size=16)
        pred = probs.argmax(1)
        errors[pooling] = float((pred != y[test]).mean())
        seconds[pooling] = float(info["seconds"])
        per_class = {c: float((pred[y[test] == k] != k).mean()) for k, c in enumerate(classes)}
        runs[pooling] = {"test_error": errors[pooling], "per_class_error": per_class,
                         "wrong": int((pred != y[test]).sum()), "n_test": int(len(test)),
                         "train_seconds": seconds[pooling]}
        print(f"{pooling:10s} test error {errors[pooling]:.3f} "
              f"({runs[pooling]['wrong']}/{len(test)} wrong), train {seconds[pooling]:.0f} s",
              flush=True)
        if pooling == "noisy_and":
            module.eval()
            with torch.no_grad():
                for k in range(0, len(test), 30):  # one canvas of every third class
                    i = test[k]
                    out = module(torch.from_numpy(np.asarray(maps[i], np.float32)))
                    c = int(out["logits"].argmax(1)[0])
                    overlay(HERE / "results" / "mil_digits" / f"canvas_{i}.png",
                            canvases[i, 0], out["maps"][0, c].numpy(),
                            f"class {classes[y[i]]} ({table['Metadata_count'][i]} digits "
                            f"{classes[y[i]]}, {table['Metadata_zeros'][i]} zeros)")

    write_json(RESULTS, {
        "dataset": f"{os.path.relpath(DATA, HERE.parent)} (10,000 real MNIST digits)",
        "canvases": {"size": dcfg.size, "digits_per_canvas": dcfg.n_digits,
                     "class_d_holds": "10*d digits d, the rest zeros",
                     "train": int(len(train)), "test": int(len(test)), "seed": dcfg.seed},
        "network": "tf_efficientnet_lite0 (offline ImageNet, 1-channel first conv) stage 3 "
                   f"frozen; MIL head 1x1x{HIDDEN} + 50% dropout, 1x1x9 sigmoid maps, pooling, "
                   f"FC; lr {LR}",
        "lr": LR,
        "epochs": EPOCHS, "test_error": errors, "train_seconds": seconds,
        "trunk_cache_seconds": cache_seconds, "runs": runs, "machine": describe_machine(),
    })
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
