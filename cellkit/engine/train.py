"""Training: the paper's two stages, validation, checkpoints, resuming, one or many processes.

[`fit`][] trains a config into a run folder:

```python
import cellkit
from cellkit.engine import fit

cfg = cellkit.presets.ours_plus_plus(size="cpu")
result = fit(cfg, "runs/ours_pp")             # stage 1, then stage 2
result.best_path                              # runs/ours_pp/best.pt
```

Before the first step [`resolve_for_data`][cellkit.engine.plan.resolve_for_data] fixes what depends on the training images
(the cell geometry when ``data.cell_diameter`` is ``"auto"``, crops no larger than the
images) and the lines saying what was chosen are printed.

**Rounds.** Training runs in *rounds*, each ending with validation and a checkpoint: with
``train.steps`` (the presets' schedule) a round is ``train.val_every_steps`` optimizer
steps, whatever the number of images; with ``train.steps = None`` a round is an epoch
(``steps_per_epoch`` batches or one pass). The learning rate follows
[`schedule_factor`][cellkit.engine.plan.schedule_factor] per optimizer step. The ``epoch``
fields of ``metrics.jsonl`` ([`cellkit.engine.runs`][]) count rounds.

The schedule (section 3 of the paper): **stage 1** (only when ``cfg.pretrain`` is set, i.e.
a target is the ``prior``) trains the pre-trained model (encoder + main decoder, circle
masks, CE only) for ``cfg.pretrain.train.steps`` steps (a share of stage 2's, see
[`cellkit.presets.set_pretrain_fraction`][]; 10 of 100 epochs in the paper) and stops
there: its *last* checkpoint (``<run>/pretrain/last.pt``, a folder resumed like stage 2 and
skipped when finished) gives the prior target, computed once per image and cached in
``<run>/prior_cache`` under the [`file_fingerprint`][cellkit.engine.checkpoint.file_fingerprint]
of that checkpoint. **Stage 2** trains the multi-task model of ``cfg`` with its weighted
loss (``ours_plus_plus``: Lt = Lm + 0.5 Lc + 0.5 Lp + 1.0 Ld).

The parts, each in its module: what a run trains on and how long
([`cellkit.engine.plan`][]), one round's steps ([`cellkit.engine.loop`][]), validation and the
calibration of the peaks ([`cellkit.engine.validation`][]), and the run folder, its
checkpoints and resuming ([`cellkit.engine.runs`][]). This module puts them together: set
up a stage (or resume it), prepare its targets, run its rounds, calibrate.

**Distributed.** Under ``torchrun`` each process trains its shard of the training split and
validates its share of the validation images; see [`cellkit.engine.distributed`][].
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellkit.builder import build, check_buildable, check_config
from cellkit.config import CellkitConfig
from cellkit.data.io import make_folder
from cellkit.engine.checkpoint import load_checkpoint
from cellkit.engine.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    shutdown_distributed,
    sync_buffers,
    unwrap,
    wrap_model,
)
from cellkit.engine.inference import resolve_device, training_autocast_dtype
from cellkit.engine.loop import WeightAverage, _progress_log, _show_bar, _StepContext, train_one_epoch
from cellkit.engine.plan import (
    _build_scheduler,
    _loaders,
    _plan,
    _prepare_targets,
    _resolve_splits,
    _seed_all,
    _seed_round,
    resolve_for_data,
)
from cellkit.engine.runs import (
    _check_out_dir,
    _check_resumable,
    _check_stored_config,
    _draw_curves,
    _remove_stale_temporaries,
    _resume,
    _save_round,
    _store_int8_calibration,
    _write_metrics,
    _write_split,
    _write_timings,
)
from cellkit.engine.validation import _better, _final_calibration, _validate, run_score
from cellkit.progress import PhaseTimes, StepLines

__all__ = ["TrainResult", "fit"]


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

    The module's example above trains ``ours_plus_plus``; for a smoke run, set
    ``cfg.train.steps = 2`` first.
    """
    check_config(cfg)  # the one check of the config: the stages below build unchecked
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
        # What only a factory can say (a radius of -4), also of the values fixed from the data,
        # before the folder becomes a run.
        check_buildable(cfg, check=False)
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
    lines: StepLines | None = None  # progress lines when stderr is not a terminal
    times: PhaseTimes = field(default_factory=PhaseTimes)  # where this process's time went
    average: WeightAverage | None = None  # train.ema's averaged weights

    @property
    def weights(self) -> nn.Module:
        """The model that validates and is saved as ``model``: the average when ``train.ema`` is set."""
        return self.average.module if self.average is not None else unwrap(self.model)

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

    Every round is [`train_one_epoch`][cellkit.engine.loop.train_one_epoch] (its steps), then validation, then the checkpoints.
    """
    started = time.perf_counter()
    st = _set_up_stage(cfg, out, **kwargs)  # a refused resume stops here, before anything is written
    st.times.show = st.info.is_main and st.progress is not False
    if st.info.is_main and st.name == "train":
        _write_split(out, st.split)  # which images are held out: cellkit evaluate --run scores them
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
            with st.times.phase("checkpoints"):
                _save_round(st, record, improved, scheduler, sum(sizes) if cfg.train.steps is not None else None)
        barrier()
    if st.info.is_main and st.best_path.is_file() and st.split["train"]:
        with st.times.phase("checkpoints"):
            _store_int8_calibration(st.best_path, st.split["train"])  # first: the int8 calibration uses them
    barrier()
    if (cfg.train.calibrate and st.split["val"] and st.best_path.is_file()
            and not (finished and "calibration" in load_checkpoint(st.best_path, map_location="cpu"))):
        _final_calibration(cfg, unwrap(st.model), st.best_path, out, st.split["val"], st.class_names, st.ctx,
                           st.info, st.progress, times=st.times)
    barrier()
    if st.info.is_main and not finished:  # a finished stage resumed keeps the timings of its run
        _write_timings(st, time.perf_counter() - started)
    return st.result()


def _set_up_stage(cfg: CellkitConfig, out: Path, *, split: dict[str, list[Any]], class_names: list[str],
                  stage: str, resume: bool, dev: torch.device, info: DistInfo, progress: bool | None,
                  max_steps: int | None) -> _Stage:
    """Build the stage's parts; with ``resume``, load ``last.pt`` into them; write config.yaml."""
    t = cfg.train
    amp_dtype = training_autocast_dtype(dev, bool(t.amp))
    use_amp = amp_dtype == torch.float16  # the gradient scaler is for float16 only
    if amp_dtype == torch.bfloat16 and info.is_main and progress is not False:
        print(f"{stage}: the network runs in bfloat16 (this CPU computes it natively; train.amp: false for "
              "float32), the losses in float32", file=sys.stderr, flush=True)
    _seed_all(t.seed)
    parts = build(cfg, check=False)  # checked once, in fit
    if t.init_from and not (resume and (out / "last.pt").is_file()):
        # Here, not at the top: cellkit.zoo imports cellkit.engine, whose package imports this module.
        from cellkit.zoo import initial_weights

        report = initial_weights(parts.model, t.init_from)
        if info.is_main and progress is not False:
            print(f"{stage}: {report.summary()}", file=sys.stderr, flush=True)
    model = parts.model.to(dev)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    st = _Stage(
        cfg=cfg, out=out, name=stage, split=split, class_names=class_names, info=info, progress=progress,
        max_steps=max_steps, ctx=_StepContext(dev=dev, amp_dtype=amp_dtype, channels_last=bool(t.channels_last)),
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                                weight_decay=t.weight_decay),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp), loss_fn=parts.loss.to(dev),
        targets=parts.targets, chosen_post=dict(cfg.postprocess.kwargs),
        average=WeightAverage(model, t.ema) if t.ema else None,
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


def _round(st: _Stage, ddp_model: nn.Module, loader: Any, val_ds: Any, scheduler: Any, epoch: int,
           sizes: list[int]) -> tuple[dict[str, Any], bool]:
    """Train one round's steps and validate; returns its metrics record and whether it is the best."""
    t, steps, done = st.cfg.train, sizes[epoch], sum(sizes[:epoch])
    started = time.perf_counter()
    lr = float(st.optimizer.param_groups[0]["lr"])
    prefix = "pretrain " if st.name == "pretrain" else ""
    desc = (f"{prefix}steps {done + 1}-{done + steps}/{sum(sizes)}" if t.steps is not None
            else f"{prefix}epoch {epoch + 1}/{len(sizes)}")
    train_terms = train_one_epoch(ddp_model, loader, steps, st.loss_fn, st.optimizer, st.scaler, t.grad_clip, st.ctx,
                                  desc=desc, show_bar=_show_bar(st), scheduler=scheduler,
                                  log=_progress_log(st, done, sum(sizes)), times=st.times, average=st.average)
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
        with st.times.phase("validation"):
            val_terms, f1, mean_f1, post_kwargs = _validate(st.weights, val_ds, st.split["val"], st.loss_fn,
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


