"""The one shard loop: resume, write order, read-ahead, errors, Dask; no stage has its own."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import morphoprof
from morphoprof.errors import InputError
from morphoprof.logs import progress
from morphoprof.shards import ShardWriter, plate_shards, read_features, run_shards


def _table_shard(rows, bar, offset=0.0, fail_at=None, seen=None, ahead=None, notes=False):
    """Module level, so a Dask worker can unpickle it: one row per payload item, odd items
    skipped; with ``notes``, a note of the shard's first item."""
    if seen is not None:
        seen.append((int(rows[0]), ahead))
    if fail_at is not None and int(rows[0]) == fail_at:
        raise RuntimeError(f"shard at {fail_at} fails")
    keep = [r for r in rows if r % 2 == 0]
    skipped = [{"row": int(r), "reason": f"row {r}: odd"} for r in rows if r % 2]
    df = pd.DataFrame({"Metadata_row": keep, "x": np.asarray(keep, float) + offset})
    return (df, skipped, {"first": int(rows[0])}) if notes else (df, skipped)


PLAN = [(f"p{k}", np.arange(4 * k, 4 * k + 4)) for k in range(4)]


def test_in_process_run_writes_every_shard_in_plan_order_and_resumes(tmp_path, caplog):
    writer = ShardWriter(tmp_path, {"v": 1})
    run = run_shards(PLAN, _table_shard, writer, shared={"offset": 0.5})
    assert (run.shards_written, run.shards_skipped, run.items, run.rows) == (4, 0, 16, 8)
    assert [s["row"] for s in run.skipped] == list(range(1, 16, 2))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["p0", "p1", "p2", "p3"]
    table = read_features(tmp_path)
    assert table["Metadata_row"].tolist() == list(range(0, 16, 2))
    np.testing.assert_allclose(table["x"], np.arange(0, 16, 2) + 0.5)
    # the skip records are kept in the manifest, so a later run's summary still lists them
    assert len(ShardWriter(tmp_path, {"v": 1}).skipped()) == 8

    # a shard lost since is the only one computed again
    (tmp_path / "shards" / "p2.parquet").unlink()
    seen = []
    caplog.set_level(logging.INFO, logger="morphoprof")
    again = run_shards(PLAN, _table_shard, ShardWriter(tmp_path, {"v": 1}),
                       shared={"seen": seen})
    assert [s for s, _ in seen] == [8]
    assert (again.shards_written, again.shards_skipped, again.items) == (1, 3, 4)
    messages = [r.getMessage() for r in caplog.records if r.name == "morphoprof.shards"]
    assert messages == ["resuming: 3 of 4 shards already done"]



def test_overwrite_clears_what_the_stage_wrote_and_keeps_the_users_files(tmp_path):
    """--overwrite on a folder made with other parameters removes its shards, manifest and
    summaries, not the whole folder: an --out pointed at a project folder by mistake keeps
    the user's files."""
    writer = ShardWriter(tmp_path, {"v": 1})
    run_shards(PLAN, _table_shard, writer)
    writer.finish(run_shards(PLAN, _table_shard, writer), "fail")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match=r"was made with other parameters \(v: 1 -> 2\)"):
        ShardWriter(tmp_path, {"v": 2})
    again = ShardWriter(tmp_path, {"v": 2}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt", "shards"]
    assert not again.shards and list((tmp_path / "shards").iterdir()) == []


def test_finish_returns_the_typed_summary_it_writes(tmp_path):
    writer = ShardWriter(tmp_path, {"v": 1})
    run = run_shards(PLAN, _table_shard, writer)
    summary = writer.finish(run, "skip", image_sets=run.items, cells=run.rows)
    assert (summary.image_sets, summary.cells, summary.n_skipped) == (16, 8, 8)
    assert summary.fields_per_s == pytest.approx(16 / run.seconds)
    assert summary.cells_per_s == pytest.approx(8 / run.seconds)
    saved = json.loads((tmp_path / "run_summary.json").read_text())
    assert saved == summary.to_json()
    assert saved["out"] == str(tmp_path) and saved["on_error"] == "skip"
    assert [s["row"] for s in saved["skipped"]] == list(range(1, 16, 2))
    # counts a stage does not report are left out of the file; nothing run, no rate
    again = ShardWriter(tmp_path, {"v": 1})
    rerun = again.finish(run_shards(PLAN, _table_shard, again), "fail", cells=0)
    assert rerun.shards_skipped == 4 and rerun.cells_per_s is None
    assert rerun.n_skipped == 8  # the earlier run's skips are still listed
    saved = json.loads((tmp_path / "run_summary.json").read_text())
    assert "image_sets" not in saved and "fields_per_s" not in saved
    assert saved["cells"] == 0 and saved["cells_per_s"] is None

def test_plate_plan_packs_small_plates_and_splits_large_ones():
    # rows of plates given out of order: C 5 rows, A 2, B 2, D 12, E 1
    plates = pd.Series(list("CAABCCDBCD") + ["D"] * 10 + ["E", "C"])
    plan = plate_shards(plates, min_rows=4, max_rows=5, min_shards=1)
    keys = [k for k, _ in plan]
    # A + B packed (4 rows), C alone (5 >= 4), D split by 5, E (1 row) left alone at the end
    assert keys == ["A-to-B", "C-0", "D-0", "D-1", "D-2", "E-0"]
    rows = dict(plan)
    assert rows["A-to-B"].tolist() == [1, 2, 3, 7]
    assert rows["C-0"].tolist() == [0, 4, 5, 8, 21]
    assert [len(rows[k]) for k in ("D-0", "D-1", "D-2")] == [5, 5, 2]
    got = np.sort(np.concatenate([r for _, r in plan]))
    assert got.tolist() == list(range(len(plates)))  # every row once
    for key, r in plan:
        assert len(r) <= 5 and (np.diff(r) > 0).all()
        assert plates.iloc[r].nunique() == (2 if key == "A-to-B" else 1)
    # the default: one shard per plate, in sorted order
    assert [k for k, _ in plate_shards(plates)] == ["A-0", "B-0", "C-0", "D-0", "E-0"]
    # a pack never grows past max_rows
    small = pd.Series(["a"] * 3 + ["b"] * 3 + ["c"] * 3)
    assert [len(r) for _, r in plate_shards(small, 8, 6, min_shards=1)] == [6, 3]
    # packs stop at len / min_shards rows: 9 / 3 -> 3, each plate alone
    assert [len(r) for _, r in plate_shards(small, 8, 6, min_shards=3)] == [3, 3, 3]
    many = pd.Series(np.repeat([f"p{k:02d}" for k in range(20)], 2))  # 20 plates of 2
    assert [len(r) for _, r in plate_shards(many, 128)] == [6] * 6 + [4]  # 40 / 8 -> 5: 3 each
    with pytest.raises(InputError, match="shard sizes"):
        plate_shards(small, min_rows=0)


def test_a_failing_shard_keeps_the_shards_before_it_and_closes_the_read_ahead(tmp_path):
    class Ahead:
        def __init__(self, rows):
            self.first, self.closed = int(rows[0]), False

        def close(self):
            self.closed = True

    made, seen = [], []

    def prepare(rows):
        made.append(Ahead(rows))
        return made[-1]

    writer = ShardWriter(tmp_path, {"v": 1})
    with pytest.raises(RuntimeError, match="shard at 8 fails"):
        run_shards(PLAN, _table_shard, writer, shared={"fail_at": 8, "seen": seen},
                   prepare=prepare)
    # each shard got its own read-ahead, made before the shard before it was computed
    assert [(first, a.first) for first, a in seen] == [(0, 0), (4, 4), (8, 8)]
    assert [a.first for a in made] == [0, 4, 8, 12]
    assert made[3].closed  # started for the shard after the failure, then stopped
    # the two shards finished before the failure were written (the write-behind thread is
    # waited for) and a re-run resumes after them
    assert list(json.loads((tmp_path / "manifest.json").read_text())["shards"]) == ["p0", "p1"]
    run = run_shards(PLAN, _table_shard, ShardWriter(tmp_path, {"v": 1}))
    assert (run.shards_written, run.shards_skipped) == (2, 2)
    assert read_features(tmp_path)["Metadata_row"].tolist() == list(range(0, 16, 2))


def test_progress_bar_ends_at_the_plan_size_whatever_the_shard_did(tmp_path, monkeypatch):
    import tqdm.auto

    bars = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr("morphoprof.logs.tqdm", spy)

    def overshoot(rows, bar):
        bar.update(10 * len(rows))  # a shard that counts in other units
        return _table_shard(rows, bar)

    # a disabled bar does not count: this one is shown (on stderr)
    with progress(True):
        run_shards(PLAN, overshoot, ShardWriter(tmp_path, {"v": 1}))
    assert bars[0].total == 16 and bars[0].n == 16


def test_dask_run_writes_the_same_folder_as_in_process(tmp_path):
    a = run_shards(PLAN, _table_shard, ShardWriter(tmp_path / "a", {"v": 1}),
                   shared={"offset": 2.0, "notes": True})
    b = run_shards(PLAN, _table_shard, ShardWriter(tmp_path / "b", {"v": 1}), "local:2",
                   shared={"offset": 2.0, "notes": True})
    # a shard's notes are kept in the manifest, written in process or by a worker
    for folder in ("a", "b"):
        assert ShardWriter(tmp_path / folder, {"v": 1}).notes("p1") == {"first": 4}
    assert (b.shards_written, b.items, b.rows) == (a.shards_written, a.items, a.rows)
    assert sorted(s["row"] for s in b.skipped) == sorted(s["row"] for s in a.skipped)
    pd.testing.assert_frame_equal(read_features(tmp_path / "a"),
                                  read_features(tmp_path / "b").sort_values("Metadata_row")
                                  .reset_index(drop=True))
    # a worker's failure stops the run with its error; finished shards stay recorded
    with pytest.raises(RuntimeError, match="shard at 4 fails"):
        run_shards(PLAN, _table_shard, ShardWriter(tmp_path / "c", {"v": 1}), "local:1",
                   shared={"fail_at": 4})


def test_no_stage_writes_shards_outside_the_one_loop():
    """Every sharded stage goes through run_shards: only shards.py writes or records a shard."""
    package = Path(morphoprof.__file__).parent
    pattern = re.compile(r"write_shard\(|\.record\(|writer\.write\(|\.write\(key")
    offenders = [f"{path.relative_to(package)}:{n}"
                 for path in package.rglob("*.py") if path.name != "shards.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []
