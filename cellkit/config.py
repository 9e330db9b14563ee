"""Typed configuration of a cellkit model and its training, as plain dataclasses.

A config says *what* to build by registry name plus keyword arguments; the builder
([`cellkit.builder`][cellkit.builder]) checks every name and every wiring and builds it.
Configs round-trip to plain dicts and YAML, so a run's folder records exactly what was
trained:

```python
cfg = cellkit.presets.ours_plus(size="cpu")
text = cfg.to_yaml()
assert CellkitConfig.from_yaml(text) == cfg
```
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellkit.data.classes import ClassMap
from cellkit.data.io import write_text_atomic
from cellkit.data.split import resolve_groups
from cellkit.lookup import unknown_option_message
from cellkit.postprocess import postprocess_problems

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TargetSpec",
    "LossSpec",
    "PostprocessConfig",
    "TrainConfig",
    "DataConfig",
    "CellkitConfig",
    "SCHEDULERS",
    "train_problems",
]


class ConfigError(ValueError):
    """A config that cannot be read or built; the message lists every problem found."""


@dataclass
class ModelConfig:
    """The network: one shared encoder and identical decoders, one per head.

    Attributes:
        encoder: name in [`cellkit.ENCODERS`][cellkit.ENCODERS] (``resnet18`` ... ``resnet101``).
        encoder_kwargs: keyword arguments of the encoder (``output_stride``,
            ``width_multiplier``, ``weights`` = a local torchvision ``.pth`` file).
        decoder: name in [`cellkit.DECODERS`][cellkit.DECODERS]; every head gets its own instance.
        decoder_kwargs: keyword arguments of the decoder (``width``, ``aspp_rates``...).
        heads: decoder names; ``main`` is required and is the only one used at inference.
        num_classes: output channels of every decoder (class 1 = class of interest).
        activation: ``sigmoid`` (probability maps) or ``identity`` (density regression, FCRN).
    """

    encoder: str = "resnet18"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    decoder: str = "deeplabv3plus"
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)
    heads: tuple[str, ...] = ("main",)
    num_classes: int = 2
    activation: str = "sigmoid"


@dataclass
class TargetSpec:
    """A training target: a mask generator by name, with its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossSpec:
    """One weighted loss term, wired to a decoder output and a target or another output.

    Attributes:
        name: name in [`cellkit.LOSSES`][cellkit.LOSSES].
        weight: the term's weight in the total loss.
        output: the head whose logits are the prediction.
        target: the target name (key of ``CellkitConfig.targets``) for losses against a target.
        against: the other head, for losses between two outputs (``consistency``).
        kwargs: keyword arguments of the loss (``norm``, ``stop_gradient``...).
        label: the name the term is logged under (default ``"<output>/<name>"``).
    """

    name: str
    weight: float = 1.0
    output: str = "main"
    target: str | None = None
    against: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def resolved_label(self) -> str:
        """``label``, or ``"<output>/<name>"`` (``"<output>~<against>/<name>"`` between outputs)."""
        if self.label:
            return self.label
        if self.against:
            return f"{self.output}~{self.against}/{self.name}"
        return f"{self.output}/{self.name}"


@dataclass
class PostprocessConfig:
    """Probability maps to points: a post-processor by name (``peaks``) and its arguments.

    ``peaks`` takes ``threshold`` (one value, or one per class) in ``[0, 1]`` on the
    probability maps of a sigmoid model, ``>= 0`` on the density maps of an ``identity``
    model (FCRN), and ``min_distance``, an integer ``>= 1`` (checked by
    [`CellkitConfig.check`][]).
    """

    name: str = "peaks"
    kwargs: dict[str, Any] = field(
        default_factory=lambda: {"threshold": 0.5, "min_distance": 3, "exclusive": True}
    )


@dataclass
class TrainConfig:
    """How to train (the paper: Adam, lr 1e-3, betas (0.9, 0.999), weight decay 2e-5).

    A run is measured in optimizer **steps** when ``steps`` is set (the presets' default):
    ``steps`` batches in all, validated every ``val_every_steps`` steps, whatever the number
    of images. With ``steps = None`` it runs ``epochs`` x ``steps_per_epoch`` batches.
    The learning rate warms up linearly over the first ``warmup`` share of the steps, then
    follows ``scheduler`` (per step) to the end.

    Attributes:
        steps: total optimizer steps (``None``: ``epochs`` x ``steps_per_epoch``).
        val_every_steps: with ``steps``, validate (and checkpoint) every this many steps.
        warmup: share of the steps with a linear learning-rate warm-up (0 = none).
        cell_crop: probability that a training crop is placed on a random annotated cell,
            else the crop is uniform over the image.
        balance_classes: cells for ``cell_crop`` are drawn class first (a class chosen
            uniformly, then one of its cells anywhere in the training split), so a rare
            class is seen as often as a common one; else uniformly over all cells of the
            image.
        calibrate: pick each class's peak threshold (and minimum distance) that maximises
            F1 on the validation images, at every validation, and store it in the
            checkpoint (``cellkit predict`` uses it unless ``--threshold`` is given).
        epochs: passes over ``steps_per_epoch`` batches (or the whole training split).
        batch_size: images per step.
        crop_size: side of the random training crops (smaller images are padded).
        steps_per_epoch: batches per epoch; ``None`` = one pass over the training split.
        lr, betas, weight_decay: Adam's settings.
        scheduler: ``None`` (constant after the warm-up), ``"cosine"`` (to 0 at the last
            step) or ``"step"`` (x0.1 at 2/3 of the steps).
        grad_clip: max gradient norm, or ``None``.
        amp: mixed precision where the hardware computes it natively: float16 on CUDA (with a
            gradient scaler), bfloat16 on CPUs with AVX512-BF16 or AMX (about twice the steps
            per second), float32 elsewhere; the loss terms run in float32 (see
            [`training_autocast_dtype`][cellkit.engine.inference.training_autocast_dtype]).
        channels_last: memory format of the model and inputs.
        seed: makes a CPU run repeatable.
        num_workers: DataLoader workers (0 = in the main process).
        radius: matching radius (pixels) of the validation F1 (set from the cell diameter
            when ``data.cell_diameter`` is used).
        augment: keyword arguments of [`cellkit.data.Augment`][cellkit.data.Augment]
            (``{}`` = defaults, ``None`` = no augmentation).
        val_every: validate every this many epochs (when ``steps`` is None).
        ema: average the weights over the steps (an exponential moving average with this
            decay per step, e.g. ``0.995``; ``None`` = no): validation, ``best.pt`` and
            ``last.pt``'s ``model`` hold the averaged weights (what predictions use), while
            training goes on from the raw ones (``last.pt``'s ``train_model``). The decay
            starts low, ``min(ema, (1 + n) / (10 + n))`` after ``n`` steps, so the first
            steps do not stay in the average.
        init_from: start from trained weights: a shipped model's name
            ([`cellkit.zoo`][cellkit.zoo]) or a checkpoint; every weight whose name and
            shape fit is copied (the encoder, and the heads when the classes agree), the
            rest is initialised as usual. ``None`` = no.
    """

    steps: int | None = None
    val_every_steps: int = 100
    warmup: float = 0.0
    cell_crop: float = 0.0
    balance_classes: bool = False
    calibrate: bool = False
    epochs: int = 50
    batch_size: int = 8
    crop_size: int = 256
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 2e-5
    scheduler: str | None = None
    grad_clip: float | None = None
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    num_workers: int = 0
    radius: float = 6.0
    augment: dict[str, Any] | None = field(default_factory=dict)
    val_every: int = 1
    init_from: str | None = None
    ema: float | None = None


@dataclass
class DataConfig:
    """Where the data is and how its labels map onto cellkit classes.

    Attributes:
        root: dataset folder (``None``: the bundled EndoNuke sample).
        format: ``csv``, ``bcdata``, ``endonuke`` or ``geojson``.
        class_map: source label -> class index, ``None`` = the format's default. The
            indices must be exactly ``0 .. K-1``, every one used, and ``K`` must equal
            ``model.num_classes`` (checked by [`CellkitConfig.check`][]).
        class_names: names of the classes, index order: one name per class.
        split: the BCData split folder (``train``/``validation``/``test``), if any.
        val_fraction, test_fraction: held-out shares, split by group (slide/tile range).
        split_seed: seed of the split.
        group: what keeps a slide in one split: ``None`` or ``"format"`` (the format's
            rule: EndoNuke blocks of 100 tile ids, others each image), ``"image"``,
            ``"blocks:N"``, ``"runs:GAP"``, ``"prefix"``, ``"regex:PATTERN"`` or
            ``"csv:FILE"`` ([`resolve_groups`][cellkit.data.split.resolve_groups]).
        cell_diameter: the cells' diameter in pixels, from which the target sizes, peak
            distance and validation matching radius are derived
            ([`apply_geometry`][cellkit.geometry.apply_geometry]); ``"auto"`` = estimated
            from the training points at the start of training (the number found is what the run's
            ``config.yaml`` records); ``None`` = use the sizes written in the config.
        mpp: micrometres per pixel of the images, when known (recorded with the model).
    """

    root: str | None = None
    format: str = "endonuke"
    class_map: dict[str, int] | None = None
    class_names: tuple[str, ...] | None = None
    split: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    group: str | None = None
    cell_diameter: float | str | None = None
    mpp: float | None = None


@dataclass
class CellkitConfig:
    """Everything needed to build and train one model.

    Attributes:
        name: a label (the preset's name).
        model: the network.
        targets: target name -> mask generator spec, built from the points of each image.
        losses: the weighted loss terms.
        postprocess: maps to points.
        train: the schedule.
        data: the data.
        pretrain: stage 1 (the paper's early-stopped pre-trained model whose class-1 output
            is the ``prior`` target), itself a config; ``None`` when no target needs it.
        plugins: the plug-in modules the parts come from (see `cellkit.plugins`), top
            level only. `cellkit train --config` imports them before checking the config,
            and nothing else does (not `from_yaml`, not a checkpoint): elsewhere it is a
            record. Written to YAML and dicts only when not empty.
    """

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    targets: dict[str, TargetSpec] = field(default_factory=dict)
    losses: list[LossSpec] = field(default_factory=list)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: CellkitConfig | None = None
    plugins: list[str] = field(default_factory=list)

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of builtins (tuples become lists), the inverse of [`from_dict`][].

        `plugins` comes first when it is not empty and is left out when it is, so configs
        without plug-ins read (and compare) as before it existed.
        """
        return _plugins_first(_to_plain(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellkitConfig:
        """Read a config from a plain dict; unknown keys are errors naming the close ones.

        Raises:
            ConfigError: listing every unknown key and wrong type.
        """
        problems: list[str] = []
        cfg = _from_plain(cls, data, "config", problems)
        if problems:
            raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
        return cfg

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written (atomically) to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            write_text_atomic(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> CellkitConfig:
        """Read a config from a YAML file path or YAML text, and check its values.

        Besides [`from_dict`][]'s checks of keys and types, the values are checked
        ([`problems`][]: the class map, the peak thresholds...). Every message starts
        with the file's name (``config.yaml``), and a YAML syntax error names the line.

        Raises:
            FileNotFoundError: for a path that does not exist.
            ConfigError: for YAML that is not a valid config.
        """
        text = str(source)
        name = "config text"
        if isinstance(source, Path) or (("\n" not in text) and text.endswith((".yaml", ".yml"))):
            path = Path(source)
            if not path.is_file():
                what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
                raise FileNotFoundError(f"Config file {path} {what}; pass a .yaml file (e.g. a run's config.yaml).")
            try:
                text = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"{path}: not UTF-8 text (byte {err.start}); a config is a YAML text file, "
                    "such as the config.yaml of a run folder."
                ) from err
            name = str(path)
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python tags
        except yaml.YAMLError as err:
            raise ConfigError(_yaml_error_message(name, err)) from err
        if not isinstance(data, dict):
            raise ConfigError(
                f"{name}: a config must be a YAML mapping (lines of 'key: value', such as "
                f"'name: ours'), got {type(data).__name__}."
            )
        try:
            cfg = cls.from_dict(data)
            cfg.check()
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from err
        return cfg

    def problems(self) -> list[str]:
        """Every problem of the config's values, of this stage and its stage 1, as messages.

        What [`from_dict`][] cannot see from the types alone: a class map whose classes
        are not exactly ``0 .. K-1`` with one name each, or that disagrees with
        ``model.num_classes``; peak thresholds outside ``[0, 1]`` on probability maps
        (``>= 0`` on density maps, ``activation: identity``) and a ``min_distance`` below 1.
        ``CellkitConfig.from_yaml`` runs it; checkpoints, which may hold older configs, are
        read without it.

        Examples:
            >>> cfg = CellkitConfig(
            ...     postprocess=PostprocessConfig(kwargs={"threshold": 5}))
            >>> print(*cfg.problems(), sep="\\n")  # doctest: +ELLIPSIS
            config.postprocess.kwargs.threshold: expected a value in [0, 1] (...),
            got 5; use e.g. 0.5
        """
        out: list[str] = []
        stage: CellkitConfig | None = self
        where = "config"
        while stage is not None:
            if where != "config" and stage.plugins:
                out.append(f"{where}.plugins: plug-ins are loaded for the whole run; list them in the "
                           f"top-level plugins: of the config, got {list(stage.plugins)!r} under pretrain")
            out += _data_problems(stage, where)
            out += _postprocess_problems(stage, where)
            if isinstance(stage.train, TrainConfig):
                out += train_problems(stage.train, f"{where}.train")
            stage, where = stage.pretrain, f"{where}.pretrain"
        return out

    def check(self) -> None:
        """Raise [`ConfigError`][] listing every [`problems`][] of the config."""
        problems = self.problems()
        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError(
                f"Invalid config {self.name!r}, {len(problems)} problems:\n  - " + "\n  - ".join(problems)
            )

    def stages(self) -> list[CellkitConfig]:
        """This config and its stage 1 (``pretrain``, and so on), the ones that train.

        Examples:
            >>> cfg = CellkitConfig(pretrain=CellkitConfig(name="stage1"))
            >>> [c.name for c in cfg.stages()]
            ['custom', 'stage1']
        """
        out, stage = [], self
        while stage is not None:
            out.append(stage)
            stage = stage.pretrain
        return out

    def replace(self, **changes: Any) -> CellkitConfig:
        """A copy with top-level fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (else the last silently wins)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_message(name: str, err: yaml.YAMLError) -> str:
    """``config.yaml line 3 column 7: <what PyYAML found>; how to fix it``."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    if mark is None or problem is None:
        return (f"{name}: not valid YAML ({err}); a config is lines of 'key: value', nested keys "
                "indented with spaces.")
    where = f"{name} line {mark.line + 1} column {mark.column + 1}"
    detail = str(problem)
    context_mark = getattr(err, "context_mark", None)
    if context:
        detail += f" ({context}"
        if context_mark is not None and context_mark.line != mark.line:
            detail += f" at line {context_mark.line + 1}"
        detail += ")"
    return (
        f"{where}: not valid YAML: {detail}. Expected lines of 'key: value' with nested keys "
        "indented by spaces (no tabs), lists as '- item' or [a, b], and quotes around a value "
        "holding ': ' or ' #'; fix that line (or the one above it)."
    )


SCHEDULERS = ("cosine", "step")
"""Learning-rate schedules of ``TrainConfig.scheduler`` (``None`` = constant)."""


def train_problems(t: TrainConfig, where: str = "train") -> list[str]:
    """Every problem of a [`TrainConfig`][]'s values, as messages (``where`` prefixes each)."""
    problems = []
    if t.scheduler is not None and t.scheduler not in SCHEDULERS:
        problems.append(f"{where}.scheduler: " + unknown_option_message(
            t.scheduler, SCHEDULERS, what="scheduler", hint="Or None for a constant learning rate."))
    for name in ("epochs", "batch_size"):
        value = getattr(t, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"{where}.{name}: expected an integer >= 1, got {value!r}")
    steps = t.steps_per_epoch
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        problems.append(f"{where}.steps_per_epoch: expected None or an integer >= 1, got {steps!r}")
    if t.ema is not None and (isinstance(t.ema, bool) or not isinstance(t.ema, (int, float)) or not 0 < t.ema < 1):
        problems.append(f"{where}.ema: expected None or a decay between 0 and 1 (e.g. 0.995), got {t.ema!r}")
    if t.grad_clip is not None and not t.grad_clip > 0:
        problems.append(f"{where}.grad_clip: expected None or a number > 0, got {t.grad_clip!r}")
    if not isinstance(t.val_every, int) or t.val_every < 1:
        problems.append(f"{where}.val_every: expected an integer >= 1, got {t.val_every!r}")
    if t.crop_size is not None and (not isinstance(t.crop_size, int) or t.crop_size < 1):
        problems.append(f"{where}.crop_size: expected an integer >= 1, got {t.crop_size!r}")
    if t.steps is not None and (isinstance(t.steps, bool) or not isinstance(t.steps, int) or t.steps < 1):
        problems.append(f"{where}.steps: expected None or an integer >= 1, got {t.steps!r}")
    if isinstance(t.val_every_steps, bool) or not isinstance(t.val_every_steps, int) or t.val_every_steps < 1:
        problems.append(f"{where}.val_every_steps: expected an integer >= 1, got {t.val_every_steps!r}")
    for name in ("warmup", "cell_crop"):
        value = getattr(t, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1 \
                or (name == "warmup" and value >= 1):
            bound = "[0, 1)" if name == "warmup" else "[0, 1]"
            problems.append(f"{where}.{name}: expected a share in {bound}, got {value!r}")
    return problems


def _data_problems(cfg: CellkitConfig, where: str) -> list[str]:
    d, k = cfg.data, cfg.model.num_classes
    if not isinstance(d, DataConfig) or not isinstance(k, int):
        return []
    out = _data_value_problems(d, f"{where}.data")
    if out:
        return out
    names = list(d.class_names) if d.class_names else None
    if d.class_map is None:
        if names is not None and len(names) != k:
            return [f"{where}.data.class_names: expected one name per class (model.num_classes is {k}), "
                    f"got {len(names)} names {names}; give {k} names, or set model.num_classes: {len(names)}"]
        return []
    try:
        cmap = ClassMap.parse(dict(d.class_map), names=names)
    except ValueError as err:
        return [f"{where}.data.class_map: {err}"]
    if cmap.num_classes != k:
        return [f"{where}.data.class_map maps onto {cmap.num_classes} classes {list(cmap.names)}, but "
                f"model.num_classes is {k}; expected the same number: set model.num_classes: "
                f"{cmap.num_classes}, or map the labels onto 0..{k - 1}"]
    return []


def _data_value_problems(d: DataConfig, where: str) -> list[str]:
    out = []
    group = getattr(d, "group", None)
    if group is not None:
        try:
            resolve_groups([], str(group))
        except ValueError as err:
            out.append(f"{where}.group: {err}")
    size = d.cell_diameter
    if not (size is None or size == "auto" or (isinstance(size, (int, float)) and not isinstance(size, bool)
                                                and 0 < size < float("inf"))):
        out.append(f"{where}.cell_diameter: expected 'auto', null or a number of pixels > 0, got {size!r}")
    fractions = {}
    for name in ("val_fraction", "test_fraction"):
        value = getattr(d, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            out.append(f"{where}.{name}: expected a share in [0, 1), got {value!r}")
        else:
            fractions[name] = float(value)
    if not out and sum(fractions.values()) >= 1:
        out.append(f"{where}: val_fraction + test_fraction is {sum(fractions.values()):g}, leaving no training "
                   "images; expected a sum below 1 (e.g. val_fraction: 0.15, test_fraction: 0)")
    return out


def _postprocess_problems(cfg: CellkitConfig, where: str) -> list[str]:
    p = cfg.postprocess
    if not isinstance(p, PostprocessConfig):
        return []
    k = cfg.model.num_classes if isinstance(cfg.model.num_classes, int) else None
    return postprocess_problems(p.name, p.kwargs, activation=cfg.model.activation, num_classes=k,
                                where=f"{where}.postprocess.kwargs")


def _plugins_first(data: dict[str, Any]) -> dict[str, Any]:
    """`plugins` first when not empty, dropped when empty (at every stage)."""
    if isinstance(data.get("pretrain"), dict):
        data["pretrain"] = _plugins_first(data["pretrain"])
    plugins = data.pop("plugins", None)
    return {"plugins": plugins, **data} if plugins else data


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp`` (dataclasses, containers, optionals), collecting problems."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_plain(tp, value, where, problems)
    if origin in (typing.Union, types.UnionType):
        return _union_from_plain(tp, value, where, problems)
    if origin in (tuple, list, dict):
        return _container_from_plain(tp, value, where, problems)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            problems.append(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value  # Any, and types the config does not check


def _dataclass_from_plain(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return None
    hints = typing.get_type_hints(tp)
    names = [f.name for f in dataclasses.fields(tp)]
    kwargs = {}
    for key, item in value.items():
        if key not in names:
            problems.append(f"{where}: {unknown_option_message(key, names, what='key')}")
            continue
        kwargs[key] = _from_plain(hints[key], item, f"{where}.{key}", problems)
    required = [f.name for f in dataclasses.fields(tp)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in value:
            problems.append(f"{where}: missing required key {name!r}")
    try:
        return tp(**kwargs)
    except TypeError:
        return None


def _union_from_plain(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) == 1:
        return _from_plain(non_none[0], value, where, problems)
    for arg in non_none:  # e.g. str | int: the first that fits without problems
        trial: list[str] = []
        out = _from_plain(arg, value, where, trial)
        if not trial:
            return out
    problems.append(f"{where}: expected {tp}, got {value!r}")
    return value


def _container_from_plain(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return value
        return {k: _from_plain(args[1], v, f"{where}.{k}", problems) for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        problems.append(f"{where}: expected a list, got {value!r}")
        return value
    if origin is list:
        return [_from_plain(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_from_plain(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if len(args) != len(value):
        problems.append(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(value)
    return tuple(_from_plain(a, v, f"{where}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value)))
