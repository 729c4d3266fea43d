"""Memory bounds and throughput scaling of extraction and aggregation.

Real data: the 660 BBBC021 6-MoA fields (../shared/data/bbbc021/fields_6moa, 30 plates) are the
10x screen and whole plates holding a tenth of them the 1x screen; without the real data
a synthetic screen (36 and 360 fields) stands in. Each screen goes through
``morphoprof extract`` (EfficientNet-Lite0, offline ImageNet weights) and ``morphoprof aggregate``,
each command in its own process so that its peak resident memory (``ru_maxrss`` from ``wait4``)
is its own. Each is run twice and its larger peak counts. The ratio of peak memory at 10x to 1x
is reported per stage and overall (goal <= 1.2: memory flat as the screen grows).

Throughput: the 10x screen is extracted in-process (the reference, measured in this run) and on
Dask LocalClusters of 1 and 2 single-threaded workers (``--scheduler local:N``); fields/s
includes starting the cluster, as a user sees it. ``projection``: the per-worker rates (fields/s
and cells/s at the mean cells per real BBBC021 field) projected to the full BBBC021 (13,200
fields) and to a JUMP-size screen (100 M cells) on 1, 2, 16 and 64 such workers, with the
memory one worker needs.

    python benchmarks/scaling.py               # writes benchmarks/results/scaling.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling.json"
REPEATS = 2


def run_measured(args: list[str]) -> tuple[float, float, dict | None]:
    """Run ``python -m morphoprof ARGS`` in a child process: (seconds, peak RSS MiB, the JSON
    summary it printed, if any)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "morphoprof", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"morphoprof {' '.join(args)} failed with {proc.returncode}")
    start = out.find("{")
    summary = json.loads(out[start:]) if start >= 0 else None
    return seconds, usage.ru_maxrss / 1024, summary


DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"


def screens(tmp: Path, smoke: bool) -> tuple[dict[str, tuple[Path, int]], str]:
    """{"1x": (index.parquet, fields), "10x": ...} and where the fields come from."""
    import numpy as np

    out = {}
    if DATA.is_dir():
        from morphoprof.index import import_fields_6moa

        index = import_fields_6moa(DATA)
        if smoke:
            index = index.subset(index.table["Metadata_plate"].isin(
                sorted(index.table["Metadata_plate"].unique())[:12]).to_numpy())
        # 1x: whole plates (each with at least a full batch of fields) adding up to a tenth of
        # the fields, so both screens run the same batches and only the screen size differs
        sizes = index.table.groupby("Metadata_plate").size()
        plates, total = [], 0
        for plate, count in sizes[sizes >= 16].sort_index().items():
            if total + count <= 1.1 * len(index) / 10:
                plates.append(plate)
                total += count
        one = index.table["Metadata_plate"].isin(plates).to_numpy()
        for name, keep in (("10x", np.ones(len(index), bool)), ("1x", one)):
            sub = index.subset(keep)
            (tmp / name).mkdir()
            out[name] = (sub.write(tmp / name / "index.parquet"), len(sub))
        return out, str(DATA)
    from morphoprof.datasets.synthetic import SynthConfig, generate_screen

    for name, (plates, sites) in {"1x": (1, 1), "10x": (5, 2)}.items():
        cfg = SynthConfig(n_batches=3, plates_per_batch=plates, sites_per_well=sites)
        index = generate_screen(tmp / name, cfg)
        out[name] = (tmp / name / "index.parquet", len(index))
    return out, "synthetic screen"


def field_cell_counts():
    """Cells per real BBBC021 field of the single-cell index (a Series, 59-330 per field), or
    None where the data is absent."""
    import pandas as pd

    path = HERE.parent.parent / "shared" / "data" / "bbbc021" / "single_cells" / "index.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path).groupby(["plate", "well", "site"]).size()


def cells_per_field() -> float:
    """Mean cells per real BBBC021 field, or 150 without the data."""
    counts = field_cell_counts()
    return 150.0 if counts is None else float(counts.mean())


def projection(rates: dict, ten: dict) -> dict:
    """Per-worker rates measured here, projected to the full BBBC021 (13,200 fields x 3 stains,
    ~2 M cells) and to a JUMP-size screen (100 M cells) on N such workers (1 core each), with the
    memory a worker needs (the in-process extract peak, one 2-thread process, as its bound)."""
    per_field = cells_per_field()
    per_worker = {"1_worker": rates["1_worker"]["fields_per_s"],
                  "2_workers": rates["2_workers"]["fields_per_s"] / 2}
    rate = min(per_worker.values())  # the conservative one (2 workers share the machine)
    screens = {"bbbc021_full": 13_200, "jump_100M_cells": int(100e6 / per_field)}
    out = {"cells_per_field": per_field,
           "fields_per_s_per_worker": per_worker,
           "cells_per_s_per_worker": {k: v * per_field for k, v in per_worker.items()},
           "worker_memory_mib": ten["extract_peak_mib"],
           "fields": screens, "hours": {}}
    for name, fields in screens.items():
        out["hours"][name] = {f"{w}_workers": fields / (rate * w) / 3600 for w in (1, 2, 16, 64)}
    return out


def main() -> int:
    from morphoprof.io_utils import write_json

    smoke = "--smoke" in sys.argv
    result: dict = {"machine": describe_machine(), "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan, result["data"] = screens(tmp, smoke)
        for name in ("1x", "10x"):
            index, n = plan[name]
            feats, profiles = tmp / f"features_{name}", tmp / f"profiles_{name}"
            # peak memory varies from run to run (the allocator, the timing of batches):
            # each command runs REPEATS times from scratch and the largest peak counts
            ex, ag = [], []
            for _ in range(REPEATS):
                shutil.rmtree(feats, ignore_errors=True)
                shutil.rmtree(profiles, ignore_errors=True)
                ex.append(run_measured(["extract", str(index), "--out", str(feats)]))
                ag.append(run_measured(["aggregate", str(feats), "--out", str(profiles),
                                        "--normalize", "robust", "--reference", "all"]))
            result["stages"][name] = {
                "fields": n, "extract_seconds": min(r[0] for r in ex),
                "extract_peak_mib": max(r[1] for r in ex),
                "extract_peak_mib_runs": [r[1] for r in ex],
                "extract_fields_per_s": max(r[2]["fields_per_s"] for r in ex),
                "aggregate_seconds": min(r[0] for r in ag),
                "aggregate_peak_mib": max(r[1] for r in ag),
                "aggregate_peak_mib_runs": [r[1] for r in ag]}
            print(name, result["stages"][name], flush=True)
        one, ten = result["stages"]["1x"], result["stages"]["10x"]
        result["fields_ratio"] = ten["fields"] / one["fields"]
        result["extract_peak_memory_ratio_10x"] = ten["extract_peak_mib"] / one["extract_peak_mib"]
        result["aggregate_peak_memory_ratio_10x"] = (ten["aggregate_peak_mib"]
                                                     / one["aggregate_peak_mib"])
        result["peak_memory_ratio_10x"] = max(result["extract_peak_memory_ratio_10x"],
                                              result["aggregate_peak_memory_ratio_10x"])
        index = plan["10x"][0]
        rates = {}
        for label, extra in (("in_process", []), ("1_worker", ["--scheduler", "local:1"]),
                             ("2_workers", ["--scheduler", "local:2"])):
            seconds, peak, summary = run_measured(["extract", str(index), "--out",
                                                   str(tmp / f"dask_{label}")] + extra)
            rates[label] = {"fields_per_s": ten["fields"] / seconds, "seconds": seconds,
                            "client_peak_mib": peak}
            print(label, rates[label], flush=True)
        result["throughput"] = rates
        result["fields_per_s_in_process"] = rates["in_process"]["fields_per_s"]
        result["fields_per_s_1_worker"] = rates["1_worker"]["fields_per_s"]
        result["fields_per_s_2_workers"] = rates["2_workers"]["fields_per_s"]
        result["speedup_2_vs_1_workers"] = (rates["2_workers"]["fields_per_s"]
                                            / rates["1_worker"]["fields_per_s"])
        result["two_workers_vs_in_process"] = (rates["2_workers"]["fields_per_s"]
                                               / rates["in_process"]["fields_per_s"])
        result["projection"] = projection(rates, ten)
    print({k: v for k, v in result.items() if k not in ("stages", "throughput")})
    if not smoke:
        write_json(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    sys.exit(main())
