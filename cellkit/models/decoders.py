"""The DeepLabV3+ decoder: ASPP on the deepest feature, refined with the stride-4 feature.

A decoder is built from the encoder's ``channels`` and ``strides`` and never sees the
encoder itself, so the paper's main, dynamic and prior decoders are three instances of
one class on one shared encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellkit.registry import DECODERS

__all__ = ["ASPP", "DeepLabV3PlusDecoder"]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """Global average pooling -> 1x1 conv -> ReLU, broadcast back to the feature size.

    No BatchNorm here: after pooling there is one value per channel and image, so
    BatchNorm would fail on a batch of one in training mode.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, atrous 3x3 convs and image pooling.

    Args:
        in_channels: channels of the input feature.
        width: channels of every branch and of the output.
        rates: dilation rates of the atrous 3x3 branches.
        dropout: dropout probability after the 1x1 projection of the concatenated branches.

    Shapes:
        - Input: ``(B, in_channels, h, w)``.
        - Output: ``(B, width, h, w)``.

    Examples:
        >>> ASPP(32, 8, (1, 2))(torch.zeros(1, 32, 5, 6)).shape
        torch.Size([1, 8, 5, 6])
    """

    def __init__(
        self, in_channels: int, width: int, rates: Sequence[int], dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, width, 1)]
        branches += [_conv_bn_relu(in_channels, width, 3, dilation=r) for r in self.rates]
        branches.append(_ImagePooling(in_channels, width))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            _conv_bn_relu(width * len(branches), width, 1), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


@DECODERS.register("deeplabv3plus")
class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+'s decoder (Chen et al., ECCV 2018), producing class logits at stride 4.

    ASPP runs on the deepest feature; its output is upsampled to the low-level (stride-4)
    feature, concatenated with a 1x1 projection of it, refined by two 3x3 convs and
    classified by a 1x1 conv.

    Args:
        encoder_channels: channels of each encoder feature (the encoder's ``channels``).
        encoder_strides: stride of each encoder feature (the encoder's ``strides``).
        num_classes: output channels (one logit map per class).
        width: channels of ASPP and of the refinement convs (256 in the paper's model;
            16-64 for a small CPU model).
        low_level_width: channels of the projected low-level feature (48 in DeepLabV3+).
        aspp_rates: atrous rates at output stride 16; scaled by ``16 / output_stride``
            (doubled at output stride 8), as in DeepLabV3+.
        dropout: dropout probability after ASPP and before the classifier.

    Attributes:
        num_classes: number of output channels.
        output_stride: stride of the logits (the low-level feature's stride, 4 for ResNets).
        rates: the atrous rates in use, after scaling.

    Shapes:
        - Input: a list of features ``(B, encoder_channels[i], h_i, w_i)``.
        - Output: ``(B, num_classes, h_low, w_low)``, the size of the low-level feature.

    Raises:
        ValueError: for inconsistent encoder descriptions or a wrong number of features.

    Examples:
        >>> dec = DeepLabV3PlusDecoder((8, 16), (4, 16), num_classes=2, width=8)
        >>> dec([torch.zeros(1, 8, 8, 8), torch.zeros(1, 16, 2, 2)]).shape
        torch.Size([1, 2, 8, 8])
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_strides: Sequence[int],
        num_classes: int,
        width: int = 256,
        low_level_width: int = 48,
        aspp_rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in encoder_channels)
        strides = tuple(int(s) for s in encoder_strides)
        if not channels or len(channels) != len(strides):
            raise ValueError(
                f"encoder_channels and encoder_strides must be non-empty and of equal length "
                f"(one entry per encoder feature), got {channels} and {strides}; pass the "
                "encoder's .channels and .strides."
            )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        for name, value in (("width", width), ("low_level_width", low_level_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")

        # The low-level feature: the one at stride 4, else the finest one available.
        self.low_level_index = strides.index(4) if 4 in strides else strides.index(min(strides))
        self.num_features = len(channels)
        self.num_classes = num_classes
        self.output_stride = strides[self.low_level_index]
        deep_stride = strides[-1]
        self.rates = tuple(max(1, int(round(r * 16 / deep_stride))) for r in aspp_rates)

        self.aspp = ASPP(channels[-1], width, self.rates, dropout)
        self.low_level = _conv_bn_relu(channels[self.low_level_index], low_level_width, 1)
        self.refine = nn.Sequential(
            _conv_bn_relu(width + low_level_width, width, 3),
            _conv_bn_relu(width, width, 3),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:  # list, not Sequence: torch.jit.script
        if len(features) != self.num_features:
            raise ValueError(
                f"expected {self.num_features} encoder features (as given by encoder_channels), "
                f"got {len(features)}."
            )
        low = self.low_level(features[self.low_level_index])
        deep = self.aspp(features[-1])
        deep = F.interpolate(deep, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.refine(torch.cat([deep, low], dim=1)))
