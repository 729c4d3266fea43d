"""Weakly supervised single-cell embeddings (Caicedo 2018) on real BBBC021 crops.

Reads ../shared/data/bbbc021/single_cells (7,774 raw uint16 crops, 68 px, DAPI + 2 stains;
DMSO, and cycloheximide at 5 / 15 / 50 uM; 14 wells on 6 Week4 plates). A ResNet18 is trained
from scratch on the 4 treatment labels (per-crop max rescaling, flips / rotations / shifts,
mixup alpha 0.2 across plates, GRU regularizer over 3/5/8-cell sequences across plates) on
replicates 1-2; replicate 3's wells (2 DMSO wells, one well per dose) are held out.

Reported:
- held-out single-cell accuracy (4 classes) vs chance, and per class;
- on well profiles (mean of cells, standardised against the DMSO wells): the mAP of retrieving a
  treated well's replicate wells against DMSO wells (copairs, :func:`activity_map`), and whether
  dose is ordered along the DMSO -> 50 uM axis (Spearman rho of dose vs projection). Every well
  is used, so the training wells are in it; the same mAP on held-out *fields* (replicate 3
  only: sites of a well vs held-out DMSO sites) is the leak-free check;
- the same for ImageNet transfer features of the same crops (EfficientNet-Lite0, offline
  weights, each stain as greyscale, 96 px), plus a class-balanced logistic-regression probe on
  them trained on the same cells (the transfer baseline's held-out accuracy). The test set is
  two-thirds DMSO, so the balanced accuracy (mean over the 4 classes) is the fair comparison;
- training cells/s and extraction cells/s on this machine, and extraction relative to the
  transfer extractor measured in the same process.

    python benchmarks/weak_single_cells.py     # writes benchmarks/results/weak_single_cells.json
    python benchmarks/weak_single_cells.py --resume   # keeps / reuses the trained model in
                                                      # /tmp/morphoprof_bench/weak_single_cells
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "single_cells"
RESULTS = HERE / "results" / "weak_single_cells.json"
EPOCHS = 6
DOSE = "Metadata_concentration"

CONFIG = """
data: {{source: crops, path: {npz}, table: {csv}}}
channels: [DAPI, stain1, stain2]
label: [Metadata_compound, Metadata_concentration]
cells: {{normalization: max}}
holdout: {{column: Metadata_replicate, values: [3], val_fraction: 0.0}}
model: {{name: resnet18, weights: random}}
weak: {{mixup_alpha: 0.2, gru: true, lengths: [3, 5, 8], shift: 4, cells_per_epoch: {per}}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.001, seed: 0, patience: 0, accelerator: cpu}}
features: {{batch_size: 128}}
"""


def standardise(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Features z-scored against the DMSO rows (all plates together)."""
    ctrl = df["Metadata_control"].astype(bool).to_numpy()
    x = df[cols].to_numpy(np.float64)
    mu, sd = x[ctrl].mean(0), x[ctrl].std(0)
    keep = sd > 1e-8
    out = df.drop(columns=cols).reset_index(drop=True)
    z = (x[:, keep] - mu[keep]) / sd[keep]
    return pd.concat([out, pd.DataFrame(z, columns=[c for c, k in zip(cols, keep) if k])],
                     axis=1)


def profile_metrics(cells: pd.DataFrame, cols: list[str]) -> dict:
    """Well-level activity mAP and dose ordering; held-out field-level activity mAP."""
    from scipy.stats import spearmanr

    from morphoprof.evaluation.retrieval import activity_map

    meta = ["Metadata_plate", "Metadata_well", "Metadata_compound", DOSE, "Metadata_control"]
    wells = standardise(cells.groupby(meta, as_index=False)[cols].mean(), cols)
    feats = [c for c in wells.columns if c not in meta]
    _, summary = activity_map(wells, feats, null_size=2000)
    x = wells[feats].to_numpy()
    dose = wells[DOSE].to_numpy(float)
    top = dose.max()
    axis = x[dose == top].mean(0) - x[dose == 0].mean(0)
    proj = (x - x[dose == 0].mean(0)) @ axis / (axis @ axis)
    per_dose = {str(d): float(proj[dose == d].mean()) for d in sorted(set(dose))}
    means = list(per_dose.values())
    held = cells[cells["Metadata_split"] == "test"]
    fields = standardise(held.groupby(meta + ["Metadata_site"], as_index=False)[cols].mean(),
                         cols)
    ffeats = [c for c in fields.columns if c not in meta + ["Metadata_site"]]
    _, fsummary = activity_map(fields, ffeats, null_size=2000)
    return {
        "treated_vs_dmso_map": summary["mean_map"],
        "treated_vs_dmso_fraction_retrieved": summary["fraction_retrieved"],
        "heldout_fields_treated_vs_dmso_map": fsummary["mean_map"],
        "dose_projection": per_dose,
        "dose_spearman": float(spearmanr(dose, proj).statistic),
        "dose_ordered": bool(all(a < b for a, b in zip(means, means[1:]))),
        "n_wells": len(wells), "n_heldout_fields": len(fields),
    }


def transfer_baseline(npz: Path, csv: Path, weak_features: pd.DataFrame) -> dict:
    """ImageNet transfer features of the same crops: profile metrics and a linear probe."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from morphoprof.features.transfer import TransferConfig, TransferExtractor
    from morphoprof.models.weak import embed_crops
    from morphoprof.models.weak_run import load_crop_array, prepare_crops

    torch.manual_seed(0)
    raw, table, channels = load_crop_array(npz, csv, ["DAPI", "stain1", "stain2"], ["DMSO"])
    crops = prepare_crops(raw, None, "max")
    ex = TransferExtractor(TransferConfig(weights="offline", image_size=96, batch_size=64,
                                          jit=False))
    feats, seconds = embed_crops(ex, crops, channels)
    cols = [f"transfer_{k}" for k in range(feats.shape[1])]
    split = weak_features.set_index(["Metadata_plate", "Metadata_well", "Metadata_site",
                                     "Metadata_cell_in_field"])["Metadata_split"]
    key = pd.MultiIndex.from_frame(table[["Metadata_plate", "Metadata_well", "Metadata_site",
                                          "Metadata_cell_in_field"]])
    table = table.assign(Metadata_split=split.reindex(key).to_numpy())
    cells = pd.concat([table.reset_index(drop=True), pd.DataFrame(feats, columns=cols)], axis=1)
    out = profile_metrics(cells, cols)
    label = (table["Metadata_compound"].astype(str) + "@" + table[DOSE].astype(str)).to_numpy()
    tr, te = (table["Metadata_split"] == "train").to_numpy(), \
        (table["Metadata_split"] == "test").to_numpy()
    # class-balanced like the weak CNN's sampling, so both are judged the same way
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1,
                                                               class_weight="balanced"))
    probe.fit(feats[tr], label[tr])
    pred = probe.predict(feats[te])
    out["linear_probe_heldout_cell_accuracy"] = float(np.mean(pred == label[te]))
    out["linear_probe_heldout_balanced_accuracy"] = float(np.mean(
        [np.mean(pred[label[te] == c] == c) for c in np.unique(label[te])]))
    out["extract_cells_per_s"] = len(crops) / seconds
    return out


def main() -> int:
    from morphoprof.io_utils import write_json
    from morphoprof.shards import feature_columns, read_features
    from morphoprof.train import train_weak_from_yaml

    npz, csv = DATA / "crops.npz", DATA / "index.csv"
    if not npz.is_file():
        print(f"skipped: real data not found at {DATA}")
        return 0
    resume = "--resume" in sys.argv
    smoke = "--smoke" in sys.argv  # 1 short epoch, results not written: checks the script runs
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path("/tmp/morphoprof_bench/weak_single_cells") if resume else Path(tmp)
        t0 = time.perf_counter()
        s = train_weak_from_yaml(CONFIG.format(npz=npz, csv=csv, epochs=1 if smoke else EPOCHS,
                                               per=256 if smoke else "null"), folder,
                                 fresh=not resume)
        print(f"trained in {time.perf_counter() - t0:.0f} s: held-out accuracy "
              f"{s.heldout_cell_accuracy:.3f}", flush=True)
        cells = read_features(folder / "features")
        weak = profile_metrics(cells, feature_columns(cells))
        transfer = transfer_baseline(npz, csv, cells)
        metrics = pd.read_csv(folder / "weak" / "metrics.csv")
    result = {
        "dataset": os.path.relpath(DATA, HERE.parent), "n_cells": int(sum(s.cells.values())),
        "split": "train on replicates 1-2, test on replicate 3 (whole wells)",
        "cells": s.cells, "classes": list(s.classes), "model": "resnet18 (random init)",
        "epochs": s.epochs_run, "layer": s.layer, "mixup_alpha": s.mixup_alpha,
        "gru": s.gru,
        "heldout_cell_accuracy": s.heldout_cell_accuracy,
        "heldout_per_class_accuracy": s.heldout_per_class_accuracy,
        "heldout_balanced_accuracy": float(np.mean(list(
            s.heldout_per_class_accuracy.values()))),
        "chance_accuracy": s.chance_accuracy,
        "heldout_majority_fraction": s.heldout_majority_fraction,
        **weak,
        "transfer_treated_vs_dmso_map": transfer["treated_vs_dmso_map"],
        "transfer": transfer,
        "train_cells_per_s": s.train_cells_per_s,
        "extract_cells_per_s": s.extract_cells_per_s,
        "extract_vs_transfer_extract_ratio": s.extract_cells_per_s
        / transfer["extract_cells_per_s"],
        "train_seconds": s.train_seconds,
        "per_epoch": metrics.dropna(subset=["train_loss"]).to_dict("records"),
        "machine": describe_machine(),
    }
    if not smoke:
        write_json(RESULTS, result)
    print({k: v for k, v in result.items() if k not in ("per_epoch", "transfer")})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    sys.exit(main())
