"""Extraction on Dask distributed: a LocalCluster of 2 workers gives the in-process output."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from morphoprof.distributed import parse_scheduler
from morphoprof.errors import InputError
from morphoprof.shards import read_features

KEY = ["Metadata_plate", "Metadata_well", "Metadata_site"]


def test_parse_scheduler():
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("local") == ("local", 2)
    assert parse_scheduler("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    for bad in ("local:0", "local:x", "10.0.0.5:8786"):
        with pytest.raises(InputError, match="--scheduler"):
            parse_scheduler(bad)


def test_local_cluster_of_two_workers_matches_in_process_run(tiny_screen, tmp_path, capsys):
    from morphoprof.cli import main

    _, index = tiny_screen
    index.write(tmp_path / "index.parquet")
    args = ["extract", str(tmp_path / "index.parquet"), "--image-size", "64", "--weights",
            "random", "--min-shard-rows", "1"]  # a shard (Dask task) per plate: 4
    # Dask workers run one torch thread each: with one thread here too, the float reductions
    # are split the same way and the output is bit-identical (with more threads it differs by
    # float32 rounding, ~1e-6).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(args + ["--out", str(tmp_path / "dask"), "--scheduler", "local:2"]) == 0
    out = capsys.readouterr().out
    assert '"shards_written": 4' in out
    a = read_features(tmp_path / "single").sort_values(KEY).reset_index(drop=True)
    b = read_features(tmp_path / "dask").sort_values(KEY).reset_index(drop=True)
    assert len(a) == len(b) == len(index) and not b.duplicated(KEY).any()
    assert list(a.columns) == list(b.columns)
    feats = [c for c in a.columns if not c.startswith("Metadata_")]
    np.testing.assert_array_equal(a[feats].to_numpy(), b[feats].to_numpy())
    manifest = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert set(manifest["shards"]) == {p.stem for p in (tmp_path / "dask" / "shards").glob("*")}
    assert sum(s["rows"] for s in manifest["shards"].values()) == len(index)
    # a re-run on the cluster finds every shard done
    assert main(args + ["--out", str(tmp_path / "dask"), "--scheduler", "local:2"]) == 0
    assert '"shards_skipped": 4' in capsys.readouterr().out


def test_unreachable_scheduler_is_a_clear_error(tiny_screen, tmp_path, capsys):
    import dask

    from morphoprof.cli import main

    _, index = tiny_screen
    index.write(tmp_path / "index.parquet")
    t0 = time.perf_counter()
    # Dask's connect timeout decides how long it keeps trying (30 s by default)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        rc = main(["extract", str(tmp_path / "index.parquet"), "--image-size", "64",
                   "--weights", "random", "--out", str(tmp_path / "x"), "--scheduler",
                   "tcp://127.0.0.1:9"])
    assert rc == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20
