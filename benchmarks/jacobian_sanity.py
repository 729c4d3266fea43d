"""Sanity check of the MIL Jacobian maps (after Adebayo et al. 2018, "Sanity checks for
saliency maps"): do the guided-backprop masks of a frozen pretrained trunk depend on what the
MIL head learned at all?

The same mask pipeline as ``mil_6moa.py`` (guided backprop with ReLU6 gated as a ReLU, channel
sum of the positive input gradient, then the mask defaults of ``morphoprof.models.jacobian``:
a power of the map, Gaussian smoothing, MRF graph cut; reference: the Otsu foreground of the
summed stains) is scored with heads that learned nothing:

- ``random_head``: a MIL network on the offline ImageNet EfficientNet-Lite0 trunk (stage 3, as
  in ``mil_6moa.py``) whose head is freshly initialised (seed 0), seeded from its predicted class
  as eq. 4;
- ``uniform_seed``: no head, the trunk's whole stage-3 output summed (every feature, every
  position) as the seed;
- ``all_foreground`` / ``all_background``: the constant masks, what mean IU gives for nothing;
- ``random_head_best_threshold``: the random head's prepared map (power and sigma as above) cut at
  the best of 49 fractions (2%..98%) of its maximum for each field, chosen with the reference:
  what no single threshold can beat, so a gap to the goal there lies in the maps, not in the
  thresholding (the MRF, which also weighs each pixel's neighbours, can do a little better).

Each head is scored with the plain Potts MRF (``random_head``, ``uniform_seed``) and with the
contrast-sensitive MRF, the field's image as its pairwise term (``*_contrast``); its control,
``noise_map_contrast``, puts a smooth random map (Gaussian sigma 8 px) under the same MRF: what
the image's edges give without a Jacobian map. ``contrast_grid`` scores the contrast MRF's
settings (Potts x power x sigma, :data:`CONTRAST_GRID`) on the random head
(``contrast_grid_best``): its Potts penalty was chosen there (stop 37); its power since stop 38
on the trained networks' training fields (``mil_6moa.py``'s ``mask_selection``), which this
grid checks against the random head.

On the real 6-MoA fields (every 5th of the 660, 256 px) and on the two complete raw 3-channel
BBBC021 fields in ``../shared/data/bbbc021/images`` (1024x1280, each stain scaled by its 99.9th
percentile), at full size and at 1/5 (the 6-MoA scale); and those raw fields prepared as the
6-MoA PNGs were (:func:`as_6moa`), at 1/5 (``raw_fields_as_6moa_one_fifth``). If
``random_head`` scores as well as the trained head of ``mil_6moa.json``
(``jacobian_iou_vs_otsu``), the masks come from the frozen trunk, not from the learning.

``variants`` (every 4th of those 6-MoA fields, random heads): is it the backward rule, the stage
or the noise of one pass? Each backward rule of ``morphoprof.models.jacobian`` (guided,
deconvnet, plain gradient) x trunk stage 2 / 3 / 4 x seed (the head's class, the whole trunk),
masked with the default rule and with the square root instead of the fourth root; and the
stage-3 class map averaged over the 8 rotations / reflections of the input (each map turned
back, scaled to mean 1) to see whether averaging out one pass's noise helps.

    python benchmarks/jacobian_sanity.py   # writes benchmarks/results/jacobian_sanity.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021"
RESULTS = HERE / "results" / "jacobian_sanity.json"
EVERY = 5
# the contrast-sensitive MRF's settings scored on the random head (Potts x power x sigma)
CONTRAST_GRID = [(lam, power, sigma) for lam in (2, 4, 8, 16, 32)
                 for power in (0.125, 0.25, 0.5) for sigma in (1.0, 2.0)]


def raw_counts() -> np.ndarray | None:
    """The complete raw 3-channel fields' counts as ``(N, 3, H, W)`` float64, in the 6-MoA PNGs'
    channel order: actin (w4), tubulin (w2), DAPI (w1); None when absent."""
    import tifffile

    folder = DATA / "images" / "Week2" / "Week2_24381"
    fields = []
    for site in ("s1", "s2", "s3", "s4"):
        files = [sorted(folder.glob(f"*_{site}_w{w}*.tif")) for w in (4, 2, 1)]
        if all(files):
            fields.append(np.stack([tifffile.imread(f[0]).astype(np.float64) for f in files]))
    return np.stack(fields) if fields else None


def percentile_scaled(counts: np.ndarray) -> np.ndarray:
    """Raw fields' counts ``(N, C, H, W)`` as float32 in [0, 1], each stain of each field over
    its 99.9th percentile."""
    im = counts / np.percentile(counts, 99.9, axis=(2, 3), keepdims=True)
    return np.clip(im, 0, 1).astype(np.float32)


def as_6moa(counts: np.ndarray, fields_6moa: np.ndarray) -> np.ndarray:
    """Raw DMSO fields' counts ``(N, 3, H, W)`` prepared as the 6-MoA PNGs were (data README:
    Anscombe transform, each channel standardised by the plate's DMSO mean / std, here the
    fields' own: they are the plate's DMSO wells), then put on the 6-MoA fields' 8-bit scale
    by giving each channel the mean / std of ``fields_6moa`` (``(M, 3, h, w)`` as read, in
    [0, 1]; the PNGs' exact rescale is not published), clipped to [0, 1]; float32."""
    a = 2.0 * np.sqrt(counts + 3.0 / 8.0)
    z = (a - a.mean(axis=(0, 2, 3), keepdims=True)) / a.std(axis=(0, 2, 3), keepdims=True)
    mean = fields_6moa.mean(axis=(0, 2, 3), dtype=np.float64)[None, :, None, None]
    std = fields_6moa.std(axis=(0, 2, 3), dtype=np.float64)[None, :, None, None]
    return np.clip(z * std + mean, 0, 1).astype(np.float32)


def one_fifth(fields: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` fields shrunk to 1/5 (bilinear, antialiased): the raw fields at the
    6-MoA fields' scale."""
    import torch

    return torch.nn.functional.interpolate(torch.from_numpy(fields), scale_factor=0.2,
                                           mode="bilinear", antialias=True).numpy()


def best_threshold_iu(jmap: np.ndarray, ref: np.ndarray) -> float:
    """The best mean IU of ``jmap``'s prepared map (as the masks prepare it) cut at any of 49
    fractions of its maximum, picked with the reference ``ref`` (a bound, not a method)."""
    from morphoprof.models.jacobian import MASK_POWER, MASK_SIGMA, jacobian_mask, mean_iu

    return max(mean_iu(jacobian_mask(jmap, MASK_SIGMA, float(q), MASK_POWER), ref)
               for q in np.linspace(0.02, 0.98, 49))


def score(images: np.ndarray, net, mean, std, batch: int = 8, grid: bool = False) -> dict:
    """Mean IU (vs the Otsu foreground of the summed stains) of each check on ``images``; with
    ``grid``, also the contrast-sensitive MRF's grid (:data:`CONTRAST_GRID`)."""
    from scipy.ndimage import gaussian_filter

    from morphoprof.models.jacobian import field_maps, mean_iu, mrf_mask, otsu_foreground

    rng = np.random.default_rng(0)
    out: dict[str, list[float]] = {k: [] for k in (
        "random_head", "uniform_seed", "all_foreground", "all_background",
        "random_head_best_threshold", "random_head_contrast", "uniform_seed_contrast",
        "noise_map_contrast")}
    grid_scores: dict[str, list[float]] = {}
    fg = []
    heads = field_maps(net, images, mean, std, batch)
    trunks = field_maps(net, images, mean, std, batch, seed="trunk")
    for j_head, j_uni, im in zip(heads, trunks, images):
        ref = otsu_foreground(im)
        fg.append(float(ref.mean()))
        out["random_head"].append(mean_iu(mrf_mask(j_head), ref))
        out["random_head_best_threshold"].append(best_threshold_iu(j_head, ref))
        out["uniform_seed"].append(mean_iu(mrf_mask(j_uni), ref))
        out["all_foreground"].append(mean_iu(np.ones(ref.shape, bool), ref))
        out["all_background"].append(mean_iu(np.zeros(ref.shape, bool), ref))
        out["random_head_contrast"].append(mean_iu(mrf_mask(j_head, image=im), ref))
        out["uniform_seed_contrast"].append(mean_iu(mrf_mask(j_uni, image=im), ref))
        # what the image's edges give alone: a smooth random map as the unary term
        noise = gaussian_filter(rng.random(ref.shape), 8)
        out["noise_map_contrast"].append(mean_iu(mrf_mask(noise, image=im), ref))
        for lam, power, sigma in CONTRAST_GRID if grid else ():
            key = f"potts_{lam:g}_power_{power:g}_sigma_{sigma:g}"
            grid_scores.setdefault(key, []).append(mean_iu(
                mrf_mask(j_head, lam, sigma, power=power, image=im), ref))
    res: dict = {k: float(np.mean(v)) for k, v in out.items()}
    res.update(n_fields=len(fg), reference_foreground_fraction=float(np.mean(fg)))
    if grid:
        res["contrast_grid"] = {k: float(np.mean(v)) for k, v in grid_scores.items()}
        res["contrast_grid_best"] = max(res["contrast_grid"], key=res["contrast_grid"].get)
    return res


def random_head_net(stage: int):
    """A MIL network on the offline ImageNet Lite0 trunk cut at ``stage``, its head freshly
    initialised (torch seed 0), in eval mode, as ``mil_6moa.py`` builds it (hidden 256)."""
    import torch

    from morphoprof.models.mil import MILConfig, MILNet

    torch.manual_seed(0)
    return MILNet(MILConfig(n_classes=6, trunk="tf_efficientnet_lite0", stage=stage,
                            weights="offline", hidden=256, dropout=0.5)).eval()


def dihedral_mean_maps(net, images: np.ndarray, mean, std, batch: int = 8) -> np.ndarray:
    """``(N, H, W)`` mean of the class maps of the 8 rotations / reflections of ``images``
    (``(N, C, H, W)`` as read, square), each turned back onto the field and scaled to mean 1."""
    from morphoprof.models.jacobian import field_maps

    total = np.zeros((len(images), *images.shape[2:]), np.float64)
    for k in range(4):
        for flip in (False, True):
            turned = np.rot90(images, k, (2, 3))
            turned = turned[..., ::-1] if flip else turned
            maps = field_maps(net, turned, mean, std, batch)
            maps = maps[..., ::-1] if flip else maps
            maps = np.rot90(maps, -k, (1, 2)).astype(np.float64)
            total += maps / np.maximum(maps.mean(axis=(1, 2), keepdims=True), 1e-30)
    return (total / 8).astype(np.float32)


def variants(images: np.ndarray, batch: int = 8) -> dict:
    """Mean IU of each backward rule x stage x seed (power 0.25 and 0.5), and of the dihedral
    mean, on ``images`` (``(N, 3, H, W)`` in [0, 1]) with random heads (seed 0)."""

    from morphoprof.models.jacobian import (
        BACKWARD_RULES,
        field_maps,
        mean_iu,
        mrf_mask,
        otsu_foreground,
    )

    refs = [otsu_foreground(im) for im in images]

    def scored(maps) -> dict:
        return {f"power_{p:g}": float(np.mean([mean_iu(mrf_mask(j, power=p), r)
                                               for j, r in zip(maps, refs)]))
                for p in (0.25, 0.5)}

    out: dict = {"n_fields": len(images)}
    for stage in (2, 3, 4):
        net = random_head_net(stage)
        mean, std = net.trunk.mean, net.trunk.std
        for rule in BACKWARD_RULES:
            for seed in ("class", "trunk"):
                maps = field_maps(net, images, mean, std, batch, seed=seed, backward=rule)
                out[f"stage{stage}_{rule}_{seed}"] = scored(maps)
                print(f"stage {stage} {rule} {seed}:", out[f"stage{stage}_{rule}_{seed}"],
                      flush=True)
        if stage == 3:
            out["stage3_guided_class_dihedral_mean"] = scored(
                dihedral_mean_maps(net, images, mean, std, batch))
            print("dihedral mean:", out["stage3_guided_class_dihedral_mean"], flush=True)
    return out


def main() -> int:

    from morphoprof.index import import_fields_6moa
    from morphoprof.io_utils import write_json
    from morphoprof.models.data import load_images
    from morphoprof.models.jacobian import mask_rule

    if not (DATA / "fields_6moa").is_dir():
        print(f"skipped: real data not found at {DATA / 'fields_6moa'}")
        return 0
    net = random_head_net(3)
    mean, std = net.trunk.mean, net.trunk.std
    t0 = time.perf_counter()
    index = import_fields_6moa(DATA / "fields_6moa")
    rows = np.arange(0, len(index), EVERY)
    images = load_images(index, rows, size=256, normalization="none", scale=255)
    result: dict = {"method": f"channel sum of the positive input gradient; {mask_rule()} "
                              "(the MRF mask), as mil_6moa.py; reference: Otsu foreground of "
                              "the summed stains; mean IU of foreground and background",
                    "trunk": "tf_efficientnet_lite0 stage 3, offline ImageNet, frozen",
                    "fields_6moa": score(images, net, mean, std, grid=True)}
    print("6-MoA fields:", json.dumps(result["fields_6moa"]), flush=True)
    result["variants"] = variants(images[::4])
    counts = raw_counts()
    if counts is None:
        result["raw_fields"] = {"note": f"raw 3-channel fields not found under {DATA}"}
    else:
        raw = percentile_scaled(counts)
        small = one_fifth(raw)
        result["raw_fields"] = score(raw, net, mean, std, batch=1)
        result["raw_fields_one_fifth"] = score(small, net, mean, std)
        every_field = load_images(index, np.arange(len(index)), size=256,
                                  normalization="none", scale=255)
        prepared = one_fifth(as_6moa(counts, every_field))
        result["raw_fields_as_6moa_one_fifth"] = score(prepared, net, mean, std)
        print("raw fields:", json.dumps(result["raw_fields"]), "1/5:",
              json.dumps(result["raw_fields_one_fifth"]), "prepared as the 6-MoA fields, 1/5:",
              json.dumps(result["raw_fields_as_6moa_one_fifth"]), flush=True)
    trained = HERE / "results" / "mil_6moa.json"
    if trained.is_file():
        done = json.loads(trained.read_text())
        result["trained_noisy_and_mil_6moa"] = {
            "contrast": done.get("jacobian_iou_vs_otsu"),
            "potts": done.get("jacobian_iou_vs_otsu_potts")}
    result["seconds"] = time.perf_counter() - t0
    result["machine"] = describe_machine()
    write_json(RESULTS, result)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
