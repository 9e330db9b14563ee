"""Thin ``nn.Module`` wrappers around [`cellkit.losses.functional`][], registered in ``LOSSES``.

Every loss module follows one contract, [`LossModule`][]:

```text
loss(prediction_logits, reference) -> scalar tensor
loss.reference  # "target": reference is a training target (a mask)
                # "output": reference is another decoder's logits
                #           (consistency)
```

so that [`WeightedLoss`][cellkit.losses.combined.WeightedLoss] can feed any registered
loss, including your own:

```python
from cellkit.registry import LOSSES

@LOSSES.register("my_loss")
class MyLoss(nn.Module):
    reference = "target"

    def forward(self, prediction_logits, reference):
        ...
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from cellkit.losses import functional as LF
from cellkit.losses.functional import Norm
from cellkit.registry import LOSSES

__all__ = [
    "CELoss",
    "ConsistencyLoss",
    "DynamicLoss",
    "IoULoss",
    "LossModule",
    "MSELoss",
    "PriorLoss",
]


@runtime_checkable
class LossModule(Protocol):
    """What every registered loss provides.

    Attributes:
        reference: ``"target"`` when the second argument is a training target (looked up
            in the batch's targets by name), ``"output"`` when it is another head's logits
            (looked up in the model's outputs).
    """

    reference: Literal["target", "output"]

    def __call__(self, prediction_logits: Tensor, reference: Tensor) -> Tensor:
        """Return a scalar loss."""
        ...


@LOSSES.register("ce")
class CELoss(nn.Module):
    """Per-class binary cross-entropy, see [`ce_loss`][cellkit.losses.functional.ce_loss].

    Args:
        pos_weight: optional positive-term weight, one number or one per class.

    Examples:
        >>> import torch
        >>> loss = CELoss()
        >>> round(loss(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)).item(), 4)
        0.6931
    """

    reference: ClassVar[Literal["target", "output"]] = "target"

    def __init__(self, pos_weight: float | Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        # A buffer follows the module to the GPU; not persistent: it comes from the config.
        pw = None if pos_weight is None else LF._pos_weight_tensor(pos_weight).detach().clone()
        self.register_buffer("pos_weight", pw, persistent=False)

    def forward(self, prediction_logits: Tensor, reference: Tensor) -> Tensor:
        return LF.ce_loss(prediction_logits, reference, pos_weight=self.pos_weight)

    def extra_repr(self) -> str:
        return "" if self.pos_weight is None else f"pos_weight={self.pos_weight.tolist()}"


@LOSSES.register("iou")
class IoULoss(nn.Module):
    """Soft IoU loss, see [`iou_loss`][cellkit.losses.functional.iou_loss].

    Args:
        eps: smoothing constant, ``>= 0``.

    Examples:
        >>> import torch
        >>> logits = torch.full((1, 1, 1, 2), 20.0)
        >>> IoULoss()(logits, torch.ones(1, 1, 1, 2)).item() < 1e-6
        True
    """

    reference: ClassVar[Literal["target", "output"]] = "target"

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"Invalid eps: expected a number >= 0, got {eps!r}.")
        self.eps = eps

    def forward(self, prediction_logits: Tensor, reference: Tensor) -> Tensor:
        return LF.iou_loss(prediction_logits, reference, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@LOSSES.register("dynamic")
class DynamicLoss(nn.Module):
    """Dynamic-mask loss (eq. 4), see [`dynamic_loss`][cellkit.losses.functional.dynamic_loss].

    Args:
        norm: ``"l1"``, ``"l2"`` or ``"smooth_l1"``.

    Examples:
        >>> import torch
        >>> loss = DynamicLoss(norm="l2")
        >>> loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item()
        0.25
    """

    reference: ClassVar[Literal["target", "output"]] = "target"

    def __init__(self, norm: Norm = "l1") -> None:
        super().__init__()
        self.norm = LF._check_norm(norm)

    def forward(self, prediction_logits: Tensor, reference: Tensor) -> Tensor:
        return LF.dynamic_loss(prediction_logits, reference, norm=self.norm)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}"


@LOSSES.register("consistency")
class ConsistencyLoss(nn.Module):
    """Consistency between two decoders (eq. 5), see
    [`consistency_loss`][cellkit.losses.functional.consistency_loss].

    The reference is the other decoder's logits (``reference = "output"``); in
    [`LossTerm`][cellkit.losses.combined.LossTerm] name it with ``against``. ``"a"`` in
    ``stop_gradient`` is the prediction (``output``), ``"b"`` the reference (``against``).

    Args:
        norm: ``"l1"``, ``"l2"`` or ``"smooth_l1"``.
        stop_gradient: ``None`` (gradient to both), ``"a"`` or ``"b"`` (detach that side).

    Examples:
        >>> import torch
        >>> a = torch.zeros(1, 1, 2, 2)
        >>> ConsistencyLoss()(a, a.clone()).item()
        0.0
    """

    reference: ClassVar[Literal["target", "output"]] = "output"

    def __init__(self, norm: Norm = "l1", stop_gradient: Literal["a", "b"] | None = None) -> None:
        super().__init__()
        self.norm = LF._check_norm(norm)
        if stop_gradient not in (None, "a", "b"):
            raise ValueError(
                f"Invalid stop_gradient {stop_gradient!r}: expected None (gradient to both sides), "
                "'a' (detach the prediction) or 'b' (detach the reference)."
            )
        self.stop_gradient = stop_gradient

    def forward(self, prediction_logits: Tensor, reference: Tensor) -> Tensor:
        return LF.consistency_loss(
            prediction_logits, reference, norm=self.norm, stop_gradient=self.stop_gradient
        )

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, stop_gradient={self.stop_gradient!r}"


@LOSSES.register("prior")
class PriorLoss(nn.Module):
    """Tissue-prior loss (eq. 6), see [`prior_loss`][cellkit.losses.functional.prior_loss].

    The reference is a one-channel ``(B, 1, H, W)`` (or ``(B, H, W)``) target.

    Args:
        class_index: the channel of the logits to supervise (1: positive tumour cells).
        norm: ``"l1"``, ``"l2"`` or ``"smooth_l1"``.

    Examples:
        >>> import torch
        >>> PriorLoss()(torch.zeros(1, 2, 2, 2), torch.full((1, 1, 2, 2), 0.5)).item()
        0.0
    """

    reference: ClassVar[Literal["target", "output"]] = "target"

    def __init__(self, class_index: int = 1, norm: Norm = "l1") -> None:
        super().__init__()
        if isinstance(class_index, bool) or not isinstance(class_index, int) or class_index < 0:
            raise ValueError(f"Invalid class_index: expected an int >= 0, got {class_index!r}.")
        self.class_index = class_index
        self.norm = LF._check_norm(norm)

    def forward(self, prediction_logits: Tensor, reference: Tensor) -> Tensor:
        return LF.prior_loss(prediction_logits, reference, class_index=self.class_index, norm=self.norm)

    def extra_repr(self) -> str:
        return f"class_index={self.class_index}, norm={self.norm!r}"


@LOSSES.register("mse")
class MSELoss(nn.Module):
    """Mean squared error on raw outputs (FCRN density maps), see
    [`mse_loss`][cellkit.losses.functional.mse_loss].

    Examples:
        >>> import torch
        >>> MSELoss()(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item()
        1.0
    """

    reference: ClassVar[Literal["target", "output"]] = "target"

    def forward(self, prediction_logits: Tensor, reference: Tensor) -> Tensor:
        return LF.mse_loss(prediction_logits, reference)
