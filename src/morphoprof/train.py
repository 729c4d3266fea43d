"""Training runs from YAML: the ``train`` stages as one function each, above the config reader.

:func:`train_from_yaml` (finetune / mil) and :func:`train_weak_from_yaml` write a config's text
into a run folder and run it; :func:`load_trained_mil` reads a finished ``train mil`` run back.
The training itself lives in :mod:`morphoprof.models`, which takes validated configs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from morphoprof.config import load_train_config, load_weak_config
from morphoprof.errors import InputError
from morphoprof.models.cv_result import CVResult
from morphoprof.models.run import run_training, trained_mil
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
    config = Path(folder) / "train_mil.yaml"
    if not config.is_file():
        raise InputError(f"not a finished train mil run: {config} not found")
    cfg, _ = load_train_config(config, "mil")
    return trained_mil(folder, cfg, fold)
