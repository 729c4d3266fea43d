import hashlib
import json

import numpy as np
import pytest
import tifffile

from morphoprof.datasets.synthetic import (
    SynthConfig,
    design_treatments,
    generate_screen,
    load_ground_truth,
)
from morphoprof.errors import InputError
from tests.conftest import TINY


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path, tiny_screen):
    folder, _ = tiny_screen
    again = tmp_path / "again"
    generate_screen(again, TINY)
    assert _digest(again) == _digest(folder)
    other = tmp_path / "other"
    generate_screen(other, SynthConfig(**{**TINY.to_json(), "seed": 4,
                                          "concentrations": (1.0,), "channels": TINY.channels}))
    assert _digest(other) != _digest(folder)


def test_layout_and_design(tiny_screen):
    folder, index = tiny_screen
    t = index.table
    # 2 batches x 2 plates; each plate: 2 DMSO wells + the compounds of its batch
    assert t["Metadata_plate"].nunique() == 4 and t["Metadata_batch"].nunique() == 2
    assert t.groupby("Metadata_plate")["Metadata_control"].sum().eq(2).all()
    per_cpd = t[~t["Metadata_control"]].groupby("Metadata_compound")["Metadata_batch"].nunique()
    assert per_cpd.eq(1).all()  # a compound lives in one batch, as in BBBC021
    moa_batches = t[~t["Metadata_control"]].groupby("Metadata_moa")["Metadata_batch"].nunique()
    assert moa_batches.ge(2).all()  # ... and every MoA spans several batches (NSCB possible)
    assert len(t) == json.loads((folder / "synth.json").read_text())["n_fields"]
    index.validate(check_shapes=True)
    img = index.read(0)
    assert img.shape == (3, 96, 96) and img.min() >= 0


def test_ground_truth_matches_masks_and_images(tiny_screen):
    folder, index = tiny_screen
    gt = load_ground_truth(folder)
    cells = gt["cells"]
    for i in range(len(index)):
        row = index.table.iloc[i]
        stem = f"{row.Metadata_plate}_{row.Metadata_well}_s{row.Metadata_site}"
        nuclei = tifffile.imread(folder / "masks" / row.Metadata_plate / f"{stem}_nuclei.tif")
        mine = cells[(cells.Metadata_plate == row.Metadata_plate)
                     & (cells.Metadata_well == row.Metadata_well)
                     & (cells.Metadata_site == row.Metadata_site)]
        assert sorted(np.unique(nuclei[nuclei > 0])) == sorted(mine.Metadata_object)
        for c in mine.itertuples():
            assert nuclei[int(round(c.center_y)), int(round(c.center_x))] == c.Metadata_object
            assert c.nucleus_area == (nuclei == c.Metadata_object).sum() > 0
        if len(mine):
            dna = index.read(i, ["DNA"])[0]
            assert dna[nuclei > 0].mean() > 2 * dna[nuclei == 0].mean()  # nuclei are bright
    moa = gt["treatments"].set_index("compound")["moa"]
    treated = index.table[~index.table["Metadata_control"]]
    expected = moa[treated["Metadata_compound"]].to_numpy()
    assert (treated["Metadata_moa"].to_numpy() == expected).all()


def test_illumination_truth_is_applied(tmp_path):
    cfg = SynthConfig(n_moas=1, compounds_per_moa=1, concentrations=(1.0,), n_batches=1,
                      plates_per_batch=1, dmso_wells_per_plate=12, sites_per_well=2,
                      height=64, width=64, cells_per_field=30, illumination_strength=0.6)
    index = generate_screen(tmp_path / "s", cfg)
    truth = load_ground_truth(tmp_path / "s")["illumination"]
    plate = index.table["Metadata_plate"].iloc[0]
    assert truth[plate].shape == (3, 64, 64) and truth[plate].max() == pytest.approx(1.0)
    mean = np.mean([index.read(i) for i in range(len(index))], axis=0)
    # the average field follows the true illumination (tubulin is broad enough to show it)
    r = np.corrcoef(mean[1].ravel(), truth[plate][1].ravel())[0, 1]
    assert r > 0.5


def test_effects_follow_moa_and_dose():
    cfg = SynthConfig()
    ts = design_treatments(cfg)
    assert ts[0].compound == "DMSO" and not ts[0].effect.any()
    by_cpd = {}
    for t in ts[1:]:
        by_cpd.setdefault(t.compound, []).append(np.linalg.norm(t.effect))
    assert all(v[0] < v[1] for v in by_cpd.values())  # higher dose, stronger effect
    e = {t.compound: t.effect for t in ts[1:] if t.concentration == 1.0}
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert cos(e["cpd1a"], e["cpd1b"]) > cos(e["cpd1a"], e["cpd2a"])


def test_reuse_refuse_and_overwrite(tmp_path):
    cfg = SynthConfig(n_moas=1, compounds_per_moa=1, n_batches=1, plates_per_batch=1,
                      sites_per_well=1, height=48, width=48)
    out = tmp_path / "s"
    generate_screen(out, cfg)
    stamp = (out / "synth.json").stat().st_mtime_ns
    generate_screen(out, cfg)  # reused, not rewritten
    assert (out / "synth.json").stat().st_mtime_ns == stamp
    other = SynthConfig(n_moas=2, compounds_per_moa=1, n_batches=2, plates_per_batch=1,
                        sites_per_well=1, height=48, width=48)
    with pytest.raises(InputError, match="other parameters"):
        generate_screen(out, other)
    generate_screen(out, other, overwrite=True)
    assert json.loads((out / "synth.json").read_text())["config"]["n_moas"] == 2
    assert not list(tmp_path.glob(".s.tmp-*"))  # nothing half-written left behind
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not a synthetic screen"):
        generate_screen(tmp_path / "junk", cfg)
    # --overwrite replaces a screen, never a folder of other files (it would delete them)
    with pytest.raises(InputError, match="only replaces a synthetic screen"):
        generate_screen(tmp_path / "junk", cfg, overwrite=True)
    assert (tmp_path / "junk" / "x.txt").read_text() == "x"


def test_a_failed_generation_leaves_the_old_screen_and_no_temporary_folder(tmp_path,
                                                                           monkeypatch):
    """A full disk part-way (the 5th image): one OutputError naming the screen's own path, the
    temporary folder removed (it was left behind), the earlier screen untouched."""
    from morphoprof.datasets import synthetic
    from morphoprof.errors import OutputError
    from morphoprof.io_utils import write_tiff

    cfg = SynthConfig(n_moas=1, compounds_per_moa=1, n_batches=1, plates_per_batch=1,
                      sites_per_well=1, height=48, width=48)
    out = tmp_path / "s"
    generate_screen(out, cfg)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls = []

    def full_disk(path, array, compress=False):
        calls.append(path)
        if len(calls) == 5:
            raise OutputError(path, "No space left on device")
        return write_tiff(path, array, compress)

    monkeypatch.setattr(synthetic, "write_tiff", full_disk)
    other = SynthConfig(n_moas=2, compounds_per_moa=1, n_batches=1, plates_per_batch=1,
                        sites_per_well=1, height=48, width=48)
    with pytest.raises(OutputError) as got:
        generate_screen(out, other, overwrite=True)
    text = str(got.value)
    assert text.startswith(f"cannot write {out}/") and ".tmp-" not in text, text
    assert not list(tmp_path.glob(".s.tmp-*"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert json.loads((out / "synth.json").read_text())["config"]["n_moas"] == 1
