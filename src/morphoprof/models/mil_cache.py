"""A frozen MIL trunk's feature maps, computed once and cached, so only the MIL head trains.

On two CPU cores a pretrained trunk costs most of a training step, yet with its weights frozen
its output never changes: :func:`trunk_maps` runs it once on each image under each of the 8
rotations / reflections of the square (the dihedral group), and :class:`CachedMapDataset`
serves those maps to the head with the same augmentation a training loop would apply to the
images (a random one of the 8 transforms, a random crop of the map). The maps are stored as
float16 in a folder keyed by the trunk, the images and the transforms (:func:`cached_trunk_maps`),
so a second run (another pooling, another seed) starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from morphoprof.errors import InputError
from morphoprof.io_utils import NpyRows, noted_npy, write_json, write_npy_chunks
from morphoprof.logs import progress_bar

logger = logging.getLogger(__name__)

N_DIHEDRAL = 8


def dihedral(x: torch.Tensor, t: int) -> torch.Tensor:
    """Transform ``t`` (0..7) of the square's symmetry group on the last two axes: ``t % 4``
    quarter turns, then a horizontal flip for ``t >= 4``. ``t = 0`` is the identity."""
    if not 0 <= t < N_DIHEDRAL:
        raise InputError(f"dihedral transform must be 0..7, got {t}")
    y = torch.rot90(x, t % 4, dims=(-2, -1))
    return y.flip(-1) if t >= 4 else y


def trunk_map_batches(trunk: torch.nn.Module, images: np.ndarray | NpyRows,
                      mean: Sequence[float], std: Sequence[float],
                      transforms: int = N_DIHEDRAL, batch_size: int = 16
                      ) -> Iterator[np.ndarray]:
    """The trunk's feature maps of the images under the first ``transforms`` dihedral
    transforms, ``batch_size`` images at a time: ``(B, T, D, h, w)`` float16 per batch, in
    order (so a screen's maps can be written as they come, never held whole).

    Args:
        trunk: ``(B, C, H, W)`` -> ``(B, D, h, w)``, run in eval mode.
        images: ``(N, C, H, W)`` float32 intensities (square when ``transforms > 1``), in
            memory or read as indexed (:class:`~morphoprof.io_utils.NpyRows`).
        mean, std: per-channel input normalisation (length C).
        transforms: 1 (identity only) to 8.
    """
    if transforms > 1 and images.shape[-1] != images.shape[-2]:
        raise InputError(f"rotated copies need square images, got {images.shape[-2:]}")
    was_training = trunk.training
    trunk.eval()
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    try:
        for start in progress_bar(range(0, len(images), batch_size), desc="trunk feature maps",
                                  unit="batch"):
            with torch.inference_mode():
                x = (torch.from_numpy(images[start:start + batch_size]) - m) / s
                maps = [trunk(dihedral(x, t).contiguous()).numpy().astype(np.float16)
                        for t in range(transforms)]
            yield np.stack(maps, axis=1)
    finally:
        trunk.train(was_training)


def trunk_maps(trunk: torch.nn.Module, images: np.ndarray | NpyRows, mean: Sequence[float],
               std: Sequence[float], transforms: int = N_DIHEDRAL, batch_size: int = 16
               ) -> np.ndarray:
    """All of :func:`trunk_map_batches` in one ``(N, T, D, h, w)`` float16 array."""
    parts = list(trunk_map_batches(trunk, images, mean, std, transforms, batch_size))
    if not parts:
        raise InputError("no images to compute feature maps of")
    return np.concatenate(parts)


def cache_key(trunk_info: dict, images: np.ndarray | NpyRows, mean: Sequence[float],
              std: Sequence[float], transforms: int) -> dict:
    """What the cached maps depend on: the trunk, a digest of the images, the input
    normalisation and the number of transforms."""
    digest = hashlib.sha256()
    digest.update(str(images.shape).encode())
    for i in range(0, len(images), max(1, len(images) // 64)):
        digest.update(np.ascontiguousarray(images[i]).tobytes())
    # summed 64 images at a time: the same key whether the images are in memory or on disk
    total = sum(images[i:i + 64].sum(dtype=np.float64) for i in range(0, len(images), 64))
    digest.update(np.float64(total).tobytes())
    return {"trunk": trunk_info, "images": digest.hexdigest(), "shape": list(images.shape),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "transforms": int(transforms)}


def cached_trunk_maps(folder: str | Path, key: dict,
                      compute: Callable[[], np.ndarray | Iterable[np.ndarray]],
                      n: int | None = None) -> np.ndarray:
    """Maps from ``folder`` when its ``key.json`` equals ``key``, else ``compute()`` them and
    store them there (``maps.npy``, ``computed.json`` with the seconds computing and writing
    took, and ``key.json`` last, each written whole: :func:`~morphoprof.io_utils.noted_npy`).
    ``compute()`` gives the maps as one array, or as ``(B, ...)`` pieces in order (e.g.
    :func:`trunk_map_batches`) adding up to ``n`` maps, written as they come. Returns the
    maps memory-mapped from ``maps.npy``."""
    folder = Path(folder)
    maps_file = folder / "maps.npy"

    def write(target: Path) -> None:
        t0 = time.perf_counter()
        maps = compute()
        whole = isinstance(maps, np.ndarray)
        if not whole and n is None:
            raise InputError("cached_trunk_maps: pieces need their total n")
        if not (len(maps) if whole else n):
            raise InputError("no images to compute feature maps of")
        write_npy_chunks(target, len(maps) if whole else n, np.float16,
                         [maps] if whole else maps)
        done = np.load(target, mmap_mode="r")
        write_json(folder / "computed.json", {"seconds": time.perf_counter() - t0,
                                              "shape": list(done.shape)})
        logger.info(f"trunk feature maps {done.shape[1:]} x {len(done)} images "
                    f"({done.nbytes / 2**20:.0f} MiB) cached in {target}")

    noted_npy(maps_file, key, write, note=folder / "key.json")
    return np.load(maps_file, mmap_mode="r")


class CachedMapDataset(Dataset):
    """Items ``(feature maps, target)`` for the MIL head from cached ``(N, T, D, h, w)`` maps.

    Training (``train=True``): a random one of the T transforms and a random ``crop`` x
    ``crop`` window of the map (None: the whole map), both a function of the sampler's seed
    (so a resumed run repeats them). Testing: all T copies ``(T, D, h, w)`` (the head averages
    their predictions), or only the identity with ``test_copies=False``.
    """

    def __init__(self, maps: np.ndarray, rows: np.ndarray, targets: np.ndarray,
                 train: bool = False, crop: int | None = None, test_copies: bool = True
                 ) -> None:
        if len(rows) != len(targets):
            raise InputError(f"{len(rows)} rows but {len(targets)} labels")
        self.maps, self.rows = maps, np.asarray(rows, dtype=np.int64)
        t = np.asarray(targets)
        self.targets = torch.from_numpy(t.astype(np.float32 if t.ndim == 2 else np.int64))
        self.train, self.test_copies = train, test_copies
        h, w = maps.shape[-2:]
        if crop is not None and not 1 <= crop <= min(h, w):
            raise InputError(f"map crop {crop} must be 1..{min(h, w)} (the maps are {h}x{w})")
        self.crop = crop

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]):
        k, seed = key if isinstance(key, tuple) else (key, None)
        row = self.rows[k]
        if not self.train:
            x = self.maps[row] if self.test_copies else self.maps[row, :1]
            x = torch.from_numpy(np.asarray(x, dtype=np.float32))
            return (x if self.test_copies else x[0]), self.targets[k]
        rng = np.random.default_rng(seed)
        t = int(rng.integers(0, self.maps.shape[1]))
        x = np.asarray(self.maps[row, t], dtype=np.float32)
        if self.crop is not None:
            h, w = x.shape[-2:]
            y0, x0 = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop
                                                                                + 1))
            x = x[:, y0:y0 + self.crop, x0:x0 + self.crop]
        return torch.from_numpy(np.ascontiguousarray(x)), self.targets[k]


def cache_compute_seconds(folder: str | Path) -> float | None:
    """Seconds the maps cached in ``folder`` took to compute (None if unknown)."""
    try:
        return float(json.loads((Path(folder) / "computed.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
