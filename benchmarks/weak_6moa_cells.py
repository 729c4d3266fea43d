"""Weak supervision (Caicedo 2018) on the real 6-MoA BBBC021 cells, scored through the CLI.

Reads ../shared/data/bbbc021/fields_6moa (660 real 256-px fields, 3 stains; 18 compounds,
55 treatments, 6 MoAs, 7 batches; no DMSO). Every step is a ``morphoprof`` command a user runs:

1. ``import bbbc021-6moa`` -> ``segment`` (nuclei tuned for the 256-px scale) -> ``crops
   --size 32`` (one crop shard per plate);
2. ``train weak`` on the 55 treatment labels (all cells; the labels are treatments, NSC / NSCB
   then match *other* compounds, so no label of the scored neighbour is seen), variants:
   ResNet18 from random init with mixup + GRU (the paper; embedded after 2, 4 and 6 epochs for
   the curve), without mixup, without GRU, and an ImageNet-initialised EfficientNet-Lite0
   (offline weights); per-crop max normalisation, flips / rotations / shifts, 32-px input,
   sampling in a DataLoader worker;
3. ``extract --crops`` with each trained checkpoint, and with ImageNet transfer (Lite0, each
   stain as greyscale) on the same crops; ``extract`` of the whole fields (transfer);
4. ``aggregate`` (cells -> wells, with and without cell-level TVN fitted on all cells: there
   are no control cells) and ``evaluate`` (NSC / NSCB over the treatments, MoA mAP).

Embedding speed is the ``extract --crops`` rate of the last weak checkpoint and of transfer on
the same crops, run one after the other in this process's sitting.

    python benchmarks/weak_6moa_cells.py          # ~40 min on 2 cores
    python benchmarks/weak_6moa_cells.py --resume # reuse finished steps in the work folder
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "weak_6moa_cells.json"
WORK = Path(os.environ.get("MORPHOPROF_BENCH", "/tmp/morphoprof_bench")) / "weak_6moa_cells"
CELLS_PER_EPOCH = 16384
CURVE = (2, 4, 6)  # epochs at which the paper variant is embedded and scored
VARIANTS = {  # name: (model, weights, mixup alpha, gru, epochs)
    "resnet18_random_mixup_gru": ("resnet18", "random", 0.2, True, CURVE[-1]),
    "resnet18_random_no_mixup": ("resnet18", "random", 0.0, True, CURVE[-1]),
    "resnet18_random_no_gru": ("resnet18", "random", 0.2, False, CURVE[-1]),
    "lite0_imagenet_mixup_gru": ("tf_efficientnet_lite0", "offline", 0.2, True, 4),
}
CONFIG = """data: {{source: crops, path: {crops}}}
holdout: {{val_fraction: 0.0}}
model: {{name: {model}, weights: {weights}}}
cells: {{normalization: max}}
weak: {{mixup_alpha: {alpha}, gru: {gru}, cells_per_epoch: {per}}}
train: {{epochs: {epochs}, batch_size: 128, num_workers: 1, seed: 0, accelerator: cpu}}
features: {{batch_size: 256}}
output: {out}
"""


def morphoprof(*args: str, log: Path) -> tuple[str, float]:
    """Run one CLI command (stdout returned, stderr / progress to ``log``) and its seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as err:
        err.write(f"\n$ morphoprof {' '.join(args)}\n")
        err.flush()
        res = subprocess.run([sys.executable, "-m", "morphoprof", *args], stdout=subprocess.PIPE,
                             stderr=err, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: morphoprof {' '.join(args)} failed (rc {res.returncode}); "
                         f"see {log}\n{res.stdout[-2000:]}")
    return res.stdout, time.perf_counter() - t0


def printed_json(stdout: str) -> dict:
    """The JSON summary a command printed last."""
    start = stdout.rfind("\n{")
    return json.loads(stdout[start + 1 if start >= 0 else stdout.index("{"):])


def score(features: Path, name: str, log: Path) -> dict:
    """aggregate (+ / - cell TVN) and evaluate a feature folder; NSC / NSCB / mAP of both."""
    out = {}
    for tvn in (True, False):
        prof = WORK / f"profiles_{name}{'_tvn' if tvn else ''}"
        ev = WORK / f"eval_{name}{'_tvn' if tvn else ''}.json"
        extra = ["--cell-tvn", "all"] if tvn else []
        morphoprof("aggregate", str(features), "--out", str(prof), "--normalize", "none", *extra,
                   log=log)
        morphoprof("evaluate", str(prof / "wells.parquet"), "--out", str(ev), log=log)
        r = json.loads(ev.read_text())
        out["cell_tvn" if tvn else "no_tvn"] = {
            "nsc": r["nsc"]["accuracy"], "nsc_counts": f"{r['nsc']['correct']}/{r['nsc']['n']}",
            "nscb": r["nscb"]["accuracy"],
            "nscb_counts": f"{r['nscb']['correct']}/{r['nscb']['n']}",
            "map": r["map"]["moa"]["mean_map"]}
    return {**out["cell_tvn"], "no_tvn": out["no_tvn"]}


def main() -> int:
    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    resume = "--resume" in sys.argv
    if WORK.exists() and not resume:
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "log.txt"
    index, cells, crops = WORK / "index.parquet", WORK / "cells.parquet", WORK / "crops"
    times: dict = {}
    if not index.is_file():
        morphoprof("import", "bbbc021-6moa", str(DATA), "--out", str(index), log=log)
    if not cells.is_file():
        _, times["segment_seconds"] = morphoprof(
            "segment", str(index), "--out", str(cells), "--channel", "DAPI", "--smoothing", "0.5",
            "--min-area", "6", "--max-area", "200", "--min-distance", "2", "--jobs", "2",
            log=log)
    if not (crops / "manifest.json").is_file():
        _, times["crops_seconds"] = morphoprof("crops", str(index), str(cells), "--out",
                                               str(crops), "--size", "32", log=log)
    import pandas as pd

    table = pd.read_parquet(cells)
    n_treatments = int(table.groupby(["Metadata_compound", "Metadata_concentration"]).ngroups)
    result: dict = {"dataset": str(DATA), "n_cells": len(table), "n_treatments": n_treatments,
                    "n_compounds": int(table["Metadata_compound"].nunique()),
                    "n_moas": int(table["Metadata_moa"].nunique()),
                    "crop_size": 32, "cells_per_epoch": CELLS_PER_EPOCH,
                    "cell_tvn_reference": "all cells (the 6-MoA fields have no DMSO controls)",
                    "runs": {}, **times}
    print(f"{len(table)} cells, {n_treatments} treatments", flush=True)

    last_ckpt = None
    for name, (model, weights, alpha, gru, epochs) in VARIANTS.items():
        folder = WORK / name
        cfg = folder.with_suffix(".yaml")
        cfg.write_text(CONFIG.format(crops=crops, model=model, weights=weights, alpha=alpha,
                                     gru=str(gru).lower(), per=CELLS_PER_EPOCH, epochs=epochs,
                                     out=folder))
        points = CURVE if name == "resnet18_random_mixup_gru" else (epochs,)
        curve, train_seconds = [], 0.0
        for ep in points:
            morphoprof("train", "weak", str(cfg), "--epochs", str(ep), "--quiet", log=log)
            summary = json.loads((folder / "weak" / "weak.json").read_text())
            train_seconds += float(summary["train_seconds"])
            feats = folder / "features"
            s = score(feats, f"{name}_e{ep}", log)
            metrics = pd.read_csv(summary["metrics_csv"])
            s.update({"epochs": summary["epochs_run"], "train_seconds": train_seconds,
                      "train_cells_per_s": summary["train_cells_per_s"],
                      "train_accuracy_last_epoch": float(metrics["train_acc"].dropna().iloc[-1]),
                      "model": model, "weights": weights, "mixup_alpha": alpha, "gru": gru})
            curve.append(s)
            print(f"{name} @ {ep} epochs: NSC {s['nsc_counts']} NSCB {s['nscb_counts']} "
                  f"mAP {s['map']:.3f} (no TVN: {s['no_tvn']['nsc_counts']})", flush=True)
        final = dict(curve[-1])
        final["train_seconds"] = train_seconds  # every `train weak` step of this variant
        final["train_loss_per_epoch"] = [round(float(v), 4) for v in
                                         metrics.groupby("epoch")["train_loss"].last()]
        final["train_acc_per_epoch"] = [round(float(v), 4) for v in
                                        metrics.groupby("epoch")["train_acc"].last()]
        if len(curve) > 1:
            final["curve"] = [{k: c[k] for k in ("epochs", "nsc_counts", "nscb_counts", "map")}
                              | {"no_tvn_nsc_counts": c["no_tvn"]["nsc_counts"]} for c in curve]
        result["runs"][name] = final
        if model == "resnet18" and name == "resnet18_random_mixup_gru":
            last_ckpt = summary["checkpoint"]
        write_partial(result)

    # embedding speed: the weak checkpoint and transfer on the same crops, back to back
    weak_feats, transfer_feats = WORK / "speed_weak", WORK / "transfer_crops"
    for f in (weak_feats, transfer_feats):
        shutil.rmtree(f, ignore_errors=True)
    out, _ = morphoprof("extract", "--crops", str(crops), "--checkpoint", str(last_ckpt),
                        "--out", str(weak_feats), log=log)
    weak_speed = printed_json(out)["cells_per_s"]
    out, _ = morphoprof("extract", "--crops", str(crops), "--out", str(transfer_feats), log=log)
    transfer_speed = printed_json(out)["cells_per_s"]
    result["embed_cells_per_s"] = weak_speed
    result["transfer_cells_per_s"] = transfer_speed
    result["embed_speed_ratio"] = weak_speed / transfer_speed
    result["transfer_crops"] = score(transfer_feats, "transfer_crops", log)

    fields = WORK / "transfer_fields"
    if not (fields / "manifest.json").is_file():
        morphoprof("extract", str(index), "--out", str(fields), log=log)
    result["transfer_fields"] = score(fields, "transfer_fields", log)

    best = max(result["runs"], key=lambda k: (result["runs"][k]["nsc"],
                                              result["runs"][k]["nscb"]))
    b, t = result["runs"][best], result["transfer_crops"]
    result["best_variant"] = best
    result["goals"] = {
        "nsc_ge_transfer_crops": b["nsc"] >= t["nsc"],
        "nscb_ge_transfer_crops": b["nscb"] >= t["nscb"],
        "nsc_ge_0.95": b["nsc"] >= 0.95, "nscb_ge_0.95": b["nscb"] >= 0.95,
        "embed_4x_transfer": result["embed_speed_ratio"] >= 4.0,
    }
    write_partial(result, final=True)
    print(json.dumps({k: result[k] for k in ("best_variant", "goals", "embed_speed_ratio")},
                     indent=1))
    return 0


def write_partial(result: dict, final: bool = False) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    target = RESULTS if final else WORK / "partial.json"
    target.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
