"""Presets: the rows of the paper's Table 1 as plain functions returning configs.

| preset | what it trains |
|---|---|
| ``fcrn`` | main head regressing Gaussian density maps with MSE (FCRN baseline [5]) |
| ``estimate_mask`` | main head on masks estimated from points and colour (EstimateMask [1]) |
| ``ours`` | main head on circle masks, Lm = 0.8 CE + 0.2 IoU |
| ``ours_plus`` | + dynamic head on random polygons (Ld, weight 1) and consistency (Lc, 0.5) |
| ``ours_plus_plus`` | + prior head on the tissue prior of an early-stopped model (Lp, 0.5) |

Each takes ``size``: ``"paper"`` (ResNet-101 DeepLabV3+, decoder width 256, the paper's
optimiser) or ``"cpu"`` (ResNet-18 at half width and a 64-wide decoder, for 2-core
machines). FLOPs per megapixel of the inference pass, measured with
``torch.utils.flop_counter.FlopCounterMode`` by
``cellkit.models.flops.flops_per_megapixel(model, size=256)`` on the inference pass
(encoder + main decoder, 2 classes; a multiply-add counts 2 FLOPs): ``paper`` **675.5
GFLOP/MP**, ``cpu`` **46.3 GFLOP/MP**, 14.6x fewer (see [`MEASURED_GFLOPS_PER_MEGAPIXEL`][];
``tests/test_config.py`` checks the ratio stays >= 10).

Examples:
    >>> import cellkit
    >>> cfg = cellkit.presets.ours_plus(size="cpu")
    >>> sorted(cfg.model.heads)
    ['dynamic', 'main']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from cellkit.config import (
    CellkitConfig,
    DataConfig,
    LossSpec,
    ModelConfig,
    PostprocessConfig,
    TargetSpec,
    TrainConfig,
)
from cellkit.geometry import Geometry
from cellkit.lookup import look_up_option

__all__ = [
    "PRESETS",
    "RECIPE",
    "SIZES",
    "MEASURED_GFLOPS_PER_MEGAPIXEL",
    "estimate_mask",
    "fcrn",
    "get_preset",
    "ours",
    "ours_plus",
    "ours_plus_plus",
    "set_pretrain_fraction",
]

SIZES: dict[str, dict[str, Any]] = {
    "paper": {
        "encoder": "resnet101",
        "encoder_kwargs": {"output_stride": 16},
        "decoder_kwargs": {"width": 256, "low_level_width": 48},
        "train": {"steps": 5000, "val_every_steps": 500, "batch_size": 8, "crop_size": 512},
        "pretrain_fraction": 0.1,
    },
    "cpu": {
        "encoder": "resnet18",
        "encoder_kwargs": {"output_stride": 16, "width_multiplier": 0.5},
        "decoder_kwargs": {"width": 64, "low_level_width": 24},
        # 800 steps: across regions of EndoNuke, +0.062 [+0.041, +0.084] epithelium totalF1 and
        # +0.018 [+0.012, +0.024] other against 400 (docs/training.md, "A schedule in steps").
        "train": {"steps": 800, "val_every_steps": 50, "batch_size": 8, "crop_size": 256},
        "pretrain_fraction": 0.25,
    },
}
"""Model and schedule per size.

``cpu`` is >= 10x cheaper than ``paper`` per megapixel.
The schedule is in optimizer steps, whatever the number of images (see ``docs/training.md``
for how it was chosen): ``steps`` batches of ``batch_size`` crops of ``crop_size``
(crops larger than the training images are cut to them), a linear warm-up over
``warmup`` of the steps, then cosine decay; validation every ``val_every_steps``; half the
crops centred on a cell of a class drawn uniformly; peak thresholds calibrated on the
validation images. ``pretrain_fraction``: the stage-1 model of ``ours_plus_plus`` is
stopped after this share of stage 2's steps (the paper: 10 of 100 epochs)."""

RECIPE: dict[str, Any] = {"warmup": 0.05, "scheduler": "cosine", "cell_crop": 0.5, "balance_classes": True,
                          "calibrate": True}
"""Schedule settings shared by both sizes."""

MEASURED_GFLOPS_PER_MEGAPIXEL: dict[str, float] = {"paper": 675.5, "cpu": 46.3}
"""Inference GFLOPs per megapixel (2 classes, main head), measured with
``flops_per_megapixel(build_model(ours(size=...)), size=256)`` on 2026-11-26."""


def _base(name: str, size: str, heads: tuple[str, ...], num_classes: int, radius: float | None,
          eval_radius: float | None, min_distance: int | None, steps: int | None = None,
          cell_diameter: float | None = None) -> CellkitConfig:
    """The shared config; with no size given, the geometry is estimated from the points."""
    s = copy.deepcopy(look_up_option(size, SIZES, what="size"))
    if radius is not None and cell_diameter is not None:
        raise ValueError("Give the circle radius or the cell diameter, not both (radius = diameter / 2).")
    train = {**s["train"], **RECIPE}
    if steps is not None:
        train["steps"] = int(steps)
    auto = radius is None and cell_diameter is None
    # Placeholders when auto (replaced at the start of training by the estimate).
    geometry = Geometry(2 * _circle_radius(radius, cell_diameter), "given")
    return CellkitConfig(
        name=name,
        model=ModelConfig(
            encoder=s["encoder"],
            encoder_kwargs=s["encoder_kwargs"],
            decoder="deeplabv3plus",
            decoder_kwargs=s["decoder_kwargs"],
            heads=heads,
            num_classes=num_classes,
        ),
        postprocess=PostprocessConfig(
            "peaks",
            {"threshold": 0.5,
             "min_distance": int(min_distance if min_distance is not None else geometry.min_distance),
             "exclusive": True},
        ),
        train=TrainConfig(**train, radius=float(eval_radius if eval_radius is not None else geometry.match_radius)),
        # All images but the validation share train: test images are the user's own, kept apart.
        data=DataConfig(test_fraction=0.0,
                        cell_diameter="auto" if auto and eval_radius is None and min_distance is None else None),
    )


def _main_losses(target: str) -> list[LossSpec]:
    # Lm = alpha * Lce + (1 - alpha) * LIoU with alpha = 0.8 (eq. 3).
    # eps=1 smooths the soft IoU of crops where a class has no cell (a constant, not a spike).
    return [LossSpec("ce", 0.8, output="main", target=target),
            LossSpec("iou", 0.2, output="main", target=target, kwargs={"eps": 1.0})]


def _circle_radius(radius: float | None, cell_diameter: float | None) -> float:
    """The given radius, half the given diameter, or the 4-px placeholder of ``"auto"``."""
    if radius is not None:
        return float(radius)
    return float(cell_diameter) / 2 if cell_diameter is not None else 4.0


def ours(size: str = "cpu", num_classes: int = 2, radius: float | None = None, eval_radius: float | None = None,
         min_distance: int | None = None, *, steps: int | None = None,
         cell_diameter: float | None = None) -> CellkitConfig:
    """``Ours``: encoder + main decoder on fixed-radius circle masks, Lm = 0.8 CE + 0.2 IoU.

    Args:
        size: ``"cpu"`` or ``"paper"``.
        num_classes: classes (class 1 = class of interest).
        radius: circle radius in pixels (about half a cell's diameter); with neither it nor
            ``cell_diameter`` the sizes are estimated from the training points
            (``data.cell_diameter = "auto"``, see [`cellkit.geometry`][cellkit.geometry]).
        eval_radius: matching radius of validation F1 (default 3/4 of a cell diameter).
        min_distance: peak minimum distance (default 3/8 of a cell diameter).
        steps: optimizer steps (default: the size's, see [`SIZES`][]).
        cell_diameter: the cells' diameter in pixels (instead of ``radius``).
    """
    cfg = _base("ours", size, ("main",), num_classes, radius, eval_radius, min_distance, steps, cell_diameter)
    r = _circle_radius(radius, cell_diameter)
    cfg.targets = {"circle": TargetSpec("circle", {"radius": r})}
    cfg.losses = _main_losses("circle")
    return cfg


def ours_plus(size: str = "cpu", num_classes: int = 2, radius: float | None = None,
              eval_radius: float | None = None, min_distance: int | None = None, *, steps: int | None = None,
              cell_diameter: float | None = None) -> CellkitConfig:
    """``Ours+``: ``ours`` + a dynamic decoder on random polygons (Ld) and consistency (Lc).

    Lt = Lm + 0.5 Lc + 1.0 Ld; the polygons are drawn anew every iteration around the
    circle radius (eq. 4, 5; L1 norm, mean reduction).
    """
    cfg = ours(size, num_classes, radius, eval_radius, min_distance, steps=steps, cell_diameter=cell_diameter)
    cfg.name = "ours_plus"
    cfg.model.heads = ("main", "dynamic")
    cfg.targets["dynamic"] = TargetSpec("random_polygon", {"base_radius": cfg.targets["circle"].kwargs["radius"]})
    cfg.losses += [
        LossSpec("dynamic", 1.0, output="dynamic", target="dynamic"),
        LossSpec("consistency", 0.5, output="main", against="dynamic"),
    ]
    return cfg


def ours_plus_plus(size: str = "cpu", num_classes: int = 2, radius: float | None = None,
                   eval_radius: float | None = None, min_distance: int | None = None,
                   pretrain_epochs: int | None = None, *, steps: int | None = None,
                   cell_diameter: float | None = None, pretrain_fraction: float | None = None) -> CellkitConfig:
    """``Ours++``: ``ours_plus`` + a prior decoder on the tissue prior (Lp).

    Lt = Lm + 0.5 Lc + 0.5 Lp + 1.0 Ld (eq. 7). The prior target is the class-1 output of
    a stage-1 model (encoder + main decoder, circle masks, CE only) stopped early: after
    ``pretrain_fraction`` of stage 2's steps (default: the size's, [`SIZES`][]; the paper
    stops at 10 of 100 epochs), or ``pretrain_epochs`` epochs when given (epoch schedule).
    ``cellkit train`` runs that stage first.
    """
    cfg = ours_plus(size, num_classes, radius, eval_radius, min_distance, steps=steps, cell_diameter=cell_diameter)
    cfg.name = "ours_plus_plus"
    cfg.model.heads = ("main", "dynamic", "prior")
    cfg.targets["prior"] = TargetSpec("prior", {"class_index": 1})
    cfg.losses.append(LossSpec("prior", 0.5, output="prior", target="prior", kwargs={"class_index": 1}))
    stage1 = ours(size, num_classes, radius, eval_radius, min_distance, steps=steps, cell_diameter=cell_diameter)
    stage1.name = "ours_plus_plus/pretrain"
    stage1.losses = [LossSpec("ce", 1.0, output="main", target="circle")]
    stage1.train.calibrate = False  # its output is a target, never counted
    if pretrain_epochs is not None:
        stage1.train.steps = None
        stage1.train.epochs = int(pretrain_epochs)
    else:
        set_pretrain_fraction(cfg, pretrain_fraction if pretrain_fraction is not None
                              else SIZES[size]["pretrain_fraction"], stage1)
    cfg.pretrain = stage1
    return cfg


def set_pretrain_fraction(cfg: CellkitConfig, fraction: float, stage1: CellkitConfig | None = None) -> None:
    """Stop stage 1 after ``fraction`` of stage 2's steps (its warm-up and validation scaled too).

    Raises:
        ValueError: for a fraction outside (0, 1], or a stage 2 without ``train.steps``.
    """
    stage1 = stage1 if stage1 is not None else cfg.pretrain
    if stage1 is None:
        raise ValueError(f"{cfg.name} has no stage 1 (pretrain); only ours_plus_plus does.")
    if not 0 < float(fraction) <= 1:
        raise ValueError(f"pretrain fraction must be in (0, 1], got {fraction!r}.")
    if cfg.train.steps is None:
        raise ValueError("pretrain fraction needs a schedule in steps (train.steps); set pretrain.train.epochs.")
    steps = max(1, int(round(float(fraction) * cfg.train.steps)))
    stage1.train.steps = steps
    stage1.train.val_every_steps = steps  # one validation, at its end (it is not selected on)


def fcrn(size: str = "cpu", num_classes: int = 2, radius: float | None = None, eval_radius: float | None = None,
         min_distance: int | None = None, sigma: float | None = None, scale: float = 100.0, *,
         steps: int | None = None, cell_diameter: float | None = None) -> CellkitConfig:
    """``FCRN`` baseline: regress a Gaussian density map per class with MSE.

    Each cell's kernel integrates to ``scale`` (100, the usual FCRN scaling, so the
    regression target is not vanishingly small); the peak of a kernel is
    ``scale / (2 pi sigma^2)``, and peaks are kept above 30 % of it (before calibration).
    ``sigma`` defaults to a quarter of the cell diameter.
    """
    cfg = _base("fcrn", size, ("main",), num_classes, radius, eval_radius, min_distance, steps, cell_diameter)
    if sigma is not None:
        cfg.data.cell_diameter = None
    r = _circle_radius(radius, cell_diameter)
    sigma = float(sigma if sigma is not None else max(1.0, r / 2))
    cfg.model.activation = "identity"
    cfg.targets = {"density": TargetSpec("gaussian", {"sigma": sigma, "scale": scale})}
    cfg.losses = [LossSpec("mse", 1.0, output="main", target="density")]
    cfg.postprocess.kwargs["threshold"] = round(0.3 * scale / (2 * math.pi * sigma**2), 4)
    return cfg


def estimate_mask(size: str = "cpu", num_classes: int = 2, radius: float | None = None,
                  eval_radius: float | None = None, min_distance: int | None = None, *,
                  steps: int | None = None, cell_diameter: float | None = None) -> CellkitConfig:
    """``EstimateMask`` baseline: main head on masks estimated from the points and the image
    (Voronoi cells intersected with a colour clustering), Lm = 0.8 CE + 0.2 IoU."""
    cfg = _base("estimate_mask", size, ("main",), num_classes, radius, eval_radius, min_distance, steps,
                cell_diameter)
    r = _circle_radius(radius, cell_diameter)
    cfg.targets = {"estimated": TargetSpec("estimated", {"radius": r})}
    cfg.losses = _main_losses("estimated")
    return cfg


PRESETS: dict[str, Callable[..., CellkitConfig]] = {
    "fcrn": fcrn,
    "estimate_mask": estimate_mask,
    "ours": ours,
    "ours_plus": ours_plus,
    "ours_plus_plus": ours_plus_plus,
}
"""Preset name -> function, in the order of the paper's Table 1."""


def get_preset(name: str, **kwargs: Any) -> CellkitConfig:
    """The preset ``name`` built with ``kwargs``.

    Raises:
        UnknownOptionError: (a ``ValueError``) for an unknown name, listing the close ones.

    Examples:
        >>> get_preset("ours", size="cpu").name
        'ours'
    """
    return look_up_option(name, PRESETS, what="preset")(**kwargs)
