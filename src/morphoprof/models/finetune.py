"""Fine-tuning pretrained CNNs on whole images (Kensert et al. 2019).

A timm backbone (offline EfficientNet-Lite0 by default; ResNet50, InceptionV3,
InceptionResNetV2 ... by name where a model hub is reachable) gets a new classification head and
is trained end to end with Adam on whole fields (resized, or random crops at full resolution),
with flips and rotations. The same settings with random initialisation are the control.
"""

from __future__ import annotations

from morphoprof.errors import InputError
from morphoprof.features.backbones import create_backbone, input_stats
from morphoprof.models.settings import ModelSection, TrainConfig, TrainSection
from morphoprof.models.training import ImageClassifier


class FineTuneConfig(ModelSection):
    """Network and optimiser: the ``model`` section's timm ``name``, ``weights`` (auto |
    offline | imagenet | random | checkpoint path) and dropout before the head, with the
    ``train`` section's Adam ``lr`` and ``weight_decay`` and the config's ``multilabel``;
    every default is the training config's."""

    lr: float = TrainSection.model_fields["lr"]
    weight_decay: float = TrainSection.model_fields["weight_decay"]
    multilabel: bool = TrainConfig.model_fields["multilabel"]


def finetune_module(cfg: FineTuneConfig, n_classes: int, in_chans: int = 3, seed: int = 0
                    ) -> tuple[ImageClassifier, tuple[float, ...], tuple[float, ...]]:
    """A fresh classifier for fine-tuning, and the per-channel ``(mean, std)`` its inputs
    (intensities in [0, 1]) are normalised with.

    ImageNet weights are RGB; for other channel counts the first convolution is adapted
    (timm's rule: summed for one channel, cycled and rescaled for others).
    """
    if n_classes < 2 and not cfg.multilabel:
        raise InputError(f"fine-tuning needs >= 2 classes, got {n_classes}")
    backbone = create_backbone(cfg.name, cfg.weights, in_chans=in_chans, seed=seed,
                               num_classes=n_classes)
    net = backbone.model
    if hasattr(net, "drop_rate"):
        net.drop_rate = cfg.drop_rate
    net.train()
    mean, std = input_stats(backbone, in_chans)
    module = ImageClassifier(net, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             multilabel=cfg.multilabel)
    return module, mean, std
