import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from morphoprof.preprocess.fields import ImageSetDataset


def test_dataloader_with_worker_processes_reads_every_image_set(tiny_screen):
    _, index = tiny_screen
    ds = ImageSetDataset(index, channels=["Actin", "DNA"])
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    seen = []
    for batch, rows in loader:
        assert batch.dtype == torch.float32 and batch.shape[1:] == (2, 96, 96)
        for img, i in zip(batch, rows):
            ref = index.read(int(i), ["Actin", "DNA"])
            np.testing.assert_array_equal(img.numpy(), ref)
            seen.append(int(i))
    assert sorted(seen) == list(range(len(index)))


def test_unknown_channel_rejected(tiny_screen):
    _, index = tiny_screen
    with pytest.raises(ValueError, match="unknown channel"):
        ImageSetDataset(index, channels=["GFP"])
