"""Single-cell training data for weak supervision (Caicedo et al. 2018).

Every training item is a *sequence* of ``L`` cells of one treatment label, drawn from different
batches (and, within a batch, different wells) in random order: the label is drawn uniformly
first, so classes are balanced whatever their cell counts. With ``L = 1`` this is plain
class-balanced sampling; ``L`` in (3, 5, 8) feeds the GRU set regularizer.

Each cell is augmented (flips, 90-degree rotations, small translations) and, with mixup, blended
with a partner cell of a uniformly drawn label from another batch (else another well), with
weight ``lambda ~ Beta(alpha, alpha)``; its target is then ``lambda * e_a + (1 - lambda) * e_b``.

Items are pure functions of ``(seed, L)`` keys from :class:`SequenceBatchSampler`, itself a pure
function of (seed, epoch), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from morphoprof.errors import InputError
from morphoprof.models.data import augment_crop, item_source, item_tensor, process_rank


@dataclass
class CellGroups:
    """Where every training cell sits: its label, batch and well, as integer codes ``(N,)``.

    ``groups[label][batch][well]`` is the array of cell positions of that label in that batch
    and well (only non-empty entries are kept)."""

    labels: np.ndarray
    batches: np.ndarray
    wells: np.ndarray
    n_classes: int

    def __post_init__(self) -> None:
        n = len(self.labels)
        if not (len(self.batches) == len(self.wells) == n):
            raise InputError("labels, batches and wells must have one entry per cell")
        if n == 0:
            raise InputError("no training cells")
        missing = sorted(set(range(self.n_classes)) - set(np.unique(self.labels).tolist()))
        if missing:
            raise InputError(f"label code(s) {missing} have no training cells")
        self.groups: list[dict[int, dict[int, np.ndarray]]] = [{} for _ in range(self.n_classes)]
        keys = np.stack([self.labels, self.batches, self.wells], 1).astype(np.int64)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        order = np.argsort(inverse.ravel(), kind="stable")
        parts = np.split(order, np.cumsum(np.bincount(inverse.ravel()))[:-1])
        for (lab, bat, well), part in zip(uniq.tolist(), parts, strict=True):
            self.groups[lab].setdefault(bat, {})[well] = part

    def draw_sequence(self, rng: np.random.Generator, length: int,
                      label: int | None = None) -> tuple[int, np.ndarray]:
        """``(label, cells (length,))``: a uniformly drawn label (unless given) and ``length``
        of its cells from as many different batches as it has (batches in random order, cycled
        when there are fewer than ``length``), each from a well not yet used where possible."""
        lab = int(rng.integers(self.n_classes)) if label is None else int(label)
        by_batch = self.groups[lab]
        batches = list(by_batch)
        order = [batches[i] for i in rng.permutation(len(batches))]
        used_wells: set[tuple[int, int]] = set()
        cells = np.empty(length, np.int64)
        for k in range(length):
            b = order[k % len(order)]
            wells = list(by_batch[b])
            fresh = [w for w in wells if (b, w) not in used_wells] or wells
            w = fresh[int(rng.integers(len(fresh)))]
            used_wells.add((b, w))
            pool = by_batch[b][w]
            cells[k] = pool[int(rng.integers(len(pool)))]
        return lab, cells

    def draw_partner(self, rng: np.random.Generator, cell: int) -> int:
        """A mixup partner for ``cell``: a cell of a uniformly drawn label, from another batch
        when that label has one, else from another well, else any of its cells."""
        lab = int(rng.integers(self.n_classes))
        by_batch = self.groups[lab]
        own_batch, own_well = int(self.batches[cell]), int(self.wells[cell])
        other = [b for b in by_batch if b != own_batch]
        if other:
            b = other[int(rng.integers(len(other)))]
            wells = list(by_batch[b])
        else:
            b = own_batch
            wells = [w for w in by_batch[b] if w != own_well] or list(by_batch[b])
        pool = by_batch[b][wells[int(rng.integers(len(wells)))]]
        return int(pool[int(rng.integers(len(pool)))])


class WeakTrainSet(Dataset):
    """Training items ``(x (L, C, S, S), y (L, K), y_seq (K,))`` keyed by ``(seed, L)``.

    Args:
        crops: ``(N, C, S, S)`` float32 crops, intensities normalised (e.g. per-crop max),
            in memory or read item by item (:func:`~morphoprof.models.data.item_source`).
        groups: the cells' labels, batches and wells.
        mixup_alpha: Beta(alpha, alpha) mixing weights; 0 turns mixup off.
        shift: largest random translation, px.
        augment: flips, rotations and translations on or off.
        mean, std: per-channel network input normalisation, applied last.
    """

    def __init__(self, crops: np.ndarray, groups: CellGroups, mixup_alpha: float = 0.0,
                 shift: int = 4, augment: bool = True, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,)) -> None:
        if len(crops) != len(groups.labels):
            raise InputError(f"{len(crops)} crops but {len(groups.labels)} labels")
        if mixup_alpha < 0:
            raise InputError(f"mixup alpha must be >= 0, got {mixup_alpha}")
        self.crops = item_source(crops)
        self.groups = groups
        self.alpha = float(mixup_alpha)
        self.shift, self.augment = int(shift), augment
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.eye = torch.eye(groups.n_classes)

    def __len__(self) -> int:
        return len(self.crops)

    def _view(self, cell: int, gen: torch.Generator) -> torch.Tensor:
        x = item_tensor(self.crops, cell)
        return augment_crop(x, gen, self.shift) if self.augment else x

    def item(self, seed: int, length: int) -> dict:
        """The sequence for a key, with the cells it used (``cells``, ``partners``, ``lam``)."""
        rng = np.random.default_rng([int(seed), 1])
        gen = torch.Generator().manual_seed(int(seed) % 2**63)
        lab, cells = self.groups.draw_sequence(rng, length)
        xs, ys, partners, lams = [], [], [], []
        for c in cells:
            x, y = self._view(int(c), gen), self.eye[lab]
            if self.alpha > 0:
                p = self.groups.draw_partner(rng, int(c))
                lam = float(rng.beta(self.alpha, self.alpha))
                x = lam * x + (1 - lam) * self._view(p, gen)
                y = lam * y + (1 - lam) * self.eye[int(self.groups.labels[p])]
                partners.append(p)
                lams.append(lam)
            xs.append((x - self.mean) / self.std)
            ys.append(y)
        y = torch.stack(ys)
        return {"x": torch.stack(xs), "y": y, "y_seq": y.mean(0), "label": lab,
                "cells": cells, "partners": np.asarray(partners, np.int64),
                "lam": np.asarray(lams)}

    def __getitem__(self, key: tuple[int, int]):
        seed, length = key
        it = self.item(seed, length)
        return it["x"], it["y"], it["y_seq"]


class SequenceBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(seed, L)`` keys, a pure function of (seed, epoch).

    Each batch draws one sequence length ``L`` from ``lengths`` and holds
    ``max(1, batch_cells // L)`` sequences, so a batch has about ``batch_cells`` cells whatever
    ``L``. Under torch.distributed each process takes batches ``rank::world_size``."""

    def __init__(self, n_batches: int, batch_cells: int, lengths: Sequence[int] = (1,),
                 seed: int = 0) -> None:
        if n_batches < 1 or batch_cells < 1:
            raise InputError("need at least one batch of at least one cell")
        if not lengths or min(lengths) < 1:
            raise InputError(f"sequence lengths must be >= 1, got {list(lengths)}")
        self.n_batches, self.batch_cells = int(n_batches), int(batch_cells)
        self.lengths, self.seed, self.epoch = [int(v) for v in lengths], int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[tuple[int, int]]]:
        """Every batch of the current epoch (all ranks)."""
        rng = np.random.default_rng([self.seed, self.epoch, 3])
        out = []
        for _ in range(self.n_batches):
            length = self.lengths[int(rng.integers(len(self.lengths)))]
            n = max(1, self.batch_cells // length)
            out.append([(int(s), length) for s in rng.integers(0, 2**62, n)])
        return out

    def __iter__(self):
        batches = self.batches()
        rank, world = process_rank()
        if world > 1:
            per = -(-len(batches) // world)
            batches = (batches * world)[:per * world][rank::world]
        return iter(batches)

    def __len__(self) -> int:
        return -(-self.n_batches // process_rank()[1])
