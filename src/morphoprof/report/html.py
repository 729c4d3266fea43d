"""A self-contained HTML report of a profiling run: configuration, dataset summary, MoA matching
(NSC / NSCB) with per-MoA accuracy and confusion matrices, and a 2-D map of treatment profiles.

Figures are drawn with matplotlib and embedded as base64 PNG, so the file opens anywhere offline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from morphoprof.errors import InputError
from morphoprof.features.shards import feature_columns
from morphoprof.index.schema import MOA
from morphoprof.io_utils import atomic_path

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3} td.num{text-align:right} pre{background:#f7f7f7;padding:.8em;overflow:auto}
img{max-width:100%} .fig{display:inline-block;margin:.5em;vertical-align:top}
"""


def _fig_to_img(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _confusion_figure(result: dict, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = result["confusion"]["labels"]
    m = np.array(result["confusion"]["matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(labels), 1.0 + 0.45 * len(labels)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > m.max() / 2 else "black")
    ax.set_xlabel("predicted MoA")
    ax.set_ylabel("true MoA")
    ax.set_title(title)
    return _fig_to_img(fig, title)


def embed_2d(x: np.ndarray, method: str = "tsne", seed: int = 0) -> tuple[np.ndarray, str]:
    """``(n, d)`` profiles -> ``(n, 2)`` coordinates and the method used: t-SNE (cosine metric,
    perplexity scaled to n) on the first <= 50 principal components; PCA when n < 6 or when
    asked for."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float64)
    n_comp = max(1, min(50, x.shape[0], x.shape[1]))
    pcs = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    if method == "tsne" and len(x) >= 6:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        xy = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                  random_state=seed).fit_transform(pcs)
        return xy, "t-SNE"
    if pcs.shape[1] < 2:
        pcs = np.column_stack([pcs, np.zeros(len(pcs))])
    return pcs[:, :2], "PCA"


def _embedding_figure(profiles: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = profiles[feature_columns(profiles)].to_numpy(dtype=np.float64)
    xy, method = embed_2d(x)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    moas = profiles[MOA].astype(str) if MOA in profiles.columns else pd.Series([""] * len(x))
    cmap = plt.get_cmap("tab20")
    for k, moa in enumerate(sorted(moas.unique())):
        sel = (moas == moa).to_numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=30, color=cmap(k % 20), label=moa or "(none)")
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_title(f"Treatment profiles ({method}), coloured by MoA")
    ax.legend(fontsize=7, loc="best", frameon=False)
    return _fig_to_img(fig, f"{method} of treatment profiles")


def _plate_heatmaps(counts: pd.DataFrame) -> str:
    """Cells per well as one heatmap per plate (rows = well letters, columns = numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = counts.copy()
    c["row"] = c["Metadata_well"].str.extract(r"^([A-Za-z]+)")[0].str.upper()
    c["col"] = pd.to_numeric(c["Metadata_well"].str.extract(r"(\d+)$")[0], errors="coerce")
    c = c.dropna(subset=["row", "col"])
    rows = sorted(c["row"].unique())
    cols = sorted(c["col"].astype(int).unique())
    plates = sorted(c["Metadata_plate"].unique())
    ncol = min(3, len(plates))
    nrow = -(-len(plates) // ncol)
    panel_h = max(1.5, 0.3 * len(rows) + 1.0)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, panel_h * nrow), squeeze=False,
                             gridspec_kw={"hspace": 0.7, "wspace": 0.25})
    vmax = max(int(c["cells"].max()), 1)
    for ax, plate in zip(axes.ravel(), plates):
        grid = np.full((len(rows), len(cols)), np.nan)
        for r in c[c["Metadata_plate"] == plate].itertuples():
            grid[rows.index(r.row), cols.index(int(r.col))] = r.cells
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(str(plate), fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
        ax.set_xticks(range(len(cols)), cols, fontsize=6)
    for ax in axes.ravel()[len(plates):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="cells per well")
    return _fig_to_img(fig, "cells per well")


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, float_format=lambda v: f"{v:.3f}")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _map_rows(evaluation: dict) -> list[dict]:
    rows = []
    labels = {"moa": "MoA retrieval (same MoA, other compound vs other MoAs)",
              "activity": "Replicate activity (replicate wells vs control wells)"}
    for key, label in labels.items():
        r = (evaluation.get("map") or {}).get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append({"metric": label, "mAP": "n/a", "retrieved (FDR < p)": r["error"],
                         "groups": "-"})
            continue
        rows.append({"metric": label, "mAP": f"{r['mean_map']:.3f}",
                     "retrieved (FDR < p)": f"{_pct(r['fraction_retrieved'])} "
                                             f"(p < {r['p_threshold']})",
                     "groups": r["n_groups"]})
    return rows


def write_report(
    out: str | Path,
    evaluation: dict,
    profiles: pd.DataFrame,
    summary: dict,
    config_text: str = "",
    title: str = "morphoprof report",
    cells_per_well: pd.DataFrame | None = None,
    qc_title: str = "cells per well",
) -> Path:
    """Write a self-contained HTML report (figures embedded as PNG; opens offline).

    Sections: dataset summary, QC plate heatmaps, NSC / NSCB table with k-NN voting, per-MoA
    accuracy, confusion matrices, mAP, nearest-neighbour accuracies, conformal prediction sets,
    a t-SNE map of the treatment profiles coloured by MoA, warnings, the run configuration.

    Args:
        out: the HTML file to write (atomically).
        evaluation: the output of :func:`morphoprof.evaluation.evaluate.evaluate` (or of
            :func:`morphoprof.evaluation.moa.evaluate_moa`).
        profiles: the treatment profiles that were evaluated.
        summary: dataset summary, {label: value} (plates, wells, image sets, ...).
        config_text: the run configuration as YAML text.
        cells_per_well: optional QC table (``Metadata_plate``, ``Metadata_well``, ``cells``),
            drawn as plate heatmaps.
        qc_title: what the QC counts are (segmented cells, or the rows each well profile
            summarises).
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append("<h2>Dataset</h2>")
    parts.append(_table(pd.DataFrame({"item": list(summary),
                                      "value": [str(v) for v in summary.values()]})))
    if cells_per_well is not None and len(cells_per_well):
        parts.append(f"<h2>Quality control: {html.escape(qc_title)}</h2>")
        parts.append(_plate_heatmaps(cells_per_well))
    warnings = evaluation.get("warnings") or []
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(
            f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    parts.append("<h2>Mechanism-of-action matching (cosine)</h2>")
    rows = []
    for key, label in (("nsc", "NSC (not same compound)"),
                       ("nscb", "NSCB (not same compound or batch)")):
        r = evaluation.get(key)
        if r is None:
            continue
        row = {"protocol": label, "1-NN accuracy": _pct(r.get("accuracy")),
               "correct / n": f"{r.get('correct', 0)}/{r.get('n', 0)}"}
        for kname, entry in (evaluation.get("knn") or {}).items():
            v = entry.get(key) or {}
            row[f"{kname[1:]}-NN vote"] = (_pct(v.get("accuracy")) + f" ({v.get('correct', 0)}"
                                           f"/{v.get('n', 0)})") if "accuracy" in v else "n/a"
        row["dropped MoAs"] = ", ".join(r.get("dropped_moas", [])) or "-"
        rows.append(row)
    parts.append(_table(pd.DataFrame(rows)))
    per = []
    for key in ("nsc", "nscb"):
        for moa, v in (evaluation.get(key) or {}).get("per_moa", {}).items():
            per.append({"protocol": key.upper(), "MoA": moa, "accuracy": _pct(v["accuracy"]),
                        "correct / n": f"{v['correct']}/{v['n']}"})
    if per:
        parts.append("<h3>Per-MoA accuracy</h3>" + _table(pd.DataFrame(per)))
    figs = [
        f"<div class='fig'>{_confusion_figure(evaluation[k], k.upper() + ' confusion')}</div>"
        for k in ("nsc", "nscb") if (evaluation.get(k) or {}).get("confusion")
    ]
    if figs:
        parts.append("<h3>Confusion matrices</h3>" + "".join(figs))
    map_rows = _map_rows(evaluation)
    if map_rows:
        parts.append("<h2>Retrieval: mean average precision (copairs)</h2>"
                     + _table(pd.DataFrame(map_rows)))
    nn = []
    if "replicate_accuracy" in evaluation:
        r = evaluation["replicate_accuracy"]
        nn.append({"metric": "replicate accuracy (nearest treated well is a replicate)",
                   "accuracy": _pct(r.get("accuracy")),
                   "correct / n": f"{r.get('correct', 0)}/{r.get('n', 0)}"})
    for col, r in (evaluation.get("group_accuracy") or {}).items():
        nn.append({"metric": f"group accuracy: {col} (other compounds only)",
                   "accuracy": _pct(r.get("accuracy")),
                   "correct / n": f"{r.get('correct', 0)}/{r.get('n', 0)}"})
    if nn:
        parts.append("<h3>Nearest-neighbour accuracy</h3>" + _table(pd.DataFrame(nn)))
    conf = evaluation.get("conformal")
    if conf and "coverage" in conf:
        parts.append("<h2>Conformal MoA prediction (leave one compound out)</h2>")
        parts.append(f"<p>Target coverage {_pct(conf['target_coverage'])}: empirical coverage "
                     f"{_pct(conf['coverage'])}, mean set size {conf['mean_set_size']:.2f} of "
                     f"{len(conf['labels'])} MoAs, singletons {_pct(conf['singleton_fraction'])}"
                     f" (n = {conf['n']}).</p>")
        parts.append(_table(pd.DataFrame([
            {"MoA": m, "coverage": _pct(v["coverage"]), "mean set size": v["mean_set_size"],
             "n": v["n"]} for m, v in conf["per_moa"].items()])))
    parts.append("<h2>Profiles</h2>" + _embedding_figure(profiles))
    if config_text:
        parts.append(f"<h2>Run configuration</h2><pre>{html.escape(config_text)}</pre>")
    # a browser marks how many figures it decoded (checked by the test suite in Chromium)
    parts.append("<script>window.addEventListener('load',function(){var im=document.images,"
                 "ok=0;for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)"
                 "ok++;}document.body.setAttribute('data-figures-rendered',ok+'/'+im.length);"
                 "});</script>")
    parts.append("</body></html>")
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return out


def well_counts(wells: pd.DataFrame) -> pd.DataFrame:
    """QC table (plate, well, cells) from well profiles' ``Metadata_count`` (the number of cells,
    or of fields for whole-field features, each well's profile summarises)."""
    need = ["Metadata_plate", "Metadata_well", "Metadata_count"]
    missing = [c for c in need if c not in wells.columns]
    if missing:
        raise InputError(f"well profiles lack {missing} for the QC heatmaps")
    return wells[need].rename(columns={"Metadata_count": "cells"})
