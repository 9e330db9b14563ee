"""The tissue-prior target of the prior decoder (paper section 2.3).

The target is the class-of-interest probability map of a pre-trained model (same
architecture as encoder + main decoder, trained with circle masks and stopped early, so
that it outputs a rough map of where tumour cells cluster). It depends only on the image,
so it is computed once per image and cached, in memory and optionally on disk.

The network runs on the engine's side: training hands the generator the stage-1 model
as a predictor (``image -> (C, H, W)`` probabilities, tiled like ``cellkit predict``)
through its [`PriorMask.prepare`][] hook ([`cellkit.masks.prepare`][cellkit.masks.prepare]),
which also fills the cache before the first step.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cellkit.data.io import atomic_write
from cellkit.masks.base import check_call
from cellkit.masks.prepare import PrepareContext
from cellkit.registry import MASKS

__all__ = ["PriorMask"]

_WHERE = "prior mask"


@MASKS.register("prior")
class PriorMask:
    """A pre-trained model's probability map of one class: ``(1, H, W)`` in ``[0, 1]``.

    The prior is ``predictor(image)[class_index]``, where ``predictor`` maps an
    ``(H, W, 3)`` uint8 image to ``(C, H, W)`` probabilities (numpy or torch), e.g.
    ``cellkit.engine.predict.Predictor.from_checkpoint(path).probabilities``. In training
    the engine gives the stage-1 model's predictor through [`prepare`][]; a YAML config
    names only ``class_index``.

    The points are validated but not used: the prior depends on the image only, and an
    image without annotations still gets the model's output. ``per_image`` is True.

    Caching (only when the call gets a ``key``, an id of the image): results are kept in
    memory by key, and with ``cache_dir`` also on disk as
    ``<cache_dir>/<fingerprint>/<key>.npy``, written atomically, so several processes can
    share the folder. The fingerprint names the model (the engine gives the stage-1
    checkpoint's hash), so priors of different models never mix. Keys with characters
    other than letters, digits, ``.``, ``_`` and ``-`` are made safe (plus a hash of the
    key). A cached entry of the wrong size is recomputed with a warning.

    Args:
        predictor: ``image -> (C, H, W)`` probabilities (None until [`prepare`][]).
        class_index: the channel used as prior (1: the class of interest).
        cache_dir: folder of the disk cache (None: memory only).
        fingerprint: name of the model's cache folder (required with ``cache_dir``).
        memory_cache: keep results in memory by key.

    Shapes:
        image ``(H, W, 3)`` uint8 -> ``(1, H, W)`` float32.

    Raises:
        ValueError: on call, with no predictor, a missing or mismatched image, invalid
            points, or a predictor output of an unexpected shape.

    Examples:
        >>> def halves(image):  # class 1: 1 on the right half, 0 on the left
        ...     probs = np.zeros((2, *image.shape[:2]), np.float32)
        ...     probs[1, :, image.shape[1] // 2:] = 1.0
        ...     return probs
        >>> prior = PriorMask(predictor=halves)
        >>> image = np.zeros((2, 4, 3), np.uint8)
        >>> target = prior([], [], shape=(2, 4), num_classes=2, image=image)
        >>> print(target.astype(int))
        [[[0 0 1 1]
          [0 0 1 1]]]
    """

    per_image: ClassVar[bool] = True
    #: The engine must train a stage 1 (``pretrain``) whose model makes the prior.
    needs_stage1: ClassVar[bool] = True

    def __init__(
        self,
        predictor: Callable[[np.ndarray], Any] | None = None,
        class_index: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        fingerprint: str = "",
        memory_cache: bool = True,
    ) -> None:
        if isinstance(class_index, bool) or int(class_index) != class_index or class_index < 0:
            raise ValueError(f"{_WHERE}: class_index must be an integer >= 0, got {class_index!r}.")
        if predictor is not None and not callable(predictor):
            raise ValueError(f"{_WHERE}: predictor must be callable image -> (C, H, W), got {predictor!r}.")
        if not isinstance(fingerprint, str):
            raise ValueError(f"{_WHERE}: fingerprint must be a string, got {fingerprint!r}.")
        if cache_dir is not None and not fingerprint and predictor is not None:
            raise ValueError(
                f"{_WHERE}: a disk cache (cache_dir) needs an explicit fingerprint naming the model (e.g. the "
                "checkpoint's hash), so that priors of different models never mix."
            )
        self.predictor = predictor
        self.class_index = int(class_index)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.fingerprint = fingerprint
        self.memory_cache = bool(memory_cache)
        self._memory: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return (
            f"PriorMask(class_index={self.class_index}, cache_dir={self.cache_dir}, "
            f"fingerprint={self.fingerprint!r}, predictor={self.predictor is not None})"
        )

    def channels(self, num_classes: int) -> int:
        """Always 1: the prior of one class."""
        return 1

    def prepare(self, samples: Sequence[Any], context: PrepareContext) -> None:
        """Take the stage-1 model and the run's cache from the engine; fill the cache.

        Without a predictor of its own, the generator uses ``context.stage1_predictor()``
        and the stage-1 checkpoint's fingerprint; without a ``cache_dir``, the run's. In
        the main process every sample's prior is computed (or read) once, so the other
        processes and the data loader's workers only read the cache.
        """
        if self.predictor is None:
            self.predictor = context.stage1_predictor()
            self.fingerprint = self.fingerprint or context.fingerprint
        if self.cache_dir is None and context.cache_dir is not None and self.fingerprint:
            self.cache_dir = Path(context.cache_dir)
        if context.is_main:
            for s in samples:
                self(s.points, s.classes, shape=tuple(s.image.shape[:2]), num_classes=context.num_classes,
                     image=s.image, key=s.key)

    @property
    def cache_folder(self) -> Path | None:
        """``<cache_dir>/<fingerprint>``, or None without a disk cache."""
        if self.cache_dir is None:
            return None
        if not self.fingerprint:
            raise ValueError(f"{_WHERE}: a disk cache needs a fingerprint naming the model.")
        return self.cache_dir / _safe_name(self.fingerprint)

    def __call__(
        self,
        points: Any,
        classes: Any,
        *,
        shape: tuple[int, int],
        num_classes: int,
        image: np.ndarray | None = None,
        rng: np.random.Generator | int | None = None,
        key: str | None = None,
    ) -> np.ndarray:
        """The prior of one image, from the cache when ``key`` was seen (``rng`` unused)."""
        _, _, (h, w), img = check_call(
            points, classes, shape, num_classes, image, where=_WHERE, need_image=True
        )
        assert img is not None
        if self.predictor is None:
            raise ValueError(
                f"{_WHERE}: no model to compute the prior with. The prior needs the pre-trained "
                "(early-stopped) model: train with a stage 1 (cellkit.presets.ours_plus_plus), which hands it "
                "over through prepare(), or pass PriorMask(predictor=<callable image -> (C, H, W) "
                "probabilities>), e.g. Predictor.from_checkpoint(path).probabilities."
            )
        if key is None:
            return self._predict(img)
        if not isinstance(key, str) or not key:
            raise ValueError(f"{_WHERE}: key must be a non-empty string or None, got {key!r}.")
        cached = self._memory.get(key)
        if cached is not None and cached.shape == (1, h, w):
            return cached.copy()
        folder = self.cache_folder
        path = None if folder is None else folder / f"{_safe_name(key)}.npy"
        prior = None
        if path is not None and path.is_file():
            loaded = np.load(path, allow_pickle=False)
            if loaded.shape == (1, h, w):
                prior = loaded.astype(np.float32, copy=False)
            else:
                warnings.warn(
                    f"{_WHERE}: cached prior {path} has shape {loaded.shape}, expected {(1, h, w)}; "
                    "recomputing it (is the key reused for another image?).",
                    stacklevel=2,
                )
        if prior is None:
            prior = self._predict(img)
            if path is not None:
                _atomic_save(path, prior)
        if self.memory_cache:
            self._memory[key] = prior
        return prior.copy()

    def _predict(self, image: np.ndarray) -> np.ndarray:
        assert self.predictor is not None
        probs = self.predictor(image)
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().float().cpu().numpy()
        probs = np.asarray(probs)
        self._check_output(probs.shape, tuple(image.shape[:2]), "predictor(image)", batched=False)
        return np.ascontiguousarray(probs[self.class_index][None], dtype=np.float32)

    def _check_output(self, got: tuple[int, ...], hw: tuple[int, int], what: str, batched: bool) -> None:
        expected = "(1, C, H, W)" if batched else "(C, H, W)"
        spatial = tuple(got[-2:]) if len(got) >= 2 else ()
        ok = len(got) == (4 if batched else 3) and (not batched or got[0] == 1) and spatial == hw
        if not ok:
            raise ValueError(
                f"{_WHERE}: {what} has shape {tuple(got)}, expected {expected} with (H, W) = {hw}."
            )
        channels = got[1] if batched else got[0]
        if self.class_index >= channels:
            raise ValueError(
                f"{_WHERE}: class_index={self.class_index} but {what} has only {channels} "
                f"channel(s); pass a class_index below {channels}."
            )


def _safe_name(name: str) -> str:
    """``name`` as a file name: unsafe characters replaced, plus a hash when any were."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    if safe != name or not safe or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return safe


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically ([`atomic_write`][cellkit.data.io.atomic_write])."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, array)
