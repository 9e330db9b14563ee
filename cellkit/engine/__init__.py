"""Training stages, inference on any image size, checkpoints.

- [`cellkit.engine.train`][]: [`fit`][] runs the paper's schedule (stage 1, the
  early-stopped pre-trained model, when the config has a ``prior`` target; then the
  multi-task model) into a run folder, with validation, ``best.pt``/``last.pt`` and resuming.
- [`cellkit.engine.distributed`][]: the same under ``torchrun`` (DistributedDataParallel).
- [`cellkit.engine.predict`][]: tiled inference ([`predict_image`][], [`Predictor`][]).
- [`cellkit.engine.evaluate`][]: scoring a folder of predictions ([`evaluate_folder`][]).
- [`cellkit.engine.checkpoint`][]: atomic checkpoints and [`load_model`][].
- [`cellkit.engine.plots`][]: the training curves
  ([`plot_training`][cellkit.engine.plots.plot_training]) and the errors of an
  evaluation ([`plot_errors`][cellkit.engine.plots.plot_errors]).

Examples:
    Training writes a run folder (skipped here: it trains for minutes and writes
    ``runs/ours``):

    >>> import cellkit
    >>> from cellkit.engine import fit, load_model
    >>> cfg = cellkit.presets.ours(size="cpu")
    >>> result = fit(cfg, "runs/ours")                   # doctest: +SKIP
    >>> model, cfg, ckpt = load_model(result.best_path)  # doctest: +SKIP
"""

from __future__ import annotations

from cellkit.config import SCHEDULERS
from cellkit.engine.checkpoint import (
    CheckpointError,
    file_fingerprint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from cellkit.engine.distributed import DistInfo, dist_info
from cellkit.engine.evaluate import EvaluationResult, evaluate_folder
from cellkit.engine.plots import plot_errors, plot_training
from cellkit.engine.predict import Predictor, predict_image, predict_probabilities
from cellkit.engine.runs import RUN_EXISTS_MESSAGE
from cellkit.engine.train import TrainResult, fit
from cellkit.engine.validation import run_score

__all__ = [
    "RUN_EXISTS_MESSAGE",
    "SCHEDULERS",
    "CheckpointError",
    "DistInfo",
    "EvaluationResult",
    "Predictor",
    "TrainResult",
    "dist_info",
    "evaluate_folder",
    "file_fingerprint",
    "fit",
    "load_checkpoint",
    "load_model",
    "plot_errors",
    "plot_training",
    "predict_image",
    "predict_probabilities",
    "run_score",
    "save_checkpoint",
]
