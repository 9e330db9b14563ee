"""Augmentation that moves the points with the image.

Geometric transforms ([`flip`][], [`rot90`][]) act on the image, on extra per-image
maps (``(C, H, W)`` targets computed once per image, such as the prior) and on the points
together, exactly as ``np.flip`` / ``np.rot90`` move the pixels. Points use the
pixel-centre convention shared by cellkit: pixel ``(row r, column c)`` is the point
``(x=c, y=r)``, so a horizontal flip maps ``x -> W - 1 - x``.

Colour transforms change the image only: stain jitter in HED space (the standard for
IHC, Tellez et al. 2018), brightness/contrast, saturation, gamma, blur and JPEG
compression, the ways one lab's stain and scanner differ from another's.
[`Augment.rescale`][] zooms an image with its points and maps (a scanner at another pixel
size), before the crop. [`Augment`][] draws them at random from an explicit ``numpy``
generator; there is no hidden global random state. [`augment_profile`][] names the
strengths (``default``, ``strong``, ``none``; ``cellkit train --augment``).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cellkit.imaging import check_image
from cellkit.points import as_points

__all__ = [
    "AUGMENT_PROFILES",
    "Augment",
    "augment_profile",
    "blur",
    "brightness_contrast",
    "gamma",
    "jpeg",
    "rescale",
    "saturation",
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


def saturation(image: np.ndarray, rng: np.random.Generator | int | None = None, strength: float = 0.2
               ) -> np.ndarray:
    """Random saturation: each pixel's distance from its grey value times ``U(1 - s, 1 + s)``.

    Examples:
        >>> img = np.full((2, 2, 3), 90, np.uint8)
        >>> bool((saturation(img, 0, 0.5) == img).all())  # grey stays grey
        True
    """
    img = check_image(image, where="saturation")
    gen = np.random.default_rng(rng)
    f = gen.uniform(1 - strength, 1 + strength)
    x = img.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    out = grey[..., None] + (x - grey[..., None]) * f
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def gamma(image: np.ndarray, rng: np.random.Generator | int | None = None, strength: float = 0.2) -> np.ndarray:
    """Random gamma: ``255 (x / 255) ** g`` with ``log g ~ U(-s, s)`` (a scanner's tone curve).

    Examples:
        >>> img = np.array([[[0, 255, 255]]], np.uint8)
        >>> gamma(img, 0, 0.3).tolist()  # black and white stay
        [[[0, 255, 255]]]
    """
    img = check_image(image, where="gamma")
    gen = np.random.default_rng(rng)
    g = float(np.exp(gen.uniform(-strength, strength)))
    lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)
    return lut[img]


def blur(image: np.ndarray, rng: np.random.Generator | int | None = None, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur with a standard deviation ``U(0, sigma)`` pixels (focus, optics).

    Examples:
        >>> img = np.zeros((5, 5, 3), np.uint8); img[2, 2] = 255
        >>> int(blur(img, 0, 2.0)[2, 2, 0]) < 255
        True
    """
    from scipy.ndimage import gaussian_filter

    img = check_image(image, where="blur")
    gen = np.random.default_rng(rng)
    s = float(gen.uniform(0.0, sigma))
    if s <= 0:
        return img.copy()
    out = gaussian_filter(img.astype(np.float32), sigma=(s, s, 0))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, rng: np.random.Generator | int | None = None, quality: tuple[int, int] = (40, 95)
         ) -> np.ndarray:
    """JPEG compression at a quality ``U(quality)`` (the artefacts of a slide scanner's tiles).

    Examples:
        >>> img = np.full((8, 8, 3), 120, np.uint8)
        >>> jpeg(img, 0).shape
        (8, 8, 3)
    """
    from PIL import Image

    img = check_image(image, where="jpeg")
    gen = np.random.default_rng(rng)
    q = int(gen.integers(int(quality[0]), int(quality[1]) + 1))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()


def rescale(
    image: np.ndarray, points: Any, factor: float, maps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Zoom an image, its points and maps by ``factor`` (bilinear; ``> 1`` enlarges).

    A point keeps its place on the tissue: pixel centres scale about the image's corner,
    ``x -> (x + 0.5) * f - 0.5`` (clipped into the new image).

    Examples:
        >>> img, pts, _ = rescale(np.zeros((10, 20, 3), np.uint8), [[9.5, 4.5]], 2.0)
        >>> img.shape, pts.tolist()
        ((20, 40, 3), [[19.5, 9.5]])
    """
    from scipy.ndimage import zoom

    img = check_image(image, where="rescale")
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"rescale: factor must be a positive number, got {factor!r}.")
    h, w = img.shape[:2]
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    zh, zw = nh / h, nw / w
    out = zoom(img.astype(np.float32), (zh, zw, 1), order=1, mode="nearest", grid_mode=True)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    m = _check_maps(maps, (h, w))
    out_maps = None if m is None else zoom(m.astype(np.float32), (1, zh, zw), order=1, mode="nearest",
                                             grid_mode=True)
    pts = as_points(points).copy()
    if len(pts):
        pts[:, 0] = np.clip((pts[:, 0] + 0.5) * zw - 0.5, 0, nw - 1)
        pts[:, 1] = np.clip((pts[:, 1] + 0.5) * zh - 0.5, 0, nh - 1)
    return out, pts, out_maps


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
        saturation_p, saturation: [`saturation`][cellkit.data.augment.saturation] and its strength.
        gamma_p, gamma: [`gamma`][cellkit.data.augment.gamma] and its strength (``log`` of the exponent).
        blur_p, blur_sigma: [`blur`][] and its largest sigma, pixels.
        jpeg_p, jpeg_quality: [`jpeg`][] and its quality range.
        scale_p, scale: probability and range of a zoom by ``U(1 - scale, 1 + scale)``,
            applied by the dataset before the crop ([`Augment.rescale`][]).

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
    saturation_p: float = 0.0
    saturation: float = 0.2
    gamma_p: float = 0.0
    gamma: float = 0.2
    blur_p: float = 0.0
    blur_sigma: float = 1.0
    jpeg_p: float = 0.0
    jpeg_quality: tuple[int, int] = (40, 95)
    scale_p: float = 0.0
    scale: float = 0.25

    def __post_init__(self) -> None:
        for name in ("flip_p", "rot90_p", "hed_p", "brightness_contrast_p", "saturation_p", "gamma_p", "blur_p",
                     "jpeg_p", "scale_p"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"Augment: {name} is a probability in [0, 1], got {value!r}.")
        for name in ("hed_sigma", "hed_bias", "brightness", "contrast", "saturation", "gamma", "blur_sigma"):
            value = getattr(self, name)
            if not float(value) >= 0.0:
                raise ValueError(f"Augment: {name} must be >= 0, got {value!r}.")
        if not 0.0 <= float(self.scale) < 1.0:
            raise ValueError(f"Augment: scale is a relative range in [0, 1), got {self.scale!r}.")
        q = tuple(int(v) for v in self.jpeg_quality)
        if len(q) != 2 or not 1 <= q[0] <= q[1] <= 100:
            raise ValueError(f"Augment: jpeg_quality is (low, high) within 1..100, got {self.jpeg_quality!r}.")
        self.jpeg_quality = q  # type: ignore[assignment]

    @classmethod
    def none(cls) -> Augment:
        """An Augment that changes nothing (every probability 0)."""
        return cls(flip_p=0.0, rot90_p=0.0, hed_p=0.0, brightness_contrast_p=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a plain dict (``Augment(**d)`` builds it back)."""
        out = asdict(self)
        out["jpeg_quality"] = list(self.jpeg_quality)
        return out

    def rescale(
        self,
        image: np.ndarray,
        points: Any,
        maps: np.ndarray | None = None,
        *,
        rng: np.random.Generator | int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """With probability ``scale_p``, zoom by ``U(1 - scale, 1 + scale)`` ([`rescale`][]).

        The dataset calls it before the crop, so every crop keeps its size. Draws nothing
        from ``rng`` when ``scale_p`` is 0.
        """
        if not self.scale_p:
            return image, as_points(points), maps
        gen = np.random.default_rng(rng)
        if gen.random() >= self.scale_p:
            return image, as_points(points), maps
        return rescale(image, points, float(gen.uniform(1 - self.scale, 1 + self.scale)), maps)

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
        if self.saturation_p and gen.random() < self.saturation_p:
            img = saturation(img, gen, self.saturation)
        if self.gamma_p and gen.random() < self.gamma_p:
            img = gamma(img, gen, self.gamma)
        if self.blur_p and gen.random() < self.blur_p:
            img = blur(img, gen, self.blur_sigma)
        if self.jpeg_p and gen.random() < self.jpeg_p:
            img = jpeg(img, gen, self.jpeg_quality)
        return img, pts, m


AUGMENT_PROFILES: dict[str, dict[str, Any] | None] = {
    "default": {},
    # Stain and scanner variation of other labs: HED jitter four times the default's, tone,
    # saturation, focus, compression, and +-25 % pixel size.
    "strong": dict(hed_p=0.8, hed_sigma=0.2, hed_bias=0.03, brightness_contrast_p=0.8, brightness=0.15,
                   contrast=0.25, saturation_p=0.5, saturation=0.25, gamma_p=0.5, gamma=0.3, blur_p=0.2,
                   blur_sigma=1.0, jpeg_p=0.3, jpeg_quality=(40, 95), scale_p=0.5, scale=0.25),
    "none": None,
}
"""Named augmentation strengths: keyword arguments of [`Augment`][] (``None``: no augmentation)."""


def augment_profile(name: str) -> dict[str, Any] | None:
    """The ``train.augment`` of a named profile (``default``, ``strong``, ``none``).

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Examples:
        >>> augment_profile("default"), augment_profile("none")
        ({}, None)
        >>> Augment(**augment_profile("strong")).scale
        0.25
    """
    key = str(name).strip().lower()
    if key not in AUGMENT_PROFILES:
        raise ValueError(f"unknown augmentation profile {name!r}; expected one of {', '.join(AUGMENT_PROFILES)}.")
    value = AUGMENT_PROFILES[key]
    return None if value is None else {k: (list(v) if isinstance(v, tuple) else v) for k, v in value.items()}
