"""How fast ``train mil`` / ``train finetune`` train on this CPU, by memory format and precision:
images/s of ``fit()`` (the trainers' Lightning loop) for Kraus's network (the ``kraus`` trunk,
1000 hidden units, Noisy-AND) on random 224-px crops of real 6-MoA fields, for
EfficientNet-Lite0's last stage + the MIL head on the cached maps of that stage's input
(``mil.unfreeze_last_stage``: small maps, depthwise convolutions), and for the whole
EfficientNet-Lite0 fine-tuned on 128-px fields as ``finetune_6moa.py`` trains it (Kensert).

Settings, one after the other in one process (the same images, seed and batches):
fp32 NCHW (the default), fp32 channels-last (``train.channels_last: true``), and bf16-mixed
channels-last (``train.precision: bf16-mixed``; only where the CPU has bf16 units, AMX or
AVX512-BF16, since emulated bf16 would measure nothing a user wants). Each runs EPOCHS epochs
and reports images/s over all of them, and its loss after them (the same run in another format
ends near the same loss).

    python benchmarks/train_precision.py   # writes benchmarks/results/train_precision.json
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "train_precision.json"
N_IMAGES = 192
EPOCHS = 2
BATCH = 16
FINETUNE_SIZE = 128  # finetune_6moa.py's field size


def load_fields(n: int, size: int = 256):
    """``n`` 6-MoA fields (every k-th row of the imported index) as ``(n, 3, size, size)``
    float32 in [0, 1], read by the project's importer, and their MoA indices and class count."""
    from morphoprof.index import import_fields_6moa
    from morphoprof.models.data import load_images

    index = import_fields_6moa(DATA)
    rows = np.arange(0, len(index), max(1, len(index) // n))[:n]
    moa = index.table["Metadata_moa"].astype(str)
    classes = sorted(moa.unique())
    y = moa.map({c: k for k, c in enumerate(classes)}).to_numpy()[rows]
    return load_images(index, rows, size=size, normalization="none", scale=255), y, len(classes)


def cpu_bf16_units() -> bool:
    """Whether the CPU has bf16 units (AMX or AVX512-BF16), where bf16-mixed training is native
    rather than emulated."""
    import torch

    return any(getattr(torch.cpu, f, lambda: False)() for f in (
        "_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def networks(fields: np.ndarray, small: np.ndarray, y: np.ndarray, k: int) -> dict:
    """``{name: (make_module, dataset, what)}``: Kraus's network on 224-px crops of the fields,
    Lite0's last stage + MIL head on the cached maps of that stage's input (14x14 crops of
    the 16x16 maps, as ``mil.unfreeze_last_stage`` trains), and the whole Lite0 with a new
    head on the ``small`` (128-px) copies of the fields, as ``train finetune`` trains it."""
    import torch

    from morphoprof.models.data import ImageTensorDataset
    from morphoprof.models.finetune import FineTuneConfig, finetune_module
    from morphoprof.models.mil import LastStageHead, MILConfig, MILHead, MILNet, TimmTrunk
    from morphoprof.models.training import ImageClassifier

    mean, std = fields.mean((0, 2, 3)), fields.std((0, 2, 3))

    def kraus():
        net = MILNet(MILConfig(n_classes=k, trunk="kraus", hidden=1000, pooling="noisy_and"))
        return ImageClassifier(net, lr=1e-3)

    lite = MILConfig(n_classes=k, trunk="tf_efficientnet_lite0", stage=3, weights="auto",
                     hidden=256, pooling="noisy_and")
    trunk = TimmTrunk(lite)
    m = torch.tensor(trunk.mean)[:, None, None]
    s = torch.tensor(trunk.std)[:, None, None]
    with torch.no_grad():
        maps = torch.cat([trunk.forward_prefix((torch.from_numpy(b) - m) / s)
                          for b in np.array_split(fields, max(1, len(fields) // 32))])

    def last_stage():
        head = MILHead(lite, trunk.out_channels)
        return ImageClassifier(LastStageHead(copy.deepcopy(trunk.last_stage), head), lr=1e-3)

    ft = FineTuneConfig(name="tf_efficientnet_lite0", weights="offline", drop_rate=0.2,
                        lr=2e-4)
    ft_mean, ft_std = finetune_module(ft, k)[1:]

    def finetune():
        return finetune_module(ft, k)[0]

    return {
        "kraus": (kraus, ImageTensorDataset(fields, y, augment=True, crop=224, mean=mean,
                                            std=std),
                  "kraus trunk + 1x1x1000 head (50% dropout) + Noisy-AND + FC, from scratch, "
                  "on random 224-px crops of the 256-px fields, flips / turns"),
        "lite0_last_stage": (last_stage, ImageTensorDataset(maps.numpy(), y, augment=True,
                                                            crop=maps.shape[-1] - 2),
                             "EfficientNet-Lite0's last stage (blocks.4, ImageNet) + 1x1x256 "
                             "head + Noisy-AND + FC on random 14x14 crops of the fields' "
                             f"{tuple(maps.shape[1:])} stage-input maps"),
        "lite0_finetune": (finetune, ImageTensorDataset(small, y, augment=True, mean=ft_mean,
                                                        std=ft_std),
                           "EfficientNet-Lite0 (ImageNet) with a new 6-way head, trained end "
                           f"to end on the fields at {small.shape[-1]} px, flips / turns (as "
                           "finetune_6moa.py)"),
    }


def main() -> int:
    import pandas as pd
    import torch

    from morphoprof.io_utils import write_json
    from morphoprof.models.settings import TrainSection
    from morphoprof.models.training import fit

    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    x, y, k = load_fields(N_IMAGES)
    small = load_fields(N_IMAGES, FINETUNE_SIZE)[0]
    native = cpu_bf16_units()
    settings = [("fp32", "32-true", False), ("fp32_channels_last", "32-true", True)]
    if native:
        settings.append(("bf16_channels_last", "bf16-mixed", True))
    out = {"images": f"{N_IMAGES} real 6-MoA fields", "batch_size": BATCH, "epochs": EPOCHS,
           "threads": torch.get_num_threads(), "cpu_bf16_units": native, "networks": {},
           "machine": describe_machine(), "torch": torch.__version__}
    for net_name, (make, data, what) in networks(x, small, y, k).items():
        runs = {}
        for name, precision, cl in settings:
            torch.manual_seed(0)
            module = make()
            cfg = TrainSection(epochs=EPOCHS, batch_size=BATCH, lr=1e-3, seed=0,
                               accelerator="cpu", precision=precision, channels_last=cl)
            with tempfile.TemporaryDirectory() as d:
                info = fit(module, data, d, cfg)
                loss = float(pd.read_csv(info["metrics_csv"])["train_loss"].dropna().iloc[-1])
            n = info["train_batches_per_epoch"] * BATCH * EPOCHS
            runs[name] = {"images_per_s": n / info["seconds"], "seconds": info["seconds"],
                          "images": n, "precision": precision, "channels_last": cl,
                          "final_train_loss": loss}
            print(f"{net_name:17s} {name:19s} {runs[name]['images_per_s']:7.1f} images/s, "
                  f"loss {loss:.3f}", flush=True)
        base = runs["fp32"]["images_per_s"]
        out["networks"][net_name] = {
            "network": what, "runs": runs,
            "speedup_vs_fp32": {n: r["images_per_s"] / base for n, r in runs.items()}}
    write_json(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
