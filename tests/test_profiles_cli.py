"""The profile commands (aggregate, normalize, evaluate, report) over Parquet files that use
other metadata column names (pycytominer / Cell Painting Gallery style)."""

import json

import numpy as np
import pandas as pd

from morphoprof.cli import main
from tests.test_evaluation_evaluate import make_wells

RENAME = {"Metadata_plate": "Metadata_Plate", "Metadata_well": "Metadata_Well",
          "Metadata_compound": "Metadata_broad_sample",
          "Metadata_concentration": "Metadata_mmoles_per_liter",
          "Metadata_moa": "Metadata_MoA", "Metadata_batch": "Metadata_Batch"}
COLS = ["--plate-col", "Metadata_Plate", "--well-col", "Metadata_Well",
        "--compound-col", "Metadata_broad_sample",
        "--concentration-col", "Metadata_mmoles_per_liter", "--moa-col", "Metadata_MoA",
        "--batch-col", "Metadata_Batch", "--control-value", "DMSO"]


def cell_table(seed=0, cells_per_well=5):
    """Single cells around make_wells' well means, with no control column (DMSO marks them)."""
    wells = make_wells(seed).drop(columns=["Metadata_control", "Metadata_count"])
    rng = np.random.default_rng(seed)
    feats = [c for c in wells.columns if not c.startswith("Metadata_")]
    cells = wells.loc[wells.index.repeat(cells_per_well)].reset_index(drop=True)
    cells[feats] = cells[feats] + 0.3 * rng.normal(size=(len(cells), len(feats)))
    cells["Metadata_ObjectNumber"] = np.tile(np.arange(cells_per_well), len(wells))
    return cells.rename(columns=RENAME)


def test_profile_commands_with_other_column_names(tmp_path, capsys):
    cells = cell_table()
    (tmp_path / "cells").mkdir()
    half = len(cells) // 2
    cells.iloc[:half].to_parquet(tmp_path / "cells" / "part0.parquet")
    cells.iloc[half:].to_parquet(tmp_path / "cells" / "part1.parquet")
    prof = tmp_path / "profiles"
    assert main(["aggregate", str(tmp_path / "cells"), "--out", str(prof),
                 "--normalize", "center", *COLS]) == 0
    wells = pd.read_parquet(prof / "wells.parquet")
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_broad_sample"} <= set(wells.columns)
    assert "Metadata_plate" not in wells.columns and len(wells) == 45
    assert (wells["Metadata_count"] == 5).all()

    # normalize: fit + save, then apply the saved transform to the same table
    raw = tmp_path / "raw_wells.parquet"
    assert main(["aggregate", str(tmp_path / "cells"), "--out", str(tmp_path / "p2"),
                 "--normalize", "none", *COLS]) == 0
    pd.read_parquet(tmp_path / "p2" / "wells.parquet").to_parquet(raw)
    assert main(["normalize", str(raw), "--out", str(tmp_path / "n1.parquet"), "--method",
                 "spherize", "--by", "all", "--eps", "1e-3", "--save",
                 str(tmp_path / "tvn.npz"), *COLS]) == 0
    assert main(["normalize", str(raw), "--out", str(tmp_path / "n2.parquet"), "--apply",
                 str(tmp_path / "tvn.npz"), *COLS]) == 0
    n1, n2 = pd.read_parquet(tmp_path / "n1.parquet"), pd.read_parquet(tmp_path / "n2.parquet")
    pd.testing.assert_frame_equal(n1, n2)
    ctrl = n1[n1["Metadata_broad_sample"] == "DMSO"].filter(regex="^f").to_numpy(np.float64)
    assert np.abs(ctrl.mean(0)).max() < 1e-4

    ev = tmp_path / "evaluation.json"
    assert main(["evaluate", str(prof / "wells.parquet"), "--out", str(ev), "--null-size",
                 "200", *COLS]) == 0
    result = json.loads(ev.read_text())
    for key in ("nsc", "nscb"):
        assert set(result[key]) >= {"accuracy", "correct", "n"} and result[key]["n"] == 18
    assert result["map"]["moa"]["mean_map"] > 0.5 and "activity" in result["map"]
    out = capsys.readouterr().out
    assert "NSC: " in out and "mAP (activity)" in out and "conformal: coverage" in out

    html = tmp_path / "report.html"
    assert main(["report", "--profiles", str(prof / "wells.parquet"), "--evaluation", str(ev),
                 "--out", str(html), *COLS]) == 0
    text = html.read_text()
    assert "Quality control" in text and "Conformal MoA prediction" in text


def test_metadata_columns_without_the_prefix_are_metadata_once_mapped(tmp_path):
    """Columns mapped by --plate-col / --compound-col... but named without ``Metadata_``
    (``plate``, ``compound``) are the table's metadata, not features: aggregate (mean and
    median, with cell TVN) groups and keeps them under the user's names, as it does the
    prefixed ones; numpy's 'could not convert string to float' traceback before."""
    plain = {"Metadata_Plate": "plate", "Metadata_Well": "well",
             "Metadata_broad_sample": "compound"}
    cells = cell_table().rename(columns=plain)
    cells.to_parquet(tmp_path / "cells.parquet")
    cols = [plain.get(c, c) for c in COLS]
    want = None
    for how in ("mean", "median"):
        out = tmp_path / how
        assert main(["aggregate", str(tmp_path / "cells.parquet"), "--out", str(out),
                     "--well-aggregation", how, "--cell-tvn", "controls", "--normalize",
                     "center", *cols]) == 0
        wells = pd.read_parquet(out / "wells.parquet")
        assert {"plate", "well", "compound"} <= set(wells.columns) and len(wells) == 45
        feats = [c for c in wells.columns if not c.startswith("Metadata_")
                 and c not in plain.values()]
        assert feats == [c for c in cells.columns if c[0] == "f" and c[1:].isdigit()]
        assert (wells["Metadata_count"] == 5).all()
        want = wells if want is None else want
        assert wells["compound"].tolist() == want["compound"].tolist()
    assert main(["evaluate", str(tmp_path / "mean" / "wells.parquet"), "--out",
                 str(tmp_path / "e.json"), "--null-size", "100", *cols]) == 0


def test_profile_commands_name_the_bad_input(tmp_path, capsys):
    cells = cell_table().drop(columns=["Metadata_MoA"])
    cells.to_parquet(tmp_path / "c.parquet")
    assert main(["evaluate", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "e.json"),
                 *COLS]) == 2
    err = capsys.readouterr().err
    assert "c.parquet lacks metadata column(s) ['Metadata_MoA']" in err
    assert not (tmp_path / "e.json").exists()
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert main(["normalize", str(tmp_path / "junk.parquet"), "--out",
                 str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "junk.parquet" in err
    # a text column without the Metadata_ prefix (an index.parquet given by mistake): named
    # with its file, one line, for every command that reads profiles (a numpy / pandas
    # traceback from the middle of the computation before)
    make_wells().assign(Path_DNA="images/x.tif").to_parquet(tmp_path / "paths.parquet")
    for command in ("normalize", "evaluate", "aggregate"):
        assert main([command, str(tmp_path / "paths.parquet"), "--out",
                     str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "paths.parquet: column 'Path_DNA' holds text, not numbers" in err
        assert not (tmp_path / "o").exists()
    # a plate without controls: named, with the way out
    wells = make_wells()
    wells.loc[wells.Metadata_plate == "Week2_P1", "Metadata_control"] = False
    wells.to_parquet(tmp_path / "w.parquet")
    assert main(["normalize", str(tmp_path / "w.parquet"), "--out",
                 str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert "Metadata_plate='Week2_P1': no reference" in err and "fallback" in err
    assert main(["normalize", str(tmp_path / "w.parquet"), "--out", str(tmp_path / "o.parquet"),
                 "--fallback", "all"]) == 0
    assert "warning: Metadata_plate='Week2_P1': no control rows" in capsys.readouterr().err


def test_a_saved_normaliser_that_is_not_one_is_named(tmp_path, capsys):
    """--apply with a missing file, or a file not in numpy's format: one line naming it, not
    numpy's advice to unpickle the file."""
    make_wells().to_parquet(tmp_path / "w.parquet")
    (tmp_path / "junk.npz").write_text("crop,Metadata_Plate\n")
    for name, says in [("missing.npz", "fitted normaliser not found"),
                       ("junk.npz", "is not a morphoprof normaliser: not in numpy's .npy / .npz")]:
        assert main(["normalize", str(tmp_path / "w.parquet"), "--out",
                     str(tmp_path / "o.parquet"), "--apply", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert says in err and name in err and "pickle" not in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.parquet").exists()
