"""Build models, losses, targets and post-processors from a [`CellkitConfig`][].

Every builder first checks the whole config ([`check_config`][]): each registry name,
each keyword argument and each wiring (a loss that reads a head the model lacks, or a
target no generator makes), and reports all problems at once before building anything.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cellkit.config import CellkitConfig, ConfigError, ModelConfig
from cellkit.lookup import look_up_option, unknown_option_message
from cellkit.losses import LossTerm, WeightedLoss
from cellkit.models import MultiDecoderModel
from cellkit.registry import DECODERS, ENCODERS, LOSSES, MASKS, POSTPROCESSORS, Registry

__all__ = [
    "ACTIVATIONS",
    "Parts",
    "apply_activation",
    "build",
    "build_losses",
    "build_model",
    "build_postprocess",
    "build_targets",
    "check_buildable",
    "check_config",
    "config_problems",
    "model_problems",
]

ACTIVATIONS = ("sigmoid", "identity")


def _kwargs_problems(registry: Registry[Any], name: str, kwargs: Mapping[str, Any], where: str,
                     provided: tuple[str, ...] = ()) -> list[str]:
    if name not in registry:
        return [f"{where}: {registry.unknown_message(name)}"]
    factory = registry.get(name)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    problems = []
    for key in kwargs:
        if key in provided:
            problems.append(f"{where}: {key!r} is set by the builder; remove it from the kwargs")
        elif key not in params:
            known = [k for k in params if k not in provided]
            problems.append(
                f"{where}: {registry.kind} {name!r} has no argument {key!r}; its arguments: {', '.join(known)}"
            )
    return problems


def model_problems(m: ModelConfig, where: str = "model") -> list[str]:
    """Every problem of a [`ModelConfig`][] (names, kwargs, heads, classes, activation)."""
    problems = _kwargs_problems(ENCODERS, m.encoder, m.encoder_kwargs, f"{where}.encoder")
    problems += _kwargs_problems(
        DECODERS, m.decoder, m.decoder_kwargs, f"{where}.decoder",
        provided=("encoder_channels", "encoder_strides", "num_classes"),
    )
    if "main" not in m.heads:
        problems.append(f"{where}.heads: 'main' is required (used at inference), got {list(m.heads)}")
    if len(set(m.heads)) != len(m.heads):
        problems.append(f"{where}.heads: duplicate head names in {list(m.heads)}")
    if not isinstance(m.num_classes, int) or m.num_classes < 1:
        problems.append(f"{where}.num_classes: expected an integer >= 1, got {m.num_classes!r}")
    if m.activation not in ACTIVATIONS:
        problems.append(f"{where}.activation: {unknown_option_message(m.activation, ACTIVATIONS, what='activation')}")
    return problems


def config_problems(cfg: CellkitConfig, *, _where: str = "config") -> list[str]:
    """Every problem of ``cfg`` as a list of messages (empty when it can be built)."""
    problems = model_problems(cfg.model, where=f"{_where}.model")
    m = cfg.model
    for tname, spec in cfg.targets.items():
        problems += _kwargs_problems(MASKS, spec.name, spec.kwargs, f"{_where}.targets.{tname}")
    if not cfg.losses:
        problems.append(f"{_where}.losses: at least one loss term is needed")
    labels: set[str] = set()
    for i, loss in enumerate(cfg.losses):
        where = f"{_where}.losses[{i}] ({loss.name})"
        problems += _kwargs_problems(LOSSES, loss.name, loss.kwargs, where)
        if loss.output not in m.heads:
            problems.append(f"{where}: output {loss.output!r} is not a head of the model {list(m.heads)}; "
                            f"add it to model.heads or change the output")
        if loss.name in LOSSES:
            reference = getattr(LOSSES.get(loss.name), "reference", "target")
            if reference == "output":
                if loss.against is None:
                    problems.append(f"{where}: compares two outputs; set 'against' to another head")
                elif loss.against not in m.heads:
                    problems.append(f"{where}: against {loss.against!r} is not a head of the model {list(m.heads)}")
            else:
                if loss.target is None:
                    problems.append(f"{where}: needs a 'target' (one of {sorted(cfg.targets)})")
                elif loss.target not in cfg.targets:
                    problems.append(f"{where}: target {loss.target!r} is not in targets {sorted(cfg.targets)}; "
                                    f"add a TargetSpec for it")
        if loss.resolved_label in labels:
            problems.append(f"{where}: duplicate label {loss.resolved_label!r}; set 'label' to tell them apart")
        labels.add(loss.resolved_label)
    used = {loss.target for loss in cfg.losses}
    for tname in cfg.targets:
        if tname not in used:
            problems.append(f"{_where}.targets.{tname}: no loss uses this target; remove it or add a loss")
    problems += _kwargs_problems(POSTPROCESSORS, cfg.postprocess.name, cfg.postprocess.kwargs,
                                 f"{_where}.postprocess")
    # A generator declares that it needs a stage-1 model (the prior does): never a name test.
    needing = [t for t, spec in cfg.targets.items()
               if spec.name in MASKS and getattr(MASKS.get(spec.name), "needs_stage1", False)]
    if needing and cfg.pretrain is None:
        problems.append(f"{_where}.pretrain: each of the targets {needing} needs a stage-1 config (pretrain) "
                        f"whose model it uses (e.g. the prior); see cellkit.presets.ours_plus_plus")
    if cfg.pretrain is not None:
        problems += config_problems(cfg.pretrain, _where=f"{_where}.pretrain")
    return problems


def check_config(cfg: CellkitConfig) -> None:
    """Raise [`ConfigError`][] listing every problem of ``cfg``; return when it is buildable.

    One pass over everything a config can get wrong: the parts (registered names, their
    arguments, heads, targets and losses that fit together: [`config_problems`][]) and the
    values the types alone do not say (class maps, peak arguments, training values:
    [`CellkitConfig.problems`][cellkit.config.CellkitConfig.problems]), every stage included.
    """
    if not isinstance(cfg, CellkitConfig):
        raise TypeError(f"Expected a CellkitConfig, got {type(cfg).__name__}; build one with cellkit.presets.")
    problems = config_problems(cfg)
    problems += [p for p in cfg.problems() if p not in problems]
    if problems:
        raise ConfigError(f"Config {cfg.name!r} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Parts:
    """Everything one config builds ([`build`][]).

    Attributes:
        config: the config they were built from (checked).
        model: the [`MultiDecoderModel`][cellkit.models.MultiDecoderModel], carrying its activation.
        loss: the weighted sum of the loss terms ([`WeightedLoss`][cellkit.losses.WeightedLoss]).
        targets: the mask generators, by target name.
        postprocess: maps -> [`Detections`][cellkit.points.Detections], with the config's
            peak arguments (training calibrates its own on the validation images; a trained
            model's are in its checkpoint: [`Predictor.from_checkpoint`][cellkit.engine.predict.Predictor.from_checkpoint]).

    The data format is not a part: [`get_format`][cellkit.data.formats.get_format] names it.
    """

    config: CellkitConfig
    model: nn.Module
    loss: nn.Module
    targets: dict[str, Any]
    postprocess: Any


def build(cfg: CellkitConfig, overrides: Mapping[str, Mapping[str, Any]] | None = None, *,
          check: bool = True) -> Parts:
    """Check ``cfg`` once and build every part of it.

    Args:
        cfg: the config.
        overrides: extra keyword arguments per target name (see [`build_targets`][]).
        check: ``False`` for a config that [`check_config`][] has passed already (training
            checks once, before its first stage, and builds each stage unchecked).

    Raises:
        ConfigError: listing every problem of the config, before anything is built.

    Examples:
        >>> import cellkit
        >>> parts = build(cellkit.presets.ours_plus(size="cpu"))
        >>> parts.model.heads, sorted(parts.targets)
        (('main', 'dynamic'), ['circle', 'dynamic'])
        >>> parts.loss.labels  # doctest: +NORMALIZE_WHITESPACE
        ['main/ce', 'main/iou', 'dynamic/dynamic',
         'main~dynamic/consistency']
    """
    if check:
        check_config(cfg)
    return Parts(
        config=cfg,
        model=_model(cfg.model),
        loss=_losses(cfg),
        targets=_targets(cfg, overrides),
        postprocess=POSTPROCESSORS.build(cfg.postprocess.name, **cfg.postprocess.kwargs),
    )


def check_buildable(cfg: CellkitConfig, *, check: bool = True) -> None:
    """[`check_config`][], then build every part but the model of each stage (cheap).

    Catches what only a factory can say (a circle radius of -4) before a run starts.
    ``check=False`` builds the parts only, for a config that [`check_config`][] has passed.

    Raises:
        ConfigError: listing every problem of the config.
        ValueError, TypeError: what a part's constructor raises, naming the part.
    """
    if check:
        check_config(cfg)
    for stage in cfg.stages():
        _losses(stage), _targets(stage, None)
        POSTPROCESSORS.build(stage.postprocess.name, **stage.postprocess.kwargs)


def build_model(cfg: CellkitConfig | ModelConfig) -> nn.Module:
    """The multi-decoder model of ``cfg``: one encoder, one decoder per head.

    The model carries ``activation`` (``sigmoid`` or ``identity``) for inference.

    Raises:
        ConfigError: listing every problem of the config.
    """
    if isinstance(cfg, CellkitConfig):
        check_config(cfg)
        return _model(cfg.model)
    problems = model_problems(cfg)
    if problems:
        raise ConfigError("Model config problems:\n  - " + "\n  - ".join(problems))
    return _model(cfg)


def _model(m: ModelConfig) -> nn.Module:
    encoder = ENCODERS.build(m.encoder, **m.encoder_kwargs)
    decoders = {
        head: DECODERS.build(
            m.decoder,
            encoder_channels=encoder.channels,
            encoder_strides=encoder.strides,
            num_classes=m.num_classes,
            **m.decoder_kwargs,
        )
        for head in m.heads
    }
    return MultiDecoderModel(encoder, decoders, activation=m.activation)


def build_losses(cfg: CellkitConfig) -> nn.Module:
    """The weighted sum of ``cfg.losses`` (a [`WeightedLoss`][cellkit.losses.WeightedLoss])."""
    check_config(cfg)
    return _losses(cfg)


def _losses(cfg: CellkitConfig) -> nn.Module:
    terms = [
        LossTerm(
            label=spec.resolved_label,
            module=LOSSES.build(spec.name, **spec.kwargs),
            weight=float(spec.weight),
            output=spec.output,
            target=spec.target,
            against=spec.against,
        )
        for spec in cfg.losses
    ]
    return WeightedLoss(terms)


def build_targets(cfg: CellkitConfig, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The mask generators of ``cfg.targets``, by target name.

    Args:
        cfg: the config.
        overrides: extra keyword arguments per target name, for what a YAML file cannot
            hold (training hands the ``prior`` its stage-1 model through the generator's
            ``prepare`` hook instead: [`cellkit.masks.prepare`][cellkit.masks.prepare]).
    """
    check_config(cfg)
    return _targets(cfg, overrides)


def _targets(cfg: CellkitConfig, overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(cfg.targets))
    if unknown:
        raise ConfigError(f"overrides for unknown targets {unknown}; targets are {sorted(cfg.targets)}")
    return {
        name: MASKS.build(spec.name, **{**spec.kwargs, **overrides.get(name, {})})
        for name, spec in cfg.targets.items()
    }


def build_postprocess(cfg: CellkitConfig) -> Any:
    """The post-processor of ``cfg`` (probability maps -> [`Detections`][cellkit.points.Detections])."""
    p = cfg.postprocess
    problems = _kwargs_problems(POSTPROCESSORS, p.name, p.kwargs, "postprocess")
    if problems:
        raise ConfigError("\n".join(problems))
    return POSTPROCESSORS.build(p.name, **p.kwargs)


def apply_activation(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Probability (``sigmoid``) or density (``identity``) maps from a decoder's logits."""
    if look_up_option(activation, ACTIVATIONS, what="activation") == "sigmoid":
        return torch.sigmoid(logits)
    return logits
