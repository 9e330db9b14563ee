"""What the engine hands a mask generator before training: the optional ``prepare`` hook.

Most targets are a function of the points alone. Some need more, once, before the first
step: the ``prior`` target needs the stage-1 model's predictions of every image (and a
cache for them). Such a generator defines:

```python
needs_stage1: ClassVar[bool] = True  # only if it needs the stage-1 model
def prepare(self, samples, context: PrepareContext) -> None: ...
```

and the engine calls ``prepare`` once per training stage, in every process, with the
training and validation samples, after stage 1 has finished. The engine never looks at
a generator's name: a plug-in of your own gets the same call. A generator may do shared
work (fill a disk cache) only where ``context.is_main``; the engine waits for every
process after the calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PrepareContext"]


@dataclass
class PrepareContext:
    """What a generator's ``prepare(samples, context)`` can use.

    Attributes:
        num_classes: classes of the model being trained.
        run_dir: the run folder (``None`` outside a run).
        cache_dir: a folder for caches of this run (``<run>/prior_cache``).
        is_main: whether this process does the shared work (rank 0).
        device: where the model trains (``"cpu"``, ``"cuda:0"``...).
        stage1: the stage-1 checkpoint, when the config has a stage 1.
        fingerprint: a short hash of ``stage1`` (names caches made from it).
        load_stage1: makes ``image (H, W, 3) uint8 -> (C, H, W) float32`` probabilities of
            the stage-1 model (tiled like ``cellkit predict``); call [`stage1_predictor`][].

    Examples:
        >>> ctx = PrepareContext(num_classes=2)
        >>> ctx.stage1_predictor()  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: This config has no stage 1 (pretrain), so there is no
        stage-1 model to predict with; add a ...
    """

    num_classes: int
    run_dir: Path | None = None
    cache_dir: Path | None = None
    is_main: bool = True
    device: str = "cpu"
    stage1: Path | None = None
    fingerprint: str = ""
    load_stage1: Callable[[], Callable[[np.ndarray], Any]] | None = None
    _predictor: Callable[[np.ndarray], Any] | None = field(default=None, repr=False)

    def stage1_predictor(self) -> Callable[[np.ndarray], Any]:
        """The stage-1 model as ``image -> (C, H, W)`` probabilities (loaded once)."""
        if self._predictor is None:
            if self.load_stage1 is None:
                raise ValueError(
                    "This config has no stage 1 (pretrain), so there is no stage-1 model to predict with; add a "
                    "stage 1 (see cellkit.presets.ours_plus_plus) or drop the target that needs it."
                )
            self._predictor = self.load_stage1()
        return self._predictor
