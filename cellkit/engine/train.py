"""Training: the paper's two stages, validation, checkpoints, resuming, one or many processes.

[`fit`][] trains a config into a run folder:

```python
import cellkit
from cellkit.engine import fit

cfg = cellkit.presets.ours_plus_plus(size="cpu")
result = fit(cfg, "runs/ours_pp")             # stage 1, then stage 2
result.best_path                              # runs/ours_pp/best.pt
```

Before the first step [`resolve_for_data`][] fixes what depends on the training images
(the cell geometry when ``data.cell_diameter`` is ``"auto"``, crops no larger than the
images) and the lines saying what was chosen are printed.

**Rounds.** Training runs in *rounds*, each ending with validation and a checkpoint: with
``train.steps`` (the presets' schedule) a round is ``train.val_every_steps`` optimizer
steps, whatever the number of images; with ``train.steps = None`` a round is an epoch
(``steps_per_epoch`` batches or one pass). The learning rate follows
[`schedule_factor`][] per optimizer step. The ``epoch`` fields below count rounds.

The schedule (section 3 of the paper):

* **Stage 1** (only when ``cfg.pretrain`` is set, i.e. a target is the ``prior``): the
  pre-trained model (encoder + main decoder, circle masks, CE only) is trained for
  ``cfg.pretrain.train.steps`` steps (a share of stage 2's, see
  [`cellkit.presets.set_pretrain_fraction`][]; 10 of 100 epochs in the paper) and stopped
  there: early stopping here means a short, fixed schedule, so its *last* checkpoint (``pretrain/last.pt``) is
  the model whose class-1 output becomes the prior target. Stage 1 has its own folder
  ``<run>/pretrain/`` (``config.yaml``, ``metrics.jsonl``, ``last.pt``, ``best.pt``), is
  resumed like stage 2, and is skipped when finished.
* The prior of each image is computed once and cached in ``<run>/prior_cache``; the
  cache's fingerprint is [`file_fingerprint`][cellkit.engine.checkpoint.file_fingerprint] of
  ``pretrain/last.pt``, so a changed stage-1 checkpoint invalidates it.
* **Stage 2** trains the multi-task model of ``cfg`` with its weighted loss (``ours_plus_plus``:
  Lt = Lm + 0.5 Lc + 0.5 Lp + 1.0 Ld).

The run folder:

| File | What it holds |
|---|---|
| `<run>/config.yaml` | the resolved config (`CellkitConfig.to_yaml`) |
| `<run>/metrics.jsonl` | one JSON object per round (see below) |
| `<run>/last.pt` | the state after the last finished round (resumes training) |
| `<run>/best.pt` | the state of the best validated round, with the calibrated peaks and 16 small crops of the training images that calibrate int8 inference on the CPU |
| `<run>/calibration.json` | the peak arguments chosen on the validation images (`train.calibrate`) |
| `<run>/curves.png` | the loss terms and validation F1 against the steps ([`cellkit.engine.plots`][]) |
| `<run>/pretrain/...` | stage 1, same layout (`ours_plus_plus` only) |
| `<run>/prior_cache/` | the cached prior targets (`ours_plus_plus` only) |

Each ``metrics.jsonl`` line holds ``stage``, ``epoch`` (the round, 1-based), ``epochs``,
``steps`` (of the round), ``step`` (optimizer steps so far), ``lr`` (at the round's start), ``time`` (seconds, training + validation), ``train`` (mean of every
loss term over the epoch, by the [`WeightedLoss`][cellkit.losses.WeightedLoss] labels, plus
``total``), ``val`` (the same on the validation images), ``f1`` (total F1 per class name at
``cfg.train.radius``; ``null`` for a class with no cell in the validation images),
``mean_f1`` (the per-image mean F1 per class), ``score``, ``best`` and ``postprocess`` (the
peak arguments the F1 was computed with). Values that are not finite are written as ``null``.

**The best checkpoint** is the round with the highest *score* = mean over classes of the
total F1 of the main head on the validation split (classes without a validation cell are
left out of the mean); on a tie the earlier round is kept. Validation runs after every
round of a step schedule (every ``cfg.train.val_every`` epochs of an epoch schedule) and
always after the last one. The validation images are predicted exactly as ``cellkit
predict`` does (tiled [`predict_probabilities`][cellkit.engine.predict.predict_probabilities]); with
``train.calibrate`` each class's peak threshold is chosen on those maps
([`cellkit.engine.calibrate`][]) before [`cellkit.metrics.evaluate`][] matches the peaks
with the annotated points within ``cfg.train.radius`` pixels. The loss terms are computed
on whole validation images. After the last round the best weights are calibrated once
more (minimum distance too) and the result is stored in ``best.pt`` (``postprocess``,
``calibration``) and ``calibration.json``. Without validation images, ``best.pt`` is the
last round and keeps the config's peaks.

**Resuming.** Checkpoints are written atomically (best first, then last, then the metrics
line). ``fit(..., resume=True)`` continues from ``last.pt`` (and from
``pretrain/last.pt`` in stage 1) and reaches the same weights as an uninterrupted run,
because all randomness of an epoch is drawn from ``(seed, epoch)``: torch, numpy and
Python are seeded with ``seed * 1000 + epoch`` at the start of each epoch (dropout, the
DataLoader's worker seeds), the sampler's generator likewise, and the dataset gets
``set_epoch(epoch)``. ``epochs`` (of an epoch schedule) may be raised on resume to train
further; any other
change of the config is an error. A folder that already holds a run is never
overwritten. The equality is exact on the CPU; on CUDA, kernels that are not
deterministic (cuDNN's backward, atomics) make runs differ in the last bits, resumed or
not.

**Distributed.** Under ``torchrun`` (see [`cellkit.engine.distributed`][]) each process
trains on its shard of the training split with DistributedDataParallel; ``batch_size``
and ``steps_per_epoch`` are per process (the global batch is ``batch_size x world_size``).
Epoch losses are averaged over all ranks. Validation is sharded: rank ``r`` predicts
validation images ``r, r + world_size, ...`` and the maps and losses are gathered, so every
rank calibrates and computes the same F1 and score. BatchNorm statistics are copied from rank
0 after each epoch so every rank validates the model rank 0 saves. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellkit.builder import build, check_buildable, check_config
from cellkit.config import CellkitConfig, ConfigError, TrainConfig
from cellkit.data.io import make_folder
from cellkit.engine.checkpoint import file_fingerprint, load_checkpoint, save_checkpoint
from cellkit.engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
    sync_buffers,
    unwrap,
    wrap_model,
)
from cellkit.engine.evaluate import jsonable
from cellkit.engine.predict import resolve_device

__all__ = ["RUN_EXISTS_MESSAGE", "TrainResult", "fit", "run_score"]

RUN_EXISTS_MESSAGE = (
    "{out} already holds a run; pass --resume to continue it or choose another --out "
    "(in Python: fit(..., resume=True) or another out_dir)."
)
"""The error for a folder that already holds a run (``{out}`` is the folder)."""

# Config keys that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = (
    "train.epochs", "train.num_workers", "pretrain.train.epochs", "pretrain.train.num_workers",
    "plugins",  # a record of the modules loaded (cellkit.plugins), not of what is trained
)


@dataclass
class TrainResult:
    """What [`fit`][] returns.

    Attributes:
        out_dir: the run folder.
        best_path: ``<out_dir>/best.pt``, the best validated epoch.
        last_path: ``<out_dir>/last.pt``, the last finished epoch.
        history: one dict per epoch, as written to ``metrics.jsonl``.
        best_score: the best epoch's score (mean over classes of total F1; ``nan`` when
            nothing was validated).
        pretrain: the result of stage 1, when the config has one.
    """

    out_dir: Path
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = float("nan")
    pretrain: TrainResult | None = None


def fit(
    cfg: CellkitConfig,
    out_dir: str | os.PathLike[str],
    *,
    samples: Sequence[Any] | None = None,
    splits: Mapping[str, Sequence[Any]] | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``cfg`` into the run folder ``out_dir`` (stage 1 first when ``cfg.pretrain`` is set).

    Args:
        cfg: the config (e.g. ``cellkit.presets.ours_plus_plus(size="cpu")``).
        out_dir: the run folder; created if missing. A folder that already holds a run is
            refused unless ``resume``.
        samples: the images ([`cellkit.data.Sample`][]), split into train/val/test by
            [`cellkit.data.split_by_group`][] with ``cfg.data``'s fractions and seed.
            Default: ``cellkit.data.load_dataset`` of ``cfg.data.root`` (or the bundled
            EndoNuke sample) in ``cfg.data.format`` with ``cfg.data``'s class map.
        splits: the split, given directly: ``{"train": [...], "val": [...]}`` and optionally
            ``"test"`` (kept only as keys in the checkpoints). Overrides ``samples``.
        resume: continue the run in ``out_dir`` from its ``last.pt``; a finished run is
            returned as is unless ``cfg.train.epochs`` was raised.
        device: ``"cuda"``, ``"cpu"``, ``"cuda:1"``...; default ``"cuda"`` when available.
            Under ``torchrun`` a CUDA process uses ``cuda:<LOCAL_RANK>``.
        progress: what is printed to stderr while training. `None` (the default, and
            `cellkit train`'s): a progress bar on a terminal; elsewhere (a log file, a
            notebook, a batch job) a plain line every 10% of the steps or 30 seconds,
            whichever comes first, with the step, the rate (steps/s) and the time left.
            `True`: always the bar (a widget in notebooks, through `tqdm.auto`).
            `False`: nothing. Unless `False`, also the lines of what was chosen, one
            summary line per round and the path of `curves.png`.
        max_steps: at most this many steps per epoch (for smoke tests).

    Returns:
        A [`TrainResult`][] (on every rank).

    Raises:
        FileExistsError: when ``out_dir`` holds a run and ``resume`` is False.
        ConfigError: for a config that does not build, an unknown scheduler, annotations
            with a class >= ``model.num_classes``, or a resumed run whose stored config
            differs (other than ``epochs``).
        ValueError: for bad ``splits``, an empty training split, or ``max_steps < 1``.
        FloatingPointError: when the training loss is not finite.

    Examples:
        Not run here (it trains a model and writes ``runs/smoke``):

        >>> cfg = cellkit.presets.ours(size="cpu")            # doctest: +SKIP
        >>> cfg.train.epochs, cfg.train.steps_per_epoch = 1, 2  # doctest: +SKIP
        >>> fit(cfg, "runs/smoke").history[-1]["f1"]           # doctest: +SKIP
        {'other': 0.41, 'epithelium': 0.35}
    """
    check_config(cfg)
    cfg.check()  # class maps, peak arguments, training values: what the types alone do not say
    if max_steps is not None and (isinstance(max_steps, bool) or int(max_steps) < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}.")
    out = Path(out_dir).expanduser()
    dev = resolve_device(device)
    info, created = init_distributed(dev.type)
    try:
        if info.enabled and dev.type == "cuda":
            dev = torch.device("cuda", info.local_rank)
        # Every rank checks before rank 0 writes anything (else rank 1 would see rank 0's files).
        _check_out_dir(out, resume)
        if info.is_main and out.is_dir():
            _remove_stale_temporaries(out)
        barrier()
        split, class_names = _resolve_splits(cfg, samples, splits)
        cfg, notes = resolve_for_data(cfg, split["train"])
        if info.is_main and progress is not False:
            for note in notes:
                print(note, file=sys.stderr, flush=True)
        _check_stored_config(out, cfg, resume)
        check_buildable(cfg)  # a factory's argument errors before the folder becomes a run
        if info.is_main and not (out / "config.yaml").exists():
            # Marks the folder as a run from the start (stage 1 can take a while); a resumed
            # run keeps its own until its config is checked against this one.
            make_folder(out)
            cfg.to_yaml(out / "config.yaml")
        common = dict(split=split, class_names=class_names, dev=dev, info=info, progress=progress,
                      max_steps=max_steps)

        pre_result = None
        if cfg.pretrain is not None:
            # Stage 1 resumes or is skipped when finished: out_dir was checked above.
            pre_result = _run_stage(cfg.pretrain, out / "pretrain", stage="pretrain", resume=True, **common)
        # Stage 2's targets get the stage-1 model through their prepare() hook.
        stage1 = pre_result.last_path if pre_result is not None else None
        result = _run_stage(cfg, out, stage="train", resume=resume, stage1=stage1, **common)
        result.pretrain = pre_result
        if info.is_main:
            _draw_curves(out, progress)
        barrier()
        return result
    finally:
        shutdown_distributed(created)


def resolve_for_data(cfg: CellkitConfig, train: Sequence[Any]) -> tuple[CellkitConfig, list[str]]:
    """The config to train on these training images, and lines saying what was chosen.

    * **geometry**: ``data.cell_diameter`` ``"auto"`` is estimated from the training points
      (never the validation or test ones) and every size derived from it
      ([`cellkit.geometry.resolve_geometry`][]);
    * **crops**: a ``crop_size`` larger than every training image is cut to the smallest
      image side (rounded down to a multiple of 32), instead of padding every crop;
    * the schedule, stated.

    The returned config is what ``config.yaml`` and the checkpoints record, so a resumed
    run resolves to the same one.
    """
    from cellkit.geometry import resolve_geometry

    cfg, geometry = resolve_geometry(cfg, train)
    notes = []
    if geometry is not None:
        notes.append("geometry: " + geometry.describe())
    smallest = min((min(s.image.shape[:2]) for s in train), default=None)
    for stage in cfg.stages():
        t = stage.train
        if smallest is not None and t.crop_size is not None and t.crop_size > smallest:
            new = max(32, smallest // 32 * 32) if smallest >= 32 else smallest
            notes.append(f"crops: {new} px (train.crop_size {t.crop_size} is larger than the smallest "
                         f"training image side, {smallest} px)")
            t.crop_size = new
    notes.append("schedule: " + describe_schedule(cfg))
    return cfg, notes


def describe_schedule(cfg: CellkitConfig) -> str:
    """One line: steps, batch, crops, learning rate, validation (and stage 1)."""
    def one(t: TrainConfig) -> str:
        if t.steps is not None:
            length = f"{t.steps} steps, validation every {t.val_every_steps}"
        else:
            per = t.steps_per_epoch if t.steps_per_epoch else "one pass"
            length = f"{t.epochs} epochs of {per} steps"
        lr = f"lr {t.lr:g}" + (f", {t.warmup:.0%} warm-up" if t.warmup else "")
        lr += f", {t.scheduler} decay" if t.scheduler else ", constant"
        crops = f"crops {t.crop_size}" if t.crop_size else "whole images"
        sampling = (f", {t.cell_crop:.0%} of crops on a cell{' of a class drawn uniformly' if t.balance_classes else ''}"
                    if t.cell_crop else "")
        return f"{length}, batch {t.batch_size}, {crops}{sampling}, {lr}"

    text = one(cfg.train) + (", peak thresholds calibrated on the validation images" if cfg.train.calibrate else "")
    if cfg.pretrain is not None:
        text += f"; stage 1: {one(cfg.pretrain.train)}"
    return text


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


# ---------------------------------------------------------------------------------------
# set-up


def _holds_run(out: Path) -> bool:
    markers = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "pretrain")
    return any((out / name).exists() for name in markers)


def _check_out_dir(out: Path, resume: bool) -> None:
    blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(
            f"{blocker} is a file; the run folder {out} must be a directory (choose another --out)."
        )
    if not resume and _holds_run(out):
        raise FileExistsError(RUN_EXISTS_MESSAGE.format(out=out))
    if not resume:
        from cellkit.data.guard import check_outputs

        # A new run writes these too; in a folder that is not a run they are someone else's.
        check_outputs(
            "cellkit train", [out / "curves.png", out / "calibration.json"],
            ours=lambda p: False,
            fix=f"a run folder holds only what cellkit train writes: give a new or empty --out (not {out}, "
                "which is not a run's folder: a data folder?)",
        )
    if resume and not _holds_run(out):
        raise FileNotFoundError(
            f"Nothing to resume in {out}: it holds no cellkit run (no config.yaml, last.pt or metrics.jsonl). "
            "Drop --resume to start a new run there, or give the folder of the run to continue."
        )


def _remove_stale_temporaries(out: Path) -> None:
    """The temporary files of writes killed in an earlier try of this run (a checkpoint's is large)."""
    from cellkit.data.io import remove_stale_temporaries

    for folder in [out, *sorted(p for p in out.rglob("*") if p.is_dir())]:
        remove_stale_temporaries(folder)


def _check_stored_config(out: Path, cfg: CellkitConfig, resume: bool) -> None:
    """A resumed run's config.yaml must be this config (also before its first checkpoint)."""
    path = out / "config.yaml"
    if not resume or not path.is_file() or (out / "last.pt").is_file():
        return  # last.pt's own config is checked when it is loaded
    stored = CellkitConfig.from_yaml(path)
    _check_resume({"config": stored.to_dict()}, cfg, path)


def _check_resumable(out: Path, last_path: Path, best_path: Path, metrics_path: Path) -> None:
    """Refuse to restart a stage whose ``last.pt`` is gone while its results remain."""
    if last_path.is_file():
        return
    left = [p.name for p in (best_path,) if p.is_file()]
    if metrics_path.is_file() and metrics_path.stat().st_size > 0:
        left.append(metrics_path.name)
    if left:
        raise FileNotFoundError(
            f"Cannot resume {out}: {last_path.name} is missing but {' and '.join(left)} exist, so resuming would "
            f"start from step 0 and replace them. Put {last_path.name} back (to resume from the best round "
            f"instead, copy {best_path.name} to {last_path.name}), or train into another folder."
        )


def _resolve_splits(cfg: CellkitConfig, samples: Sequence[Any] | None,
                    splits: Mapping[str, Sequence[Any]] | None) -> tuple[dict[str, list[Any]], list[str]]:
    """The train/val/test samples and the class names."""
    names: Sequence[str] | None = cfg.data.class_names
    if splits is not None:
        if not isinstance(splits, Mapping):
            raise ValueError(
                f"splits must be a dict with keys 'train', 'val' (and 'test'), got {type(splits).__name__}."
            )
        unknown = sorted(set(splits) - {"train", "val", "test"})
        missing = [k for k in ("train", "val") if k not in splits]
        if unknown or missing:
            raise ValueError(
                f"splits must have the keys 'train' and 'val' (and optionally 'test'); "
                f"missing {missing}, unknown {unknown}."
            )
        out = {k: list(v) for k, v in splits.items()}
        out.setdefault("test", [])
    else:
        if samples is None:
            from cellkit import data

            class_map = _class_map(cfg)
            if names is None and class_map is not None and len(class_map.names) == cfg.model.num_classes:
                names = class_map.names
            root = cfg.data.root or data.bundled_endonuke()
            samples = data.load_dataset(root, cfg.data.format, class_map=class_map, split=cfg.data.split,
                                        num_classes=cfg.model.num_classes)
        out = _split(list(samples), cfg)
    out = _without_tiny_images(out)
    if not out["train"]:
        raise ValueError(
            "The training split is empty; pass more images or lower data.val_fraction/test_fraction."
        )
    k = cfg.model.num_classes
    counts = np.bincount(np.concatenate([np.asarray(s.classes, dtype=np.int64) for s in out["train"]] + [
        np.zeros(0, np.int64)]), minlength=k)
    empty = [i for i in range(k) if counts[i] == 0]
    if empty:
        from cellkit.data.io import DataWarning

        names_now = _class_names(cfg, names)
        warnings.warn(
            f"The training images have no cell of class(es) {', '.join(f'{i} ({names_now[i]})' for i in empty)}: "
            "the model cannot learn them and their F1 is n/a. Check the class map (--class-map) or the "
            "annotations, or train with fewer classes.", DataWarning, stacklevel=3)
    for part in ("train", "val"):
        for s in out[part]:
            if len(s.classes) and int(np.max(s.classes)) >= k:
                where = f"{s.path} " if getattr(s, "path", None) else ""
                raise ConfigError(
                    f"Image {s.key!r} {where}({part}) has class {int(np.max(s.classes))}, but the model has {k} "
                    f"classes; map the dataset's labels onto 0..{k - 1} with --class-map (data.class_map: "
                    "source label -> class), or raise model.num_classes."
                )
    return out, _class_names(cfg, names)


#: Images with a side below this many pixels hold no cell worth a crop: they are left out.
MIN_IMAGE_SIDE = 16


def _without_tiny_images(split: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The splits less images smaller than ``MIN_IMAGE_SIDE`` a side, with a warning naming them."""
    from cellkit.data.io import DataWarning

    tiny = [s for part in split.values() for s in part if min(s.image.shape[:2]) < MIN_IMAGE_SIDE]
    if not tiny:
        return split
    shown = ", ".join(f"{getattr(s, 'path', None) or s.key} ({s.image.shape[1]} x {s.image.shape[0]})"
                      for s in tiny[:5]) + (f" and {len(tiny) - 5} more" if len(tiny) > 5 else "")
    warnings.warn(
        f"{len(tiny)} image(s) are smaller than {MIN_IMAGE_SIDE} px a side and were left out of training and "
        f"validation (they would shrink every crop to their size): {shown}. Remove them from the data "
        "folder, or check that they were exported whole.", DataWarning, stacklevel=3)
    drop = {id(s) for s in tiny}
    return {k: [s for s in v if id(s) not in drop] for k, v in split.items()}


def _class_map(cfg: CellkitConfig) -> Any:
    """``cfg.data.class_map``, or the format's usual map for ``model.num_classes`` classes.

    The defaults live in [`cellkit.data.formats`][] (EndoNuke with 2 classes reads as the
    paper's task, epithelium = 1 and the rest 0; BCData as negative = 0, positive = 1).
    Formats without one keep their labels as written.
    """
    from cellkit import data

    d = cfg.data
    if d.class_map is not None:
        names = list(d.class_names) if d.class_names else None
        return data.ClassMap.parse(dict(d.class_map), names=names)
    return data.get_format(d.format).class_map(cfg.model.num_classes)


def _split(samples: list[Any], cfg: CellkitConfig) -> dict[str, list[Any]]:
    """Split by group (``data.group``; by default the format's: EndoNuke blocks of 100 tile
    ids, BCData and others each image)."""
    from cellkit import data

    d = cfg.data
    fractions = (max(0.0, 1.0 - d.val_fraction - d.test_fraction), d.val_fraction, d.test_fraction)
    default = data.get_format(d.format).group
    rule = getattr(d, "group", None)
    try:
        groups = data.resolve_groups(samples, rule, default)
    except ValueError:
        if rule not in (None, "format") or default is None:
            raise
        # Keys without the format's numeric ids (samples passed by the caller): one group per image.
        groups = data.resolve_groups(samples, "image")
    by_key = {str(getattr(s, "key", s)): g for s, g in zip(samples, groups)}
    parts = data.split_by_group(samples, lambda k: by_key[k], fractions=fractions, seed=d.split_seed,
                                names=("train", "val", "test"))
    return {name: list(parts.get(name, [])) for name in ("train", "val", "test")}


def _class_names(cfg: CellkitConfig, names: Sequence[str] | None) -> list[str]:
    k = cfg.model.num_classes
    names = list(names) if names else [f"class{i}" for i in range(k)]
    if len(names) != k:
        raise ConfigError(
            f"data.class_names has {len(names)} names {names} but model.num_classes is {k}; "
            "give one name per class."
        )
    return [str(n) for n in names]


def schedule_factor(step: int, total: int, warmup: float, scheduler: str | None) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up from ``1 / warmup_steps`` to 1 over the first ``round(warmup x total)``
    steps, then ``None``: 1; ``"cosine"``: half a cosine from 1 down toward 0 (reached one
    step after the last); ``"step"``: 0.1 from 2/3 of the steps.

    Examples:
        >>> [round(schedule_factor(s, 10, 0.2, "cosine"), 3) for s in (0, 1, 2, 6, 9)]
        [0.5, 1.0, 1.0, 0.5, 0.038]
    """
    total = max(1, int(total))
    n_warm = int(round(float(warmup) * total))
    if step < n_warm:
        return (step + 1) / n_warm
    if scheduler is None:
        return 1.0
    if scheduler == "step":
        return 0.1 if step >= round(2 * total / 3) else 1.0
    span = max(1, total - n_warm)
    progress = min(1.0, (step - n_warm) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int) -> Any:
    """A per-step LambdaLR following [`schedule_factor`][] (``None`` when constant)."""
    if t.scheduler is None and not t.warmup:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(step, total_steps, t.warmup, t.scheduler))


def _plan(t: TrainConfig, loader_len: int, max_steps: int | None) -> tuple[int, list[int]]:
    """``(rounds, steps of each round)``: a round ends with validation and a checkpoint.

    With ``t.steps``: rounds of ``val_every_steps`` steps (the last one shorter); else
    ``t.epochs`` rounds of one loader pass. ``max_steps`` caps every round.
    """
    if t.steps is not None:
        every = int(t.val_every_steps)
        rounds = math.ceil(t.steps / every)
        sizes = [min(every, t.steps - i * every) for i in range(rounds)]
    else:
        sizes = [loader_len] * int(t.epochs)
    if max_steps is not None:
        sizes = [min(n, int(max_steps)) for n in sizes]
    return len(sizes), sizes


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1000 + epoch


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any] | None) -> None:
    if not state:
        return
    random.setstate(state["python"])
    # Format 2 stores numpy's key as a tensor (plain data); format 1 as an array.
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key.numpy() if isinstance(key, torch.Tensor) else key), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(where)
            else:
                out += _config_differences(old[key], new[key], where)
        return out
    return [] if old == new else [prefix]


def _check_resume(ckpt: Mapping[str, Any], cfg: CellkitConfig, path: Path) -> None:
    diffs = _config_differences(ckpt["config"], cfg.to_dict())
    diffs = [d for d in diffs if d not in _RESUMABLE_CHANGES]
    if diffs:
        raise ConfigError(
            f"Cannot resume {path}: the config differs from the one it was trained with in "
            f"{', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}. Resume with the run's own "
            f"config.yaml (only train.epochs may change), or train into another folder."
        )


def _write_metrics(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    from cellkit.data.io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(jsonable(r)) + "\n" for r in history))


def _append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(jsonable(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------
# one stage


@dataclass
class _Stage:
    """One training stage: its built parts, its files, and where it stands (see `_run_stage`)."""

    cfg: CellkitConfig
    out: Path
    name: str  # "train" | "pretrain"
    split: dict[str, list[Any]]
    class_names: list[str]
    info: DistInfo
    ctx: _StepContext
    progress: bool | None
    max_steps: int | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    targets: dict[str, Any]
    ckpt: dict[str, Any] | None = None  # the resumed last.pt
    start: int = 0  # rounds done
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = float("nan")
    chosen_post: dict[str, Any] = field(default_factory=dict)
    lines: _ProgressLines | None = None  # progress lines when stderr is not a terminal

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def result(self) -> TrainResult:
        return TrainResult(self.out, self.best_path, self.last_path, self.history, self.best_score)


def _run_stage(cfg: CellkitConfig, out: Path, *, stage1: Path | None = None, **kwargs: Any) -> TrainResult:
    """Train one stage into ``out``: set up (or resume), prepare the targets, run the rounds, calibrate.

    Every round is ``_train_epoch`` (its steps), then validation, then the checkpoints.
    """
    st = _set_up_stage(cfg, out, **kwargs)
    finished = st.start >= _plan(cfg.train, 1, st.max_steps)[0]
    if not finished:
        _prepare_targets(st, stage1)
        loader, train_ds, val_ds, sampler, sampler_gen = _loaders(st)
        rounds, sizes = _plan(cfg.train, len(loader), st.max_steps)
        scheduler = _build_scheduler(st.optimizer, cfg.train, sum(sizes))
        if scheduler is not None and st.ckpt is not None and st.ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(st.ckpt["scheduler"])
        unused = bool(set(unwrap(st.model).heads) - set(st.loss_fn.required_outputs))
        ddp_model = wrap_model(st.model, st.info, st.ctx.dev, unused_heads=unused)
        for epoch in range(st.start, rounds):
            _seed_round(cfg.train.seed, epoch, sampler_gen, sampler, train_ds)
            record, improved = _round(st, ddp_model, loader, val_ds, scheduler, epoch, sizes)
            _save_round(st, record, improved, scheduler, sum(sizes) if cfg.train.steps is not None else None)
        barrier()
    if st.info.is_main and st.best_path.is_file() and st.split["train"]:
        _store_int8_calibration(st.best_path, st.split["train"])  # first: the int8 calibration uses them
    barrier()
    if (cfg.train.calibrate and st.split["val"] and st.best_path.is_file()
            and not (finished and "calibration" in load_checkpoint(st.best_path, map_location="cpu"))):
        _final_calibration(cfg, unwrap(st.model), st.best_path, out, st.split["val"], st.class_names, st.ctx,
                           st.info, st.progress)
    barrier()
    return st.result()


def _set_up_stage(cfg: CellkitConfig, out: Path, *, split: dict[str, list[Any]], class_names: list[str],
                  stage: str, resume: bool, dev: torch.device, info: DistInfo, progress: bool | None,
                  max_steps: int | None) -> _Stage:
    """Build the stage's parts; with ``resume``, load ``last.pt`` into them; write config.yaml."""
    t = cfg.train
    use_amp = dev.type == "cuda" and bool(t.amp)
    _seed_all(t.seed)
    parts = build(cfg)  # the config is checked once, every part built
    if t.init_from and not (resume and (out / "last.pt").is_file()):
        from cellkit.zoo import initial_weights

        report = initial_weights(parts.model, t.init_from)
        if info.is_main and progress is not False:
            print(f"{stage}: {report.summary()}", file=sys.stderr, flush=True)
    model = parts.model.to(dev)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    st = _Stage(
        cfg=cfg, out=out, name=stage, split=split, class_names=class_names, info=info, progress=progress,
        max_steps=max_steps, ctx=_StepContext(dev=dev, use_amp=use_amp, channels_last=bool(t.channels_last)),
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                                weight_decay=t.weight_decay),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp), loss_fn=parts.loss.to(dev),
        targets=parts.targets, chosen_post=dict(cfg.postprocess.kwargs),
    )
    if resume:
        _check_resumable(out, st.last_path, st.best_path, st.metrics_path)
        if st.last_path.is_file():
            _resume(st, load_checkpoint(st.last_path, map_location="cpu"))
    if info.is_main:
        make_folder(out)
        cfg.to_yaml(out / "config.yaml")
        _write_metrics(st.metrics_path, st.history)  # drops lines of a round whose checkpoint was not saved
    return st


def _resume(st: _Stage, ckpt: dict[str, Any]) -> None:
    """Continue from ``last.pt``: weights, optimizer, scaler, random state and history."""
    _check_resume(ckpt, st.cfg, st.last_path)
    if "max_steps" in ckpt and ckpt["max_steps"] != st.max_steps:
        raise ConfigError(
            f"Cannot resume {st.last_path}: it was trained with max_steps={ckpt['max_steps']} (--max-steps), "
            f"this run asks for {st.max_steps}; resume with the same value, or train into another folder."
        )
    if st.info.is_main:
        _repair_best(ckpt, st.last_path, st.best_path)
    unwrap(st.model).load_state_dict(ckpt["model"])
    st.optimizer.load_state_dict(ckpt["optimizer"])
    if st.ctx.use_amp and ckpt.get("scaler") is not None:
        st.scaler.load_state_dict(ckpt["scaler"])
    st.ckpt, st.start = ckpt, int(ckpt["epoch"])
    st.history = list(ckpt.get("history", []))
    st.best_score = float(ckpt.get("best_score", float("nan")))
    st.chosen_post = dict(ckpt.get("postprocess") or st.cfg.postprocess.kwargs)
    _set_rng_state(ckpt.get("rng"))
    stored = ckpt.get("split") or {}
    if any(k in stored and stored[k] != [s.key for s in st.split[k]] for k in ("train", "val")):
        warnings.warn(
            f"Resuming {st.last_path} with a different train/val split than it was trained on; "
            "the result will differ from an uninterrupted run.",
            stacklevel=4,
        )


def _prepare_targets(st: _Stage, stage1: Path | None) -> None:
    """Call every target's ``prepare(samples, context)`` hook ([`cellkit.masks.prepare`][])."""
    from cellkit.masks.prepare import PrepareContext

    preparing = [g for g in st.targets.values() if callable(getattr(g, "prepare", None))]
    if not preparing:
        return
    dev = st.ctx.dev

    def load_stage1() -> Any:
        from cellkit.engine.predict import Predictor

        assert stage1 is not None
        return Predictor.from_checkpoint(stage1, device=dev).probabilities

    context = PrepareContext(
        num_classes=st.cfg.model.num_classes, run_dir=st.out, cache_dir=st.out / "prior_cache",
        is_main=st.info.is_main, device=str(dev), stage1=stage1,
        fingerprint=file_fingerprint(stage1) if stage1 is not None else "",
        load_stage1=load_stage1 if stage1 is not None else None,
    )
    samples = list(st.split["train"]) + list(st.split["val"])
    for generator in preparing:
        generator.prepare(samples, context)
    barrier()  # the main process has filled the shared caches


def _loaders(st: _Stage) -> tuple[Any, Any, Any, Any, torch.Generator]:
    """The training loader (with its dataset, sampler and the sampler's generator) and the validation set."""
    from cellkit.data import Augment, PointDataset, collate

    t, info, k = st.cfg.train, st.info, st.cfg.model.num_classes
    per_round = t.val_every_steps if t.steps is not None else t.steps_per_epoch
    length = per_round * t.batch_size * info.world_size if per_round else None
    train_ds = PointDataset(st.split["train"], targets=st.targets, num_classes=k, crop_size=t.crop_size,
                            augment=Augment(**t.augment) if t.augment is not None else None, seed=t.seed,
                            cell_bias=float(t.cell_crop), balance_classes=bool(t.balance_classes),
                            **({"length": length} if length is not None else {}))
    val_ds = (PointDataset(st.split["val"], targets=st.targets, num_classes=k, crop_size=None, augment=None,
                           seed=t.seed) if st.split["val"] else None)
    # The sampler's order comes from (seed, epoch): its own generator, reseeded every round
    # (DistributedSampler seeds itself from seed + epoch).
    sampler_gen = torch.Generator()
    sampler: torch.utils.data.Sampler[int]
    if info.enabled:
        sampler = torch.utils.data.DistributedSampler(
            train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=t.seed, drop_last=True
        )
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=sampler_gen)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers, collate_fn=collate,
        drop_last=True, pin_memory=st.ctx.dev.type == "cuda", persistent_workers=t.num_workers > 0,
    )
    if len(loader) == 0:
        per = " per process" if info.enabled else ""
        raise ValueError(
            f"{st.name}: the training split ({len(st.split['train'])} images, {len(train_ds)} items per "
            f"epoch) gives no full batch of {t.batch_size}{per}; lower train.batch_size or set "
            "train.steps_per_epoch."
        )
    return loader, train_ds, val_ds, sampler, sampler_gen


def _seed_round(seed: int, epoch: int, sampler_gen: torch.Generator, sampler: Any, dataset: Any) -> None:
    """Every source of randomness of a round from ``(seed, round)``, so a resumed round is the same."""
    round_seed = _epoch_seed(seed, epoch)
    _seed_all(round_seed)
    sampler_gen.manual_seed(round_seed)
    for part in (sampler, dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def _round(st: _Stage, ddp_model: nn.Module, loader: Any, val_ds: Any, scheduler: Any, epoch: int,
           sizes: list[int]) -> tuple[dict[str, Any], bool]:
    """Train one round's steps and validate; returns its metrics record and whether it is the best."""
    t, steps, done = st.cfg.train, sizes[epoch], sum(sizes[:epoch])
    started = time.perf_counter()
    lr = float(st.optimizer.param_groups[0]["lr"])
    prefix = "pretrain " if st.name == "pretrain" else ""
    desc = (f"{prefix}steps {done + 1}-{done + steps}/{sum(sizes)}" if t.steps is not None
            else f"{prefix}epoch {epoch + 1}/{len(sizes)}")
    train_terms = _train_epoch(ddp_model, loader, steps, st.loss_fn, st.optimizer, st.scaler, t.grad_clip, st.ctx,
                               desc=desc, show_bar=_show_bar(st), scheduler=scheduler,
                               log=_progress_log(st, done, sum(sizes)))
    # The sums were reduced over ranks, so every rank raises together (no rank left waiting).
    if not all(math.isfinite(v) for v in train_terms.values()):
        raise FloatingPointError(
            f"{st.name} epoch {epoch + 1}: the training loss is not finite ({train_terms}); lower "
            "train.lr or set train.grad_clip."
        )
    sync_buffers(ddp_model)
    every = 1 if t.steps is not None else t.val_every
    validate = bool(st.split["val"]) and ((epoch + 1) % every == 0 or epoch + 1 == len(sizes))
    val_terms, f1, mean_f1, post_kwargs = None, None, None, None
    if validate:
        val_terms, f1, mean_f1, post_kwargs = _validate(unwrap(st.model), val_ds, st.split["val"], st.loss_fn,
                                                        st.cfg, st.class_names, st.ctx, st.info)
    score = run_score(f1) if validate else float("nan")
    if validate:  # the first validated round is the best so far; later ones must beat it
        improved = _better(score, st.best_score) or not any(r.get("best") for r in st.history)
    else:
        improved = not st.split["val"]  # no validation images: the last round is the best
    if improved:
        st.best_score = score
        st.chosen_post = post_kwargs if post_kwargs is not None else st.chosen_post
    record = {
        "stage": st.name, "epoch": epoch + 1, "epochs": len(sizes), "steps": steps, "step": done + steps,
        "lr": lr, "time": round(time.perf_counter() - started, 3), "train": train_terms, "val": val_terms,
        "f1": f1, "mean_f1": mean_f1, "score": score if validate else None, "best": bool(improved),
        "postprocess": post_kwargs,
    }
    st.history.append(record)
    return record, bool(improved)


def _show_bar(st: _Stage) -> bool:
    shown = bool(st.progress) if st.progress is not None else sys.stderr.isatty()
    return shown and st.info.is_main


def _progress_log(st: _Stage, done: int, total: int) -> Callable[[int, float], None] | None:
    """What ``_train_epoch`` calls after each step: progress lines when stderr is no terminal (and no bar)."""
    if not (st.info.is_main and st.progress is None and not sys.stderr.isatty()):
        return None
    if st.lines is None:
        st.lines = _ProgressLines(st.name, total, done)
    lines = st.lines
    return lambda step, loss: lines(done + step, loss)


def _draw_curves(out: Path, progress: bool | None) -> None:
    """``<run>/curves.png`` at the end of a run; a picture that fails warns and never fails the run."""
    try:
        from cellkit.engine.plots import plot_training

        path = plot_training(out)
    except Exception as err:  # noqa: BLE001  matplotlib missing, a full disk...: the weights are saved
        warnings.warn(f"the training curves were not drawn ({type(err).__name__}: {err}); draw them later "
                      f"with `cellkit plot {out}`.", RuntimeWarning, stacklevel=3)
        return
    if progress is not False:
        print(f"training curves: {path}", file=sys.stderr, flush=True)


class _ProgressLines:
    """Progress as plain lines, for a stderr that is not a terminal (a log file, a batch job).

    A line every 10% of the stage's steps or every ``every_s`` seconds, whichever comes first:
    ``step 120/400 (30%)  2.41 steps/s  ETA 1m56s  loss 0.4123``. The rate counts the steps
    this process has run since the stage (re)started, over the time since then, validation
    included, so the ETA includes the validations to come.
    """

    def __init__(self, name: str, total: int, start: int, every_s: float = 30.0) -> None:
        self.prefix = "pretrain " if name == "pretrain" else ""
        self.total, self.start, self.every_s = max(1, int(total)), int(start), float(every_s)
        self.every_steps = max(1, math.ceil(self.total / 10))
        self.started = self.last = time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        """After optimizer step ``step`` (1-based, of the stage) with the round's mean ``loss`` so far."""
        now = time.perf_counter()
        if step % self.every_steps and now - self.last < self.every_s:
            return
        self.last = now
        done = step - self.start
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        print(f"{self.prefix}step {step}/{self.total} ({step / self.total:.0%})  {rate:.3g} steps/s  "
              f"ETA {_duration(eta)}  loss {loss:.4f}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"``, ``"12s"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _save_round(st: _Stage, record: Mapping[str, Any], improved: bool, scheduler: Any,
                total_steps: int | None) -> None:
    """Write last.pt (and best.pt when the round is the best), then its metrics line."""
    from cellkit import __version__

    if not st.info.is_main:
        return
    state = {
        "cellkit_version": __version__, "config": st.cfg.to_dict(),
        "model": unwrap(st.model).state_dict(), "optimizer": st.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": st.scaler.state_dict() if st.ctx.use_amp else None,
        "epoch": record["epoch"], "best_score": st.best_score, "rng": _rng_state(),
        "class_names": st.class_names, "history": st.history, "stage": st.name,
        "split": {k: [s.key for s in v] for k, v in st.split.items()},
        "world_size": st.info.world_size, "postprocess": st.chosen_post, "max_steps": st.max_steps,
    }
    # last.pt first: a kill between the two leaves a last.pt whose round is the best,
    # and the resume copies it to best.pt (_repair_best).
    save_checkpoint(st.last_path, state)
    if improved:
        save_checkpoint(st.best_path, state)
    _append_metrics(st.metrics_path, record)
    if st.progress is not False:
        print(_summary(record, st.name, total_steps), file=sys.stderr, flush=True)


def _repair_best(ckpt: Mapping[str, Any], last_path: Path, best_path: Path) -> None:
    """After a kill between writing last.pt and best.pt: best.pt gets last.pt's best round."""
    history = ckpt.get("history") or []
    if not history or not history[-1].get("best"):
        return
    if best_path.is_file() and int(load_checkpoint(best_path).get("epoch", -1)) == int(ckpt["epoch"]):
        return
    state = {k: v for k, v in ckpt.items() if k not in ("path", "format")}
    save_checkpoint(best_path, state)


INT8_CALIBRATION_CROPS = 16
"""How many crops of the training images (at most 192 px a side, from evenly spaced images)
``best.pt`` keeps to calibrate 8-bit inference ([`cellkit.models.quantize`][])."""


def _store_int8_calibration(best_path: Path, samples: Sequence[Any]) -> None:
    """Keep a few central crops of the training images in best.pt (uint8, about 1.7 MB), so
    int8 inference is calibrated on the model's own kind of images (once; deterministic)."""
    best = load_checkpoint(best_path, map_location="cpu")
    if "int8_calibration" in best:
        return
    step = max(1, len(samples) // INT8_CALIBRATION_CROPS)
    crops = []
    for s in list(samples)[::step][:INT8_CALIBRATION_CROPS]:
        image = np.asarray(s.image)
        h, w = image.shape[:2]
        ch, cw = min(h, 192), min(w, 192)
        y, x = (h - ch) // 2, (w - cw) // 2
        crops.append(torch.from_numpy(np.ascontiguousarray(image[y : y + ch, x : x + cw])))
    best = {k: v for k, v in best.items() if k not in ("path", "format")}
    best["int8_calibration"] = crops
    save_checkpoint(best_path, best)


def _final_calibration(cfg: CellkitConfig, model: nn.Module, best_path: Path, out: Path,
                       val_samples: Sequence[Any], class_names: list[str], ctx: _StepContext,
                       info: DistInfo, progress: bool | None = None) -> None:
    """Calibrate thresholds and minimum distances on the best weights; store them in best.pt.

    Writes ``<run>/calibration.json`` too. A copy of the model gets best.pt's weights (the
    model itself keeps the last step's).
    """
    import copy

    from cellkit.data.io import write_text_atomic
    from cellkit.engine.calibrate import calibrate_peaks

    best = load_checkpoint(best_path, map_location="cpu")
    model = copy.deepcopy(model)
    model.load_state_dict(best["model"])
    maps = _validation_maps(model, val_samples, ctx, info)
    truths = [(s.points, s.classes) for s in val_samples]
    base = dict(best.get("postprocess") or cfg.postprocess.kwargs)
    d0 = cfg.postprocess.kwargs.get("min_distance")
    grid_d = None
    if isinstance(d0, (int, float)) and not isinstance(d0, bool):
        grid_d = sorted({max(1, int(round(f * d0))) for f in (0.67, 1.0, 1.33)})
    cal = calibrate_peaks(maps, truths, radius=cfg.train.radius, class_names=class_names, kwargs=base,
                          name=cfg.postprocess.name, min_distances=grid_d,
                          relative=cfg.model.activation == "identity", rounds=2)
    if info.is_main:
        best["postprocess"] = cal.kwargs
        best["calibration"] = cal.to_dict()
        report = cal.to_dict()
        cal8 = _int8_calibration(cfg, model, best, val_samples, truths, class_names, cal.kwargs, grid_d)
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
                      grid_d: list[int] | None) -> Any:
    """Peaks calibrated on the maps ``cellkit predict`` makes by default on the CPU (int8).

    The maps come from a [`Predictor`][cellkit.engine.predict.Predictor] built as
    ``Predictor.from_checkpoint`` builds it (``precision="auto"`` on the CPU, quantized on the
    crops ``best.pt`` stores), so the thresholds fit what users run. ``None`` where ``"auto"``
    does not run int8 (no x86 engine; a depthwise or non-cellkit model).
    """
    import copy

    from cellkit.engine.calibrate import calibrate_peaks
    from cellkit.engine.predict import Predictor, _stored_calibration
    from cellkit.registry import POSTPROCESSORS

    cpu_model = copy.deepcopy(model).cpu().eval()
    post = POSTPROCESSORS.build(cfg.postprocess.name, **dict(start))
    predictor = Predictor(cpu_model, post, int(cfg.model.num_classes), class_names, device="cpu",
                          precision="auto", int8_calibration=_stored_calibration(dict(best)))
    if predictor.precision != "int8":
        return None
    maps = [predictor.probabilities(s.image) for s in val_samples]
    return calibrate_peaks(maps, truths, radius=cfg.train.radius, class_names=class_names, kwargs=dict(start),
                           name=cfg.postprocess.name, min_distances=grid_d,
                           relative=cfg.model.activation == "identity", rounds=1)


def _better(score: float, best: float) -> bool:
    """``score`` beats ``best``; ties keep the earlier epoch, ``nan`` never wins."""
    if not math.isfinite(score):
        return False
    return not math.isfinite(best) or score > best


@dataclass
class _StepContext:
    dev: torch.device
    use_amp: bool
    channels_last: bool

    def images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = batch["image"].to(self.dev, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def targets(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dev, non_blocking=True) for k, v in batch["targets"].items()}

    def forward(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Mixed precision for the network only; the losses run in float32.
        with torch.autocast(device_type=self.dev.type, dtype=torch.float16, enabled=self.use_amp):
            outputs = model(x)
        return {k: v.float() for k, v in outputs.items()}


def _train_epoch(model: nn.Module, loader: Any, steps: int, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None,
                 ctx: _StepContext, *, desc: str, show_bar: bool, scheduler: Any = None,
                 log: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """One epoch; returns the mean of every loss term (and ``total``) over all ranks.

    ``log(step, mean_loss)`` is called after each step (1-based, of this round) when given.
    """
    from tqdm.auto import tqdm

    model.train()
    labels = list(loss_fn.labels)
    sums = torch.zeros(len(labels) + 1, dtype=torch.float64)
    count = 0
    bar = tqdm(total=steps, desc=desc, disable=not show_bar, leave=False, dynamic_ncols=True,
               file=sys.stderr)
    try:
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            outputs = ctx.forward(model, ctx.images(batch))
            total, terms = loss_fn(outputs, ctx.targets(batch))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            values = torch.stack([total.detach()] + [terms[k] for k in labels]).double().cpu()
            sums += values
            count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0].item() / count:.4f}")
            if log is not None:
                log(count, sums[0].item() / count)
    finally:
        bar.close()
    # nccl reduces CUDA tensors only; gloo takes CPU tensors.
    local = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
    reduced = all_reduce_sum(local.to(ctx.dev if ctx.dev.type == "cuda" else "cpu")).cpu()
    n = max(reduced[-1].item(), 1.0)
    means = (reduced[:-1] / n).tolist()
    return {"total": means[0], **dict(zip(labels, means[1:]))}


def _validation_maps(model: nn.Module, val_samples: Sequence[Any], ctx: _StepContext,
                     info: DistInfo) -> list[np.ndarray]:
    """The main head's maps of every validation image, by the tiles of ``cellkit predict``.

    Sharded over ranks (rank ``r`` runs images ``r, r + world_size, ...``) and gathered, so
    every rank returns all maps in order.
    """
    from cellkit.engine.predict import predict_probabilities

    local = [(i, predict_probabilities(model, val_samples[i].image, device=ctx.dev, amp=ctx.use_amp))
             for i in range(info.rank, len(val_samples), info.world_size)]
    parts = all_gather_objects(local)
    return [m for _, m in sorted((item for part in parts for item in part), key=lambda item: item[0])]


@torch.no_grad()
def _validate(model: nn.Module, val_ds: Any, val_samples: Sequence[Any], loss_fn: nn.Module,
              cfg: CellkitConfig, class_names: list[str], ctx: _StepContext, info: DistInfo,
              ) -> tuple[dict[str, float], dict[str, float | None], dict[str, float | None], dict[str, Any]]:
    """Loss terms, F1 per class and the peak arguments used, on the validation images.

    The loss terms come from whole images through all heads; the F1 from the main head's
    maps made exactly as ``cellkit predict`` makes them (tiled [`predict_probabilities`][]),
    peaks with thresholds calibrated on these maps when ``train.calibrate`` (else the
    config's), matched within ``train.radius``. A class with no annotated cell in the
    validation images has F1 ``None`` and does not count in the score. Sharded over ranks;
    every rank returns the same values.
    """
    from cellkit.data import collate
    from cellkit.engine.calibrate import calibrate_peaks
    from cellkit.metrics import evaluate
    from cellkit.registry import POSTPROCESSORS

    was_training = model.training
    model.eval()
    labels = list(loss_fn.labels)
    local = []
    try:
        for i in range(info.rank, len(val_ds), info.world_size):
            batch = collate([val_ds[i]])
            outputs = ctx.forward(model, ctx.images(batch))
            total, terms = loss_fn(outputs, ctx.targets(batch))
            local.append((i, [float(total)] + [float(terms[k]) for k in labels]))
        maps = _validation_maps(model, val_samples, ctx, info)
    finally:
        model.train(was_training)
    parts = all_gather_objects(local)
    gathered = sorted((item for part in parts for item in part), key=lambda item: item[0])
    losses = np.mean([item[1] for item in gathered], axis=0)
    val_terms = {"total": float(losses[0]), **{k: float(v) for k, v in zip(labels, losses[1:])}}
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


def _f1_by_class(report: Any, class_names: list[str], truths: Sequence[tuple[Any, Any]],
                 ) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Total and mean F1 per class name; ``None`` for a class with no annotated cell."""
    from cellkit.engine.calibrate import class_counts

    present = set(np.flatnonzero(class_counts(truths, len(class_names))).tolist())
    total = {n: (float(report.total_f1[c]) if c in present else None) for c, n in enumerate(class_names)}
    mean = {n: (float(report.mean_f1[c]) if c in present else None) for c, n in enumerate(class_names)}
    return total, mean


def _summary(record: Mapping[str, Any], stage: str, total_steps: int | None = None) -> str:
    """``epoch 3/30  loss 0.412 (main/ce 0.210 ...)  val loss 0.50  val F1 other 0.71 ...  12.3s``."""
    train = record["train"]
    terms = " ".join(f"{k} {v:.3f}" for k, v in train.items() if k != "total")
    where = (f"step {record['step']}/{total_steps}" if total_steps
             else f"epoch {record['epoch']}/{record['epochs']}")
    parts = [f"{'pretrain ' if stage == 'pretrain' else ''}{where}", f"loss {train['total']:.3f} ({terms})"]
    if record.get("val"):
        parts.append(f"val loss {record['val']['total']:.3f}")
    if record.get("f1"):
        parts.append("val F1 " + " ".join(f"{k} {_fmt(v)}" for k, v in record["f1"].items()))
    if record.get("best"):
        parts.append("*best*")
    parts.append(f"{record['time']:.1f}s")
    return "  ".join(parts)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}"

