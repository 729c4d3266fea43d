"""Multiple-instance learning (Kraus 2016) on the real BBBC021 6-MoA fields: every pooling of
the paper side by side under compound-held-out cross-validation, on a pretrained trunk, plus
the paper's own network trained from scratch.

Reads ../shared/data/bbbc021/fields_6moa (660 fields of 256 px, 18 compounds, 55 treatments,
6 MoAs); same folds as finetune_6moa.py (3 folds; every compound of a test fold is absent from
training). Field labels only.

- Pretrained trunk: offline ImageNet EfficientNet-Lite0 cut at feature stage 3 (112 channels,
  stride 16: a 16x16 map per 256-px field), frozen. Its maps of every field under the 8
  rotations / reflections are computed once and cached (shared by all poolings); each pooling
  then trains only the MIL head (1x1 conv HIDDEN + ReLU + 50% dropout, 1x1 conv 6 sigmoid maps,
  pooling, FC) for EPOCHS epochs on random 14x14 crops of the maps (224 px of the field);
  noisy_and_hidden1000 repeats Noisy-AND with Kraus's 1000 hidden units;
  noisy_and_last_stage trains the trunk's last stage (blocks.4) with the head, on the cached
  maps of that stage's input (``mil.unfreeze_last_stage``), in channels-last memory (1.2x fp32
  NCHW in train_precision.py; bf16 is slower there).
- ``kraus`` trunk: the paper's network layer for layer, random init, trained end to end on
  224-px random crops with flips / rotations for KRAUS_EPOCHS epochs, in bf16 on the CPU's
  bf16 units and channels-last memory (kraus_train_settings; 2.4-2.6x fp32 on an AMX Xeon in
  train_precision.py).
- A treatment's MoA: the median over its wells of the well-mean probabilities (Kraus).

Fold 0's Noisy-AND model writes Jacobian-map overlays (PNG, git-ignored: images of real data).
Jacobian masks (``jacobian_by_trunk``; Noisy-AND's also as ``jacobian_iou_vs_otsu``) of each
fold's network on every 5th of its held-out fields, vs the Otsu foreground of the stains and of
DAPI: the contrast-sensitive MRF (``contrast_mrf_*``, the headline), the plain Potts MRF
(``mrf_*``, ``_potts``) and Otsu alone (``threshold_*``); the same networks seeded from their
trunk's whole output (``trunk_seed_contrast_vs_cells``); and on the complete raw 3-channel
fields at 1/5 scale (``raw_fields_one_fifth``; its ``prepared_as_6moa``: the same fields
prepared as the 6-MoA PNGs were, Anscombe and DMSO standardisation). ``mask_selection``: each
fold's model picks the contrast MRF's settings (of SELECT_GRID) on every SELECT_EVERY-th field
of the compounds it was trained on (its held-out fields take no part);
``contrast_mrf_selected_vs_cells`` scores its held-out fields with them.

    python benchmarks/mil_6moa.py [--resume] [--no-kraus] [--only=NAME,...]

NAME: a pooling, noisy_and_hidden1000, noisy_and_last_stage or kraus.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from morphoprof.machine import describe_machine
from morphoprof.models.jacobian import mask_rule
from morphoprof.models.mil import POOLINGS as MIL_POOLINGS

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "mil_6moa.json"
WORK = Path(tempfile.gettempdir()) / "morphoprof_bench" / "mil_6moa"
POOLINGS = ("noisy_and", *(p for p in MIL_POOLINGS if p != "noisy_and"))  # Noisy-AND first
EPOCHS = 80
KRAUS_EPOCHS = 64  # 40 gave 37/55 (training loss still falling), 64 stays inside 20 min
HIDDEN = 256  # the head's 1x1 layer on the pretrained trunk (Kraus's 1000: 4x the CPU time)
# extra runs: Noisy-AND with Kraus's 1000 hidden units; Noisy-AND with the trunk's last stage
# (blocks.4) trained too, on cached maps of its input; the kraus trunk (its conv6 is 1000)
VARIANTS = ("noisy_and_hidden1000", "noisy_and_last_stage", "kraus")
WIDE = ("noisy_and_hidden1000", "kraus")  # 1000 hidden units
JACOBIAN_RULE = mask_rule()
# the contrast-sensitive MRF's settings each fold's model chooses among, on fields of the
# compounds it was trained on (every SELECT_EVERY-th): (Potts, power, sigma)
SELECT_GRID = [(lam, power, sigma) for lam in (4, 8, 16) for power in (0.0625, 0.125, 0.25)
               for sigma in (1.0, 1.5)]
SELECT_EVERY = 10
OLD_RULE = ("before 2026-12-04: guided backprop with ReLU6's exact derivative (0 above 6); the "
            "raw map, Gaussian sigma 1; Otsu threshold / MRF Potts 2.0")

CONFIG = """\
data: {{source: bbbc021_6moa, path: {data}}}
label: Metadata_moa
images: {{size: 256, normalization: none, scale: 255, augment: true, crop: 224}}
mil: {{trunk: {trunk}, stage: 3, weights: {weights}, frozen: {frozen}, cache: {cache},
      unfreeze_last_stage: {last}, pooling: {pooling}, r: 5.0, a: 10.0, hidden: {hidden},
      dropout: 0.5, jacobian_images: {jacobian}}}
train: {{epochs: {epochs}, batch_size: 16, lr: 0.001, seed: 0, accelerator: cpu,
        recalibrate_bn: false{fast}}}
cv: {{group: Metadata_compound, folds: 3, aggregate: median, alpha: 0.1}}
"""
# recalibrate_bn: the committed runs predate batch-norm recalibration (on by default since
# 2026-12-06), so the config keeps them reproducible. It changes only the runs whose trained
# layers hold batch norm (kraus, noisy_and_last_stage; the heads on a frozen trunk have none),
# which were measured on an AMX Xeon and take ~35 min there; not re-measured with it yet.


def kraus_train_settings() -> str:
    """Kraus's network trains end to end in channels-last memory, and in bf16 where the CPU has
    bf16 units (AMX / AVX512-BF16: 2.4-2.6x fp32's images/s on this project's Xeon; emulated bf16
    elsewhere would be slower, so fp32 there)."""
    from train_precision import cpu_bf16_units

    return "channels_last: true" + (", precision: bf16-mixed" if cpu_bf16_units() else "")


def config(name: str) -> str:
    """The training config of a run: a pooling name, or one of :data:`VARIANTS`."""
    kraus, last = name == "kraus", name == "noisy_and_last_stage"
    pooling = name if name in POOLINGS else "noisy_and"
    return CONFIG.format(
        data=DATA, trunk="kraus" if kraus else "tf_efficientnet_lite0",
        weights="random" if kraus else "offline", frozen="false" if kraus else "true",
        cache=WORK / ("last_stage_input_maps" if last else "trunk_maps"),
        last="true" if last else "false", pooling=pooling,
        hidden=1000 if name in WIDE else HIDDEN,
        jacobian=4 if name in ("noisy_and", "noisy_and_last_stage") else 0,
        epochs=KRAUS_EPOCHS if kraus else EPOCHS,
        fast=",\n       " + (kraus_train_settings() if kraus else "channels_last: true")
        if kraus or last else "")


def run(name: str, text: str, resume: bool):
    from morphoprof.train import train_from_yaml

    return train_from_yaml("mil", text, WORK / name, fresh=not resume)


def jacobian_scores(name: str = "noisy_and", every: int = 5) -> dict:
    """Mean IU of run ``name``'s Noisy-AND models' Jacobian masks (each field under the fold
    model that never saw its compound; every ``every``-th held-out field) against the Otsu
    foreground of the summed stains (cells) and of the DAPI channel (nuclei)."""
    import numpy as np

    from morphoprof.config import load_train_config
    from morphoprof.io_utils import read_parquet
    from morphoprof.models.jacobian import (
        field_maps,
        jacobian_mask,
        mean_iu,
        mrf_mask,
        otsu_foreground,
    )
    from morphoprof.models.run import training_images, training_index
    from morphoprof.train import load_trained_mil

    folder = WORK / name
    cfg, _ = load_train_config(folder / "train_mil.yaml", "mil")
    index = training_index(cfg, folder)
    images = training_images(cfg, index)
    fold_of = read_parquet(folder / "mil" / "predictions.parquet")["Metadata_fold"].to_numpy()
    scores: dict[str, list[float]] = {k: [] for k in (
        "mrf_vs_cells", "threshold_vs_cells", "mrf_vs_nuclei", "threshold_vs_nuclei",
        "contrast_mrf_vs_cells", "contrast_mrf_vs_nuclei", "trunk_seed_contrast_vs_cells",
        "contrast_mrf_selected_vs_cells")}
    dapi = 2  # fields_6moa PNGs: R = actin, G = tubulin, B = DAPI
    selection = {}
    for f in sorted(set(fold_of.tolist())):
        net, mean, std = load_trained_mil(folder, f)
        rows = np.flatnonzero(fold_of == f)[::every]
        (lam, power, sigma), selection[f"fold_{f}"] = select_mask_settings(
            net, mean, std, images, np.flatnonzero(fold_of != f)[::SELECT_EVERY])
        jm = field_maps(net, images[rows], mean, std)
        # the same network seeded from its trunk's whole output (no head): what the head's
        # choice of features does to the masks
        trunk_seeded = field_maps(net, images[rows], mean, std, seed="trunk")
        for j, jt, i in zip(jm, trunk_seeded, rows):
            cells, nuclei = otsu_foreground(images[i]), otsu_foreground(images[i], [dapi])
            mrf, plain = mrf_mask(j), jacobian_mask(j)
            contrast = mrf_mask(j, image=images[i])
            scores["contrast_mrf_vs_cells"].append(mean_iu(contrast, cells))
            scores["contrast_mrf_selected_vs_cells"].append(mean_iu(
                mrf_mask(j, lam, sigma, power=power, image=images[i]), cells))
            scores["contrast_mrf_vs_nuclei"].append(mean_iu(contrast, nuclei))
            scores["trunk_seed_contrast_vs_cells"].append(
                mean_iu(mrf_mask(jt, image=images[i]), cells))
            scores["mrf_vs_cells"].append(mean_iu(mrf, cells))
            scores["threshold_vs_cells"].append(mean_iu(plain, cells))
            scores["mrf_vs_nuclei"].append(mean_iu(mrf, nuclei))
            scores["threshold_vs_nuclei"].append(mean_iu(plain, nuclei))
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["n_fields"] = len(scores["mrf_vs_cells"])
    out["mask_selection"] = selection
    out["raw_fields_one_fifth"] = raw_field_scores(folder, sorted(set(fold_of.tolist())),
                                                   images)
    out["rule"] = JACOBIAN_RULE
    out["cells"] = cell_scores(name, images, fold_of, index.table, every)
    return out


def select_mask_settings(net, mean, std, images, rows) -> tuple[tuple, dict]:
    """The contrast-sensitive MRF's settings (of :data:`SELECT_GRID`) with the best mean IU vs
    the Otsu foreground of the stains on fields ``rows`` (of compounds the fold's ``net`` was
    trained on), and the record of the choice: the chosen ``(Potts, power, sigma)``, its
    score, the default's score and the number of fields."""
    from morphoprof.models.jacobian import (
        MASK_SIGMA,
        MRF_CONTRAST_POWER,
        MRF_CONTRAST_SMOOTHNESS,
        field_maps,
        mean_iu,
        mrf_mask,
        otsu_foreground,
    )

    totals = dict.fromkeys(SELECT_GRID, 0.0)
    for j, i in zip(field_maps(net, images[rows], mean, std), rows):
        ref = otsu_foreground(images[i])
        for lam, power, sigma in SELECT_GRID:
            totals[lam, power, sigma] += mean_iu(
                mrf_mask(j, lam, sigma, power=power, image=images[i]), ref) / len(rows)
    best = max(totals, key=totals.get)
    default = (MRF_CONTRAST_SMOOTHNESS, MRF_CONTRAST_POWER, MASK_SIGMA)
    return best, {"chosen": {"potts": best[0], "power": best[1], "sigma": best[2]},
                  "chosen_train_iou": totals[best], "default_train_iou": totals.get(default),
                  "n_train_fields": len(rows)}


def raw_field_scores(folder: Path, folds: list[int], fields_6moa) -> dict:
    """Each fold's network on the complete raw 3-channel BBBC021 fields shrunk to 1/5 (the
    6-MoA fields' scale), each stain scaled by its 99.9th percentile
    (``jacobian_sanity.percentile_scaled``) and, under ``prepared_as_6moa``, prepared as the 6-MoA
    PNGs were (``jacobian_sanity.as_6moa``, on the scale of ``fields_6moa``, the 6-MoA fields
    as read): mean IU of the contrast-sensitive and the Potts MRF masks vs the Otsu foreground
    of the summed stains of the image the network saw; for the prepared fields also vs that
    of the percentile-scaled image (the same pixels, another reference)."""
    import numpy as np

    from jacobian_sanity import as_6moa, one_fifth, percentile_scaled, raw_counts
    from morphoprof.models.jacobian import field_maps, mean_iu, mrf_mask, otsu_foreground
    from morphoprof.train import load_trained_mil

    counts = raw_counts()
    if counts is None:
        return {"note": "raw 3-channel fields not found"}
    small = one_fifth(percentile_scaled(counts))
    prepared = one_fifth(as_6moa(counts, fields_6moa))
    preparations = {name: (fields, [otsu_foreground(im) for im in fields])
                    for name, fields in (("percentile", small), ("as_6moa", prepared))}
    scaled_refs = preparations["percentile"][1]
    scores: dict[str, list[float]] = {}
    for f in folds:
        net, mean, std = load_trained_mil(folder, f)
        for name, (fields, refs) in preparations.items():
            for j, im, ref, scaled_ref in zip(field_maps(net, fields, mean, std), fields, refs,
                                              scaled_refs):
                mask = mrf_mask(j, image=im)
                scores.setdefault(f"{name}_contrast", []).append(mean_iu(mask, ref))
                scores.setdefault(f"{name}_potts", []).append(mean_iu(mrf_mask(j), ref))
                scores.setdefault(f"{name}_contrast_vs_scaled", []).append(
                    mean_iu(mask, scaled_ref))
    mean_of = {k: float(np.mean(v)) for k, v in scores.items()}
    return {"contrast_mrf_vs_cells": mean_of["percentile_contrast"],
            "mrf_vs_cells": mean_of["percentile_potts"], "n_fields": len(counts),
            "n_scores": len(scores["percentile_contrast"]), "size": list(small.shape[-2:]),
            "prepared_as_6moa": {
                "contrast_mrf_vs_cells": mean_of["as_6moa_contrast"],
                "mrf_vs_cells": mean_of["as_6moa_potts"],
                "contrast_mrf_vs_cells_of_percentile_image":
                    mean_of["as_6moa_contrast_vs_scaled"]}}


def cell_scores(name: str, images, fold_of, table, every: int, crop: int = 32,
                context: tuple[int, ...] = (48, 64)) -> dict:
    """Kraus Table 2: each fold's Noisy-AND network applied to ``crop``-px windows around the
    nuclei segmented (morphoprof's own segmentation, on DAPI) in its held-out fields; a cell's
    class is the argmax of the MIL pooling output; accuracy against the field's MoA.

    ``by_crop_px``: the same cells in wider windows (``context``: more of their neighbours), and
    ``field_maps_at_nuclei``: the whole field's class maps read at each nucleus (the map cell it
    falls in; a stride-16 map cell is 16 px of the field, but its receptive field is far wider).
    """
    import numpy as np
    import torch
    from scipy.ndimage import center_of_mass

    from morphoprof.preprocess.segmentation import NucleiConfig, segment_nuclei
    from morphoprof.train import load_trained_mil

    classes = sorted(table["Metadata_moa"].astype(str).unique())
    y = table["Metadata_moa"].astype(str).map({c: k for k, c in enumerate(classes)}).to_numpy()
    # 256-px fields are 1280x1024 fields shrunk ~4-5x: nuclei of ~3-4 px radius
    ncfg = NucleiConfig(smoothing=0.5, min_area=6, max_area=400, min_distance=2)
    sizes = (crop, *context)
    right = dict.fromkeys(sizes, 0)
    in_field = total = fields = 0
    for f in sorted(set(fold_of.tolist())):
        net, mean, std = load_trained_mil(WORK / name, f)
        m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        s = torch.tensor(std, dtype=torch.float32)[:, None, None]
        for i in np.flatnonzero(fold_of == f)[::every]:
            labels = segment_nuclei(images[i, 2], ncfg)
            n = int(labels.max())
            if n == 0:
                continue
            centres = np.round(center_of_mass(labels > 0, labels, range(1, n + 1))).astype(int)
            for size in sizes:
                h = size // 2
                padded = np.pad(images[i], ((0, 0), (h, h), (h, h)), mode="reflect")
                crops = np.stack([padded[:, r:r + size, c:c + size] for r, c in centres])
                with torch.no_grad():
                    pooled = net((torch.from_numpy(crops) - m) / s)["pooled"]
                right[size] += int((pooled.argmax(1).numpy() == y[i]).sum())
            with torch.no_grad():
                maps = net((torch.from_numpy(images[i][None]) - m) / s)["maps"][0].numpy()
            at = (centres * np.array(maps.shape[1:]) // np.array(images[i].shape[1:])).T
            in_field += int((maps[:, at[0], at[1]].argmax(0) == y[i]).sum())
            total += n
            fields += 1
    return {"cell_accuracy": right[crop] / total if total else None, "n_cells": total,
            "n_fields": fields, "crop_px": crop, "chance": 1 / len(classes),
            "by_crop_px": {str(k): v / total if total else None for k, v in right.items()},
            "field_maps_at_nuclei": in_field / total if total else None}


def main() -> int:
    from morphoprof.io_utils import write_json

    if "--show-config" in sys.argv:
        print(config("noisy_and"))
        print(config("kraus"))
        return 0
    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    resume = "--resume" in sys.argv
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")),
                None)
    names = [p for p in (*POOLINGS, *VARIANTS) if only is None or p in only]
    if "--no-kraus" in sys.argv and "kraus" in names:
        names.remove("kraus")
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    runs = dict(old.get("runs", {})) if only else {}
    trunks = dict(old.get("trunks", {})) if only else {}
    for name in names:
        res = run(name, config(name), resume)
        r = runs[name] = res.summary()
        trunks[name] = res.trunk
        overlays = res.jacobian_overlays or ()
        if overlays:
            r["jacobian_overlays"] = len(overlays)
            shutil.rmtree(HERE / "results" / "mil_jacobian", ignore_errors=True)
            shutil.copytree(Path(overlays[0]).parent, HERE / "results" / "mil_jacobian")
        print(f"{name:10s} {r['treatment_counts']} treatments, image acc "
              f"{r['image_accuracy']:.3f}, train {r['train_seconds']:.0f} s "
              f"(+ trunk maps {res.trunk.get('cache_seconds', 0):.0f} s)", flush=True)
    jacs = dict(old.get("jacobian_by_trunk", {})) if only else {}
    for name in ("noisy_and", "noisy_and_hidden1000", "noisy_and_last_stage", "kraus"):
        if name in runs and (name in names or name not in jacs):
            j = jacs[name] = jacobian_scores(name)
            print(f"{name}: Jacobian masks mean IU (contrast-sensitive MRF) "
                  f"{j['contrast_mrf_vs_cells']:.3f} vs the Otsu foreground of the stains, "
                  f"{j['contrast_mrf_vs_nuclei']:.3f} vs Otsu nuclei; Potts MRF "
                  f"{j['mrf_vs_cells']:.3f} / {j['mrf_vs_nuclei']:.3f} "
                  f"({j['n_fields']} held-out fields); cell accuracy "
                  f"{j['cells']['cell_accuracy']:.3f}; raw fields at 1/5: "
                  f"{j['raw_fields_one_fifth'].get('contrast_mrf_vs_cells')}", flush=True)
    for j in jacs.values():  # scored by an earlier version of the mask pipeline
        j.setdefault("rule", OLD_RULE)
    jac = jacs.get("noisy_and")
    cache = next((t.get("cache_compute_seconds") for t in trunks.values() if t.get("frozen")
                  and t.get("cache_compute_seconds")), None)
    if cache is None:  # maps cached before computed.json was written: the first run's time
        cache = old.get("trunk_cache_seconds") or next(
            (t.get("cache_seconds") for t in trunks.values() if t.get("frozen")), None)
    out = {
        "dataset": os.path.relpath(DATA, HERE.parent), "image_size": 256, "train_crop": 224,
        "folds": 3,
        "cv": "compound-grouped, stratified by MoA (as finetune_6moa.py)",
        "epochs": {"pretrained_head": EPOCHS, "kraus": KRAUS_EPOCHS},
        "kraus_train": kraus_train_settings(),
        "network": {"pretrained": f"tf_efficientnet_lite0 (offline ImageNet) stage 3, frozen; "
                    f"MIL head 1x1x{HIDDEN} (noisy_and_hidden1000: 1x1x1000) + 50% dropout, "
                    "1x1x6 sigmoid maps, pooling, FC",
                    "kraus": "Kraus 2016 Fig. 1 from scratch (ave_pool0, conv1-5 with "
                    "pools and 20% dropout, conv6 1x1x1000 50% dropout, conv7 1x1x6)"},
        "treatment_aggregation": "median over wells of well means",
        "hidden": {n: (1000 if n in WIDE else HIDDEN) for n in runs},
        "treatment_accuracy": {p: r["treatment_accuracy"] for p, r in runs.items()},
        "treatment_counts": {p: r["treatment_counts"] for p, r in runs.items()},
        "image_accuracy": {p: r["image_accuracy"] for p, r in runs.items()},
        "conformal_coverage": {p: r["conformal"]["coverage"] for p, r in runs.items()},
        "train_seconds_per_pooling": {p: r["train_seconds"] for p, r in runs.items()},
        "trunk_cache_seconds": cache,
        "jacobian_iou_vs_otsu": jac.get("contrast_mrf_vs_cells") if jac else None,
        "jacobian_iou_vs_otsu_nuclei": jac.get("contrast_mrf_vs_nuclei") if jac else None,
        "jacobian_iou_vs_otsu_potts": jac["mrf_vs_cells"] if jac else None,
        "jacobian_iou_vs_otsu_nuclei_potts": jac["mrf_vs_nuclei"] if jac else None,
        "cell_accuracy": jac["cells"]["cell_accuracy"] if jac else None,
        "jacobian_by_trunk": jacs,
        "jacobian_method": (
            "guided backprop from P_i * p_ij of the predicted class (eq. 4), channel sum, "
            f"then each trunk's own 'rule' in jacobian_by_trunk (now: {JACOBIAN_RULE}; the "
            "MRF a graph cut, PyMaxflow); jacobian_iou_vs_otsu: the contrast-sensitive MRF "
            "(pairwise weights from the field's own edges), _potts: the plain Potts MRF; "
            "trunk_seed_contrast_vs_cells: the same networks seeded from the trunk's whole "
            "output instead of eq. 4 (no head); "
            "reference: Otsu foreground of the summed stains (cells) / of DAPI (nuclei); mean "
            "IU of foreground and background; cells: 32-px crops around nuclei segmented on "
            "DAPI, class = argmax of the MIL pooling output"),
        "time_split": "trunk maps computed once for all poolings (trunk_cache_seconds; "
                      "8 transforms x 660 fields), then head-only training per pooling "
                      "(train_seconds_per_pooling, 3 folds)",
        "trunks": trunks, "runs": runs, "machine": describe_machine(),
    }
    write_json(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
