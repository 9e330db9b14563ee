"""What a training run trains on, and for how long.

The splits (by group, see [`cellkit.data.split`][]), what depends on the training images
([`resolve_for_data`][]: the cell geometry, crops no larger than the images), the schedule
([`schedule_factor`][]: warm-up then cosine decay per optimizer step; rounds of
``val_every_steps`` steps or epochs), the seeds that make a round reproducible, the
loaders, and the targets' ``prepare`` hooks.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cellkit import data
from cellkit import wsi  # noqa: F401  registers the "slides" dataset format
from cellkit.config import CellkitConfig, ConfigError, TrainConfig
from cellkit.data import Augment, PointDataset, collate
from cellkit.data.formats import resolve_class_map
from cellkit.data.io import DataWarning
from cellkit.engine.checkpoint import file_fingerprint
from cellkit.engine.distributed import barrier
from cellkit.engine.predict import Predictor
from cellkit.geometry import resolve_geometry
from cellkit.masks.prepare import PrepareContext

if TYPE_CHECKING:  # the stage a function works on; train imports this module
    from cellkit.engine.train import _Stage

__all__ = ["MIN_IMAGE_SIDE", "describe_schedule", "resolve_for_data", "schedule_factor"]


def resolve_for_data(cfg: CellkitConfig, train: Sequence[Any]) -> tuple[CellkitConfig, list[str]]:
    """The config to train on these training images, and lines saying what was chosen.

    * **geometry**: ``data.cell_diameter`` ``"auto"`` is estimated from the training points
      (never the validation or test ones) and every size derived from it
      ([`cellkit.geometry.resolve_geometry`][]);
    * **crops**: a ``crop_size`` larger than every training image is cut to the smallest
      image side (rounded down to a multiple of 32), instead of padding every crop;
    * the schedule, stated.

    The returned config is what ``config.yaml`` and the checkpoints record, so a resumed
    run resolves to the same one. It is a copy: the caller's config is never changed.
    """
    cfg, geometry = resolve_geometry(copy.deepcopy(cfg), train)
    notes = []
    if geometry is not None:
        notes.append("geometry: " + geometry.describe())
    smallest = min((min(s.image.shape[:2]) for s in train), default=None)
    for stage in cfg.stages():
        t = stage.train
        if smallest is not None and t.crop_size is not None and t.crop_size > smallest:
            new = max(32, smallest // 32 * 32) if smallest >= 32 else smallest
            note = (f"crops: {new} px (train.crop_size {t.crop_size} is larger than the smallest "
                    f"training image side, {smallest} px)")
            if note not in notes:  # said once for both stages
                notes.append(note)
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
            class_map = _class_map(cfg)
            if names is None and class_map is not None and len(class_map.names) == cfg.model.num_classes:
                names = class_map.names
            root = cfg.data.root or data.bundled_endonuke()
            samples = data.load_dataset(root, cfg.data.format, class_map=class_map, split=cfg.data.split,
                                        num_classes=cfg.model.num_classes, mpp=cfg.data.mpp)
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
    d = cfg.data
    return resolve_class_map(d.format, cfg.model.num_classes, d.class_map, d.class_names)


def _split(samples: list[Any], cfg: CellkitConfig) -> dict[str, list[Any]]:
    """Split by group (``data.group``; by default the format's: EndoNuke blocks of 100 tile
    ids, BCData and others each image)."""
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
    wanted = sum(1 for f in fractions if f > 0)
    if rule in (None, "format") and default is not None and len(set(groups)) < wanted <= len(samples):
        # Fewer groups (slides) than parts to fill: the held-out images come from the same
        # group, one image (area) at a time, said, rather than no validation at all.
        warnings.warn(
            f"{len(set(groups))} group(s) of images ({d.format}: {', '.join(sorted(map(str, set(groups)))[:3])}) "
            f"cannot fill the train, validation and test parts by group: the images are split one by one instead, "
            f"so validation and test images come from the training {d.format} (a within-slide figure). Give more "
            "slides to hold whole ones out.", DataWarning, stacklevel=3)
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


def _seed_round(seed: int, epoch: int, sampler_gen: torch.Generator, sampler: Any, dataset: Any) -> None:
    """Every source of randomness of a round from ``(seed, round)``, so a resumed round is the same."""
    round_seed = _epoch_seed(seed, epoch)
    _seed_all(round_seed)
    sampler_gen.manual_seed(round_seed)
    for part in (sampler, dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def _prepare_targets(st: _Stage, stage1: Path | None) -> None:
    """Call every target's ``prepare(samples, context)`` hook ([`cellkit.masks.prepare`][])."""
    preparing = [g for g in st.targets.values() if callable(getattr(g, "prepare", None))]
    if not preparing:
        return
    dev = st.ctx.dev

    def load_stage1() -> Any:
        assert stage1 is not None
        return Predictor.from_checkpoint(stage1, device=dev).probabilities

    context = PrepareContext(
        num_classes=st.cfg.model.num_classes, run_dir=st.out, cache_dir=st.out / "prior_cache",
        is_main=st.info.is_main, device=str(dev), stage1=stage1,
        fingerprint=file_fingerprint(stage1) if stage1 is not None else "",
        load_stage1=load_stage1 if stage1 is not None else None,
    )
    samples = list(st.split["train"]) + list(st.split["val"])
    names = [name for name, g in st.targets.items() if callable(getattr(g, "prepare", None))]
    where = "stage 1: " if st.name == "pretrain" else ""
    with st.times.phase("target preparation",
                        announce=f"{where}preparing the targets {', '.join(names)} of {len(samples)} images"):
        for generator in preparing:
            generator.prepare(samples, context)
        barrier()  # the main process has filled the shared caches


def _loaders(st: _Stage) -> tuple[Any, Any, Any, Any, torch.Generator]:
    """The training loader (with its dataset, sampler and the sampler's generator) and the validation set."""
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
