"""Bad input during extraction: corrupted / truncated files, NaN / inf pixels, wrong dtypes, a
missing channel file, rows pointing nowhere. --on-error fail stops naming the row and file;
--on-error skip leaves them out and lists every one (with its reason) in the run summary."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from morphoprof.cli import main
from morphoprof.index.schema import ExperimentIndex
from morphoprof.shards import read_features


@pytest.fixture()
def broken_screen(tiny_screen, tmp_path):
    """A copy of the tiny screen with five broken image sets; returns (index path, {row: what})."""
    folder, _ = tiny_screen
    screen = tmp_path / "screen"
    shutil.copytree(folder, screen)
    index = ExperimentIndex.read_parquet(screen / "index.parquet")
    broken = {}

    def path(row, channel):
        return screen / index.table.loc[row, f"Path_{channel}"]

    path(1, "DNA").write_bytes(b"II*\x00 this is not a TIFF")          # corrupted header
    broken[1] = "cannot read image"
    data = path(3, "Tubulin").read_bytes()
    path(3, "Tubulin").write_bytes(data[: len(data) // 3])           # truncated
    broken[3] = "cannot read image"
    img = tifffile.imread(path(5, "Actin")).astype(np.float32)
    img[10:20, 10:20] = np.nan
    tifffile.imwrite(path(5, "Actin"), img)                          # NaN pixels
    broken[5] = "NaN or infinite pixels in channel(s) ['Actin']"
    img = tifffile.imread(path(7, "DNA")).astype(np.float64)
    img[0, 0] = np.inf
    tifffile.imwrite(path(7, "DNA"), img)                            # inf, float64 dtype
    broken[7] = "NaN or infinite pixels in channel(s) ['DNA']"
    path(9, "Actin").unlink()                                        # a channel missing
    broken[9] = "Actin"
    complex_img = tifffile.imread(path(11, "DNA")).astype(np.complex64)
    tifffile.imwrite(path(11, "DNA"), complex_img)                   # a dtype no stain has
    broken[11] = "cannot read image"
    index.write(screen / "index.parquet")
    return screen / "index.parquet", broken, len(index)


def extract(index_path, out, *extra):
    return main(["extract", str(index_path), "--out", str(out), "--image-size", "32",
                 "--weights", "random", *extra])


def test_on_error_fail_names_the_row_and_file(broken_screen, tmp_path, capsys):
    index_path, broken, _ = broken_screen
    assert extract(index_path, tmp_path / "f") == 2
    err = capsys.readouterr().err
    assert "row 1 (" in err and "DNA.tif" in err and "cannot read image" in err


def test_on_error_skip_lists_everything_it_left_out(broken_screen, tmp_path, capsys):
    index_path, broken, n = broken_screen
    out = tmp_path / "s"
    assert extract(index_path, out, "--on-error", "skip") == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["n_skipped"] == len(broken)
    got = {s["row"]: s["reason"] for s in summary["skipped"]}
    assert set(got) == set(broken)
    for row, what in broken.items():
        assert what in got[row] and got[row].startswith(f"row {row} ("), got[row]
    assert '"n_skipped": 6' in printed.out
    feats = read_features(out)
    assert len(feats) == n - len(broken)  # nothing else dropped, nothing silently
    assert np.isfinite(feats.filter(like="transfer_").to_numpy()).all()
    # a resumed run still reports what the first one skipped
    assert extract(index_path, out, "--on-error", "skip") == 0
    again = json.loads((out / "run_summary.json").read_text())
    assert again["shards_written"] == 0 and again["n_skipped"] == len(broken)


def test_truncated_png_huge_image_and_duplicate_rows(tiny_screen, tmp_path, capsys):
    from PIL import Image

    folder, _ = tiny_screen
    screen = tmp_path / "screen"
    shutil.copytree(folder, screen)
    index = ExperimentIndex.read_parquet(screen / "index.parquet")
    png = screen / "images" / "broken.png"
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:300])                          # truncated PNG
    index.table.loc[2, "Path_DNA"] = "images/broken.png"
    huge = screen / "images" / "huge.tif"
    tifffile.imwrite(huge, shape=(20000, 20000), dtype="uint8")       # sparse: 8 kB on disk
    index.table.loc[4, "Path_Tubulin"] = "images/huge.tif"
    index.write(screen / "index.parquet")
    assert extract(screen / "index.parquet", tmp_path / "s", "--on-error", "skip") == 0
    summary = json.loads((tmp_path / "s" / "run_summary.json").read_text())
    got = {s["row"]: s["reason"] for s in summary["skipped"]}
    assert set(got) == {2, 4}
    assert "broken.png" in got[2] and "cannot read image" in got[2]
    assert "huge.tif" in got[4] and "(20000, 20000) has 400 M pixels, above the 268 M" in got[4]
    capsys.readouterr()
    # a duplicated image set is refused before any work, naming both rows
    dup = ExperimentIndex(
        pd.concat([index.table, index.table.iloc[[6]]], ignore_index=True),
        index.root)
    dup.write(screen / "dup.parquet")
    assert extract(screen / "dup.parquet", tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert "rows [6, 20]" in err and not (tmp_path / "d" / "manifest.json").exists()


def test_non_utf8_metadata_table_is_named(tmp_path, capsys):
    csv = tmp_path / "plates.csv"
    csv.write_bytes("plate,well,site,compound,DNA\nP1,B02,1,DMSO,caf\xe9.tif\n"
                    .encode("latin-1"))
    rc = main(["import", "csv", str(csv), "--out", str(tmp_path / "i.parquet"), "--field",
               "plate=plate", "--field", "well=well", "--field", "site=site", "--field",
               "compound=compound", "--channel", "DNA=DNA"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "plates.csv is not UTF-8 text" in err and "save it as UTF-8" in err


def test_damaged_shard_is_recomputed_on_resume(tiny_screen, tmp_path):
    _, index = tiny_screen
    index.write(tmp_path / "index.parquet")
    out = tmp_path / "f"
    per_plate = ("--min-shard-rows", "1")  # 4 shards, one per plate
    assert extract(tmp_path / "index.parquet", out, *per_plate) == 0
    clean = read_features(out)
    manifest = json.loads((out / "manifest.json").read_text())
    victim = out / next(iter(manifest["shards"].values()))["file"]
    victim.write_bytes(victim.read_bytes()[:-40])                    # damaged after the run
    assert extract(tmp_path / "index.parquet", out, *per_plate) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 3
    # the user is told which shard was recomputed and why
    assert len(summary["shards_recomputed"]) == 1
    assert str(victim) in summary["shards_recomputed"][0]
    assert "changed since the last run" in summary["shards_recomputed"][0]
    key = ["Metadata_plate", "Metadata_well", "Metadata_site"]
    again = read_features(out).sort_values(key).reset_index(drop=True)
    clean = clean.sort_values(key).reset_index(drop=True)
    assert again.equals(clean)


def test_classical_extractor_follows_the_same_policy(broken_screen, tmp_path, capsys):
    index_path, broken, n = broken_screen
    base = ["extract", str(index_path), "--extractor", "classical"]
    assert main(base + ["--out", str(tmp_path / "f")]) == 2
    assert "row 1 (" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "s"), "--on-error", "skip"]) == 0
    summary = json.loads((tmp_path / "s" / "run_summary.json").read_text())
    assert {s["row"] for s in summary["skipped"]} == set(broken)
    cells = read_features(tmp_path / "s")
    kept = cells.drop_duplicates(["Metadata_plate", "Metadata_well", "Metadata_site"])
    assert 0 < len(kept) <= n - len(broken)


def test_illumination_follows_the_same_policy(broken_screen, tmp_path, capsys):
    index_path, broken, _ = broken_screen
    assert main(["illum", str(index_path), "--out", str(tmp_path / "f"), "--window", "16"]) == 2
    assert "row 1 (" in capsys.readouterr().err
    assert main(["illum", str(index_path), "--out", str(tmp_path / "s"), "--window", "16",
                 "--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert f"{len(broken)} image set(s) skipped" in out
    listed = json.loads((tmp_path / "s" / "illumination_skipped.json").read_text())
    assert {s["row"] for s in listed} == set(broken)
    assert all(np.isfinite(np.load(f)).all() for f in (tmp_path / "s").glob("*.npy"))


def test_a_broken_file_stops_a_stage_with_one_error_line_naming_its_cause(broken_screen,
                                                                         tmp_path):
    """What a user reads when ``illum`` or ``segment`` meets a corrupted TIFF, in a process of
    its own as they run it: the one ``error:`` line, naming the row, the file and tifffile's
    cause, and nothing else (tifffile's own log line and joblib's warning about the jobs
    cancelled behind the failure used to be printed beside it)."""
    import subprocess
    import sys

    index_path, _, _ = broken_screen
    for stage in (["illum", "--window", "16"], ["segment"]):
        done = subprocess.run([sys.executable, "-m", "morphoprof", stage[0], str(index_path),
                               "--out", str(tmp_path / f"{stage[0]}.out"), *stage[1:]],
                              capture_output=True, text=True, timeout=300)
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "%|" not in ln]  # no bar
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("error: row 1 (") if stage[0] == "illum" else "error: "
        assert "_DNA.tif: invalid offset to first page" in lines[0]
        assert "Warning" not in done.stderr and "TiffPages" not in done.stderr


def test_file_names_in_other_encodings(tiny_screen, tmp_path, capsys):
    """Non-UTF-8 names: a screen in a folder whose name is not UTF-8 runs; a UTF-8 non-ASCII
    file name works; a table naming 'café' in UTF-8 while the file on disk is named in Latin-1
    is skipped with the reason and how to rename it."""
    import os

    folder, _ = tiny_screen
    screen = os.fsdecode(os.fsencode(tmp_path) + b"/scr\xe9en")  # not UTF-8 on disk
    shutil.copytree(folder, screen)
    index = ExperimentIndex.read_parquet(os.path.join(screen, "index.parquet"))
    images = os.fsencode(screen) + b"/images/"
    row_utf8, row_latin1 = 2, 4
    os.rename(os.fsencode(screen) + b"/" + index.table.loc[row_utf8, "Path_DNA"].encode(),
              images + "ünïcode_DNA.tif".encode())
    index.table.loc[row_utf8, "Path_DNA"] = "images/ünïcode_DNA.tif"
    os.rename(os.fsencode(screen) + b"/" + index.table.loc[row_latin1, "Path_DNA"].encode(),
              images + "café_DNA.tif".encode("latin-1"))
    index.table.loc[row_latin1, "Path_DNA"] = "images/café_DNA.tif"
    index.write(os.path.join(screen, "index.parquet"))
    out = os.path.join(screen, "features")
    assert extract(os.path.join(screen, "index.parquet"), out, "--on-error", "skip") == 0
    printed = capsys.readouterr().out
    assert '"n_skipped": 1' in printed
    summary = json.loads(open(os.path.join(out, "run_summary.json")).read())
    (skipped,) = summary["skipped"]
    assert skipped["row"] == row_latin1
    reason = skipped["reason"]
    assert "café_DNA.tif: file not found" in reason and "caf\\xe9_DNA.tif" in reason
    assert "encoded as cp1252, not UTF-8" in reason and "convmv" in reason
    feats = read_features(out)
    assert len(feats) == len(index) - 1  # the UTF-8 row was read
    # profiles from that folder: streamed means and DuckDB medians both read it
    from morphoprof.profiles.aggregate import aggregate, aggregate_parquet

    well = ["Metadata_plate", "Metadata_well"]
    for how in ("mean", "median"):
        pd.testing.assert_frame_equal(aggregate_parquet(out, well, how),
                                      aggregate(feats, well, how), check_dtype=False,
                                      atol=1e-5)
    profiles = os.path.join(screen, "profiles")
    assert main(["aggregate", out, "--out", profiles, "--normalize", "robust",
                 "--reference", "all"]) == 0
    assert os.path.isfile(os.path.join(profiles, "treatments.parquet"))
