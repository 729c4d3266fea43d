"""ImageNet transfer features without segmentation (Pawlowski et al. 2016).

A pretrained CNN, not fine-tuned, is applied to whole fields of view. With the ``greyscale``
strategy (Pawlowski's best) each stain is fed as a greyscale image replicated to the network's
three inputs and the per-stain feature vectors are concatenated in channel order; with ``rgb``,
three stains are mapped to R, G and B. Features are the pooled penultimate layer by default, or any
named intermediate module, global-average pooled.

Intensities are mapped to [0, 1] per channel with one range for the whole experiment (low and high
percentiles of a deterministic sample of image sets), so differences in brightness between fields
survive; the range is stored with the features so a resumed run uses the same one.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from morphoprof.errors import InputError
from morphoprof.features import onnx_cache
from morphoprof.features.backbones import DEFAULT_MODEL, Backbone, create_backbone
from morphoprof.index.schema import IMAGE_SET_KEY, PLATE, ExperimentIndex
from morphoprof.io_utils import RowBuffer
from morphoprof.prefetch import Prefetched
from morphoprof.preprocess.crops import CropDataset, cell_table_identity, normalize_crops
from morphoprof.registry import register_extractor, settings_for
from morphoprof.settings import ON_ERROR_DEFAULT, OnError, Settings
from morphoprof.shards import RunSummary, ShardRun, ShardWriter, plate_shards, run_shards


class TransferConfig(Settings):
    """Settings of the transfer extractor: the ``features`` section of a run config and the
    options of ``morphoprof extract``."""

    model: str = Field(DEFAULT_MODEL, description="any timm model name")
    weights: str = Field("auto", description="auto | offline | imagenet | random | path to a "
                         "checkpoint")
    channel_strategy: Literal["greyscale", "rgb", "native"] = Field(
        "greyscale", description="greyscale: each stain alone, features concatenated; rgb: "
        "three stains as R, G, B; native: all stains at once")
    rgb_channels: list[str] | None = Field(None, description="rgb: the 3 stains fed as R, G, B "
                                           "(default: the first three)")
    layer: str | None = Field(None, description="module to read features from (default: the "
                              "pooled penultimate layer)")
    tiles: int = Field(1, ge=1, description="tiles per side: the field is cut into tiles x "
                       "tiles, features averaged")
    in_chans: int | None = Field(None, ge=1, description="native: input channels (default: "
                                 "the number of channels, or 3)")
    # CPU: trace + freeze the network per input shape (fuses conv and BN; ~1.4x faster, but a
    # trace costs ~10 s): True, False, or "auto" = only for runs of >= 4000 network inputs.
    jit: bool | Literal["auto"] = Field("auto", description="CPU: trace and freeze the network "
                                        "(auto: for runs of >= 4000 network inputs)")
    # CPU inference engine: "torch", "onnxruntime" (the network exported to ONNX once per input
    # shape (~1 s) and run by ONNX Runtime: on 2 cores ~1.3x torch's traced graph for
    # EfficientNet-B0 / Lite0, ~2x torch eager; features equal to torch's to ~1e-6) or
    # "auto" = onnxruntime for runs of >= 500 network inputs, in fp32 on CPU, where the network
    # exports (else torch). CUDA always runs torch.
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="CPU engine: auto = ONNX Runtime for runs of >= 500 network inputs "
        "(~1.3x torch's traced graph, same features to ~1e-6), else torch")
    # arithmetic of the network: "auto" = bfloat16 on CUDA, float32 on CPU; "bf16" also on CPU,
    # where CPUs with AMX / AVX512-BF16 run dense convolutions (ResNet) 2-3x faster (depthwise
    # ones, EfficientNet, barely); "fp32" everywhere. bf16 features keep a cosine of > 0.99 to
    # the fp32 ones (relative difference ~0.5% for a ResNet18 at layer3, ~7% for Lite0).
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="network arithmetic: auto = bf16 on CUDA, fp32 on CPU; bf16 on a "
        "CPU with AMX / AVX512-BF16 runs dense CNNs (a weak ResNet) 2-3x faster")
    image_size: int | None = Field(None, ge=1, description="resize fields to this, px "
                                   "(default: the network's input size)")
    intensity_percentiles: tuple[float, float] = Field(
        (0.1, 99.9), strict=False, description="low and high percentiles of a sample of image "
        "sets that map each channel to [0, 1]")
    batch_size: int = Field(16, ge=1, description="images per network batch")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    device: str = Field("auto", description="auto | cpu | cuda")
    max_shard_rows: int = Field(2000, ge=1, description="image sets per feature shard, at most "
                                "(a larger plate is split)")
    min_shard_rows: int = Field(128, ge=1, description="plates of fewer image sets are packed "
                                "into one shard up to this many (a shard file has a fixed cost; "
                                "a screen keeps about 8 shards or more)")
    label: str = Field("transfer", description="prefix of the feature columns")
    channels: list[str] | None = Field(None, description="stains to use (default: all of the "
                                       "index)")
    seed: int = Field(0, description="seed of the intensity sample and of torch")
    on_error: OnError = Field(
        ON_ERROR_DEFAULT, description="an unreadable image set, or one with NaN / inf pixels: fail "
        "(stop, naming it) or skip (leave it out, listed in the run summary and the manifest)")


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def estimate_intensity_range(
    index: ExperimentIndex,
    channels: Sequence[str],
    percentiles: tuple[float, float] = (0.1, 99.9),
    n_sample: int = 24,
    seed: int = 0,
    illumination=None,
    on_error: str = "fail",
) -> list[tuple[float, float]]:
    """Per-channel (low, high) intensity from a deterministic sample of ``n_sample`` image sets
    (after illumination correction when ``illumination`` is given). Unreadable or non-finite
    image sets raise (naming the row and file), or with ``on_error="skip"`` are left out of the
    sample (extraction reports them)."""
    from morphoprof.preprocess.fields import ImageSetDataset

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(index), size=min(n_sample, len(index)), replace=False))
    pixels: list[list[np.ndarray]] = [[] for _ in channels]
    sample = ImageSetDataset(index, channels, rows, None, illumination, on_error)
    for _, img in sample.arrays():
        flat = img.reshape(len(channels), -1)
        step = max(flat.shape[1] // 20000, 1)
        for c in range(len(channels)):
            pixels[c].append(flat[c, ::step])
    out = []
    for c, ch in enumerate(channels):
        if not pixels[c]:
            raise InputError(f"channel {ch}: none of the {len(rows)} sampled image sets could "
                             "be read")
        lo, hi = np.percentile(np.concatenate(pixels[c]), percentiles)
        if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
            raise InputError(f"channel {ch}: sampled images have no usable intensity range")
        out.append((float(lo), float(hi)))
    return out


def ort_layout(threads: int) -> tuple[int, int]:
    """How ONNX Runtime uses ``threads`` CPU threads: ``(sessions, threads per session)``. Two
    sessions run the two halves of each batch side by side: with one multi-threaded session,
    every operator waits at a barrier for all its threads, so a reader thread that takes a
    core stalls them all (measured on 2 cores with a reader beside the network: 132 vs 112
    Lite0 inputs/s; alone, 162 vs 160)."""
    workers = 2 if threads >= 2 else 1
    return workers, max(1, threads // workers)


class _SessionPool:
    """ONNX Runtime sessions of one graph; :meth:`run` splits a batch between them and runs
    the parts at once (ONNX Runtime releases the GIL), results in batch order."""

    def __init__(self, sessions: list) -> None:
        self.sessions = sessions
        self._pool = None
        if len(sessions) > 1:
            self._pool = ThreadPoolExecutor(len(sessions), thread_name_prefix="onnxruntime")

    def run(self, x: np.ndarray) -> np.ndarray:
        """The graph's first output for the batch ``x``."""
        parts = min(len(self.sessions), len(x))
        if parts <= 1 or self._pool is None:
            return self.sessions[0].run(None, {"x": x})[0]
        chunks = np.array_split(x, parts)
        outs = self._pool.map(lambda sc: sc[0].run(None, {"x": sc[1]})[0],
                              zip(self.sessions, chunks, strict=False))
        return np.concatenate(list(outs))


class FieldTransform:
    """Scale intensities to [0, 1] with fixed per-channel ranges and resize to ``size``.

    Picklable, so DataLoader workers run it. Input ``(C, H, W)`` numpy; output torch ``(C, S, S)``.
    """

    def __init__(self, ranges: Sequence[tuple[float, float]], size: tuple[int, int]) -> None:
        self.lo = np.array([r[0] for r in ranges], np.float32)[:, None, None]
        self.span = np.array([r[1] - r[0] for r in ranges], np.float32)[:, None, None]
        self.size = tuple(size)

    def __call__(self, image: np.ndarray):
        import torch
        import torch.nn.functional as F

        x = np.clip((image - self.lo) / self.span, 0.0, 1.0)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        if tuple(t.shape[-2:]) != self.size:
            t = F.interpolate(t, size=self.size, mode="bilinear", antialias=True,
                              align_corners=False)
        return t[0]


class TransferExtractor:
    """Extract transfer features from whole fields of an experiment index.

    Use :meth:`features_from_batch` on in-memory tensors, or :meth:`extract` on an index to write
    a resumable feature folder.
    """

    def __init__(self, cfg: TransferConfig | None = None, backbone: Backbone | None = None):
        import torch

        self.cfg = cfg or TransferConfig()
        in_chans = 3
        if self.cfg.channel_strategy == "native":
            in_chans = self.cfg.in_chans or (len(self.cfg.channels) if self.cfg.channels else 3)
        self.backbone = backbone or create_backbone(
            self.cfg.model, self.cfg.weights, in_chans=in_chans, seed=self.cfg.seed
        )
        self.device = pick_device(self.cfg.device)
        # channels_last helps on GPU and on CPU (oneDNN), most for depthwise convolutions.
        self.model = self.backbone.model.to(self.device).to(memory_format=torch.channels_last)
        self._traced: dict[tuple[int, ...], object] = {}
        self._jit = self.cfg.jit is True
        self._sessions: dict[tuple[int, ...], object] = {}
        self._ort = self.cfg.backend == "onnxruntime"
        size = self.cfg.image_size
        self.size = (size, size) if size else self.backbone.input_size
        self._mean = torch.tensor(self.backbone.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.backbone.std, device=self.device).view(1, 3, 1, 1)
        self.net = self.model  # what runs: the network, or its graph cut at ``layer``
        if self.cfg.layer:
            modules = dict(self.model.named_modules())
            if self.cfg.layer not in modules:
                names = [n for n in modules if n and n.count(".") <= 1]
                raise InputError(
                    f"layer {self.cfg.layer!r} not in {self.backbone.name}; e.g. {names[:25]}"
                )
            self.net = _cut_at(self.model, self.cfg.layer)

    def _traced_model(self, x):
        """The network traced and frozen for inputs of ``x``'s (C, H, W); cached per shape, so
        shape-dependent code (TF 'same' padding) is always traced at the size it runs at."""
        import torch

        key = tuple(x.shape[1:])
        if key not in self._traced:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._traced[key] = torch.jit.freeze(torch.jit.trace(self.net.eval(), x))
        return self._traced[key]

    def choose_engine(self, inputs: int) -> str:
        """Settle the ``auto`` choices for a run of ``inputs`` network inputs: ONNX Runtime
        from 500 (an export costs ~1 s), torch's traced graph from 4000 (a trace ~10 s).
        Returns the engine: ``onnxruntime``, ``torch-jit`` or ``torch``."""
        if self.cfg.jit == "auto":
            self._jit = inputs >= 4000
        if self.cfg.backend == "auto":  # a missing onnxruntime falls back in _session
            self._ort = inputs >= 500 and self.cfg.precision != "bf16"
        return self.engine

    @property
    def _bf16(self) -> bool:
        return self.cfg.precision == "bf16" or (self.device == "cuda"
                                                and self.cfg.precision == "auto")

    @property
    def engine(self) -> str:
        """What runs the network on this device now: onnxruntime, torch-jit or torch."""
        if self._bf16 or self.device == "cuda":
            return "torch"
        return "onnxruntime" if self._ort else "torch-jit" if self._jit else "torch"

    def _input_stats(self, channels: int):
        """The (mean, std) the network's input is normalised with: ImageNet's for 3 inputs,
        0.5 / 0.5 for other native channel counts; each ``(1, C or 3, 1, 1)``."""
        if self.cfg.channel_strategy == "native" and channels != 3:
            return 0.5, 0.5
        return self._mean, self._std

    def _session(self, x, grey: bool = False):
        """An ONNX Runtime session of the normalisation and the network for inputs of ``x``'s
        (C, H, W) (batch size free; ``grey``: one stain, replicated to 3 inputs in the graph),
        exported once per shape; ``None`` (and torch from then on) where the network does not
        export and the backend is ``auto``."""
        import torch

        key = (*x.shape[1:], grey)
        if key not in self._sessions:
            try:
                import onnxruntime as ort

                mean, std = self._input_stats(3 if grey else x.shape[1])
                graph = _normalised_module()(self.net, mean, std, grey).eval()
                cache_key = onnx_cache.graph_key(graph, tuple(x.shape[1:]), grey,
                                                   extra=f"layer={self.cfg.layer}")
                exported = onnx_cache.load(cache_key)
                workers, threads = ort_layout(torch.get_num_threads())
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                # memory patterns are kept per input shape, and the batch sizes vary with the
                # shards: with them, extraction's peak grew with the screen (1.22 GB at 60
                # fields, 1.44 GB at 660); without, 1.20 / 1.29 GB at ~8% of the speed
                opts.enable_mem_pattern = False

                def open_session(graph_bytes: bytes):
                    return ort.InferenceSession(graph_bytes, opts,
                                                providers=["CPUExecutionProvider"])

                session = None
                if exported is not None:
                    try:
                        session = open_session(exported)
                    except Exception:  # a damaged cache file: exported again below
                        onnx_cache.discard(cache_key)
                if session is None:
                    exported = _export_onnx(graph, tuple(x.shape[1:]))
                    session = open_session(exported)
                    onnx_cache.store(cache_key, exported)
                self._sessions[key] = _SessionPool(
                    [session] + [open_session(exported) for _ in range(workers - 1)])
            except Exception as exc:
                if self.cfg.backend == "onnxruntime":
                    raise InputError(f"{self.backbone.name} cannot run on ONNX Runtime "
                                     f"({type(exc).__name__}: {exc}); use backend torch"
                                     ) from exc
                self._ort = False
                return None
        return self._sessions[key]

    @property
    def model_in_chans(self) -> int:
        """Input channels of the network's first convolution."""
        import torch

        for m in self.model.modules():
            if isinstance(m, torch.nn.Conv2d):
                return int(m.in_channels)
        return 3

    def check_channels(self, channel_names: Sequence[str]) -> None:
        """Raise InputError (before any work) if the channels do not fit the strategy and model."""
        names = list(channel_names)
        if not names:
            raise InputError("no channels to extract features from")
        s = self.cfg.channel_strategy
        if s in ("greyscale", "rgb") and self.model_in_chans != 3:
            raise InputError(
                f"{self.backbone.name} takes {self.model_in_chans} input channels; the {s} "
                "strategy feeds 3 (use channel_strategy='native')"
            )
        if s == "rgb":
            order = self.cfg.rgb_channels or names[:3]
            missing = [c for c in order if c not in names]
            if len(order) != 3 or missing:
                raise InputError(
                    f"rgb strategy needs 3 of the channels {names} as R, G, B; got {order}"
                )
        if s == "native" and len(names) != self.model_in_chans:
            raise InputError(
                f"{self.backbone.name} takes {self.model_in_chans} input channels, the images "
                f"have {len(names)} ({', '.join(names)})"
            )

    def _embed(self, x3):
        """(N, 3, S, S) in [0, 1] -> (N, D) pooled features (native: (N, C, S, S)).

        On CPU the network sees at most ``batch_size`` inputs at a time (greyscale makes C of
        them per field), so its activations, the largest memory of extraction, stay the size
        of one batch of inputs."""
        import torch

        step = self.cfg.batch_size
        if self.device != "cuda" and x3.shape[0] > step:
            # even parts (18 inputs, batch 16: 9 + 9, not 16 + 2: a tiny tail batch leaves
            # the cores idle)
            step = -(-len(x3) // -(-len(x3) // step))
            return torch.cat([self._embed(x3[i:i + step]) for i in range(0, len(x3), step)])
        if self.engine == "onnxruntime":
            # the ONNX graph normalises (and, for greyscale, replicates the one stain to three
            # inputs) itself: the raw batch goes in without a copy
            grey = x3.shape[1] == 3 and x3.stride(1) == 0
            inp = x3[:, :1] if grey else x3
            sessions = self._session(inp, grey)
            if sessions is not None:
                y = sessions.run(np.ascontiguousarray(inp.numpy()))
                return torch.from_numpy(y).reshape(len(y), -1)
        mean, std = self._input_stats(x3.shape[1])
        x3 = ((x3 - mean) / std).contiguous(memory_format=torch.channels_last)
        if self._bf16:
            with torch.autocast(self.device, dtype=torch.bfloat16):
                out = self.net(x3)
        elif self.engine == "torch-jit":
            out = self._traced_model(x3)(x3)
        else:
            out = self.net(x3)
        return out.float()

    def features_from_batch(self, batch, channel_names: Sequence[str]) -> np.ndarray:
        """Features of a batch of fields.

        Args:
            batch: torch tensor ``(B, C, S*t, S*t)`` with intensities in [0, 1], t = ``tiles``.
            channel_names: names of the C channels.

        Returns:
            ``(B, C * D)`` float32 for ``greyscale``; ``(B, D)`` for ``rgb`` and ``native``;
            with tiles, the mean over each field's t*t tiles.
        """
        import torch

        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).float()
            t = self.cfg.tiles
            b, c, h, w = x.shape
            if t > 1:  # (B, C, t*S, t*S) -> (B*t*t, C, S, S)
                x = x.reshape(b, c, t, h // t, t, w // t).permute(0, 2, 4, 1, 3, 5)
                x = x.reshape(b * t * t, c, h // t, w // t)
            n = x.shape[0]
            if self.cfg.channel_strategy == "greyscale":
                x3 = x.reshape(n * c, 1, *x.shape[-2:]).expand(-1, 3, -1, -1)
                f = self._embed(x3).reshape(n, -1)
            elif self.cfg.channel_strategy == "native":
                f = self._embed(x)
            else:
                order = self.cfg.rgb_channels or list(channel_names)[:3]
                idx = [list(channel_names).index(ch) for ch in order]
                f = self._embed(x[:, idx])
            if t > 1:
                f = f.reshape(b, t * t, -1).mean(dim=1)
            return f.cpu().numpy()

    def column_names(self, channel_names: Sequence[str], dim: int) -> list[str]:
        """``<label>_<channel>_<k>`` for greyscale, ``<label>_RGB_<k>`` for rgb,
        ``<label>_all_<k>`` for native."""
        label = self.cfg.label
        if self.cfg.channel_strategy in ("rgb", "native"):
            tag = "RGB" if self.cfg.channel_strategy == "rgb" else "all"
            return [f"{label}_{tag}_{k}" for k in range(dim)]
        per = dim // len(channel_names)
        return [f"{label}_{ch}_{k}" for ch in channel_names for k in range(per)]

    def extract(
        self,
        index: ExperimentIndex,
        out: str | Path,
        overwrite: bool = False,
        illumination=None,
        scheduler: str | None = None,
    ) -> RunSummary:
        """Extract features for every image set of ``index`` into the feature folder ``out``.

        ``scheduler`` (``local:N`` or a Dask scheduler address) runs one Dask task per shard
        (see :mod:`morphoprof.distributed`); the output is the same as in-process.

        ``illumination`` (an :class:`~morphoprof.preprocess.illumination.IlluminationCorrection`)
        divides each field by its plate's illumination function first.

        One Parquet shard per plate (split every ``max_shard_rows`` image sets; plates of fewer
        than ``min_shard_rows`` packed together, see :func:`morphoprof.shards.plate_shards`);
        shards finished by an earlier run with the same parameters are skipped.

        Returns:
            The :class:`~morphoprof.shards.RunSummary`: shards written and skipped, image
            sets, seconds, fields per second (also ``out/run_summary.json``).
        """
        import torch

        channels = list(self.cfg.channels or index.channels)
        index.validate(channels=channels, check_files=False, check_shapes=False)
        self.check_channels(channels)
        out = Path(out)
        params = {
            "extractor": "transfer",
            # run-time settings that do not change the features are left out
            **{k: v for k, v in self.cfg.model_dump().items()
               if k not in ("num_workers", "device", "batch_size", "jit", "backend",
                             "on_error")},
            "channels": channels,
            "model": self.backbone.name,
            "weights": self.backbone.weights,
            "size": list(self.size),
            "n_image_sets": len(index),
            "index": index.digest(images_only=True),  # annotations: refreshed below
            "illumination": str(illumination.folder) if illumination is not None else None,
        }
        saved_ranges = _saved_ranges(out, params)
        ranges = saved_ranges or estimate_intensity_range(
            index, channels, self.cfg.intensity_percentiles, seed=self.cfg.seed,
            illumination=illumination, on_error=self.cfg.on_error,
        )
        params["intensity_ranges"] = [list(r) for r in ranges]
        writer = ShardWriter(out, params, overwrite=overwrite)
        writer.refresh_metadata(index.metadata(), IMAGE_SET_KEY)
        t = self.cfg.tiles
        transform = FieldTransform(ranges, (self.size[0] * t, self.size[1] * t))
        plan = plate_shards(index.table[PLATE], self.cfg.min_shard_rows, self.cfg.max_shard_rows)
        n_todo = int(sum(len(r) for key, r in plan if not writer.done(key)))
        torch.manual_seed(self.cfg.seed)
        context = (channels, transform, illumination, n_todo)
        # on Dask each worker builds its extractor once from (cfg, backbone); in process the
        # next shard's first batches are read while this one is computed (``prepare``)
        run = run_shards(
            plan, _transfer_shard, writer, scheduler,
            shared={"spec": (self.cfg, self.backbone) if scheduler else self, "index": index,
                    "context": context},
            prepare=None if scheduler else
            (lambda rows: _Reader(self, index, rows, channels, transform, illumination)),
            desc="transfer features", unit="field")
        return writer.finish(run, self.cfg.on_error, image_sets=run.items)

    def field_dataset(self, index: ExperimentIndex, rows, channels: Sequence[str], transform,
                      illumination=None):
        """The Dataset of whole fields :meth:`field_shard` reads for index rows ``rows``."""
        from morphoprof.preprocess.fields import ImageSetDataset

        return ImageSetDataset(index, channels, rows, transform, illumination,
                               self.cfg.on_error)

    def field_shard(self, index: ExperimentIndex, rows, channels: Sequence[str], transform,
                    illumination=None, bar=None, run_size: int | None = None, reader=None
                    ) -> tuple[pd.DataFrame, list[dict]]:
        """One shard: the ``Metadata_*`` columns and features of index rows ``rows``, and the
        image sets skipped under ``on_error="skip"`` (``[{"row", "reason"}]``). ``reader``:
        ``(dataset, batches)`` of these rows already started (:meth:`field_dataset`,
        :meth:`batches`)."""
        ds, batches = reader or (self.field_dataset(index, rows, channels, transform,
                                                    illumination), None)
        x, pos = self.features_for_dataset(ds, channels, bar, run_size=run_size,
                                           batches=batches)
        skipped = [{"row": r, "reason": m} for r, m in self.skipped]
        meta_cols = [c for c in index.table.columns if c.startswith("Metadata_")]
        meta = index.table.iloc[pos][meta_cols].reset_index(drop=True)
        if not len(pos):
            return meta, skipped
        return pd.concat([meta, pd.DataFrame(x, columns=self.column_names(channels,
                                                                         x.shape[1]))],
                         axis=1), skipped

    def batches(self, dataset):
        """The batches :meth:`features_for_dataset` reads from ``dataset``: a DataLoader with
        ``num_workers`` worker processes, or (with none) one whose next batches are read in a
        thread that starts now."""
        from torch.utils.data import DataLoader

        from morphoprof.preprocess.fields import collate_skipping

        skipping = getattr(dataset, "on_error", "fail") == "skip"
        loader = DataLoader(
            dataset, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
            pin_memory=self.device == "cuda", worker_init_fn=_single_thread_worker,
            persistent_workers=False, collate_fn=collate_skipping if skipping else None,
        )
        if self.cfg.num_workers:
            return loader
        return Prefetched(loader, setup=_reader_thread_setup)

    def features_for_dataset(self, dataset, channel_names: Sequence[str], bar=None,
                             run_size: int | None = None, batches=None):
        """Run the network over a Dataset of ``(image (C, S, S) in [0, 1], key)`` items.

        Batches come from a DataLoader with ``num_workers`` worker processes (reading and
        preprocessing overlap the network). Images whose size differs from ``image_size`` (when
        set) are resized. ``run_size`` (default: the dataset's length) is the number of items of
        the whole run, for the ``jit="auto"`` decision. ``batches``: the dataset's batches
        already started with :meth:`batches` (default: started here; where given, only
        ``dataset``'s length and ``on_error`` are read). Returns ``(features
        (N, D) float32, keys (N,))`` in dataset order.
        """
        import torch.nn.functional as F

        skipping = getattr(dataset, "on_error", "fail") == "skip"
        self.skipped: list[tuple[int, str]] = []
        passes = len(channel_names) if self.cfg.channel_strategy == "greyscale" else 1
        self.choose_engine((run_size or len(dataset)) * passes * self.cfg.tiles**2)
        feats, keys = RowBuffer(len(dataset), np.float32), RowBuffer(len(dataset))
        for item in batches if batches is not None else self.batches(dataset):
            batch, key = item[:2]
            if skipping:
                self.skipped.extend(item[2])
                if bar is not None:
                    bar.update(len(item[2]))
                if batch is None:
                    continue
            if self.cfg.image_size and tuple(batch.shape[-2:]) != self.size and self.cfg.tiles == 1:
                batch = F.interpolate(batch, size=self.size, mode="bilinear", antialias=True)
            feats.add(self.features_from_batch(batch, channel_names))
            keys.add(key.numpy())
            if bar is not None:
                bar.update(len(key))
        return (feats.result(np.zeros((0, 0), np.float32)),
                keys.result(np.zeros(0, np.int64)))

    def extract_cells(
        self,
        index: ExperimentIndex,
        cells: pd.DataFrame,
        out: str | Path,
        size: int = 96,
        normalization: str = "max",
        edge: str = "pad",
        illumination=None,
        overwrite: bool = False,
    ) -> RunSummary:
        """Transfer features of single-cell crops (one row per cell of ``cells``).

        Crops are ``size`` px boxes around each nucleus (:class:`~morphoprof.preprocess.crops.
        CropDataset`), normalised per crop (``max`` by default), fed at ``size`` px unless
        ``image_size`` is set. One shard per plate; resumable like :meth:`extract`. Under
        ``on_error="skip"`` the cells of an unreadable image set are left out, each listed as
        ``{"row" (its position in ``cells``), "reason"}``; ``run_summary.json`` records the run.
        """
        channels = list(self.cfg.channels or index.channels)
        self.check_channels(channels)
        cells_digest, annotations = cell_table_identity(cells, index)
        params = {
            "extractor": "transfer_cells", "model": self.backbone.name,
            "weights": self.backbone.weights, "channels": channels, "size": size,
            "normalization": normalization, "edge": edge, "layer": self.cfg.layer,
            "strategy": self.cfg.channel_strategy, "image_size": self.cfg.image_size,
            "precision": self.cfg.precision,
            "n_cells": len(cells), "cells": cells_digest,
            "index": index.digest(images_only=True),
            "illumination": str(illumination.folder) if illumination is not None else None,
        }
        writer = ShardWriter(out, params, overwrite=overwrite)
        if annotations is not None:  # a corrected label: written into the finished shards
            writer.refresh_metadata(annotations, IMAGE_SET_KEY)
        cells = cells.reset_index(drop=True)
        order = cells.sort_values(["Metadata_plate", "Metadata_well", "Metadata_site"],
                                  kind="stable").index.to_numpy()
        cells = cells.iloc[order].reset_index(drop=True)

        def shard(rows, bar):
            ds = CropDataset(index, cells.iloc[rows], size, channels, edge, normalization,
                             illumination, on_error=self.cfg.on_error)
            x, pos = self.features_for_dataset(ds, channels, bar, run_size=bar.total)
            skipped = [{"row": int(order[rows[ds.kept[k]]]), "reason": m}
                       for k, m in self.skipped]
            return ds.cells.iloc[pos], x, skipped

        run = self._plate_shards(cells, channels, writer, shard, "cell features")
        return writer.finish(run, self.cfg.on_error, cells=run.rows)

    def _plate_shards(self, table: pd.DataFrame, channels: list[str], writer: ShardWriter,
                      shard, desc: str) -> ShardRun:
        """One feature shard per plate of ``table`` not already written: ``shard(rows, bar)``
        returns (the rows' cell table, their features, the cells it skipped as
        ``[{"row", "reason"}]``); Metadata and centre columns are kept."""

        def table_shard(rows, bar):
            meta, x, skipped = shard(rows, bar)
            meta = meta[[c for c in meta.columns
                         if str(c).startswith(("Metadata_", "Nuclei_Loc"))]]
            meta = meta.reset_index(drop=True)
            if not len(x):  # every cell of the plate skipped
                return meta, skipped
            cols = self.column_names(channels, x.shape[1])
            return pd.concat([meta, pd.DataFrame(x, columns=cols)], axis=1), skipped

        return run_shards(plate_shards(table[PLATE]), table_shard, writer, desc=desc,
                          unit="cell")

    def extract_crops(
        self,
        crops: np.ndarray,
        table: pd.DataFrame,
        channels: Sequence[str],
        out: str | Path,
        normalization: str = "max",
        overwrite: bool = False,
    ) -> RunSummary:
        """Features of crops a user already has: ``crops (N, C, S, S)`` raw intensities, one
        row of ``table`` per crop (Metadata columns kept). Crops are normalised per crop
        (``normalization``) and fed at ``S`` px unless ``image_size`` is set; one shard per
        plate, resumable, the same folder :meth:`extract_cells` writes."""
        import torch

        channels = list(channels)
        self.check_channels(channels)
        if len(crops) != len(table):
            raise InputError(f"{len(crops)} crops but {len(table)} table rows")
        params = {
            "extractor": "transfer_crops", "model": self.backbone.name,
            "weights": self.backbone.weights, "channels": channels,
            "size": int(crops.shape[-1]), "normalization": normalization,
            "layer": self.cfg.layer, "strategy": self.cfg.channel_strategy,
            "image_size": self.cfg.image_size, "n_cells": len(crops),
            "precision": self.cfg.precision,
        }
        writer = ShardWriter(out, params, overwrite=overwrite)

        def shard(rows, bar):
            size = self.cfg.batch_size

            def normalised():  # a batch at a time: no float32 copy of the plate's crops
                for k in range(0, len(rows), size):
                    yield (torch.from_numpy(normalize_crops(crops[rows[k:k + size]],
                                                            normalization)),
                           torch.arange(k, min(k + size, len(rows))))

            feats, pos = self.features_for_dataset(range(len(rows)), channels, bar,
                                                   run_size=bar.total,
                                                   batches=Prefetched(normalised(),
                                                                      setup=_reader_thread_setup))
            return table.iloc[rows[pos]], feats, []

        run = self._plate_shards(table, channels, writer, shard, "crop features")
        return writer.finish(run, "fail", cells=run.rows)


def _normalised_module():
    """The module class exported to ONNX (defined here, as torch is imported lazily)."""
    import torch

    class Normalised(torch.nn.Module):
        """``net((x - mean) / std)``, ``x`` replicated from one stain to 3 inputs if ``grey``:
        what is exported to ONNX, so ONNX Runtime also runs the input arithmetic."""

        def __init__(self, net, mean, std, grey: bool) -> None:
            super().__init__()
            self.net, self.grey = net, grey
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

        def forward(self, x):
            if self.grey:
                x = torch.cat([x, x, x], dim=1)
            return self.net((x - self.mean) / self.std)

    return Normalised


def _export_onnx(graph, input_shape: tuple[int, ...]) -> bytes:
    """``graph`` exported to ONNX for inputs ``(n, *input_shape)``, any batch size ``n``."""
    import torch

    buf = io.BytesIO()
    # exported outside inference mode (a graph traced in it comes out wrong), on a fresh
    # example: only its shape matters
    with (warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad()):
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, torch.rand(1, *input_shape), buf,
                          input_names=["x"], output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return buf.getvalue()


def _pooled(h):
    """A layer's output pooled: ``(N, C, H, W)`` -> ``(N, C)`` by the spatial mean, anything
    else flattened to ``(N, D)``."""
    return h.float().mean(dim=(2, 3)) if h.ndim == 4 else h.float().flatten(1)


def _cut_at(model, layer: str):
    """``model`` as a module that stops at ``layer`` and returns its pooled output ``(N, D)``.

    The graph is cut with timm's FX feature extractor, so the layers after ``layer`` (for a
    weak ResNet embedded at ``layer3``: all of ``layer4`` and the head) are never computed and
    the cut module can be traced and frozen like the whole network. Where a network cannot be
    FX-traced, the whole network runs and a forward hook keeps ``layer``'s output."""
    import torch

    class Cut(torch.nn.Module):
        def __init__(self, graph) -> None:
            super().__init__()
            self.graph = graph

        def forward(self, x):
            return _pooled(self.graph(x)["out"])

    class Hooked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.kept = None
            dict(model.named_modules())[layer].register_forward_hook(self._keep)

        def _keep(self, _module, _inp, out) -> None:
            self.kept = out

        def forward(self, x):
            self.model(x)
            return _pooled(self.kept)

    from timm.models import create_feature_extractor

    try:
        graph = create_feature_extractor(model, return_nodes={layer: "out"})
    except Exception:  # not FX-traceable: run it whole
        return Hooked()
    return Cut(graph).eval()


_WORKER_EXTRACTORS: dict[int, TransferExtractor] = {}


class _Reader:
    """A shard's field Dataset and its batches, started now (:meth:`TransferExtractor.batches`)
    so they are read while the shard before is computed; ``close()`` stops the reading."""

    def __init__(self, extractor: TransferExtractor, index: ExperimentIndex, rows, channels,
                 transform, illumination) -> None:
        self.dataset = extractor.field_dataset(index, rows, channels, transform, illumination)
        self.batches = extractor.batches(self.dataset)

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


def _transfer_shard(rows, bar, spec, index: ExperimentIndex, context, ahead: _Reader | None = None
                    ) -> tuple[pd.DataFrame, list[dict]]:
    """One shard of :meth:`TransferExtractor.extract` for :func:`~morphoprof.shards.run_shards`.
    ``spec``: the extractor (in process) or its ``(cfg, backbone)`` (a Dask task: the worker
    builds it once per run, with one torch thread)."""
    import torch

    channels, transform, illumination, run_size = context
    if isinstance(spec, TransferExtractor):
        extractor = spec
    else:
        cfg, backbone = spec
        torch.set_num_threads(1)
        extractor = _WORKER_EXTRACTORS.get(id(backbone))
        if extractor is None:  # once per worker and run (the scattered backbone is one object)
            _WORKER_EXTRACTORS.clear()
            extractor = _WORKER_EXTRACTORS[id(backbone)] = TransferExtractor(cfg, backbone)
        torch.manual_seed(cfg.seed)
    reader = (ahead.dataset, ahead.batches) if ahead is not None else None
    return extractor.field_shard(index, rows, channels, transform, illumination, bar,
                                 run_size, reader)


def _reader_thread_setup() -> None:
    """The reading thread's torch operations (resizing, collating) run on one thread, or they
    take the cores the network's threads are using (6-MoA fields 48-50 vs 46-48 fields/s,
    B0 crops 670-690 vs 600-670 cells/s, same process). Only under ATen's OpenMP backend,
    where the thread count is the calling thread's own: elsewhere it would also slow the
    network's thread."""
    import torch

    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


def _single_thread_worker(_worker_id: int) -> None:
    """Loader workers read and resize; one thread each so they do not fight the model."""
    import torch

    torch.set_num_threads(1)


def _saved_ranges(out: Path, params: dict) -> list[tuple[float, float]] | None:
    """Intensity ranges of an earlier run with the same params (so a resumed run matches)."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    saved = json.loads(manifest.read_text()).get("params", {})
    ranges = saved.pop("intensity_ranges", None)
    if ranges is None or saved != json.loads(json.dumps(params)):
        return None
    return [tuple(r) for r in ranges]


@register_extractor("transfer")
def _build(settings) -> TransferExtractor:
    """``transfer``: the :class:`TransferConfig` keys of ``settings``."""
    return TransferExtractor(settings_for(TransferConfig, settings))
