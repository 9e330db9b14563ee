"""Compute cost of a model's inference pass, per megapixel of input."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["flops_per_megapixel"]


def flops_per_megapixel(model: nn.Module, size: int = 256) -> float:
    """FLOPs of ``model.infer`` on one ``size x size`` image, scaled to one megapixel.

    Counted with `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts
    as 2 FLOPs; convolutions and matrix products only, so normalisation and activations
    are not included) in eval mode without gradients; the model's mode is restored.

    Args:
        model: a model with ``infer(x)`` (a [`MultiDecoderModel`][]) and ``in_channels``
            (3 when absent).
        size: side of the square test input; use a multiple of the output stride so no
            padding inflates the count.

    Returns:
        FLOPs per 10^6 input pixels.

    Raises:
        ValueError: for a non-positive ``size``.

    Examples:
        >>> # flops_per_megapixel(model) / 1e9  -> GFLOPs per megapixel
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, int(getattr(model, "in_channels", 3)), size, size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.infer(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops()) * 1e6 / (size * size)
