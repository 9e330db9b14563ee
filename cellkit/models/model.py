"""One shared encoder, any number of named decoders: the paper's multi-task model.

Training runs every head (``main``, ``dynamic``, ``prior``); inference runs the encoder and
the main decoder only ([`MultiDecoderModel.infer`][]), as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cellkit.lookup import look_up_option

__all__ = ["MultiDecoderModel", "pad_to_stride", "to_input_size"]


def pad_to_stride(x: Tensor, stride: int) -> Tensor:
    """``x`` padded at the bottom and right to a multiple of ``stride`` (at least two strides a side).

    Reflected where the image is larger than the padding, replicated otherwise; the model's
    outputs are cropped back to the input's size. Shared by every model that runs the
    encoder (the float model and its int8 copy, [`cellkit.models.quantize`][]).

    Examples:
        >>> import torch
        >>> pad_to_stride(torch.zeros(1, 3, 30, 33), 16).shape
        torch.Size([1, 3, 32, 48])
    """
    h, w = x.shape[-2:]
    pad_h = max(math.ceil(h / stride), 2) * stride - h
    pad_w = max(math.ceil(w / stride), 2) * stride - w
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def to_input_size(logits: Tensor, padded: list[int], size: list[int]) -> Tensor:
    """Logits at the decoder's resolution, upsampled to the padded input and cropped to the input.

    The last step of every encoder-decoder pass ([`pad_to_stride`][] is the first): the float
    model, its int8 copy ([`cellkit.models.quantize`][]) and the exported module
    ([`cellkit.export`][]) all end with it. Bilinear, from the contiguous layout: channels-last
    logits of a few channels upsample 5x slower on the CPU.

    Examples:
        >>> import torch
        >>> to_input_size(torch.zeros(1, 2, 4, 6), [32, 48], [30, 33]).shape
        torch.Size([1, 2, 30, 33])
    """
    # No int(): traced for export, the sizes stay symbolic.
    logits = F.interpolate(logits.contiguous(), size=[padded[0], padded[1]], mode="bilinear", align_corners=False)
    return logits[:, :, : size[0], : size[1]]


class MultiDecoderModel(nn.Module):
    """A shared encoder feeding named decoders, returning named logits at input resolution.

    Any input size works: the input is padded at the bottom and right (reflect, or
    replicate when the image is smaller than the padding) to a multiple of the encoder's
    deepest stride (at least twice it, so the deepest feature has more than one pixel),
    and the upsampled logits are cropped back.

    Args:
        encoder: a module with ``channels`` and ``strides`` whose ``forward(x)`` returns a
            list of features (an [`Encoder`][cellkit.models.base.Encoder]), e.g.
            ``ENCODERS.build("resnet101")``.
        decoders: named decoders, each with ``num_classes`` and ``forward(features) ->
            logits`` (a [`Decoder`][cellkit.models.base.Decoder]); the paper's are ``main``,
            ``dynamic`` and ``prior``.
        main: the name of the decoder used by [`infer`][].
        activation: what turns the main head's logits into the maps the peaks are taken
            on: ``"sigmoid"`` (probabilities, the paper's) or ``"identity"`` (density
            regression, FCRN). Inference (``cellkit predict``) applies it.

    Attributes:
        heads: the decoder names, in order.
        main: the main decoder's name.
        activation: ``"sigmoid"`` or ``"identity"`` (see Args).
        output_stride: the multiple the input is padded to (the deepest encoder stride).
        num_classes: the main decoder's number of classes.
        in_channels: the channels expected in the input.

    Shapes:
        - Input: ``(B, in_channels, H, W)`` float images, any ``H, W >= 1``.
        - Output of ``forward``: ``{head: (B, C_head, H, W)}`` logits.
        - Output of ``infer``: ``(B, C_main, H, W)`` logits.

    Raises:
        ValueError: for an empty ``decoders``, an unknown ``main``, or an encoder/decoder
            lacking the attributes above.

    Examples:
        >>> import torch
        >>> from cellkit.registry import DECODERS, ENCODERS
        >>> enc = ENCODERS.build("resnet18", width_multiplier=0.25)
        >>> decs = {h: DECODERS.build("deeplabv3plus", encoder_channels=enc.channels,
        ...                           encoder_strides=enc.strides, num_classes=2,
        ...                           width=16)
        ...         for h in ("main", "dynamic")}
        >>> model = MultiDecoderModel(enc, decs)
        >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 37, 53)).items()}
        {'main': (1, 2, 37, 53), 'dynamic': (1, 2, 37, 53)}
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoders: Mapping[str, nn.Module] | nn.ModuleDict,
        main: str = "main",
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.activation = look_up_option(activation, ("sigmoid", "identity"), what="activation")
        strides = getattr(encoder, "strides", None)
        if not strides or not hasattr(encoder, "channels"):
            raise ValueError(
                f"the encoder ({type(encoder).__name__}) must have 'channels' and 'strides' "
                "attributes describing its features; build one with ENCODERS.build(...)."
            )
        if len(decoders) == 0:
            raise ValueError("decoders must hold at least one named decoder, e.g. {'main': ...}.")
        if main not in decoders:
            raise ValueError(
                f"main={main!r} is not one of the decoders {list(decoders)}; pass main=<name> "
                "naming the decoder used at inference."
            )
        for name, decoder in decoders.items():
            if not isinstance(decoder, nn.Module):
                raise ValueError(f"decoder {name!r} must be an nn.Module, got {type(decoder).__name__}.")
            if not hasattr(decoder, "num_classes"):
                raise ValueError(
                    f"decoder {name!r} ({type(decoder).__name__}) needs a 'num_classes' attribute."
                )
        self.encoder = encoder
        self.decoders = decoders if isinstance(decoders, nn.ModuleDict) else nn.ModuleDict(decoders)
        self.main = main
        self.output_stride = int(max(strides))
        self.in_channels = int(getattr(encoder, "in_channels", 3))

    @property
    def heads(self) -> tuple[str, ...]:
        """The decoder names, in order."""
        return tuple(self.decoders.keys())

    @property
    def num_classes(self) -> int:
        """The main decoder's number of classes."""
        return int(self.decoders[self.main].num_classes)

    def _check_input(self, x: object) -> Tensor:
        if (
            not isinstance(x, Tensor)
            or x.ndim != 4
            or x.shape[1] != self.in_channels
            or not x.is_floating_point()
            or x.shape[-1] < 1
            or x.shape[-2] < 1
        ):
            got = (
                f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            )
            raise ValueError(
                f"expected (B, {self.in_channels}, H, W) float images, got {got}; add a batch "
                "dimension with x[None] and convert uint8 images with "
                "cellkit.imaging.image_to_tensor."
            )
        return x

    def _check_heads(self, heads: Sequence[str] | None) -> tuple[str, ...]:
        if heads is None:
            return self.heads
        if isinstance(heads, str):
            heads = (heads,)
        heads = tuple(heads)
        if not heads:
            raise ValueError(f"heads must name at least one decoder of {list(self.heads)}, or be None.")
        for head in heads:
            look_up_option(head, self.heads, what="head")
        return heads

    def _pad(self, x: Tensor) -> Tensor:
        return pad_to_stride(x, self.output_stride)

    def _run(self, x: Tensor, heads: tuple[str, ...]) -> dict[str, Tensor]:
        h, w = x.shape[-2:]
        padded = self._pad(x)
        features = self.encoder(padded)
        return {head: to_input_size(self.decoders[head](features), list(padded.shape[-2:]), [h, w]) for head in heads}

    def forward(self, x: Tensor, heads: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Run the encoder once and the requested decoders.

        Args:
            x: ``(B, C, H, W)`` normalised float images.
            heads: decoder names to run; ``None`` runs all of them.

        Returns:
            ``{head: (B, num_classes, H, W)}`` logits, in the order of ``heads``.

        Raises:
            ValueError: for a malformed input or an unknown head.
        """
        return self._run(self._check_input(x), self._check_heads(heads))

    def infer(self, x: Tensor) -> Tensor:
        """The paper's inference: encoder and main decoder only.

        Does not change train/eval mode nor disable gradients; call ``model.eval()`` and
        wrap in ``torch.no_grad()`` (or ``torch.inference_mode()``) for prediction.

        Returns:
            ``(B, num_classes, H, W)`` logits of the main decoder.

        Examples:
            >>> # probs = torch.sigmoid(model.eval().infer(x))
        """
        return self._run(self._check_input(x), (self.main,))[self.main]
