import dataclasses
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from morphoprof.evaluation.evaluate import evaluate
from morphoprof.profiles.aggregate import treatment_profiles
from morphoprof.report.html import embed_2d, well_counts, write_report
from tests.test_evaluation_evaluate import make_wells

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    wells = make_wells()
    evaluation = evaluate(wells, k_values=(3,), null_size=200)
    write_report(out, evaluation, treatment_profiles(wells), {"plates": 3},
                 config_text="profiles: {normalization: {method: center}}",
                 cells_per_well=well_counts(wells))
    return out


def test_report_has_every_section(report):
    text = report.read_text()
    for heading in ("Dataset", "Quality control", "Mechanism-of-action matching",
                    "Per-MoA accuracy", "Confusion matrices", "mean average precision",
                    "Conformal MoA prediction", "t-SNE", "Run configuration"):
        assert heading in text, heading
    # QC heatmaps, two confusion matrices, the t-SNE map: all embedded, nothing fetched
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 4
    assert "http://" not in text and "https://" not in text


def test_embedding_separates_moas():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(15, 20)) + 6 * np.eye(20)[k] for k in range(3)])
    xy, method = embed_2d(x)
    assert method == "t-SNE" and xy.shape == (45, 2)
    centres = np.array([xy[15 * k:15 * (k + 1)].mean(0) for k in range(3)])
    spread = max(np.linalg.norm(xy[15 * k:15 * (k + 1)] - centres[k], axis=1).mean()
                 for k in range(3))
    gaps = min(np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i))
    assert gaps > 2 * spread
    assert embed_2d(x[:4])[1] == "PCA"  # too few points for t-SNE


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(tools/dev.py test installs it with apt-get)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    profile = ["--user-data-dir=" + str(tmp_path / "chromium-profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    # the page's own script counts the figures the browser decoded
    assert 'data-figures-rendered="4/4"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}",
                    "--window-size=1200,2400", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1200)
    # a rendered page with plots: many colours, and not a blank canvas
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 200 and img.std() > 20, (colours, img.std())


def test_report_header_how_to_read_and_nscb_note(tmp_path):
    wells = make_wells()
    evaluation = evaluate(wells, k_values=(3,), null_size=200)
    evaluation.nsc.update(accuracy=0.8, correct=8, n=10)
    evaluation.nscb.update(accuracy=1.0, correct=6, n=6)
    out = write_report(tmp_path / "r.html", evaluation, treatment_profiles(wells), {"plates": 3},
                       cells_per_well=well_counts(wells),
                       header={"command": "morphoprof report --profiles t.parquet",
                               "morphoprof": "0.1.0"})
    text = out.read_text()
    assert text.index("morphoprof report --profiles t.parquet") < text.index("<h2>Dataset")
    # every figure is followed by how to read it
    assert text.count("How to read this:") >= 4
    # NSCB above NSC is explained, with the smaller query set named
    assert "NSCB (100.0%, 6/6) is above NSC (80.0%, 8/10)" in text
    assert "NSCB also scores fewer queries (6 of 10" in text
    # when NSCB is not above NSC, no note
    evaluation.nscb.update(accuracy=0.5, correct=3, n=6)
    text = write_report(tmp_path / "s.html", evaluation, treatment_profiles(wells),
                        {"plates": 3}).read_text()
    assert "is above NSC" not in text


def test_values_are_escaped_by_the_template(tmp_path):
    wells = make_wells()
    evaluation = evaluate(wells, k_values=(3,), null_size=200)
    evaluation = dataclasses.replace(evaluation, warnings=(
        "plate <script>alert(1)</script> & co",))
    examples = [{"moa": "A<b>", "label": "field 'x'", "rgb": np.zeros((4, 4, 3), np.uint8),
                 "channels": "R=actin"}]
    text = write_report(tmp_path / "r.html", evaluation, treatment_profiles(wells),
                        {"plates <3": "a&b"}, config_text="x: '<pre>'",
                        header={"command": "morphoprof report </table>"},
                        examples=examples).read_text()
    assert "<script>alert(1)" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text
    assert "morphoprof report &lt;/table&gt;" in text and "<h3>A&lt;b&gt;</h3>" in text
    assert "plates &lt;3" in text and "x: &#39;&lt;pre&gt;&#39;" in text
    # the page's own markup is not escaped: one script (the figure counter), 3 figures + 1 field
    assert text.count("<script>") == 1 and len(re.findall(r"<img ", text)) == 4
