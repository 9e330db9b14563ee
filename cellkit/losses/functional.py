"""The paper's losses (eqs. 1-6) as pure functions on ``(B, C, H, W)`` torch tensors.

Every function takes the network's raw outputs (logits), applies the sigmoid itself where
the paper speaks of probabilities (each class has its own sigmoid map, so classes are not
exclusive), reduces by the mean and returns a scalar tensor. Means rather than sums keep the
loss weights independent of the crop size and the batch size.

Half-precision inputs (``float16``, ``bfloat16``) are computed in ``float32``: the IoU sums
over a whole image overflow ``float16``. ``float64`` stays ``float64`` (for ``gradcheck``).

Targets are not checked to lie in ``[0, 1]`` (that would synchronise with the GPU at every
step); the mask generators in [`cellkit.masks`][cellkit.masks] produce such targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cellkit.lookup import look_up_option

__all__ = [
    "NORMS",
    "Norm",
    "ce_loss",
    "consistency_loss",
    "dynamic_loss",
    "iou_loss",
    "mse_loss",
    "prior_loss",
]

Norm = Literal["l1", "l2", "smooth_l1"]
"""The name of a pointwise norm (the type of the ``norm`` arguments), one of [`NORMS`][]."""

NORMS: tuple[str, ...] = ("l1", "l2", "smooth_l1")
"""The pointwise norms accepted by ``dynamic_loss``, ``consistency_loss`` and ``prior_loss``."""

# ---------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 -> float32, float32 and float64 unchanged.
    return torch.promote_types(dtype, torch.float32)


def _check_logits(logits: object, name: str = "logits") -> Tensor:
    """Check that ``logits`` is a floating ``(B, C, H, W)`` tensor and return it upcast."""
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"Invalid {name}: expected a torch.Tensor of shape (B, C, H, W), got {type(logits).__name__}."
        )
    if logits.ndim != 4:
        raise ValueError(
            f"Invalid {name} shape: expected (B, C, H, W), got {_shape(logits)}; "
            "add missing dimensions with .unsqueeze (e.g. x[None] for one image)."
        )
    if not logits.is_floating_point():
        raise TypeError(
            f"Invalid {name} dtype: expected a floating-point tensor, got {logits.dtype}; "
            "convert it with .float()."
        )
    return logits.to(_compute_dtype(logits.dtype))


def _check_target(
    target: object,
    like: Tensor,
    name: str = "target",
    like_name: str = "logits",
    shape: tuple[int, ...] | None = None,
    shape_text: str = "(B, C, H, W)",
) -> Tensor:
    """Check that ``target`` matches ``like`` in shape (or ``shape``) and device, cast it to its dtype."""
    if not isinstance(target, Tensor):
        raise TypeError(
            f"Invalid {name}: expected a torch.Tensor of shape {shape_text}, got {type(target).__name__}."
        )
    expected = _shape(like) if shape is None else shape
    if _shape(target) != expected:
        raise ValueError(
            f"Invalid {name} shape: expected {shape_text} matching {like_name} {_shape(like)}, "
            f"got {_shape(target)}."
        )
    if not target.is_floating_point():
        raise TypeError(
            f"Invalid {name} dtype: expected a floating-point tensor with values in [0, 1], "
            f"got {target.dtype}; convert it with .float()."
        )
    if target.device != like.device:
        raise ValueError(
            f"Invalid {name} device: expected {like.device} like {like_name}, got {target.device}; "
            f"move it with {name}.to({like_name}.device)."
        )
    return target.to(like.dtype)


def _norm(diff: Tensor, norm: str) -> Tensor:
    """Elementwise norm of a difference: ``|d|`` (l1), ``d**2`` (l2) or smooth L1.

    ``smooth_l1`` is Huber with ``beta=1`` (``0.5 d**2`` if ``|d| < 1`` else ``|d| - 0.5``),
    the default of `torch.nn.functional.smooth_l1_loss`. Differences of probabilities
    never exceed 1, so on those it equals ``0.5 * l2``.

    Raises:
        ValueError: for an unknown ``norm``, with the closest name and every choice.

    Examples:
        >>> _norm(torch.tensor([-0.5, 0.25]), "l1")
        tensor([0.5000, 0.2500])
    """
    norm = _check_norm(norm)
    if norm == "l1":
        return diff.abs()
    if norm == "l2":
        return diff.square()
    return F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none", beta=1.0)


def _check_norm(norm: object) -> Norm:
    """``norm`` when it is one of [`NORMS`][] (case matters); a ``ValueError`` naming the closest."""
    name: Norm = look_up_option(norm, NORMS, what="norm")
    return name


def _pos_weight_tensor(
    pos_weight: float | Sequence[float] | Tensor, num_classes: int | None = None
) -> Tensor:
    """``pos_weight`` as a ``()`` or ``(C,)`` tensor; values are checked unless already a tensor."""
    if isinstance(pos_weight, Tensor):
        pw = pos_weight
    else:
        try:
            pw = torch.as_tensor(pos_weight, dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"Invalid pos_weight: expected a positive number or one per class, got {pos_weight!r}."
            ) from err
        if not bool(torch.isfinite(pw).all()) or bool((pw <= 0).any()):
            raise ValueError(f"Invalid pos_weight: expected finite values > 0, got {pw.tolist()}.")
    if pw.ndim > 1 or (pw.ndim == 1 and num_classes is not None and pw.shape[0] != num_classes):
        raise ValueError(
            f"Invalid pos_weight shape: expected () or (C,) = ({num_classes},) one weight per class, "
            f"got {_shape(pw)}."
        )
    if not pw.is_floating_point():
        pw = pw.float()
    return pw


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def ce_loss(
    logits: Tensor,
    target: Tensor,
    pos_weight: float | Sequence[float] | Tensor | None = None,
) -> Tensor:
    r"""Per-class binary cross-entropy between sigmoid maps and soft masks (the paper's eq. 1).

    $$
    L_{ce} = \frac{1}{BCHW} \sum_{b,l,i,j}
    -\big[w_l\, G \log P + (1 - G) \log(1 - P)\big], \quad P = \sigma(\text{logits})
    $$

    The printed eq. 1, $\frac{1}{2mn}\sum -G \log P$, omits the background term
    $(1 - G)\log(1 - P)$. Each class has its own sigmoid map (classes are not
    exclusive, and the paper's inference thresholds sigmoid outputs), so without that term
    nothing penalises a high probability on background pixels and predicting 1 everywhere
    would be optimal. The binary form is the standard reading for per-class sigmoid maps;
    it is computed with `torch.nn.functional.binary_cross_entropy_with_logits`,
    which is numerically stable for large logits.

    Args:
        logits: raw network outputs.
        target: masks with values in ``[0, 1]`` (one channel per class).
        pos_weight: optional weight $w_l$ of the positive term, a positive number for
            every class or one per class (``(C,)``), e.g. to weigh up sparse cell pixels.

    Shapes:
        - logits: ``(B, C, H, W)``
        - target: ``(B, C, H, W)``
        - output: ``()``

    Raises:
        TypeError: when an input is not a floating-point tensor.
        ValueError: when shapes or devices do not match, or ``pos_weight`` is not positive.

    Examples:
        >>> logits = torch.zeros(1, 2, 2, 2)  # P = 0.5 everywhere
        >>> round(ce_loss(logits, torch.ones(1, 2, 2, 2)).item(), 4)  # -log(0.5)
        0.6931
    """
    logits = _check_logits(logits)
    target = _check_target(target, logits)
    weight = None
    if pos_weight is not None:
        pw = _pos_weight_tensor(pos_weight, num_classes=logits.shape[1])
        pw = pw.to(device=logits.device, dtype=logits.dtype)
        # (C,) -> (C, 1, 1) so that it broadcasts over the class axis, not the width.
        weight = pw.reshape(-1, 1, 1) if pw.ndim == 1 else pw
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="mean")


def iou_loss(logits: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    r"""Soft IoU (Jaccard) loss per image and class, averaged over both (the paper's eq. 2).

    $$
    L_{IoU} = \frac{1}{BC} \sum_{b,l} \Big(1 - \frac{I + \epsilon}{U + \epsilon}\Big),
    \quad I = \sum_{i,j} G P, \quad U = \sum_{i,j} G + \sum_{i,j} P - I
    $$

    with $P = \sigma(\text{logits})$. The printed eq. 2,
    $\frac{1}{2}\sum_l \frac{\sum G P}{\sum G + \sum P}$, omits the ``1 -`` and the
    ``- I`` in the denominator: as printed it is half a Dice score with the wrong sign (a
    quantity to maximise, not a loss). We implement the standard soft-IoU loss of Rahman &
    Wang (2016), the paper's ref. [10].

    ``eps`` smooths both the numerator and the denominator, so an empty target with an
    (almost) empty prediction scores close to 0 rather than 1. Note that with the default
    ``eps=1e-6`` a class absent from a crop scores about 1 unless the summed probabilities
    stay far below ``eps``; that term is then a constant with (almost) no gradient.

    Args:
        logits: raw network outputs.
        target: masks with values in ``[0, 1]``.
        eps: smoothing constant, ``>= 0``.

    Shapes:
        - logits: ``(B, C, H, W)``
        - target: ``(B, C, H, W)``
        - output: ``()``

    Raises:
        TypeError: when an input is not a floating-point tensor.
        ValueError: when shapes or devices do not match, or ``eps`` is negative.

    Examples:
        >>> target = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(iou_loss(torch.tensor([[[[20.0, -20.0]]]]), target).item(), 4)
        0.0
    """
    logits = _check_logits(logits)
    target = _check_target(target, logits)
    if not eps >= 0:
        raise ValueError(f"Invalid eps: expected a number >= 0, got {eps!r}.")
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum(dim=(2, 3))
    union = target.sum(dim=(2, 3)) + prob.sum(dim=(2, 3)) - intersection
    return (1.0 - (intersection + eps) / (union + eps)).mean()


def dynamic_loss(logits: Tensor, target: Tensor, norm: Norm = "l1") -> Tensor:
    r"""Distance between the dynamic decoder's probabilities and the dynamic masks (eq. 4).

    $$
    L_d = \frac{1}{BCHW} \sum_{b,l,i,j} \lVert \sigma(\text{logits}) - \tilde G \rVert
    $$

    The paper writes $\lVert\cdot\rVert$ (eqs. 4-6) without saying which norm. On a
    scalar the standard reading is the absolute value, so ``"l1"`` is the default;
    ``"l2"`` (the squared difference) and ``"smooth_l1"`` (Huber, ``beta=1``) are options.

    Args:
        logits: raw outputs of the dynamic decoder.
        target: dynamic masks (e.g. random polygons) with values in ``[0, 1]``.
        norm: ``"l1"``, ``"l2"`` or ``"smooth_l1"``.

    Shapes:
        - logits: ``(B, C, H, W)``
        - target: ``(B, C, H, W)``
        - output: ``()``

    Raises:
        TypeError: when an input is not a floating-point tensor.
        ValueError: when shapes or devices do not match, or for an unknown ``norm``.

    Examples:
        >>> logits = torch.zeros(1, 1, 2, 2)  # P = 0.5
        >>> dynamic_loss(logits, torch.ones(1, 1, 2, 2)).item()
        0.5
    """
    norm = _check_norm(norm)
    logits = _check_logits(logits)
    target = _check_target(target, logits)
    return _norm(torch.sigmoid(logits) - target, norm).mean()


def consistency_loss(
    logits_a: Tensor,
    logits_b: Tensor,
    norm: Norm = "l1",
    stop_gradient: Literal["a", "b"] | None = None,
) -> Tensor:
    r"""Distance between two decoders' probability maps (eq. 5, main vs. dynamic decoder).

    $$
    L_c = \frac{1}{BCHW} \sum_{b,l,i,j}
    \lVert \sigma(\text{logits}_a) - \sigma(\text{logits}_b) \rVert
    $$

    The gradient flows to both decoders by default, as eq. 5 and Fig. 1 imply (the loss
    is minimised with respect to both branches). ``stop_gradient="a"`` (or ``"b"``)
    detaches that side, making the other side a fixed teacher, as in mean-teacher style
    consistency training.

    Args:
        logits_a: raw outputs of one decoder (the main decoder).
        logits_b: raw outputs of the other decoder (the dynamic decoder).
        norm: ``"l1"``, ``"l2"`` or ``"smooth_l1"``.
        stop_gradient: ``None``, ``"a"`` or ``"b"``: the side that receives no gradient.

    Shapes:
        - logits_a: ``(B, C, H, W)``
        - logits_b: ``(B, C, H, W)``
        - output: ``()``

    Raises:
        TypeError: when an input is not a floating-point tensor.
        ValueError: when shapes or devices do not match, for an unknown ``norm`` or an
            invalid ``stop_gradient``.

    Examples:
        >>> a = torch.zeros(1, 1, 1, 2)
        >>> consistency_loss(a, a.clone()).item()
        0.0
    """
    norm = _check_norm(norm)
    if stop_gradient not in (None, "a", "b"):
        raise ValueError(
            f"Invalid stop_gradient {stop_gradient!r}: expected None (gradient to both sides), "
            "'a' (detach logits_a) or 'b' (detach logits_b)."
        )
    logits_a = _check_logits(logits_a, "logits_a")
    logits_b = _check_target(logits_b, logits_a, name="logits_b", like_name="logits_a")
    if stop_gradient == "a":
        logits_a = logits_a.detach()
    elif stop_gradient == "b":
        logits_b = logits_b.detach()
    return _norm(torch.sigmoid(logits_a) - torch.sigmoid(logits_b), norm).mean()


def prior_loss(logits: Tensor, target: Tensor, class_index: int = 1, norm: Norm = "l1") -> Tensor:
    r"""Distance between the prior decoder's class-``class_index`` map and the tissue prior (eq. 6).

    $$
    L_p = \frac{1}{BHW} \sum_{b,i,j} \lVert \hat G - \sigma(\text{logits}_{b,l}) \rVert,
    \quad l = \mathtt{class\_index}
    $$

    Only the class of interest (positive tumour cells, class 1) is supervised: the other
    cells do not cluster. The printed eq. 6 is a *sum* over the pixels; we take the mean so
    that its weight $\lambda_p$ does not depend on the image size (a sum would make it
    ``H * W`` times larger than eqs. 4-5). See [`dynamic_loss`][] for ``norm``.

    Args:
        logits: raw outputs of the prior decoder (all classes; only one is used).
        target: the prior mask (the pre-trained model's sigmoid map), values in ``[0, 1]``.
        class_index: the channel of ``logits`` to supervise.
        norm: ``"l1"``, ``"l2"`` or ``"smooth_l1"``.

    Shapes:
        - logits: ``(B, C, H, W)``
        - target: ``(B, 1, H, W)`` or ``(B, H, W)``
        - output: ``()``

    Raises:
        TypeError: when an input is not a floating-point tensor or ``class_index`` not an int.
        ValueError: when shapes or devices do not match, ``class_index`` is out of range, or
            for an unknown ``norm``.

    Examples:
        >>> logits = torch.zeros(1, 2, 2, 2)
        >>> prior_loss(logits, torch.full((1, 1, 2, 2), 0.5)).item()
        0.0
    """
    norm = _check_norm(norm)
    logits = _check_logits(logits)
    num_classes = logits.shape[1]
    if isinstance(class_index, bool) or not isinstance(class_index, int):
        raise TypeError(f"Invalid class_index: expected an int, got {class_index!r}.")
    if not 0 <= class_index < num_classes:
        raise ValueError(
            f"Invalid class_index {class_index}: logits have {num_classes} channel(s), expected "
            f"0 <= class_index < {num_classes}."
        )
    if isinstance(target, Tensor) and target.ndim == 3:
        target = target.unsqueeze(1)
    b, _, h, w = logits.shape
    target = _check_target(target, logits, shape=(b, 1, h, w), shape_text="(B, 1, H, W)")
    prob = torch.sigmoid(logits[:, class_index : class_index + 1])
    return _norm(target - prob, norm).mean()


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    r"""Mean squared error for density regression (the FCRN baseline).

    ``pred`` are raw outputs: no sigmoid, densities are not probabilities.

    $$
    L = \frac{1}{BCHW} \sum_{b,l,i,j} (\text{pred} - \text{target})^2
    $$

    Shapes:
        - pred: ``(B, C, H, W)``
        - target: ``(B, C, H, W)``
        - output: ``()``

    Raises:
        TypeError: when an input is not a floating-point tensor.
        ValueError: when shapes or devices do not match.

    Examples:
        >>> mse_loss(torch.full((1, 1, 1, 2), 2.0), torch.zeros(1, 1, 1, 2)).item()
        4.0
    """
    pred = _check_logits(pred, "pred")
    target = _check_target(target, pred, like_name="pred")
    return (pred - target).square().mean()
