"""cellkit: cell recognition (finding, classifying, counting) in IHC images from point annotations.

The parts, each with its own registry, compose into the paper's multi-task model, its
ablations and baselines, or a variant of your own:

```python
import cellkit

cfg = cellkit.presets.ours_plus_plus(size="cpu")
model = cellkit.build_model(cfg)    # one encoder, decoders main/dynamic/prior
losses = cellkit.build_losses(cfg)  # Lt = Lm + 0.5 Lc + 0.5 Lp + 1.0 Ld
cellkit.MASKS.names()               # ['circle', 'estimated', 'gaussian', ...]
```
"""

from __future__ import annotations

from cellkit.registry import DECODERS, ENCODERS, LOSSES, MASKS, POSTPROCESSORS, Registry, RegistryError

# Importing the subpackages registers cellkit's own plug-ins.
from cellkit import losses, masks, models, postprocess  # noqa: E402  isort: skip
from cellkit import presets  # noqa: E402
from cellkit._version import __version__  # noqa: E402, F401
from cellkit.builder import (  # noqa: E402
    Parts,
    apply_activation,
    build,
    build_losses,
    build_model,
    build_postprocess,
    build_targets,
    check_config,
)
from cellkit.config import (  # noqa: E402
    CellkitConfig,
    ConfigError,
    DataConfig,
    LossSpec,
    ModelConfig,
    PostprocessConfig,
    TargetSpec,
    TrainConfig,
)
from cellkit.points import Detections, validate_points  # noqa: E402
from cellkit.zoo import model_card, pretrained  # noqa: E402
from cellkit import wsi  # noqa: E402, F401  isort: skip  registers the "slides" dataset format

__all__ = [
    "DECODERS",
    "ENCODERS",
    "LOSSES",
    "MASKS",
    "POSTPROCESSORS",
    "CellkitConfig",
    "ConfigError",
    "DataConfig",
    "Detections",
    "LossSpec",
    "ModelConfig",
    "Parts",
    "PostprocessConfig",
    "Registry",
    "RegistryError",
    "TargetSpec",
    "TrainConfig",
    "apply_activation",
    "build",
    "build_losses",
    "build_model",
    "build_postprocess",
    "build_targets",
    "check_config",
    "losses",
    "masks",
    "model_card",
    "models",
    "postprocess",
    "presets",
    "pretrained",
    "validate_points",
]
