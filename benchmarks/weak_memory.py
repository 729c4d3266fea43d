"""Memory of ``morphoprof train weak`` as the number of cells grows.

Real data: the single-cell screen ``weak_6moa_cells.py`` makes from the 660 real 6-MoA BBBC021
fields (``import`` / ``segment`` / ``crops --size 32``: 69,119 cells, one crop shard per plate).
``train weak`` runs twice on it, each in its own process: on one plate of each of the 7 weeks
(9,431 cells, ``select: {Metadata_plate: [...]}``) and on every cell (7.3x). Both train one
epoch of the same 4,096 cells (ResNet18, mixup + GRU, one sampling worker), so the two differ
only in the cells they hold, prepare and embed.

Measured per run: the peak anonymous resident memory of the ``train weak`` process (``RssAnon``
from ``/proc``, sampled every 0.2 s: the memory the process cannot give back; the page cache of
the memory-mapped ``crops.npy`` is ``RssFile``, reported beside it), ``ru_maxrss`` (both kinds),
the size of the prepared crops, and the seconds. ``anon_peak_ratio``: the all-cells peak over the
one-plate-a-week peak (1.0: memory does not grow with the cells). Crops held in memory as float32
would need the ``crops_file_mib`` figure on top of the baseline.

    python benchmarks/weak_memory.py          # ~3 min on 2 cores; writes results/weak_memory.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_common import fresh_work
from morphoprof.machine import describe_machine
from weak_6moa_cells import CONFIG, DATA, cell_crops

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "weak_memory.json"
WORK = Path(os.environ.get("MORPHOPROF_BENCH", "/tmp/morphoprof_bench")) / "weak_memory"
# one plate of each week (batch): every label keeps partners in other batches
PLATES = ["Week1_22123", "Week2_24121", "Week3_25681", "Week4_27481", "Week8_38203",
          "Week9_39206", "Week10_40111"]
CELLS_PER_EPOCH = 4096


def status_kib(pid: int) -> dict[str, int]:
    """``RssAnon`` and ``RssFile`` of process ``pid`` in KiB (empty once it has ended)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines)
            if k in ("RssAnon", "RssFile")}


def run_sampled(config: Path, log: Path) -> dict:
    """``morphoprof train weak CONFIG`` in a child process, its memory sampled as it runs."""
    peak = {"RssAnon": 0, "RssFile": 0}
    t0 = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "morphoprof", "train", "weak",
                                 str(config), "--quiet"], stdout=subprocess.DEVNULL, stderr=err)

        def sample() -> None:
            while proc.poll() is None:
                for k, v in status_kib(proc.pid).items():
                    peak[k] = max(peak[k], v)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"error: train weak {config} failed ({proc.returncode}); see {log}")
    return {"seconds": time.perf_counter() - t0, "anon_peak_mib": peak["RssAnon"] / 1024,
            "file_peak_mib": peak["RssFile"] / 1024, "maxrss_mib": usage.ru_maxrss / 1024}


def main() -> int:
    if not fresh_work(DATA, WORK):
        return 0
    log = WORK / "log.txt"
    crops = cell_crops(WORK, log)[2]
    runs = {}
    for name, select in (("one_plate_a_week", PLATES), ("all_cells", None)):
        out = WORK / name
        text = CONFIG.format(crops=crops, model="resnet18", weights="random", alpha=0.2,
                             gru="true", per=CELLS_PER_EPOCH, epochs=1, out=out)
        if select:
            text += f"select: {{Metadata_plate: [{', '.join(select)}]}}\n"
        config = WORK / f"{name}.yaml"
        config.write_text(text)
        run = run_sampled(config, log)
        weak = json.loads((out / "weak" / "weak.json").read_text())
        n = sum(weak["cells"].values())
        run.update(cells=n, crops_file_mib=n * 3 * 32 * 32 * 4 / 2**20,
                   train_cells_per_s=weak["train_cells_per_s"],
                   embed_cells_per_s=weak["extract_cells_per_s"],
                   crops_file_left=(out / "weak" / "crops.npy").exists())
        runs[name] = run
        print(f"{name}: {n} cells, peak anonymous {run['anon_peak_mib']:.0f} MiB, file-backed "
              f"{run['file_peak_mib']:.0f} MiB, {run['seconds']:.0f} s", flush=True)
    small, full = runs["one_plate_a_week"], runs["all_cells"]
    result = {"dataset": os.path.relpath(DATA, HERE.parent), "crop_px": 32,
              "cells_per_epoch": CELLS_PER_EPOCH, "runs": runs,
              "cells_ratio": full["cells"] / small["cells"],
              "anon_peak_ratio": full["anon_peak_mib"] / small["anon_peak_mib"],
              "machine": describe_machine()}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['cells_ratio']:.1f}x the cells: {result['anon_peak_ratio']:.2f}x the peak "
          f"anonymous memory; wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
