"""Augmentation that moves the points with the image.

Geometric transforms ([`flip`][], [`rot90`][]) act on the image, on extra per-image
maps (``(C, H, W)`` targets computed once per image, such as the prior) and on the points
together, exactly as ``np.flip`` / ``np.rot90`` move the pixels. Points use the
pixel-centre convention shared by cellkit: pixel ``(row r, column c)`` is the point
``(x=c, y=r)``, so a horizontal flip maps ``x -> W - 1 - x``.

Colour transforms change the image only: stain jitter in HED space (the standard for
IHC, Tellez et al. 2018) and brightness/contrast. [`Augment`][] draws them at random
from an explicit ``numpy`` generator; there is no hidden global random state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cellkit.imaging import check_image
from cellkit.points import as_points

__all__ = [
    "Augment",
    "brightness_contrast",
    "flip",
    "flip_points",
    "hed_jitter",
    "rot90",
    "rot90_points",
]

# skimage.color.rgb2hed scales optical density by log(1e-6); hed_jitter uses the same
# scale so its strengths read like skimage's HED values (about 0 .. 0.25 on IHC tiles).
_LOG_ADJUST = float(np.log(1e-6))


def _check_maps(maps: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if maps is None:
        return None
    arr = np.asarray(maps)
    if arr.ndim != 3 or arr.shape[1:] != tuple(shape):
        raise ValueError(
            f"maps must have shape (C, H, W) = (C, {shape[0]}, {shape[1]}) to match the image, "
            f"got {arr.shape}."
        )
    return arr


def flip_points(points: Any, shape: tuple[int, int], axis: int) -> np.ndarray:
    """Where ``np.flip(image, axis)`` moves each point.

    Args:
        points: ``(N, 2)`` ``(x, y)``.
        shape: ``(H, W)`` of the image before the flip.
        axis: 1 flips left-right (``x -> W - 1 - x``), 0 flips up-down (``y -> H - 1 - y``).

    Examples:
        >>> flip_points([[0, 2]], (3, 4), axis=1).tolist()
        [[3.0, 2.0]]
    """
    pts = as_points(points).copy()
    if axis == 1:
        pts[:, 0] = shape[1] - 1 - pts[:, 0]
    elif axis == 0:
        pts[:, 1] = shape[0] - 1 - pts[:, 1]
    else:
        raise ValueError(f"axis must be 0 (up-down) or 1 (left-right), got {axis!r}.")
    return pts


def rot90_points(points: Any, shape: tuple[int, int], k: int = 1) -> np.ndarray:
    """Where ``np.rot90(image, k)`` (counter-clockwise) moves each point.

    One turn maps pixel ``(row r, col c)`` of an ``H x W`` image to ``(W - 1 - c, r)`` of
    the ``W x H`` result, i.e. ``(x, y) -> (y, W - 1 - x)``.

    Examples:
        >>> rot90_points([[0, 2]], (3, 4), k=1).tolist()
        [[2.0, 3.0]]
    """
    pts = as_points(points).copy()
    h, w = int(shape[0]), int(shape[1])
    for _ in range(int(k) % 4):
        pts = np.column_stack([pts[:, 1], w - 1 - pts[:, 0]])
        h, w = w, h
    return pts


def flip(
    image: np.ndarray, points: Any, axis: int, maps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flip the image, the maps and the points together.

    Args:
        image: ``(H, W, 3)`` (any channels) array.
        points: ``(N, 2)`` ``(x, y)``.
        axis: 1 left-right, 0 up-down (the image's axis, as for ``np.flip``).
        maps: optional ``(C, H, W)`` maps flipped with the image.

    Shapes:
        image (H, W, ...), maps (C, H, W), points (N, 2): the same shapes back.

    Examples:
        >>> img = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
        >>> out, pts, _ = flip(img, [[0, 1]], axis=1)
        >>> int(img[1, 0, 0]) == int(out[int(pts[0, 1]), int(pts[0, 0]), 0])
        True
    """
    img = np.asarray(image)
    shape = img.shape[:2]
    m = _check_maps(maps, shape)
    pts = flip_points(points, shape, axis)
    out = np.ascontiguousarray(np.flip(img, axis=axis))
    out_maps = None if m is None else np.ascontiguousarray(np.flip(m, axis=axis + 1))
    return out, pts, out_maps


def rot90(
    image: np.ndarray, points: Any, k: int = 1, maps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rotate the image, the maps and the points by ``k`` quarter turns counter-clockwise.

    Shapes:
        image (H, W, ...) -> (W, H, ...) for odd ``k``; maps (C, H, W) likewise; points (N, 2).

    Examples:
        >>> img = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
        >>> out, pts, _ = rot90(img, [[2, 1]], k=1)
        >>> out.shape
        (3, 2, 1)
        >>> int(out[int(pts[0, 1]), int(pts[0, 0]), 0]) == int(img[1, 2, 0])
        True
    """
    img = np.asarray(image)
    shape = img.shape[:2]
    m = _check_maps(maps, shape)
    pts = rot90_points(points, shape, k)
    out = np.ascontiguousarray(np.rot90(img, k=k, axes=(0, 1)))
    out_maps = None if m is None else np.ascontiguousarray(np.rot90(m, k=k, axes=(1, 2)))
    return out, pts, out_maps


def hed_jitter(
    image: np.ndarray,
    rng: np.random.Generator | int | None = None,
    sigma: float = 0.05,
    bias: float = 0.01,
) -> np.ndarray:
    """Stain augmentation: scale and shift each HED channel at random.

    The image is taken to haematoxylin-eosin-DAB stain space with skimage's
    colour-deconvolution matrix (``skimage.color.hed_from_rgb``, the same optical density
    as ``skimage.color.rgb2hed``), each channel ``s`` becomes ``s * a + b`` with
    ``a ~ U(1 - sigma, 1 + sigma)`` and ``b ~ U(-bias, bias)``, and the result goes back
    with ``rgb_from_hed``. Unlike ``rgb2hed``, negative stain values are not clipped, so
    zero strengths give the image back unchanged.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        rng: a generator or seed.
        sigma: relative scale jitter per stain.
        bias: absolute shift per stain, in rgb2hed units (an IHC tile's stains span about
            0 .. 0.25 with a standard deviation near 0.04).

    Returns:
        ``(H, W, 3)`` uint8.

    Examples:
        >>> img = np.full((2, 2, 3), 128, np.uint8)
        >>> bool((hed_jitter(img, 0, sigma=0, bias=0) == img).all())
        True
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    img = check_image(image, where="hed_jitter")
    gen = np.random.default_rng(rng)
    alpha = gen.uniform(1 - sigma, 1 + sigma, size=3)
    beta = gen.uniform(-bias, bias, size=3)
    od = np.log(np.maximum(img.astype(np.float64) / 255.0, 1e-6)) / _LOG_ADJUST
    stains = od @ hed_from_rgb
    stains = stains * alpha + beta
    rgb = np.exp((stains @ rgb_from_hed) * _LOG_ADJUST)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def brightness_contrast(
    image: np.ndarray,
    rng: np.random.Generator | int | None = None,
    brightness: float = 0.1,
    contrast: float = 0.1,
) -> np.ndarray:
    """Random brightness and contrast: ``(image - mean) * c + mean + b``.

    ``c ~ U(1 - contrast, 1 + contrast)`` about the image mean and
    ``b ~ U(-brightness, brightness) * 255``; the result is clipped to 0..255.

    Examples:
        >>> img = np.full((2, 2, 3), 100, np.uint8)
        >>> out = brightness_contrast(img, 0, brightness=0, contrast=0)
        >>> out.tolist() == img.tolist()
        True
    """
    img = check_image(image, where="brightness_contrast")
    gen = np.random.default_rng(rng)
    c = gen.uniform(1 - contrast, 1 + contrast)
    b = gen.uniform(-brightness, brightness) * 255.0
    x = img.astype(np.float32)
    mean = float(x.mean())
    out = (x - mean) * c + mean + b
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclass
class Augment:
    """Random flips, quarter turns, HED stain jitter and brightness/contrast.

    Every transform that moves pixels moves the points and the extra maps with them;
    the points keep their order, so their classes (and any other per-point data) stay
    valid. Colour transforms leave the maps alone.

    Args:
        flip_p: probability of a left-right flip, and (independently) of an up-down flip.
        rot90_p: probability of a rotation by 90, 180 or 270 degrees (equally likely).
        keep_shape: rotate non-square images by 180 degrees only, so the output keeps
            its shape (needed to batch non-square crops).
        hed_p: probability of [`hed_jitter`][].
        hed_sigma, hed_bias: its strengths.
        brightness_contrast_p: probability of [`brightness_contrast`][].
        brightness, contrast: its strengths.

    Raises:
        ValueError: for a probability outside [0, 1] or a negative strength.

    Examples:
        >>> aug = Augment(hed_p=0.0, brightness_contrast_p=0.0)
        >>> img = np.zeros((4, 4, 3), np.uint8)
        >>> out, pts, maps = aug(img, [[1.0, 2.0]], rng=0)
        >>> out.shape, pts.shape, maps
        ((4, 4, 3), (1, 2), None)
    """

    flip_p: float = 0.5
    rot90_p: float = 0.5
    keep_shape: bool = True
    hed_p: float = 0.5
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    brightness_contrast_p: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        for name in ("flip_p", "rot90_p", "hed_p", "brightness_contrast_p"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"Augment: {name} is a probability in [0, 1], got {value!r}.")
        for name in ("hed_sigma", "hed_bias", "brightness", "contrast"):
            value = getattr(self, name)
            if not float(value) >= 0.0:
                raise ValueError(f"Augment: {name} must be >= 0, got {value!r}.")

    @classmethod
    def none(cls) -> Augment:
        """An Augment that changes nothing (every probability 0)."""
        return cls(flip_p=0.0, rot90_p=0.0, hed_p=0.0, brightness_contrast_p=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a plain dict (``Augment(**d)`` builds it back)."""
        return asdict(self)

    def __call__(
        self,
        image: np.ndarray,
        points: Any,
        maps: np.ndarray | None = None,
        *,
        rng: np.random.Generator | int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Augment one image with its points and maps.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            points: ``(N, 2)`` ``(x, y)``.
            maps: optional ``(C, H, W)`` float maps transformed with the image.
            rng: a generator (advanced) or a seed.

        Returns:
            ``(image, points, maps)``; the shapes swap H and W after an odd rotation.
        """
        gen = np.random.default_rng(rng)
        img = check_image(image, where="Augment")
        pts = as_points(points)
        m = _check_maps(maps, img.shape[:2])
        if self.flip_p and gen.random() < self.flip_p:
            img, pts, m = flip(img, pts, axis=1, maps=m)
        if self.flip_p and gen.random() < self.flip_p:
            img, pts, m = flip(img, pts, axis=0, maps=m)
        if self.rot90_p and gen.random() < self.rot90_p:
            square = img.shape[0] == img.shape[1]
            k = int(gen.integers(1, 4)) if square or not self.keep_shape else 2
            img, pts, m = rot90(img, pts, k=k, maps=m)
        if self.hed_p and gen.random() < self.hed_p:
            img = hed_jitter(img, gen, self.hed_sigma, self.hed_bias)
        if self.brightness_contrast_p and gen.random() < self.brightness_contrast_p:
            img = brightness_contrast(img, gen, self.brightness, self.contrast)
        return img, pts, m
