"""Atomic writes: a failed write leaves neither a partial file nor the folders made for it."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from morphoprof.errors import OutputError
from morphoprof.io_utils import atomic_path, new_folder, write_npz, write_npz_chunks


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
