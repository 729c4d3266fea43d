"""Group-held-out cross-validation of image classifiers, with treatment-level predictions and
conformal prediction sets.

For each fold a fresh network is trained on the images of the training groups (compounds) and
predicts the held-out groups' images; a treatment's prediction aggregates its images'
probabilities (mean over images, or the median over replicate wells of the well means). The
out-of-fold probabilities then give conformal sets: the sets of a group's treatments are
calibrated on the out-of-fold scores (1 - probability of the true class) of every *other* group,
each produced by a model that never saw that group.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch.utils.data import Dataset

from morphoprof.classification import (
    ClassificationSummary,
    conformal_threshold,
    prediction_sets,
    set_metrics,
)
from morphoprof.errors import InputError
from morphoprof.index.schema import PLATE, WELL, ExperimentIndex
from morphoprof.io_utils import write_json, write_npy, write_parquet
from morphoprof.models.cv_result import CVResult, FoldResult
from morphoprof.models.data import ImageTensorDataset, take_rows
from morphoprof.models.settings import CVSection, ImagesSection, TrainConfig, TrainSection
from morphoprof.models.splits import group_folds, split_groups
from morphoprof.models.training import (
    ImageClassifier,
    fit,
    predict_proba,
    recalibrate_batch_norm,
    write_torch,
)

logger = logging.getLogger(__name__)


class CVConfig(CVSection):
    """Cross-validation settings: the ``cv`` section's (``group`` held out whole, ``folds``,
    the ``treatment`` columns predictions are aggregated to, conformal ``alpha``,
    ``val_fraction``), with the config's ``label`` and ``train.seed`` (seeding folds,
    validation wells and training), the ``images`` section's training ``augment`` and ``crop``
    and the input normalisation; every default is the training config's.

    Attributes:
        aggregate: ``mean`` of image probabilities, or ``median`` over wells of well means
            (Kraus's choice for MIL); here resolved, where the section leaves it to the kind.
        mean, std: per-channel input normalisation, passed with ``augment`` and ``crop`` to
            :class:`ImageTensorDataset`.
    """

    label: str = TrainConfig.model_fields["label"]
    aggregate: Literal["mean", "median"] = Field("mean", description="image probabilities to "
                                                 "treatments")
    seed: int = TrainSection.model_fields["seed"]
    augment: bool = ImagesSection.model_fields["augment"]
    crop: int | None = ImagesSection.model_fields["crop"]
    mean: tuple[float, ...] = Field((0.0,), strict=False, description="per-channel input mean")
    std: tuple[float, ...] = Field((1.0,), strict=False, description="per-channel input "
                                   "standard deviation")


def treatment_probabilities(meta: pd.DataFrame, probs: np.ndarray, keys: Sequence[str],
                            aggregate: str = "mean") -> tuple[pd.DataFrame, np.ndarray]:
    """Aggregate image probabilities ``(N, K)`` to treatments: mean over a treatment's images,
    or (``median``) the median over its wells of each well's mean. Returns the treatments' key
    table and their ``(T, K)`` probabilities (rows renormalised to sum to 1)."""
    if aggregate not in ("mean", "median"):
        raise InputError(f"treatment aggregation must be mean or median, got {aggregate!r}")
    keys = list(keys)
    k = probs.shape[1]
    cols = [f"p{j}" for j in range(k)]
    df = pd.concat([meta.reset_index(drop=True), pd.DataFrame(probs, columns=cols)], axis=1)
    if aggregate == "median":
        wells = [c for c in (PLATE, WELL) if c in df.columns and c not in keys]
        if not wells and not {PLATE, WELL} & set(keys):
            raise InputError("median aggregation over wells needs Metadata_plate/Metadata_well")
        df = df.groupby(keys + wells, sort=False, dropna=False)[cols].mean().reset_index()
        agg = df.groupby(keys, sort=False, dropna=False)[cols].median().reset_index()
    else:
        agg = df.groupby(keys, sort=False, dropna=False)[cols].mean().reset_index()
    p = agg[cols].to_numpy(np.float64, copy=True)
    p /= np.where(p.sum(1, keepdims=True) > 0, p.sum(1, keepdims=True), 1.0)
    return agg[keys], p


def group_conformal(probs: np.ndarray, true: np.ndarray, groups: np.ndarray, alpha: float
                    ) -> np.ndarray:
    """Conformal sets ``(T, K)`` from out-of-fold probabilities: each group's rows use the
    threshold calibrated on the other groups' scores ``1 - p(true class)``."""
    scores = 1.0 - probs
    true_scores = scores[np.arange(len(true)), true]
    sets = np.zeros(probs.shape, bool)
    for g in np.unique(groups):
        test = groups == g
        thr = conformal_threshold(true_scores[~test], alpha)
        sets[test] = prediction_sets(scores[test], thr)
    return sets


def cross_validate(
    index: ExperimentIndex,
    images: np.ndarray,
    make_module: Callable[[int], ImageClassifier],
    out_dir: str | Path,
    cv: CVConfig | None = None,
    fit_cfg: TrainSection | None = None,
    make_dataset: Callable[[np.ndarray, np.ndarray, bool], Dataset] | None = None,
) -> CVResult:
    """Train and test one model per fold; write ``predictions.parquet`` (out-of-fold image
    probabilities), ``treatments.parquet`` and ``cv.json`` in ``out_dir``; return the results.

    Args:
        index: the images' experiment index (row i <-> ``images[i]``).
        images: ``(N, C, H, W)`` float32, already resized and normalised (in memory, or an
            :class:`~morphoprof.io_utils.NpyRows` read item by item).
        make_module: builds a fresh, seeded :class:`ImageClassifier` (argument: the fold).
        make_dataset: ``(rows, targets, train) -> Dataset`` to serve something other than
            ``images`` (e.g. a frozen trunk's cached feature maps); default: the images with
            ``cv``'s augmentation, crop and normalisation.
        out_dir: fold folders (checkpoints, metrics) and results go here; a fold whose
            predictions exist is not retrained (resume).

    Returns:
        The :class:`~morphoprof.models.cv_result.CVResult` (also written as ``cv.json``).
    """
    cv = cv or CVConfig()
    fit_cfg = fit_cfg or TrainSection()
    out_dir = Path(out_dir)
    table = index.table.reset_index(drop=True)
    if make_dataset is None and len(images) != len(table):
        raise InputError(f"{len(images)} images for an index of {len(table)} rows")
    classes, y = _labels(table, cv)
    wells = (table[PLATE].astype(str) + "/" + table[WELL].astype(str)).to_numpy()
    folds = group_folds(table, cv.label, cv.group, cv.folds, cv.seed)
    make_dataset = make_dataset or _image_datasets(images, cv)

    probs = np.full((len(table), len(classes)), np.nan)
    fold_of = np.full(len(table), -1)
    fold_results, train_seconds = [], 0.0
    for f, (train_rows, test_rows) in enumerate(folds):
        held = sorted(table[cv.group].iloc[test_rows].astype(str).unique())
        name = f"fold {f + 1}/{len(folds)}"
        if not (out_dir / f"fold{f}" / _DONE).is_file():
            logger.info(f"{name}: train {len(train_rows)} images, test {len(test_rows)} "
                        f"({cv.group} held out: {', '.join(held)})")
        p, info = _fold(out_dir / f"fold{f}", f, train_rows, test_rows, y, wells,
                        make_module, make_dataset, cv, fit_cfg, name)
        probs[test_rows] = p
        fold_of[test_rows] = f
        train_seconds += float(info["seconds"])
        acc = float((p.argmax(1) == y[test_rows]).mean())
        fold_results.append(FoldResult(f, tuple(held), int(len(train_rows)),
                                       int(len(test_rows)), acc, float(info["seconds"]),
                                       info["epochs_run"]))
        logger.info(f"fold {f + 1}/{len(folds)}: image accuracy {acc:.3f} on held-out {cv.group}")
    write_parquet(out_dir / "predictions.parquet", table[[
        c for c in table.columns if c.startswith("Metadata_")]].assign(
        Metadata_fold=fold_of, **{f"p_{c}": probs[:, k] for k, c in enumerate(classes)}))

    ttrue, tpred, conformal = _treatments(table, probs, classes, cv, out_dir)
    result = CVResult(
        classes=tuple(classes), label=cv.label, group=cv.group, n_images=int(len(table)),
        folds=tuple(fold_results), image_accuracy=float((probs.argmax(1) == y).mean()),
        treatment=ClassificationSummary.from_indices(ttrue, tpred, classes),
        treatment_aggregation=cv.aggregate, conformal=conformal, train_seconds=train_seconds)
    write_json(out_dir / "cv.json", result.to_json())
    return result


def _image_datasets(images: np.ndarray, cv: CVConfig):
    """``(rows, targets, train) -> Dataset`` of ``images``: augmented and cropped as ``cv``
    says for training, plain for validation and test; normalised either way."""
    def make_dataset(rows: np.ndarray, targets: np.ndarray, train: bool) -> Dataset:
        if train:
            return ImageTensorDataset(take_rows(images, rows), targets, augment=cv.augment,
                                      crop=cv.crop, mean=cv.mean, std=cv.std)
        return ImageTensorDataset(take_rows(images, rows), targets, mean=cv.mean, std=cv.std)

    return make_dataset


_DONE = "test_probabilities.npy"  # a fold's predictions: written last, so it marks it done
MODEL = "model.ckpt"  # the network that made a fold's predictions (best, BN recalibrated)


def _labels(table: pd.DataFrame, cv: CVConfig) -> tuple[list[str], np.ndarray]:
    """(the sorted class names, each row's class index); an index without the columns ``cv``
    names, or a row without a label, is an error."""
    need = [c for c in (cv.label, cv.group, *cv.treatment) if c not in table.columns]
    if need:
        raise InputError(f"the index has no column(s) {need}; found {list(table.columns)}")
    missing = table[cv.label].isna() | (table[cv.label].astype(str).str.strip() == "")
    if missing.any():
        raise InputError(f"{int(missing.sum())} image(s) have no {cv.label!r} label, e.g. rows "
                         f"{list(np.flatnonzero(missing)[:5])}")
    classes = sorted(table[cv.label].astype(str).unique())
    class_index = {c: k for k, c in enumerate(classes)}
    return classes, table[cv.label].astype(str).map(class_index).to_numpy()


def _fold(fold_dir: Path, f: int, train_rows: np.ndarray, test_rows: np.ndarray,
          y: np.ndarray, wells: np.ndarray, make_module, make_dataset, cv: CVConfig,
          fit_cfg: TrainSection, name: str) -> tuple[np.ndarray, dict]:
    """Train fold ``f`` (validation wells split off its training rows) and predict its test
    rows: ``(probabilities (n_test, K), fit info)``. A fold whose predictions exist is reused."""
    done = fold_dir / _DONE
    if done.is_file():
        logger.info(f"{name}: reusing {done}")
        return np.load(done), json.loads((fold_dir / "fit.json").read_text())
    keep, val = split_groups(wells[train_rows], cv.val_fraction, cv.seed + f)
    train_ds = make_dataset(train_rows[keep], y[train_rows[keep]], True)
    val_ds = make_dataset(train_rows[val], y[train_rows[val]], False) if len(val) else None
    module = make_module(f)
    info = fit(module, train_ds, fold_dir, fit_cfg, val_ds)
    if val_ds is not None:
        state = torch.load(info["best_checkpoint"], map_location="cpu",
                           weights_only=False)["state_dict"]
        module.load_state_dict(state)
    if fit_cfg.recalibrate_bn:
        info["recalibrated_bn_layers"] = recalibrate_batch_norm(
            module, make_dataset(train_rows[keep], y[train_rows[keep]], False),
            fit_cfg.batch_size)
    p = predict_proba(module, make_dataset(test_rows, y[test_rows], False),
                      batch_size=fit_cfg.batch_size)
    write_torch(fold_dir / MODEL, {"state_dict": module.state_dict()})
    write_json(fold_dir / "fit.json", info)
    write_npy(done, p)
    return p, info


def _treatments(table: pd.DataFrame, probs: np.ndarray, classes: list[str], cv: CVConfig,
                out_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Treatment-level results of out-of-fold image probabilities: (true and predicted class
    per treatment, the group-conformal summary); ``treatments.parquet`` is written."""
    class_index = {c: k for k, c in enumerate(classes)}
    keys, tprobs = treatment_probabilities(table, probs, cv.treatment, cv.aggregate)
    key_index = pd.MultiIndex.from_frame(keys) if len(cv.treatment) > 1 else keys.iloc[:, 0]
    first = table.groupby(list(cv.treatment), sort=False, dropna=False)[
        list(dict.fromkeys([cv.label, cv.group]))].first().loc[key_index]
    ttrue = first[cv.label].astype(str).map(class_index).to_numpy()
    tpred = tprobs.argmax(1)
    sets = group_conformal(tprobs, ttrue, first[cv.group].astype(str).to_numpy(), cv.alpha)
    tt = keys.copy()
    tt["Metadata_label"] = [classes[k] for k in ttrue]
    tt["Metadata_predicted"] = [classes[k] for k in tpred]
    tt["Metadata_set"] = [";".join(classes[k] for k in np.flatnonzero(s)) for s in sets]
    for k, c in enumerate(classes):
        tt[f"p_{c}"] = tprobs[:, k]
    write_parquet(out_dir / "treatments.parquet", tt)
    return ttrue, tpred, {"alpha": cv.alpha, "target_coverage": 1 - cv.alpha,
                          **set_metrics(sets, ttrue)}
