"""The model zoo: trained models that ship inside cellkit, and training from trained weights.

A shipped model is a cellkit checkpoint in the package (``cellkit/weights/NAME.pt``, weights
in half precision) with its model card (``NAME.md``: data, classes, pixel size, recipe,
command, commit, held-out scores, licence and attribution). Nothing is downloaded: they
work offline on a fresh install:

```python
import cellkit

predictor = cellkit.pretrained("endonuke-epithelium")
detections = predictor.predict(image)        # (H, W, 3) uint8 RGB
print(cellkit.model_card("endonuke-epithelium"))
```

and from the command line, ``cellkit predict --model endonuke-epithelium --out out/ images/``.

[`initial_weights`][] starts a training from a shipped model or any checkpoint
(``cellkit train --init-from endonuke-epithelium``): every weight whose name and shape match
the new model is copied (the encoder always, the decoders when the classes agree); the rest
(the heads of a task with other classes) keep their fresh initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cellkit.engine.checkpoint import load_checkpoint
from cellkit.engine.predict import Predictor
from cellkit.lookup import look_up_option, unknown_option_message

__all__ = ["MODELS", "InitReport", "PretrainedModel", "available", "initial_weights", "model_card",
           "model_path", "pretrained", "resolve_checkpoint"]


@dataclass(frozen=True)
class PretrainedModel:
    """A model shipped inside cellkit.

    Attributes:
        name: what ``--model`` and [`pretrained`][] take.
        file: the checkpoint's file name in ``cellkit/weights/``.
        card: the model card's file name there.
        description: one line.
    """

    name: str
    file: str
    card: str
    description: str


MODELS: dict[str, PretrainedModel] = {
    "endonuke-epithelium": PretrainedModel(
        "endonuke-epithelium", "endonuke-epithelium.pt", "endonuke-epithelium.md",
        "Ours (main decoder on circles), cpu size, trained on the bundled EndoNuke tiles (ER/PR IHC): "
        "epithelium nuclei against all others (CC BY 4.0 data).",
    ),
}
"""The shipped models by name."""


def available() -> list[str]:
    """Names of the models shipped with this install (those whose weights are present).

    Examples:
        >>> "endonuke-epithelium" in MODELS
        True
    """
    return [name for name in MODELS if _resource(MODELS[name].file).is_file()]


def _resource(name: str) -> Path:
    return Path(str(resources.files("cellkit") / "weights" / name))


def _lookup(name: str) -> PretrainedModel:
    return look_up_option(name, MODELS, what="shipped model")


def model_path(name: str) -> Path:
    """The checkpoint file of a shipped model.

    Raises:
        UnknownOptionError: for a name that is not shipped (with suggestions).
        FileNotFoundError: when this install lacks the weights (a source checkout without them).
    """
    model = _lookup(name)
    path = _resource(model.file)
    if not path.is_file():
        raise FileNotFoundError(
            f"The weights of {name!r} are not in this install ({path} is missing); reinstall cellkit from a "
            "release or a full clone (they are part of the package)."
        )
    return path


def model_card(name: str) -> str:
    """The model card (Markdown) of a shipped model."""
    return _resource(_lookup(name).card).read_text(encoding="utf-8")


def resolve_checkpoint(source: str | Path) -> Path:
    """A shipped model's name, or a checkpoint file or run folder, as a path.

    Raises:
        FileNotFoundError: for a name that is neither a shipped model nor an existing path.

    Examples:
        >>> resolve_checkpoint("endonuke-epithelium").name  # doctest: +SKIP
        'endonuke-epithelium.pt'
    """
    text = str(source)
    if text in MODELS:
        return model_path(text)
    path = Path(source)
    if path.exists():
        return path
    raise FileNotFoundError(
        f"{text!r} is neither a checkpoint (no such file or folder) nor a shipped model: "
        + unknown_option_message(text, list(MODELS), what="shipped model")
    )


def pretrained(name: str, device: Any = None, **kwargs: Any) -> Any:
    """A [`Predictor`][cellkit.engine.predict.Predictor] of a shipped model, ready to predict.

    Args:
        name: one of [`MODELS`][] (``available()`` lists those present).
        device: ``None`` = CUDA when available, else the CPU.
        **kwargs: more
            [`Predictor.from_checkpoint`][cellkit.engine.predict.Predictor.from_checkpoint]
            options (``threshold``, ``tile_size``, ``precision``...). As ``cellkit predict
            --model NAME`` runs it, ``precision`` defaults to ``"auto"`` (8-bit integers on the
            CPU, bfloat16 or float16 on CUDA; see
            [`resolve_precision`][cellkit.engine.inference.resolve_precision]) and ``fold_bn`` to
            True; pass ``precision="fp32"`` for float32.

    Examples:
        Not run here (``image`` stands for yours; the weights may be absent from a
        source checkout):

        >>> import cellkit
        >>> predictor = cellkit.pretrained("endonuke-epithelium")  # doctest: +SKIP
        >>> predictor.predict(image)  # doctest: +SKIP
    """
    kwargs.setdefault("precision", "auto")  # the same cells as cellkit predict --model NAME
    kwargs.setdefault("fold_bn", True)
    return Predictor.from_checkpoint(model_path(name), device=device, **kwargs)


@dataclass
class InitReport:
    """What [`initial_weights`][] copied.

    Attributes:
        source: the checkpoint read.
        copied: names of the weights copied.
        remade: names of the new model's weights left as initialised (no match by name or shape).
        ignored: names in the checkpoint that the new model has not.
    """

    source: Path
    copied: list[str]
    remade: list[str]
    ignored: list[str]

    def summary(self) -> str:
        """One line for the log."""
        heads = sorted({".".join(n.split(".")[:2]) for n in self.remade})
        remade = f"; re-made (other shape or new): {len(self.remade)} tensors in {', '.join(heads[:6])}" if heads else ""
        return f"initial weights from {self.source}: {len(self.copied)} tensors copied{remade}"


def initial_weights(model: Any, source: str | Path) -> InitReport:
    """Copy into ``model`` every weight of a checkpoint (or shipped model) that fits it.

    A weight is copied when the checkpoint has a tensor of the same name and shape (BatchNorm
    statistics included). So the shared encoder always carries over (for the same encoder and
    size), and the decoders too when the number of classes is the same; a head whose last
    layer has another number of classes is re-made, as are heads the checkpoint has not.

    Args:
        model: a freshly built cellkit model.
        source: a shipped model's name, a checkpoint file or a run folder.

    Returns:
        an [`InitReport`][].

    Raises:
        CheckpointError: for an unreadable checkpoint.
        ValueError: when nothing at all fits (another encoder or size): the message names both.
    """
    import torch
    ckpt = load_checkpoint(resolve_checkpoint(source))
    weights = ckpt.get("model") or {}
    own = model.state_dict()
    copied, remade = [], []
    new_state = {}
    for name, tensor in own.items():
        theirs = weights.get(name)
        if isinstance(theirs, torch.Tensor) and tuple(theirs.shape) == tuple(tensor.shape):
            new_state[name] = theirs.to(dtype=tensor.dtype)
            copied.append(name)
        else:
            remade.append(name)
    ignored = [n for n in weights if n not in own]
    encoder = [n for n in own if n.startswith("encoder.") and own[n].ndim > 0]
    fits = [n for n in copied if n.startswith("encoder.") and own[n].ndim > 0]
    if len(fits) < 0.5 * max(1, len(encoder)):  # (BatchNorm's scalar counters fit anything)
        cfg = ckpt.get("config") or {}
        theirs = (cfg.get("model") or {}).get("encoder") if isinstance(cfg, dict) else None
        raise ValueError(
            f"{ckpt.get('path', source)} does not fit this model: {len(fits)} of the {len(encoder)} encoder weights "
            f"have the name and shape of this model's (its encoder: {theirs!r}). Use the same preset size (--size) as the "
            "checkpoint's, or train from scratch."
        )
    model.load_state_dict(new_state, strict=False)
    return InitReport(Path(str(ckpt.get("path", source))), copied, remade, ignored)
