"""Cell-level typical variation normalisation (TVN; Ando 2017, as Caicedo 2018 used it).

A sphering transform is fitted on the single-cell features of the control cells (or of all
cells when a screen has no controls), streamed from Parquet in row batches so a screen of
millions of cells never sits in memory: only the running sum and the ``(d, d)`` matrix of
cross-products are kept. It is applied to every cell before cells are aggregated to wells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from morphoprof.errors import InputError
from morphoprof.index.schema import COMPOUND, CONTROL, DEFAULT_CONTROLS
from morphoprof.io_utils import arrow_file
from morphoprof.logs import progress_bar
from morphoprof.profiles.aggregate import (
    _ROW_BATCH,
    _column_batches,
    _feature_columns,
    _parquet_columns,
    parquet_sources,
)
from morphoprof.profiles.normalize import Spherize
from morphoprof.settings import Settings

REFERENCES = ("controls", "all")


class CellTVNConfig(Settings):
    """Cell-level TVN before aggregation (:func:`fit_cell_sphering`): a run config's
    ``profiles.cell_tvn``, ``morphoprof aggregate --cell-tvn``."""

    reference: Literal["controls", "all"] | None = Field(
        None, description="cell-level TVN (Ando 2017): sphere every cell's features with a "
        "transform fitted on the control cells (streamed), before aggregating; 'controls' uses "
        "all cells when there are none, and says so (default: off)")
    eps: float = Field(1e-6, ge=0, description="added to the cell covariance's eigenvalues "
                       "before whitening")


@dataclass(frozen=True)
class CellSphering:
    """A fitted cell-level sphering and what it was fitted on.

    Attributes:
        sphering: the fitted :class:`~morphoprof.profiles.normalize.Spherize`.
        features: feature columns, in the order of the transform's rows.
        reference: ``controls`` or ``all``: the cells the transform was fitted on (``all``
            also when ``controls`` was asked for but the screen has no control cells).
        n_cells: cells it was fitted on.
        n_skipped: reference cells left out because a feature was NaN or infinite.
        note: a sentence for the user when the reference fell back to all cells ("" if not).
    """

    sphering: Spherize
    features: tuple[str, ...]
    reference: str
    n_cells: int
    n_skipped: int
    note: str = ""

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(n, d)`` cell features (columns in :attr:`features` order) -> sphered ``(n, d)``
        float64."""
        return self.sphering.transform(x)

    def summary(self) -> dict:
        """JSON-ready description (for ``profiles/cell_tvn.json``)."""
        return {"reference": self.reference, "n_cells": self.n_cells,
                "n_skipped_nonfinite": self.n_skipped, "n_features": len(self.features),
                "mode": self.sphering.mode, "eps": self.sphering.eps, "note": self.note}


class _Moments:
    """Running count, sum and cross-products of rows, shifted by the first batch's mean so
    that the covariance does not lose precision to a large common offset."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s = np.zeros(d)
        self.ss = np.zeros((d, d))

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        if self.shift is None:
            self.shift = x.mean(0)
        xc = x - self.shift
        self.n += len(x)
        self.s += xc.sum(0)
        self.ss += xc.T @ xc

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.s / self.n
        cov = (self.ss - self.n * np.outer(m, m)) / (self.n - 1)
        return m + self.shift, (cov + cov.T) / 2


def _batches(files: list[Path], features: list[str], control: str, compound: str,
             control_values: Sequence[str]):
    """``(features (n, d) float64, is_control (n,) bool)`` per row batch of every file; the
    control flag is ``control`` when a file has it, else ``compound`` in ``control_values``."""
    for path in files:
        for batch in _column_batches(path, [], features + [control, compound]):
            names = set(batch.schema.names)
            absent = [f for f in features if f not in names]
            if absent:
                raise InputError(f"{path}: no feature column(s) {absent[:3]} for cell TVN")
            x = np.stack([batch.column(f).to_numpy(zero_copy_only=False) for f in features],
                         axis=1).astype(np.float64, copy=False)
            if control in names:
                col = batch.column(control)
                try:
                    col = pc.fill_null(col.cast(pa.bool_()), False)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise InputError(f"{path}: {control} is not boolean ({col.type})") from exc
                is_ctl = col.to_numpy(zero_copy_only=False).astype(bool)
            elif compound in names:
                is_ctl = pc.is_in(batch.column(compound).cast(pa.string()),
                                  pa.array(list(control_values), pa.string()))
                is_ctl = pc.fill_null(is_ctl, False).to_numpy(zero_copy_only=False).astype(bool)
            else:
                is_ctl = np.zeros(len(x), bool)
            yield x, is_ctl


def fit_cell_sphering(
    source: str | Path | Sequence[str | Path],
    features: Sequence[str] | None = None,
    reference: str = "controls",
    mode: str = "pca",
    eps: float = 1e-6,
    control_column: str = CONTROL,
    compound_column: str = COMPOUND,
    control_values: Sequence[str] = DEFAULT_CONTROLS,
    metadata: Sequence[str] = (),
) -> CellSphering:
    """Fit TVN on single cells, streamed (one pass over the files).

    Args:
        source: feature folder, Parquet file, folder of Parquet files or list of files (one
            row per cell; ``Metadata_*`` columns and features).
        features: feature columns (default: every column but ``Metadata_*``,
            ``control_column``, ``compound_column`` and the other ``metadata`` names).
        reference: ``controls`` (rows whose ``control_column`` is true) or ``all``. When no
            cell is a control the fit uses all cells and :attr:`CellSphering.note` says so.
        mode: ``pca`` or ``zca`` (see :class:`~morphoprof.profiles.normalize.Spherize`).
        eps: added to the reference covariance's eigenvalues (in the features' squared
            units) before whitening.
        control_column: the boolean control column; where a file lacks it, control cells are
            those whose ``compound_column`` is one of ``control_values``.

    Returns:
        the fitted :class:`CellSphering`; the reference cells' sphered features have zero mean
        and, for ``eps`` small against the eigenvalues, identity covariance. Memory is one row
        batch plus ``2 d^2`` float64 values, whatever the number of cells.
    """
    if reference not in REFERENCES:
        raise InputError(f"cell TVN reference must be one of {REFERENCES}, got {reference!r}")
    files = parquet_sources(source)
    columns, _, rows, non_numeric = _parquet_columns(files)
    feats = _feature_columns(columns, non_numeric, features,
                             [*metadata, control_column, compound_column])
    if not feats:
        raise InputError(f"{files[0]}: no feature columns for cell TVN")
    d = len(feats)
    ctl_m, all_m = _Moments(d), _Moments(d)
    skipped_ctl = skipped_all = 0
    bar = progress_bar(total=rows, desc="cell TVN", unit="cell", unit_scale=True)
    try:
        for x, is_ctl in _batches(files, feats, control_column, compound_column,
                                  control_values):
            bar.update(len(x))
            ok = np.isfinite(x).all(1)
            skipped_all += int((~ok).sum())
            skipped_ctl += int((~ok & is_ctl).sum())
            if reference == "all":
                all_m.add(x[ok])
            else:
                ctl_m.add(x[ok & is_ctl])
                all_m.add(x[ok])  # kept in case there are no controls: one pass, not two
    finally:
        bar.close()
    note = ""
    moments, skipped = (ctl_m, skipped_ctl) if reference == "controls" else (all_m, skipped_all)
    used = reference
    if reference == "controls" and ctl_m.n == 0:
        moments, skipped, used = all_m, skipped_all, "all"
        note = (f"note: cell TVN: no control cells ({control_column} is false everywhere), so "
                f"the sphering is fitted on all {all_m.n} cells")
    if moments.n < 2:
        raise InputError(f"cell TVN needs at least 2 {used} cells with finite features, got "
                         f"{moments.n} in {files[0].parent if len(files) > 1 else files[0]}")
    if moments.n <= len(feats):
        warn = (f"warning: cell TVN: {moments.n} {used} rows for {len(feats)} features, so their "
                "covariance is singular and the sphering scales directions without variance by "
                f"1/sqrt(eps) = {1 / np.sqrt(eps):.3g}, amplifying noise; fit it on more cells "
                "(single cells, not well or field rows) or raise eps")
        note = f"{note}; {warn}" if note else warn
    mean, cov = moments.mean_cov()
    return CellSphering(Spherize(mode, eps).fit_moments(mean, cov), tuple(feats), used,
                        moments.n, skipped, note)


def sphere_parquet(source: str | Path | Sequence[str | Path], sphering: CellSphering,
                   out_dir: str | Path) -> list[Path]:
    """Write every cell of ``source`` with its features sphered, one Parquet file per input
    file in ``out_dir`` (streamed in row batches; metadata columns kept). Used where an
    aggregation is not affine (medians); for means, :func:`aggregate_parquet` applies the
    transform to the well means instead, which is the same."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    feats = list(sphering.features)
    written = []
    for k, path in enumerate(parquet_sources(source)):
        target = out_dir / f"part-{k:05d}.parquet"
        writer = None
        with arrow_file(path) as src:
            reader = pq.ParquetFile(src)
            for batch in reader.iter_batches(_ROW_BATCH, use_threads=False):
                x = np.stack([batch.column(f).to_numpy(zero_copy_only=False) for f in feats],
                             axis=1).astype(np.float64, copy=False)
                y = sphering.transform(x).astype(np.float32)
                cols = {n: batch.column(n) for n in batch.schema.names if n not in feats}
                cols.update({f: pa.array(y[:, j]) for j, f in enumerate(feats)})
                table = pa.table(cols)
                if writer is None:
                    writer = pq.ParquetWriter(target, table.schema)
                writer.write_table(table)
        if writer is not None:
            writer.close()
            written.append(target)
    return written
