"""Training images read to a memory-mapped file instead of memory (models/data.py, run.py)."""

from __future__ import annotations

import numpy as np
import torch

from morphoprof.io_utils import NpyRows
from morphoprof.models.data import ImageTensorDataset, load_images, take_rows
from morphoprof.models.run import channel_stats


def test_images_written_to_disk_are_the_images_held_in_memory(tiny_screen, tmp_path):
    """``load_images(path=...)`` streams the images into an .npy and maps it: the same values
    as the in-memory array, a fold's rows taken as a view, items and per-channel statistics
    (computed a chunk at a time) the same."""
    _, index = tiny_screen
    held = load_images(index, size=48, normalization="percentile")
    on_disk = load_images(index, size=48, normalization="percentile",
                          path=tmp_path / "run" / "images.npy")
    assert isinstance(on_disk, NpyRows) and on_disk.shape == held.shape
    np.testing.assert_array_equal(np.asarray(on_disk), held)
    rows = np.array([5, 0, 17, 3])
    fold = take_rows(on_disk, rows)
    assert isinstance(fold, NpyRows) and len(fold) == 4
    np.testing.assert_array_equal(np.asarray(fold), take_rows(held, rows))
    a = ImageTensorDataset(fold, np.arange(4), augment=True, mean=(0.2,), std=(0.5,))
    b = ImageTensorDataset(held[rows], np.arange(4), augment=True, mean=(0.2,), std=(0.5,))
    for key in [(0, 11), (3, 7)]:
        assert all(torch.equal(u, v) for u, v in zip(a[key], b[key], strict=True))
    m_disk, s_disk = channel_stats(on_disk, chunk=7)
    m_held, s_held = channel_stats(held)
    np.testing.assert_allclose(m_disk, m_held, rtol=1e-12)
    np.testing.assert_allclose(s_disk, s_held, rtol=1e-12)
    assert np.float32(m_disk).tolist() == np.float32(m_held).tolist()
