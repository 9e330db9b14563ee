"""Mask generators: point annotations -> training targets ``(C, H, W)`` float32.

Importing this package registers every generator in
[`cellkit.registry.MASKS`][cellkit.registry.MASKS]:

| name | target |
|---|---|
| ``circle`` | discs of a fixed radius, the main decoder's proximity masks |
| ``random_polygon`` | a new random polygon per cell per call, the dynamic masks |
| ``gaussian`` | normalised Gaussian densities, the FCRN baseline's target |
| ``estimated`` | Voronoi cells x colour clusters, the EstimateMask baseline |
| ``prior`` | a pre-trained model's probability map, the tissue prior |

Build one by name, ``MASKS.build("circle", radius=4)``, and call it as described by
[`MaskGenerator`][cellkit.masks.base.MaskGenerator]. The overlap rules and the pixel
convention are described in [`cellkit.masks.base`][cellkit.masks.base].

Examples:
    >>> from cellkit.registry import MASKS
    >>> gen = MASKS.build("circle", radius=1)
    >>> print(gen([[1, 1]], [0], shape=(3, 3), num_classes=1)[0].astype(int))
    [[0 1 0]
     [1 1 1]
     [0 1 0]]
"""

from __future__ import annotations

from cellkit.masks.base import MaskGenerator, as_rng, point_pixels
from cellkit.masks.circle import CircleMask
from cellkit.masks.estimated import EstimatedMask
from cellkit.masks.gaussian import GaussianMask
from cellkit.masks.prior import PriorMask
from cellkit.masks.random_polygon import PolygonDraw, RandomPolygonMask

__all__ = [
    "CircleMask",
    "EstimatedMask",
    "GaussianMask",
    "MaskGenerator",
    "PolygonDraw",
    "PriorMask",
    "RandomPolygonMask",
    "as_rng",
    "point_pixels",
]
