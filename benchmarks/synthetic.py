"""Synthetic inputs for the benchmarks: BCData-like cells, IHC-like images, probability maps.

Nothing here is downloaded: every input is drawn from a seed, so two runs time the same work.
The density is BCData's (about 150 annotated cells per 640 x 640 tile); the images are light
backgrounds with brown (class 1, positive) and blue (class 0, negative) round cells, enough
for the colour clustering of the ``estimated`` target to behave as on real tiles.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "BCDATA_CELLS_PER_TILE",
    "BCDATA_TILE",
    "cell_count",
    "cell_points",
    "ihc_image",
    "matched_predictions",
    "probability_maps",
]

#: Cells per 640 x 640 tile in BCData (the density every benchmark uses).
BCDATA_CELLS_PER_TILE = 150
BCDATA_TILE = 640

_BACKGROUND = np.array([232.0, 226.0, 232.0])
_BROWN = np.array([120.0, 70.0, 40.0])  # DAB-positive (class 1)
_BLUE = np.array([70.0, 80.0, 150.0])  # haematoxylin-only (class 0)


def cell_count(height: int, width: int) -> int:
    """Cells of an ``height x width`` image at BCData's density (at least 1).

    Example:
        >>> cell_count(640, 640), cell_count(256, 256)
        (150, 24)
    """
    return max(1, int(round(BCDATA_CELLS_PER_TILE * height * width / BCDATA_TILE**2)))


def cell_points(
    shape: tuple[int, int],
    count: int | None = None,
    num_classes: int = 2,
    min_spacing: float = 6.0,
    rng: np.random.Generator | int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random cell centres, no two closer than ``min_spacing`` (while room allows), and classes.

    Args:
        shape: ``(H, W)`` of the image.
        count: number of cells; default :func:`cell_count` (BCData's density).
        num_classes: classes are drawn uniformly in ``0 .. num_classes - 1``.
        min_spacing: smallest distance between two centres, in pixels.
        rng: seed or generator.

    Returns:
        ``(points float64 (N, 2) (x, y), classes int64 (N,))``, ``N == count``.

    Example:
        >>> p, c = cell_points((64, 64), count=5, rng=0)
        >>> p.shape, c.shape, bool((p >= 0).all() and (p < 64).all())
        ((5, 2), (5,), True)
    """
    gen = np.random.default_rng(rng)
    h, w = shape
    n = cell_count(h, w) if count is None else int(count)
    kept = np.zeros((0, 2))
    # Batches of candidates, each filtered against the kept points and among themselves.
    for _ in range(50):
        if len(kept) >= n:
            break
        cand = np.column_stack([gen.uniform(0, w - 1, 2 * n), gen.uniform(0, h - 1, 2 * n)])
        if len(kept):
            d, _ = cKDTree(kept).query(cand)
            cand = cand[d >= min_spacing]
        # Of two candidates too close to each other, the later one goes.
        pairs = cKDTree(cand).query_pairs(min_spacing, output_type="ndarray")
        keep = np.ones(len(cand), bool)
        keep[pairs[:, 1] if len(pairs) else []] = False
        kept = np.vstack([kept, cand[keep]])[:n]
    if len(kept) < n:  # too crowded for the spacing: fill up without it
        extra = np.column_stack([gen.uniform(0, w - 1, n - len(kept)), gen.uniform(0, h - 1, n - len(kept))])
        kept = np.vstack([kept, extra])
    classes = gen.integers(0, num_classes, size=n).astype(np.int64)
    return kept, classes


def ihc_image(
    shape: tuple[int, int],
    points: np.ndarray,
    classes: np.ndarray,
    cell_radius: float = 6.0,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """An IHC-like ``(H, W, 3)`` uint8 image: brown class-1 and blue class-0 cells on a light ground.

    Example:
        >>> p, c = cell_points((32, 32), count=3, rng=0)
        >>> ihc_image((32, 32), p, c).shape
        (32, 32, 3)
    """
    gen = np.random.default_rng(rng)
    h, w = shape
    image = np.broadcast_to(_BACKGROUND, (h, w, 3)).astype(np.float32).copy()
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, h - 1)
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, w - 1)
    sigma = cell_radius / 1.5
    for cls, colour in ((1, _BROWN), (0, _BLUE)):
        impulses = np.zeros((h, w), np.float32)
        sel = classes == cls
        impulses[rows[sel], cols[sel]] = 1.0
        blob = ndimage.gaussian_filter(impulses, sigma)
        blob = np.minimum(1.0, blob * (2 * np.pi * sigma**2) * 1.3)
        image += blob[..., None] * (colour - _BACKGROUND).astype(np.float32)
    image += gen.normal(0.0, 6.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def probability_maps(
    size: int,
    num_classes: int = 2,
    sigma: float = 2.5,
    noise: float = 0.02,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """``(C, size, size)`` float32 maps in ``[0, 1)`` with one bump per cell, as a model outputs.

    Each class gets BCData's density of cells with peak heights spread across the usual
    0.5 threshold, plus low uniform noise, so many local maxima lie below the threshold and
    (with probability one) no two pixels of a window tie. The maps are squashed with
    ``1 - exp(-2 v)`` rather than clipped, so no plateau of equal values appears.

    Example:
        >>> m = probability_maps(64, rng=0)
        >>> m.shape, m.dtype, bool(0 <= m.min() and m.max() < 1)
        ((2, 64, 64), dtype('float32'), True)
    """
    gen = np.random.default_rng(rng)
    n = cell_count(size, size)
    out = np.empty((num_classes, size, size), np.float32)
    for c in range(num_classes):
        impulses = np.zeros((size, size), np.float32)
        impulses[gen.integers(0, size, n), gen.integers(0, size, n)] = (
            gen.uniform(0.15, 1.0, n) * 2 * np.pi * sigma**2
        )
        out[c] = ndimage.gaussian_filter(impulses, sigma)
    out += gen.uniform(0.0, noise, out.shape).astype(np.float32)
    return (1.0 - np.exp(-2.0 * out)).astype(np.float32)


def matched_predictions(
    truth: np.ndarray,
    shape: tuple[int, int],
    recall: float = 0.9,
    false_positive_rate: float = 0.1,
    jitter: float = 2.0,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """Predictions for ``truth``: a ``recall`` share of the points, moved by ``jitter`` px, plus extras.

    Returns:
        ``(N, 2)`` float64 points inside the image, in random order, with
        ``N = round(recall * M) + round(false_positive_rate * M)`` for ``M`` true points.

    Example:
        >>> t, _ = cell_points((100, 100), count=10, rng=0)
        >>> matched_predictions(t, (100, 100), rng=0).shape
        (10, 2)
    """
    gen = np.random.default_rng(rng)
    h, w = shape
    n = len(truth)
    found = truth[gen.permutation(n)[: int(round(recall * n))]]
    found = found + gen.normal(0.0, jitter, found.shape)
    extra = int(round(false_positive_rate * n))
    extras = np.column_stack([gen.uniform(0, w - 1, extra), gen.uniform(0, h - 1, extra)])
    pred = np.vstack([found, extras])
    pred[:, 0] = np.clip(pred[:, 0], 0, w - 1)
    pred[:, 1] = np.clip(pred[:, 1], 0, h - 1)
    return pred[gen.permutation(len(pred))]
