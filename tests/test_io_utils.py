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
