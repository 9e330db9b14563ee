"""The run folder of `cellkit train`: its files, checkpoints, metrics, and resuming.

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
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cellkit._version import __version__
from cellkit.config import CellkitConfig, ConfigError
from cellkit.data.guard import check_outputs
from cellkit.data.io import jsonable, remove_stale_temporaries, write_text_atomic
from cellkit.engine.checkpoint import load_checkpoint, save_checkpoint
from cellkit.engine.distributed import unwrap
from cellkit.engine.loop import _summary
from cellkit.engine.plots import plot_training
from cellkit.progress import duration

if TYPE_CHECKING:  # the stage a function works on; train imports this module
    from cellkit.engine.train import _Stage

__all__ = ["INT8_CALIBRATION_CROPS", "RUN_EXISTS_MESSAGE", "SPLIT_FILE", "read_split"]

SPLIT_FILE = "split.json"
"""The run's split: the keys of its training, validation and test images."""


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
        # A new run writes these too; in a folder that is not a run they are someone else's.
        check_outputs(
            "cellkit train", [out / "curves.png", out / "calibration.json", out / "timings.json",
                              out / SPLIT_FILE],
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
    # A field added to the config since the run was saved, at its default, is no difference.
    diffs = [d for d in diffs if not _added_at_default(d, ckpt["config"], cfg.to_dict())]
    diffs = [d for d in diffs if d not in _RESUMABLE_CHANGES]
    if diffs:
        raise ConfigError(
            f"Cannot resume {path}: the config differs from the one it was trained with in "
            f"{', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}. Resume with the run's own "
            f"config.yaml (only train.epochs may change), or train into another folder."
        )


def _added_at_default(where: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """``where`` (``"train.ema"``) is absent from ``old`` and holds its default in ``new``."""
    *parents, name = where.split(".")
    for key in parents:
        old, new = old.get(key) if isinstance(old, Mapping) else None, new.get(key)
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            return False
    if name in old or name not in new or not parents:
        return False
    # The section's default ("pretrain.train.ema" is a train section too).
    section = getattr(CellkitConfig(), parents[-1], None)
    return hasattr(section, name) and getattr(section, name) == new[name]


def _write_metrics(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(jsonable(r)) + "\n" for r in history))


def _append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(jsonable(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _save_round(st: _Stage, record: Mapping[str, Any], improved: bool, scheduler: Any,
                total_steps: int | None) -> None:
    """Write last.pt (and best.pt when the round is the best), then its metrics line."""
    if not st.info.is_main:
        return
    state = {
        "cellkit_version": __version__, "config": st.cfg.to_dict(),
        "model": st.weights.state_dict(), "optimizer": st.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": st.scaler.state_dict() if st.ctx.use_amp else None,
        "epoch": record["epoch"], "best_score": st.best_score, "rng": _rng_state(),
        "class_names": st.class_names, "history": st.history, "stage": st.name,
        "split": {k: [s.key for s in v] for k, v in st.split.items()},
        "world_size": st.info.world_size, "postprocess": st.chosen_post, "max_steps": st.max_steps,
    }
    if st.average is not None:  # training resumes from the raw weights; "model" is the average
        state["train_model"] = unwrap(st.model).state_dict()
        state["averaged_steps"] = int(st.average.n_averaged.item())
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


def _write_split(out: Path, split: Mapping[str, Sequence[Any]]) -> None:
    """``<run>/split.json``: the keys of the images of each split (``train``, ``validation``, ``test``)."""
    keys = {name: [str(getattr(s, "key", s)) for s in split.get(part, [])]
            for name, part in (("train", "train"), ("validation", "val"), ("test", "test"))}
    write_text_atomic(out / SPLIT_FILE, json.dumps(keys, indent=1) + "\n")


def read_split(run: str | Path, part: str) -> list[str]:
    """The keys of the images of split ``part`` (``train``, ``validation``, ``test``) of a training run.

    From ``<run>/split.json``, or, for a run made before it was written, from its ``best.pt``.

    Raises:
        FileNotFoundError: when ``run`` is not a training run's folder.
        ValueError: for an unknown ``part``.
    """
    if part not in ("train", "validation", "test"):
        raise ValueError(f"the split of a run is 'train', 'validation' or 'test', got {part!r}.")
    run = Path(run).expanduser()
    if (run / SPLIT_FILE).is_file():
        try:
            data = json.loads((run / SPLIT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise ValueError(f"{run / SPLIT_FILE} is not a split written by cellkit train ({err}).") from err
        keys = data.get(part) if isinstance(data, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{run / SPLIT_FILE} holds no list of image names for {part!r}.")
        return keys
    if (run / "best.pt").is_file():
        stored = load_checkpoint(run / "best.pt", map_location="cpu").get("split") or {}
        return [str(k) for k in stored.get({"validation": "val"}.get(part, part), [])]
    raise FileNotFoundError(f"{run}: no training run here (no {SPLIT_FILE} nor best.pt); give the --out folder of "
                            "cellkit train.")


def _write_timings(st: _Stage, total: float) -> None:
    """``<stage folder>/timings.json``: where this process's time in the stage went, and one line saying it.

    The phases ([`PhaseTimes`][cellkit.progress.PhaseTimes]): ``steps`` (forward, backward,
    optimizer), ``data loading`` (waiting for batches), ``validation``, ``checkpoints``,
    ``target preparation`` (the prior's stage-1 maps), ``calibration`` and ``calibration
    (int8)``; ``other`` is the rest of the stage (building, loading the images' targets...).
    A resumed stage counts from its restart. The machine's load average is recorded beside:
    a timing taken while other work shared the cores says so.
    """
    seconds = st.times.to_dict()
    seconds["other"] = round(max(0.0, total - sum(seconds.values())), 3)
    steps_run = sum(int(r.get("steps", 0)) for r in st.history[st.start:])
    record = {
        "stage": st.name, "total_seconds": round(total, 3), "seconds": seconds, "steps_run": steps_run,
        "steps_per_second": round(steps_run / seconds["steps"], 3) if seconds.get("steps") else None,
        "device": str(st.ctx.dev), "precision": st.ctx.precision, "threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "resumed_at_round": st.start,
    }
    write_text_atomic(st.out / "timings.json", json.dumps(record, indent=2) + "\n")
    if st.progress is not False:
        where = "stage 1 " if st.name == "pretrain" else ""
        print(f"{where}time {duration(total)}: {st.times.summary()}", file=sys.stderr, flush=True)


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def _draw_curves(out: Path, progress: bool | None) -> None:
    """``<run>/curves.png`` at the end of a run; a picture that fails warns and never fails the run."""
    try:
        path = plot_training(out)
    except Exception as err:  # noqa: BLE001  matplotlib missing, a full disk...: the weights are saved
        warnings.warn(f"the training curves were not drawn ({type(err).__name__}: {err}); draw them later "
                      f"with `cellkit plot {out}`.", RuntimeWarning, stacklevel=3)
        return
    if progress is not False:
        print(f"training curves: {path}", file=sys.stderr, flush=True)


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
    unwrap(st.model).load_state_dict(ckpt.get("train_model", ckpt["model"]))
    if st.average is not None:
        st.average.module.load_state_dict(ckpt["model"])
        st.average.n_averaged.fill_(int(ckpt.get("averaged_steps", 0)))
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
