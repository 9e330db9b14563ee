"""Where the tissue is on a slide: a mask from a low-resolution thumbnail, and the tissue share of a tile.

A whole slide is mostly glass. [`tissue_mask`][] finds the tissue on a thumbnail of the slide
(a few hundred to a few thousand pixels a side) and [`mask_fraction`][] says how much of a
level-0 box lies on it, so only tiles that hold tissue are read and run through the model:

```python
from cellkit.wsi.tissue import mask_fraction, tissue_mask

thumb = np.asarray(slide.get_thumbnail((2048, 2048)).convert("RGB"))
mask = tissue_mask(thumb)
scale = (thumb.shape[1] / slide.dimensions[0],
         thumb.shape[0] / slide.dimensions[1])
keep = mask_fraction(mask, (x, y, 1024, 1024), scale) > 0
```

Coordinates are ``(x, y)`` pixels, ``x`` along the columns; level-0 boxes are ``(x, y, w, h)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SATURATION_CAP", "SATURATION_FLOOR", "mask_fraction", "tissue_mask"]

SATURATION_FLOOR: float = 0.05
"""The lowest saturation threshold [`tissue_mask`][] uses: when Otsu's threshold falls below it
(a thumbnail of glass only, whose saturation is noise), the floor is used, so background is never
split into "tissue" and "glass".
"""

SATURATION_CAP: float = 0.10
"""The highest saturation threshold [`tissue_mask`][] uses (Otsu's may be higher on pale tissue)."""

_WHITE = 220  # every channel above this: glass, not tissue
_BLACK = 25  # every channel below this: pen marks, scanner borders, dust


def _remove_small(mask: np.ndarray, min_px: int, holes: bool) -> np.ndarray:
    """``remove_small_objects`` / ``remove_small_holes`` of objects (holes) under ``min_px`` pixels.

    scikit-image 0.26 replaced ``min_size`` / ``area_threshold`` (remove what is smaller) by
    ``max_size`` (remove what is that size or smaller); this calls whichever is there.
    """
    from skimage import morphology

    func = morphology.remove_small_holes if holes else morphology.remove_small_objects
    if "max_size" in inspect.signature(func).parameters:
        return func(mask, max_size=min_px - 1)
    if holes:  # pragma: no cover - scikit-image < 0.26
        return func(mask, area_threshold=min_px)
    return func(mask, min_size=min_px)  # pragma: no cover - scikit-image < 0.26


def tissue_mask(
    rgb: np.ndarray,
    *,
    min_object_px: int | None = None,
    fill_holes: bool = True,
    threshold: float | None = None,
    closing_px: int = 2,
) -> np.ndarray:
    """The tissue on a low-resolution RGB thumbnail of a slide, as a boolean mask.

    The standard method for brightfield slides (H&E, IHC), which separates stained tissue from
    glass by its colour saturation:

    1. the saturation of HSV, ``(max - min) / max`` over the three channels, in ``[0, 1]``;
    2. near-white pixels (every channel > 220: glass) and near-black ones (every channel < 25:
       pen marks, scanner borders) are set to 0: they are never tissue;
    3. a slight Gaussian blur (sigma 1 pixel) against JPEG and sensor noise;
    4. a threshold by Otsu's method (`skimage.filters.threshold_otsu`), but never below
       [`SATURATION_FLOOR`][] (0.05), so a thumbnail of glass only gives an empty mask, and
       never above [`SATURATION_CAP`][] (0.10): pale tissue (IHC counterstain, loose stroma)
       spreads the tissue's saturations so widely that Otsu's threshold falls inside the
       tissue (it kept half of the tissue of a mosaic of the bundled EndoNuke tiles, and a
       third of the real CMU-1 H&E region's), where glass stays below 0.05;
    5. a morphological closing with a disk of ``closing_px`` pixels joins the stained parts of
       one piece of tissue across the pale gaps between them (lumina, loose stroma);
    6. objects smaller than ``min_object_px`` are removed
       (`skimage.morphology.remove_small_objects`: dust, specks) and holes smaller than
       that are filled (`skimage.morphology.remove_small_holes`: nuclei, small lumina).

    Otsu's method needs both glass and tissue on the thumbnail; on a thumbnail that is all
    tissue it would split the tissue in two (the cap limits the damage); pass ``threshold``
    (e.g. 0.05) for such slides.

    Args:
        rgb: the thumbnail, ``(h, w, 3)`` uint8 RGB
            (``np.asarray(slide.get_thumbnail(size).convert("RGB"))``).
        min_object_px: the smallest object (and the largest hole filled), in thumbnail pixels;
            default 0.1 % of the thumbnail's pixels, at least 16.
        fill_holes: fill the holes smaller than ``min_object_px``.
        threshold: a saturation threshold in ``[0, 1]`` used instead of Otsu's (and the floor).
        closing_px: radius of the closing disk in thumbnail pixels (0: no closing). The
            pipeline computes the mask at about 8 um per thumbnail pixel, where 2 pixels are
            16 um, about two cells.

    Returns:
        ``(h, w)`` bool: True on tissue.

    Shapes:
        rgb: (h, w, 3) uint8 -> (h, w) bool.

    Raises:
        ValueError: for an image that is not ``(h, w, 3)`` uint8, a ``min_object_px`` below 1
            or a ``threshold`` outside ``[0, 1]``.

    Examples:
        >>> thumb = np.full((40, 40, 3), 245, np.uint8)  # glass
        >>> thumb[10:30, 10:30] = (200, 120, 170)  # a square of pink tissue
        >>> mask = tissue_mask(thumb)
        >>> int(mask.sum()), bool(mask[20, 20]), bool(mask[2, 2])
        (400, True, False)
        >>> int(tissue_mask(np.full((40, 40, 3), 245, np.uint8)).sum())
        0
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"tissue_mask: expected an RGB thumbnail of shape (h, w, 3), got shape {arr.shape}; "
            "convert it first, e.g. np.asarray(slide.get_thumbnail(size).convert('RGB'))."
        )
    if arr.dtype != np.uint8:
        raise ValueError(
            f"tissue_mask: expected a uint8 thumbnail (values 0..255), got dtype {arr.dtype}; "
            "convert it with cellkit.data.io.to_rgb_uint8(array)."
        )
    h, w = arr.shape[:2]
    if min_object_px is None:
        min_object_px = max(16, round(0.001 * h * w))
    if int(min_object_px) != min_object_px or min_object_px < 1:
        raise ValueError(f"tissue_mask: min_object_px must be an integer >= 1, got {min_object_px!r}.")
    min_object_px = int(min_object_px)
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"tissue_mask: threshold must lie in [0, 1] (a saturation), got {threshold!r}.")

    hi = arr.max(axis=2).astype(np.float32)
    lo = arr.min(axis=2).astype(np.float32)
    saturation = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    never = (lo > _WHITE) | (hi < _BLACK)
    saturation[never] = 0.0
    blurred = ndimage.gaussian_filter(saturation, sigma=1.0, mode="nearest")
    if threshold is None:
        otsu = float(threshold_otsu(blurred)) if float(blurred.min()) < float(blurred.max()) else 0.0
        cut = min(max(otsu, SATURATION_FLOOR), SATURATION_CAP)
    else:
        cut = float(threshold)
    mask = (blurred > cut) & ~never
    if closing_px:
        # Close gaps narrower than the disk (lumina, pale stroma between stained cells).
        from skimage.morphology import closing, disk

        pad = int(closing_px)
        mask = closing(np.pad(mask, pad), disk(pad)).astype(bool)[pad:-pad, pad:-pad]
    mask = _remove_small(mask, min_object_px, holes=False)
    if fill_holes:
        mask = _remove_small(mask, min_object_px, holes=True)
    return np.asarray(mask, dtype=bool)


def _scales(scale: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(scale, (int, float, np.integer, np.floating)):
        sx = sy = float(scale)
    else:
        values = [float(v) for v in scale]
        if len(values) != 2:
            raise ValueError(
                f"mask_fraction: scale must be one number or a pair (sx, sy), got {len(values)} values."
            )
        sx, sy = values
    if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
        raise ValueError(
            f"mask_fraction: scale must be > 0 (mask pixels per level-0 pixel, e.g. 1/32), got {scale!r}."
        )
    return sx, sy


def _overlap(start: float, stop: float, size: int) -> tuple[int, np.ndarray]:
    """First mask pixel index and the length of ``[start, stop)`` falling on each pixel from it."""
    first = max(0, math.floor(start))
    last = min(size, math.ceil(stop))
    if last <= first:
        return first, np.zeros(0)
    edges = np.arange(first, last + 1, dtype=np.float64)
    return first, np.clip(np.minimum(edges[1:], stop) - np.maximum(edges[:-1], start), 0.0, None)


def mask_fraction(mask: np.ndarray, box: Sequence[float], scale: float | Sequence[float]) -> float:
    """The share of tissue in a level-0 box, measured on a low-resolution mask.

    The box is mapped onto the mask (``x * scale``...) and each mask pixel counts by the area of
    the box it covers, so a box a fraction of a mask pixel wide is measured exactly. Only the part
    of the box that lies on the mask counts (the box is clipped to it: what lies beyond the
    slide's edge is neither tissue nor glass); a box entirely off the mask gives 0.0.

    To choose the tiles to read, dilate the mask by one pixel first
    (``scipy.ndimage.binary_dilation(mask)``) and read the tiles whose fraction is > 0: that keeps
    tiles that hold the tissue's edge, which the thumbnail blurs.

    Args:
        mask: ``(h, w)`` bool (or 0/1) mask, e.g. from [`tissue_mask`][].
        box: ``(x, y, w, h)`` in level-0 slide pixels; ``w`` and ``h`` > 0.
        scale: mask pixels per level-0 pixel (e.g. ``1 / 32``), or a pair ``(sx, sy)`` when the
            thumbnail's two sides were rounded differently (``mask.shape[1] / slide_width``,
            ``mask.shape[0] / slide_height``).

    Returns:
        The tissue share in ``[0, 1]``.

    Raises:
        ValueError: for a mask that is not 2-D, a box that is not four finite numbers with
            ``w, h > 0``, or a scale that is not > 0.

    Examples:
        >>> mask = np.zeros((4, 4), bool)
        >>> mask[:2, :2] = True  # tissue in the top-left quarter
        >>> # the top-left 2x2 mask pixels
        >>> mask_fraction(mask, (0, 0, 64, 64), 1 / 32)
        1.0
        >>> mask_fraction(mask, (0, 0, 128, 128), 1 / 32)
        0.25
        >>> mask_fraction(mask, (32, 0, 64, 32), 1 / 32)  # half on tissue
        0.5
        >>> mask_fraction(mask, (-64, 0, 96, 32), 1 / 32)  # clipped to (0, 0, 32, 32)
        1.0
        >>> mask_fraction(mask, (500, 500, 64, 64), 1 / 32)  # off the mask
        0.0
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_fraction: expected a 2-D (h, w) mask, got shape {m.shape}.")
    try:
        x, y, bw, bh = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(
            f"mask_fraction: expected a box (x, y, w, h) of four numbers, got {box!r}."
        ) from None
    if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
        raise ValueError(
            f"mask_fraction: expected a box (x, y, w, h) of finite numbers with w > 0 and h > 0, got {box!r}."
        )
    sx, sy = _scales(scale)
    c0, wx = _overlap(x * sx, (x + bw) * sx, m.shape[1])
    r0, wy = _overlap(y * sy, (y + bh) * sy, m.shape[0])
    total = float(wx.sum()) * float(wy.sum())
    if total <= 0.0:
        return 0.0
    window: Any = m[r0 : r0 + len(wy), c0 : c0 + len(wx)].astype(np.float64)
    return float(min(1.0, (wy @ window @ wx) / total))
