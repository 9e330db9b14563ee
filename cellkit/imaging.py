"""Image arrays to network inputs, shared by datasets, the prior target and inference."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "check_image", "image_to_tensor", "lab_stats", "reinhard"]

# ImageNet statistics: the normalisation torchvision's pretrained ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image(image: Any, where: str = "") -> np.ndarray:
    """Return ``image`` as an ``(H, W, 3)`` uint8 array or raise a clear ``ValueError``."""
    prefix = f"{where}: " if where else ""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(
            f"{prefix}expected an RGB image of shape (H, W, 3), got shape {arr.shape}; "
            "read images with cellkit.data.read_image, which converts greyscale and RGBA."
        )
    if arr.dtype != np.uint8:
        raise ValueError(
            f"{prefix}expected a uint8 image (0..255), got dtype {arr.dtype}; "
            "convert it, e.g. with skimage.util.img_as_ubyte."
        )
    return arr


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 RGB image as a normalised ``(3, H, W)`` float32 tensor.

    Examples:
        >>> image_to_tensor(np.zeros((4, 5, 3), np.uint8)).shape
        torch.Size([3, 4, 5])
    """
    arr = check_image(image)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. PIL's)
        arr = arr.copy()
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


# Pixels brighter than this (CIELAB lightness) are glass or background: left out of the
# statistics, so a tile with more background does not change the tissue's colours.
_BACKGROUND_L = 90.0


def lab_stats(images: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation in CIELAB of the tissue pixels of ``images``.

    Pixels with lightness above 90 (glass) are left out; an image with no tissue pixel
    uses all of its pixels.

    Args:
        images: one ``(H, W, 3)`` uint8 RGB image or a sequence of them (pooled).

    Returns:
        ``(mean, std)``, each ``(3,)`` float64 (L, a, b).
    """
    from skimage.color import rgb2lab

    arrays = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
    pixels = []
    for image in arrays:
        lab = rgb2lab(check_image(image, where="lab_stats")).reshape(-1, 3)
        tissue = lab[lab[:, 0] <= _BACKGROUND_L]
        pixels.append(tissue if len(tissue) else lab)
    allpix = np.concatenate(pixels)
    return allpix.mean(0), np.maximum(allpix.std(0), 1e-6)


def reinhard(image: np.ndarray, target_mean: Any, target_std: Any) -> np.ndarray:
    """Reinhard colour normalisation: the tissue's CIELAB statistics moved to a target's.

    Each channel ``c`` of the image in CIELAB becomes ``(c - mean) / std * target_std +
    target_mean`` with the image's own tissue statistics ([`lab_stats`][]) (Reinhard et al.
    2001, in CIELAB as in most pathology toolkits); glass stays as it is. ``cellkit predict
    --stain-norm reinhard`` takes the target from the model's own training crops.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> img = rng.integers(40, 200, (16, 16, 3), dtype=np.uint8)
        >>> m, s = lab_stats(img)
        >>> out = reinhard(img, m + [0, 5, 0], s)
        >>> bool(abs(lab_stats(out)[0][1] - (m[1] + 5)) < 1.0)
        True
    """
    from skimage.color import lab2rgb, rgb2lab

    img = check_image(image, where="reinhard")
    lab = rgb2lab(img)
    tissue = lab[..., 0] <= _BACKGROUND_L
    if not tissue.any():  # glass only: nothing to normalise
        return img.copy()
    mean, std = lab_stats(img)
    moved = (lab - mean) / std * np.asarray(target_std, float) + np.asarray(target_mean, float)
    lab = np.where(tissue[..., None], moved, lab)
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    with np.errstate(invalid="ignore"):
        rgb = lab2rgb(lab)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
