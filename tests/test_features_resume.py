"""A real kill: SIGKILL an extraction mid-run, re-run the same command, compare with a clean run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from morphoprof.datasets.synthetic import SynthConfig, generate_screen
from morphoprof.shards import read_features


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
# one worker: each Dask worker process imports torch and builds the network (seconds), and one
# is enough to show that the cluster's processes go with their killed client
@pytest.mark.parametrize("scheduler", [[], ["--scheduler", "local:1"]], ids=["in_process", "dask"])
def test_sigkill_mid_extraction_then_rerun_matches_clean_run(tmp_path, scheduler):
    """In one process, or as the client of a 1-worker Dask LocalCluster (whose worker
    processes must not outlive it)."""
    cfg = SynthConfig(n_moas=2, compounds_per_moa=2, concentrations=(1.0,), n_batches=2,
                      plates_per_batch=4, dmso_wells_per_plate=2, sites_per_well=2,
                      height=64, width=64, cells_per_field=5, seed=5)
    n_fields = len(generate_screen(tmp_path / "s", cfg))
    index = str(tmp_path / "s" / "index.parquet")
    cmd = [sys.executable, "-m", "morphoprof.cli", "extract", index, "--image-size", "64",
           "--batch-size", "1", "--min-shard-rows", "1"]  # a shard per plate: 8
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + scheduler + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 240
    done_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file():
            try:
                done_at_kill = len(json.loads(manifest.read_text())["shards"])
            except (json.JSONDecodeError, KeyError):
                done_at_kill = 0
            if done_at_kill >= 1:
                children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                          text=True).stdout.split()
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 1 <= done_at_kill < 8  # killed in the middle: some plates done, some not
    if scheduler:  # the cluster's processes (nannies, workers) go with their client
        assert children
        deadline = time.time() + 30
        while time.time() < deadline and any(os.path.exists(f"/proc/{c}") for c in children):
            time.sleep(0.5)
        assert not any(os.path.exists(f"/proc/{c}") for c in children), "orphaned workers"
    rerun = subprocess.run(cmd + scheduler + ["--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert '"shards_skipped"' in rerun.stdout
    clean = subprocess.run(cmd + scheduler + ["--out", str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    a, b = read_features(out), read_features(tmp_path / "clean")
    key = ["Metadata_plate", "Metadata_well", "Metadata_site"]
    assert not a.duplicated(key).any() and len(a) == len(b) == n_fields
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    feats = [c for c in a.columns if not c.startswith("Metadata_")]
    # exactly the same numbers as the uninterrupted run (same scheduler, so same threads)
    np.testing.assert_array_equal(a[feats].to_numpy(), b[feats].to_numpy())
    assert set(json.loads(manifest.read_text())["shards"]) == {
        p.stem for p in (out / "shards").glob("*.parquet")}
    # what the killed run was writing is gone: only finished shards and the manifest remain
    assert not [p.name for p in out.rglob("*") if ".tmp-" in p.name]
