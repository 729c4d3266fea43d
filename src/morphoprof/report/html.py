"""A self-contained HTML report of a profiling run: configuration, dataset summary, MoA matching
(NSC / NSCB) with per-MoA accuracy and confusion matrices, and a 2-D map of treatment profiles.

Figures are drawn with matplotlib and embedded as base64 PNG, so the file opens anywhere offline.
The page itself, its sections and the "how to read this" notes are the Jinja2 template
``templates/report.html.j2``; this module computes what goes into it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from PIL import Image

from morphoprof.errors import InputError
from morphoprof.evaluation.evaluate import Evaluation
from morphoprof.index.schema import MOA
from morphoprof.io_utils import atomic_path
from morphoprof.shards import feature_columns

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3} td.num{text-align:right} pre{background:#f7f7f7;padding:.8em;overflow:auto}
img{max-width:100%} .fig{display:inline-block;margin:.5em;vertical-align:top}
p.how{color:#555;font-size:.9em;max-width:60em} table.header th{text-align:left}
.thumbs{display:flex;flex-wrap:wrap;gap:.5em} figure{margin:0;font-size:.75em;color:#555}
figure img{display:block;width:160px;image-rendering:auto}
"""


def _fig_to_img(fig, alt: str) -> Markup:
    """A matplotlib figure as an ``<img>`` with the PNG embedded (closes the figure)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(alt, data)


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


_MARKERS = ("o", "s", "^", "D", "v", "P")


def group_style(k: int) -> tuple[tuple[float, ...], str]:
    """Colour and marker of group ``k`` in a scatter plot: the 10 well-separated colours of
    matplotlib's tab10, then the same colours with another marker (tab20's pairs of
    near-identical shades are never used)."""
    import matplotlib

    return matplotlib.colormaps["tab10"](k % 10), _MARKERS[(k // 10) % len(_MARKERS)]


def _embedding_figure(profiles: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = profiles[feature_columns(profiles)].to_numpy(dtype=np.float64)
    xy, method = embed_2d(x)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    moas = profiles[MOA].astype(str) if MOA in profiles.columns else pd.Series([""] * len(x))
    for k, moa in enumerate(sorted(moas.unique())):
        sel = (moas == moa).to_numpy()
        colour, marker = group_style(k)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=30, color=colour, marker=marker,
                   label=moa or "(none)")
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_title(f"Treatment profiles ({method}), coloured by MoA")
    ax.legend(fontsize=7, loc="best", frameon=False)
    return _fig_to_img(fig, f"{method} of treatment profiles")


def _plate_heatmaps(counts: pd.DataFrame, label: str = "cells per well") -> str:
    """Counts per well (``label``: what they count) as one heatmap per plate (rows = well
    letters, columns = numbers)."""
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
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    return _fig_to_img(fig, label)


def _example_groups(examples: list[dict]) -> list[dict]:
    """Example fields as ``[{"moa", "fields": [{"label", "png"}]}]``, one group per run of the
    same MoA (PNG as base64 text)."""
    groups: list[dict] = []
    for ex in examples:
        if not groups or groups[-1]["moa"] != ex["moa"]:
            groups.append({"moa": ex["moa"], "fields": []})
        buf = io.BytesIO()
        Image.fromarray(ex["rgb"]).save(buf, format="PNG")
        groups[-1]["fields"].append({"label": ex["label"],
                                     "png": base64.b64encode(buf.getvalue()).decode()})
    return groups


def _nscb_note(evaluation: Evaluation) -> str:
    """Why NSCB can read above NSC, when it does in this evaluation."""
    nsc, nscb = evaluation.nsc or {}, evaluation.nscb or {}
    a, b = nsc.get("accuracy"), nscb.get("accuracy")
    if a is None or b is None or b <= a:
        return ""
    fewer = (f" NSCB also scores fewer queries ({nscb.get('n')} of {nsc.get('n')}: MoAs "
             "present in only one batch are dropped)." if (nscb.get("n") or 0) <
             (nsc.get("n") or 0) else "")
    return (f" Here NSCB ({_pct(b)}, {nscb.get('correct')}/{nscb.get('n')}) is above NSC "
            f"({_pct(a)}, {nsc.get('correct')}/{nsc.get('n')}). That is not an error: "
            "excluding same-batch neighbours also removes the treatments that look alike only "
            "because they were imaged together (a shared intensity or focus shift or, when "
            "profiles are centred per plate on a few control wells, the noise of those wells), "
            "so a wrong same-batch match under NSC can become a right one under NSCB." + fewer)


def _table(df: pd.DataFrame) -> Markup:
    """A table as HTML (pandas escapes the cells)."""
    return Markup(df.to_html(index=False, border=0, float_format=lambda v: f"{v:.3f}"))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _map_rows(evaluation: Evaluation) -> list[dict]:
    rows = []
    labels = {"moa": "MoA retrieval (same MoA, other compound vs other MoAs)",
              "activity": "Replicate activity (replicate wells vs control wells)"}
    for key, label in labels.items():
        r = evaluation.map.get(key)
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
    evaluation: Evaluation | Mapping,
    profiles: pd.DataFrame,
    summary: dict,
    config_text: str = "",
    title: str = "morphoprof report",
    cells_per_well: pd.DataFrame | None = None,
    qc_title: str = "cells per well",
    header: dict | None = None,
    examples: list[dict] | None = None,
) -> Path:
    """Write a self-contained HTML report (figures embedded as PNG; opens offline).

    Sections: dataset summary, QC plate heatmaps, NSC / NSCB table with k-NN voting, per-MoA
    accuracy, confusion matrices, mAP, nearest-neighbour accuracies, conformal prediction sets,
    a t-SNE map of the treatment profiles coloured by MoA, warnings, the run configuration.

    Args:
        out: the HTML file to write (atomically).
        evaluation: the :class:`~morphoprof.evaluation.evaluate.Evaluation` of
            :func:`~morphoprof.evaluation.evaluate.evaluate`, or its JSON (a mapping; the
            output of :func:`morphoprof.evaluation.moa.evaluate_moa` is one too).
        profiles: the treatment profiles that were evaluated.
        summary: dataset summary, {label: value} (plates, wells, image sets, ...).
        config_text: the run configuration as YAML text.
        cells_per_well: optional QC table (``Metadata_plate``, ``Metadata_well``, ``cells``),
            drawn as plate heatmaps.
        qc_title: what the QC counts are (segmented cells, or the rows each well profile
            summarises); also the heatmaps' colour-bar label.
        header: {label: value} shown first: date, morphoprof version, command, input paths
            (see :func:`morphoprof.pipeline.report_header`).
        examples: example fields (see :func:`morphoprof.pipeline.example_fields`), drawn as
            thumbnails per MoA.
    """
    if not isinstance(evaluation, Evaluation):
        evaluation = Evaluation.from_json(evaluation)
    scores = evaluation.scores()
    per = [{"protocol": key.upper(), "MoA": moa, "accuracy": _pct(v["accuracy"]),
            "correct / n": f"{v['correct']}/{v['n']}"}
           for key, r in scores.items() for moa, v in r.get("per_moa", {}).items()]
    map_rows, nn = _map_rows(evaluation), _nn_rows(evaluation)
    conf = evaluation.conformal if "coverage" in evaluation.conformal else None
    qc = cells_per_well is not None and len(cells_per_well) > 0
    page = _template().render(
        title=title, css=Markup(_CSS), header=header or {},
        summary_table=_table(pd.DataFrame({"item": list(summary),
                                           "value": [str(v) for v in summary.values()]})),
        qc_title=qc_title, qc_figure=_plate_heatmaps(cells_per_well, qc_title) if qc else None,
        examples=_example_groups(examples) if examples else [],
        example_channels=examples[0]["channels"] if examples else "",
        warnings=list(evaluation.warnings),
        matching_table=_table(pd.DataFrame(_matching_rows(evaluation))),
        nscb_note=_nscb_note(evaluation),
        per_moa_table=_table(pd.DataFrame(per)) if per else None,
        confusion_figures=[_confusion_figure(r, k.upper() + " confusion")
                           for k, r in scores.items() if r.get("confusion")],
        map_table=_table(pd.DataFrame(map_rows)) if map_rows else None,
        nn_table=_table(pd.DataFrame(nn)) if nn else None,
        conformal=conf, pct=_pct,
        conformal_table=_table(pd.DataFrame([
            {"MoA": m, "coverage": _pct(v["coverage"]), "mean set size": v["mean_set_size"],
             "n": v["n"]} for m, v in conf["per_moa"].items()])) if conf else None,
        embedding_figure=_embedding_figure(profiles), config_text=config_text)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def _template():
    """The report's Jinja2 template (``templates/report.html.j2``), autoescaped."""
    env = Environment(loader=PackageLoader("morphoprof.report", "templates"),
                      autoescape=select_autoescape(["j2", "html"]), trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("report.html.j2")


def _matching_rows(evaluation: Evaluation) -> list[dict]:
    """One row per protocol (NSC, NSCB): 1-NN accuracy, k-NN votes, dropped MoAs."""
    rows = []
    labels = {"nsc": "NSC (not same compound)", "nscb": "NSCB (not same compound or batch)"}
    for key, r in evaluation.scores().items():
        label = labels[key]
        row = {"protocol": label, "1-NN accuracy": _pct(r.get("accuracy")),
               "correct / n": f"{r.get('correct', 0)}/{r.get('n', 0)}"}
        for kname, entry in evaluation.knn.items():
            v = entry.get(key) or {}
            row[f"{kname[1:]}-NN vote"] = (_pct(v.get("accuracy")) + f" ({v.get('correct', 0)}"
                                           f"/{v.get('n', 0)})") if "accuracy" in v else "n/a"
        row["dropped MoAs"] = ", ".join(r.get("dropped_moas", [])) or "-"
        rows.append(row)
    return rows


def _nn_rows(evaluation: Evaluation) -> list[dict]:
    """Replicate accuracy and group accuracies, where the evaluation has them."""
    nn = []
    if evaluation.replicate_accuracy is not None:
        r = evaluation.replicate_accuracy
        nn.append({"metric": "replicate accuracy (nearest treated well is a replicate)",
                   "accuracy": _pct(r.get("accuracy")),
                   "correct / n": f"{r.get('correct', 0)}/{r.get('n', 0)}"})
    for col, r in evaluation.group_accuracy.items():
        nn.append({"metric": f"group accuracy: {col} (other compounds only)",
                   "accuracy": _pct(r.get("accuracy")),
                   "correct / n": f"{r.get('correct', 0)}/{r.get('n', 0)}"})
    return nn


def well_counts(wells: pd.DataFrame) -> pd.DataFrame:
    """QC table (plate, well, cells) from well profiles' ``Metadata_count`` (the number of cells,
    or of fields for whole-field features, each well's profile summarises)."""
    need = ["Metadata_plate", "Metadata_well", "Metadata_count"]
    missing = [c for c in need if c not in wells.columns]
    if missing:
        raise InputError(f"well profiles lack {missing} for the QC heatmaps")
    return wells[need].rename(columns={"Metadata_count": "cells"})


def profiles_summary(treatments: pd.DataFrame, wells: pd.DataFrame | None = None) -> dict:
    """Dataset rows the report can state from profiles alone: treatments, compounds, MoAs,
    batches (and wells, plates, control wells from well profiles)."""
    out: dict = {"treatment profiles": len(treatments)}
    for col, label in (("Metadata_compound", "compounds (excl. controls)"), (MOA, "MoAs")):
        if col in treatments.columns:
            out[label] = int(treatments[col].replace("", pd.NA).dropna().nunique())
    if "Metadata_batch" in treatments.columns:
        out["batches"] = len({b for v in treatments["Metadata_batch"].astype(str)
                              for b in v.split(";") if b})
    if wells is not None:
        out["well profiles"] = len(wells)
        if "Metadata_plate" in wells.columns:
            out["plates"] = int(wells["Metadata_plate"].nunique())
        if "Metadata_control" in wells.columns:
            out["control wells"] = int(wells["Metadata_control"].astype(bool).sum())
    return out
