"""A torch Dataset over the image sets (whole fields) of an experiment index; crops of cells are
:class:`~morphoprof.preprocess.crops.CropDataset`.

It holds only the index table and the root (no open files), so it pickles to DataLoader worker
processes; each worker reads its own files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from morphoprof.errors import InputError
from morphoprof.images.read import read_image_planes, read_image_set
from morphoprof.index.schema import ExperimentIndex
from morphoprof.settings import check_on_error

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
        on_error: ``fail`` raises on an unreadable image set or one with NaN / infinite
            pixels (naming the row and file); ``skip`` serves ``(None, i, message)`` instead,
            which :func:`collate_skipping` drops from the batch and reports.
    """

    def __init__(
        self,
        index: ExperimentIndex,
        channels: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
        transform: Callable[[np.ndarray], object] | None = None,
        illumination=None,
        on_error: str = "fail",
    ) -> None:
        check_on_error(on_error)
        self.on_error = on_error
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

    def _read(self, i: int) -> np.ndarray:
        return read_image_set(self.index, i, self.channels, self.illumination)

    def _read_planes(self, i: int) -> list[np.ndarray]:
        return read_image_planes(self.index, i, self.channels)

    def _read_or_skip(self, i: int, read: Callable | None = None) -> tuple[object, str]:
        """``(image, "")``, or ``(None, reason)`` for a bad image set under ``skip``
        (``read``: how, default :meth:`_read`)."""
        try:
            return (read or self._read)(i), ""
        except InputError as exc:
            if self.on_error == "skip":
                return None, str(exc)
            raise

    def arrays(self, skipped: list | None = None,
               planes: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Each readable image set in order as ``(row, (C, H, W) float32)`` (``transform`` not
        applied), or with ``planes`` as ``(row, [(H, W) plane per channel])`` in the files'
        own pixel types, not corrected (a uint16 plane summed without a float32 copy); under
        ``skip`` the others are appended to ``skipped`` as ``{"row", "reason"}``."""
        read = self._read_planes if planes else self._read
        for i in self.rows:
            image, reason = self._read_or_skip(int(i), read)
            if image is None:
                if skipped is not None:
                    skipped.append({"row": int(i), "reason": reason})
                continue
            yield int(i), image

    def __getitem__(self, k: int):
        i = int(self.rows[k])
        image, reason = self._read_or_skip(i)
        if image is None:
            return None, i, reason
        if self.transform is not None:
            return self.transform(image), i
        import torch

        return torch.from_numpy(image), i


def collate_skipping(items: list) -> tuple:
    """Collate ``(image, i)`` items, leaving out ``(None, i, message)`` ones (skipped image
    sets): returns ``(images or None, rows, [(row, message), ...])``."""
    import torch
    from torch.utils.data import default_collate

    kept = [it[:2] for it in items if it[0] is not None]
    skipped = [(int(it[1]), it[2]) for it in items if it[0] is None]
    if not kept:
        return None, torch.zeros(0, dtype=torch.int64), skipped
    images, rows = default_collate(kept)
    return images, rows, skipped
