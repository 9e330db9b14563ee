"""Validation of a training round, and the calibration of the peaks on the best weights.

**The best checkpoint** is the round with the highest *score* = mean over classes of the
total F1 of the main head on the validation split (classes without a validation cell are
left out of the mean); on a tie the earlier round is kept. Validation runs after every
round of a step schedule (every ``cfg.train.val_every`` epochs of an epoch schedule) and
always after the last one. The validation images are predicted as ``cellkit predict
--precision fp32`` does (tiled [`predict_probabilities`][cellkit.engine.predict.predict_probabilities];
an image of one tile takes its map from the pass that gave its losses); with
``train.calibrate`` each class's peak threshold is chosen on those maps
([`cellkit.engine.calibrate`][]) before [`cellkit.metrics.evaluate`][] matches the peaks
with the annotated points within ``cfg.train.radius`` pixels. The loss terms are computed
on whole validation images. After the last round the best weights are calibrated once
more (minimum distance too) and the result is stored in ``best.pt`` (``postprocess``,
``calibration``) and ``calibration.json``. Without validation images, ``best.pt`` is the
last round and keeps the config's peaks.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellkit.builder import apply_activation
from cellkit.config import CellkitConfig
from cellkit.data import collate
from cellkit.data.io import jsonable, write_text_atomic
from cellkit.engine.calibrate import calibrate_peaks, class_counts
from cellkit.engine.checkpoint import load_checkpoint, save_checkpoint
from cellkit.engine.distributed import DistInfo, all_gather_objects
from cellkit.engine.loop import _fmt, _StepContext
from cellkit.engine.predict import DEFAULT_TILE_SIZE, Predictor, _stored_calibration, predict_probabilities
from cellkit.metrics import evaluate
from cellkit.progress import PhaseTimes
from cellkit.registry import POSTPROCESSORS

__all__ = ["run_score"]


def run_score(f1: Mapping[str, float | None] | None) -> float:
    """The score that picks ``best.pt``: the mean over classes of total F1 (``nan`` if none).

    Classes whose F1 is undefined (``None``/``nan``) are left out of the mean.

    Examples:
        >>> run_score({"other": 0.5, "positive": 0.7})
        0.6
    """
    if not f1:
        return float("nan")
    values = [float(v) for v in f1.values() if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else float("nan")


def _final_calibration(cfg: CellkitConfig, model: nn.Module, best_path: Path, out: Path,
                       val_samples: Sequence[Any], class_names: list[str], ctx: _StepContext,
                       info: DistInfo, progress: bool | None = None, times: PhaseTimes | None = None) -> None:
    """Calibrate thresholds and minimum distances on the best weights; store them in best.pt.

    Writes ``<run>/calibration.json`` too. A copy of the model gets best.pt's weights (the
    model itself keeps the last step's). ``times`` gets the phases (``"calibration"``,
    ``"calibration (int8)"``), which it announces.
    """
    times = times if times is not None else PhaseTimes(show=info.is_main and progress is not False)
    best = load_checkpoint(best_path, map_location="cpu")
    model = copy.deepcopy(model)
    model.load_state_dict(best["model"])
    truths = [(s.points, s.classes) for s in val_samples]
    base = dict(best.get("postprocess") or cfg.postprocess.kwargs)
    d0 = cfg.postprocess.kwargs.get("min_distance")
    grid_d = None
    if isinstance(d0, (int, float)) and not isinstance(d0, bool):
        grid_d = sorted({max(1, int(round(f * d0))) for f in (0.67, 1.0, 1.33)})
    with times.phase("calibration", announce=f"calibrating the peaks of the best weights on {len(val_samples)} "
                                             "validation images"):
        # The stored thresholds are applied to maps cellkit predict makes: in float32 on the CPU (a
        # bfloat16 training's validation maps would calibrate them on other numbers).
        maps = _validation_maps(model, val_samples, ctx, info,
                                precision="fp32" if ctx.dev.type == "cpu" else ctx.precision)
        cal = calibrate_peaks(maps, truths, radius=cfg.train.radius, class_names=class_names, kwargs=base,
                              name=cfg.postprocess.name, min_distances=grid_d,
                              relative=cfg.model.activation == "identity", rounds=2)
    if info.is_main:
        best["postprocess"] = cal.kwargs
        best["calibration"] = cal.to_dict()
        report = cal.to_dict()
        cal8 = _int8_calibration(cfg, model, best, val_samples, truths, class_names, cal.kwargs, grid_d, times)
        if cal8 is not None:
            # What cellkit predict runs by default on the CPU: its thresholds come from its own maps.
            best["postprocess_int8"] = cal8.kwargs
            best["calibration_int8"] = cal8.to_dict()
            report = {**report, "int8": cal8.to_dict()}
        save_checkpoint(best_path, best)
        write_text_atomic(out / "calibration.json", json.dumps(jsonable(report), indent=2) + "\n")
        if progress is not False:
            thresholds = cal.kwargs.get("threshold")
            per = [f"{n} threshold {thresholds[c]:.3g}" if isinstance(thresholds, list) else n
                   for c, n in enumerate(class_names)]
            print(f"calibrated peaks on {len(val_samples)} validation images: "
                  + ", ".join(f"{p} F1 {_fmt(cal.f1[n])}" for p, n in zip(per, class_names))
                  + f" (score {_fmt(cal.before)} -> {_fmt(cal.score)})", file=sys.stderr, flush=True)


def _int8_calibration(cfg: CellkitConfig, model: nn.Module, best: Mapping[str, Any], val_samples: Sequence[Any],
                      truths: Sequence[tuple[Any, Any]], class_names: list[str], start: Mapping[str, Any],
                      grid_d: list[int] | None, times: PhaseTimes | None = None) -> Any:
    """Peaks calibrated on the maps ``cellkit predict`` makes by default on the CPU (int8).

    The maps come from a [`Predictor`][cellkit.engine.predict.Predictor] built as
    ``Predictor.from_checkpoint`` builds it (``precision="auto"`` on the CPU, quantized on the
    crops ``best.pt`` stores), so the thresholds fit what users run. ``None`` where ``"auto"``
    does not run int8 (no x86 engine; a depthwise or non-cellkit model).
    """
    cpu_model = copy.deepcopy(model).cpu().eval()
    post = POSTPROCESSORS.build(cfg.postprocess.name, **dict(start))
    predictor = Predictor(cpu_model, post, int(cfg.model.num_classes), class_names, device="cpu",
                          precision="auto", int8_calibration=_stored_calibration(dict(best)))
    if predictor.precision != "int8":
        return None
    times = times if times is not None else PhaseTimes(show=False)
    with times.phase("calibration (int8)", announce="calibrating the peaks on the int8 maps that cellkit predict "
                                                     "runs by default on the CPU"):
        maps = [predictor.probabilities(s.image) for s in val_samples]
        return calibrate_peaks(maps, truths, radius=cfg.train.radius, class_names=class_names, kwargs=dict(start),
                               name=cfg.postprocess.name, min_distances=grid_d,
                               relative=cfg.model.activation == "identity", rounds=1)


def _better(score: float, best: float) -> bool:
    """``score`` beats ``best``; ties keep the earlier epoch, ``nan`` never wins."""
    if not math.isfinite(score):
        return False
    return not math.isfinite(best) or score > best


def _validation_maps(model: nn.Module, val_samples: Sequence[Any], ctx: _StepContext,
                     info: DistInfo, precision: str | None = None) -> list[np.ndarray]:
    """The main head's maps of every validation image, by the tiles of ``cellkit predict``.

    Sharded over ranks (rank ``r`` runs images ``r, r + world_size, ...``) and gathered, so
    every rank returns all maps in order.
    """
    local = [(i, predict_probabilities(model, val_samples[i].image, device=ctx.dev,
                                        precision=precision or ctx.precision))
             for i in range(info.rank, len(val_samples), info.world_size)]
    parts = all_gather_objects(local)
    return [m for _, m in sorted((item for part in parts for item in part), key=lambda item: item[0])]


@torch.no_grad()
def _validate(model: nn.Module, val_ds: Any, val_samples: Sequence[Any], loss_fn: nn.Module,
              cfg: CellkitConfig, class_names: list[str], ctx: _StepContext, info: DistInfo,
              ) -> tuple[dict[str, float], dict[str, float | None], dict[str, float | None], dict[str, Any]]:
    """Loss terms, F1 per class and the peak arguments used, on the validation images.

    Losses and maps come from [`_validation_pass`][]. Peaks with thresholds calibrated on
    these maps when ``train.calibrate`` (else the config's), matched within ``train.radius``.
    A class with no annotated cell in the validation images has F1 ``None`` and does not count
    in the score. Sharded over ranks; every rank returns the same values.
    """
    val_terms, maps = _validation_pass(model, val_ds, val_samples, loss_fn, ctx, info)
    truths = [(s.points, s.classes) for s in val_samples]
    kwargs = dict(cfg.postprocess.kwargs)
    if cfg.train.calibrate:
        kwargs = calibrate_peaks(maps, truths, radius=cfg.train.radius, class_names=class_names, kwargs=kwargs,
                                 name=cfg.postprocess.name, relative=cfg.model.activation == "identity").kwargs
    post = POSTPROCESSORS.build(cfg.postprocess.name, **kwargs)
    report = evaluate([post(m) for m in maps], truths, radius=cfg.train.radius,
                      num_classes=cfg.model.num_classes, class_names=class_names)
    total_f1, mean_f1 = _f1_by_class(report, class_names, truths)
    return val_terms, total_f1, mean_f1, kwargs


@torch.no_grad()
def _validation_pass(model: nn.Module, val_ds: Any, val_samples: Sequence[Any], loss_fn: nn.Module,
                     ctx: _StepContext, info: DistInfo) -> tuple[dict[str, float], list[np.ndarray]]:
    """The mean loss terms over the validation images, and the main head's map of each image.

    The loss terms come from whole images through all heads. The maps are those ``cellkit
    predict`` makes in float32 (tiled [`predict_probabilities`][cellkit.engine.predict.predict_probabilities]):
    an image no larger than one tile is that tile, so its map is the main head of the same
    pass that gave the losses (one network pass per image); larger images are tiled.
    Sharded over ranks (rank ``r`` runs images ``r, r + world_size, ...``) and gathered: every
    rank returns all maps, in order.
    """
    was_training = model.training
    model.eval()
    labels = list(loss_fn.labels)
    local = []
    try:
        for i in range(info.rank, len(val_ds), info.world_size):
            batch = collate([val_ds[i]])
            outputs = ctx.forward(model, ctx.images(batch))
            total, terms = loss_fn(outputs, ctx.targets(batch))
            image = val_samples[i].image
            if _fits_one_tile(image) and hasattr(model, "main"):
                probs = apply_activation(outputs[model.main][0], model.activation).cpu().numpy()
            else:
                probs = predict_probabilities(model, image, device=ctx.dev, precision=ctx.precision)
            local.append((i, [float(total)] + [float(terms[k]) for k in labels], probs))
    finally:
        model.train(was_training)
    parts = all_gather_objects(local)
    gathered = sorted((item for part in parts for item in part), key=lambda item: item[0])
    losses = np.mean([item[1] for item in gathered], axis=0)
    val_terms = {"total": float(losses[0]), **{k: float(v) for k, v in zip(labels, losses[1:])}}
    return val_terms, [item[2] for item in gathered]


def _fits_one_tile(image: np.ndarray) -> bool:
    """``image`` is one tile of [`predict_probabilities`][cellkit.engine.predict.predict_probabilities]'s default tiling."""
    return max(image.shape[:2]) <= DEFAULT_TILE_SIZE


def _f1_by_class(report: Any, class_names: list[str], truths: Sequence[tuple[Any, Any]],
                 ) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Total and mean F1 per class name; ``None`` for a class with no annotated cell."""
    present = set(np.flatnonzero(class_counts(truths, len(class_names))).tolist())
    total = {n: (float(report.total_f1[c]) if c in present else None) for c, n in enumerate(class_names)}
    mean = {n: (float(report.mean_f1[c]) if c in present else None) for c, n in enumerate(class_names)}
    return total, mean
