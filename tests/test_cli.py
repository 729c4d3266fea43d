import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from morphoprof import __version__
from morphoprof.cli import main
from tests.conftest import TINY


def test_stages_one_by_one(tmp_path, capsys):
    screen = tmp_path / "screen"
    assert main(["synth", "--out", str(screen), "--moas", "3", "--compounds-per-moa", "2",
                 "--batches", "2", "--plates-per-batch", "1", "--sites", "1",
                 "--size", "64", "64", "--cells", "6"]) == 0
    assert main(["validate", str(screen / "index.parquet")]) == 0
    illum = tmp_path / "illum"
    assert main(["illum", str(screen / "index.parquet"), "--out", str(illum),
                 "--window", "32"]) == 0
    assert len(list(illum.glob("*.npy"))) == 2
    assert main(["segment", str(screen / "index.parquet"), "--out", str(tmp_path / "cells.parquet"),
                 "--illumination", str(illum), "--min-distance", "4",
                 "--deepprofiler-locations", str(tmp_path / "locations")]) == 0
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    truth = pd.read_parquet(screen / "cells.parquet")
    assert abs(len(cells) - len(truth)) <= 0.1 * len(truth)
    assert json.loads((tmp_path / "cells_summary.json").read_text())["cells"] == len(cells)
    assert list((tmp_path / "locations").rglob("*-Nuclei.csv"))
    assert main(["crops", str(screen / "index.parquet"), str(tmp_path / "cells.parquet"),
                 "--out", str(tmp_path / "crops"), "--size", "32"]) == 0
    assert (tmp_path / "crops" / "manifest.json").is_file()
    feats = tmp_path / "features"
    assert main(["extract", str(screen / "index.parquet"), "--out", str(feats),
                 "--image-size", "64", "--illumination", str(illum)]) == 0
    assert main(["aggregate", str(feats), "--out", str(tmp_path / "profiles")]) == 0
    ev = tmp_path / "evaluation.json"
    assert main(["evaluate", str(tmp_path / "profiles" / "treatments.parquet"),
                 "--out", str(ev)]) == 0
    result = json.loads(ev.read_text())
    assert result["nsc"]["n"] == 12 and set(result["nsc"]) >= {"accuracy", "correct", "n"}
    assert main(["report", "--profiles", str(tmp_path / "profiles" / "treatments.parquet"),
                 "--evaluation", str(ev), "--out", str(tmp_path / "r.html")]) == 0
    assert "data:image/png;base64" in (tmp_path / "r.html").read_text()
    wells = pd.read_parquet(tmp_path / "profiles" / "wells.parquet")
    assert wells.columns[0].startswith("Metadata_")


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.parquet")]) == 2
    assert "experiment index not found" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["validate", str(tmp_path / "run")]) == 2  # a folder: said so
    assert f"experiment index {tmp_path / 'run'} is a folder, not" in capsys.readouterr().err
    (tmp_path / "run" / "index.parquet").write_bytes(b"")
    assert main(["validate", str(tmp_path / "run")]) == 2  # the index inside it: named
    assert f"did you mean {tmp_path / 'run' / 'index.parquet'}?" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("data: {source: synthetic}\nfeatures: {modle: x}\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "features.modle: unknown key (did you mean 'model'?)" in err
    assert "output: required" in err


@pytest.mark.parametrize("command", ["crops", "extract"])
def test_a_bad_cell_table_is_one_error_line(tmp_path, tiny_screen, capsys, command):
    """A cell table that is missing, a folder, not Parquet or without nucleus centres (the
    synthetic screen's ground-truth cells.parquet): one ``error:`` line naming it (a pyarrow
    traceback before; the file was not named for the missing centres), and nothing written."""
    index = str(tiny_screen[0] / "index.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    (tmp_path / "folder.parquet").mkdir()
    truth = pd.read_parquet(tiny_screen[0] / "cells.parquet")
    assert "Nuclei_Location_Center_X" not in truth and len(truth)
    truth.to_parquet(tmp_path / "truth.parquet")
    for name, says in [("missing.parquet", "cell table not found"),
                       ("folder.parquet", "(a folder)"), ("junk.parquet", "as Parquet"),
                       ("truth.parquet", "lacks column(s) ['Nuclei_Location_Center_X'")]:
        cells = str(tmp_path / name)
        args = ([command, index, cells] if command == "crops"
                else [command, index, "--cells", cells])
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and name in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_report_refuses_a_json_that_is_not_an_evaluation(tmp_path, capsys):
    """{} wrote a report with no evaluation in it; a list or non-JSON was refused already."""
    from tests.test_evaluation_evaluate import make_wells

    make_wells().to_parquet(tmp_path / "w.parquet")
    for name, text, says in [("empty.json", "{}", "is not an evaluation"),
                             ("list.json", "[1, 2]", "is not an evaluation"),
                             ("text.json", "nsc", "is not JSON")]:
        (tmp_path / name).write_text(text)
        assert main(["report", "--profiles", str(tmp_path / "w.parquet"), "--evaluation",
                     str(tmp_path / name), "--out", str(tmp_path / "r.html")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name} {says}"), err
    assert not (tmp_path / "r.html").exists()


def test_run_config_end_to_end(tmp_path, capsys):
    cfg = {
        "data": {"source": "synthetic", "path": "screen",
                 "synthetic": {**{k: v for k, v in TINY.to_json().items() if k != "channels"}}},
        "features": {"image_size": 64},
        "output": "out",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    out = tmp_path / "out"
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("NSC") and said[-1].startswith(
        f"wrote {out / 'evaluation.json'} and {out / 'report.html'} in ")
    for name in ("index.parquet", "features/manifest.json", "profiles/treatments.parquet",
                 "evaluation.json", "report.html", "config.yaml"):
        assert (out / name).exists(), name
    result = json.loads((out / "evaluation.json").read_text())
    assert result["n_treatments"] == 6 and result["nsc"]["n"] == 6
    first = (out / "report.html").read_text()
    assert "extracted in this run in" in first
    # the report says what it shows: whole-field profiles count fields, not cells
    assert "Quality control: fields (image sets) per well" in first
    assert "Example fields per MoA" in first
    assert f"<th>morphoprof</th><td><code>{__version__}</code>" in first  # header: version
    assert str(tmp_path / "run.yaml") in first  # the header names the configuration
    # the configuration shown is what applied: no keys of the classical extractor or of
    # stages that were off
    dump = first[first.index("Run configuration"):]
    for key in ("measurements:", "rgb_channels:", "in_chans:", "n_factors:", "window:",
                "min_area:"):
        assert key not in dump, key
    # a re-run reuses every finished shard, and the report says so instead of '0 fields'
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    again = (out / "report.html").read_text()
    assert "nothing to do" not in again and "finished shard(s) reused" in again
    assert "0 fields in 0.0 s" not in again
    # other features into the same output: refused, pointing to run's own --overwrite
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**cfg, "features": {"image_size": 48}}))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "run.yaml")]) == 2
    assert "features was made with other parameters (image_size: 64 -> 48" in (
        capsys.readouterr().err)
    assert main(["run", str(tmp_path / "run.yaml"), "--overwrite"]) == 0
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert manifest["params"]["image_size"] == 48


@pytest.mark.slow
def test_demo_command_from_the_console_script(tmp_path):
    """The README's demo: the real command, on the default synthetic screen, under 5 minutes."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "morphoprof.cli", "demo", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "NSC (not same compound)" in html and "data:image/png;base64" in html
    assert result["nsc"]["n"] == 24 and result["nscb"]["n"] == 24
    # 4 MoAs: chance is ~25%; ImageNet features recover the synthetic biology far above it
    assert result["nsc"]["accuracy"] >= 0.7 and result["nscb"]["accuracy"] >= 0.7
    assert seconds < 300
    # illumination correction and segmentation ran, and the segmentation found the real cells
    demo = tmp_path / "demo"
    assert len(list((demo / "illumination").glob("*.npy"))) == 9
    seg = json.loads((demo / "segmentation_summary.json").read_text())
    truth = pd.read_parquet(demo / "synthetic_screen" / "cells.parquet")
    assert abs(seg["cells"] - len(truth)) <= 0.05 * len(truth)
    assert "Quality control: segmented cells per well" in html
    assert "NSC:" in proc.stdout


def test_run_classical_extractor_end_to_end(tmp_path):
    cfg = {
        "data": {"source": "synthetic", "path": "screen",
                 "synthetic": {k: v for k, v in TINY.to_json().items() if k != "channels"}},
        "preprocess": {"segmentation": {"min_distance": 4}},
        "features": {"extractor": "classical", "measurements": ["sizeshape", "intensity"]},
        "output": "out",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    wells = pd.read_parquet(tmp_path / "out" / "profiles" / "wells.parquet")
    assert "classical_DNA_Intensity_MeanIntensity" in wells.columns
    assert wells["Metadata_count"].sum() > len(wells)  # cells, not fields, were aggregated
    result = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert result["nsc"]["n"] == 6


def test_extract_crops_equals_in_memory_embedding(tmp_path, capsys):
    import numpy as np

    from morphoprof.features.transfer import TransferConfig, TransferExtractor
    from morphoprof.preprocess.crops import normalize_crops
    from morphoprof.shards import read_features

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 4000, (12, 24, 24, 2)).astype(np.uint16)
    np.savez(tmp_path / "c.npz", crops=crops)
    table = pd.DataFrame({"crop": np.arange(12)[::-1], "plate": ["P1"] * 6 + ["P2"] * 6,
                          "well": ["A01"] * 12, "compound": ["DMSO"] * 12})
    table.to_csv(tmp_path / "c.csv", index=False)
    out = tmp_path / "feats"
    args = ["extract", "--crops", str(tmp_path / "c.npz"), "--crop-table", str(tmp_path / "c.csv"),
            "--model", "resnet18", "--weights", "random", "--out", str(out)]
    assert main(args) == 0
    feats = read_features(out)
    assert len(feats) == 12 and set(feats["Metadata_plate"]) == {"P1", "P2"}
    ref = TransferExtractor(TransferConfig(model="resnet18", weights="random"))
    x = normalize_crops(np.moveaxis(crops, -1, 1)[table["crop"].to_numpy()], "max")
    want = ref.features_for_dataset(
        __import__("torch").utils.data.TensorDataset(
            __import__("torch").from_numpy(x), __import__("torch").arange(12)),
        ["ch0", "ch1"])[0]
    cols = [c for c in feats.columns if not c.startswith(("Metadata_", "Nuclei_"))]
    np.testing.assert_allclose(feats[cols].to_numpy(), want, rtol=1e-4, atol=1e-5)
    # --format h5ad / zarr: the same features as one AnnData (X = the feature columns)
    import anndata

    capsys.readouterr()
    for fmt in ("h5ad", "zarr"):
        assert main([*args, "--format", fmt]) == 0  # the shards are reused, AnnData added
        assert json.loads(capsys.readouterr().out)["anndata"] == str(out / f"features.{fmt}")
        adata = (anndata.read_h5ad if fmt == "h5ad" else anndata.read_zarr)(
            out / f"features.{fmt}")
        np.testing.assert_allclose(adata.X, feats[cols].to_numpy(np.float32), rtol=1e-6)
        assert list(adata.obs["Metadata_plate"]) == list(feats["Metadata_plate"])
        assert list(adata.var_names) == cols
    # a table row pointing past the array, and a missing column: one clear error each
    table.loc[4, "crop"] = 40
    table.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["extract", "--crops", str(tmp_path / "c.npz"), "--crop-table",
                 str(tmp_path / "bad.csv"), "--out", str(tmp_path / "f2")]) == 2
    assert "bad.csv row 4: crop 40 is outside the 12 crops" in capsys.readouterr().err
    table.drop(columns=["plate"]).assign(crop=range(12)).to_csv(tmp_path / "np.csv", index=False)
    assert main(["extract", "--crops", str(tmp_path / "c.npz"), "--crop-table",
                 str(tmp_path / "np.csv"), "--out", str(tmp_path / "f3")]) == 2
    assert "np.csv needs a plate column" in capsys.readouterr().err
    np.savez(tmp_path / "flat.npz", crops=np.zeros((3, 24, 24)))
    assert main(["extract", "--crops", str(tmp_path / "flat.npz"), "--crop-table",
                 str(tmp_path / "c.csv"), "--out", str(tmp_path / "f4")]) == 2
    assert "flat.npz: crops must be 4-D" in capsys.readouterr().err


def test_segment_writes_overlays_summary_and_locations_beside_the_table(tmp_path, tiny_screen,
                                                                         capsys):
    folder, index = tiny_screen
    out = tmp_path / "nuclei.parquet"
    assert main(["segment", str(folder / "index.parquet"), "--out", str(out), "--overlays", "2",
                 "--min-area", "10", "--deepprofiler-locations", str(tmp_path / "loc")]) == 0
    pngs = sorted((tmp_path / "nuclei_overlays").glob("*.png"))
    assert len(pngs) == 2
    summary = json.loads((tmp_path / "nuclei_summary.json").read_text())
    cells = pd.read_parquet(out)
    assert summary["cells"] == len(cells) > 0 and summary["image_sets"] == len(index)
    # one location file per field with cells
    assert len(list((tmp_path / "loc").rglob("*-Nuclei.csv"))) == cells.groupby(
        ["Metadata_plate", "Metadata_well", "Metadata_site"]).ngroups
    printed = capsys.readouterr()  # the stage's log on stderr, the command's result on stdout
    assert "2 overlay(s)" in printed.err
    assert f"{len(cells)} cells in {len(index)} image sets" in printed.out


def test_report_line_on_extraction_says_what_each_kind_of_run_extracted():
    from morphoprof.pipeline import extraction_summary
    from morphoprof.shards import RunSummary

    fields = RunSummary("f", 2, 0, 4.0, "fail", image_sets=20)
    assert extraction_summary(fields, 20) == (
        "20 image sets: 20 extracted in this run in 4.0 s (5.0 fields/s)")
    classical = RunSummary("f", 2, 0, 4.0, "skip", image_sets=20, cells=400,
                           skipped=({"row": 3, "reason": "x"},))
    assert extraction_summary(classical, 21) == (
        "21 image sets: 20 extracted in this run in 4.0 s (400 cells, 100.0 cells/s); "
        "1 skipped (unreadable)")
    cells = RunSummary("f", 1, 1, 2.0, "fail", cells=300)  # a weak model's crops of cells
    assert extraction_summary(cells, 20) == (
        "20 image sets: 300 cells extracted in this run in 2.0 s (150.0 cells/s); "
        "1 finished shard(s) reused from an earlier run")
    resumed = RunSummary("f", 0, 2, 0.01, "fail", image_sets=0)
    assert extraction_summary(resumed, 20) == (
        "20 image sets: 2 finished shard(s) reused from an earlier run")
