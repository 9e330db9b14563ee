"""One round of training steps: [`train_one_epoch`][] receives built parts and runs them.

Like torchvision's reference scripts: the model, loader, loss, optimizer and scaler are
built elsewhere ([`cellkit.engine.train`][]); this runs the steps (autocast, gradient
clipping, the scheduler per step, the weight average, a progress bar or lines) and returns
the mean of every loss term, reduced over processes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cellkit.engine.distributed import all_reduce_sum, unwrap
from cellkit.progress import PhaseTimes, StepLines

if TYPE_CHECKING:  # the stage a function works on; train imports this module
    from cellkit.engine.train import _Stage

__all__ = ["WeightAverage", "train_one_epoch"]


class WeightAverage(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of a model's weights and buffers (``train.ema``).

    After ``n`` updates the decay is ``min(decay, (1 + n) / (10 + n))``: low at first, so the
    initial weights leave the average quickly. ``module`` is the averaged model.

    Examples:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> avg = WeightAverage(net, decay=0.5)
        >>> _ = nn.init.constant_(net.weight, 1.0); avg.update_parameters(net)
        >>> _ = nn.init.constant_(net.weight, 3.0); avg.update_parameters(net)
        >>> # decay min(0.5, 2 / 11): 1 * 2/11 + 3 * 9/11
        >>> round(avg.module.weight.item(), 4)
        2.6364
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)

        def average(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            d = min(self.decay, (1.0 + float(n)) / (10.0 + float(n)))
            return avg * d + new * (1.0 - d)

        super().__init__(model, avg_fn=average, use_buffers=True)


@dataclass
class _StepContext:
    dev: torch.device
    amp_dtype: torch.dtype | None  # autocast's (training_autocast_dtype), None for float32
    channels_last: bool

    @property
    def use_amp(self) -> bool:
        """float16 autocast on CUDA: the one that needs a gradient scaler."""
        return self.amp_dtype == torch.float16

    @property
    def precision(self) -> str:
        """The inference precision of the same arithmetic (validation's maps)."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.amp_dtype, "fp32")

    def images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = batch["image"].to(self.dev, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def targets(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dev, non_blocking=True) for k, v in batch["targets"].items()}

    def forward(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Mixed precision for the network only; the losses run in float32.
        with torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            outputs = model(x)
        return {k: v.float() for k, v in outputs.items()}


def train_one_epoch(model: nn.Module, loader: Any, steps: int, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None,
                 ctx: _StepContext, *, desc: str, show_bar: bool, scheduler: Any = None,
                 log: Callable[[int, float], None] | None = None,
                 times: PhaseTimes | None = None, average: WeightAverage | None = None) -> dict[str, float]:
    """One epoch; returns the mean of every loss term (and ``total``) over all ranks.

    ``log(step, mean_loss)`` is called after each step (1-based, of this round) when given.
    ``times`` gets the seconds spent waiting for batches (``"data loading"``) and in the
    steps themselves (``"steps"``: forward, backward, optimizer; on a GPU, until the step's
    work is queued). ``average`` is updated after every step.
    """
    from tqdm.auto import tqdm

    model.train()
    labels = list(loss_fn.labels)
    sums = torch.zeros(len(labels) + 1, dtype=torch.float64)
    count = 0
    bar = tqdm(total=steps, desc=desc, disable=not show_bar, leave=False, dynamic_ncols=True,
               file=sys.stderr)
    waiting = time.perf_counter()
    try:
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            computing = time.perf_counter()
            if times is not None:
                times.add("data loading", computing - waiting)
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
            if average is not None:
                average.update_parameters(unwrap(model))
            values = torch.stack([total.detach()] + [terms[k] for k in labels]).double().cpu()
            sums += values
            count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0].item() / count:.4f}")
            if log is not None:
                log(count, sums[0].item() / count)
            waiting = time.perf_counter()
            if times is not None:
                times.add("steps", waiting - computing)
    finally:
        bar.close()
    # nccl reduces CUDA tensors only; gloo takes CPU tensors.
    local = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
    reduced = all_reduce_sum(local.to(ctx.dev if ctx.dev.type == "cuda" else "cpu")).cpu()
    n = max(reduced[-1].item(), 1.0)
    means = (reduced[:-1] / n).tolist()
    return {"total": means[0], **dict(zip(labels, means[1:]))}


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


def _show_bar(st: _Stage) -> bool:
    shown = bool(st.progress) if st.progress is not None else sys.stderr.isatty()
    return shown and st.info.is_main


def _progress_log(st: _Stage, done: int, total: int) -> Callable[[int, float], None] | None:
    """What ``train_one_epoch`` calls after each step: progress lines when stderr is no terminal (and no bar)."""
    if not (st.info.is_main and st.progress is None and not sys.stderr.isatty()):
        return None
    if st.lines is None:
        st.lines = StepLines(st.name, total, done)
    lines = st.lines
    return lambda step, loss: lines(done + step, loss)
