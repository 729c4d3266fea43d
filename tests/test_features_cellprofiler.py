"""import cellprofiler: the three real CellProfiler outputs (per-object CSVs, ExportToDatabase
SQLite, cytominer-database SQLite) through CytoTable into single-cell Parquet, then aggregate
(per-well means equal to pycytominer's) and evaluate through the CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from morphoprof.cli import main
from morphoprof.errors import InputError
from morphoprof.features.cellprofiler import detect_kind, import_cellprofiler

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellprofiler_outputs"
SOURCES = {
    "csv": DATA / "cytotable_ExampleHuman",
    "sqlite": DATA / "cytotable_NF1_SchwannCell" / "all_cellprofiler.sqlite",
    "cytominer-database": DATA / "pycytominer_SQ00014613" / "test_SQ00014613.sqlite",
}
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")


@needs_data
@pytest.mark.parametrize("kind", list(SOURCES))
def test_real_cellprofiler_outputs_import_and_aggregate_like_pycytominer(kind, tmp_path,
                                                                         capsys):
    from pycytominer import aggregate as pcm_aggregate

    src = SOURCES[kind]
    assert detect_kind(src) == kind
    assert main(["import", "cellprofiler", str(src), "--out", str(tmp_path / "raw")]) == 0
    cells = pd.read_parquet(tmp_path / "raw" / "cells.parquet")
    summary = json.loads((tmp_path / "raw" / "import.json").read_text())
    assert summary["rows"] == len(cells) > 0 and summary["kind"] == kind
    feats = [c for c in cells.columns if not c.startswith("Metadata_")]
    assert feats and all(c.split("_")[0] in ("Cells", "Cytoplasm", "Nuclei") for c in feats)
    assert all(pd.api.types.is_numeric_dtype(cells[c]) for c in feats)
    # one row per object, as many as CellProfiler's Cells table holds
    if kind != "csv":
        table = "Per_Cells" if kind == "sqlite" else "Cells"
        with sqlite3.connect(src) as con:
            assert con.execute(f"select count(*) from {table}").fetchone()[0] == len(cells)
    else:
        assert len(pd.read_csv(src / "Cells.csv")) == len(cells)

    # a plate map (one row per well) adds treatments; a second import needs --overwrite
    wells = sorted(cells["Metadata_well"].unique())
    pm = pd.DataFrame({"well": wells, "compound": [f"c{k % 4}" for k in range(len(wells))],
                       "concentration": 1.0,
                       "moa": [f"moa{k % 2}" for k in range(len(wells))]})
    pm.to_csv(tmp_path / "platemap.csv", index=False)
    args = ["import", "cellprofiler", str(src), "--out", str(tmp_path / "raw"), "--platemap",
            str(tmp_path / "platemap.csv")]
    assert main(args) == 2
    assert "exists; use another --out or --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    annotated = pd.read_parquet(tmp_path / "raw" / "cells.parquet")
    assert {"Metadata_compound", "Metadata_moa"} <= set(annotated.columns)
    assert annotated["Metadata_compound"].notna().all()

    assert main(["aggregate", str(tmp_path / "raw" / "cells.parquet"), "--out",
                 str(tmp_path / "prof"), "--normalize", "none"]) == 0
    ours = pd.read_parquet(tmp_path / "prof" / "wells.parquet").sort_values("Metadata_well")
    ref = pcm_aggregate(annotated, strata=["Metadata_plate", "Metadata_well"], features=feats,
                        operation="mean").sort_values("Metadata_well")
    common = [c for c in feats if c in ours.columns]
    assert len(common) >= 0.5 * len(feats)  # the rest dropped as non-finite somewhere
    np.testing.assert_allclose(ours[common].to_numpy(float), ref[common].to_numpy(float),
                               rtol=1e-6, atol=1e-9)
    if len(wells) >= 4:  # enough wells for NSC (the NF1 plate: 8 wells)
        assert main(["evaluate", str(tmp_path / "prof" / "wells.parquet"), "--out",
                     str(tmp_path / "eval.json")]) == 0
        result = json.loads((tmp_path / "eval.json").read_text())
        assert result["nsc"]["n"] == 4


def test_bad_cellprofiler_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="needs Image.csv"):
        detect_kind(tmp_path / "empty")
    (tmp_path / "x.sqlite").write_text("not a database")
    with pytest.raises(InputError, match="x.sqlite: not a CellProfiler CSV folder or SQLite"):
        detect_kind(tmp_path / "x.sqlite")
    with sqlite3.connect(tmp_path / "other.sqlite") as con:
        con.execute("create table t (a int)")
    with pytest.raises(InputError, match=r"other.sqlite: a SQLite without CellProfiler tables"):
        detect_kind(tmp_path / "other.sqlite")
    with sqlite3.connect(tmp_path / "one_table.sqlite") as con:
        con.execute("create table Per_Image (ImageNumber int)")
        con.execute("create table Per_Object (ImageNumber int, ObjectNumber int)")
    with pytest.raises(InputError, match=r"one_table.sqlite: an ExportToDatabase SQLite without "
                                         r"Per_Cells .*a single Per_Object table is not read"):
        detect_kind(tmp_path / "one_table.sqlite")
    with pytest.raises(InputError, match="not found"):
        import_cellprofiler(tmp_path / "missing.sqlite", tmp_path / "out")


@needs_data
def test_plate_map_problems_and_read_only_output(tmp_path):
    src = SOURCES["sqlite"]
    pd.DataFrame({"position": ["C6"]}).to_csv(tmp_path / "nowell.csv", index=False)
    with pytest.raises(InputError, match="nowell.csv: no column 'well'"):
        import_cellprofiler(src, tmp_path / "a", platemap=tmp_path / "nowell.csv")
    pd.DataFrame({"well": ["C6", "C6"], "compound": ["a", "b"]}).to_csv(tmp_path / "dup.csv",
                                                                       index=False)
    with pytest.raises(InputError, match="dup.csv line 3: well C6 appears twice"):
        import_cellprofiler(src, tmp_path / "b", platemap=tmp_path / "dup.csv")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(InputError, match="cannot write to"):
            import_cellprofiler(src, locked / "out")
    finally:
        locked.chmod(0o700)


@needs_data
def test_small_chunks_and_join_pages_give_the_same_cells(tmp_path, monkeypatch):
    """Paging is invisible: CytoTable chunks of 60 rows and joined pages of 5 objects (cut at
    image boundaries) give the same objects, values and order as one page of everything."""
    import morphoprof.features.cellprofiler as cp

    src = SOURCES["sqlite"]
    summary = import_cellprofiler(src, tmp_path / "big", chunk_size=100_000)
    assert json.loads((tmp_path / "big" / "import.json").read_text()) == summary.to_json()
    assert summary.summary_line().startswith(f"{summary.rows} cells x {summary.features} "
                                             "features (sqlite, CytoTable preset ")
    calls = []
    real = cp._subpages

    def spy(ids, lo, hi, rows):
        out = real(ids, lo, hi, rows)
        calls.append(out)
        return out

    monkeypatch.setattr(cp, "_JOIN_ROWS", 5)
    monkeypatch.setattr(cp, "_subpages", spy)
    import_cellprofiler(src, tmp_path / "small", chunk_size=60)
    big = pd.read_parquet(tmp_path / "big" / "cells.parquet")
    small = pd.read_parquet(tmp_path / "small" / "cells.parquet")
    pages = [p for c in calls for p in c]
    assert len(pages) > len(calls) > 1  # chunks were cut into several join pages
    assert all(a <= b for a, b in pages) and all(
        b1 < a2 for (_, b1), (a2, _) in zip(pages, pages[1:]))  # disjoint, in image order
    key = ["Metadata_ImageNumber", "Cytoplasm_Number_Object_Number"]
    assert len(small) == len(big) > 0 and not big.duplicated(key).any()
    pd.testing.assert_frame_equal(small.sort_values(key, ignore_index=True),
                                  big.sort_values(key, ignore_index=True), check_dtype=False)


@needs_data
def test_a_sqlite_is_split_into_parts_holding_every_row_once(tmp_path):
    """The split that keeps CytoTable's reads linear: parts of about ``rows`` rows of each
    table CytoTable reads (cut where the image changes), together every row once and in order,
    with the declared schema."""
    import morphoprof.features.cellprofiler_parts as cpp

    src = SOURCES["cytominer-database"]
    with sqlite3.connect(src) as con:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
    big = tmp_path / "big.sqlite"
    with sqlite3.connect(big) as con:  # three copies of each table: 6 rows, an extra table
        con.execute(f"attach database '{src}' as src")
        for t in tables:
            sql = con.execute("select sql from src.sqlite_master where name = ?", (t,)).fetchone()
            con.execute(sql[0])
            for _ in range(3):
                con.execute(f'insert into main."{t}" select * from src."{t}"')
        con.execute("create table Experiment (key text, value text)")
        con.execute("insert into Experiment values ('a', 'b')")
    assert cpp._split_sqlite(big, tmp_path / "parts", ("cells", "image"), rows=4)
    parts = sorted((tmp_path / "parts").glob("part-*.sqlite"))
    assert [p.name for p in parts] == ["part-00000.sqlite", "part-00001.sqlite"]
    with sqlite3.connect(big) as con:
        for t in ("Image", "Cells"):
            want = con.execute(f'select * from "{t}" order by rowid').fetchall()
            info = con.execute(f'pragma table_info("{t}")').fetchall()
            got = []
            for p in parts:
                with sqlite3.connect(p) as part:
                    rows = part.execute(f'select * from "{t}" order by rowid').fetchall()
                    assert 0 < len(rows) <= 4
                    assert part.execute(f'pragma table_info("{t}")').fetchall() == info
                    got += rows
            assert len(want) == 6 and got == want
        with sqlite3.connect(parts[0]) as part:
            kept = {r[0] for r in part.execute("select name from sqlite_master")}
        assert kept == {"Image", "Cells"}  # Nuclei, Cytoplasm, Experiment: not targets
    con = sqlite3.connect(":memory:")  # an image's objects stay in one part
    con.execute("create table Cells (ImageNumber int, ObjectNumber int)")
    con.executemany("insert into Cells values (?, ?)",
                    [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1)])
    assert cpp._rowid_chunks(con, "Cells", 2) == [(1, 3), (4, 6), (7, 7)]
    con.execute("create table Other (x int)")  # no ImageNumber: cut every 2 rows
    con.executemany("insert into Other values (?)", [(1,), (1,), (1,)])
    assert cpp._rowid_chunks(con, "Other", 2) == [(1, 2), (3, 3)]
    con.close()
    odd = tmp_path / "odd.sqlite"
    with sqlite3.connect(odd) as con:
        con.execute("create table Cells (ImageNumber int primary key, x real) without rowid")
        con.execute("insert into Cells values (1, 0.5)")
    assert not cpp._split_sqlite(odd, tmp_path / "odd_parts", ("cells",), rows=4)
    assert not (tmp_path / "odd_parts").exists()  # left to CytoTable as it is


@needs_data
@pytest.mark.parametrize(("kind", "size"), [("sqlite", "4.0"), ("csv", "1.5")])
def test_too_little_disk_for_the_split_is_one_error_and_leaves_nothing(kind, size, tmp_path,
                                                                       monkeypatch):
    import collections

    import morphoprof.features.cellprofiler_parts as cpp

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cpp.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"not enough free space in {out}: the import needs "
                                         rf"about {size} MB .* 0\.0 MB free"):
        import_cellprofiler(SOURCES[kind], out)
    assert list(out.iterdir()) == []  # no cells.parquet, no work folder left


@needs_data
def test_an_interrupted_import_resumes_from_the_tables_it_had_converted(tmp_path, monkeypatch):
    """Ctrl-C after CytoTable's conversion: the work folder stays, and the same command
    again reuses its tables (CytoTable not run again) and gives the cells of an uninterrupted
    import; another chunk size starts over."""
    import cytotable

    import morphoprof.features.cellprofiler as cp

    src = SOURCES["sqlite"]
    clean = import_cellprofiler(src, tmp_path / "clean")
    real_join, real_convert = cp._paged_join, cytotable.convert
    converts = []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def counted(**kwargs):
        converts.append(kwargs["chunk_size"])
        return real_convert(**kwargs)

    monkeypatch.setattr(cytotable, "convert", counted)
    monkeypatch.setattr(cp, "_paged_join", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        import_cellprofiler(src, out)
    work = out / ".import-work"
    assert (work / "tables.done").exists() and not (out / "cells.parquet").exists()
    monkeypatch.setattr(cp, "_paged_join", real_join)
    resumed = import_cellprofiler(src, out)
    assert converts == [5000] and not work.exists()  # not converted again
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cells.parquet"),
                                  pd.read_parquet(tmp_path / "clean" / "cells.parquet"))
    assert resumed.rows == clean.rows
    monkeypatch.setattr(cp, "_paged_join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_cellprofiler(src, tmp_path / "out2", chunk_size=100)
    monkeypatch.setattr(cp, "_paged_join", real_join)
    import_cellprofiler(src, tmp_path / "out2", chunk_size=200)
    assert converts == [5000, 100, 200]  # another chunk size: converted again
    work = tmp_path / "out3" / ".import-work"  # killed while splitting: starts over
    monkeypatch.setattr(cp, "_paged_join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_cellprofiler(src, tmp_path / "out3")
    (work / "tables.done").unlink()
    (work / "parts").mkdir()
    with sqlite3.connect(work / "parts" / "part-00000.sqlite") as con:
        con.execute("create table Per_Cells (x int)")
    monkeypatch.setattr(cp, "_paged_join", real_join)
    assert import_cellprofiler(src, tmp_path / "out3").rows == clean.rows
    assert converts == [5000, 100, 200, 5000, 5000] and not work.exists()


def _csv_screen(folder: Path, images: int, bump: dict[int, float] | None = None) -> Path:
    """The real ExampleHuman CSVs with their image repeated ``images`` times (ImageNumber 1,
    2, ...), CellProfiler's ``nan`` in a few cells' features; ``bump``: image number -> a
    value added to its cells' area."""
    folder.mkdir(parents=True)
    for name in ("Image", "Cells", "Cytoplasm", "Nuclei", "Experiment"):
        df = pd.read_csv(SOURCES["csv"] / f"{name}.csv")
        if name == "Cells":
            df.iloc[::97, 5] = np.nan
        if "ImageNumber" in df.columns:
            df = pd.concat([df.assign(ImageNumber=k + 1) for k in range(images)])
        if name == "Cells":
            for image, value in (bump or {}).items():
                df.loc[df["ImageNumber"] == image, "AreaShape_Area"] += value
        df.to_csv(folder / f"{name}.csv", index=False, na_rep="nan")
    return folder


@needs_data
def test_a_csv_folder_is_staged_and_gives_the_cells_cytotable_reads_from_the_csvs(tmp_path,
                                                                                   monkeypatch):
    """Staging a CSV folder into one SQLite (then split into parts) is invisible: the same
    objects, values and column types as CytoTable reading the CSVs themselves."""
    import morphoprof.features.cellprofiler_parts as cpp

    folder = _csv_screen(tmp_path / "csv", 3)
    calls = []
    real_split = cpp._split_sqlite

    def spy(source, dest, targets, rows):
        done = real_split(source, dest, targets, rows)
        calls.append((Path(source).name, len(list(dest.glob("part-*.sqlite")))))
        return done

    monkeypatch.setattr(cpp, "_split_sqlite", spy)
    staged = import_cellprofiler(folder, tmp_path / "staged", chunk_size=300)
    assert calls == [("staged.sqlite", 2)]  # images 1-2 (578 rows of each table), image 3
    monkeypatch.setattr(cpp, "_stage_csv", lambda *a: False)
    direct = import_cellprofiler(folder, tmp_path / "direct", chunk_size=300)
    assert len(calls) == 1 and staged.rows == direct.rows == 3 * 289
    assert staged.features == direct.features
    a, b = (pq.read_table(tmp_path / d / "cells.parquet") for d in ("staged", "direct"))
    assert a.schema.equals(b.schema, check_metadata=False)
    key = ["Metadata_ImageNumber", "Metadata_ObjectNumber"]
    a, b = (t.to_pandas().sort_values(key, ignore_index=True) for t in (a, b))
    assert not a.duplicated(key).any() and a[a.columns[a.isna().any()]].shape[1] > 0
    pd.testing.assert_frame_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == ["cells.parquet",
                                                                         "import.json"]


@needs_data
def test_batch_folders_of_csvs_keep_each_folders_objects_apart(tmp_path):
    """A run split into batch folders, each numbering its images from 1: the images are
    renumbered over the folders in path order and each object joins its own folder's objects
    (CytoTable reading the folders joined every folder's objects with every other's: 8x the
    cells). Same cells as one folder holding both images."""
    batches = tmp_path / "batches"
    _csv_screen(batches / "b1", 1)
    _csv_screen(batches / "b2", 1, bump={1: 1000.0})
    for b in ("b1", "b2"):  # a DATE column: cast to text when folders are read together
        image = pd.read_csv(batches / b / "Image.csv").assign(Metadata_Date="2016-05-04")
        image.to_csv(batches / b / "Image.csv", index=False)
    assert detect_kind(batches) == "csv"  # the CSVs are below the folder given
    got = import_cellprofiler(batches, tmp_path / "got")
    assert got.notes[-1] == ("note: batches holds 2 folders of CSVs; Metadata_ImageNumber "
                             "counts the images over them in path order")
    one = _csv_screen(tmp_path / "one", 2, bump={2: 1000.0})
    want = import_cellprofiler(one, tmp_path / "want")
    assert got.rows == want.rows == 2 * 289
    key = ["Metadata_ImageNumber", "Metadata_ObjectNumber"]
    a, b = (pd.read_parquet(tmp_path / d / "cells.parquet").drop(columns="Metadata_plate")
            .sort_values(key, ignore_index=True) for d in ("got", "want"))
    assert (a.groupby("Metadata_ImageNumber")["Cells_AreaShape_Area"].min() > 1000).tolist() \
        == [False, True]
    assert (a.pop("Metadata_Date") == "2016-05-04").all()  # the DATE column as text
    assert a.pop("Metadata_Folder").tolist() == ["b1"] * 289 + ["b2"] * 289
    pd.testing.assert_frame_equal(a, b)
    (batches / "b2" / "Nuclei.csv").unlink()
    with pytest.raises(InputError, match=r"b2: has Cells, Cytoplasm, Image CSVs but not Nuclei; "
                                         "every folder of CellProfiler CSVs needs the same"):
        import_cellprofiler(batches, tmp_path / "out2")
    (batches / "b1" / "Nuclei.csv").unlink()
    (batches / "b2" / "Image.csv").write_text("ImageNumber,Count_Cells\n")
    with pytest.raises(InputError, match=r"b2: has objects but its Image CSV has no rows"):
        import_cellprofiler(batches, tmp_path / "out3")


@needs_data
def test_csvs_named_with_cellprofilers_export_prefix_import_as_the_plain_names(tmp_path):
    """ExportToSpreadsheet prefixes its files by default (``MyExpt_Image.csv``...), which
    CytoTable does not read: the same cells as the unprefixed CSVs."""
    plain = _csv_screen(tmp_path / "plain", 2)
    mine = _renamed_copy(plain, tmp_path / "mine", lambda f: f"MyExpt_{f.name}")
    assert detect_kind(mine) == "csv"
    import_cellprofiler(plain, tmp_path / "a")
    import_cellprofiler(mine, tmp_path / "b")
    a, b = (pd.read_parquet(tmp_path / d / "cells.parquet").drop(columns="Metadata_plate")
            for d in ("a", "b"))
    key = ["Metadata_ImageNumber", "Metadata_ObjectNumber"]
    assert len(a) == 2 * 289
    pd.testing.assert_frame_equal(a.sort_values(key, ignore_index=True),
                                  b.sort_values(key, ignore_index=True))
    image = pd.read_csv(mine / "MyExpt_Image.csv").assign(Metadata_Date="2016-05-04")
    image.to_csv(mine / "MyExpt_Image.csv", index=False)  # a DATE column: read as text
    assert import_cellprofiler(mine, tmp_path / "c").rows == 2 * 289
    (mine / "Other_Image.csv").write_bytes((mine / "MyExpt_Image.csv").read_bytes())
    (mine / "Other_Nuclei.csv").write_bytes((mine / "MyExpt_Nuclei.csv").read_bytes())
    with pytest.raises(InputError, match=r"mine: CSVs of several CellProfiler exports side by "
                                         r"side \(file name prefixes MyExpt_, Other_\)"):
        import_cellprofiler(mine, tmp_path / "d")


def _renamed_copy(src: Path, dst: Path, rename) -> Path:
    """A copy of the CSV folder ``src`` in ``dst``, each file named ``rename(path)``."""
    dst.mkdir()
    for f in src.glob("*.csv"):
        (dst / rename(f)).write_bytes(f.read_bytes())
    return dst


@needs_data
def test_csvs_with_an_upper_case_extension_import_as_the_others(tmp_path):
    """``Image.CSV`` (a Windows share, a renaming tool) is a CSV like ``Image.csv``."""
    plain = _csv_screen(tmp_path / "plain", 1)
    upper = _renamed_copy(plain, tmp_path / "upper", lambda f: f"{f.stem}.CSV")
    assert detect_kind(upper) == "csv"
    a, b = (pd.read_parquet(import_cellprofiler(src, tmp_path / d).out)
            .drop(columns="Metadata_plate") for src, d in ((plain, "a"), (upper, "b")))
    assert len(a) == 289
    pd.testing.assert_frame_equal(a, b)


@needs_data
def test_a_sqlite_with_a_table_name_prefix_imports_as_the_plain_names(tmp_path):
    """ExportToDatabase's "add a prefix to table names" (``MyExpt_Per_Image``...), which
    the CytoTable preset's join does not name: the same cells as the plain names."""
    import shutil

    src = tmp_path / "prefixed.sqlite"
    shutil.copy(SOURCES["sqlite"], src)
    src.chmod(0o644)
    with sqlite3.connect(src) as con:
        for (t,) in con.execute("select name from sqlite_master where type = 'table' and "
                                "name like 'Per_%'").fetchall():
            con.execute(f'alter table "{t}" rename to "MyExpt_{t}"')
    assert detect_kind(src) == "sqlite"
    import_cellprofiler(src, tmp_path / "a")
    import_cellprofiler(SOURCES["sqlite"], tmp_path / "b")
    a, b = (pd.read_parquet(tmp_path / d / "cells.parquet") for d in ("a", "b"))
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)


@needs_data
def test_csv_image_metadata_gives_the_cells_plate_well_and_site(tmp_path):
    """Plate, well and site from the CSVs' Image table (CytoTable's CSV join leaves them out,
    so every image was its own well), also where CellProfiler wrote them into each object CSV
    too (the same names in every table: a traceback before)."""
    folder = _csv_screen(tmp_path / "screen", 3)
    image = pd.read_csv(folder / "Image.csv")
    image.insert(1, "Metadata_Plate", "P1")
    image.insert(2, "Metadata_Well", ["B03", "B03", "C04"])
    image.insert(3, "Metadata_Site", [1, 2, 1])
    image.to_csv(folder / "Image.csv", index=False)
    cells = import_cellprofiler(folder, tmp_path / "a")
    assert cells.notes == ()  # no "no plate / well metadata" note
    got = pd.read_parquet(tmp_path / "a" / "cells.parquet")
    assert list(got.columns[:3]) == ["Metadata_plate", "Metadata_well", "Metadata_site"]
    per_image = got.groupby("Metadata_ImageNumber")[["Metadata_plate", "Metadata_well",
                                                     "Metadata_site"]].agg(set)
    assert per_image.to_dict("list") == {"Metadata_plate": [{"P1"}] * 3,
                                         "Metadata_well": [{"B03"}, {"B03"}, {"C04"}],
                                         "Metadata_site": [{1}, {2}, {1}]}
    for name in ("Cells", "Cytoplasm", "Nuclei"):  # ExportToSpreadsheet's "add image metadata"
        df = pd.read_csv(folder / f"{name}.csv")
        df = df.merge(image[["ImageNumber", "Metadata_Plate", "Metadata_Well"]], how="left")
        df.to_csv(folder / f"{name}.csv", index=False, na_rep="nan")
    pd.DataFrame({"well": ["B03", "C04"], "compound": ["DMSO", "taxol"], "concentration": 1.0,
                  "moa": ["DMSO", "tubulin"]}).to_csv(tmp_path / "platemap.csv", index=False)
    import_cellprofiler(folder, tmp_path / "b", platemap=tmp_path / "platemap.csv")
    again = pd.read_parquet(tmp_path / "b" / "cells.parquet")
    assert again.groupby("Metadata_well")["Metadata_compound"].agg(set).to_dict() == {
        "B03": {"DMSO"}, "C04": {"taxol"}}  # the plate map joined on the CSVs' wells
    again = again.drop(columns=["Metadata_compound", "Metadata_concentration", "Metadata_moa"])
    key = ["Metadata_ImageNumber", "Metadata_ObjectNumber"]
    pd.testing.assert_frame_equal(again.sort_values(key, ignore_index=True),
                                  got.sort_values(key, ignore_index=True))
    assert main(["aggregate", str(tmp_path / "b" / "cells.parquet"), "--out",
                 str(tmp_path / "prof"), "--normalize", "none"]) == 0
    wells = pd.read_parquet(tmp_path / "prof" / "wells.parquet")
    assert sorted(wells["Metadata_well"]) == ["B03", "C04"]


@needs_data
def test_a_sqlite_without_plate_metadata_imports_with_its_other_image_metadata(tmp_path):
    """The ExportToDatabase preset's join names the plate and well columns: a SQLite without
    plate metadata failed to join (a DuckDB traceback). Every image metadata column the file
    has is carried (the site too)."""
    import shutil

    src = tmp_path / "noplate.sqlite"
    shutil.copy(SOURCES["sqlite"], src)
    src.chmod(0o644)
    with sqlite3.connect(src) as con:
        con.execute("alter table Per_Image rename column Image_Metadata_Plate to "
                    "Image_Metadata_Barcode")
    summary = import_cellprofiler(src, tmp_path / "out")
    assert summary.notes == ("note: noplate.sqlite has no plate metadata; Metadata_plate = "
                             "'noplate'",)
    cells = pd.read_parquet(tmp_path / "out" / "cells.parquet")
    with sqlite3.connect(src) as con:
        images = pd.read_sql("select ImageNumber, Image_Metadata_Barcode, Image_Metadata_Well, "
                             "Image_Metadata_Site from Per_Image", con)
        assert con.execute("select count(*) from Per_Cells").fetchone()[0] == len(cells)
    got = cells.groupby("Metadata_ImageNumber")[["Metadata_Barcode", "Metadata_well",
                                                 "Metadata_site"]].first()
    want = images.set_index("ImageNumber").loc[got.index]
    assert (cells["Metadata_plate"] == "noplate").all()
    assert got.to_numpy().tolist() == want.to_numpy().tolist()
    with sqlite3.connect(src) as con:  # a key the preset joins on, missing: one error
        con.execute("alter table Per_Cells rename column Cells_Number_Object_Number to x")
    with pytest.raises(InputError, match=r"noplate.sqlite: its tables do not join as "
                                         "CytoTable's cellprofiler_sqlite preset expects: "
                                         ".*Cells_Number_Object_Number"):
        import_cellprofiler(src, tmp_path / "out2")
    assert list((tmp_path / "out2").iterdir()) == []


@needs_data
def test_csv_folders_staging_cannot_copy_are_read_as_they_are_and_bad_csvs_named(tmp_path):
    import morphoprof.features.cellprofiler_parts as cpp

    targets = ("cells", "nuclei", "cytoplasm", "image")
    dated = _csv_screen(tmp_path / "dated", 1)
    image = pd.read_csv(dated / "Image.csv").assign(Metadata_Date="2016-05-04")
    image.to_csv(dated / "Image.csv", index=False)
    assert not cpp._stage_csv(dated, tmp_path / "staged.sqlite", targets)  # a DATE column
    assert not (tmp_path / "staged.sqlite").exists()
    bad = _csv_screen(tmp_path / "bad", 1)
    lines = (bad / "Nuclei.csv").read_text().splitlines()
    lines[5] += ",1,2,3"
    (bad / "Nuclei.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=f"{bad / 'Nuclei.csv'}: cannot read it as CSV: "):
        import_cellprofiler(bad, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
