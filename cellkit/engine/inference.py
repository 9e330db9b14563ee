"""The network as inference runs it: the device, the precision and the folding chosen in one place.

Every prediction runs the network through an [`InferenceModel`][]:
[`Predictor`][cellkit.engine.predict.Predictor] (images, folders, the chunks of whole
slides, the stage-1 prior of ``ours_plus_plus``, the int8 calibration at the end of
training) and
[`predict_probabilities`][cellkit.engine.predict.predict_probabilities] (validation's maps)
both build one (the ONNX export folds the model with the same
[`fold_batchnorm`][cellkit.models.fuse.fold_batchnorm]). It holds

* the **device** ([`resolve_device`][]: ``None`` = CUDA when there is one) and the
  **precision** ([`resolve_precision`][]: fp32, bf16 or fp16 autocast, or an 8-bit copy of
  the network on the CPU, what ``"auto"`` picks there);
* the network that runs: the model itself, its copy with every BatchNorm folded into its
  convolution (``fold_bn``, stored channels-last), or its int8 copy
  ([`cellkit.models.quantize.quantize_int8`][], calibrated once);
* one step, [`InferenceModel.tiles`][cellkit.engine.inference.InferenceModel.tiles]: a batch of uint8 tiles
  -> uploaded, normalised, ``model.infer`` (pad to the stride, encoder, main decoder, back
  to the input size), the activation, in float32.

The tiling, blending and peaks around it are [`cellkit.engine.predict`][]'s.

Examples:
    >>> import cellkit
    >>> model = cellkit.build_model(cellkit.presets.ours(size="cpu"))
    >>> runner = InferenceModel(model, "cpu", "fp32", fold_bn=True)
    >>> probs = runner.tiles(np.zeros((2, 64, 64, 3), np.uint8))
    >>> runner.precision, tuple(probs.shape)
    ('fp32', (2, 2, 64, 64))
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cellkit.builder import apply_activation
from cellkit.imaging import IMAGENET_MEAN, IMAGENET_STD
from cellkit.lookup import look_up_option
from cellkit.models.fuse import fold_batchnorm
from cellkit.models.quantize import Int8Model, int8_available, is_quantizable, quantize_int8

__all__ = [
    "PRECISIONS",
    "InferenceModel",
    "cpu_bf16_native",
    "resolve_device",
    "resolve_precision",
    "tiles_to_tensor",
    "training_autocast_dtype",
]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "auto")
"""The ``precision`` choices of inference (see [`resolve_precision`][])."""


_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": None,  # a quantized copy of the model (cellkit.models.quantize), not autocast
}


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: ``None`` -> CUDA when available, else the CPU; a name is checked.

    Training ([`cellkit.engine.fit`][]), inference and the command line all resolve their
    ``device`` argument here, so a bad one fails the same way everywhere, before any work.

    Raises:
        ValueError: for a name torch does not know, or CUDA asked for where there is none.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"Unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N' (or None: CUDA when available)."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Device {str(device)!r} was asked for, but CUDA is not available here; "
            "use device='cpu' (--device cpu)."
        )
    return dev


def resolve_precision(precision: str | None, device: str | torch.device, amp: bool = False) -> str:
    """The precision inference runs in on ``device``: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``.

    * ``None``: ``"fp32"``; with ``amp=True``, ``"fp16"`` on CUDA (``amp`` is the older
      spelling of ``precision="fp16"``, and is ignored on the CPU, as it always was).
    * ``"auto"``: on CUDA, ``"bf16"`` where the card computes in bfloat16 natively
      (``torch.cuda.is_bf16_supported(including_emulation=False)``: Ampere and later), else
      ``"fp16"``; on the CPU ``"int8"`` where PyTorch has its ``x86`` quantized engine
      ([`cellkit.models.quantize.int8_available`][]), else ``"fp32"``; ``"fp32"`` on other
      devices. (A model that cannot be quantized, such as a plug-in that is not a cellkit
      encoder-decoder model, runs in ``"fp32"`` under ``"auto"``, and so does a model with
      depthwise convolutions, such as EfficientNet-Lite0's, whose 8-bit kernels are slower
      than float32 on the CPU.)
    * ``"fp32"``, ``"bf16"``, ``"fp16"``: as named. ``"bf16"`` also runs on the CPU
      (autocast), but is fast only on CPUs with bfloat16 instructions (AVX512-BF16, AMX);
      elsewhere it is emulated, tens of times slower than fp32. ``"fp16"`` is for GPUs.
    * ``"int8"``: CPU only: the encoder and main decoder quantized to 8 bits
      ([`cellkit.models.quantize.quantize_int8`][]), about 3x faster than fp32 on the
      ``cpu`` size, finding the same cells within the spread of training seeds.

    ``bf16`` and ``fp16`` run the network under ``torch.autocast`` (convolutions and matrix
    products in 16 bits, the maps returned in float32). bfloat16 keeps float32's range, so
    nothing overflows; float16 has 3 more bits of mantissa but overflows above 65504.

    Args:
        precision: one of [`PRECISIONS`][] (any case), or ``None``.
        device: where the network runs.
        amp: the older ``amp=True`` flag (float16 autocast on CUDA).

    Returns:
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Raises:
        ValueError: for a precision that is not one of [`PRECISIONS`][] (the message
            lists them), ``"fp16"`` on the CPU, ``"int8"`` on another device than the
            CPU, or ``amp=True`` with another precision.

    Examples:
        >>> (resolve_precision(None, "cpu"), resolve_precision("BF16", "cpu"))
        ('fp32', 'bf16')
        >>> resolve_precision("auto", "cpu")  # where PyTorch has the x86 int8 engine
        'int8'
    """
    dev = torch.device(device)
    if precision is None:
        return "fp16" if amp and dev.type == "cuda" else "fp32"
    name = look_up_option(
        precision,
        PRECISIONS,
        what="precision",
        normalize=True,
        hint="Use 'auto' for the fastest one of the device (bf16 or fp16 on CUDA, int8 on the CPU), or None.",
    )
    if amp and name != "fp16":
        raise ValueError(
            f"amp=True (float16 autocast) and precision={precision!r} disagree; pass only one of them "
            "(amp=True is precision='fp16')."
        )
    if name == "auto":
        if dev.type == "cpu":
            return "int8" if int8_available() else "fp32"
        if dev.type != "cuda":
            return "fp32"
        return "bf16" if _native_bf16(dev) else "fp16"
    if name == "int8" and dev.type != "cpu":
        raise ValueError(
            f"precision='int8' runs on the CPU only, got device {dev}; on a GPU use 'bf16' or 'fp16' "
            "(or 'auto')."
        )
    if name == "fp16" and dev.type == "cpu":
        raise ValueError(
            "precision='fp16' needs a GPU (float16 on the CPU is slower than float32); on the CPU use "
            "precision='int8', 'bf16' or 'fp32' (or 'auto', which picks int8 there)."
        )
    return name


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast pays.

    Asked of oneDNN (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), which checks the
    instructions at run time; elsewhere bfloat16 is emulated and many times slower than
    float32. ``CELLKIT_CPU_BF16=0`` (or ``1``) overrides the answer.

    Examples:
        >>> isinstance(cpu_bf16_native(), bool)
        True
    """
    forced = os.environ.get("CELLKIT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


def training_autocast_dtype(device: str | torch.device, amp: bool) -> torch.dtype | None:
    """The dtype training runs the network in under autocast with ``train.amp``, or ``None`` (float32).

    float16 on CUDA (with a gradient scaler), bfloat16 on a CPU that computes it natively
    ([`cpu_bf16_native`][]: about twice the steps per second where AMX is there), float32
    elsewhere (an emulated bfloat16 would be slower). The loss terms always run in float32.

    Examples:
        >>> training_autocast_dtype("cpu", amp=False) is None
        True
    """
    dev = torch.device(device)
    if not amp:
        return None
    if dev.type == "cuda":
        return torch.float16
    if dev.type == "cpu" and cpu_bf16_native():
        return torch.bfloat16
    return None


def _native_bf16(dev: torch.device) -> bool:
    """Whether the CUDA card ``dev`` computes in bfloat16 natively (not emulated)."""
    with torch.cuda.device(dev):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.3 has no including_emulation (and reports native support)
            return bool(torch.cuda.is_bf16_supported())


def _int8(model: Any, asked: str | None, calibration: Sequence[np.ndarray] | None = None) -> tuple[Any, str]:
    """``(model to run, precision)`` for a resolved ``"int8"``: the quantized copy (calibrated on
    ``calibration``, else the bundled tiles), or, when ``"auto"`` chose int8 for a model that
    cannot be quantized, the model itself in fp32."""
    if isinstance(model, Int8Model):
        return model, "int8"
    auto = isinstance(asked, str) and asked.strip().lower() == "auto"
    if auto and (not is_quantizable(model) or _has_depthwise(model)):
        return model, "fp32"
    try:
        return quantize_int8(model, calibration), "int8"
    except ValueError as exc:
        if not auto:
            raise
        warnings.warn(f"{exc} (precision='auto' runs it in fp32.)", stacklevel=3)
        return model, "fp32"


def _has_depthwise(model: Any) -> bool:
    """Whether the model has grouped (depthwise) convolutions, whose 8-bit kernels are slower on
    x86 CPUs than float32: the shipped EfficientNet-Lite0 model predicts a 2048² image in 17.5 s
    in int8 against 4.4 s in float32 (2 cores), so ``"auto"`` keeps float32 for such models."""
    return isinstance(model, nn.Module) and any(
        isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def _autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = _AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


def _normaliser(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as ``(1, 3, 1, 1)`` float32 tensors on ``dev``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return mean.to(dev), std.to(dev)


def _normalise(tiles: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               memory_format: torch.memory_format) -> torch.Tensor:
    """``(B, h, w, 3)`` uint8 on the device -> ``(B, 3, h, w)`` float32 (see [`tiles_to_tensor`][])."""
    # The same operations in the same order as image_to_tensor: the same float32 numbers.
    x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - mean) / std).contiguous(memory_format=memory_format)


def _upload(tiles: np.ndarray | torch.Tensor, dev: torch.device) -> torch.Tensor:
    """uint8 tiles onto ``dev``: on CUDA from pinned memory, without waiting for the copy."""
    host = torch.from_numpy(tiles) if isinstance(tiles, np.ndarray) else tiles
    if dev.type != "cuda":
        return host.to(dev)
    if not host.is_pinned():
        host = host.pin_memory()
    # Safe to let `host` go after this call: the caching host allocator keeps the pinned block
    # until the copy has run.
    return host.to(dev, non_blocking=True)


def tiles_to_tensor(
    tiles: np.ndarray | torch.Tensor,
    device: str | torch.device | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """A batch of uint8 RGB tiles as normalised network inputs, made on ``device``.

    The tiles travel as uint8 (a quarter of float32's bytes; on CUDA from pinned memory,
    without waiting) and are converted there with the same operations as
    [`cellkit.imaging.image_to_tensor`][] (``/ 255``, then ImageNet mean and std), so
    the numbers are the same (bit for bit on the CPU).

    Args:
        tiles: ``(B, h, w, 3)`` uint8 tiles, a numpy array or a CPU tensor.
        device: where the inputs are made; ``None`` = the CPU.
        memory_format: of the result, e.g. ``torch.channels_last`` for a model in that format.

    Returns:
        ``(B, 3, h, w)`` float32 on ``device``.

    Shapes:
        tiles: ``(B, h, w, 3)`` -> ``(B, 3, h, w)``.

    Raises:
        ValueError: for tiles that are not ``(B, h, w, 3)`` uint8.

    Examples:
        >>> tiles_to_tensor(np.zeros((2, 4, 5, 3), np.uint8)).shape
        torch.Size([2, 3, 4, 5])
    """
    dev = torch.device("cpu") if device is None else resolve_device(device)
    if isinstance(tiles, np.ndarray):
        if not tiles.flags.writeable or not tiles.flags.c_contiguous:
            tiles = np.ascontiguousarray(tiles).copy()  # torch warns about read-only arrays
        ok = tiles.ndim == 4 and tiles.shape[3] == 3 and tiles.dtype == np.uint8
        got = (tiles.shape, tiles.dtype)
    elif isinstance(tiles, torch.Tensor):
        ok = tiles.ndim == 4 and tiles.shape[3] == 3 and tiles.dtype == torch.uint8
        got = (tuple(tiles.shape), tiles.dtype)
    else:
        ok, got = False, type(tiles).__name__
    if not ok:
        raise ValueError(
            f"tiles_to_tensor expects (B, h, w, 3) uint8 RGB tiles, got {got}; stack (h, w, 3) uint8 "
            "tiles with np.stack (cellkit.data.read_image gives uint8 RGB images)."
        )
    mean, std = _normaliser(dev)
    return _normalise(_upload(tiles, dev), mean, std, memory_format)


def _input_memory_format(model: Any) -> torch.memory_format:
    """``channels_last`` for a model whose first 4-D weight is in that format (or that says so
    with an ``input_memory_format`` attribute, as an int8 model does), else contiguous."""
    declared = getattr(model, "input_memory_format", None)
    if isinstance(declared, torch.memory_format):
        return declared
    params = model.parameters() if isinstance(model, nn.Module) else ()
    for p in params:
        if p.ndim == 4:
            if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
                return torch.channels_last
            break
    return torch.contiguous_format


class InferenceModel:
    """A model as inference runs it: on its device, in its precision, folded or quantized once.

    Args:
        model: a cellkit model (anything with ``infer(x (B, 3, h, w)) -> (B, C, h, w)``),
            or an [`Int8Model`][cellkit.models.quantize.Int8Model] (run as it is).
        device: where to run; ``None`` = where the model's weights are. The model is moved there.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8"`` or ``"auto"`` (see
            [`resolve_precision`][]); ``None`` = fp32, or fp16 with ``amp`` on CUDA. ``"int8"``
            quantizes a copy once, here; ``"auto"`` keeps fp32 for a model that cannot be
            quantized or has depthwise convolutions.
        amp: the older spelling of ``precision="fp16"`` on CUDA.
        fold_bn: run a copy with its BatchNorms folded into the convolutions
            ([`cellkit.models.fuse.fold_batchnorm`][]: the same maps within float32
            rounding), stored channels-last (faster convolutions on CPUs and GPUs); ``model``
            is kept unchanged. An int8 copy is folded by the quantizer anyway.
        calibration: ``(h, w, 3)`` uint8 images whose activations set the int8 ranges
            (default: the bundled EndoNuke tiles).

    Attributes:
        model: the model given, on ``device``.
        network: what runs: ``model``, its folded copy, or its 8-bit copy.
        device: the resolved device.
        precision: the precision it runs in (``"auto"`` resolved, see [`resolve_precision`][]).
        activation: applied to the logits (``model.activation``, ``"sigmoid"`` when it has none).
        memory_format: of the inputs (channels-last where the network's weights are).

    Raises:
        ValueError: for a bad device or precision, or ``fold_bn`` with a model that is not an
            ``nn.Module``.
    """

    def __init__(self, model: Any, device: str | torch.device | None = None, precision: str | None = None, *,
                 amp: bool = False, fold_bn: bool = False,
                 calibration: Sequence[np.ndarray] | None = None) -> None:
        self.device = _model_device(model) if device is None else resolve_device(device)
        self.precision = resolve_precision(precision, self.device, amp)
        if fold_bn and not isinstance(model, nn.Module):
            raise ValueError(
                f"fold_bn=True needs an nn.Module whose BatchNorms can be folded, got "
                f"{type(model).__name__}; pass fold_bn=False."
            )
        self.model = model.to(self.device) if isinstance(model, nn.Module) else model
        self.network: Any = self.model
        if self.precision == "int8":
            # BatchNorms folded by the quantizer; "auto" falls back to fp32 for a model that
            # cannot be quantized.
            self.network, self.precision = _int8(self.model, precision, calibration)
        if fold_bn and self.precision != "int8":
            # Stored channels-last, which the convolutions of CPUs (oneDNN) and GPUs run
            # faster (the cpu size: 0.33 s against 0.41 s for four 512-px tiles on 2 CPU
            # cores); the inputs follow the weights' format.
            self.network = fold_batchnorm(self.model).to(self.device, memory_format=torch.channels_last)
        self.activation = str(getattr(self.network, "activation", "sigmoid"))
        self.memory_format = _input_memory_format(self.network)
        # Once, not per batch: on CUDA a copy from pageable memory would wait for the queued work.
        self._mean, self._std = _normaliser(self.device)

    @property
    def num_classes(self) -> int | None:
        """The network's output channels, when it says (``num_classes``), else ``None``."""
        n = getattr(self.network, "num_classes", None)
        return int(n) if isinstance(n, int) else None

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[InferenceModel]:
        """The network in eval mode for the ``with`` block (its mode restored after)."""
        net = self.network
        was_training = bool(getattr(net, "training", False))
        if hasattr(net, "eval"):
            net.eval()
        try:
            yield self
        finally:
            if was_training and hasattr(net, "train"):
                net.train()

    def tiles(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Probabilities of uint8 tiles: ``(B, h, w, 3)`` -> ``(B, C, h, w)`` float32 on the device.

        The tiles are uploaded as uint8 and normalised there ([`tiles_to_tensor`][]), run
        through ``infer`` under ``torch.inference_mode`` (and autocast for bf16 / fp16), and
        the activation is applied in float32. The network's mode is left as it is (see
        [`evaluating`][cellkit.engine.inference.InferenceModel.evaluating]).

        Raises:
            ValueError: when ``infer`` does not return ``(B, C, h, w)`` at the tiles' size.
        """
        with torch.inference_mode():
            batch = isinstance(tiles, torch.Tensor) and tiles.dtype == torch.uint8
            if batch and tiles.ndim == 4 and tiles.shape[3] == 3:
                # The tiling loop's batches (a pinned uint8 tensor on CUDA): uploaded without waiting.
                inputs = _normalise(_upload(tiles, self.device), self._mean, self._std, self.memory_format)
            else:  # anything else is checked (and converted) by tiles_to_tensor
                inputs = tiles_to_tensor(tiles, self.device, self.memory_format)
            with _autocast(self.device, self.precision):
                logits = self.network.infer(inputs)
            probs = apply_activation(logits.float(), self.activation)
        n, h, w = inputs.shape[0], inputs.shape[2], inputs.shape[3]
        if probs.ndim != 4 or probs.shape[0] != n or tuple(probs.shape[-2:]) != (h, w):
            raise ValueError(
                f"model.infer returned shape {tuple(probs.shape)} for tiles of shape "
                f"{tuple(inputs.shape)}; expected (B, C, {h}, {w}) logits at input resolution."
            )
        return probs
