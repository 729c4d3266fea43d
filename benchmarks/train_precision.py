"""How fast ``train mil`` / ``train finetune`` train a network end to end on this CPU, by memory
format and precision: images/s of ``fit()`` (the trainers' Lightning loop) for Kraus's network
(the ``kraus`` trunk, 1000 hidden units, Noisy-AND) on random 224-px crops of real 6-MoA fields.

Settings, one after the other in one process (the same images, seed and batches):
fp32 NCHW (the default), fp32 channels-last (``train.channels_last: true``), and bf16-mixed
channels-last (``train.precision: bf16-mixed``; only where the CPU has bf16 units, AMX or
AVX512-BF16, since emulated bf16 would measure nothing a user wants). Each runs EPOCHS epochs
and reports images/s over all of them, and its loss after them (the same run in another format
ends near the same loss).

    python benchmarks/train_precision.py   # writes benchmarks/results/train_precision.json
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "train_precision.json"
N_IMAGES = 192
EPOCHS = 2
BATCH = 16


def load_fields(n: int):
    """The first ``n`` 6-MoA fields (every k-th, across plates) as ``(n, 3, 256, 256)`` float32 in
    [0, 1] and their MoA indices."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    table = pd.read_csv(DATA / "labels.csv", sep=";", index_col=0)
    rows = table.iloc[:: max(1, len(table) // n)][:n]
    classes = sorted(table["moa"].unique())
    x = np.stack([np.asarray(Image.open(DATA / "images" / f"bbbc021v1_{i}.png"),
                             dtype=np.float32).transpose(2, 0, 1) / 255 for i in rows.index])
    y = rows["moa"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    return x, y, len(classes)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's word for it."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    import pandas as pd
    import torch

    from morphoprof.io_utils import write_json
    from morphoprof.models.data import ImageTensorDataset
    from morphoprof.models.mil import MILConfig, MILNet
    from morphoprof.models.settings import TrainSection
    from morphoprof.models.training import ImageClassifier, fit

    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    x, y, k = load_fields(N_IMAGES)
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    native = any(getattr(torch.cpu, f, lambda: False)() for f in (
        "_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    settings = [("fp32", "32-true", False), ("fp32_channels_last", "32-true", True)]
    if native:
        settings.append(("bf16_channels_last", "bf16-mixed", True))
    runs = {}
    for name, precision, cl in settings:
        torch.manual_seed(0)
        net = MILNet(MILConfig(n_classes=k, trunk="kraus", hidden=1000, pooling="noisy_and"))
        module = ImageClassifier(net, lr=1e-3)
        data = ImageTensorDataset(x, y, augment=True, crop=224, mean=mean, std=std)
        cfg = TrainSection(epochs=EPOCHS, batch_size=BATCH, lr=1e-3, seed=0,
                           accelerator="cpu", precision=precision, channels_last=cl)
        with tempfile.TemporaryDirectory() as d:
            info = fit(module, data, d, cfg)
            loss = float(pd.read_csv(info["metrics_csv"])["train_loss"].dropna().iloc[-1])
        n = info["train_batches_per_epoch"] * BATCH * EPOCHS
        runs[name] = {"images_per_s": n / info["seconds"], "seconds": info["seconds"],
                      "images": n, "precision": precision, "channels_last": cl,
                      "final_train_loss": loss}
        print(f"{name:20s} {runs[name]['images_per_s']:6.1f} images/s, loss {loss:.3f}",
              flush=True)
    base = runs["fp32"]["images_per_s"]
    out = {
        "network": "kraus trunk + 1x1x1000 head (50% dropout) + Noisy-AND + FC, from scratch",
        "images": f"{N_IMAGES} real 6-MoA fields, random 224-px crops of 256 px, flips / turns",
        "batch_size": BATCH, "epochs": EPOCHS, "threads": torch.get_num_threads(),
        "cpu_bf16_units": native, "runs": runs,
        "speedup_vs_fp32": {n: r["images_per_s"] / base for n, r in runs.items()},
        "hardware": {"cpu": cpu_name(), "torch": torch.__version__},
    }
    write_json(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
