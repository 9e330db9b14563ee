"""Gaussian density maps: the target of the FCRN counting baseline (Xie et al. 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cellkit.masks.base import check_call, check_positive, point_pixels, window_pixels
from cellkit.registry import MASKS

__all__ = ["GaussianMask"]


@MASKS.register("gaussian")
@dataclass
class GaussianMask:
    """A density map per class: a normalised Gaussian at every point of that class.

    Each point's kernel ``exp(-d^2 / (2 sigma^2))`` is evaluated at the pixel centres
    within ``truncate * sigma`` of the point (and always at its own pixel), then divided
    by its sum over those pixels *inside the image*. Each kernel therefore adds exactly
    ``scale`` to its channel, also for points at the border, and a class channel sums
    to ``scale * (number of points of that class)``: integrating the map counts cells.
    Overlapping kernels add up; channels of different classes are independent.

    Args:
        sigma: standard deviation of the kernel in pixels (> 0).
        scale: integral of each kernel (> 0); the FCRN paper scales densities up (e.g.
            100) to ease regression.
        truncate: kernel support radius in units of ``sigma`` (> 0).

    Shapes:
        points ``(N, 2)`` ``(x, y)``, classes ``(N,)`` -> ``(num_classes, H, W)`` float32.

    Raises:
        ValueError: for invalid parameters, and (on call) points outside the image, wrong
            shapes or classes >= ``num_classes``.

    Examples:
        >>> gen = GaussianMask(sigma=0.7, scale=9.0)
        >>> mask = gen([[2, 1]], [0], shape=(3, 5), num_classes=1)
        >>> print(np.round(mask[0]).astype(int))
        [[0 0 1 0 0]
         [0 1 3 1 0]
         [0 0 1 0 0]]
        >>> round(float(mask.sum()), 4)
        9.0
    """

    sigma: float = 3.0
    scale: float = 1.0
    truncate: float = 4.0

    #: Keyword arguments that scale with the cell diameter (as a multiple of it), set by
    #: ``cellkit.geometry.apply_geometry`` when the geometry comes from the points.
    geometry: ClassVar[dict[str, float]] = {"sigma": 0.25}
    per_image: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.sigma = check_positive("sigma", self.sigma, "gaussian mask")
        self.scale = check_positive("scale", self.scale, "gaussian mask")
        self.truncate = check_positive("truncate", self.truncate, "gaussian mask")

    def channels(self, num_classes: int) -> int:
        """One channel per class."""
        return num_classes

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
        """The density maps of one image (``rng``, ``image`` and ``key`` are not used)."""
        pts, cls, hw, _ = check_call(points, classes, shape, num_classes, image, where="gaussian mask")
        c, (h, w) = int(num_classes), hw
        if len(pts) == 0:
            return np.zeros((c, h, w), dtype=np.float32)
        reach = self.truncate * self.sigma
        own_r, own_c = point_pixels(pts, hw)
        # Distances relative to the own pixel (the nearest pixel centre) keep the largest
        # weight of every kernel at 1, so a tiny sigma never underflows to an all-zero kernel.
        own_d2 = (own_c - pts[:, 0]) ** 2 + (own_r - pts[:, 1]) ** 2
        parts_i, parts_f, parts_w = [], [], []
        for index, rows, cols, dx, dy in window_pixels(pts, reach, hw):
            d2 = dx * dx + dy * dy
            keep = (d2 <= reach * reach) | ((rows == own_r[index]) & (cols == own_c[index]))
            index, d2 = index[keep], d2[keep]
            parts_i.append(index)
            parts_f.append((cls[index] * h + rows[keep]) * w + cols[keep])
            parts_w.append(np.exp(-(d2 - own_d2[index]) / (2.0 * self.sigma**2)))
        index, flat, weight = np.concatenate(parts_i), np.concatenate(parts_f), np.concatenate(parts_w)
        totals = np.bincount(index, weights=weight, minlength=len(pts))
        weight = weight * (self.scale / totals[index])
        density = np.bincount(flat, weights=weight, minlength=c * h * w)
        return density.reshape(c, h, w).astype(np.float32)
