"""A torch Dataset over the image sets of an experiment index.

It holds only the index table and the root (no open files), so it pickles to DataLoader worker
processes; each worker reads its own files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from morphoprof.index.schema import ExperimentIndex

try:  # torch is a dependency, but keep this module importable for type checks without it
    from torch.utils.data import Dataset
except ImportError:  # pragma: no cover
    Dataset = object  # type: ignore[misc,assignment]


class ImageSetDataset(Dataset):
    """Items are ``(image, i)``: the ``(C, H, W)`` float32 image set ``i`` of the index after
    ``transform`` (default: a torch tensor of the raw intensities), and its row position.

    Args:
        index: the experiment index.
        channels: channel names to read, in order (default: all).
        rows: row positions to serve (default: all).
        transform: callable on the ``(C, H, W)`` numpy array, returning what the loader batches.
        illumination: an :class:`~morphoprof.preprocess.illumination.IlluminationCorrection`
            applied (per plate) before ``transform``, or None.
    """

    def __init__(
        self,
        index: ExperimentIndex,
        channels: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
        transform: Callable[[np.ndarray], object] | None = None,
        illumination=None,
    ) -> None:
        self.index = index
        self.channels = list(channels or index.channels)
        unknown = [c for c in self.channels if c not in index.channels]
        if unknown:
            raise ValueError(f"unknown channel(s) {unknown}; the index has {index.channels}")
        self.rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.illumination = illumination

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        i = int(self.rows[k])
        image = self.index.read(i, self.channels, self.illumination)
        if self.transform is not None:
            return self.transform(image), i
        import torch

        return torch.from_numpy(image), i
