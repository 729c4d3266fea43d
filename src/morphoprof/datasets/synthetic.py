"""A synthetic high-content screen with known biology and known nuisance.

Cells are drawn as a nucleus (DNA channel), a cell body with radial microtubules (Tubulin) and a
cortical actin ring with puncta (Actin). Each cell's morphology is a vector of phenotype
parameters (:data:`PHENOTYPE`); a compound shifts it along its mechanism of action's direction
(plus a compound-specific twist), scaled by dose. Nuisance effects are added on top: a smooth
illumination field per plate and channel, a per-batch intensity gain, well-to-well cell density,
background and shot noise.

Layout written by :func:`generate_screen`::

    OUT/images/<plate>/<plate>_<well>_s<site>_<channel>.tif   uint16, one file per channel
    OUT/masks/<plate>/<plate>_<well>_s<site>_{nuclei,cells}.tif  uint16 labels (0 = background)
    OUT/index.parquet          experiment index (morphoprof.index)
    OUT/cells.parquet          ground truth: one row per cell (centre, areas, treatment)
    OUT/treatments.csv         compound, concentration, moa, and the compound's effect vector
    OUT/illumination.npz       true illumination field per plate: (C, H, W) float32, max 1
    OUT/synth.json             the parameters; written last, marks a complete screen

Everything is seeded: the same :class:`SynthConfig` gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from morphoprof.errors import InputError
from morphoprof.index.schema import ExperimentIndex, build_index
from morphoprof.io_utils import atomic_dir, read_parquet, write_parquet, write_tiff
from morphoprof.logs import progress_bar
from morphoprof.settings import Settings

logger = logging.getLogger(__name__)

CHANNELS = ("DNA", "Tubulin", "Actin")
PHENOTYPE = (
    "nucleus_size",
    "nucleus_elongation",
    "dna_intensity",
    "dna_texture",
    "cell_size",
    "cell_elongation",
    "tubulin_intensity",
    "tubulin_fibres",
    "actin_ring",
    "actin_puncta",
)
# Direction of each mechanism in phenotype space (standardised units), loosely after the
# phenotypes of BBBC021's MoAs. Only the first ``n_moas`` are used.
MOA_EFFECTS: dict[str, dict[str, float]] = {
    "Microtubule destabilizers": {
        "tubulin_fibres": -2.0, "tubulin_intensity": -0.8, "cell_size": -1.0,
        "cell_elongation": -1.0,
    },
    "Actin disruptors": {"actin_ring": -1.8, "actin_puncta": 2.2, "cell_elongation": 0.5},
    "DNA damage": {"nucleus_size": 1.6, "dna_texture": 1.5, "cell_size": 1.0},
    "Eg5 inhibitors": {
        "nucleus_size": -1.0, "dna_intensity": 2.0, "cell_size": -1.6, "nucleus_elongation": -0.8,
    },
    "Microtubule stabilizers": {
        "tubulin_fibres": 2.0, "tubulin_intensity": 1.5, "nucleus_elongation": 1.2,
    },
    "Protein synthesis": {
        "cell_size": -1.2, "tubulin_intensity": -1.2, "actin_ring": -0.8, "dna_intensity": -0.8,
    },
}
CYTOTOXIC = {"DNA damage": 0.6, "Protein synthesis": 0.7, "Eg5 inhibitors": 0.8}
_ROWS = "BCDEFGHIJKLMNO"


class SynthConfig(Settings):
    """Parameters of a synthetic screen. Defaults give a small screen (216 fields, 256x256).

    As in BBBC021, each compound (all its concentrations) is screened in one batch, on every plate
    of that batch (the plates are the replicates); the compounds of one MoA are spread over
    different batches, so that NSCB has neighbours to find. DMSO wells are on every plate.
    """

    n_moas: int = Field(4, ge=1, le=len(MOA_EFFECTS), description="mechanisms of action")
    compounds_per_moa: int = Field(3, ge=1, description="compounds per MoA")
    concentrations: tuple[float, ...] = Field((0.3, 1.0), strict=False,
                                              description="concentrations of each compound")
    n_batches: int = Field(3, ge=1, description="batches (weeks)")
    plates_per_batch: int = Field(3, ge=1, description="plates per batch")
    dmso_wells_per_plate: int = Field(4, ge=0, description="DMSO wells per plate")
    sites_per_well: int = Field(2, ge=1, description="fields of view per well")
    height: int = Field(256, ge=32, description="field height, px")
    width: int = Field(256, ge=32, description="field width, px")
    cells_per_field: float = Field(24.0, gt=0, description="mean cells per field")
    cell_scale: float = Field(1.0, gt=0, description="cell size multiplier")
    compound_twist: float = Field(0.45, description="how far a compound's phenotype turns "
                                  "away from its MoA's")
    cell_noise: float = Field(0.35, ge=0, description="cell-to-cell variation")
    batch_gain_spread: float = Field(0.2, ge=0, description="intensity gain spread of batches")
    illumination_strength: float = Field(0.35, ge=0, description="vignetting of the fields")
    seed: int = Field(0, description="random seed")
    channels: tuple[str, ...] = Field(CHANNELS, strict=False, description="fixed: "
                                      + ", ".join(CHANNELS))

    @field_validator("channels")
    @classmethod
    def _fixed_channels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(value) != CHANNELS:
            raise ValueError(f"channels are fixed to {CHANNELS}")
        return tuple(value)

    def to_json(self) -> dict:
        """The parameters as JSON types (``synth.json``; lists for the tuples)."""
        return self.model_dump(mode="json")


@dataclass
class Treatment:
    compound: str
    concentration: float
    moa: str
    effect: np.ndarray  # (len(PHENOTYPE),) standardised shift of the phenotype
    batch: int = -1  # batch (0-based) the compound is screened in; -1 for DMSO (every plate)


def design_treatments(cfg: SynthConfig) -> list[Treatment]:
    """The screen's treatments: every compound at every concentration, plus DMSO (first)."""
    rng = np.random.default_rng([cfg.seed, 1])
    out = [Treatment("DMSO", 0.0, "DMSO", np.zeros(len(PHENOTYPE)))]
    moas = list(MOA_EFFECTS)[: cfg.n_moas]
    doses = sorted(cfg.concentrations)
    for m, moa in enumerate(moas):
        direction = np.array([MOA_EFFECTS[moa].get(p, 0.0) for p in PHENOTYPE])
        for c in range(cfg.compounds_per_moa):
            twist = rng.normal(size=len(PHENOTYPE))
            twist *= cfg.compound_twist * np.linalg.norm(direction) / np.linalg.norm(twist)
            potency = rng.uniform(0.8, 1.25)
            base = (direction + twist) * potency
            name = f"cpd{m + 1}{chr(ord('a') + c)}"
            for k, conc in enumerate(doses):
                # Dose response: the effect grows with concentration and saturates at the top.
                scale = (k + 1) / len(doses) if len(doses) > 1 else 1.0
                effect = base * (0.35 + 0.65 * scale)
                batch = (m + c) % cfg.n_batches
                out.append(Treatment(name, float(conc), moa, effect, batch))
    return out


def _plate_names(cfg: SynthConfig) -> list[tuple[str, str]]:
    return [
        (f"Week{b + 1}_P{b + 1}{p + 1:02d}", f"Week{b + 1}")
        for b in range(cfg.n_batches)
        for p in range(cfg.plates_per_batch)
    ]


def _well_name(k: int) -> str:
    return f"{_ROWS[k // 22 % len(_ROWS)]}{k % 22 + 2:02d}"


def illumination_field(cfg: SynthConfig, plate_no: int) -> np.ndarray:
    """The true illumination of plate ``plate_no``: (C, H, W) float32, max 1, smooth."""
    rng = np.random.default_rng([cfg.seed, 2, plate_no])
    yy, xx = np.mgrid[0 : cfg.height, 0 : cfg.width].astype(np.float32)
    yy /= cfg.height
    xx /= cfg.width
    fields = []
    for _ in CHANNELS:
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        sy, sx = rng.uniform(0.5, 0.9, size=2)
        tilt = rng.uniform(-0.15, 0.15, size=2)
        f = np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        f = f * (1 + tilt[0] * (yy - 0.5) + tilt[1] * (xx - 0.5))
        f = (f - f.min()) / (f.max() - f.min())
        fields.append(1 - cfg.illumination_strength * (1 - f))
    return np.stack(fields).astype(np.float32)


def batch_gain(cfg: SynthConfig, batch_no: int) -> np.ndarray:
    """Per-channel multiplicative intensity gain of a batch, shape (C,)."""
    rng = np.random.default_rng([cfg.seed, 3, batch_no])
    return np.exp(rng.normal(0, cfg.batch_gain_spread, size=len(CHANNELS)))


def _place_centres(rng: np.random.Generator, n: int, h: int, w: int, min_dist: float) -> np.ndarray:
    pts: list[tuple[float, float]] = []
    margin = 2.0
    for _ in range(n * 30):
        if len(pts) == n:
            break
        y, x = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
        if all((y - py) ** 2 + (x - px) ** 2 >= min_dist**2 for py, px in pts):
            pts.append((y, x))
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.normal(size=shape), sigma)
    return n / (n.std() + 1e-8)


def render_field(
    cfg: SynthConfig, effect: np.ndarray, density: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Render one field of view with no nuisance (illumination and gains are applied later).

    Returns:
        signal: (C, H, W) float32 clean intensities (arbitrary units, ~0..1.5)
        nuclei: (H, W) uint16 nucleus labels; cells: (H, W) uint16 cell labels (same ids)
        table: one row per cell: object, center_x, center_y, nucleus_area, cell_area
    """
    h, w, s = cfg.height, cfg.width, cfg.cell_scale
    n = int(rng.poisson(max(cfg.cells_per_field * density, 1.0)))
    centres = _place_centres(rng, n, h, w, min_dist=11.0 * s)
    n = len(centres)
    signal = np.zeros((3, h, w), np.float32)
    nuclei = np.zeros((h, w), np.uint16)
    cells = np.zeros((h, w), np.uint16)
    rows = []
    p = {name: k for k, name in enumerate(PHENOTYPE)}
    for obj, (cy, cx) in enumerate(centres, start=1):
        respond = rng.normal(1.0, 0.25)
        ph = effect * respond + rng.normal(0, cfg.cell_noise, size=len(PHENOTYPE))
        r_nuc = s * 5.5 * np.exp(0.18 * ph[p["nucleus_size"]])
        nuc_ar = np.exp(0.15 + 0.12 * ph[p["nucleus_elongation"]])
        r_cell = r_nuc * 2.1 * np.exp(0.16 * ph[p["cell_size"]])
        cell_ar = np.exp(0.25 + 0.15 * ph[p["cell_elongation"]])
        th_n, th_c = rng.uniform(0, np.pi, size=2)
        half = int(np.ceil(r_cell * max(cell_ar, 1 / cell_ar) ** 0.5 * 1.3)) + 2
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, h)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, w)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx

        def ell(theta: float, r: float, ar: float, dy=dy, dx=dx) -> np.ndarray:
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            return np.sqrt((u / (r * np.sqrt(ar))) ** 2 + (v / (r / np.sqrt(ar))) ** 2)

        dn = ell(th_n, r_nuc, nuc_ar)
        dc = ell(th_c, r_cell, cell_ar)
        in_nuc = dn <= 1.0
        in_cell = (dc <= 1.0) | in_nuc
        # DNA: dome-shaped nucleus with chromatin texture.
        tex = _smooth_noise(rng, dn.shape, sigma=max(0.8 * s, 0.6))
        dna_amp = 0.8 * np.exp(0.2 * ph[p["dna_intensity"]])
        tex_amp = 0.12 * np.exp(0.45 * ph[p["dna_texture"]])
        dna = dna_amp * (1 - 0.35 * dn**2) * (1 + tex_amp * tex)
        # Tubulin: radial fibres fading outwards, brighter around the nucleus.
        ang = np.arctan2(dy, dx)
        k_fib = int(rng.integers(9, 16))
        fib_amp = 0.5 * np.exp(0.45 * ph[p["tubulin_fibres"]]) / (
            1 + 0.5 * np.exp(0.45 * ph[p["tubulin_fibres"]])
        )
        fibres = 1 + fib_amp * np.cos(k_fib * ang + rng.uniform(0, 2 * np.pi))
        tub = 0.35 * np.exp(0.25 * ph[p["tubulin_intensity"]]) * fibres * (1.2 - 0.7 * dc)
        # Actin: cortical ring at the cell edge plus puncta inside the cell.
        ring = 0.6 * np.exp(0.35 * ph[p["actin_ring"]]) * np.exp(-(((dc - 0.9) / 0.12) ** 2))
        act = 0.12 + ring
        n_p = int(rng.poisson(2.0 * np.exp(0.5 * ph[p["actin_puncta"]])))
        for _ in range(min(n_p, 40)):
            rr, aa = rng.uniform(0, 0.85) * r_cell, rng.uniform(0, 2 * np.pi)
            py, px = cy + rr * np.sin(aa), cx + rr * np.cos(aa)
            act = act + 0.7 * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * (1.1 * s) ** 2))
        region = (slice(y0, y1), slice(x0, x1))
        signal[0][region] = np.maximum(signal[0][region], np.where(in_nuc, dna, 0))
        signal[1][region] = np.maximum(signal[1][region], np.where(in_cell, np.maximum(tub, 0), 0))
        signal[2][region] = np.maximum(signal[2][region], np.where(in_cell, act, 0))
        cells[region][in_cell] = obj
        nuclei[region][in_nuc] = obj
        rows.append((obj, float(cx), float(cy)))
    table = pd.DataFrame(rows, columns=["object", "center_x", "center_y"])
    if n:
        ids = np.arange(1, n + 1)
        table["nucleus_area"] = np.bincount(nuclei.ravel(), minlength=n + 1)[ids]
        table["cell_area"] = np.bincount(cells.ravel(), minlength=n + 1)[ids]
    else:
        table["nucleus_area"] = pd.Series(dtype=np.int64)
        table["cell_area"] = pd.Series(dtype=np.int64)
    return signal, nuclei, cells, table


def _to_uint16(
    signal: np.ndarray, illum: np.ndarray, gain: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Apply illumination, batch gain, background and shot noise; quantise to uint16."""
    photons = 3000.0
    bg = 0.04
    expected = (signal + bg) * illum * gain[:, None, None] * photons
    # Shot noise (Gaussian approximation of Poisson at these photon counts) plus camera offset.
    counts = expected + np.sqrt(expected) * rng.standard_normal(expected.shape, np.float32) + 100.0
    return np.clip(counts, 0, 65535).astype(np.uint16)


def _well_density(
    cfg: SynthConfig, rng: np.random.Generator, moa: str, effect_norm: float
) -> float:
    tox = CYTOTOXIC.get(moa, 1.0)
    # More toxic at higher dose: interpolate towards ``tox`` with the effect magnitude.
    frac = min(effect_norm / 3.0, 1.0)
    return float(rng.lognormal(0, 0.15) * (1 - frac * (1 - tox)))


def _write_screen(cfg: SynthConfig, tmp: Path) -> tuple[list[dict], int]:
    """Write the screen's images, masks, index, cell table, treatments and illumination into
    the (empty) folder ``tmp``; returns the index records and the number of cells."""
    treatments = design_treatments(cfg)
    plates = _plate_names(cfg)
    n_fields = (
        (len(treatments) - 1) * cfg.plates_per_batch + len(plates) * cfg.dmso_wells_per_plate
    ) * cfg.sites_per_well
    bar = progress_bar(total=n_fields, desc="synthesising fields", unit="field")
    records, cell_tables, illum_all = [], [], {}
    for plate_no, (plate, batch) in enumerate(plates):
        illum_all[plate] = illumination_field(cfg, plate_no)
        for meta, paths, table in _plate_fields(cfg, tmp, treatments, plate_no, plate, batch,
                                                illum_all[plate]):
            records.append({**meta, **paths})
            cell_tables.append(table.assign(**meta))
            bar.update(1)
    bar.close()
    index = build_index(pd.DataFrame(records), CHANNELS, tmp)
    index.write(tmp / "index.parquet")
    # fields without cells add no rows (pandas warns about concatenating empty frames)
    cells = pd.concat([t for t in cell_tables if len(t)] or cell_tables[:1],
                      ignore_index=True)
    meta_cols = [c for c in cells.columns if c.startswith("Metadata_")]
    cells = cells[meta_cols + [c for c in cells.columns if c not in meta_cols]]
    cells = cells.rename(columns={"object": "Metadata_object"})
    write_parquet(tmp / "cells.parquet", cells)
    pd.DataFrame([
        {"compound": t.compound, "concentration": t.concentration, "moa": t.moa,
         "batch": f"Week{t.batch + 1}" if t.batch >= 0 else "all"}
        | {f"effect_{p}": float(v) for p, v in zip(PHENOTYPE, t.effect)}
        for t in treatments
    ]).to_csv(tmp / "treatments.csv", index=False)
    np.savez_compressed(tmp / "illumination.npz", **illum_all)
    summary = {"config": cfg.to_json(), "n_fields": len(records), "n_cells": len(cells),
               "n_treatments": len(treatments) - 1, "plates": [p for p, _ in plates],
               "channels": list(CHANNELS)}
    (tmp / "synth.json").write_text(json.dumps(summary, indent=2))
    return records, len(cells)


def generate_screen(
    out: str | Path,
    cfg: SynthConfig | None = None,
    overwrite: bool = False,
):
    """Generate (or reuse) a synthetic screen in ``out``.

    If ``out/synth.json`` exists with the same parameters, the screen is reused as it is. The
    screen is written into a temporary folder beside ``out`` and renamed into place when complete,
    so an interrupted run leaves nothing half-written.

    Returns:
        The :class:`~morphoprof.index.ExperimentIndex` of the screen.
    """
    cfg = cfg or SynthConfig()
    out = Path(out)
    if _reusable(out, cfg, overwrite):
        logger.info(f"reusing synthetic screen in {out}")
        return ExperimentIndex.read_parquet(out / "index.parquet")
    with atomic_dir(out, replace=True) as tmp:
        records, n_cells = _write_screen(cfg, tmp)
    logger.info(f"synthetic screen: {len(records)} fields, {n_cells} cells -> {out}")
    return ExperimentIndex.read_parquet(out / "index.parquet")


def _reusable(out: Path, cfg: SynthConfig, overwrite: bool) -> bool:
    """Whether ``out`` already holds this screen; a screen with other parameters is an error
    unless ``overwrite``, a folder holding anything else is one always (``overwrite`` replaces
    the whole folder, so it is only for a screen)."""
    marker = out / "synth.json"
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{marker} is not valid JSON; remove {out} to regenerate") from exc
        if saved.get("config") == cfg.to_json():
            return True
        if not overwrite:
            raise InputError(
                f"{out} holds a synthetic screen with other parameters; "
                "pass overwrite=True (--overwrite) or choose another folder"
            )
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a synthetic screen; choose an empty folder "
                         "(--overwrite only replaces a synthetic screen)")
    return False


def _plate_fields(cfg: SynthConfig, tmp: Path, treatments: list, plate_no: int, plate: str,
                  batch: str, illum: np.ndarray):
    """Render and write every field of one plate (randomised layout) into ``tmp``; yields
    ``(metadata, {"Path_<channel>": file}, the field's cell table)`` per field."""
    gain = batch_gain(cfg, int(batch[4:]) - 1)
    layout_rng = np.random.default_rng([cfg.seed, 4, plate_no])
    wells = [treatments[0]] * cfg.dmso_wells_per_plate + [
        t for t in treatments[1:] if t.batch == int(batch[4:]) - 1
    ]
    order = layout_rng.permutation(len(wells))  # randomised plate layout
    for slot, t_idx in enumerate(order):
        t = wells[t_idx]
        well = _well_name(slot)
        rng = np.random.default_rng([cfg.seed, 5, plate_no, slot])
        density = _well_density(cfg, rng, t.moa, float(np.linalg.norm(t.effect)))
        for site in range(1, cfg.sites_per_well + 1):
            signal, nuc, cel, table = render_field(cfg, t.effect, density, rng)
            img = _to_uint16(signal, illum, gain, rng)
            stem = f"{plate}_{well}_s{site}"
            rel = {}
            for c, ch in enumerate(CHANNELS):
                rel[f"Path_{ch}"] = f"images/{plate}/{stem}_{ch}.tif"
                write_tiff(tmp / rel[f"Path_{ch}"], img[c])
            write_tiff(tmp / f"masks/{plate}/{stem}_nuclei.tif", nuc, compress=True)
            write_tiff(tmp / f"masks/{plate}/{stem}_cells.tif", cel, compress=True)
            meta = {"Metadata_plate": plate, "Metadata_well": well, "Metadata_site": site,
                    "Metadata_batch": batch, "Metadata_compound": t.compound,
                    "Metadata_concentration": t.concentration, "Metadata_moa": t.moa}
            yield meta, rel, table


def load_ground_truth(screen: str | Path) -> dict:
    """Ground truth of a generated screen: cells table, treatments table, illumination fields.

    Returns a dict with ``cells`` (DataFrame), ``treatments`` (DataFrame) and ``illumination``
    ({plate: (C, H, W) float32}).
    """
    screen = Path(screen)
    if not (screen / "synth.json").is_file():
        raise InputError(f"{screen} is not a complete synthetic screen (no synth.json)")
    with np.load(screen / "illumination.npz") as z:
        illum = {k: z[k] for k in z.files}
    return {
        "cells": read_parquet(screen / "cells.parquet"),
        "treatments": pd.read_csv(screen / "treatments.csv"),
        "illumination": illum,
    }
