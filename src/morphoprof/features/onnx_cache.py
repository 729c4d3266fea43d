"""A disk cache of the ONNX graphs :class:`~morphoprof.features.transfer.TransferExtractor`
exports for ONNX Runtime.

Exporting EfficientNet-Lite0 takes about 1 s a run (0.6 s of it importing ``onnx``), 7% of
extracting the 660 6-MoA fields. The graph depends only on the network (its structure and
weights), the input shape and the library versions, so it is kept under
``$MORPHOPROF_CACHE/onnx/<key>.onnx`` (default ``~/.cache/morphoprof``, or
``$XDG_CACHE_HOME/morphoprof``) and later runs load it. ``MORPHOPROF_CACHE=off`` turns the cache
off. The cache is an optimisation only: a folder that cannot be written, or a file that cannot
be read or loaded, is logged and the graph exported as without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from morphoprof import __version__
from morphoprof.errors import OutputError
from morphoprof.io_utils import atomic_path

logger = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """The folder of exported graphs, or None where ``MORPHOPROF_CACHE=off``."""
    root = os.environ.get("MORPHOPROF_CACHE", "")
    if root.lower() in ("off", "0", "none"):
        return None
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "morphoprof"
    return Path(root) / "onnx"


def graph_key(graph, input_shape: tuple[int, ...], grey: bool, extra: str = "") -> str:
    """A digest of everything the exported graph depends on: the module's structure
    (``repr``), every parameter and buffer (names, shapes, values), the input's (C, H, W), the
    greyscale flag, the versions of morphoprof, torch, timm and ONNX Runtime, and ``extra``
    (what ``repr`` does not show, such as the layer a forward hook reads)."""
    import onnxruntime
    import timm
    import torch

    h = hashlib.blake2b(digest_size=20)
    for part in (__version__, torch.__version__, timm.__version__, onnxruntime.__version__,
                 repr(graph), repr(tuple(input_shape)), repr(bool(grey)), extra):
        h.update(part.encode())
        h.update(b"\0")
    for name, tensor in graph.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load(key: str) -> bytes | None:
    """The cached graph of ``key``, or None (no cache, not cached, or unreadable)."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.onnx"
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError as exc:
        logger.debug(f"ONNX cache: cannot read {path} ({exc}); exporting")
        return None


def store(key: str, data: bytes) -> Path | None:
    """Keep ``data`` as the graph of ``key`` (written atomically); the path, or None where
    there is no cache or it cannot be written (logged, not raised)."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.onnx"
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except (OSError, OutputError) as exc:
        logger.debug(f"ONNX cache: cannot write {path} ({exc})")
        return None
    return path


def discard(key: str) -> None:
    """Remove the cached graph of ``key`` (one that ONNX Runtime refused to load)."""
    folder = cache_dir()
    if folder is not None:
        try:
            (folder / f"{key}.onnx").unlink(missing_ok=True)
        except OSError as exc:
            logger.debug(f"ONNX cache: cannot remove a bad graph ({exc})")
