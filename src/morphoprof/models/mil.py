"""Multiple-instance learning on whole images (Kraus et al. 2016).

A fully convolutional network maps an image of any size to one probability map per class,
``p_ij`` (class i, position j). A MIL pooling layer turns each map into an image-level
probability ``P_i``; an FC layer over the pooled vector gives the class scores. The loss joins a
binary MIL loss per class (``P_i`` against "image carries class i") and a softmax loss on the FC
output (single-label screens) or a sigmoid loss (multi-label screens such as protein
localisation). Only image-level labels are needed.

Pooling functions (``p`` in [0, 1], mean/sum over the map's positions j):

============  ==============================================================================
max           ``max_j p_ij``
mean          ``mean_j p_ij``
gm            generalized mean ``(mean_j p_ij^r)^(1/r)``
lse           log-sum-exp ``log(mean_j exp(r p_ij)) / r``
noisy_or      ``1 - prod_j (1 - p_ij)``
isr           integrated segmentation and recognition: ``v = sum_j p/(1-p)``, ``v / (1 + v)``
noisy_and     ``[s(a(mean_j p_ij - b_i)) - s(-a b_i)] / [s(a(1 - b_i)) - s(-a b_i)]``, s the
              logistic function, slope ``a`` fixed, threshold ``b_i`` learned per class (eq. 3)
============  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from morphoprof.errors import InputError

POOLINGS = ("max", "mean", "gm", "lse", "noisy_or", "isr", "noisy_and")
_EPS = 1e-6


class MILPool(nn.Module):
    """Pool ``(B, K, H, W)`` class probability maps into ``(B, K)`` image probabilities.

    Args:
        kind: one of :data:`POOLINGS`.
        n_classes: K (Noisy-AND learns one threshold per class).
        r: sharpness of ``gm`` and ``lse`` (Kraus used r = 2.5 for GM and r = 5 for LSE among
            others).
        a: Noisy-AND slope (fixed).
        b_init: initial Noisy-AND threshold.
    """

    def __init__(self, kind: str, n_classes: int, r: float = 5.0, a: float = 10.0,
                 b_init: float = 0.5) -> None:
        super().__init__()
        if kind not in POOLINGS:
            raise InputError(f"MIL pooling must be one of {POOLINGS}, got {kind!r}")
        if r <= 0:
            raise InputError(f"MIL pooling r must be > 0, got {r}")
        self.kind, self.r, self.a = kind, float(r), float(a)
        if kind == "noisy_and":
            self.b = nn.Parameter(torch.full((n_classes,), float(b_init)))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        flat = p.flatten(2)  # (B, K, N)
        if self.kind == "max":
            return flat.amax(2)
        if self.kind == "mean":
            return flat.mean(2)
        if self.kind == "gm":
            return flat.clamp_min(_EPS).pow(self.r).mean(2).pow(1.0 / self.r)
        if self.kind == "lse":
            n = torch.tensor(float(flat.shape[2]), dtype=flat.dtype, device=flat.device)
            return (torch.logsumexp(self.r * flat, 2) - torch.log(n)) / self.r
        if self.kind == "noisy_or":
            return 1.0 - torch.exp(torch.log1p(-flat.clamp(0, 1 - _EPS)).sum(2))
        if self.kind == "isr":
            v = (flat / (1.0 - flat).clamp_min(_EPS)).sum(2)
            return v / (1.0 + v)
        mean = flat.mean(2)
        b = self.b[None, :]
        s = torch.sigmoid
        low = s(-self.a * b)
        return (s(self.a * (mean - b)) - low) / (s(self.a * (1.0 - b)) - low)


@dataclass(frozen=True)
class MILConfig:
    """The network: a plan of valid (unpadded) 3x3 convolutions, ReLU (and batch norm), then a
    1x1 ``hidden`` layer and a 1x1 class layer with sigmoid output (the class maps).

    ``plan`` lists (channels, stride) per 3x3 convolution. With the default plan the receptive
    field is 45 px: an input of one cell of that size gives a 1x1 map (Kraus sized the network
    so one output sees one cell). Larger images give larger maps; smaller ones are refused.
    """

    n_classes: int
    in_chans: int = 3
    plan: Sequence[tuple[int, int]] = ((32, 1), (32, 2), (64, 1), (64, 2), (128, 1), (128, 2),
                                       (128, 1))
    hidden: int = 256
    pooling: str = "noisy_and"
    r: float = 5.0
    a: float = 10.0
    batch_norm: bool = True
    multilabel: bool = False


def receptive_field(plan: Sequence[tuple[int, int]], kernel: int = 3) -> int:
    """Receptive field (px) of a stack of valid ``kernel`` convolutions with the plan's strides."""
    rf, jump = 1, 1
    for _, stride in plan:
        rf += (kernel - 1) * jump
        jump *= stride
    return rf


class MILNet(nn.Module):
    """Fully convolutional MIL network.

    ``forward(x)`` with ``x`` ``(B, C, H, W)`` (H, W >= the receptive field) returns a dict:
    ``maps`` ``(B, K, h, w)`` class probabilities p_ij, ``pooled`` ``(B, K)`` P_i, ``logits``
    ``(B, K)`` the FC layer's output over the pooled vector.
    """

    def __init__(self, cfg: MILConfig) -> None:
        super().__init__()
        if cfg.n_classes < 2 and not cfg.multilabel:
            raise InputError(f"a MIL classifier needs >= 2 classes, got {cfg.n_classes}")
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = cfg.in_chans
        for c_out, stride in cfg.plan:
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        layers += [nn.Conv2d(c_in, cfg.hidden, 1), nn.ReLU(), nn.Conv2d(cfg.hidden,
                                                                        cfg.n_classes, 1)]
        self.features = nn.Sequential(*layers)
        self.pool = MILPool(cfg.pooling, cfg.n_classes, r=cfg.r, a=cfg.a)
        self.fc = nn.Linear(cfg.n_classes, cfg.n_classes)
        self.min_size = receptive_field(cfg.plan)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            raise InputError(f"image {h}x{w} px is smaller than the MIL network's receptive "
                             f"field ({self.min_size} px): upsample it or use a shorter plan")
        maps = torch.sigmoid(self.features(x))
        pooled = self.pool(maps)
        return {"maps": maps, "pooled": pooled, "logits": self.fc(pooled)}


def mil_loss(out: dict[str, torch.Tensor], target: torch.Tensor, multilabel: bool = False,
             mil_weight: float = 1.0) -> torch.Tensor:
    """Joint loss: binary MIL loss of each pooled ``P_i`` against the image's class indicator,
    plus the FC output's softmax cross-entropy (``target`` class indices ``(B,)``) or, for
    multi-label screens, its sigmoid cross-entropy (``target`` ``(B, K)`` in {0, 1})."""
    pooled = out["pooled"].clamp(_EPS, 1 - _EPS)
    if multilabel:
        onehot = target.float()
        head = nn.functional.binary_cross_entropy_with_logits(out["logits"], onehot)
    else:
        onehot = nn.functional.one_hot(target, pooled.shape[1]).to(pooled.dtype)
        head = nn.functional.cross_entropy(out["logits"], target)
    return head + mil_weight * nn.functional.binary_cross_entropy(pooled, onehot)
