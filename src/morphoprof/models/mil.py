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

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from morphoprof.errors import InputError
from morphoprof.features.backbones import create_backbone, input_stats
from morphoprof.models.settings import POOLINGS, MilNetwork, TrainConfig, TrainSection

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


# the ``plan`` trunk's default: (channels, stride) per valid 3x3 convolution; receptive field
# 45 px (one cell at BBBC021's 20x), output stride 8
DEFAULT_PLAN: tuple[tuple[int, int], ...] = ((32, 1), (32, 2), (64, 1), (64, 2), (128, 1),
                                             (128, 2), (128, 1))


class MILConfig(MilNetwork):
    """The network: a fully convolutional trunk, then the MIL head (Kraus's conv6 / conv7): a
    1x1 ``hidden`` layer with ReLU and ``dropout``, a 1x1 layer with K sigmoid class maps, the
    MIL pooling and an FC layer over the pooled vector.

    The trunk, head and pooling settings (``trunk``, ``stage``, ``weights``, ``plan``,
    ``hidden``, ``dropout``, ``pool_dropout``, ``pooling``, ``r``, ``a``) and their defaults
    are :class:`~morphoprof.models.settings.MilNetwork`'s, the ``mil`` section of a training
    config: ``trunk`` is ``plan`` (valid 3x3 convolutions, :data:`DEFAULT_PLAN` unless
    ``plan`` is given), ``kraus`` (the paper's own network, :class:`KrausTrunk`) or any timm
    model name cut at feature ``stage`` (EfficientNet-Lite0: stage 3 = 112 channels at 1/16).
    This class adds what the data and the run decide:

    Attributes:
        n_classes: K.
        in_chans: input channels.
        batch_norm: batch norm after the ``plan`` / ``kraus`` convolutions.
        multilabel: sigmoid FC output (several labels per image) instead of softmax.
        seed: seeds a random timm trunk's weights.
    """

    n_classes: int = Field(description="K, the classes")
    in_chans: int = Field(3, ge=1, description="input channels")
    batch_norm: bool = Field(True, description="batch norm after the plan / kraus convolutions")
    multilabel: bool = TrainConfig.model_fields["multilabel"]
    seed: int = TrainSection.model_fields["seed"]

    def plan_layers(self) -> tuple[tuple[int, int], ...]:
        """The ``plan`` trunk's (channels, stride) pairs: ``plan``, or :data:`DEFAULT_PLAN`."""
        return tuple((c, s) for c, s in self.plan) if self.plan else DEFAULT_PLAN


def receptive_field(plan: Sequence[tuple[int, int]], kernel: int = 3) -> int:
    """Receptive field (px) of a stack of valid ``kernel`` convolutions with the plan's strides."""
    rf, jump = 1, 1
    for _, stride in plan:
        rf += (kernel - 1) * jump
        jump *= stride
    return rf


def _conv(c_in: int, c_out: int, k: int, bn: bool, pad: int = 0, stride: int = 1) -> list:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad,
                                         bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    return layers + [nn.ReLU()]


class PlanTrunk(nn.Module):
    """Valid 3x3 convolutions (ReLU, batch norm) by plan; ``(B, C, H, W)`` -> ``(B, D, h, w)``.
    Images smaller than the receptive field are refused with an error."""

    def __init__(self, cfg: MILConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_chans
        plan = cfg.plan_layers()
        for c_out, stride in plan:
            layers += _conv(c_in, c_out, 3, cfg.batch_norm, stride=stride)
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.out_channels = c_in
        self.min_size = receptive_field(plan)
        self.reduction = math.prod(s for _, s in plan)
        self.mean = self.std = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            raise InputError(f"image {h}x{w} px is smaller than the MIL network's receptive "
                             f"field ({self.min_size} px): upsample it or use a shorter plan")
        return self.body(x)


class KrausTrunk(nn.Module):
    """Kraus et al. (2016), Fig. 1, layer for layer up to conv5: ave_pool0 (3x3, stride 2),
    conv1 3x3x32, conv2 3x3x64, pool1, conv3 5x5x64, pool2, conv4 3x3x128, pool3, conv5
    3x3x128, pool4 (max pools 2x2 stride 2, "same" padding, ReLU), with ``pool_dropout`` after
    every pool. Output stride 32; conv6 / conv7 are the :class:`MILHead`."""

    def __init__(self, cfg: MILConfig) -> None:
        super().__init__()
        bn, d = cfg.batch_norm, cfg.pool_dropout

        def pool() -> list:
            return [nn.MaxPool2d(2, 2), nn.Dropout(d)]

        self.body = nn.Sequential(
            nn.AvgPool2d(3, 2, padding=1), nn.Dropout(d),
            *_conv(cfg.in_chans, 32, 3, bn, 1), *_conv(32, 64, 3, bn, 1), *pool(),
            *_conv(64, 64, 5, bn, 2), *pool(),
            *_conv(64, 128, 3, bn, 1), *pool(),
            *_conv(128, 128, 3, bn, 1), *pool())
        self.out_channels, self.reduction, self.min_size = 128, 32, 32
        self.mean = self.std = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TimmTrunk(nn.Module):
    """A timm model cut at feature stage ``cfg.stage`` (timm ``features_only``), with the
    weights of :func:`~morphoprof.features.backbones.create_backbone` (offline ImageNet
    EfficientNet-Lite by default). In-place activations are switched off so guided backprop
    (:mod:`morphoprof.models.jacobian`) can hook them. ``mean`` / ``std``: the pretrained
    network's input statistics (None for random weights)."""

    def __init__(self, cfg: MILConfig) -> None:
        super().__init__()
        import timm

        backbone = create_backbone(cfg.trunk, cfg.weights, in_chans=cfg.in_chans, seed=cfg.seed)
        full = backbone.model
        n_stages = len(full.feature_info)
        stage = n_stages - 1 if cfg.stage is None else cfg.stage
        if not 0 <= stage < n_stages:
            raise InputError(f"mil.stage: {backbone.name} has feature stages 0..{n_stages - 1}, "
                             f"got {cfg.stage}")
        net = timm.create_model(backbone.name, pretrained=False, features_only=True,
                                out_indices=(stage,), in_chans=cfg.in_chans)
        missing, _ = net.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise InputError(f"could not cut {backbone.name} at stage {stage}: weights missing "
                             f"for {missing[:3]}")
        for m in net.modules():
            if hasattr(m, "inplace") and isinstance(m.inplace, bool):
                m.inplace = False
        self.body = net
        self.name, self.stage, self.source = backbone.name, stage, backbone.weights
        info = net.feature_info.get_dicts()[-1]
        self.out_channels, self.reduction = int(info["num_chs"]), int(info["reduction"])
        self.min_size = self.reduction
        self.mean, self.std = (input_stats(backbone, cfg.in_chans)
                               if backbone.weights != "random" else (None, None))
        # the modules from the input to the cut stage, in order (a plain list: the modules
        # stay registered once, under ``body``); None where the model is not such a chain
        self._layers = _chain_to(net, str(info["module"]), cfg.in_chans, self.min_size)

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            raise InputError(f"image {h}x{w} px is smaller than {self.name}'s stage "
                             f"{self.stage} stride ({self.min_size} px)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        if self._layers is None:
            return self.body(x)[-1]
        for layer in self._layers:  # stops at the cut stage: later blocks never run
            x = layer(x)
        return x

    @property
    def last_stage(self) -> nn.Module:
        """The module that computes the cut stage (trained when ``mil.unfreeze_last_stage``)."""
        if self._layers is None:
            raise InputError(f"mil.unfreeze_last_stage: {self.name} is not a chain of stages "
                             "this trunk can split")
        return self._layers[-1]

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The input of :attr:`last_stage`: ``forward(x) == last_stage(forward_prefix(x))``."""
        self._check_size(x)
        self.last_stage  # noqa: B018 (raises where the trunk cannot be split)
        for layer in self._layers[:-1]:
            x = layer(x)
        return x


def _chain_to(net: nn.Module, target: str, in_chans: int, size: int) -> list[nn.Module] | None:
    """The modules of ``net`` from its input to the module named ``target`` (a feature
    stage), descending into the containers that hold it: for timm's EfficientNet features
    ``conv_stem, bn1, blocks.0 .. blocks.k``, for a ``FeatureListNet`` its children. Checked
    once on a small random input against ``net``'s own output; None where they differ (the
    model is not such a chain)."""
    chain: list[nn.Module] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == target:
                chain.append(child)
                return True
            if target.startswith(full + "."):
                return walk(child, full + ".")
            chain.append(child)
        return False

    if not walk(net, ""):
        return None
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            x = torch.rand(1, in_chans, max(size, 32) * 2, max(size, 32) * 2,
                           generator=torch.Generator().manual_seed(0))
            want, y = net(x)[-1], x
            for layer in chain:
                y = layer(y)
        same = y.shape == want.shape and torch.allclose(y, want, atol=1e-5)
    except (RuntimeError, TypeError):
        same = False
    finally:
        net.train(was_training)
    return chain if same else None


class TrunkPrefix(nn.Module):
    """A :class:`TimmTrunk` up to the input of its last stage (what is cached when the last
    stage is trained)."""

    def __init__(self, trunk: TimmTrunk) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_prefix(x)


class LastStageHead(nn.Module):
    """The trunk's last stage (trained) and the MIL head, on the cached input of that stage
    (``mil.unfreeze_last_stage``): ``(B, D', h', w')`` or ``(B, T, D', h', w')`` maps in, the
    head's dict out."""

    def __init__(self, last: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.last, self.head = last, head

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        if f.ndim == 5:
            b = f.shape[0]
            g = self.last(f.flatten(0, 1).float())
            return self.head(g.unflatten(0, (b, -1)))
        return self.head(self.last(f.float()))


TRUNKS = {"plan": PlanTrunk, "kraus": KrausTrunk}


def make_trunk(cfg: MILConfig) -> nn.Module:
    """The trunk named by ``cfg.trunk``: ``plan``, ``kraus`` or a timm model name."""
    return TRUNKS.get(cfg.trunk, TimmTrunk)(cfg)


class MILHead(nn.Module):
    """Feature maps ``(B, D, h, w)`` -> class maps, pooled probabilities and FC logits.

    Kraus's conv6 (1x1, ``hidden``, ReLU, ``dropout``) and conv7 (1x1, K, sigmoid), the MIL
    pooling and the FC layer. A 5-D input ``(B, T, D, h, w)`` holds T transformed copies of
    each image (test-time augmentation): pooled probabilities and logits are averaged over
    them and ``maps`` / ``map_logits`` are the first copy's.

    ``forward`` returns a dict: ``maps`` ``(B, K, h, w)`` class probabilities p_ij,
    ``map_logits`` the same before the sigmoid (conv7's output, where eq. 4's Jacobian starts),
    ``pooled`` ``(B, K)`` P_i and ``logits`` ``(B, K)`` the FC layer's output.
    """

    def __init__(self, cfg: MILConfig, in_channels: int) -> None:
        super().__init__()
        if cfg.n_classes < 2 and not cfg.multilabel:
            raise InputError(f"a MIL classifier needs >= 2 classes, got {cfg.n_classes}")
        self.cfg = cfg
        self.classes = nn.Sequential(nn.Conv2d(in_channels, cfg.hidden, 1), nn.ReLU(),
                                     nn.Dropout(cfg.dropout),
                                     nn.Conv2d(cfg.hidden, cfg.n_classes, 1))
        self.pool = MILPool(cfg.pooling, cfg.n_classes, r=cfg.r, a=cfg.a)
        self.fc = nn.Linear(cfg.n_classes, cfg.n_classes)

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        copies = f.ndim == 5
        b = f.shape[0]
        if copies:
            f = f.flatten(0, 1)
        map_logits = self.classes(f.float())
        maps = torch.sigmoid(map_logits)
        pooled = self.pool(maps)
        logits = self.fc(pooled)
        if copies:
            map_logits = map_logits.unflatten(0, (b, -1))[:, 0]
            maps = maps.unflatten(0, (b, -1))[:, 0]
            pooled = pooled.unflatten(0, (b, -1)).mean(1)
            logits = logits.unflatten(0, (b, -1)).mean(1)
        return {"maps": maps, "map_logits": map_logits, "pooled": pooled, "logits": logits}


class MILNet(nn.Module):
    """Fully convolutional MIL network: ``head(trunk(x))``.

    ``forward(x)`` with ``x`` ``(B, C, H, W)`` returns :class:`MILHead`'s dict (``maps``,
    ``map_logits``, ``pooled``, ``logits``). ``trunk`` overrides the one ``cfg`` names (e.g. a
    shared frozen one).
    """

    def __init__(self, cfg: MILConfig, trunk: nn.Module | None = None) -> None:
        super().__init__()
        if cfg.n_classes < 2 and not cfg.multilabel:
            raise InputError(f"a MIL classifier needs >= 2 classes, got {cfg.n_classes}")
        self.cfg = cfg
        self.trunk = trunk if trunk is not None else make_trunk(cfg)
        self.head = MILHead(cfg, self.trunk.out_channels)
        self.pool = self.head.pool
        self.min_size = getattr(self.trunk, "min_size", 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.trunk(x))


def mil_loss(out: dict[str, torch.Tensor], target: torch.Tensor, multilabel: bool = False,
             mil_weight: float = 1.0) -> torch.Tensor:
    """Joint loss (Kraus eq. 2): the binary MIL loss of each pooled ``P_i`` against the image's
    class indicator, summed over the K classes (times ``mil_weight``) and averaged over the
    batch, plus the FC output's softmax cross-entropy (``target`` class indices ``(B,)``) or,
    for multi-label screens, its sigmoid cross-entropy summed over classes (``target``
    ``(B, K)`` in {0, 1})."""
    pooled = out["pooled"].float().clamp(_EPS, 1 - _EPS)
    bce = nn.functional.binary_cross_entropy
    if multilabel:
        onehot = target.float()
        head = nn.functional.binary_cross_entropy_with_logits(
            out["logits"].float(), onehot, reduction="none").sum(1).mean()
    else:
        onehot = nn.functional.one_hot(target, pooled.shape[1]).to(pooled.dtype)
        head = nn.functional.cross_entropy(out["logits"].float(), target)
    return head + mil_weight * bce(pooled, onehot, reduction="none").sum(1).mean()
