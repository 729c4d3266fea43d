import datetime

import numpy as np
import pytest
import timm
import torch
from skimage import data

from morphoprof.errors import InputError
from morphoprof.features.backbones import _load_offline, create_backbone, offline_weights_path

EGYPTIAN_CAT, TABBY, TIGER_CAT = 285, 281, 282


def _cat_logits(model):
    img = torch.from_numpy(data.chelsea().astype(np.float32) / 255).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        return model((x - 0.5) / 0.5)[0]


def test_offline_weights_are_imagenet_weights():
    assert offline_weights_path("tf_efficientnet_lite0") is not None
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    _load_offline(model, "tf_efficientnet_lite0")
    top = _cat_logits(model).softmax(-1)
    assert int(top.argmax()) in (EGYPTIAN_CAT, TABBY, TIGER_CAT)
    assert float(top[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum()) > 0.5
    random = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    rtop = _cat_logits(random).softmax(-1)
    assert float(rtop[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum()) < 0.05


def test_create_backbone_returns_pooled_features():
    b = create_backbone("efficientnet_lite0", weights="auto")
    assert b.name == "tf_efficientnet_lite0" and b.weights.startswith("offline:")
    assert b.mean == (0.5, 0.5, 0.5) and b.input_size == (224, 224)
    with torch.inference_mode():
        out = b.model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, b.num_features) == (2, 1280)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    b = create_backbone("resnet18", weights="random", seed=1)
    torch.save({"state_dict": b.model.state_dict()}, tmp_path / "r18.pth")
    again = create_backbone("resnet18", weights=str(tmp_path / "r18.pth"))
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(b.model(x), again.model(x))
    with pytest.raises(InputError, match="checkpoint not found"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(InputError, match="does not fit"):
        create_backbone("tf_efficientnet_lite0", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(InputError, match="unknown model"):
        create_backbone("no_such_net", weights="random")
    with pytest.raises(InputError, match="offline weights"):
        create_backbone("resnet18", weights="offline")


def test_an_unreadable_weights_file_is_one_line_naming_it(tmp_path):
    """Files that are not torch.save's or safetensors', or hold other Python objects: one line
    saying why (torch's own message is a paragraph advising weights_only=False), and a
    morphoprof Lightning-style checkpoint still loads."""
    (tmp_path / "text.pth").write_text("crop,Metadata_Plate\n")  # a CSV: pickle opcode 'c'
    torch.save({"w": torch.zeros(2), "when": datetime.date(2026, 1, 1)}, tmp_path / "obj.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    for name, says in [("text.pth", "not a file torch.save wrote"),
                       ("obj.pth", "a Python object (datetime.date) besides tensors"),
                       ("bad.safetensors", "cannot read checkpoint")]:
        with pytest.raises(InputError) as got:
            create_backbone("resnet18", weights=str(tmp_path / name))
        text = str(got.value)
        assert name in text and says in text and "\n" not in text, text
        assert "weights_only" not in text


def _hf_cache_with(tmp_path, repo: str, state: dict):
    """A huggingface_hub cache folder holding ``state`` as ``repo``'s model.safetensors."""
    from safetensors.torch import save_file

    commit = "0" * 40
    root = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(root / "snapshots" / commit / "model.safetensors"))
    return tmp_path / "hf"


def test_hub_weights_offline_come_from_the_cache_or_fail_fast(tmp_path, monkeypatch):
    """Where the model hub does not answer, hub weights are read from the local cache without
    huggingface_hub's retries (~50 s of them before), and a model not in it is one line."""
    import time

    from huggingface_hub import constants

    from morphoprof.features import backbones

    monkeypatch.setattr(backbones, "hub_reachable", lambda *a, **k: False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    before = constants.HF_HUB_OFFLINE
    saved = timm.create_model("resnet18", pretrained=False).state_dict()
    saved = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in saved.items()}
    monkeypatch.setattr(constants, "HF_HUB_CACHE",
                        str(_hf_cache_with(tmp_path, "timm/resnet18.a1_in1k", saved)))
    t0 = time.perf_counter()
    b = create_backbone("resnet18", weights="imagenet")  # from the cache, offline
    assert torch.equal(b.model.conv1.weight, saved["conv1.weight"])
    with pytest.raises(InputError, match="not reachable from this machine and they are not in"):
        create_backbone("resnet34", weights="imagenet")
    assert time.perf_counter() - t0 < 20
    assert constants.HF_HUB_OFFLINE == before  # the switch is put back


def test_hub_reachable_probes_a_port():
    import socket

    from morphoprof.features.backbones import hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub_reachable(f"http://127.0.0.1:{port}", timeout=2)
    assert not hub_reachable(f"http://127.0.0.1:{port}", timeout=2)  # closed now
