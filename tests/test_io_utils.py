"""Atomic writes: a failed write leaves neither a partial file nor the folders made for it."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from morphoprof.errors import InputError, OutputError
from morphoprof.io_utils import (
    NpyRows,
    RowBuffer,
    atomic_path,
    new_folder,
    write_npy_chunks,
    write_npz,
    write_npz_chunks,
)


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


def test_write_npz_compressed_is_fast_deflate_that_np_load_reads(tmp_path):
    rng = np.random.default_rng(0)
    crops = (rng.random((200, 3, 16, 16)) * 3000).astype(np.float16)
    crops[:, :, :4] = 0  # some redundancy to deflate
    labels = np.arange(200)
    write_npz(tmp_path / "c.npz", compressed=True, crops=crops, labels=labels)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["crops", "labels"]
        np.testing.assert_array_equal(z["crops"], crops)
        np.testing.assert_array_equal(z["labels"], labels)
    with zipfile.ZipFile(tmp_path / "c.npz") as zf:
        info = zf.getinfo("crops.npy")
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.compress_size < 0.9 * info.file_size
    np.savez_compressed(tmp_path / "numpy.npz", crops=crops, labels=labels)
    assert (tmp_path / "c.npz").stat().st_size < 1.5 * (tmp_path / "numpy.npz").stat().st_size
    write_npz(tmp_path / "u.npz", crops=crops)  # uncompressed: stored
    with zipfile.ZipFile(tmp_path / "u.npz") as zf:
        assert zf.getinfo("crops.npy").compress_type == zipfile.ZIP_STORED


def test_write_npz_chunks_writes_what_write_npz_writes_and_refuses_wrong_pieces(tmp_path):
    """Pieces along the first axis give the bytes of a whole-array write; pieces that fall
    short, run over or have another shape raise ValueError and leave no file."""
    crops = (np.random.default_rng(1).random((53, 3, 8, 8)) * 3000).astype(np.float16)
    write_npz(tmp_path / "whole.npz", compressed=True, crops=crops)
    write_npz_chunks(tmp_path / "pieces.npz", "crops", crops.shape, np.float16,
                     (crops[k:k + 10] for k in range(0, 53, 10)), compressed=True)
    assert (tmp_path / "pieces.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    with np.load(tmp_path / "pieces.npz") as z:
        np.testing.assert_array_equal(z["crops"], crops)
    for pieces, says in [([crops[:50]], "pieces of"), ([crops, crops[:1]], "does not fit"),
                         ([crops[:, :2]], "does not fit")]:
        with pytest.raises(ValueError, match=says):
            write_npz_chunks(tmp_path / "bad.npz", "crops", crops.shape, np.float16, pieces)
        assert not list(tmp_path.glob("*bad*"))


def test_npy_pieces_read_back_row_by_row_from_a_memory_map(tmp_path):
    """write_npy_chunks writes what np.save writes; NpyRows reads the rows asked for (an int,
    a slice, an int array; views of views), pickles as its path, not its data, and names a
    file it cannot read."""
    import pickle

    crops = np.random.default_rng(2).random((53, 3, 8, 8)).astype(np.float32)
    write_npy_chunks(tmp_path / "c.npy", crops.shape, np.float32,
                     (crops[k:k + 10] for k in range(0, 53, 10)))
    np.save(tmp_path / "whole.npy", crops)
    assert (tmp_path / "c.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    rows = NpyRows(tmp_path / "c.npy")
    assert rows.shape == crops.shape and len(rows) == 53 and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[5], crops[5])
    np.testing.assert_array_equal(rows[3:9], crops[3:9])
    np.testing.assert_array_equal(rows[np.array([7, 2, 2])], crops[[7, 2, 2]])
    sub = rows.subset([10, 3, 40])
    assert sub.shape == (3, 3, 8, 8) and not isinstance(sub[0], np.memmap)
    np.testing.assert_array_equal(sub[1], crops[3])
    np.testing.assert_array_equal(sub.subset([2, 0])[0], crops[40])
    np.testing.assert_array_equal(np.asarray(sub), crops[[10, 3, 40]])
    blob = pickle.dumps(rows)
    assert len(blob) < crops.nbytes / 4
    np.testing.assert_array_equal(pickle.loads(blob)[52], crops[52])
    # the row count alone: the rest of the shape is the first piece's
    write_npy_chunks(tmp_path / "rows.npy", 53, np.float32,
                     (crops[k:k + 10] for k in range(0, 53, 10)))
    assert (tmp_path / "rows.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    with pytest.raises(ValueError, match="no pieces"):
        write_npy_chunks(tmp_path / "bad.npy", 53, np.float32, iter([]))
    with pytest.raises(ValueError, match="does not fit"):
        write_npy_chunks(tmp_path / "bad.npy", crops.shape, np.float32, [crops, crops[:1]])
    assert not list(tmp_path.glob("*bad*"))
    with pytest.raises(InputError, match="missing.npy"):
        NpyRows(tmp_path / "missing.npy")


def test_a_row_buffer_holds_the_batches_in_one_array():
    """Batches land in one array made at the first (its width and type, or the type asked
    for); fewer rows than announced are cut off; no batch gives the empty value."""
    buf = RowBuffer(7, np.float32)
    buf.add(np.arange(6).reshape(3, 2))
    buf.add(np.arange(6, 10).reshape(2, 2))
    out = buf.result(np.zeros((0, 0)))
    assert out.dtype == np.float32 and out.shape == (5, 2)
    np.testing.assert_array_equal(out, np.arange(10).reshape(5, 2))
    assert buf.array.shape == (7, 2)  # one array, allocated once
    keys = RowBuffer(3)
    keys.add(np.array([4, 2], np.int32))
    assert keys.result(np.zeros(0)).dtype == np.int32
    empty = np.zeros(0, np.int64)
    assert RowBuffer(4).result(empty) is empty


def test_npy_pieces_that_cannot_be_written_name_the_file_and_leave_nothing(tmp_path):
    """A full disk while the pieces are written, or a parent that is a file, is one
    OutputError naming the file; no partial or temporary file stays behind."""
    import errno

    def pieces():
        yield np.zeros((4, 2), np.float32)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out" / "crops.npy"
    with pytest.raises(OutputError, match=r"crops\.npy: No space left on device"):
        write_npy_chunks(target, 8, np.float32, pieces())
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file/crops.npy"):
        write_npy_chunks(tmp_path / "file" / "crops.npy", 1, np.float32, [np.zeros((1, 2))])


def test_a_noted_file_is_reused_only_under_a_readable_note_of_the_same_params(tmp_path):
    """noted_npy makes the file once per params; a note that cannot be read (a run stopped
    while writing it, a hand edit) makes it again; the note may live elsewhere (a cache's
    key.json)."""
    from morphoprof.io_utils import noted_npy

    made = []

    def write(target):
        made.append(target)
        write_npy_chunks(target, 3, np.float32, [np.full((3, 2), len(made), np.float32)])

    path = tmp_path / "x.npy"
    assert noted_npy(path, {"v": 1}, write)[0].tolist() == [1.0, 1.0]
    assert noted_npy(path, {"v": 1}, write)[2].tolist() == [1.0, 1.0] and len(made) == 1
    (tmp_path / "x.npy.json").write_text("{not json")
    assert noted_npy(path, {"v": 1}, write)[0].tolist() == [2.0, 2.0]
    assert noted_npy(path, {"v": 2}, write)[0].tolist() == [3.0, 3.0]
    key = tmp_path / "key.json"
    noted_npy(path, {"v": 2}, write, note=key)
    noted_npy(path, {"v": 2}, write, note=key)
    assert len(made) == 4 and json.loads(key.read_text()) == {"v": 2}
