"""Progress on long work, one way for training, prediction and slides.

On a terminal a tqdm bar; on a stderr that is not a terminal (a log file, a batch job) a
plain line now and then with the rate and the time left. [`StepLines`][] is training's
(``step 120/400 (30%)  2.41 steps/s  ETA 1m56s  loss 0.4123``), [`ChunkProgress`][] a
slide's chunks (``predict s.svs: 12/40 chunks, 3.10 MP/s, 1m20s left``), and
[`duration`][] the one way times are written. [`PhaseTimes`][] adds up where a long
command's time goes (training's ``timings.json``) and announces the phases that take a while.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator

__all__ = ["ChunkProgress", "PhaseTimes", "StepLines", "duration"]


def duration(seconds: float) -> str:
    """A time left or taken: ``"1h02m"``, ``"3m05s"``, ``"12s"``; ``"?"`` when unknown.

    Examples:
        >>> duration(3725), duration(185), duration(12), duration(float("inf"))
        ('1h02m', '3m05s', '12s', '?')
    """
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepLines:
    """Training progress as plain lines, for a stderr that is not a terminal.

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
              f"ETA {duration(eta)}  loss {loss:.4f}", file=sys.stderr, flush=True)


class ChunkProgress:
    """A slide's chunks: a bar on a terminal; elsewhere a line now and then with the rate and the time left."""

    def __init__(self, total: int, name: str, show: bool | None, every_s: float = 30.0) -> None:
        from tqdm.auto import tqdm

        self.total, self.name, self.every_s = total, name, every_s
        self.tty = sys.stderr.isatty() if show is None else bool(show)
        self.lines = show is None and not self.tty
        self.bar = tqdm(total=total, desc=name, unit="chunk", disable=not self.tty, leave=False)
        self.done, self.mp, self.start, self.last = 0, 0.0, time.perf_counter(), time.perf_counter()

    def update(self, megapixels: float) -> None:
        """One more chunk done, of ``megapixels`` of the slide."""
        self.done += 1
        self.mp += megapixels
        self.bar.update(1)
        now = time.perf_counter()
        if self.lines and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.name}: {self.done}/{self.total} chunks, {self.mp / max(now - self.start, 1e-9):.2f} MP/s, "
                  f"{duration(left)} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class PhaseTimes:
    """Seconds spent per named phase, added up over a command.

    ``with times.phase("validation"):`` adds the block's wall time to ``"validation"``;
    ``announce=`` prints a line when the block starts (``cellkit: calibrating peaks on 31
    images...``) and how long it took when it ends, for phases that can take more than a
    few seconds and would otherwise be silent. ``add`` counts time measured elsewhere.

    Examples:
        >>> times = PhaseTimes()
        >>> with times.phase("steps"):
        ...     pass
        >>> times.add("steps", 2.0); times.add("data loading", 0.5)
        >>> sorted(times.seconds), times.seconds["steps"] >= 2.0
        (['data loading', 'steps'], True)
    """

    def __init__(self, show: bool = True) -> None:
        self.seconds: dict[str, float] = {}
        self.show = bool(show)

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` more in phase ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    @contextlib.contextmanager
    def phase(self, name: str, announce: str | None = None) -> Iterator[None]:
        """Time the block as phase ``name``; with ``announce``, say it starts and how long it took."""
        if announce and self.show:
            print(f"{announce}...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - started
            self.add(name, took)
            if announce and self.show:
                print(f"{announce}: done in {duration(took)}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        """``steps 1m20s (data loading 5s), validation 31s, ...``, the longest first."""
        order = sorted(self.seconds.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {duration(sec)}" for name, sec in order)

    def to_dict(self) -> dict[str, float]:
        """Seconds per phase, rounded to the millisecond."""
        return {name: round(sec, 3) for name, sec in self.seconds.items()}
