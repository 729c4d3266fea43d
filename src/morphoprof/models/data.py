"""Whole images for training: loaded once (resized, normalised) into memory, served with
augmentation (flips, 90-degree rotations, random crops) and labels."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from morphoprof.errors import InputError
from morphoprof.index.schema import ExperimentIndex
from morphoprof.io_utils import NpyRows, write_npy_chunks
from morphoprof.logs import progress_bar
from morphoprof.preprocess.crops import normalize_crops

logger = logging.getLogger(__name__)


def load_images(
    index: ExperimentIndex,
    rows: Sequence[int] | None = None,
    channels: Sequence[str] | None = None,
    size: int | None = None,
    normalization: str = "none",
    scale: float = 1.0,
    illumination=None,
    path: str | Path | None = None,
) -> np.ndarray | NpyRows:
    """Read image sets into one ``(N, C, S, S)`` float32 array (or native ``(N, C, H, W)``).

    Args:
        index: the experiment index.
        rows: row positions to read (default: all).
        channels: channel names in order (default: all of the index's).
        size: resize every image to ``size`` x ``size`` (antialiased bilinear); None keeps the
            native size, which must then be the same for every image.
        normalization: per-image, per-channel ``none`` | ``max`` | ``percentile`` (see
            :func:`~morphoprof.preprocess.crops.normalize_crops`).
        scale: intensities are divided by this first (e.g. 255 for 8-bit PNGs).
        illumination: optional per-plate illumination correction.
        path: write the images to this ``.npy`` file as they are read (atomically) and return
            it memory-mapped (:class:`~morphoprof.io_utils.NpyRows`, read as indexed): a
            screen larger than memory is never held whole. None: one array in memory.

    Raises:
        InputError: an image cannot be read (names the row) or shapes differ without ``size``.
    """
    rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
    channels = list(channels or index.channels)
    if scale <= 0:
        raise InputError(f"intensity scale must be > 0, got {scale}")
    images = _read_images(index, rows, channels, size, normalization, scale, illumination)
    first = next(images, None)
    if first is None:
        raise InputError("no images to load")
    shape = (len(rows), *first.shape)
    if path is None:
        out = np.empty(shape, dtype=np.float32)
        for k, arr in enumerate(itertools.chain([first], images)):
            out[k] = arr
    else:
        write_npy_chunks(path, shape, np.float32,
                         (a[None] for a in itertools.chain([first], images)))
        out = NpyRows(path)
    logger.info(f"loaded {len(rows)} images as {shape[1:]} "
                f"({np.prod(shape) * 4 / 2**20:.0f} MiB{'' if path is None else f', {path}'})")
    return out


def _read_images(index: ExperimentIndex, rows: np.ndarray, channels: list[str],
                 size: int | None, normalization: str, scale: float, illumination):
    """The image sets ``rows`` one at a time as :func:`load_images` makes them, ``(C, S, S)``
    float32; an image of another shape than the first raises (with no ``size``)."""
    shape = None
    for i in progress_bar(rows, desc="loading images", unit="image"):
        try:
            img = index.read(int(i), channels, illumination)
        except InputError as exc:
            raise InputError(f"{index.describe(int(i))}: {exc}") from exc
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None] / float(scale)
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                antialias=True, align_corners=False)
        arr = normalize_crops(x.numpy(), normalization)[0]
        if shape is not None and arr.shape != shape:
            raise InputError(f"{index.describe(int(i))}: image shape {arr.shape} "
                             f"differs from the first image's {shape}; set a size")
        shape = arr.shape
        yield arr


def take_rows(images: np.ndarray | NpyRows, rows: np.ndarray) -> np.ndarray | NpyRows:
    """``images[rows]``: for an in-memory array a copy of those rows, for an
    :class:`~morphoprof.io_utils.NpyRows` a view of them (nothing is read)."""
    return images.subset(rows) if isinstance(images, NpyRows) else images[rows]


def item_source(images) -> torch.Tensor | object:
    """What a dataset indexes for its items: an in-memory ``(N, ...)`` numpy array as one
    float32 tensor (items are views of it); an array-like read as it is indexed (an
    :class:`~morphoprof.io_utils.NpyRows`, a ``np.memmap``) as it is, so it is never held
    whole. Read an item with :func:`item_tensor`."""
    if isinstance(images, np.ndarray) and not isinstance(images, np.memmap):
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return images


def item_tensor(source, k: int) -> torch.Tensor:
    """Item ``k`` of an :func:`item_source` as a float32 tensor."""
    if isinstance(source, torch.Tensor):
        return source[k]
    return torch.from_numpy(np.ascontiguousarray(source[k], dtype=np.float32))


class ImageTensorDataset(Dataset):
    """Items ``(image, target)`` from an ``(N, C, H, W)`` array.

    Args:
        images: float32 array, held in memory; or an array-like read item by item
            (:func:`item_source`).
        targets: ``(N,)`` class indices, or ``(N, K)`` 0/1 for multi-label.
        augment: random horizontal/vertical flips and 90-degree rotations (square images).
        crop: random ``crop`` x ``crop`` windows when training (None: the whole image).
        mean, std: per-channel input normalisation applied last (length C, or 1).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, augment: bool = False,
                 crop: int | None = None, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,)) -> None:
        if len(images) != len(targets):
            raise InputError(f"{len(images)} images but {len(targets)} labels")
        self.images = item_source(images)
        t = np.asarray(targets)
        self.targets = torch.from_numpy(t.astype(np.float32 if t.ndim == 2 else np.int64))
        self.augment = augment
        h, w = images.shape[-2:]
        if crop is not None and (crop > h or crop > w):
            raise InputError(f"crop {crop} px is larger than the images ({h}x{w})")
        self.crop = crop
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]):
        """``key`` is an item number, or ``(item, seed)`` from :class:`EpochSampler` (the
        augmentation is then a function of the seed, so a resumed run repeats it exactly)."""
        k, seed = key if isinstance(key, tuple) else (key, None)
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        x = item_tensor(self.images, k)
        if self.crop is not None:
            h, w = x.shape[-2:]
            y0 = int(torch.randint(0, h - self.crop + 1, (), generator=gen))
            x0 = int(torch.randint(0, w - self.crop + 1, (), generator=gen))
            x = x[:, y0:y0 + self.crop, x0:x0 + self.crop]
        if self.augment:
            x = augment_crop(x, gen)
        return (x - self.mean) / self.std, self.targets[k]


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled ``(item, augmentation seed)`` keys, a pure function of (seed, epoch): a run
    resumed at epoch e sees exactly the batches and augmentations an uninterrupted run saw.
    Under torch.distributed each process takes its own share (rank::world_size, padded to equal
    length), so it also replaces DistributedSampler."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**62, self.n)
        rank, world = process_rank()
        if world > 1:
            per = -(-self.n // world)
            order = np.resize(order, per * world)[rank::world]
        return iter([(int(i), int(seeds[i])) for i in order])

    def __len__(self) -> int:
        return -(-self.n // process_rank()[1])


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process under torch.distributed, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def augment_crop(x: torch.Tensor, gen: torch.Generator | None, shift: int = 0) -> torch.Tensor:
    """Random horizontal / vertical flips, a 90-degree rotation (square crops) and a translation
    of up to ``shift`` px (zero-filled) of one ``(C, S, S)`` image."""
    flips = torch.rand(2, generator=gen)
    if flips[0] < 0.5:
        x = x.flip(-1)
    if flips[1] < 0.5:
        x = x.flip(-2)
    if x.shape[-1] == x.shape[-2]:
        x = torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), dims=(-2, -1))
    if shift > 0:
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
        if dy or dx:
            out = torch.zeros_like(x)
            h, w = x.shape[-2:]
            out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                x[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
            x = out
    return x
