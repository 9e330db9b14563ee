"""Image arrays to network inputs, shared by datasets, the prior target and inference."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "check_image", "image_to_tensor"]

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
