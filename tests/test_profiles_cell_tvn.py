"""Cell-level TVN: sphering fitted on control cells streamed from Parquet, applied before
aggregation (Caicedo 2018's profiling step)."""

import json

import numpy as np
import pandas as pd
import pytest

from morphoprof.cli import main
from morphoprof.errors import InputError
from morphoprof.profiles import aggregate as agg
from morphoprof.profiles.cell_tvn import fit_cell_sphering
from morphoprof.profiles.normalize import Spherize


def correlated_cells(n_wells=12, cells=40, d=6, seed=0):
    """Cells with strongly correlated, offset features; the first 4 wells are DMSO controls
    whose covariance differs from the treated cells'."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) + 3 * np.eye(d)
    rows = []
    for w in range(n_wells):
        control = w < 4
        x = rng.normal(size=(cells, d)) @ mix + 100.0  # large offset: tests the shifted sums
        if not control:
            x[:, 0] += 5 * rng.normal(size=cells) + w  # treated cells vary more
        df = pd.DataFrame(x, columns=[f"f{i}" for i in range(d)])
        df.insert(0, "Metadata_plate", "P1" if w % 2 else "P2")
        df.insert(1, "Metadata_well", f"W{w:02d}")
        df.insert(2, "Metadata_compound", "DMSO" if control else f"c{w}")
        df.insert(3, "Metadata_concentration", 0.0 if control else 1.0)
        df.insert(4, "Metadata_control", control)
        rows.append(df)
    return pd.concat(rows, ignore_index=True)


def write_parts(cells, folder, parts=3):
    folder.mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(cells)), parts)):
        cells.iloc[part].to_parquet(folder / f"part{k}.parquet")
    return folder


def test_cell_tvn_whitens_control_cells_and_is_streamed(tmp_path, monkeypatch):
    cells = correlated_cells()
    folder = write_parts(cells, tmp_path / "cells")
    monkeypatch.setattr(agg, "_ROW_BATCH", 37)  # many small batches per file: truly streamed
    import tqdm.auto

    from morphoprof.logs import progress

    bars, real = [], tqdm.auto.tqdm
    monkeypatch.setattr("morphoprof.logs.tqdm",  # what progress_bar makes its bars with
                        lambda *a, **k: bars.append(real(*a, **k)) or bars[-1])
    with progress(True):  # the fit shows the cells it has read
        fitted = fit_cell_sphering(folder, reference="controls", eps=1e-9)
    assert bars[0].desc == "cell TVN" and bars[0].total == bars[0].n == len(cells)
    assert fitted.reference == "controls" and fitted.n_cells == 160 and fitted.note == ""
    feats = list(fitted.features)
    assert feats == [f"f{i}" for i in range(6)]

    ctl = cells.loc[cells["Metadata_control"], feats].to_numpy()
    z = fitted.transform(ctl)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-8)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(6), atol=1e-6)
    # treated cells are not white (the transform is the controls', not theirs)
    treated = fitted.transform(cells.loc[~cells["Metadata_control"], feats].to_numpy())
    assert np.trace(np.cov(treated, rowvar=False)) > 6 + 2
    # the streamed fit equals the in-memory one
    ref = Spherize("pca", 1e-9).fit(ctl)
    np.testing.assert_allclose(np.abs(fitted.sphering.matrix_), np.abs(ref.matrix_), rtol=1e-6,
                               atol=1e-9)

    # applied before aggregation: means and medians of sphered cells, per well
    sphered = cells.copy()
    sphered[feats] = fitted.transform(cells[feats].to_numpy())
    for how in ("mean", "median"):
        got = agg.aggregate_parquet(folder, ["Metadata_plate", "Metadata_well"], how,
                                    sphering=fitted)
        want = sphered.groupby(["Metadata_plate", "Metadata_well"])[feats].agg(how)
        np.testing.assert_allclose(got[feats].to_numpy(), want.to_numpy(), rtol=1e-4,
                                   atol=1e-4)


def test_cell_tvn_falls_back_to_all_cells_and_controls_from_compound(tmp_path):
    cells = correlated_cells()
    no_ctl = cells.assign(Metadata_control=False)
    fitted = fit_cell_sphering(write_parts(no_ctl, tmp_path / "a"), reference="controls")
    assert fitted.reference == "all" and fitted.n_cells == len(cells)
    assert "no control cells" in fitted.note and str(len(cells)) in fitted.note
    # without a control column, DMSO in the compound column marks the controls
    by_name = fit_cell_sphering(write_parts(cells.drop(columns="Metadata_control"),
                                            tmp_path / "b"))
    assert by_name.reference == "controls" and by_name.n_cells == 160
    # non-finite cells are left out of the fit and counted
    bad = cells.copy()
    bad.loc[[0, 1], "f2"] = np.nan
    skipped = fit_cell_sphering(write_parts(bad, tmp_path / "c"))
    assert skipped.n_cells == 158 and skipped.n_skipped == 2
    with pytest.raises(InputError, match="reference"):
        fit_cell_sphering(tmp_path / "a", reference="dmso")
    # fewer rows than features (well or field rows, not cells): the covariance is singular
    few = fit_cell_sphering(write_parts(cells.head(5), tmp_path / "d", parts=1), reference="all")
    assert "5 all rows for 6 features" in few.note and "singular" in few.note
    assert "warning" not in fitted.note


def test_aggregate_cli_cell_tvn(tmp_path, capsys):
    cells = correlated_cells()
    folder = write_parts(cells.assign(Metadata_control=False), tmp_path / "cells")
    out = tmp_path / "profiles"
    assert main(["aggregate", str(folder), "--out", str(out), "--normalize", "none",
                 "--cell-tvn", "controls"]) == 0
    said = capsys.readouterr().err
    assert "no control cells" in said
    summary = json.loads((out / "cell_tvn.json").read_text())
    assert summary["reference"] == "all" and summary["n_cells"] == len(cells)
    wells = pd.read_parquet(out / "wells.parquet")
    fitted = Spherize.load(out / "cell_tvn.npz")
    feats = [f"f{i}" for i in range(6)]
    raw = cells.groupby(["Metadata_plate", "Metadata_well"])[feats].mean()
    np.testing.assert_allclose(wells[feats].to_numpy(), fitted.transform(raw.to_numpy()),
                               rtol=1e-4, atol=1e-4)
    # the whole screen's cells are white: well means of sphered cells average to 0
    assert np.abs(wells[feats].to_numpy().mean(0)).max() < 1e-3
