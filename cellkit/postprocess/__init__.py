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

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from cellkit.points import Detections
# The function stays at cellkit.postprocess.peaks.peaks: re-exporting it here would shadow
# the submodule of the same name.
from cellkit.postprocess.peaks import LocalPeaks, window_max

__all__ = ["LocalPeaks", "PostProcessor", "window_max"]


@runtime_checkable
class PostProcessor(Protocol):
    """Turns one image's ``(C, H, W)`` probability maps into detections.

    Shapes:
        probs: ``(C, H, W)`` torch tensor (any device) or numpy array -> ``N`` detections.
    """

    def __call__(self, probs: torch.Tensor | np.ndarray) -> Detections:
        """Detections (points ``(x, y)``, classes, scores) of one image."""
        ...
