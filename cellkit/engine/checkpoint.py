"""Checkpoints: atomic writes, and loading a model with a check against the code.

A checkpoint is a dict saved with ``torch.save``::

    {"format": 1, "cellkit_version": str, "config": CellkitConfig.to_dict(),
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "epoch": int (epochs completed), "best_score": float, "rng": {...},
     "class_names": [...], "history": [...], "stage": "train" | "pretrain"}

Only ``config`` and ``model`` are needed to predict; the rest resumes training.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "file_fingerprint", "load_checkpoint", "load_model", "save_checkpoint"]

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the code."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    An interrupted write never leaves a truncated checkpoint behind: ``path`` holds either
    the previous checkpoint or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: when ``path`` does not exist (with a hint about run folders).
        CheckpointError: when the file is not a readable cellkit checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist; pass RUN_DIR/best.pt or RUN_DIR/last.pt of a `cellkit train` run."
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many kinds for corrupt files
        raise CheckpointError(f"Checkpoint {path} is corrupt or not a torch file: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a cellkit checkpoint: expected a dict with 'model' and 'config', got {keys}."
        )
    state["path"] = str(path)
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build the model of a checkpoint's config and load its weights, in eval mode.

    Returns:
        ``(model, config, checkpoint)``.

    Raises:
        CheckpointError: when the checkpoint's config no longer builds with this version
            of cellkit, or the weights do not fit the model it builds, saying what differs.
    """
    from cellkit import __version__
    from cellkit.builder import build_model
    from cellkit.config import CellkitConfig, ConfigError

    ckpt = load_checkpoint(path)
    try:
        cfg = CellkitConfig.from_dict(ckpt["config"])
        model = build_model(cfg)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"The config stored in {ckpt['path']} (written by cellkit {ckpt.get('cellkit_version', '?')}) "
            f"does not build with cellkit {__version__}: {err}"
        ) from err
    own = model.state_dict()
    saved = ckpt["model"]
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(saved))
        if tuple(own[k].shape) != tuple(saved[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing weights (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(
            f"The weights in {ckpt['path']} (cellkit {ckpt.get('cellkit_version', '?')}) do not match the model "
            f"its config builds with cellkit {__version__}: " + "; ".join(parts)
            + ". Retrain, or use the cellkit version that wrote it."
        )
    model.load_state_dict(saved)
    model.to(device).eval()
    return model, cfg, ckpt


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """A short SHA-256 of a file's bytes (used to invalidate caches built from a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]
