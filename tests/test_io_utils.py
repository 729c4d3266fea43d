"""Atomic writes: a failed write leaves neither a partial file nor the folders made for it."""

from __future__ import annotations

import pytest

from morphoprof.errors import OutputError
from morphoprof.io_utils import atomic_path, new_folder


def test_a_failed_atomic_write_leaves_no_file_and_no_folder_it_made(tmp_path):
    target = tmp_path / "new" / "deeper" / "table.csv"
    with pytest.raises(RuntimeError, match="stopped"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]
    # a folder that was there before is kept, with what it holds
    with pytest.raises(RuntimeError), atomic_path(target.with_name("other.csv")):
        raise RuntimeError("stopped")
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


def test_new_folder_is_removed_again_only_when_the_block_fails_and_left_it_empty(tmp_path):
    with pytest.raises(OSError), new_folder(tmp_path / "a" / "b") as folder:
        assert folder.is_dir()
        raise OSError("no network")
    assert not (tmp_path / "a").exists()
    with pytest.raises(OSError), new_folder(tmp_path / "a" / "b") as folder:
        (folder / "file.part").write_text("bytes received")
        raise OSError("dropped")
    assert (tmp_path / "a" / "b" / "file.part").is_file()  # kept: a later run resumes it
    (tmp_path / "blocker").write_text("")
    with pytest.raises(OutputError, match="blocker is a file"), \
            new_folder(tmp_path / "blocker" / "x", tmp_path / "blocker" / "x" / "y.csv"):
        pass


def test_frame_digest_tells_tables_apart_and_takes_paths_that_are_not_utf8():
    import pandas as pd

    from morphoprof.io_utils import frame_digest

    df = pd.DataFrame({"Metadata_plate": ["P1", "P2"], "x": [1.0, 2.0]})
    assert frame_digest(df) == frame_digest(df.copy())
    assert frame_digest(df) != frame_digest(df.iloc[::-1])  # row order counts
    assert frame_digest(df) != frame_digest(df.assign(x=[1.0, 2.5]))
    assert frame_digest(df) != frame_digest(df.rename(columns={"x": "y"}))
    latin1 = df.assign(FileName_DNA=["caf\udce9.tif", "b.tif"])  # a Latin-1 name on disk
    assert frame_digest(latin1) != frame_digest(latin1.assign(FileName_DNA=["caf.tif", "b.tif"]))
    mixed = df.assign(Metadata_dose=[1, "high"], Metadata_pair=[(1, 2), None])  # object columns
    assert frame_digest(mixed) != frame_digest(mixed.assign(Metadata_dose=[1, "low"]))
