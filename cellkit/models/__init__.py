"""Encoders, decoders and the multi-decoder model.

Importing this package registers the encoders ``resnet18``, ``resnet34``, ``resnet50``,
``resnet101`` in [`cellkit.registry.ENCODERS`][cellkit.registry.ENCODERS] and the decoder
``deeplabv3plus`` in [`cellkit.registry.DECODERS`][cellkit.registry.DECODERS]; every
encoder and decoder follows the protocols of [`cellkit.models.base`][cellkit.models.base]
([`Encoder`][], [`Decoder`][]).

Examples:
    >>> from cellkit.registry import DECODERS, ENCODERS
    >>> enc = ENCODERS.build("resnet18", width_multiplier=0.25)
    >>> dec = DECODERS.build("deeplabv3plus", encoder_channels=enc.channels,
    ...                      encoder_strides=enc.strides, num_classes=2, width=16)
    >>> model = MultiDecoderModel(enc, {"main": dec})
    >>> model.heads, model.output_stride
    (('main',), 16)
"""

from __future__ import annotations

from cellkit.models.base import Decoder, Encoder
from cellkit.models.decoders import ASPP, DeepLabV3PlusDecoder
from cellkit.models.efficientnet import EfficientNetLite, efficientnet_lite0
from cellkit.models.encoders import (
    BasicBlock,
    Bottleneck,
    ResNetEncoder,
    load_torchvision_weights,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)
from cellkit.models.flops import flops_per_megapixel
from cellkit.models.model import MultiDecoderModel

__all__ = [
    "ASPP",
    "BasicBlock",
    "Bottleneck",
    "Decoder",
    "DeepLabV3PlusDecoder",
    "EfficientNetLite",
    "Encoder",
    "MultiDecoderModel",
    "ResNetEncoder",
    "efficientnet_lite0",
    "flops_per_megapixel",
    "load_torchvision_weights",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]
