"""morphoprof beside its peers, in one sitting on one machine: DeepProfiler 0.5.1, cp_measure 0.3.0
and plain torch + timm (the harnesses in ../shared/peers/), then morphoprof's own extraction on
the same 7,774 real BBBC021 crops and 660 real 6-MoA fields, one after the other, each in its own
process. Every ratio in ``results/peers.json`` comes from this one run.

- ``deepprofiler_ratio``: morphoprof EfficientNet-B0 on the crops (96-px box: each 68-px crop
  centred in zeros, as in DeepProfiler's 96-px box on the harness's tiled fields; per-crop max
  scaling; features written to disk as shards) / DeepProfiler's ``profile`` steady loop (TIFF
  read, crop, CNN, npz write), cells/s. Random weights in both (weights do not change speed).
- ``timm_resnet18_ratio`` / ``timm_efficientnet_b0_ratio``: the same morphoprof crop runs / plain
  timm forward passes on tensors in memory.
- ``fields_ceiling_ratio``: morphoprof EfficientNet-Lite0 (offline ImageNet weights) on the 660
  fields x 3 stains (greyscale, 224 px), end to end through ``extract`` (PNG decoding, resizing,
  the network, Parquet shards) / the same network on a batch already in memory, measured in the
  same process with the same engine, over as many fields right before and after the run (mean
  time). ``fields_vs_timm``: the end-to-end rate / plain timm's best
  forward pass (NCHW or channels_last).
- ``cp_measure_ratio``: deep whole-field cells/s (fields/s x the mean cells per BBBC021 field of
  the single-cell index, as a 6-MoA field is a whole BBBC021 field downsized) / cp_measure's
  cells/s with all its core measurements on 2 processes.
- ``fast_path_max_relative_error``: the largest per-cell ``|f_fast - f_torch| / |f_torch|`` of
  the default CPU engine (ONNX Runtime) against torch, on the same crops.

Set-up once: ``bash ../shared/peers/setup_all.sh`` (if the timm lock does not resolve:
``UNPINNED=1 bash ../shared/peers/timm_baseline/setup.sh``). Knobs (environment): PEER_REPEATS
(DeepProfiler / timm timed passes, default 1), CPM_CELLS (cp_measure cells, default 1500).

    python benchmarks/peers.py     # ~12 min; writes benchmarks/results/peers.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from extract_speed import sandwiched  # the network alone around the run, same engine
from morphoprof.machine import describe_machine
from scaling import field_cell_counts

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
DATA = SHARED / "data" / "bbbc021"
PEERS = SHARED / "peers"
RESULTS = HERE / "results" / "peers.json"
CROP = 96
TIMEOUT_S = 1200


def run_peer(name: str, env: dict[str, str]) -> dict:
    """One harness's JSON line (its last stdout line), or a dict with ``error``."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(["bash", str(PEERS / name / "run.sh")], capture_output=True,
                              text=True, timeout=TIMEOUT_S, env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"peer": name, "error": f"did not finish within {TIMEOUT_S} s"}
    wall = time.perf_counter() - t0
    lines = [x for x in proc.stdout.strip().splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"peer": name, "error": f"rc={proc.returncode}: {proc.stderr.strip()[-600:]}"}
    out = json.loads(lines[-1])
    out["harness_wall_seconds"] = wall
    return out


# --- morphoprof's side (run in a child process: ``peers.py --ours``) -----------------------

def _crops_run(model: str, out: Path, backend: str = "auto", batch: int = 64) -> dict:
    """The crops through ``TransferExtractor.extract_crops`` (features to Parquet shards),
    timed from reading the npz to the last shard written."""
    import pandas as pd

    from morphoprof.features.transfer import TransferConfig, TransferExtractor

    def extractor():
        return TransferExtractor(TransferConfig(
            model=model, weights="random", channel_strategy="native", in_chans=3,
            batch_size=batch, backend=backend))

    ex = extractor()

    def run() -> tuple[dict, float]:
        t0 = time.perf_counter()
        with np.load(DATA / "single_cells" / "crops.npz") as z:
            raw = z["crops"]  # (N, 68, 68, 3) uint16
        table = pd.read_csv(DATA / "single_cells" / "index.csv")
        crops = np.zeros((len(raw), 3, CROP, CROP), raw.dtype)
        o = (CROP - raw.shape[1]) // 2
        crops[:, :, o:o + raw.shape[1], o:o + raw.shape[2]] = raw.transpose(0, 3, 1, 2)
        s = ex.extract_crops(crops, table.rename(columns=lambda c: f"Metadata_{c}"),
                             ["DAPI", "c1", "c2"], out)
        return s, time.perf_counter() - t0

    n_crops = len(pd.read_csv(DATA / "single_cells" / "index.csv"))
    (s, seconds), ceil = sandwiched(extractor(), (batch, 3, CROP, CROP), n_crops, run)
    n, ceiling = s.cells, ceil["ceiling_per_s"]
    return {"model": model, "backend": backend, "engine": ex.engine, "cells": n, "seconds": seconds,
            "cells_per_s": n / seconds, "ceiling_cells_per_s": ceiling,
            "ceiling_ratio": n / seconds / ceiling, "batch_size": batch,
            "ceiling_before_cells_per_s": ceil["ceiling_before_per_s"],
            "ceiling_after_cells_per_s": ceil["ceiling_after_per_s"]}


def _features(folder: Path) -> np.ndarray:
    import pandas as pd

    df = pd.concat([pd.read_parquet(f) for f in sorted(folder.rglob("*.parquet"))])
    df = df.sort_values("Metadata_crop")
    return df[[c for c in df.columns if not c.startswith("Metadata_")]].to_numpy(np.float64)


def _fields_run(out: Path) -> dict:
    from morphoprof.features.transfer import TransferConfig, TransferExtractor
    from morphoprof.index import import_fields_6moa

    index = import_fields_6moa(DATA / "fields_6moa")
    ex = TransferExtractor(TransferConfig(batch_size=16))
    s, ceil = sandwiched(TransferExtractor(TransferConfig(batch_size=16)),
                         (16, 3, 224, 224), len(index),  # 16 fields x 3 stains a batch
                         lambda: ex.extract(index, out))
    ceiling = ceil["ceiling_per_s"]
    return {"fields": s.image_sets, "seconds": s.seconds, "fields_per_s": s.fields_per_s,
            "ceiling_fields_per_s": ceiling, "ceiling_ratio": s.fields_per_s / ceiling,
            "ceiling_before_fields_per_s": ceil["ceiling_before_per_s"],
            "ceiling_after_fields_per_s": ceil["ceiling_after_per_s"], "engine": ex.engine}


def ours() -> dict:
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res["efficientnet_b0"] = _crops_run("efficientnet_b0", tmp / "b0")
        res["resnet18"] = _crops_run("resnet18", tmp / "r18")
        res["efficientnet_b0_torch"] = _crops_run("efficientnet_b0", tmp / "b0t", "torch")
        fast, ref = _features(tmp / "b0"), _features(tmp / "b0t")
        rel = np.linalg.norm(fast - ref, axis=1) / np.linalg.norm(ref, axis=1)
        res["fast_path_max_relative_error"] = float(rel.max())
        res["whole_fields"] = _fields_run(tmp / "fields")
    per_field = field_cell_counts()
    res["cells_per_field"] = {"mean": float(per_field.mean()), "fields": int(len(per_field)),
                              "min": int(per_field.min()), "max": int(per_field.max())}
    return res


def main() -> int:
    if "--ours" in sys.argv:
        print(json.dumps(ours()))
        return 0
    if not (DATA / "single_cells" / "crops.npz").is_file() or not PEERS.is_dir():
        print(f"skipped: real data or peer harnesses not found under {SHARED}")
        return 0
    missing = [p for p in ("deepprofiler", "cp_measure", "timm_baseline")
               if not Path(f"/tmp/peer-venvs/{p}/bin/python").exists()]
    if missing:
        print(f"skipped: no peer venv for {', '.join(missing)}: run "
              f"bash {PEERS / 'setup_all.sh'} once")
        return 0
    repeats = os.environ.get("PEER_REPEATS", "1")
    peers = {}
    for name, env in (("deepprofiler", {"REPEATS": repeats, "EXTRA_BOX": ""}),
                      ("cp_measure", {"N_CELLS": os.environ.get("CPM_CELLS", "1500"),
                                      "N_SINGLE": "0", "N_CORR": "0"}),
                      ("timm_baseline", {"REPEATS": repeats})):
        print(f"== {name} ({time.strftime('%H:%M:%S')})", flush=True)
        peers[name] = run_peer(name, env)
        print(json.dumps({k: v for k, v in peers[name].items() if k != "notes"})[:600],
              flush=True)
    print(f"== morphoprof ({time.strftime('%H:%M:%S')})", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--ours"], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    mine = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(mine)[:1500], flush=True)

    def ratio(a, b):
        return a / b if a and b else None

    dp, cpm, tb = peers["deepprofiler"], peers["cp_measure"], peers["timm_baseline"]
    b0, r18, fields = mine["efficientnet_b0"], mine["resnet18"], mine["whole_fields"]
    fields_cells_per_s = fields["fields_per_s"] * mine["cells_per_field"]["mean"]
    best_plain = max(filter(None, [tb.get("fields_per_s"),
                                   ratio(tb.get("fields_images_per_s_channels_last"), 3)]),
                     default=None)
    result = {
        "machine": describe_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "deepprofiler_ratio": ratio(b0["cells_per_s"], dp.get("cells_per_s")),
        # DeepProfiler's whole command (start-up included) / morphoprof's crop run (model
        # built, start-up excluded): a user's view, not a like-for-like rate
        "deepprofiler_cli_ratio": ratio(dp.get("cli_seconds"), b0["seconds"]),
        "timm_efficientnet_b0_ratio": ratio(b0["cells_per_s"],
                                            tb.get("cells_per_s_efficientnet_b0")),
        "timm_resnet18_ratio": ratio(r18["cells_per_s"], tb.get("cells_per_s")),
        "fields_ceiling_ratio": fields["ceiling_ratio"],
        "fields_vs_timm": ratio(fields["fields_per_s"], best_plain),
        "cp_measure_ratio": ratio(fields_cells_per_s, cpm.get("cells_per_s")),
        "whole_field_cells_per_s": fields_cells_per_s,
        "fast_path_max_relative_error": mine["fast_path_max_relative_error"],
        "morphoprof": mine,
        "peers": peers,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print({k: v for k, v in result.items() if k not in ("morphoprof", "peers")})
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
