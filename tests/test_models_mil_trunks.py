"""MIL trunks (timm models cut at a stage, Kraus's network), the frozen-trunk feature-map cache,
guided Jacobians through every activation the trunks use, and the cluttered-digit canvases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from morphoprof.cli import main
from morphoprof.config import load_train_config
from morphoprof.datasets.cluttered_digits import DigitsConfig, cluttered_digits
from morphoprof.errors import InputError
from morphoprof.models.jacobian import (
    MASK_POWER,
    MRF_CONTRAST_POWER,
    MRF_CONTRAST_SMOOTHNESS,
    MRF_SMOOTHNESS,
    contrast_weights,
    iou,
    jacobian_maps,
    jacobian_mask,
    mean_iu,
    mrf_mask,
    otsu_foreground,
)
from morphoprof.models.mil import KrausTrunk, MILConfig, MILNet
from morphoprof.models.mil_cache import (
    CachedMapDataset,
    cache_key,
    cached_trunk_maps,
    dihedral,
    trunk_maps,
)


@pytest.mark.parametrize("name,stage,channels,stride", [
    ("tf_efficientnet_lite0", 3, 112, 16),  # EfficientNet family, offline ImageNet weights
    ("resnet18", 2, 128, 8),                # ResNet family, random weights
])
def test_timm_trunk_is_cut_at_the_named_stage(name, stage, channels, stride):
    weights = "offline" if "lite" in name else "random"
    net = MILNet(MILConfig(n_classes=4, trunk=name, stage=stage, weights=weights, hidden=8,
                           dropout=0.0)).eval()
    assert (net.trunk.out_channels, net.trunk.reduction) == (channels, stride)
    out = net(torch.rand(2, 3, 96, 64))
    assert out["maps"].shape == (2, 4, 96 // stride, 64 // stride)
    assert out["pooled"].shape == out["logits"].shape == (2, 4)
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    # pretrained: the trunk's own input statistics; random: none (the data's are used)
    assert (net.trunk.mean is None) == (weights == "random")
    with pytest.raises(InputError, match="stage"):
        MILNet(MILConfig(n_classes=4, trunk=name, stage=9, weights="random"))


@pytest.mark.parametrize("name,stage,weights,chain", [
    ("tf_efficientnet_lite0", 3, "offline", 7),  # conv_stem, bn1, blocks.0-4 (not 5, 6)
    ("resnet18", 2, "random", 6),                # conv1, bn1, act1, maxpool, layer1, layer2
])
def test_timm_trunk_splits_at_its_last_stage(name, stage, weights, chain):
    """The trunk runs as a chain of modules that stops at the cut stage, and its last stage
    applied to the prefix's output is the whole trunk (what the cache of
    mil.unfreeze_last_stage and the trained stage rely on)."""
    from morphoprof.models.mil import TrunkPrefix

    net = MILNet(MILConfig(n_classes=4, trunk=name, stage=stage, weights=weights, hidden=8,
                           dropout=0.0)).eval()
    trunk = net.trunk
    assert len(trunk._layers) == chain
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        whole = trunk(x)
        assert torch.allclose(whole, trunk.body(x)[-1], atol=1e-5)
        prefix = TrunkPrefix(trunk)(x)
        assert prefix.shape[1] != whole.shape[1] or prefix.shape[-1] != whole.shape[-1]
        assert torch.allclose(trunk.last_stage(prefix), whole, atol=1e-5)


def test_kraus_trunk_layer_for_layer():
    trunk = KrausTrunk(MILConfig(n_classes=3, batch_norm=False, pool_dropout=0.2))
    convs = [(m.kernel_size[0], m.out_channels) for m in trunk.modules()
             if isinstance(m, nn.Conv2d)]
    assert convs == [(3, 32), (3, 64), (5, 64), (3, 128), (3, 128)]
    kinds = [type(m).__name__ for m in trunk.body]
    assert kinds[0] == "AvgPool2d" and kinds.count("MaxPool2d") == 4
    assert all(kinds[i + 1] == "Dropout" for i, k in enumerate(kinds) if "Pool" in k)
    net = MILNet(MILConfig(n_classes=3, trunk="kraus", hidden=1000, dropout=0.5))
    head = [m for m in net.head.classes if isinstance(m, (nn.Conv2d, nn.Dropout))]
    assert [(m.kernel_size, m.out_channels) for m in head if isinstance(m, nn.Conv2d)] == [
        ((1, 1), 1000), ((1, 1), 3)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.5]
    assert net.eval()(torch.rand(1, 3, 256, 192))["maps"].shape == (1, 3, 8, 6)


def test_frozen_cache_equals_the_whole_network(tmp_path):
    torch.manual_seed(0)
    cfg = MILConfig(n_classes=3, trunk="tf_efficientnet_lite0", stage=2, weights="offline",
                    hidden=16, dropout=0.0)
    net = MILNet(cfg).eval()
    images = np.random.default_rng(0).random((5, 3, 64, 64)).astype(np.float32)
    mean, std = net.trunk.mean, net.trunk.std
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    key = cache_key({"trunk": "lite0", "stage": 2}, images, mean, std, 8)
    calls = []

    def compute():
        calls.append(1)
        return trunk_maps(net.trunk, images, mean, std, 8, batch_size=2)

    maps = cached_trunk_maps(tmp_path / "cache", key, compute)
    again = cached_trunk_maps(tmp_path / "cache", key, compute)
    assert len(calls) == 1 and maps.shape == (5, 8, 40, 8, 8)
    np.testing.assert_array_equal(again, maps)
    other = cache_key({"trunk": "lite0", "stage": 2}, images[::-1].copy(), mean, std, 8)
    cached_trunk_maps(tmp_path / "cache", other, compute)
    assert len(calls) == 2  # other images: recomputed
    x = (torch.from_numpy(images) - m) / s
    with torch.no_grad():
        whole = net(dihedral(x, 5))
        head = net.head(torch.from_numpy(np.asarray(maps[:, 5], np.float32)))
    np.testing.assert_allclose(head["pooled"], whole["pooled"], atol=2e-3)
    np.testing.assert_allclose(head["logits"], whole["logits"], atol=2e-3)
    # test items hold all 8 copies; the head averages their predictions
    ds = CachedMapDataset(maps, np.arange(5), np.zeros(5), train=False)
    assert ds[0][0].shape == (8, 40, 8, 8)
    with torch.no_grad():
        copies = net.head(ds[0][0][None])["logits"][0]
        each = torch.stack([net.head(torch.from_numpy(np.asarray(maps[0:1, t], np.float32)))[
            "logits"][0] for t in range(8)])
    np.testing.assert_allclose(copies, each.mean(0), atol=1e-5)
    train = CachedMapDataset(maps, np.arange(5), np.zeros(5), train=True, crop=6)
    a, b = train[(1, 123)][0], train[(1, 123)][0]
    assert a.shape == (40, 6, 6) and torch.equal(a, b)  # a function of the sampler's seed
    # the maps written batch by batch as the trunk makes them (train mil's way: never held
    # whole) are the same bytes, from images read off disk as well
    from morphoprof.io_utils import NpyRows, write_npy_chunks
    from morphoprof.models.mil_cache import trunk_map_batches

    write_npy_chunks(tmp_path / "images.npy", images.shape, np.float32, [images])
    on_disk = NpyRows(tmp_path / "images.npy")
    batches = list(trunk_map_batches(net.trunk, on_disk, mean, std, 8, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1] and not net.trunk.training
    streamed = cached_trunk_maps(tmp_path / "streamed", key, lambda: iter(batches), n=5)
    np.testing.assert_array_equal(streamed, maps)
    assert isinstance(streamed, np.memmap) and streamed.dtype == np.float16


def test_dihedral_transforms_are_the_eight_symmetries():
    x = torch.arange(9.0).reshape(1, 3, 3)
    outs = {tuple(dihedral(x, t).flatten().tolist()) for t in range(8)}
    assert len(outs) == 8 and torch.equal(dihedral(x, 0), x)


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU])
def test_jacobian_through_relu6_and_silu(act):
    torch.manual_seed(0)
    net = MILNet(MILConfig(n_classes=2, in_chans=1, trunk="plan", plan=((8, 1), (8, 1)),
                           hidden=8, dropout=0.0, batch_norm=False))
    for name, m in list(net.trunk.body.named_children()):
        if isinstance(m, nn.ReLU):
            net.trunk.body.add_module(name, act(inplace=True))
    x = torch.zeros(1, 1, 24, 24)
    x[0, 0, 10:14, 10:14] = 1.0  # a planted object on a zero background
    jmap = jacobian_maps(net, x, class_index=0)[0]
    assert np.isfinite(jmap).all() and (jmap >= 0).all() and jmap.max() > 0
    assert all(m.inplace for m in net.modules() if isinstance(m, act))  # restored


def test_jacobian_sees_a_bright_object_that_saturates_relu6():
    """A bright object drives the first ReLU6 above 6, where its exact derivative is 0: the
    guided map still covers it (ReLU6 gated as a ReLU), only the object, and the network and
    its activations come back unchanged."""
    torch.manual_seed(0)
    net = MILNet(MILConfig(n_classes=2, in_chans=1, trunk="plan", plan=((8, 1), (8, 1)),
                           hidden=8, dropout=0.0, batch_norm=False))
    for name, m in list(net.trunk.body.named_children()):
        if isinstance(m, nn.ReLU):
            net.trunk.body.add_module(name, nn.ReLU6(inplace=True))
    first = next(m for m in net.trunk.body if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        first.weight.abs_()
        first.bias.fill_(0.0)
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 12:20, 12:20] = 20.0  # every first-layer unit inside the object is > 6
    relu6 = next(m for m in net.trunk.body if isinstance(m, nn.ReLU6))
    seen = {}
    handle = relu6.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach()))
    jmap = jacobian_maps(net, x, class_index=0)[0]
    handle.remove()
    inside = seen["x"][0, :, 14:18, 14:18]
    assert (inside > 6).all()  # saturated: the exact gradient there is 0
    assert (jmap[13:19, 13:19] > 0).all()
    assert jmap[:4].max() == 0 and jmap[:, :4].max() == 0  # zero background far away
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seeded = jacobian_maps(net, x, seed="trunk")
    assert seeded.shape == (1, 32, 32) and seeded[0, 13:19, 13:19].min() > 0
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert relu6.inplace and net.training  # in-place flag and training mode restored
    with pytest.raises(InputError, match="seed"):
        jacobian_maps(net, x, seed="head")


def test_mask_power_keeps_dim_objects_beside_a_hot_spot():
    """Jacobian maps are heavy-tailed: Otsu on the raw map keeps only the hottest object; on
    its fourth root (the default) the dimmer objects are kept as well."""
    jmap = np.zeros((64, 64))
    jmap[5:15, 5:15] = 1.0
    jmap[30:40, 30:40] = 1.5
    jmap[50:54, 50:54] = 16.0  # one bright nucleus
    truth = jmap > 0
    raw = jacobian_mask(jmap, sigma=0, power=1)
    assert raw[50:54, 50:54].all() and not raw[5:15, 5:15].any() and not raw[30:40, 30:40].any()
    root = jacobian_mask(jmap, sigma=0)
    assert mean_iu(root, truth) == 1.0
    with pytest.raises(InputError, match="power"):
        jacobian_mask(jmap, power=0)


def test_contrast_sensitive_mrf_snaps_a_blurred_map_to_the_image_edges():
    """A map blurred past its object (as guided backprop's are): the Potts MRF keeps the blur,
    the contrast-sensitive one (the field's image as the pairwise term) follows the object's
    edges; a flat image leaves every weight at 1, and the pairwise weights are low only across
    the edge."""
    rng = np.random.default_rng(0)
    square = np.zeros((64, 64), bool)
    square[20:44, 16:40] = True
    image = np.stack([square + 0.05 * rng.standard_normal(square.shape), 0.5 * square])
    jmap = gaussian_filter(square * 1.0, 5) + 0.05 * rng.random(square.shape)
    potts = iou(mrf_mask(jmap), square)
    contrast = iou(mrf_mask(jmap, image=image), square)
    assert potts < 0.7 and contrast > 0.95, (potts, contrast)
    right, down = contrast_weights(image)
    assert right[30, 15] < 1e-6 and down[19, 30] < 1e-6  # across the square's edges
    assert right[30, 25] > 0.3 and down[30, 25] > 0.3  # inside it
    assert right[:, -1].max() == 0 and down[-1].max() == 0  # no neighbour there
    flat_r, flat_d = contrast_weights(np.ones((5, 6)))
    assert (flat_r[:, :-1] == 1).all() and (flat_d[:-1] == 1).all()
    # with a flat image the contrast MRF is the Potts MRF of the same penalty and power
    np.testing.assert_array_equal(mrf_mask(jmap, 3.0, power=MASK_POWER, image=np.ones((64, 64))),
                                  mrf_mask(jmap, 3.0))
    # each MRF has its own defaults
    np.testing.assert_array_equal(
        mrf_mask(jmap, image=image),
        mrf_mask(jmap, MRF_CONTRAST_SMOOTHNESS, power=MRF_CONTRAST_POWER, image=image))
    np.testing.assert_array_equal(mrf_mask(jmap), mrf_mask(jmap, MRF_SMOOTHNESS,
                                                           power=MASK_POWER))
    with pytest.raises(InputError, match="map is"):
        mrf_mask(jmap, image=image[:, :32])
    with pytest.raises(InputError, match="MRF image"):
        contrast_weights(np.ones((2, 2, 4, 4)))
    with pytest.raises(InputError, match="NaN"):
        mrf_mask(jmap, image=np.where(square, np.nan, 0.0))
    with pytest.raises(InputError, match="smoothness"):
        mrf_mask(jmap, -1.0)


def test_mrf_denoising_recovers_a_noisy_planted_mask():
    rng = np.random.default_rng(0)
    truth = np.zeros((64, 64), bool)
    truth[20:40, 10:50] = True
    jmap = truth + rng.normal(0, 0.6, truth.shape)
    # the raw map (power 1: it holds negative noise) and a Potts penalty of 2
    plain = mean_iu(jacobian_mask(jmap, sigma=0, power=1), truth)
    denoised = mean_iu(mrf_mask(jmap, smoothness=2.0, sigma=0, power=1), truth)
    assert plain < 0.6 and denoised > 0.95
    # no pairwise term: the graph cut is the plain threshold
    np.testing.assert_array_equal(mrf_mask(jmap, smoothness=0, sigma=0, power=1),
                                  jacobian_mask(jmap, sigma=0, power=1))
    assert not mrf_mask(np.zeros((8, 8))).any()
    # mean IU of foreground and background, by hand: fg 2/4, bg 12/14
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, :3], b[0, 1:4] = True, True
    assert mean_iu(a, b) == pytest.approx(0.5 * (2 / 4 + 12 / 14))
    img = np.zeros((2, 16, 16))
    img[1, 4:8, 4:8] = 5.0
    assert otsu_foreground(img, [1], sigma=0).sum() == 16


def test_cluttered_digits_hold_the_counts_per_class():
    # "digits": 3x3 squares whose value names the class, so a canvas can be counted
    labels = np.repeat(np.arange(10), 4)
    digits = np.stack([np.full((3, 3), (c + 1) / 10) for c in labels])
    cfg = DigitsConfig(size=160, n_digits=12, per_class=3, classes=(1, 2, 3, 4),
                       train_per_class=2, test_per_class=1, seed=1)
    canvases, table = cluttered_digits(digits, labels, cfg)
    assert canvases.shape == (12, 1, 160, 160) and len(table) == 12
    assert (table["Metadata_split"] == "train").sum() == 8
    for img, (_, row) in zip(canvases, table.iterrows()):
        d = int(row["Metadata_label"])
        values = np.round(img[0] * 10).astype(int)
        # 9 pixels per square: the class's squares and the zeros' (value 1) squares
        assert (values == d + 1).sum() == 9 * 3 * d
        assert (values == 1).sum() == 9 * (12 - 3 * d)
        assert set(np.unique(values)) <= {0, 1, d + 1}
    with pytest.raises(InputError, match="class"):
        cluttered_digits(digits[labels != 0], labels[labels != 0], cfg)


def test_train_mil_frozen_trunk_caches_its_maps(tmp_path, tiny_screen, capsys):
    folder, _ = tiny_screen
    text = f"""\
data: {{source: index, path: {folder / 'index.parquet'}}}
select: {{Metadata_control: ['False']}}
images: {{size: 64, normalization: percentile, crop: 48}}
mil: {{trunk: tf_efficientnet_lite0, stage: 2, weights: offline, hidden: 16,
      jacobian_images: 1, cache: maps}}
train: {{epochs: 1, batch_size: 8, lr: 0.003}}
cv: {{folds: 2}}
output: out
"""
    (tmp_path / "mil.yaml").write_text(text)
    assert main(["train", "mil", str(tmp_path / "mil.yaml"), "--quiet"]) == 0
    res = json.loads((tmp_path / "out" / "mil" / "cv.json").read_text())
    t = res["trunk"]
    assert t["frozen"] and t["stage"] == 2 and t["transforms"] == 8
    assert t["feature_maps"] == [40, 8, 8] and t["input_mean"] == [0.5, 0.5, 0.5]
    assert t["cache_compute_seconds"] > 0
    assert res["treatment_aggregation"] == "median"
    assert (tmp_path / "maps" / "maps.npy").is_file()
    assert len(res["jacobian_overlays"]) == 1
    # the trained network of a fold, whole (frozen trunk + trained head), reloaded
    from morphoprof.train import load_trained_mil

    net, mean, std = load_trained_mil(tmp_path / "out", 1)
    assert mean == (0.5, 0.5, 0.5) and not net.training
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64))["maps"].shape == (1, 3, 8, 8)
    # segmenting fields with the run: fold 1's maps of two of the run's own fields, and their
    # contrast-sensitive masks, as computed by hand from the same network
    from morphoprof.train import segment_with_mil

    maps, masks = segment_with_mil(tmp_path / "out", rows=[0, 3], fold=1)
    assert maps.shape == masks.shape == (2, 64, 64) and masks.dtype == bool
    assert (maps >= 0).all() and maps.reshape(2, -1).max(1).min() > 0
    from morphoprof.datasets.source import build_index_from_config
    from morphoprof.index.schema import ExperimentIndex, select_rows
    from morphoprof.models.data import load_images

    cfg, _ = load_train_config(tmp_path / "out" / "train_mil.yaml", "mil")
    index = select_rows(build_index_from_config(cfg.data, tmp_path / "out"), cfg.select)
    fields = load_images(index, [0, 3], size=64, normalization="percentile")
    x = (torch.from_numpy(fields) - 0.5) / 0.5
    np.testing.assert_allclose(maps, jacobian_maps(net, x), rtol=1e-4,
                               atol=1e-6 * maps.max())
    for f, j, mask in zip(fields, maps, masks):
        np.testing.assert_array_equal(mask, mrf_mask(j, image=f))
    _, fourth_root = segment_with_mil(tmp_path / "out", rows=[0, 3], fold=1, power=0.25,
                                      smoothness=2.0)
    for f, j, mask in zip(fields, maps, fourth_root):
        np.testing.assert_array_equal(mask, mrf_mask(j, 2.0, power=0.25, image=f))
    with pytest.raises(InputError, match="no rows"):
        segment_with_mil(tmp_path / "out", rows=[])
    fewer = ExperimentIndex(index.table.drop(columns=[f"Path_{index.channels[0]}"]),
                            index.root)
    with pytest.raises(InputError, match="has 2 channels .* trained on 3"):
        segment_with_mil(tmp_path / "out", fewer)
    capsys.readouterr()
    (tmp_path / "mil.yaml").write_text(text.replace("output: out", "output: out2"))
    assert main(["train", "mil", str(tmp_path / "mil.yaml")]) == 0
    assert "reusing" in capsys.readouterr().err
    # the last stage trained too, on cached maps of its input; each fold starts from the
    # pretrained stage, and the reloaded network carries the trained one
    (tmp_path / "mil.yaml").write_text(text.replace("output: out", "output: out3").replace(
        "cache: maps", "cache: maps3, unfreeze_last_stage: true"))
    assert main(["train", "mil", str(tmp_path / "mil.yaml"), "--quiet"]) == 0
    t3 = json.loads((tmp_path / "out3" / "mil" / "cv.json").read_text())["trunk"]
    assert t3["trained_last_stage"] and t3["feature_maps"] == [24, 16, 16]  # blocks.1: 1/4
    trained, _, _ = load_trained_mil(tmp_path / "out3", 1)
    pretrained = MILNet(MILConfig(n_classes=3, trunk="tf_efficientnet_lite0", stage=2,
                                  weights="offline", hidden=16, dropout=0.0)).eval()
    w_new = trained.trunk.last_stage.state_dict()
    w_old = pretrained.trunk.last_stage.state_dict()
    assert any(not torch.equal(w_new[k], w_old[k]) for k in w_old if w_old[k].is_floating_point())
    for k, v in trained.trunk.state_dict().items():  # the rest of the trunk stays pretrained
        if not k.startswith("body.blocks.2"):
            assert torch.equal(v, pretrained.trunk.state_dict()[k]), k
    with torch.no_grad():
        assert trained(torch.zeros(1, 3, 64, 64))["maps"].shape == (1, 3, 8, 8)
    capsys.readouterr()
    (tmp_path / "mil.yaml").write_text(text.replace("cache: maps", "cache: maps, frozen: false, "
                                                    "unfreeze_last_stage: true"))
    assert main(["train", "mil", str(tmp_path / "mil.yaml"), "--quiet"]) == 2
    assert "mil.unfreeze_last_stage" in capsys.readouterr().err
    # a from-scratch trunk cannot be frozen
    (tmp_path / "mil.yaml").write_text(text.replace("trunk: tf_efficientnet_lite0",
                                                    "trunk: kraus, frozen: true"))
    assert main(["train", "mil", str(tmp_path / "mil.yaml"), "--quiet"]) == 2
    assert "mil.frozen" in capsys.readouterr().err
