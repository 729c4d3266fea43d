"""Training runs from YAML: the ``train`` stages as one function each, above the config reader.

:func:`train_from_yaml` (finetune / mil) and :func:`train_weak_from_yaml` write a config's text
into a run folder and run it; :func:`load_trained_mil` reads a finished ``train mil`` run back and
:func:`segment_with_mil` segments image sets with it (Jacobian maps and masks, Kraus 2016).
The training itself lives in :mod:`morphoprof.models`, which takes validated configs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from morphoprof.config import load_train_config, load_weak_config
from morphoprof.errors import InputError
from morphoprof.index.schema import ExperimentIndex
from morphoprof.models.cv_result import CVResult
from morphoprof.models.run import run_training, trained_mil, training_images, training_index
from morphoprof.models.settings import TrainConfig
from morphoprof.models.weak_result import WeakResult
from morphoprof.models.weak_run import run_weak


def write_config(text: str, folder: str | Path, fresh: bool = True) -> Path:
    """Write a config's ``text`` to ``folder/config.yaml`` with ``output`` set to ``folder``
    (emptied first when ``fresh``); returns the file's path."""
    folder = Path(folder)
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(f"{text.rstrip()}\noutput: {folder.resolve()}\n")
    return path


def train_from_yaml(kind: str, text: str, folder: str | Path, fresh: bool = True
                    ) -> CVResult:
    """Write a training config's ``text`` to ``folder/config.yaml`` and run it (``kind``:
    ``finetune`` | ``mil``), with ``output`` set to ``folder``. ``fresh`` empties the folder
    first; otherwise finished folds are reused (resume)."""
    cfg, text = load_train_config(write_config(text, folder, fresh), kind)
    return run_training(kind, cfg, text)


def train_weak_from_yaml(text: str, folder: str | Path, fresh: bool = True
                         ) -> WeakResult | None:
    """Write a weak config's ``text`` to ``folder/config.yaml`` (``output`` = ``folder``) and
    run it; ``fresh`` empties the folder first. The result gets ``wall_seconds``; None in
    every process of a multi-process run but the first."""
    cfg, text = load_weak_config(write_config(text, folder, fresh))
    t0 = time.perf_counter()
    summary = run_weak(cfg, text)
    if summary is None:
        return None
    return summary.with_wall_seconds(time.perf_counter() - t0)


def load_trained_mil(folder: str | Path, fold: int = 0):
    """The whole trained MIL network (eval mode) of ``fold`` of a finished ``train mil`` run in
    ``folder`` (its ``output``, holding the ``train_mil.yaml`` it ran), and its input
    ``(mean, std)``."""
    return trained_mil(folder, _mil_run_config(folder), fold)


def _mil_run_config(folder: str | Path) -> TrainConfig:
    """The validated config a finished ``train mil`` run in ``folder`` ran."""
    config = Path(folder) / "train_mil.yaml"
    if not config.is_file():
        raise InputError(f"not a finished train mil run: {config} not found")
    return load_train_config(config, "mil")[0]


def segment_with_mil(folder: str | Path, index: ExperimentIndex | None = None,
                     rows=None, fold: int = 0, batch_size: int = 8,
                     smoothness: float | None = None, power: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Segment image sets with a finished ``train mil`` run, from image labels only (Kraus
    2016): each field's guided-backprop Jacobian map of its predicted class (eq. 4) and the
    map's mask (:func:`~morphoprof.models.jacobian.mrf_mask`, contrast-sensitive with the field
    itself). The fields are read and scaled as the run read its images, so they must be
    prepared as its training images were: the 6-MoA networks' masks of two raw BBBC021 fields
    score 0.78 prepared as the 6-MoA PNGs (Anscombe, DMSO-standardised) and 0.58 scaled by
    their percentiles (``benchmarks/mil_6moa.py``'s ``raw_fields_one_fifth``).

    Args:
        folder: the run's ``output`` (holding the ``train_mil.yaml`` it ran).
        index: the image sets to segment, with the run's channels (its ``channels``, else as
            many as it was trained on, in the same order); default: the run's own (its
            ``data`` section and ``select``).
        rows: row positions of ``index`` (default: all).
        fold: whose network.
        batch_size: fields per backward pass.
        smoothness, power: the mask's MRF settings (default: the contrast-sensitive MRF's,
            chosen for the pretrained trunks; a ``kraus`` network's maps are masked better at
            ``power=0.25``, see ``benchmarks/mil_6moa.py``'s ``mask_selection``).

    Returns:
        ``(maps, masks)``: ``(N, S, S)`` float32 maps (>= 0) and ``(N, S, S)`` bool masks, at
        the run's image size ``S`` (its ``images.size``; the native size where that is unset).
    """
    from morphoprof.models.jacobian import field_maps, mrf_mask

    cfg = _mil_run_config(folder)
    net, mean, std = trained_mil(folder, cfg, fold)
    if index is None:
        index = training_index(cfg, folder)
    channels = cfg.channels or index.channels
    missing = [c for c in channels if c not in index.channels]
    if missing:
        raise InputError(f"the index has no channel {missing[0]!r}; the run in {folder} was "
                         f"trained on {list(channels)}")
    if len(channels) != len(mean):
        raise InputError(f"the index has {len(channels)} channels {list(channels)}; the run in "
                         f"{folder} was trained on {len(mean)}")
    if rows is not None and len(rows) == 0:
        raise InputError("segment_with_mil: no rows to segment")
    images = training_images(cfg, index, rows)
    maps = field_maps(net, images, mean, std, batch_size)
    masks = np.stack([mrf_mask(j, smoothness, power=power, image=f)
                      for j, f in zip(maps, images)])
    return maps, masks
