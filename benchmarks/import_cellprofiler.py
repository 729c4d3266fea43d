"""Importing a large CellProfiler SQLite: time and peak memory of ``morphoprof import cellprofiler``
beside pycytominer's ``SingleCells.merge_single_cells`` on the same file, in one run.

The file is written here from the real cytominer-database SQLite in
../shared/data/cellprofiler_outputs/pycytominer_SQ00014613/ (a Cell Painting plate: tables Image,
Cells, Cytoplasm, Nuclei, ~1,800 CellProfiler features per cell): its image sets are repeated
with new TableNumber / ImageNumber and wells spread over a 96-well plate until the file holds
>= TARGET_GB. Each tool runs in its own process; its peak resident memory is that process's
``ru_maxrss`` (children included).

How the import scales: morphoprof also imports a file of half the size (HALF_GB, the same
image sets fewer times) and the full one with ``--chunk-size`` 10000; ``scaling`` gives seconds
per GB at both sizes (equal per-GB times: time in step with the file).

CSV folders (key ``csv``): ExportToSpreadsheet CSVs written here from the real ExampleHuman
CSVs in ../shared/data/cellprofiler_outputs/cytotable_ExampleHuman/ (its image's cells repeated
as new images) at CSV_GB and a quarter of it; morphoprof imports both, and CytoTable's own
``convert`` (preset ``cellprofiler_csv``, its default chunks and parsl executor, joined to one
Parquet) converts the small one.

    python benchmarks/import_cellprofiler.py   # writes results/import_cellprofiler.json
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import fresh_work
from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = (HERE.parent.parent / "shared" / "data" / "cellprofiler_outputs" / "pycytominer_SQ00014613"
        / "test_SQ00014613.sqlite")
RESULTS = HERE / "results" / "import_cellprofiler.json"
WORK = Path(os.environ.get("MORPHOPROF_BENCH", tempfile.gettempdir())) / "morphoprof_bench" / \
    "import_cellprofiler"
TARGET_GB = 2.0
HALF_GB = 1.0
CSV_DATA = DATA.parent.parent / "cytotable_ExampleHuman"
CSV_GB = 1.2
CSV_TABLES = ("Image", "Cells", "Cytoplasm", "Nuclei")
TIMEOUT_S = 1500

MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - t
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": proc.returncode, "seconds": seconds, "peak_mb": peak_kb / 1024,
                  "stderr": proc.stderr[-2000:], "stdout": proc.stdout[-2000:]}))
"""

PYCYTOMINER = """
import sys
from pycytominer.cyto_utils.cells import SingleCells
sc = SingleCells(sql_file=f"sqlite:///{sys.argv[1]}", strata=["Image_Metadata_Plate",
                 "Image_Metadata_Well"], image_cols=["TableNumber", "ImageNumber"])
df = sc.merge_single_cells()
df.to_parquet(sys.argv[2], index=False)
print(len(df))
"""


def build(source: Path, target: Path, target_gb: float) -> dict:
    """Repeat ``source``'s image sets (and their objects) until ``target`` is >= target_gb."""
    src = sqlite3.connect(source)
    tables = {t: [r[1] for r in src.execute(f"pragma table_info({t})")]
              for t in ("Image", "Cells", "Cytoplasm", "Nuclei")}
    schema = {t: src.execute("select sql from sqlite_master where name = ?", (t,)).fetchone()[0]
              for t in tables}
    n_images = src.execute("select count(*) from Image").fetchone()[0]
    per_copy = sum(len(c) for c in tables.values()) * 9 * n_images  # ~bytes per copy
    src.close()
    copies = int(target_gb * 1e9 / per_copy) + 1
    target.unlink(missing_ok=True)
    con = sqlite3.connect(target)
    con.execute("pragma journal_mode = off")
    con.execute("pragma synchronous = off")
    con.execute(f"attach database '{source}' as src")
    for t, cols in tables.items():
        con.execute(schema[t])
        select = []
        for c in cols:
            if c == "TableNumber":
                select.append("TableNumber || '-' || r.n")
            elif c == "ImageNumber":
                select.append(f"ImageNumber + {n_images} * r.n")
            elif c == "Image_Metadata_Well":
                select.append("char(65 + (r.n / 12) % 8) || printf('%02d', r.n % 12 + 1)")
            else:
                select.append(f'"{c}"')
        con.execute(f"with recursive r(n) as (select 0 union all select n + 1 from r where n < "
                    f"{copies - 1}) insert into main.{t} select {', '.join(select)} "
                    f"from src.{t}, r")
        con.commit()
    con.close()
    return {"copies": copies, "image_sets": copies * n_images,
            "size_gb": target.stat().st_size / 1e9}


CYTOTABLE = """
import sys
import cytotable
out = cytotable.convert(source_path=sys.argv[1], dest_path=sys.argv[2], dest_datatype="parquet",
                        preset="cellprofiler_csv")
import pyarrow.parquet as pq
print(pq.read_metadata(out).num_rows)
"""


def build_csv(source: Path, target: Path, target_gb: float) -> dict:
    """CSVs of ``source``'s tables with its image's rows repeated (ImageNumber 1, 2, ...) until
    the folder holds >= target_gb."""
    import csv
    import io

    rows = {}
    for t in CSV_TABLES:
        with open(source / f"{t}.csv", newline="") as f:
            header, *body = list(csv.reader(f))
        i = header.index("ImageNumber")
        cut = []
        for r in body:  # each row as the text before and after its ImageNumber field
            text = io.StringIO()
            csv.writer(text, lineterminator="\r\n").writerow([*r[:i], "\x00", *r[i + 1:]])
            cut.append(text.getvalue().split("\x00"))
        rows[t] = (",".join(header) + "\r\n", cut)
    per_copy = sum(len(a) + len(b) for _, cut in rows.values() for a, b in cut)
    copies = int(target_gb * 1e9 / per_copy) + 1
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for t, (header, cut) in rows.items():
        with open(target / f"{t}.csv", "w", newline="") as f:
            f.write(header)
            for n in range(1, copies + 1):
                f.writelines(f"{a}{n}{b}" for a, b in cut)
    return {"copies": copies, "images": copies,
            "size_gb": sum(p.stat().st_size for p in target.glob("*.csv")) / 1e9}


def csv_section(exe: str) -> dict:
    """morphoprof on CSV folders of CSV_GB and a quarter of it; CytoTable on the small one."""
    runs = {}
    for name, gb in (("small", CSV_GB / 4), ("large", CSV_GB)):
        folder = WORK / f"csv_{name}"
        info = build_csv(CSV_DATA, folder, gb)
        run = measure([exe, "import", "cellprofiler", str(folder), "--out",
                       str(WORK / f"ours_csv_{name}")])
        if run["rc"] == 0:
            run["rows"] = json.loads((WORK / f"ours_csv_{name}" / "import.json").read_text()
                                     )["rows"]
            run["seconds_per_gb"] = run["seconds"] / info["size_gb"]
        runs[name] = {"file": info, "morphoprof": {k: v for k, v in run.items()
                                                   if k not in ("stdout", "stderr")}}
        print(f"morphoprof csv {name} ({info['size_gb']:.2f} GB): {runs[name]['morphoprof']}",
              flush=True)
        if name == "small":
            env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            os.environ["PATH"] = env_path  # parsl's workers start from the venv's scripts
            ref = measure([sys.executable, "-c", CYTOTABLE, str(folder),
                           str(WORK / "cytotable_csv.parquet")])
            if ref.get("rc") == 0:
                ref["rows"] = int(ref["stdout"].strip().splitlines()[-1])
            runs[name]["cytotable_convert"] = {k: v for k, v in ref.items()
                                               if k not in ("stdout", "stderr")}
            print(f"cytotable csv small: {runs[name]['cytotable_convert']}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    small = runs["small"]
    if small["morphoprof"].get("seconds") and small["cytotable_convert"].get("seconds"):
        runs["time_ratio_cytotable_over_morphoprof"] = (
            small["cytotable_convert"]["seconds"] / small["morphoprof"]["seconds"])
    return runs


def measure(cmd: list[str]) -> dict:
    try:
        out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True,
                             text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"rc": None, "seconds": None, "peak_mb": None,
                "note": f"did not finish within {TIMEOUT_S} s"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if not fresh_work(DATA, WORK):
        return 0
    big = WORK / "plate.sqlite"
    t0 = time.perf_counter()
    info = build(DATA, big, TARGET_GB)
    info["build_seconds"] = time.perf_counter() - t0
    print(f"wrote {big}: {info['size_gb']:.2f} GB, {info['image_sets']} image sets", flush=True)
    exe = str(Path(sys.executable).parent / "morphoprof")

    def ours_on(path: Path, name: str, *extra: str) -> dict:
        run = measure([exe, "import", "cellprofiler", str(path), "--out", str(WORK / name),
                       *extra])
        if run["rc"] == 0:
            run["rows"] = json.loads((WORK / name / "import.json").read_text())["rows"]
        print(f"morphoprof {name}: { {k: v for k, v in run.items() if k != 'stderr'} }",
              flush=True)
        return run

    ours = ours_on(big, "ours")
    big_10k = ours_on(big, "ours_chunk10000", "--chunk-size", "10000")
    half = WORK / "half.sqlite"
    half_info = build(DATA, half, HALF_GB)
    ours_half = ours_on(half, "ours_half")
    half.unlink(missing_ok=True)
    ref = measure([sys.executable, "-c", PYCYTOMINER, str(big), str(WORK / "pycytominer.parquet")])
    if ref.get("rc") == 0:
        ref["rows"] = int(ref["stdout"].strip().splitlines()[-1])
    print(f"pycytominer: {ref}", flush=True)
    result = {"source": os.path.relpath(DATA, HERE.parent), "file": info,
              "seconds": ours["seconds"], "peak_mb": ours["peak_mb"], "rows": ours.get("rows"),
              "morphoprof": {k: v for k, v in ours.items() if k not in ("stdout", "stderr")},
              "pycytominer_single_cells": {k: v for k, v in ref.items()
                                           if k not in ("stdout", "stderr")},
              "goal_peak_under_1gb": bool(ours["peak_mb"] and ours["peak_mb"] < 1024)}
    if ref.get("seconds") and ours.get("seconds"):
        result["time_ratio_pycytominer_over_morphoprof"] = ref["seconds"] / ours["seconds"]
        result["memory_ratio_pycytominer_over_morphoprof"] = ref["peak_mb"] / ours["peak_mb"]
    result["chunk_size_10000"] = {k: v for k, v in big_10k.items()
                                  if k not in ("stdout", "stderr")}
    result["scaling"] = {
        "gb": [half_info["size_gb"], info["size_gb"]],
        "seconds": [ours_half.get("seconds"), ours.get("seconds")],
        "seconds_per_gb": [ours_half["seconds"] / half_info["size_gb"]
                           if ours_half.get("seconds") else None,
                           ours["seconds"] / info["size_gb"] if ours.get("seconds") else None]}
    if ours["rc"] != 0:
        result["morphoprof"]["stderr"] = ours["stderr"]
    if CSV_DATA.is_dir():
        result["csv"] = csv_section(exe)
    result["machine"] = describe_machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(WORK, ignore_errors=True)  # the copies and every import written
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
