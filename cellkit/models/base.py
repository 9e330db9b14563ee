"""What the builder and [`MultiDecoderModel`][cellkit.models.MultiDecoderModel] rely on in an encoder and
a decoder.

An encoder reports its features' channels and strides; a decoder is built from those
numbers alone (``encoder_channels``, ``encoder_strides``, ``num_classes``) and never sees
the encoder, so one encoder feeds any number of decoders. Both are ``nn.Module`` objects
(their parameters must train and move with the model), registered in
[`cellkit.registry.ENCODERS`][cellkit.registry.ENCODERS] and
[`cellkit.registry.DECODERS`][cellkit.registry.DECODERS]:

```python
encoder = ENCODERS.build(name, **encoder_kwargs)
decoder = DECODERS.build(name, encoder_channels=encoder.channels,
                         encoder_strides=encoder.strides, num_classes=C,
                         **decoder_kwargs)
logits = decoder(encoder(x))  # (B, C, h, w) at any stride: the model resizes
```

Both protocols are ``runtime_checkable``: ``isinstance(module, Encoder)`` checks that the
attributes and the call are there (not their types), as the contract tests do.

Examples:
    >>> from cellkit.registry import DECODERS, ENCODERS
    >>> enc = ENCODERS.build("resnet18", width_multiplier=0.25)
    >>> dec = DECODERS.build("deeplabv3plus", encoder_channels=enc.channels,
    ...                      encoder_strides=enc.strides, num_classes=2, width=16)
    >>> isinstance(enc, Encoder), isinstance(dec, Decoder)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Decoder", "Encoder"]


@runtime_checkable
class Encoder(Protocol):
    """An ``nn.Module`` turning images into a list of features of known channels and strides.

    Attributes:
        channels: channels of each feature, shallow to deep.
        strides: stride of each feature w.r.t. the input (e.g. ``(4, 8, 16, 16)``); the
            model pads the input to a multiple of the largest one.
        in_channels: channels of the input images (the model reads it, default 3).

    Shapes:
        - Input: ``(B, in_channels, H, W)`` float images, ``H, W`` multiples of ``max(strides)``.
        - Output: ``[(B, channels[i], ceil(H / strides[i]), ceil(W / strides[i])) for i]``.
    """

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    in_channels: int

    def __call__(self, x: Tensor) -> list[Tensor]:
        """The features of ``x``, one per entry of ``channels``."""
        ...


@runtime_checkable
class Decoder(Protocol):
    """An ``nn.Module`` turning an encoder's features into class logits.

    Built with keyword arguments ``encoder_channels``, ``encoder_strides`` (the encoder's
    ``channels`` and ``strides``) and ``num_classes`` (set by the builder), plus its own.

    Attributes:
        num_classes: number of output channels, one logit map per class.

    Shapes:
        - Input: the encoder's list of features.
        - Output: ``(B, num_classes, h, w)`` logits at any stride; the model resizes them to
          the input (bilinear) and crops the padding.
    """

    num_classes: int

    def __call__(self, features: Sequence[Tensor]) -> Tensor:
        """The logits of one batch of features."""
        ...
