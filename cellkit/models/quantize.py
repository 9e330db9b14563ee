"""8-bit inference on the CPU: the same model, about three times faster.

[`quantize_int8`][] turns a trained cellkit model into one whose convolutions run in 8-bit
integers (PyTorch's post-training static quantization, FX graph mode, ``x86`` backend):
weights are quantized per output channel, activations per tensor, with ranges observed on
calibration images, and every BatchNorm is folded into its convolution on the way. Only the
encoder and the main decoder are quantized (what [`MultiDecoderModel.infer`][cellkit.models.model.MultiDecoderModel.infer]
runs); the input padding, the final upsampling and the activation stay in float32, so the
maps are float32 probabilities as before.

Why it is the CPU's default (``precision="auto"`` resolves to ``"int8"`` there, see
[`cellkit.engine.inference.resolve_precision`][]): on the 2-core machine of the benchmarks the
``cpu`` size predicts a 2048² image in 0.74 s against 2.0 s in float32 (BatchNorm folded,
channels-last), and the cells found agree with float32's within the spread of training
seeds (`docs/slides.md` records both figures with their commands). On GPUs int8 is not used:
``bf16``/``fp16`` are the fast paths there.

**Calibration.** The activation ranges come from real images: a checkpoint made by
``cellkit train`` keeps 16 small crops of its own training images (``best.pt``'s
``int8_calibration``), which [`Predictor.from_checkpoint`][cellkit.engine.predict.Predictor.from_checkpoint]
uses; without them (an older checkpoint, a model built in code), the bundled EndoNuke tiles
([`CALIBRATION_TILES`][] of them, always the same ones). Either way a model gives the same
int8 maps on every machine and run. The model's own images matter for another stain: on
BCData (Ki-67), models calibrated on the EndoNuke tiles lost 0.008 of totalF1 on the negative
class, while calibrated on their training crops they matched float32 (`docs/slides.md`).

Examples:
    >>> import cellkit, torch
    >>> model = cellkit.build_model(cellkit.presets.ours(size="cpu")).eval()
    >>> fast = quantize_int8(model)
    >>> with torch.inference_mode():
    ...     fast.infer(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from cellkit.data.bundled import bundled_endonuke
from cellkit.imaging import image_to_tensor
from cellkit.models.model import pad_to_stride, to_input_size

__all__ = ["CALIBRATION_TILES", "Int8Model", "int8_available", "is_quantizable", "quantize_int8"]

CALIBRATION_TILES = 16
"""How many bundled EndoNuke tiles calibrate the activation ranges by default (every
``n // 16``-th tile of the sorted list: the same ones on every machine)."""

_ENGINE = "x86"


def int8_available() -> bool:
    """Whether this PyTorch build runs 8-bit quantized convolutions on this CPU (``x86`` engine).

    Examples:
        >>> isinstance(int8_available(), bool)
        True
    """
    try:
        return _ENGINE in torch.backends.quantized.supported_engines
    except Exception:  # pragma: no cover - a build without quantization
        return False


_NEEDED = ("encoder", "decoders", "main", "output_stride", "num_classes")


def is_quantizable(model: object) -> bool:
    """Whether ``model`` is a cellkit encoder-decoder model [`quantize_int8`][] can take.

    Examples:
        >>> import cellkit
        >>> is_quantizable(cellkit.build_model(cellkit.presets.ours(size="cpu")))
        True
        >>> is_quantizable(torch.nn.Conv2d(3, 2, 1))
        False
    """
    return isinstance(model, nn.Module) and all(hasattr(model, name) for name in _NEEDED)


class _EncoderDecoder(nn.Module):
    """The traced part: encoder, then the main decoder (logits at the decoder's resolution)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class Int8Model(nn.Module):
    """A cellkit model's inference path with 8-bit convolutions (made by [`quantize_int8`][]).

    Has what prediction uses of a [`MultiDecoderModel`][cellkit.models.model.MultiDecoderModel]:
    ``infer(x)`` (and ``forward``, the same), ``num_classes``, ``activation`` and ``main``.
    CPU only; it cannot be trained.
    """

    input_memory_format = torch.channels_last
    """The inputs it takes best: the quantized convolutions work channels-last, and the tiles
    (``(B, h, w, 3)`` uint8) are that layout already, so no copy is made to change it."""

    def __init__(self, net: nn.Module, output_stride: int, num_classes: int, activation: str, main: str) -> None:
        super().__init__()
        self.net = net
        self.output_stride = int(output_stride)
        self._num_classes = int(num_classes)
        self.activation = activation
        self.main = main

    @property
    def num_classes(self) -> int:
        """The main decoder's number of classes."""
        return self._num_classes

    def infer(self, x: Tensor) -> Tensor:
        """``(B, num_classes, H, W)`` float32 logits of normalised ``(B, 3, H, W)`` images."""
        if x.device.type != "cpu":
            raise ValueError(f"an int8 model runs on the CPU only, got an input on {x.device}; use precision "
                             "'bf16' or 'fp16' (or 'auto') on a GPU.")
        h, w = x.shape[-2:]
        padded = pad_to_stride(x.float(), self.output_stride)
        with warnings.catch_warnings():
            # The quantized cat warns when its inputs' scales differ; it then dequantizes,
            # concatenates and requantizes to the output's scale, which is what the float
            # model does up to rounding (the cells found agree: see the module).
            warnings.filterwarnings("ignore", message="All inputs of this cat operator")
            logits = self.net(padded)
        # Upsampled in float32 (upsampling the 8-bit logits is no faster: measured), from the
        # contiguous layout: the quantized layers give channels-last maps, which bilinear
        # upsampling of a few channels runs 5x slower (12 ms against 2.4 ms for 4 tiles).
        return to_input_size(logits, list(padded.shape[-2:]), [h, w])

    def forward(self, x: Tensor) -> Tensor:
        return self.infer(x)


def _bundled_tiles() -> list[np.ndarray]:
    """The [`CALIBRATION_TILES`][] bundled EndoNuke tiles (every ``n // 16``-th, sorted)."""
    from PIL import Image
    files = sorted((bundled_endonuke() / "images").glob("*.png"))
    step = max(1, len(files) // CALIBRATION_TILES)
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[::step][:CALIBRATION_TILES]]


def _calibration_batches(calibration: Iterable[np.ndarray] | None) -> list[Tensor]:
    if calibration is None:
        images = _bundled_tiles()
    else:
        images = [np.asarray(im) for im in calibration]
    if not images:
        raise ValueError("calibration holds no image; give a few (H, W, 3) uint8 tiles, or None for the "
                         "bundled EndoNuke tiles.")
    # One forward per image size (the bundled tiles share one: a single batch).
    by_shape: dict[tuple[int, ...], list[Tensor]] = {}
    for im in images:
        x = image_to_tensor(im)
        by_shape.setdefault(tuple(x.shape), []).append(x)
    return [torch.stack(group) for group in by_shape.values()]


def quantize_int8(model: nn.Module, calibration: Iterable[np.ndarray] | None = None) -> Int8Model:
    """An 8-bit copy of ``model``'s inference path (the model itself is not changed).

    Args:
        model: a cellkit [`MultiDecoderModel`][cellkit.models.model.MultiDecoderModel] (what
            [`cellkit.build_model`][] and checkpoints give), on the CPU or not (the copy is
            made on the CPU).
        calibration: ``(H, W, 3)`` uint8 RGB images whose activations set the ranges;
            ``None`` = [`CALIBRATION_TILES`][] bundled EndoNuke tiles.

    Returns:
        an [`Int8Model`][] in eval mode.

    Raises:
        RuntimeError: when this PyTorch build has no ``x86`` quantized engine
            ([`int8_available`][]).
        ValueError: for a model that is not a cellkit encoder-decoder model, or one whose
            layers the quantizer cannot trace (say which); use ``precision="fp32"`` then.
    """
    if not int8_available():
        raise RuntimeError(
            f"this PyTorch build has no '{_ENGINE}' quantized engine (it has "
            f"{list(torch.backends.quantized.supported_engines)}), so int8 inference cannot run here; "
            "use precision='fp32'."
        )
    for name in _NEEDED:
        if not hasattr(model, name):
            raise ValueError(
                f"int8 inference needs a cellkit encoder-decoder model (with .encoder, .decoders, .main), got "
                f"{type(model).__name__} without .{name}; use precision='fp32' for other models."
            )
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = _calibration_batches(calibration)
    float_model = copy.deepcopy(model).cpu().float().eval()
    net = _EncoderDecoder(float_model.encoder, float_model.decoders[float_model.main]).eval()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = _ENGINE
    try:
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; the API works as documented.
            warnings.simplefilter("ignore")
            try:
                # Concatenations of float maps stay in float32 (the ASPP branches: faster
                # so). The decoder's join of upsampled deep and low-level features stays
                # quantized: its inputs arrive quantized with their own scales, which the
                # kernel dequantizes, joins and requantizes (see Int8Model.infer).
                qconfig = get_default_qconfig_mapping(_ENGINE).set_object_type(torch.cat, None)
                prepared = prepare_fx(net, qconfig, example_inputs=(batches[0][:1],))
            except Exception as exc:
                raise ValueError(
                    f"the quantizer could not trace {type(model.encoder).__name__} + "
                    f"{type(model.decoders[model.main]).__name__} ({type(exc).__name__}: {exc}); use "
                    "precision='fp32' for this model."
                ) from exc
            with torch.inference_mode():
                for x in batches:
                    prepared(pad_to_stride(x, float_model.output_stride))
            quantized = convert_fx(prepared)
    finally:
        torch.backends.quantized.engine = previous
    num_classes = int(model.num_classes)
    activation = getattr(model, "activation", "sigmoid")
    return Int8Model(quantized, model.output_stride, num_classes, activation, model.main).eval()
