"""Losses: pure functions, thin modules registered in ``LOSSES``, and a weighted sum.

- [`cellkit.losses.functional`][cellkit.losses.functional]: the paper's eqs. 1-6 (and
  FCRN's MSE) on ``(B, C, H, W)`` logits.
- [`cellkit.losses.modules`][cellkit.losses.modules]: one ``nn.Module`` per loss,
  registered in [`cellkit.registry.LOSSES`][cellkit.registry.LOSSES] as ``ce``, ``iou``,
  ``dynamic``, ``consistency``, ``prior`` and ``mse`` (importing this package registers
  them).
- [`cellkit.losses.combined`][cellkit.losses.combined]: [`LossTerm`][] and
  [`WeightedLoss`][] (eq. 7).

Examples:
    >>> from cellkit.registry import LOSSES
    >>> LOSSES.build("consistency", norm="l2")
    ConsistencyLoss(norm='l2', stop_gradient=None)
"""

from __future__ import annotations

from cellkit.losses.combined import LossTerm, MissingKeyError, WeightedLoss
from cellkit.losses.functional import (
    NORMS,
    Norm,
    ce_loss,
    consistency_loss,
    dynamic_loss,
    iou_loss,
    mse_loss,
    prior_loss,
)
from cellkit.losses.modules import (
    CELoss,
    ConsistencyLoss,
    DynamicLoss,
    IoULoss,
    LossModule,
    MSELoss,
    PriorLoss,
)

__all__ = [
    "NORMS",
    "CELoss",
    "ConsistencyLoss",
    "DynamicLoss",
    "IoULoss",
    "LossModule",
    "LossTerm",
    "MSELoss",
    "MissingKeyError",
    "Norm",
    "PriorLoss",
    "WeightedLoss",
    "ce_loss",
    "consistency_loss",
    "dynamic_loss",
    "iou_loss",
    "mse_loss",
    "prior_loss",
]
