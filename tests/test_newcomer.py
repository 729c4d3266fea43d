"""What a new user meets first: the README's partial-download quickstart, a screen without
controls, unwritable outputs and a full disk, damaged image files, and the help text."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from morphoprof.cli import build_parser, main
from tests.conftest import PROJECT
from tests.test_datasets_download import PLATES, Server, _collection


@pytest.fixture(scope="module")
def server():
    s = Server(_collection())
    yield s
    s.close()


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders an interrupted write would leave behind."""
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]


def _error(stderr: str) -> str:
    """The one ``error:`` message in a command's stderr (progress bars may come before it)."""
    assert stderr.count("error: ") == 1, stderr
    return stderr[stderr.index("error: "):]


# --- 1. a partial download imports -------------------------------------------------------


def test_partial_download_then_import_with_plates(tmp_path, server, capsys):
    root = tmp_path / "bbbc021"
    assert main(["download", "bbbc021", "--dest", str(root), "--plates", PLATES[0],
                 "--base-url", server.url]) == 0
    capsys.readouterr()
    out = tmp_path / "index.parquet"

    # without flags: one problem (the absent plate folder), and the hint names what to pass
    assert main(["import", "bbbc021", str(root), "--out", str(out)]) == 2
    err = _error(capsys.readouterr().err)
    assert "1 problem(s)" in err
    assert f"pass --plates {PLATES[0]} (YAML: data.plates), or --only-present" in err
    assert f"folder not found: {root / 'Week2' / PLATES[1]} (needed by 4 image sets" in err
    assert "line 6 of " in err and "BBBC021_v1_image.csv" in err
    assert not out.exists()

    # --plates keeps that plate's rows; the index is complete and validates
    assert main(["import", "bbbc021", str(root), "--plates", PLATES[0], "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 4 and set(table["Metadata_plate"]) == {PLATES[0]}
    assert main(["validate", str(out)]) == 0

    # --only-present keeps every complete image set and lists what was left out
    capsys.readouterr()
    other = tmp_path / "present.parquet"
    assert main(["import", "bbbc021", str(root), "--only-present", "--out", str(other)]) == 0
    text = capsys.readouterr().err  # a warning, beside the result on stdout
    assert "left out 4 of 8 image set(s)" in text and PLATES[1] in text
    assert len(pd.read_parquet(other)) == 4

    # a plate the table does not have is named, with the table's plates
    assert main(["import", "bbbc021", str(root), "--plates", "Week9_9", "--out",
                 str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "unknown plate(s) ['Week9_9']" in err and PLATES[1] in err

    # a run config takes the same choice as data.plates
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{source: bbbc021, path: {root}, plates: [{PLATES[0]}]}}\n"
                   f"features: {{image_size: 32}}\noutput: {tmp_path / 'run'}\n")
    main(["run", str(cfg)])  # stops at evaluation: one treatment cannot be matched
    assert len(pd.read_parquet(tmp_path / "run" / "index.parquet")) == 4
    assert (tmp_path / "run" / "profiles" / "wells.parquet").is_file()
    err = capsys.readouterr().err
    assert "NSC needs at least two annotated treatments" in err


# --- 2. a screen without controls ---------------------------------------------------------


def _features_without_controls(folder: Path) -> Path:
    """A Parquet of field features with two MoAs and no control wells."""
    rng = np.random.default_rng(0)
    rows = []
    for plate, batch in (("P1", "Week1"), ("P2", "Week2")):
        for k, (cpd, moa) in enumerate((("a", "m1"), ("b", "m1"), ("c", "m2"), ("d", "m2"))):
            for site in (1, 2):
                centre = np.eye(6)[0 if moa == "m1" else 3] * 5
                rows.append({"Metadata_plate": plate, "Metadata_well": f"B0{k + 2}",
                             "Metadata_site": site, "Metadata_batch": batch,
                             "Metadata_compound": cpd, "Metadata_concentration": 1.0,
                             "Metadata_moa": moa, "Metadata_control": False,
                             **{f"f{j}": float(v) for j, v in
                                enumerate(centre + rng.normal(size=6) * 0.1)}})
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "fields.parquet")
    return folder


def test_aggregate_without_controls(tmp_path, capsys):
    feats = _features_without_controls(tmp_path / "features")
    # the default: no normalisation, with a note saying why and how to choose
    assert main(["aggregate", str(feats), "--out", str(tmp_path / "p")]) == 0
    text = capsys.readouterr()
    note = text.out + text.err
    assert "no control" in note and "--normalize" in note
    assert (tmp_path / "p" / "wells.parquet").is_file()
    assert main(["evaluate", str(tmp_path / "p" / "wells.parquet"),
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["nsc"]["n"] == 4

    # asking for control-based centring explicitly is an error naming the ways out
    assert main(["aggregate", str(feats), "--out", str(tmp_path / "q"),
                 "--normalize", "center"]) == 2
    err = _error(capsys.readouterr().err)
    assert err.count("\n") == 1
    assert "--reference all" in err and "--normalize none" in err
    assert not (tmp_path / "q").exists()
    # ... and so is it in a run config, before any feature is extracted
    screen = tmp_path / "screen.csv"
    pd.DataFrame({"plate": ["P1"], "well": ["B02"], "compound": ["a"],
                  "dna": [str(tmp_path / "f.tif")]}).to_csv(screen, index=False)
    tifffile.imwrite(tmp_path / "f.tif", np.ones((40, 40), np.uint16))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{source: csv, path: {screen}, columns: {{plate: plate, well: well, "
                   f"compound: compound}}, channel_columns: {{DNA: dna}}}}\n"
                   "profiles: {normalization: {method: center}}\n"
                   f"output: {tmp_path / 'run'}\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "profiles.normalization" in err
    assert not (tmp_path / "run" / "features").exists()


def test_empty_parquet_is_named(tmp_path, capsys):
    folder = tmp_path / "cells"
    folder.mkdir()
    pd.DataFrame({"Metadata_plate": pd.Series([], dtype=str),
                  "Metadata_well": pd.Series([], dtype=str),
                  "f0": pd.Series([], dtype=float)}).to_parquet(folder / "empty.parquet")
    assert main(["aggregate", str(folder), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "empty.parquet" in err and "no rows" in err


# --- 3. unwritable outputs and a full disk ------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Every stage's inputs, made once from a tiny synthetic screen."""
    d = tmp_path_factory.mktemp("stages")
    screen = d / "screen"
    assert main(["synth", "--out", str(screen), "--moas", "2", "--compounds-per-moa", "2",
                 "--batches", "2", "--plates-per-batch", "1", "--sites", "1",
                 "--size", "48", "48", "--cells", "4"]) == 0
    idx = screen / "index.parquet"
    assert main(["segment", str(idx), "--out", str(d / "cells.parquet"),
                 "--min-distance", "3"]) == 0
    assert main(["extract", str(idx), "--out", str(d / "features"), "--image-size", "32"]) == 0
    assert main(["aggregate", str(d / "features"), "--out", str(d / "profiles")]) == 0
    assert main(["evaluate", str(d / "profiles" / "treatments.parquet"),
                 "--out", str(d / "evaluation.json")]) == 0
    return d


def _commands(d: Path, out: Path) -> dict[str, list[str]]:
    idx = str(d / "screen" / "index.parquet")
    wells, treat = str(d / "profiles" / "wells.parquet"), str(d / "profiles" / "treatments.parquet")
    return {
        "synth": ["synth", "--out", str(out / "screen")],
        "demo": ["demo", "--out", str(out / "demo")],
        "download": ["download", "bbbc021", "--dest", str(out / "bbbc")],
        "import": ["import", "csv", str(d / "none.csv"), "--out", str(out / "i.parquet")],
        "illum": ["illum", idx, "--out", str(out / "illum")],
        "segment": ["segment", idx, "--out", str(out / "cells.parquet")],
        "crops": ["crops", idx, str(d / "cells.parquet"), "--out", str(out / "crops")],
        "extract": ["extract", idx, "--out", str(out / "features")],
        "aggregate": ["aggregate", str(d / "features"), "--out", str(out / "profiles")],
        "normalize": ["normalize", wells, "--out", str(out / "n.parquet"), "--method", "center"],
        "evaluate": ["evaluate", treat, "--out", str(out / "e.json")],
        "report": ["report", "--profiles", treat, "--evaluation", str(d / "evaluation.json"),
                   "--out", str(out / "r.html")],
    }


@pytest.mark.parametrize("command", ["synth", "demo", "download", "import", "illum", "segment",
                                     "crops", "extract", "aggregate", "normalize", "evaluate",
                                     "report", "run", "train finetune", "train mil",
                                     "train weak"])
def test_output_under_a_file_is_one_error_line(stages, tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    if command == "run":
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"data: {{source: index, path: {stages / 'screen' / 'index.parquet'}}}\n"
                       f"output: {blocker / 'run'}\n")
        argv = ["run", str(cfg)]
    elif command.startswith("train"):
        cfg = tmp_path / "train.yaml"
        cfg.write_text(f"data: {{source: index, path: {stages / 'screen' / 'index.parquet'}}}\n"
                       f"label: {'[Metadata_compound]' if 'weak' in command else 'Metadata_moa'}"
                       f"\noutput: {blocker / 'train'}\n")
        argv = [*command.split(), str(cfg)]
    else:
        argv = _commands(stages, blocker)[command]
    assert main(argv) == 2
    err = _error(capsys.readouterr().err).strip()
    assert err.startswith(f"error: cannot write {blocker}") and "\n" not in err, err
    assert blocker.read_text() == "not a folder"


def _morphoprof(cmd: list[str], cwd: Path, limit: int | None = None,
                unprivileged: bool = False):
    """Run ``python -m morphoprof`` in a child process: with a file-size limit standing in for
    a full disk (writes fail with EFBIG), or as an unprivileged user when run as root (root
    ignores folder permissions)."""
    def setup():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if unprivileged and os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)

    env = {**os.environ, "HOME": str(cwd), "MPLCONFIGDIR": str(cwd / ".mpl"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "morphoprof", *cmd], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=setup)


@pytest.fixture
def world(stages):
    """A folder every user can read (the module's stage files copied in)."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="morphoprof-newcomer-"))
    for name in ("screen", "features", "profiles", "evaluation.json"):
        src = stages / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / name)
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("command", ["aggregate", "evaluate", "report"])
def test_read_only_folder_is_one_error_line(world, command):
    ro = world / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    argv = _commands(world, ro)[command]
    done = _morphoprof(argv, world, unprivileged=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot write {ro}"), done.stderr
    assert "Permission denied" in lines[-1] and "Traceback" not in done.stderr
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("command", ["aggregate", "evaluate"])
def test_full_disk_leaves_nothing_half_written(world, command):
    out = world / "out"
    out.mkdir()
    argv = _commands(world, out)[command]
    done = _morphoprof(argv, world, limit=4096)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}") and "too large" in last.lower(), last
    assert ".tmp" not in last  # the file named is the one asked for, not a temporary one
    assert "Traceback" not in done.stderr
    assert list(out.iterdir()) == [] and not _leftovers(world)


def test_full_disk_during_extract_then_resume(world):
    out = world / "features_new"
    argv = ["extract", str(world / "screen" / "index.parquet"), "--out", str(out),
            "--image-size", "32", "--min-shard-rows", "1"]  # a shard per plate: 2
    done = _morphoprof(argv, world, limit=4096)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out / 'shards'}") and last.endswith(
        ": File too large"), last
    assert not _leftovers(world) and not list(out.rglob("*.parquet"))
    # space freed: the same command finishes the job
    done = _morphoprof(argv, world)
    assert done.returncode == 0, done.stderr
    assert len(list((out / "shards").glob("*.parquet"))) == 2


# --- 4. damaged images are found by validate --deep ---------------------------------------


def test_validate_deep_names_each_damaged_file_and_its_line(tmp_path, capsys):
    good = np.random.default_rng(0).integers(0, 4000, (32, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ok.tif", good)
    tifffile.imwrite(tmp_path / "cut.tif", good)
    (tmp_path / "cut.tif").write_bytes((tmp_path / "cut.tif").read_bytes()[:600])
    tifffile.imwrite(tmp_path / "nan.tif", np.full((32, 32), np.nan, np.float32))
    Image.fromarray((good // 16).astype(np.uint8)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:300])
    names = ["ok.tif", "cut.tif", "nan.tif", "cut.png"]
    pd.DataFrame({"plate": "P1", "well": [f"B0{k + 2}" for k in range(4)],
                  "compound": "x", "dna": names}).to_csv(tmp_path / "images.csv", index=False)
    idx = tmp_path / "index.parquet"
    assert main(["import", "csv", str(tmp_path / "images.csv"), "--field", "plate=plate",
                 "--field", "well=well", "--field", "compound=compound", "--channel", "DNA=dna",
                 "--root", str(tmp_path), "--out", str(idx)]) == 0
    assert main(["validate", str(idx)]) == 0  # headers only: the damage is not seen
    capsys.readouterr()
    assert main(["validate", str(idx), "--deep"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    for line, name in ((3, "cut.tif"), (4, "nan.tif"), (5, "cut.png")):
        hit = [m for m in err.splitlines() if name in m]
        assert hit and f"line {line} of {tmp_path / 'images.csv'}" in hit[0], err
    assert "NaN" in next(m for m in err.splitlines() if "nan.tif" in m)
    assert "ok.tif" not in err


def test_missing_rgb_png_is_listed_once(tmp_path, capsys):
    folder = tmp_path / "fields_6moa"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (cpd, moa) in enumerate((("taxol", "Microtubule stabilizers"),
                                    ("AZ138", "Eg5 inhibitors"))):
        Image.fromarray(np.full((16, 16, 3), 40 * (i + 1), np.uint8)).save(
            folder / "images" / f"bbbc021v1_{i}.png")
        rows.append({"compound": cpd, "concentration": 1.0, "moa": moa,
                     "plate": "Week1_22123", "well": f"B0{i + 2}", "replicate": 1})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", sep=";")
    (folder / "images" / "bbbc021v1_1.png").unlink()
    assert main(["import", "bbbc021-6moa", str(folder), "--out", str(tmp_path / "i.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("bbbc021v1_1.png") == 1 and "channels Actin, Tubulin, DAPI" in err
    assert f"line 3 of {folder / 'labels.csv'}" in err
    # the old spelling of the importer still works, and the complete set imports
    assert main(["import", "bbbc021_6moa", str(folder), "--only-present",
                 "--out", str(tmp_path / "i.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "i.parquet")) == 1


# --- 5. help says what each option does ---------------------------------------------------


def test_every_option_has_help_with_its_default():
    import argparse

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen = 0
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            seen += 1
    assert seen > 100
    def flat(sub):
        return " ".join(subs.choices[sub].format_help().split())

    assert "(default: center; none, with a note, when the table has no control rows)" in \
        flat("aggregate")
    assert "rows (default: robust)" in flat("normalize")
    assert "(default: controls)" in flat("aggregate")


def test_help_runs_from_the_console(tmp_path):
    done = subprocess.run([sys.executable, "-m", "morphoprof", "import", "--help"],
                          capture_output=True, text=True, cwd=PROJECT, timeout=120)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--plates" in text and "--only-present" in text and "bbbc021-6moa" in text


def test_readme_report_command_shows_dataset_qc_and_examples(stages, tmp_path):
    """The README's report command (with --wells and --index): a full dataset section, each
    row once, the QC plate maps and example fields, under a header naming the inputs."""
    d = stages
    out = tmp_path / "report.html"
    assert main(["report", "--profiles", str(d / "profiles" / "treatments.parquet"),
                 "--evaluation", str(d / "evaluation.json"),
                 "--wells", str(d / "profiles" / "wells.parquet"),
                 "--index", str(d / "screen" / "index.parquet"), "--out", str(out)]) == 0
    text = out.read_text()
    dataset = text[text.index("<h2>Dataset"):text.index("<h2>Quality control")]
    for row in ("image sets (fields)", "plates", "batches", "channels", "MoAs",
                "compounds (excl. controls)", "well profiles", "control wells"):
        assert dataset.count(f"<td>{row}</td>") == 1, row
    assert "<td>compounds</td>" not in dataset  # one label for one count
    assert "Example fields per MoA" in text and "How to read this:" in text
    assert str(d / "screen" / "index.parquet") in text[:text.index("<h2>Dataset")]


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^NSC: \d+/\d+ = ", out, re.M) and (tmp_path / "evaluation.json").is_file()
    assert re.search(r"^\d+ fields at [\d.]+ fields/s$", out, re.M)
