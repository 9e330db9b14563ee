"""The tissue-prior target of the prior decoder (paper section 2.3).

The target is the class-of-interest probability map of a pre-trained model (same
architecture as encoder + main decoder, trained with circle masks and stopped early, so
that it outputs a rough map of where tumour cells cluster). It depends only on the image,
so it is computed once per image and cached, in memory and optionally on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cellkit.imaging import image_to_tensor
from cellkit.masks.base import check_call
from cellkit.registry import MASKS

__all__ = ["PriorMask"]

_WHERE = "prior mask"


@MASKS.register("prior")
class PriorMask:
    """The pre-trained model's probability map of one class: ``(1, H, W)`` in ``[0, 1]``.

    The prior is ``sigmoid(model.infer(x))[0, class_index]`` for the normalised image
    ``x = image_to_tensor(image)[None]`` (``model(x)["main"]`` when the model has no
    ``infer``), computed on ``device`` with ``model.eval()`` under
    ``torch.inference_mode`` (the model's training flag is restored afterwards; the model
    is moved to ``device``). With ``predictor``, the prior is ``predictor(image)[class_index]``
    instead: the engine passes one for tiled inference on big images.

    The points are validated but not used: the prior depends on the image only, and an
    image without annotations still gets the model's output. ``per_image`` is True.

    Caching (only when the call gets a ``key``, an id of the image): results are kept in
    memory by key, and with ``cache_dir`` also on disk as
    ``<cache_dir>/<fingerprint>/<key>.npy``, written atomically (a temporary file in the
    same folder, then ``os.replace``), so several processes can share the folder. The
    fingerprint names the model: pass one (e.g. the checkpoint's hash); left empty, it is
    derived from the model's weights and ``class_index``. Keys with characters other than
    letters, digits, ``.``, ``_`` and ``-`` are made safe (plus a hash of the key). A cached
    entry of the wrong size is recomputed with a warning.

    Args:
        model: the pre-trained cellkit model (any ``nn.Module`` with ``infer(x)`` returning
            logits ``(1, C, H, W)``, or returning ``{"main": logits}``).
        class_index: the channel used as prior (1: the class of interest).
        cache_dir: folder of the disk cache (None: memory only).
        fingerprint: name of the model's cache folder ("" derives it from the weights).
        device: where the model runs.
        predictor: optional ``predictor(image) -> (C, H, W)`` probabilities (numpy or
            torch), used instead of running ``model`` on the whole image.
        memory_cache: keep results in memory by key.

    Shapes:
        image ``(H, W, 3)`` uint8 -> ``(1, H, W)`` float32.

    Raises:
        ValueError: on call, with no model or predictor, a missing or mismatched image,
            invalid points, or a model output of an unexpected shape.

    Examples:
        >>> class Halves(torch.nn.Module):
        ...     def infer(self, x):  # class 1 logit: +9 on the right half, -9 on the left
        ...         logits = torch.full((1, 2, *x.shape[-2:]), -9.0)
        ...         logits[:, 1, :, x.shape[-1] // 2:] = 9.0
        ...         return logits
        >>> prior = PriorMask(model=Halves())
        >>> target = prior([], [], shape=(2, 4), num_classes=2, image=np.zeros((2, 4, 3), np.uint8))
        >>> print(np.round(target).astype(int))
        [[[0 0 1 1]
          [0 0 1 1]]]
    """

    per_image: ClassVar[bool] = True

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        class_index: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        fingerprint: str = "",
        device: str | torch.device = "cpu",
        predictor: Callable[[np.ndarray], Any] | None = None,
        memory_cache: bool = True,
    ) -> None:
        if isinstance(class_index, bool) or int(class_index) != class_index or class_index < 0:
            raise ValueError(f"{_WHERE}: class_index must be an integer >= 0, got {class_index!r}.")
        if predictor is not None and not callable(predictor):
            raise ValueError(f"{_WHERE}: predictor must be callable image -> (C, H, W), got {predictor!r}.")
        if model is not None and not callable(getattr(model, "infer", None)) and not callable(model):
            raise ValueError(
                f"{_WHERE}: model must be an nn.Module with an infer(x) method, got {type(model).__name__}."
            )
        if not isinstance(fingerprint, str):
            raise ValueError(f"{_WHERE}: fingerprint must be a string, got {fingerprint!r}.")
        if cache_dir is not None and not fingerprint and model is None and predictor is not None:
            raise ValueError(
                f"{_WHERE}: a disk cache (cache_dir) with only a predictor needs an explicit "
                "fingerprint naming the model (e.g. the checkpoint's hash), so that priors of "
                "different models never mix."
            )
        self.model = model
        self.class_index = int(class_index)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.predictor = predictor
        self.memory_cache = bool(memory_cache)
        self._memory: dict[str, np.ndarray] = {}
        self._auto_fingerprint: str | None = None

    def __repr__(self) -> str:
        model = None if self.model is None else type(self.model).__name__
        return (
            f"PriorMask(model={model}, class_index={self.class_index}, cache_dir={self.cache_dir}, "
            f"fingerprint={self.fingerprint!r}, device={str(self.device)!r}, "
            f"predictor={self.predictor is not None})"
        )

    def channels(self, num_classes: int) -> int:
        """Always 1: the prior of one class."""
        return 1

    @property
    def cache_folder(self) -> Path | None:
        """``<cache_dir>/<fingerprint>``, or None without a disk cache."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / _safe_name(self.fingerprint or self._weights_fingerprint())

    def clear_memory(self) -> None:
        """Forget the priors cached in memory (the disk cache stays)."""
        self._memory.clear()

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
        if self.model is None and self.predictor is None:
            raise ValueError(
                f"{_WHERE}: no model to compute the prior with. The prior needs the pre-trained "
                "(early-stopped) model or a checkpoint loaded into one: pass "
                "PriorMask(model=<nn.Module with infer(x)>) or predictor=<callable image -> "
                "(C, H, W) probabilities>."
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
        h, w = image.shape[:2]
        if self.predictor is not None:
            probs = self.predictor(image)
            if isinstance(probs, torch.Tensor):
                probs = probs.detach().float().cpu().numpy()
            probs = np.asarray(probs)
            self._check_output(probs.shape, (h, w), "predictor(image)", batched=False)
            return np.ascontiguousarray(probs[self.class_index][None], dtype=np.float32)
        model = self.model
        assert model is not None
        was_training = bool(getattr(model, "training", False))
        if isinstance(model, torch.nn.Module):
            model.to(self.device)
            model.eval()
        try:
            with torch.inference_mode():
                x = image_to_tensor(image)[None].to(self.device)
                infer = getattr(model, "infer", None)
                logits = infer(x) if callable(infer) else model(x)
                if isinstance(logits, dict):
                    if "main" not in logits:
                        raise ValueError(
                            f"{_WHERE}: the model returned outputs {sorted(logits)} without 'main'; "
                            "give it an infer(x) method or a 'main' output."
                        )
                    logits = logits["main"]
                if not isinstance(logits, torch.Tensor):
                    raise ValueError(
                        f"{_WHERE}: the model returned {type(logits).__name__}, expected a logits tensor."
                    )
                self._check_output(tuple(logits.shape), (h, w), "model.infer(x)", batched=True)
                prob = torch.sigmoid(logits[0, self.class_index : self.class_index + 1].float())
                return np.ascontiguousarray(prob.cpu().numpy(), dtype=np.float32)
        finally:
            if isinstance(model, torch.nn.Module):
                model.train(was_training)

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

    def _weights_fingerprint(self) -> str:
        if self._auto_fingerprint is None:
            if not isinstance(self.model, torch.nn.Module):
                raise ValueError(
                    f"{_WHERE}: cannot derive a cache fingerprint without an nn.Module model; "
                    "pass fingerprint=<a name for the model>."
                )
            digest = hashlib.sha256(f"class_index={self.class_index}".encode())
            for name, tensor in self.model.state_dict().items():
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._auto_fingerprint = f"weights-{digest.hexdigest()[:16]}"
        return self._auto_fingerprint


def _safe_name(name: str) -> str:
    """``name`` as a file name: unsafe characters replaced, plus a hash when any were."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    if safe != name or not safe or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return safe


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (:func:`cellkit.data.io.atomic_write`)."""
    from cellkit.data.io import atomic_write

    with atomic_write(path, "wb") as handle:
        np.save(handle, array)
