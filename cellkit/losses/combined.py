r"""A weighted sum of loss terms that reports every term, e.g. the paper's eq. 7.

$$
L_t = \alpha L_{ce} + (1 - \alpha) L_{IoU} + \lambda_c L_c + \lambda_p L_p + \lambda_d L_d
$$

Each [`LossTerm`][] names the model output it scores and what it scores it against: a
training target (``target=``) for most losses, or another output (``against=``) for the
consistency loss. [`WeightedLoss`][] returns the total for ``backward`` and each term's
unweighted value, detached, for logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["LossTerm", "MissingKeyError", "WeightedLoss"]


class MissingKeyError(KeyError):
    """A loss term names an output or a target that the batch does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class LossTerm:
    """One weighted term of a [`WeightedLoss`][].

    Args:
        label: the name the term is reported under (unique within a ``WeightedLoss``).
        module: a loss module (see [`LossModule`][cellkit.losses.modules.LossModule]).
        weight: the term's weight, finite and ``>= 0``.
        output: the model output (head) to score, e.g. ``"main"``.
        target: the training target to score it against, for ``module.reference == "target"``.
        against: the other output to score it against, for ``module.reference == "output"``.

    Raises:
        ValueError: for an empty label, a bad weight, or ``target``/``against`` not
            matching ``module.reference``.

    Examples:
        >>> from cellkit.losses.modules import CELoss
        >>> LossTerm("ce", CELoss(), 0.8, output="main", target="circle").weight
        0.8
    """

    label: str
    module: nn.Module
    weight: float
    output: str
    target: str | None = None
    against: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"Invalid loss term label: expected a non-empty string, got {self.label!r}.")
        where = f"Loss term {self.label!r}"
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"{where}: expected an nn.Module loss, got {type(self.module).__name__}.")
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number as weight, got {self.weight!r}.") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}: expected a finite weight >= 0, got {self.weight!r}.")
        self.weight = weight
        reference = getattr(self.module, "reference", None)
        name = type(self.module).__name__
        if reference == "target":
            if self.target is None:
                raise ValueError(
                    f"{where}: {name} scores an output against a training target; "
                    "name it with target=... (e.g. target='circle')."
                )
            if self.against is not None:
                raise ValueError(
                    f"{where}: {name} scores against a target, not another output; "
                    f"drop against={self.against!r}."
                )
        elif reference == "output":
            if self.against is None:
                raise ValueError(
                    f"{where}: {name} scores an output against another output; "
                    "name it with against=... (e.g. against='dynamic')."
                )
            if self.target is not None:
                raise ValueError(
                    f"{where}: {name} scores against another output, not a target; "
                    f"drop target={self.target!r}."
                )
            if self.against == self.output:
                raise ValueError(
                    f"{where}: output and against are both {self.output!r}; "
                    "a consistency term compares two different outputs."
                )
        else:
            raise ValueError(
                f"{where}: {name}.reference must be 'target' or 'output', got {reference!r}; "
                "loss modules follow cellkit.losses.LossModule."
            )


class WeightedLoss(nn.Module):
    """The weighted sum of loss terms, reporting each term.

    Args:
        terms: the terms, with unique labels.

    Shapes:
        - outputs: ``{name: (B, C, H, W)}`` logits of the model's heads.
        - targets: ``{name: (B, C', H, W)}`` training targets.
        - output: ``(total (), {label: ()})``

    Raises:
        ValueError: for no terms or duplicate labels.

    Examples:
        >>> import torch
        >>> from cellkit.losses.modules import CELoss, IoULoss
        >>> loss = WeightedLoss([
        ...     LossTerm("ce", CELoss(), 0.8, output="main", target="circle"),
        ...     LossTerm("iou", IoULoss(), 0.2, output="main", target="circle"),
        ... ])
        >>> total, terms = loss({"main": torch.zeros(1, 2, 4, 4)},
        ...                     {"circle": torch.ones(1, 2, 4, 4)})
        >>> sorted(terms)
        ['ce', 'iou']
    """

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        super().__init__()
        terms = list(terms)
        if not terms:
            raise ValueError("WeightedLoss needs at least one LossTerm, got none.")
        for term in terms:
            if not isinstance(term, LossTerm):
                raise TypeError(f"WeightedLoss expects LossTerm objects, got {type(term).__name__}.")
        labels = [t.label for t in terms]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"Loss term labels must be unique, got {duplicates} more than once; "
                "give each term its own label."
            )
        self.terms: list[LossTerm] = terms
        # Registered so that .to(device) moves the modules' buffers (e.g. pos_weight).
        self.losses = nn.ModuleList([t.module for t in terms])

    @property
    def labels(self) -> list[str]:
        """The terms' labels, in order."""
        return [t.label for t in self.terms]

    @property
    def required_outputs(self) -> list[str]:
        """The model outputs the terms read (``output`` and ``against``), sorted."""
        names = {t.output for t in self.terms} | {t.against for t in self.terms if t.against}
        return sorted(names)

    @property
    def required_targets(self) -> list[str]:
        """The training targets the terms read, sorted."""
        return sorted({t.target for t in self.terms if t.target})

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the weighted total and each term's unweighted, detached value by label.

        Raises:
            MissingKeyError: (a ``KeyError``) when an output or target a term needs is
                missing, naming it and the available ones.
            ValueError: when a loss module does not return a scalar.
        """
        total: Tensor | None = None
        values: dict[str, Tensor] = {}
        for term in self.terms:
            prediction = _lookup(outputs, term.output, term, "output", "the model's outputs")
            if term.module.reference == "output":
                assert term.against is not None  # checked by LossTerm
                reference = _lookup(outputs, term.against, term, "output", "the model's outputs")
            else:
                assert term.target is not None  # checked by LossTerm
                reference = _lookup(targets, term.target, term, "target", "the batch's targets")
            value = term.module(prediction, reference)
            if not isinstance(value, Tensor) or value.ndim != 0:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"Loss term {term.label!r}: {type(term.module).__name__} must return a scalar "
                    f"tensor, got {got}; reduce it (e.g. .mean())."
                )
            values[term.label] = value.detach()
            weighted = term.weight * value
            total = weighted if total is None else total + weighted
        assert total is not None  # at least one term
        return total, values

    def extra_repr(self) -> str:
        parts = []
        for t in self.terms:
            ref = f"target={t.target!r}" if t.target is not None else f"against={t.against!r}"
            parts.append(f"{t.label}: {t.weight:g} * {type(t.module).__name__}(output={t.output!r}, {ref})")
        return "\n".join(parts)


def _lookup(mapping: Mapping[str, Tensor], key: str, term: LossTerm, kind: str, where: str) -> Tensor:
    try:
        return mapping[key]
    except KeyError:
        available = ", ".join(repr(k) for k in mapping) or "(none)"
        hint = (
            "Check the term's output/against, or that the model has that head."
            if kind == "output"
            else "Check the term's target, or that the dataset builds that target."
        )
        raise MissingKeyError(
            f"Loss term {term.label!r} needs {kind} {key!r}, missing from {where}; "
            f"available: {available}. {hint}"
        ) from None
