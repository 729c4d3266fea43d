"""MIL pooling functions against hand-computed values, Noisy-AND's limits and gradients, the
network's receptive field, and training on images with image-level labels only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from morphoprof.errors import InputError
from morphoprof.models.mil import (
    DEFAULT_PLAN,
    MILConfig,
    MILNet,
    MILPool,
    mil_loss,
    receptive_field,
)
from morphoprof.models.training import ImageClassifier

# Two classes, a 2x2 map each.
P0 = [0.1, 0.2, 0.3, 0.4]
P1 = [0.9, 0.5, 0.5, 0.1]
MAPS = torch.tensor([[P0, P1]], dtype=torch.float64).reshape(1, 2, 2, 2)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def noisy_and(mean: float, a: float, b: float) -> float:
    return (sig(a * (mean - b)) - sig(-a * b)) / (sig(a * (1 - b)) - sig(-a * b))


def hand(kind: str, p: list[float], r: float = 2.0, a: float = 10.0, b: float = 0.5) -> float:
    n = len(p)
    if kind == "max":
        return max(p)
    if kind == "mean":
        return sum(p) / n
    if kind == "gm":
        return (sum(x ** r for x in p) / n) ** (1 / r)
    if kind == "lse":
        return math.log(sum(math.exp(r * x) for x in p) / n) / r
    if kind == "noisy_or":
        return 1 - math.prod(1 - x for x in p)
    if kind == "isr":
        v = sum(x / (1 - x) for x in p)
        return v / (1 + v)
    return noisy_and(sum(p) / n, a, b)


@pytest.mark.parametrize("kind", ["max", "mean", "gm", "lse", "noisy_or", "isr", "noisy_and"])
def test_pooling_matches_hand_computed_values(kind):
    pool = MILPool(kind, 2, r=2.0, a=10.0, b_init=0.5).double()
    got = pool(MAPS)[0].detach().numpy()
    want = [hand(kind, P0), hand(kind, P1)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_hand_values_are_the_published_numbers():
    # A few written out, so the reference formulas above are themselves checked.
    assert hand("noisy_or", P0) == pytest.approx(1 - 0.9 * 0.8 * 0.7 * 0.6)  # 0.6976
    assert hand("isr", P1) == pytest.approx((9 + 1 + 1 + 1 / 9) / (1 + 9 + 1 + 1 + 1 / 9))
    assert hand("noisy_and", P0) == pytest.approx(
        (sig(-2.5) - sig(-5)) / (sig(5) - sig(-5)))


def test_noisy_and_limits_and_threshold():
    pool = MILPool("noisy_and", 3, a=10.0, b_init=0.3)
    zeros, ones = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    np.testing.assert_allclose(pool(zeros).detach().numpy(), 0.0, atol=1e-7)  # mean 0 -> 0
    np.testing.assert_allclose(pool(ones).detach().numpy(), 1.0, atol=1e-6)  # mean 1 -> 1
    # Monotone in the mean activation.
    means = torch.linspace(0, 1, 11)
    with torch.no_grad():
        vals = [float(pool(torch.full((1, 3, 2, 2), float(m)))[0, 0]) for m in means]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    # As the slope grows, Noisy-AND becomes a step at b: "enough instances are positive".
    steep = MILPool("noisy_and", 1, a=200.0, b_init=0.3)
    with torch.no_grad():
        below = float(steep(torch.full((1, 1, 2, 2), 0.25))[0, 0])
        above = float(steep(torch.full((1, 1, 2, 2), 0.35))[0, 0])
        # At mean = b the value is the normalised midpoint of the logistic.
        mid = float(pool(torch.full((1, 3, 2, 2), 0.3))[0, 0])
    assert below < 1e-4 and above > 1 - 1e-4
    assert mid == pytest.approx(noisy_and(0.3, 10.0, 0.3), rel=1e-5)


def test_lse_and_gm_move_from_mean_to_max_with_r():
    p = torch.tensor([[[[0.1, 0.9], [0.2, 0.3]]]])
    mean, mx = float(p.mean()), float(p.max())
    lse = [float(MILPool("lse", 1, r=r)(p)) for r in (0.01, 1.0, 10.0, 200.0)]
    gm = [float(MILPool("gm", 1, r=r)(p)) for r in (1.0, 3.0, 10.0, 200.0)]
    assert lse[0] == pytest.approx(mean, abs=1e-3) and lse[-1] == pytest.approx(mx, abs=1e-2)
    assert gm[0] == pytest.approx(mean, abs=1e-6) and gm[-1] == pytest.approx(mx, abs=1e-2)
    assert lse == sorted(lse) and gm == sorted(gm)


def test_gradients_reach_noisy_and_thresholds():
    torch.manual_seed(0)
    net = MILNet(MILConfig(n_classes=3, in_chans=2, trunk="plan", plan=((4, 1), (4, 2)),
                           hidden=8, dropout=0.0))
    x = torch.randn(4, 2, 24, 24)
    y = torch.tensor([0, 1, 2, 1])
    mil_loss(net(x), y).backward()
    b = net.pool.b
    assert b.requires_grad and b.grad is not None
    assert b.grad.shape == (3,) and (b.grad.abs() > 0).all()


def test_receptive_field_gives_one_output_for_one_cell():
    cfg = MILConfig(n_classes=2, trunk="plan")
    assert cfg.plan_layers() == DEFAULT_PLAN  # no plan given: the default one
    rf = receptive_field(cfg.plan_layers())
    assert rf == 45
    net = MILNet(cfg).eval()
    out = net(torch.zeros(1, 3, rf, rf))
    assert out["maps"].shape == (1, 2, 1, 1)
    # Any larger size is accepted and gives a larger map; smaller is refused by name.
    assert net(torch.zeros(1, 3, 100, 77))["maps"].shape[-2:] == (7, 5)
    with pytest.raises(InputError, match="receptive field"):
        net(torch.zeros(1, 3, 40, 64))
    with pytest.raises(InputError, match="pooling"):
        MILPool("median", 2)


def toy_batch(n: int, rng: np.random.Generator, size: int = 32, blob: int = 6):
    """Class 0: a bright square in channel 0; class 1: in channel 1; black elsewhere."""
    x = np.zeros((n, 2, size, size), np.float32)
    y = rng.integers(0, 2, n)
    boxes = []
    for i in range(n):
        r, c = rng.integers(0, size - blob, 2)
        x[i, y[i], r:r + blob, c:c + blob] = 1.0
        boxes.append((r, c))
    return torch.from_numpy(x), torch.from_numpy(y), boxes


def adam_steps(module: ImageClassifier, x: torch.Tensor, y: torch.Tensor, steps: int,
               batch: int | None = None, seed: int = 0) -> list[float]:
    """``steps`` Adam steps in train mode, each on the whole set or (``batch``) on a
    class-balanced batch (an equal share from each class); returns the losses."""
    opt = module.configure_optimizers()
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(y == k).flatten() for k in torch.unique(y)]
    module.train()
    losses = []
    for _ in range(steps):
        idx = torch.arange(len(x)) if batch is None else torch.cat(
            [rows[torch.randint(0, len(rows), (batch // len(by_class),), generator=g)]
             for rows in by_class])
        loss = module.loss(module(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("pooling", ["noisy_and", "max", "lse"])
def test_a_few_training_steps_reduce_the_loss(pooling):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    module = ImageClassifier(MILNet(MILConfig(n_classes=2, in_chans=2, trunk="plan",
                                              plan=((8, 1), (16, 2), (16, 1)), hidden=16,
                                              dropout=0.0, pooling=pooling)), lr=3e-3)
    x, y, _ = toy_batch(32, rng)
    losses = adam_steps(module, x, y, 40)
    assert losses[-1] < 0.7 * losses[0], losses


def test_multilabel_loss_uses_sigmoids():
    torch.manual_seed(0)
    net = MILNet(MILConfig(n_classes=3, in_chans=1, trunk="plan", plan=((4, 1),), hidden=4,
                           dropout=0.0, multilabel=True))
    x = torch.rand(2, 1, 8, 8)
    target = torch.tensor([[1, 0, 1], [0, 0, 0]])
    loss = mil_loss(net(x), target, multilabel=True)
    out = net(x)
    # eq. 2: both terms summed over the 3 classes (mean over the batch), not averaged
    want = 3 * (torch.nn.functional.binary_cross_entropy_with_logits(out["logits"],
                                                                      target.float())
                + torch.nn.functional.binary_cross_entropy(out["pooled"], target.float()))
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
