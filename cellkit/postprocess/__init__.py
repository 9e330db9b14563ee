"""Post-processing: per-class probability maps -> cells ([`Detections`][cellkit.points.Detections]).

Every post-processor is registered in
[`cellkit.registry.POSTPROCESSORS`][cellkit.registry.POSTPROCESSORS] and follows the
[`PostProcessor`][] protocol: built with keyword arguments, called on one ``(C, H, W)``
probability map. The built-in one is ``peaks`` ([`LocalPeaks`][], the paper's local-peak
picking):

```python
post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
detections = post(torch.sigmoid(model.infer(x))[0])
```
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cellkit.points import Detections

# The function stays at cellkit.postprocess.peaks.peaks: re-exporting it here would shadow
# the submodule of the same name.
from cellkit.postprocess.peaks import LocalPeaks, window_max
from cellkit.registry import POSTPROCESSORS

__all__ = ["LocalPeaks", "PostProcessor", "postprocess_problems", "window_max"]


@runtime_checkable
class PostProcessor(Protocol):
    """Turns one image's ``(C, H, W)`` probability maps into detections.

    Shapes:
        probs: ``(C, H, W)`` torch tensor (any device) or numpy array -> ``N`` detections.
    """

    def __call__(self, probs: torch.Tensor | np.ndarray) -> Detections:
        """Detections (points ``(x, y)``, classes, scores) of one image."""
        ...


def postprocess_problems(name: str, kwargs: Any, *, activation: str = "sigmoid", num_classes: int | None = None,
                         where: str = "postprocess.kwargs") -> list[str]:
    """The problems of a post-processor's arguments, as its own ``kwargs_problems`` states them.

    A post-processor declares the checks of its arguments itself: a static method
    ``kwargs_problems(kwargs, *, activation, num_classes, where) -> list[str]`` on its
    registered factory (``peaks``: thresholds in ``[0, 1]`` on probability maps, one value or
    one per class). Configs, checkpoints and ``cellkit predict --threshold`` are checked through
    this function, so nothing outside the plug-in tests its name. A post-processor without the
    method (or a name not registered, which building reports) has no problems here.

    Examples:
        >>> postprocess_problems("peaks", {"threshold": 2.0})
        ... # doctest: +ELLIPSIS
        ['postprocess.kwargs.threshold: expected a value in [0, 1] ...']
    """
    if not isinstance(name, str) or name not in POSTPROCESSORS:
        return []
    check = getattr(POSTPROCESSORS.get(name), "kwargs_problems", None)
    if not callable(check):
        return []
    return list(check(kwargs, activation=activation, num_classes=num_classes, where=where))
