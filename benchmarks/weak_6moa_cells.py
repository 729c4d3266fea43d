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

Embedding speed is the ``extract --crops`` rate of the paper variant's checkpoint and of
transfer on the same crops, run one after the other in this process's sitting, in float32 and
in bfloat16 (both extractors the same precision each time).

5. the default recipe (a YAML of data + output only) on a different crop set: 3,000 real cells
   drawn unevenly from the treatments, written as ``.npz`` + CSV (robustness, item 6).

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

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "weak_6moa_cells.json"
WORK = Path(os.environ.get("MORPHOPROF_BENCH", "/tmp/morphoprof_bench")) / "weak_6moa_cells"
CELLS_PER_EPOCH = 16384
VARIANTS = {  # name: (model, weights, mixup alpha, gru, epochs at which it is embedded + scored)
    "resnet18_random_mixup_gru": ("resnet18", "random", 0.2, True, (2, 4, 6)),
    "resnet18_random_no_mixup": ("resnet18", "random", 0.0, True, (6,)),
    "resnet18_random_no_gru": ("resnet18", "random", 0.2, False, (6,)),
    "lite0_imagenet_mixup_gru": ("tf_efficientnet_lite0", "offline", 0.2, True, (4, 6)),
}
PAPER = "resnet18_random_mixup_gru"  # its checkpoint is the one timed against transfer
DEFAULTS_CELLS = 3000  # the real-cell subsample trained with the default recipe
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


def cell_crops(work: Path, log: Path) -> tuple[Path, Path, Path, dict]:
    """The single-cell screen of the 6-MoA fields in ``work`` (steps already done are kept):
    ``import``, ``segment`` with nuclei sizes for the 256-px scale, ``crops --size 32``.
    Returns the index, the cell table, the crop folder and the seconds of the steps run."""
    index, cells, crops = work / "index.parquet", work / "cells.parquet", work / "crops"
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
    return index, cells, crops, times


def main() -> int:
    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    resume = "--resume" in sys.argv
    if WORK.exists() and not resume:
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "log.txt"
    index, cells, crops, times = cell_crops(WORK, log)
    import pandas as pd

    table = pd.read_parquet(cells)
    n_treatments = int(table.groupby(["Metadata_compound", "Metadata_concentration"]).ngroups)
    result: dict = {"dataset": os.path.relpath(DATA, HERE.parent), "n_cells": len(table),
                    "n_treatments": n_treatments,
                    "n_compounds": int(table["Metadata_compound"].nunique()),
                    "n_moas": int(table["Metadata_moa"].nunique()),
                    "crop_size": 32, "cells_per_epoch": CELLS_PER_EPOCH,
                    "cell_tvn_reference": "all cells (the 6-MoA fields have no DMSO controls)",
                    "runs": {}, **times}
    print(f"{len(table)} cells, {n_treatments} treatments", flush=True)

    for name, (model, weights, alpha, gru, points) in VARIANTS.items():
        folder = WORK / name
        cfg = folder.with_suffix(".yaml")
        cfg.write_text(CONFIG.format(crops=crops, model=model, weights=weights, alpha=alpha,
                                     gru=str(gru).lower(), per=CELLS_PER_EPOCH,
                                     epochs=points[-1], out=folder))
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
        if name == PAPER:
            paper_ckpt = summary["checkpoint"]
        write_partial(result)

    # embedding speed: the paper's weak checkpoint and transfer on the same crops, back to
    # back, at each precision (the same for both); bf16 uses the CPU's AMX / AVX512-BF16 units
    speed: dict = {}
    for precision in ("fp32", "bf16"):
        weak_feats = WORK / f"speed_weak_{precision}"
        transfer_feats = WORK / f"transfer_crops_{precision}"
        for f in (weak_feats, transfer_feats):
            shutil.rmtree(f, ignore_errors=True)
        out, _ = morphoprof("extract", "--crops", str(crops), "--checkpoint", str(paper_ckpt),
                            "--precision", precision, "--out", str(weak_feats), log=log)
        weak_speed = printed_json(out)["cells_per_s"]
        out, _ = morphoprof("extract", "--crops", str(crops), "--precision", precision,
                            "--out", str(transfer_feats), log=log)
        transfer_speed = printed_json(out)["cells_per_s"]
        speed[precision] = {"embed_cells_per_s": weak_speed,
                            "transfer_cells_per_s": transfer_speed,
                            "ratio": weak_speed / transfer_speed}
        print(f"speed ({precision}): weak {weak_speed:.0f} cells/s, transfer "
              f"{transfer_speed:.0f} cells/s", flush=True)
    # the headline: bf16 for both; the embeddings it gives are scored too (equal to fp32's?)
    result["embed_cells_per_s"] = speed["bf16"]["embed_cells_per_s"]
    result["transfer_cells_per_s"] = speed["bf16"]["transfer_cells_per_s"]
    result["embed_speed_ratio"] = speed["bf16"]["ratio"]
    result["speed"] = speed
    result["speed_note"] = ("extract --crops of all crops, weak = the ResNet18 paper checkpoint "
                            "cut at layer3, transfer = Lite0 on each stain (3 passes); bf16 "
                            "headline, fp32 in speed")
    result["paper_bf16_embeddings"] = score(WORK / "speed_weak_bf16", "speed_weak_bf16", log)
    result["transfer_crops"] = score(WORK / "transfer_crops_fp32", "transfer_crops", log)

    fields = WORK / "transfer_fields"
    if not (fields / "manifest.json").is_file():
        morphoprof("extract", str(index), "--out", str(fields), log=log)
    f = score(fields, "transfer_fields", log)
    # 660 field rows for 3 x 1280 features: a cell-level TVN fitted on them is singular (the
    # aggregate command warns) and amplifies noise, so whole fields are scored without it
    result["transfer_fields"] = {**f["no_tvn"], "cell_tvn": {k: v for k, v in f.items()
                                                            if k != "no_tvn"},
                                 "note": "scored without cell TVN: 660 field rows for 3,840 "
                                         "features make the sphering singular"}
    result["defaults_subsample"] = defaults_run(crops, table, log)

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


def defaults_run(crops: Path, table, log: Path) -> dict:
    """The default ``train weak`` recipe (a YAML naming only the data and the output) on a
    different crop set: ``DEFAULTS_CELLS`` real cells drawn unevenly from the treatments (cell
    counts per treatment long-tailed), written as an ``.npz`` + CSV, the format users bring;
    scored through extract --crops / aggregate --cell-tvn / evaluate."""
    import numpy as np

    from morphoprof.preprocess.crops import load_crop_shards

    arr, cells, _ = load_crop_shards(crops)
    rng = np.random.default_rng(0)
    key = cells["Metadata_compound"].astype(str) + "@" + cells["Metadata_concentration"].astype(str)
    codes, names = cells.assign(k=key)["k"].factorize()
    weight = rng.pareto(1.0, len(names)) + 0.05  # per-treatment share: long-tailed
    p = weight[codes] / np.bincount(codes, minlength=len(names))[codes]
    rows = np.sort(rng.choice(len(cells), DEFAULTS_CELLS, replace=False, p=p / p.sum()))
    folder = WORK / "defaults"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    np.savez(folder / "crops.npz", crops=arr[rows])
    sub = cells.iloc[rows].reset_index(drop=True)
    sub.columns = [c.removeprefix("Metadata_") for c in sub.columns]
    sub.assign(crop=np.arange(len(sub))).to_csv(folder / "cells.csv", index=False)
    (folder / "weak.yaml").write_text("data: {source: crops, path: crops.npz, table: cells.csv}"
                                      "\noutput: run\n")
    morphoprof("train", "weak", str(folder / "weak.yaml"), "--quiet", log=log)
    summary = json.loads((folder / "run" / "weak" / "weak.json").read_text())
    feats = folder / "features"
    morphoprof("extract", "--crops", str(folder / "crops.npz"), "--crop-table",
               str(folder / "cells.csv"), "--checkpoint", summary["checkpoint"], "--out",
               str(feats), log=log)
    transfer = folder / "transfer_features"  # the reference on the same subsample
    morphoprof("extract", "--crops", str(folder / "crops.npz"), "--crop-table",
               str(folder / "cells.csv"), "--out", str(transfer), log=log)
    per = sub.groupby(["compound", "concentration"]).size()
    return {**score(feats, "defaults", log), "transfer": score(transfer, "defaults_transfer", log),
            "n_cells": len(sub), "n_treatments": len(per),
            "cells_per_treatment_min": int(per.min()),
            "cells_per_treatment_max": int(per.max()),
            "epochs": summary["epochs_run"], "train_seconds": summary["train_seconds"],
            "config": "data + output only (every recipe setting at its default)"}


def write_partial(result: dict, final: bool = False) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    target = RESULTS if final else WORK / "partial.json"
    result["machine"] = describe_machine()
    target.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
