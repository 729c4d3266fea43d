"""The settings of the trainers, one model per section of their YAML configs.

``morphoprof train finetune|mil CONFIG.yaml`` reads a :class:`TrainConfig`, ``morphoprof train
weak CONFIG.yaml`` a :class:`WeakConfig`. Each section's defaults, types, bounds and help are
written once, here; :mod:`morphoprof.config` reads the YAML into them and the trainers
(:mod:`morphoprof.models.run`, :mod:`morphoprof.models.weak_run`) read their attributes.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import Field

from morphoprof.datasets.source import DataSection, SourceName
from morphoprof.preprocess.segmentation import NucleiSection
from morphoprof.settings import Settings

# Kraus 2016's MIL poolings (:class:`~morphoprof.models.mil.MILPool`)
Pooling = Literal["max", "mean", "gm", "lse", "noisy_or", "isr", "noisy_and"]
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
_Normalization = Literal["none", "max", "percentile"]
_Positive = Annotated[int, Field(ge=1)]


class ImagesSection(Settings):
    """``images``: how whole fields become the network's input."""

    size: int = Field(128, ge=1, description="fields resized to size x size px")
    normalization: _Normalization = Field("percentile", description="per-image intensity "
                                          "normalisation")
    scale: float = Field(1.0, gt=0, description="multiply the normalised images by this")
    crop: int | None = Field(None, ge=1, description="random training crops of this size, px "
                             "(None: whole images)")
    augment: bool = Field(True, description="the 8 rotations / reflections in training")


class ModelSection(Settings):
    """``model`` (train finetune): the pretrained network fine-tuned."""

    name: str = Field("tf_efficientnet_lite0", description="timm model name")
    weights: str = Field("auto", description="auto | offline | imagenet | random | a path")
    drop_rate: float = Field(0.2, ge=0, lt=1, description="dropout before the new head")


_Pair = Annotated[list[Annotated[int, Field(strict=True, ge=1)]],
                  Field(strict=False, min_length=2, max_length=2)]


class MilNetwork(Settings):
    """The MIL network's own settings (Kraus 2016): the trunk, the head (conv6: a 1x1
    ``hidden`` layer with ReLU and ``dropout``; conv7: K sigmoid class maps) and the pooling.
    ``mil`` sections (:class:`MilSection`) and :class:`~morphoprof.models.mil.MILConfig` both
    extend it, so each default is written here once."""

    trunk: str = Field("tf_efficientnet_lite0", description="any timm model name (cut at "
                       "stage), kraus (the paper's network, from scratch) or plan (valid 3x3 "
                       "convolutions by plan)")
    stage: int | None = Field(3, ge=0, description="the timm trunk's feature stage (None: the "
                              "last)")
    weights: str = Field("auto", description="timm weights: auto | offline | imagenet | random "
                         "| a path")
    pooling: Pooling = Field("noisy_and", description="the MIL pooling")
    r: float = Field(5.0, gt=0, description="lse / gm sharpness")
    a: float = Field(10.0, gt=0, description="Noisy-AND slope")
    hidden: int = Field(1000, ge=1, description="channels of the 1x1 hidden layer (conv6)")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout after the hidden layer")
    pool_dropout: float = Field(0.2, ge=0, lt=1, description="dropout after each pooling of "
                                "the kraus trunk")
    plan: list[_Pair] | None = Field(None, strict=False, description="plan trunk: [channels, "
                                     "stride] per 3x3 convolution (None: 7 layers, a 45-px "
                                     "receptive field)")

    def check(self) -> list[tuple[str, str]]:
        """A plan only for the ``plan`` trunk."""
        if self.plan is not None and self.trunk != "plan":
            return [("plan", f"only used with mil.trunk: plan (trunk is {self.trunk!r})")]
        return []


class MilSection(MilNetwork):
    """``mil`` (train mil): the network (:class:`MilNetwork`) and how it is trained."""

    frozen: bool | None = Field(None, description="train only the head on the trunk's cached "
                                "feature maps (default: for pretrained timm trunks)")
    cache: str | None = Field(None, description="folder of the cached feature maps (default: "
                              "output/mil/trunk_maps)")
    unfreeze_last_stage: bool = Field(False, description="with a frozen trunk, also train its "
                                      "last stage (on the cached input of that stage)")
    mil_weight: float = Field(1.0, ge=0, description="weight of the MIL term of the loss")
    jacobian_images: int = Field(4, ge=0, description="fold 0's test fields given Jacobian "
                                 "map overlays")

    def network(self) -> MilNetwork:
        """The network's settings alone."""
        return self.project(MilNetwork)

    def check(self) -> list[tuple[str, str]]:
        """The network's own checks, then freezing only pretrained timm trunks."""
        out = super().check()
        scratch = self.trunk in ("plan", "kraus")
        if self.frozen and scratch:
            out.append(("frozen", f"a {self.trunk!r} trunk is trained from scratch and cannot "
                                  "be frozen"))
        if self.unfreeze_last_stage and (self.frozen is False or scratch):
            out.append(("unfreeze_last_stage", "trains the last stage of a frozen pretrained "
                        f"timm trunk (trunk {self.trunk!r}, frozen {self.frozen})"))
        return out


class TrainSection(Settings):
    """``train``: the optimiser and PyTorch Lightning's trainer; what
    :func:`~morphoprof.models.training.fit` reads."""

    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(16, ge=1, description="images per batch")
    lr: float = Field(1e-4, gt=0, description="learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (Adam's weight_decay)")
    patience: int = Field(5, ge=0, description="early-stopping patience, epochs (with "
                          "validation wells)")
    seed: int = Field(0, description="random seed")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    accelerator: str = Field("auto", description="Lightning accelerator (auto, cpu, gpu)")
    devices: int | str = Field(1, description="Lightning devices")
    num_nodes: int = Field(1, ge=1, description="Lightning nodes")
    strategy: str = Field("auto", description="Lightning strategy (auto, ddp, ...)")
    precision: str = Field("auto", description="auto (bf16 on GPUs) or a Lightning precision "
                           "(bf16-mixed also on CPUs with bf16 units, e.g. Intel AMX)")
    channels_last: bool = Field(False, description="train in channels-last memory format "
                                "(faster convolutions on CPUs, with bf16-mixed above all)")
    recalibrate_bn: bool = Field(True, description="after training, recompute batch-norm "
                                 "statistics over the training images (one forward pass) "
                                 "before predicting")


class CVSection(Settings):
    """``cv``: cross-validation holding out whole groups."""

    group: str = Field("Metadata_compound", description="the column whose values are held "
                       "out together")
    folds: int = Field(3, ge=1, description="folds")
    treatment: list[str] = Field(["Metadata_compound", "Metadata_concentration"],
                                 description="the columns that make a treatment")
    aggregate: Literal["mean", "median"] | None = Field(None, description="image "
                                                        "probabilities to treatments (default: "
                                                        "median over wells for mil, mean for "
                                                        "finetune)")
    alpha: float = Field(0.1, gt=0, lt=1, description="conformal miscoverage")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="validation wells per fold")


class _TrainerConfig(Settings):
    """What every trainer's config holds: the screen, its stains and rows, the run's folder."""

    data: DataSection
    channels: list[str] | None = Field(None, description="stains to use, in order")
    select: dict[str, Any] = Field({}, description="keep only rows whose column holds one of "
                                   "the listed values, e.g. {Metadata_compound: [a, b]}")
    output: str = Field(description="the run's folder")


class TrainConfig(_TrainerConfig):
    """A ``train finetune`` / ``train mil`` config."""

    label: str = Field("Metadata_moa", description="the column the networks learn")
    multilabel: bool = Field(False, description="sigmoid outputs (several labels per image)")
    images: ImagesSection = ImagesSection()
    model: ModelSection = ModelSection()
    mil: MilSection = MilSection()
    train: TrainSection = TrainSection()
    cv: CVSection = CVSection()


class CellsSection(Settings):
    """``cells`` (train weak): single-cell crops of a screen."""

    crop_size: int = Field(64, ge=1, description="screens: crop box around each nucleus, px")
    size: int | None = Field(None, ge=1, description="resize crops to this (None: as they are)")
    normalization: _Normalization = Field("max", description="per-crop intensity "
                                          "normalisation")
    segmentation: NucleiSection = NucleiSection()


class HoldoutSection(Settings):
    """``holdout`` (train weak): the test cells and the validation wells."""

    column: str | None = Field(None, description="test cells: rows whose column holds one of "
                               "the values")
    values: list[str | int | float] = Field([], description="the held-out values")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="of each label's remaining wells")


class WeakModelSection(Settings):
    """``model`` (train weak): the CNN trained on the weak labels."""

    name: str = Field("resnet18", description="timm model name")
    weights: str = Field("random", description="random | auto | offline | imagenet | a path")
    layer: str | None = Field(None, description="embedding layer (default: second-to-last "
                              "stage)")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the head")


class WeakSection(Settings):
    """``weak``: mixup and the GRU set regulariser (Caicedo 2018)."""

    mixup_alpha: float = Field(0.2, ge=0, description="Beta(alpha, alpha) mixup; 0 turns it "
                               "off")
    gru: bool = Field(True, description="the GRU regulariser over same-label sequences")
    gru_hidden: int = Field(256, ge=1, description="GRU hidden units")
    gru_weight: float = Field(1.0, ge=0, description="weight of the GRU loss")
    lengths: list[_Positive] = Field([3, 5, 8], min_length=1, description="sequence lengths")
    val_length: int = Field(3, ge=1, description="sequence length in validation")
    shift: int = Field(4, ge=0, description="random shift augmentation, px")
    augment: bool = Field(True, description="flips, rotations and shifts")
    cells_per_epoch: int | None = Field(None, ge=1, description="default: the training cells")


class WeakTrainSection(TrainSection):
    """``train`` of a weak config: :class:`TrainSection` with a single-cell batch and rate."""

    batch_size: int = Field(64, ge=1, description="cells per batch")
    lr: float = Field(1e-3, gt=0, description="learning rate (Adam)")
    weight_decay: float = Field(1e-5, ge=0, description="L2 weight decay (Adam's weight_decay)")


class WeakFeaturesSection(Settings):
    """``features`` (train weak): the embeddings written after training."""

    layer: str | None = Field(None, description="default: the model's embedding layer")
    batch_size: int = Field(128, ge=1, description="cells per batch")


class WeakDataSection(DataSection):
    """``data`` of a weak config: any screen source, or ``crops`` (``path`` an ``.npz`` holding
    ``crops`` and ``table`` its one-row-per-crop table, or a crop folder)."""

    source: Literal[(*typing.get_args(SourceName), "crops")] = Field(  # type: ignore[valid-type]
        description="a screen's source, or crops")
    table: str | None = Field(None, description="crops: the table of an .npz, one row per crop")

    def check(self) -> list[tuple[str, str]]:
        """A screen source's requirements, or ``crops``' path."""
        if self.source != "crops":
            return super().check()
        if not self.path:
            return [("path", "required for source 'crops' (the .npz of crops, or a crop "
                             "folder from morphoprof crops)")]
        return []


class WeakConfig(_TrainerConfig):
    """A ``train weak`` config."""

    data: WeakDataSection
    label: list[str] = Field(["Metadata_compound", "Metadata_concentration"],
                             description="the weak label: these columns' values together")
    batch_column: str | None = Field(None, description="batches that sequences and mixup "
                                     "partners are drawn across (default: Metadata_batch, "
                                     "else Metadata_plate)")
    cells: CellsSection = CellsSection()
    holdout: HoldoutSection = HoldoutSection()
    model: WeakModelSection = WeakModelSection()
    weak: WeakSection = WeakSection()
    train: WeakTrainSection = WeakTrainSection()
    features: WeakFeaturesSection = WeakFeaturesSection()
