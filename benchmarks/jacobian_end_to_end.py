"""Does a trunk trained end to end draw better Jacobian masks? A probe of issue 15's miss.

``mil_6moa.py`` trains the Noisy-AND head on a frozen ImageNet EfficientNet-Lite0 trunk; when
this probe was written its Jacobian masks scored mean IU ~0.58 against the Otsu foreground (goal
0.70; 0.74 since the contrast-sensitive MRF), and ``jacobian_sanity.py`` shows the maps come from
the frozen trunk. Kraus trained his network end to end, so the open question was whether
training the trunk on the screen moves the maps towards the cells.

This takes fold 0's trained Noisy-AND network of ``mil_6moa.py`` (its run folder under the temp
directory: run ``python benchmarks/mil_6moa.py --only=noisy_and`` first), unfreezes the whole
trunk and goes on training it with the head on fold 0's training fields, by the trainer ``train
mil`` uses (``ImageClassifier`` + ``fit``: the joint MIL loss, Adam, random 224-px crops, flips
and quarter turns), for EPOCHS epochs at each of LRS. After every epoch it scores, on fold 0's
held-out fields (its compounds never seen): the Jacobian masks as ``mil_6moa.py`` makes them
(guided backprop from eq. 4's seed, the mask defaults of ``morphoprof.models.jacobian``; mean IU
vs the Otsu foreground of the summed stains, every EVERY-th field) and the image accuracy (all
held-out fields).

A head-free restart of the same network (``mil.frozen: false`` from a random head) stayed at
chance for 14 epochs on 2 CPU cores (Noisy-AND's pooled outputs sink to 0 before the FC layer
learns), so the probe starts from the trained head.

    python benchmarks/jacobian_end_to_end.py   # writes benchmarks/results/jacobian_end_to_end.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RUN = Path(tempfile.gettempdir()) / "morphoprof_bench" / "mil_6moa" / "noisy_and"
RESULTS = HERE / "results" / "jacobian_end_to_end.json"
FOLD = 0
EPOCHS = 4
LRS = (1e-4, 1e-3)
EVERY = 2
CROP = 224


def score(net, images, labels, rows, mean, std) -> dict:
    """Jacobian-mask mean IU (every EVERY-th of ``rows``; the contrast-sensitive MRF mask, and
    the plain Potts one as ``_potts``) and image accuracy (all ``rows``)."""
    import torch

    from morphoprof.models.jacobian import field_maps, mean_iu, mrf_mask, otsu_foreground

    ius, contrast, right = [], [], 0
    sub = rows[::EVERY]
    for j, i in zip(field_maps(net, images[sub], mean, std), sub):
        ref = otsu_foreground(images[i])
        ius.append(mean_iu(mrf_mask(j), ref))
        contrast.append(mean_iu(mrf_mask(j, image=images[i]), ref))
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    net.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = rows[start:start + 32]
            logits = net((torch.from_numpy(images[batch]) - m) / s)["logits"]
            right += int((logits.argmax(1).numpy() == labels[batch]).sum())
    return {"jacobian_iou_vs_otsu": float(np.mean(contrast)),
            "jacobian_iou_vs_otsu_potts": float(np.mean(ius)), "n_fields_jacobian": len(ius),
            "image_accuracy": right / len(rows), "n_fields": len(rows)}


def fine_tune(images, labels, train, test, lr: float, work: Path, seed: int = 0) -> list[dict]:
    """Fold FOLD's trained network, whole trunk unfrozen, trained EPOCHS more epochs at ``lr``
    by the project's own trainer (``ImageClassifier`` + ``fit``, extended one epoch at a time
    from its last checkpoint in ``work``); the scores before and after each epoch."""
    from morphoprof.models.data import ImageTensorDataset
    from morphoprof.models.settings import TrainSection
    from morphoprof.models.training import ImageClassifier, fit
    from morphoprof.train import load_trained_mil

    net, mean, std = load_trained_mil(RUN, FOLD)
    steps = [{"epoch": 0, **score(net, images, labels, test, mean, std)}]
    for p in net.parameters():
        p.requires_grad_(True)
    module = ImageClassifier(net, lr=lr)
    data = ImageTensorDataset(images[train], labels[train], augment=True, crop=CROP,
                              mean=mean, std=std)
    for epoch in range(1, EPOCHS + 1):
        run = fit(module, data, work, TrainSection(epochs=epoch, batch_size=16, lr=lr,
                                                   seed=seed, accelerator="cpu"))
        steps.append({"epoch": epoch, "train_seconds": run["seconds"],
                      **score(net, images, labels, test, mean, std)})
        print(f"lr {lr:g} epoch {epoch}: {steps[-1]}", flush=True)
    return steps


def main() -> int:
    from morphoprof.config import load_train_config
    from morphoprof.io_utils import read_parquet, write_json
    from morphoprof.models.jacobian import mask_rule
    from morphoprof.models.run import training_images, training_index

    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    if not (RUN / "mil" / "predictions.parquet").is_file():
        print(f"skipped: no trained Noisy-AND run at {RUN}; run "
              "python benchmarks/mil_6moa.py --only=noisy_and first")
        return 0
    t0 = time.perf_counter()
    cfg, _ = load_train_config(RUN / "train_mil.yaml", "mil")
    images = training_images(cfg, training_index(cfg, RUN))
    pred = read_parquet(RUN / "mil" / "predictions.parquet")
    classes = [c[2:] for c in pred.columns if c.startswith("p_")]  # the model's class order
    labels = pred["Metadata_moa"].astype(str).map({c: k for k, c in enumerate(classes)}
                                                  ).to_numpy()
    fold_of = pred["Metadata_fold"].to_numpy()
    test, train = np.flatnonzero(fold_of == FOLD), np.flatnonzero(fold_of != FOLD)
    with tempfile.TemporaryDirectory() as work:
        runs = {f"lr_{lr:g}": fine_tune(images, labels, train, test, lr, Path(work) / f"{lr:g}")
                for lr in LRS}
    write_json(RESULTS, {
        "start": f"{RUN.name} fold {FOLD} of mil_6moa.py (frozen Lite0 stage 3 + trained "
                 "Noisy-AND head)",
        "fine_tuning": f"whole trunk + head, {EPOCHS} epochs by the project's trainer "
                       f"(ImageClassifier + fit: Adam, batch 16, random {CROP}-px crops, "
                       "flips, quarter turns, batch norm in training mode)",
        "scored_on": f"fold {FOLD}'s held-out fields ({len(test)}; Jacobian on every "
                     f"{EVERY}th)",
        "jacobian_rule": f"as mil_6moa.py, of the predicted class: "
                         f"{mask_rule()} (jacobian_iou_vs_otsu: the contrast-sensitive MRF "
                         "mask; _potts: the Potts one); mean IU vs the Otsu foreground of "
                         "the summed stains",
        "runs": runs, "seconds": time.perf_counter() - t0, "machine": describe_machine()})
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
