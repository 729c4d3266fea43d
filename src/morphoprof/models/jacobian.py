"""Jacobian maps (Kraus 2016): where in the input a class's evidence lies, by guided backprop.

The backward pass starts at the class maps before their sigmoid (conv7's output) with
``P_i * p_ij`` (eq. 4: the image-level probability of class i times its map), so positions
that drive the image's class speak loudest (seeded after the sigmoid, its derivative
``p (1 - p)`` would silence the positions the network is surest of); every activation (ReLU,
ReLU6, SiLU: what the trunks use) lets through only the positive part of its backward signal
(guided backpropagation, Springenberg 2015). ReLU6 is gated as a ReLU (open wherever its input
is positive, also above 6): the stem of an ImageNet EfficientNet saturates its ReLU6 on bright
cells, and the exact derivative (0 above 6) would leave the brightest cells out of the map. The
result is summed over input channels into a ``(H, W)`` map and thresholded (Otsu on a root of
it after Gaussian smoothing, optionally an MRF graph cut) into a segmentation mask. The MRF's
pairwise term is a plain Potts penalty (on the map's fourth root), or, given the field's image,
a contrast-sensitive one (Boykov & Jolly 2001, on the map's eighth root) that lets the mask's
boundary follow the image's edges while the map decides where the foreground lies.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from morphoprof.errors import InputError
from morphoprof.extras import require
from morphoprof.io_utils import atomic_path

# The activations guided backprop passes through; any other would leak negative signals.
GUIDED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU)
SEEDS = ("class", "trunk")
# How the backward signal crosses an activation: ``guided`` (the default: gated by the forward
# input and ReLU on the signal, Springenberg 2015), ``deconvnet`` (ReLU on the signal only,
# Zeiler & Fergus 2014) or ``gradient`` (the plain Jacobian, Simonyan 2014). The last two are
# there to compare against (benchmarks/jacobian_sanity.py): on the real fields their masks
# score far below guided backprop's.
BACKWARD_RULES = ("guided", "deconvnet", "gradient")
# The mask defaults, chosen on the random-head sanity check of benchmarks/jacobian_sanity.py
# (132 real 6-MoA fields; mean IU vs the Otsu foreground of the MRF masks), never on a trained
# model's scores: at stop 31 sigma 1 / 2 / 3 x power 1 / 0.5 x Potts 0.5 / 1 / 2 (raw map 0.51,
# square root, sigma 2, Potts 0.5: 0.60); at stop 36 sigma 1 / 2 x power 0.5 / 0.33 / 0.25 x
# Potts 0.5 / 1 / 2 (fourth root, sigma 1, Potts 1: 0.64, the best of the 18).
MASK_SIGMA = 1.0
MASK_POWER = 0.25
MRF_SMOOTHNESS = 1.0
# The Potts penalty of the contrast-sensitive MRF (mrf_mask with the field's image), chosen the
# same way at stop 37 (jacobian_sanity.py's contrast_grid, random head: Potts 2 / 4 / 8 / 16 /
# 32 x power 0.25 / 0.5 x sigma 1 / 2; Potts 8, fourth root, sigma 1: 0.72, the best of 20).
MRF_CONTRAST_SMOOTHNESS = 8.0
# The contrast-sensitive MRF's power: the stop-37 grid stopped at the fourth root, the edge of
# the grid. At stop 38 the same random-head grid with power 0.125 / 0.25 / 0.5 picks the eighth
# root (Potts 8, sigma 1: 0.75, the best of 30; fourth root 0.72), and so do the three trained
# Noisy-AND models on the fields of the compounds they were trained on, pooled (a probe: 0.671
# vs 0.639 at the fourth root; per fold 1/16, 1/16, 1/8, see mil_6moa.py's mask_selection). A
# kraus network's maps want the fourth root (its folds all pick 0.25). The Potts MRF and the
# threshold keep MASK_POWER (on the random head the eighth root lowers the Potts mask 0.64 ->
# 0.61).
MRF_CONTRAST_POWER = 0.125
# PyMaxflow neighbourhoods: each pixel's right and lower neighbour
_RIGHT = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
_DOWN = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]])


def mask_rule() -> str:
    """The mask pipeline of the defaults in words (what a benchmark records beside its scores)."""
    return (f"eq. 4's seed P_i * p_ij on the class map before its sigmoid; guided backprop, "
            f"ReLU6 gated as a ReLU; the map to the power {MASK_POWER:g}, "
            f"Gaussian sigma {MASK_SIGMA:g}; Otsu threshold / MRF Potts {MRF_SMOOTHNESS:g} / "
            f"contrast-sensitive MRF Potts {MRF_CONTRAST_SMOOTHNESS:g} x "
            f"exp(-beta |I_p - I_q|^2) (Boykov & Jolly 2001) on the map to the power "
            f"{MRF_CONTRAST_POWER:g}")


def _guided_relu_hook(module: nn.Module, grad_input, grad_output):
    return tuple(None if g is None else g.clamp_min(0.0) for g in grad_input)


@contextmanager
def _activation_hooks(net: nn.Module, register):
    """Within the block, ``register(module)`` hooks (it returns their handles) sit on every
    activation of :data:`GUIDED_ACTIVATIONS` in ``net``, in-place ones switched off; after it
    the hooks are removed and the in-place flags restored."""
    acts = [m for m in net.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
    inplace = [getattr(m, "inplace", False) for m in acts]
    hooks = []
    try:
        for m in acts:
            if hasattr(m, "inplace"):
                m.inplace = False
            hooks += register(m)
        yield net
    finally:
        for h in hooks:
            h.remove()
        for m, flag in zip(acts, inplace):
            if hasattr(m, "inplace"):
                m.inplace = flag


@contextmanager
def guided_backprop(net: nn.Module):
    """Within the block, backward passes through ``net`` are guided: each activation of
    :data:`GUIDED_ACTIVATIONS` passes only the positive part of its gradient, ReLU6 gated on
    its input being positive (its saturation above 6 is ignored, see the module's docstring).
    In-place activations are switched off for the block and restored after it."""
    # a module called several times in one forward pass is undone in reverse order: a stack
    open_gate: dict[nn.Module, list[torch.Tensor]] = {}

    def remember(module, inputs, output):
        open_gate.setdefault(module, []).append(inputs[0].detach() > 0)

    def relu_gate(module, grad_input, grad_output):
        return ((grad_output[0] * open_gate[module].pop()).clamp_min(0.0),)

    def register(m: nn.Module) -> list:
        if isinstance(m, nn.ReLU6):
            return [m.register_forward_hook(remember), m.register_full_backward_hook(relu_gate)]
        return [m.register_full_backward_hook(_guided_relu_hook)]

    try:
        with _activation_hooks(net, register):
            yield net
    finally:
        open_gate.clear()


def _deconvnet_hook(module: nn.Module, grad_input, grad_output):
    return (grad_output[0].clamp_min(0.0),)


@contextmanager
def _deconvnet(net: nn.Module):
    """Within the block, every activation of :data:`GUIDED_ACTIVATIONS` passes the positive
    part of its backward signal whatever its input was (the deconvnet rule)."""
    with _activation_hooks(net, lambda m: [m.register_full_backward_hook(_deconvnet_hook)]):
        yield net


def jacobian_maps(net: nn.Module, images: torch.Tensor, class_index: int | None = None,
                  seed: str = "class", backward: str = "guided") -> np.ndarray:
    """Guided-backprop maps of a :class:`~morphoprof.models.mil.MILNet`.

    Args:
        net: the MIL network (its activations must be modules of
            :data:`GUIDED_ACTIVATIONS`, as every trunk's are; in-place ones are switched off
            for the pass).
        images: ``(B, C, H, W)`` float tensor, normalised as in training.
        class_index: the class whose evidence is traced; None traces each image's predicted
            class.
        seed: ``class``: eq. 4, ``P_i * p_ij`` of that class as the backward signal of its
            pre-sigmoid map (conv7's output); ``trunk``: the sum of the trunk's
            whole output, no head (what a map owes to the trunk alone: the sanity check of
            Adebayo et al. 2018).
        backward: how the signal crosses each activation, one of :data:`BACKWARD_RULES`.

    Returns:
        ``(B, H, W)`` float32 maps, >= 0 (the channel sum of the positive input gradient).
    """
    if seed not in SEEDS:
        raise InputError(f"Jacobian seed must be one of {SEEDS}, got {seed!r}")
    if backward not in BACKWARD_RULES:
        raise InputError(f"Jacobian backward rule must be one of {BACKWARD_RULES}, "
                         f"got {backward!r}")
    rule = {"guided": guided_backprop, "deconvnet": _deconvnet,
            "gradient": nullcontext}[backward]
    was_training = net.training
    net.eval()
    try:
        with rule(net):
            x = images.detach().clone().requires_grad_(True)
            if seed == "trunk":
                net.trunk(x).sum().backward()
            else:
                out = net(x)
                # eq. 4 starts before the sigmoid: through it, the derivative p (1 - p) would
                # silence every position the network is sure of (p near 1)
                maps, pooled, start = out["maps"], out["pooled"], out["map_logits"]
                if class_index is None:
                    cls = out["logits"].argmax(1)
                else:
                    if not 0 <= class_index < maps.shape[1]:
                        raise InputError(
                            f"class_index {class_index} out of range 0..{maps.shape[1] - 1}")
                    cls = torch.full((len(x),), class_index, dtype=torch.long)
                grad_seed = torch.zeros_like(start)
                rows = torch.arange(len(x))
                grad_seed[rows, cls] = (pooled[rows, cls][:, None, None]
                                        * maps[rows, cls]).detach()
                start.backward(grad_seed)
            grad = x.grad.clamp_min(0.0).sum(1)
    finally:
        net.train(was_training)
    return grad.detach().cpu().numpy().astype(np.float32)


def field_maps(net: nn.Module, images: np.ndarray, mean, std, batch_size: int = 8,
               **kwargs) -> np.ndarray:
    """:func:`jacobian_maps` of fields as read (before the network's input normalisation),
    ``batch_size`` at a time.

    Args:
        net: the MIL network.
        images: ``(N, C, H, W)`` float32 fields, as the run's images were read.
        mean, std: the network's per-channel input statistics (``C`` each).
        batch_size: fields per backward pass.
        **kwargs: ``class_index``, ``seed``, ``backward`` of :func:`jacobian_maps`.

    Returns:
        ``(N, H, W)`` float32 maps.
    """
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return np.concatenate([
        jacobian_maps(net, (torch.from_numpy(np.ascontiguousarray(images[k:k + batch_size]))
                            - m) / s, **kwargs)
        for k in range(0, len(images), batch_size)])


def _prepared(jmap: np.ndarray, sigma: float, power: float) -> np.ndarray:
    """The map a mask thresholds: ``jmap ** power``, Gaussian-smoothed by ``sigma`` px."""
    from scipy.ndimage import gaussian_filter

    m = np.asarray(jmap, dtype=np.float64)
    if m.ndim != 2:
        raise InputError(f"a Jacobian map is 2-D, got shape {m.shape}")
    if power <= 0:
        raise InputError(f"the mask's power must be > 0, got {power}")
    if power != 1:
        m = np.power(np.clip(m, 0, None), power)
    return gaussian_filter(m, sigma) if sigma > 0 else m


def jacobian_mask(jmap: np.ndarray, sigma: float = MASK_SIGMA, threshold: float | None = None,
                  power: float = MASK_POWER) -> np.ndarray:
    """``(H, W)`` Jacobian map -> boolean mask: the map raised to ``power`` (0.25: its fourth
    root; a map's mass is heavy-tailed, a few bright nuclei carry most of it, and Otsu on the
    raw map keeps only them), Gaussian smoothing (``sigma`` px, 0 for none), then Otsu's
    threshold (or ``threshold`` as a fraction of the prepared map's maximum)."""
    from skimage.filters import threshold_otsu

    m = _prepared(jmap, sigma, power)
    if not np.isfinite(m).all() or m.max() <= 0:
        return np.zeros(m.shape, bool)
    t = threshold * m.max() if threshold is not None else threshold_otsu(m)
    return m > t


def contrast_weights(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contrast-sensitive Potts weights of a field's 4-connected pairs (Boykov & Jolly 2001):
    ``exp(-beta * |I_p - I_q|^2)`` with the Euclidean distance over channels and
    ``beta = 1 / (2 * mean |I_p - I_q|^2)`` over the field's pairs (Rother et al. 2004), so a
    pair across an edge of the image costs less to cut than a pair inside a flat region.

    Args:
        image: ``(C, H, W)`` or ``(H, W)`` field, any intensity scale (beta adapts to it).

    Returns:
        ``(right, down)``, each ``(H, W)`` float64 in (0, 1]: the weight between pixel
        ``(i, j)`` and ``(i, j + 1)`` / ``(i + 1, j)`` (0 on the last column / row).
    """
    im = np.asarray(image, dtype=np.float64)
    if im.ndim == 2:
        im = im[None]
    if im.ndim != 3:
        raise InputError(f"an MRF image is (C, H, W) or (H, W), got shape {np.shape(image)}")
    if not np.isfinite(im).all():
        raise InputError("the MRF image has NaN or infinite pixels")
    dx = np.square(np.diff(im, axis=2)).sum(0)
    dy = np.square(np.diff(im, axis=1)).sum(0)
    mean_sq = (dx.sum() + dy.sum()) / max(dx.size + dy.size, 1)
    beta = 1.0 / (2.0 * mean_sq) if mean_sq > 0 else 0.0
    right, down = np.zeros(im.shape[1:]), np.zeros(im.shape[1:])
    right[:, :-1] = np.exp(-beta * dx)
    down[:-1, :] = np.exp(-beta * dy)
    return right, down


def mrf_mask(jmap: np.ndarray, smoothness: float | None = None, sigma: float = MASK_SIGMA,
             threshold: float | None = None, power: float | None = None,
             image: np.ndarray | None = None) -> np.ndarray:
    """``(H, W)`` Jacobian map -> boolean mask denoised by a binary Markov random field (Kraus
    2016), solved exactly by a graph cut (PyMaxflow, the Boykov-Kolmogorov max-flow).

    The unary term is the negative log-likelihood of foreground / background under a logistic
    model of the prepared map (``power``, ``sigma`` as :func:`jacobian_mask`) centred on Otsu's
    threshold (or ``threshold`` x max) with the map's standard deviation as its scale; the
    pairwise term is a Potts penalty of ``smoothness`` on every 4-connected pair with different
    labels. With ``image`` (the ``(C, H, W)`` field the map was computed from) the penalty of
    each pair is scaled by :func:`contrast_weights` (contrast-sensitive Potts), so the mask's
    boundary follows the image's edges; where it lies still comes from the map alone (a
    random map with the same pairwise term gives an empty-like mask, see
    ``benchmarks/jacobian_sanity.py``). ``smoothness=None``: :data:`MRF_SMOOTHNESS` without
    ``image``, :data:`MRF_CONTRAST_SMOOTHNESS` with it; 0 gives :func:`jacobian_mask`'s mask.
    ``power=None``: :data:`MASK_POWER` without ``image``, :data:`MRF_CONTRAST_POWER` with it.
    """
    from skimage.filters import threshold_otsu

    maxflow = require("maxflow")
    if smoothness is None:
        smoothness = MRF_SMOOTHNESS if image is None else MRF_CONTRAST_SMOOTHNESS
    if power is None:
        power = MASK_POWER if image is None else MRF_CONTRAST_POWER
    if smoothness < 0:
        raise InputError(f"the MRF's smoothness must be >= 0, got {smoothness}")
    m = _prepared(jmap, sigma, power)
    if image is not None and np.shape(image)[-2:] != m.shape:
        raise InputError(f"the MRF image is {np.shape(image)[-2:]} px but the map is {m.shape}")
    if not np.isfinite(m).all() or m.max() <= m.min():
        return np.zeros(m.shape, bool)
    t = threshold * m.max() if threshold is not None else threshold_otsu(m)
    p = 1.0 / (1.0 + np.exp(-(m - t) / max(float(m.std()), 1e-12)))
    p = np.clip(p, 1e-6, 1 - 1e-6)
    g = maxflow.Graph[float]()
    nodes = g.add_grid_nodes(m.shape)
    if smoothness > 0 and image is None:
        g.add_grid_edges(nodes, float(smoothness), symmetric=True)
    elif smoothness > 0:
        right, down = contrast_weights(image)
        for weights, structure in ((right, _RIGHT), (down, _DOWN)):
            g.add_grid_edges(nodes, weights=float(smoothness) * weights, structure=structure,
                             symmetric=True)
    # a node left on the sink side (background) cuts its source edge: that edge carries the
    # cost of background, -log(1 - p); the sink edge the cost of foreground, -log(p)
    g.add_grid_tedges(nodes, -np.log1p(-p), -np.log(p))
    g.maxflow()
    return ~g.get_grid_segments(nodes)


def mean_iu(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean intersection over union of the two classes, foreground and background (the
    segmentation score Kraus 2016 reports, after Long et al. 2015)."""
    a, b = np.asarray(pred, bool), np.asarray(ref, bool)
    return 0.5 * (iou(a, b) + iou(~a, ~b))


def otsu_foreground(image: np.ndarray, channels: list[int] | None = None, sigma: float = 1.0
                    ) -> np.ndarray:
    """The reference the Jacobian masks are scored against: Otsu's threshold of the
    (Gaussian-smoothed) sum of ``channels`` of a ``(C, H, W)`` image (all stains: the cells'
    foreground; the DNA channel: nuclei), as a boolean ``(H, W)`` mask."""
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu

    img = np.asarray(image, dtype=np.float64)
    plane = img[channels].sum(0) if channels is not None else img.sum(0)
    if sigma > 0:
        plane = gaussian_filter(plane, sigma)
    if plane.max() <= plane.min():
        return np.zeros(plane.shape, bool)
    return plane > threshold_otsu(plane)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def save_overlay(path: str | Path, image: np.ndarray, jmap: np.ndarray,
                 mask: np.ndarray | None = None) -> Path:
    """A PNG for a person to look at: the image (first three channels as RGB, or grey), the
    Jacobian map as a heat overlay, and the mask's outline. ``image`` is ``(C, H, W)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    img = np.asarray(image, dtype=np.float32)
    rgb = np.moveaxis(img[:3], 0, -1) if img.shape[0] >= 3 else np.repeat(img[:1], 3, 0
                                                                          ).transpose(1, 2, 0)
    lo, hi = np.percentile(rgb, (0.5, 99.5))
    rgb = np.clip((rgb - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    axes[0].imshow(rgb)
    axes[0].set_title("image")
    axes[1].imshow(rgb * 0.6)
    axes[1].imshow(jmap, cmap="inferno", alpha=0.6)
    if mask is not None:
        edge = find_boundaries(np.asarray(mask, bool))
        axes[1].contour(edge, levels=[0.5], colors="cyan", linewidths=0.6)
    axes[1].set_title("Jacobian map and mask")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
