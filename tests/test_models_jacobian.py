"""Jacobian (guided backprop) maps: on a toy image they light up only where the input matters;
on the synthetic screen, masks from a MIL network trained with image labels only overlap the
ground-truth cells."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tifffile
import torch

from morphoprof.errors import InputError
from morphoprof.models.jacobian import iou, jacobian_maps, jacobian_mask, save_overlay
from morphoprof.models.mil import MILConfig, MILNet
from morphoprof.models.training import ImageClassifier
from tests.test_models_mil import adam_steps, toy_batch


@pytest.fixture(scope="module")
def toy_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    x, y, _ = toy_batch(128, rng)
    module = ImageClassifier(MILNet(MILConfig(n_classes=2, in_chans=2, trunk="plan",
                                              plan=((8, 1), (16, 2), (16, 1)), hidden=16,
                                              dropout=0.0, pooling="max")), lr=3e-3)
    # Max pooling: the class maps must be low everywhere but on the square (a noisy-AND
    # network can instead keep every background position near its threshold b_i, since the
    # squares cover 4% of the image, far below the fraction Noisy-AND is built for).
    adam_steps(module, x, y, 300, batch=16)
    return module


def test_toy_maps_concentrate_where_the_input_matters(toy_model):
    rng = np.random.default_rng(7)
    x, y, boxes = toy_batch(16, rng)
    net = toy_model.net.eval()
    with torch.no_grad():
        assert (net(x)["logits"].argmax(1) == y).float().mean() >= 0.9
    maps = jacobian_maps(net, x)
    assert maps.shape == (16, 32, 32) and (maps >= 0).all()
    rf = net.min_size  # 9 px: the receptive field
    ious = []
    for m, (r, c) in zip(maps, boxes):
        near = np.zeros_like(m, bool)
        near[max(r - rf, 0):r + 6 + rf, max(c - rf, 0):c + 6 + rf] = True
        square = np.zeros_like(m, bool)
        square[r:r + 6, c:c + 6] = True
        assert m[square].sum() > 0
        # The signal is on the square and within one receptive field of it ...
        assert m[near].sum() / m.sum() > 0.999
        assert m[square].mean() > 1000 * m[~near].mean()
        # ... and the thresholded mask is the square (Otsu also takes part of its rim). The
        # map itself is thresholded (power 1): the default fourth root is for the heavy-tailed
        # maps of real fields, and on this clean map it widens the mask over the rim.
        ious.append(iou(jacobian_mask(m, sigma=0.5, power=1), square))
    assert min(ious) > 0.3 and np.mean(ious) > 0.5, ious


def test_backward_rules_gradient_is_autograd_and_rules_differ(toy_model):
    """``gradient`` is the plain Jacobian of eq. 4's seed, ``P_i * p_ij`` on the class map
    before its sigmoid (checked against autograd); ``deconvnet`` and ``guided`` change it, and
    an unknown rule is refused."""
    x, _, _ = toy_batch(2, np.random.default_rng(5))
    net = toy_model.net.eval()
    xx = x.clone().requires_grad_(True)
    out = net(xx)
    maps, pooled = out["maps"], out["pooled"]
    np.testing.assert_allclose(torch.sigmoid(out["map_logits"]).detach(), maps.detach())
    seed = torch.zeros_like(maps)
    seed[:, 0] = (pooled[:, 0][:, None, None] * maps[:, 0]).detach()
    out["map_logits"].backward(seed)
    expected = xx.grad.clamp_min(0).sum(1).numpy()
    plain = jacobian_maps(net, x, class_index=0, backward="gradient")
    assert expected.max() > 0
    tol = 1e-5 * expected.max()
    np.testing.assert_allclose(plain, expected, rtol=1e-4, atol=tol)
    guided = jacobian_maps(net, x, class_index=0)
    deconv = jacobian_maps(net, x, class_index=0, backward="deconvnet")

    def unit(m):
        return m / m.max()

    assert np.abs(unit(guided) - unit(plain)).max() > 0.1
    assert np.abs(unit(deconv) - unit(guided)).max() > 0.1
    assert (deconv >= 0).all() and deconv.sum() > 0
    with pytest.raises(InputError, match="backward rule"):
        jacobian_maps(net, x, backward="smooth")
    # the deconvnet hooks are removed afterwards: the plain map is the same again
    np.testing.assert_allclose(jacobian_maps(net, x, class_index=0, backward="gradient"),
                               plain, rtol=1e-6, atol=1e-6 * plain.max())


def test_maps_start_before_the_sigmoid_so_sure_positions_still_speak(toy_model):
    """A class map saturated at p = 1 (a network sure of its class everywhere) still gives a
    map: eq. 4 is seeded before the sigmoid, whose derivative p (1 - p) is 0 there."""
    x, _, _ = toy_batch(2, np.random.default_rng(5))
    net = copy.deepcopy(toy_model.net).eval()
    with torch.no_grad():
        net.head.classes[-1].bias[0] += 50.0
        assert (net(x)["maps"][:, 0] == 1).all()
    xx = x.clone().requires_grad_(True)
    out = net(xx)
    seed = (out["pooled"][:, 0][:, None, None] * out["maps"][:, 0]).detach()
    out["maps"][:, 0].backward(seed)
    assert xx.grad.abs().max() == 0  # seeded after the sigmoid, nothing comes back
    unsure = jacobian_maps(toy_model.net, x, class_index=0, backward="gradient")
    sure = jacobian_maps(net, x, class_index=0, backward="gradient")
    assert sure.max() > 0.1 * unsure.max()
    # the seed is P_i * p_ij = 1 everywhere: the map of the summed pre-sigmoid class map
    xx = x.clone().requires_grad_(True)
    net(xx)["map_logits"][:, 0].sum().backward()
    np.testing.assert_allclose(sure, xx.grad.clamp_min(0).sum(1).numpy(), rtol=1e-4,
                               atol=1e-6 * sure.max())


def test_maps_trace_the_requested_class_and_check_it(toy_model):
    x, _, _ = toy_batch(2, np.random.default_rng(3))
    a = jacobian_maps(toy_model.net, x, class_index=0)
    b = jacobian_maps(toy_model.net, x, class_index=1)
    assert a.shape == b.shape == (2, 32, 32) and not np.allclose(a, b)
    with pytest.raises(InputError, match="class_index"):
        jacobian_maps(toy_model.net, x, class_index=5)
    # The guided-ReLU hooks are removed afterwards: ordinary gradients are unchanged.
    xx = x.clone().requires_grad_(True)
    toy_model.net(xx)["logits"][:, 0].sum().backward()
    assert (xx.grad < 0).any()


def test_mask_helpers(tmp_path):
    m = np.zeros((20, 20), np.float32)
    m[5:10, 5:10] = 1.0
    assert iou(jacobian_mask(m, sigma=0), m > 0) == 1.0
    assert not jacobian_mask(np.zeros((4, 4)), sigma=0).any()
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(InputError):
        jacobian_mask(np.zeros((2, 2, 2)))
    png = save_overlay(tmp_path / "o.png", np.random.rand(3, 20, 20), m, m > 0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_screen_masks_overlap_the_treated_cells(tmp_path):
    """A MIL network learns DMSO vs a treated MoA from field labels only; the Jacobian masks of
    treated fields it classifies correctly overlap the ground-truth cell masks."""
    from morphoprof.datasets.synthetic import SynthConfig, generate_screen
    from morphoprof.models.data import load_images

    cfg = SynthConfig(n_moas=3, compounds_per_moa=2, concentrations=(3.0,), n_batches=2,
                      plates_per_batch=2, dmso_wells_per_plate=4, sites_per_well=2, height=96,
                      width=96, cells_per_field=6, seed=5)
    screen = tmp_path / "screen"
    index = generate_screen(screen, cfg)
    moa = "DNA damage"  # larger, textured nuclei and larger cells
    t = index.table
    keep = ((t["Metadata_compound"] == "DMSO") | (t["Metadata_moa"] == moa)).to_numpy()
    sub = index.subset(keep)
    images = load_images(sub, normalization="percentile")
    y = torch.from_numpy((sub.table["Metadata_moa"] == moa).to_numpy().astype(np.int64))
    x = (torch.from_numpy(images) - 0.5) / 0.25
    torch.manual_seed(0)
    module = ImageClassifier(MILNet(MILConfig(n_classes=2, in_chans=3, trunk="plan",
                                              dropout=0.0, plan=((16, 1), (16, 2), (32, 1),
                                                                   (32, 1)), hidden=32,
                                              pooling="max")), lr=2e-3)
    adam_steps(module, x, y, 120, batch=16)
    net = module.net.eval()
    with torch.no_grad():
        pred = net(x)["logits"].argmax(1)
    for k in (0, 1):
        assert (pred[y == k] == k).float().mean() > 0.8  # both classes learned
    treated = np.flatnonzero(((pred == 1) & (y == 1)).numpy())
    maps = jacobian_maps(net, x[treated], class_index=1)
    ious, precision, covered = [], [], []
    for m, i in zip(maps, treated):
        row = sub.table.iloc[i]
        stem = f"{row['Metadata_plate']}_{row['Metadata_well']}_s{row['Metadata_site']}"
        cells = tifffile.imread(screen / "masks" / row["Metadata_plate"] / f"{stem}_cells.tif") > 0
        mask = jacobian_mask(m, sigma=1.0)
        assert mask.any()
        ious.append(iou(mask, cells))
        precision.append((mask & cells).sum() / mask.sum())
        covered.append(cells.mean())
    print(f"\nJacobian masks of {len(ious)} treated fields vs ground-truth cells: IoU "
          f"{np.mean(ious):.3f}, fraction of mask on cells {np.mean(precision):.2f} (cells cover "
          f"{np.mean(covered):.2f} of a field)")
    # The masks lie on the treated cells: far more of the mask is on cells than chance gives.
    assert np.mean(precision) > 2 * np.mean(covered)
    assert np.mean(ious) > 0.0
