"""Reading images as ``(H, W, 3)`` uint8 RGB arrays, and writing files atomically.

Every reader in :mod:`cellkit.data` loads images with :func:`read_image`, so every image
reaches the rest of cellkit in one form: ``(H, W, 3)`` uint8 RGB. The conversions:

- an alpha channel is dropped (a warning when some pixels are transparent, because those
  pixels then show whatever RGB values the file stores under them);
- greyscale (and greyscale + alpha) is repeated into three channels;
- 16-bit images are scaled to 8 bits by ``value / 257`` (65535 -> 255), with a warning
  (precision is lost, and 12-bit data stored in 16 bits comes out dark);
- palette, CMYK and other colour modes are converted to RGB by Pillow;
- float images in ``[0, 1]`` are scaled by 255.

Files are written through :func:`atomic_write`: a temporary file in the same folder,
then ``os.replace``, so a reader never sees a half-written file and an interrupted
write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "DataWarning",
    "ImageNote",
    "atomic_write",
    "load_image",
    "read_image",
    "to_rgb_uint8",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: Image file extensions the folder readers look for, in order of preference.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """Bad input data: a corrupt file, a bad line, a missing pair. The message names the file."""


class DataWarning(UserWarning):
    """Something in the data was converted or skipped; the message says what and where."""


@dataclass(frozen=True)
class ImageNote:
    """A conversion worth telling the user about.

    Attributes:
        kind: ``"transparent"`` (alpha with transparent pixels dropped) or ``"16bit"``.
        message: what happened to this image.
    """

    kind: str
    message: str


# Read the process umask once, so atomically written files get the usual permissions
# (tempfile creates them 0600).
_UMASK = os.umask(0)
os.umask(_UMASK)


def to_rgb_uint8(array: Any, where: str = "") -> tuple[np.ndarray, list[ImageNote]]:
    """Convert a decoded image array to ``(H, W, 3)`` uint8 RGB.

    Args:
        array: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 2)`` (grey + alpha), ``(H, W, 3)`` or
            ``(H, W, 4)`` (RGBA) array of dtype bool, uint8, uint16, another integer type
            with values up to 65535, or float in ``[0, 1]``.
        where: names the source in messages (a file path).

    Returns:
        The RGB image and a list of :class:`ImageNote` for conversions that lose
        information (transparent pixels, 16-bit precision).

    Shapes:
        array: (H, W) or (H, W, C) with C in 1..4 -> (H, W, 3) uint8.

    Raises:
        DataError: for other shapes or value ranges.

    Examples:
        >>> rgb, notes = to_rgb_uint8(np.full((2, 3), 65535, np.uint16))
        >>> rgb.shape, rgb.dtype.name, int(rgb.max()), [n.kind for n in notes]
        ((2, 3, 3), 'uint8', 255, ['16bit'])
    """
    prefix = f"{where}: " if where else ""
    arr = np.asarray(array)
    notes: list[ImageNote] = []
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(
            f"{prefix}expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got shape "
            f"{arr.shape}; multi-page or multi-channel images must be converted to RGB first."
        )
    channels = arr.shape[2]
    colour = arr[:, :, :1] if channels in (1, 2) else arr[:, :, :3]
    alpha = arr[:, :, channels - 1] if channels in (2, 4) else None

    colour8 = _to_uint8(colour, prefix, notes)
    if alpha is not None:
        alpha_max = 255 if alpha.dtype == np.uint8 else _dtype_max(alpha)
        transparent = float(np.mean(alpha < alpha_max))
        if transparent > 0:
            notes.append(
                ImageNote(
                    "transparent",
                    f"{prefix}{transparent:.0%} of the pixels are (partly) transparent; the alpha "
                    "channel was dropped, so they show the RGB values stored under them.",
                )
            )
    if colour8.shape[2] == 1:
        colour8 = np.repeat(colour8, 3, axis=2)
    return np.ascontiguousarray(colour8), notes


def _dtype_max(arr: np.ndarray) -> float:
    if arr.dtype == np.bool_:
        return 1.0
    if np.issubdtype(arr.dtype, np.integer):
        return 65535.0 if arr.dtype.itemsize >= 2 else 255.0
    return 1.0


def _to_uint8(arr: np.ndarray, prefix: str, notes: list[ImageNote]) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise DataError(
                f"{prefix}integer image values must lie in 0..65535, got {lo}..{hi}; "
                "rescale the image to 8 or 16 bits."
            )
        if arr.dtype.itemsize == 1 or (arr.dtype != np.uint16 and hi <= 255):
            # 8-bit data in a wider container (Pillow's mode "I" for 8-bit greyscale).
            return arr.astype(np.uint8)
        hint = (
            f" Its largest value is {hi} (< 4096): it may hold 12-bit or lower data, which "
            "comes out dark; rescale it before reading if so."
            if hi < 4096
            else ""
        )
        notes.append(
            ImageNote("16bit", f"{prefix}16-bit image scaled to 8 bits (value / 257).{hint}")
        )
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{prefix}the image holds NaN or infinite values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"{prefix}float images must lie in [0, 1], got {lo:g}..{hi:g}; "
                "save the image as 8-bit PNG/TIFF or scale it to [0, 1]."
            )
        return np.round(arr * 255.0).astype(np.uint8)
    raise DataError(f"{prefix}unsupported image dtype {arr.dtype}; expected uint8 or uint16.")


def load_image(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[ImageNote]]:
    """Read an image file and return ``(rgb, notes)`` without warning.

    The dataset readers use this and warn once for a whole dataset; most callers want
    :func:`read_image`.

    Raises:
        FileNotFoundError: when the file does not exist.
        DataError: when the file is truncated, corrupt or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file.")
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff(p)
        else:
            with Image.open(p) as im:
                arr = _pil_to_array(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{p}: cannot read the image ({type(exc).__name__}: {exc}); the file is truncated, "
            "corrupt or not an image. Re-export it, or pass on_error='skip' to skip it."
        ) from exc
    return to_rgb_uint8(arr, where=str(p))


def _pil_to_array(im: Any) -> np.ndarray:
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    elif mode in ("RGBa", "La"):
        im = im.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    im.load()
    return np.asarray(im)


def _read_tiff(p: Path) -> np.ndarray:
    # Pillow cannot read 16-bit RGB TIFFs; tifffile (a scikit-image dependency) can.
    try:
        import tifffile
    except ImportError:  # pragma: no cover - tifffile ships with scikit-image
        from PIL import Image

        with Image.open(p) as im:
            return _pil_to_array(im)
    try:
        arr = tifffile.imread(p, key=0)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(
            f"{p}: cannot read the TIFF ({type(exc).__name__}: {exc}); the file is truncated, "
            "corrupt or not a TIFF. Re-export it, or pass on_error='skip' to skip it."
        ) from exc
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) storage
    return arr


def read_image(path: str | os.PathLike[str], *, warn: bool = True) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Args:
        path: a PNG, JPEG, TIFF or BMP file (anything Pillow or tifffile reads).
        warn: emit a :class:`DataWarning` for conversions that lose information
            (transparent pixels, 16-bit precision).

    Shapes:
        returns: (H, W, 3) uint8.

    Raises:
        FileNotFoundError: when the file does not exist.
        DataError: when the file is truncated, corrupt or holds an unsupported image.

    Examples:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "grey.png")
        >>> Image.fromarray(np.zeros((4, 5), np.uint8)).save(path)
        >>> read_image(path).shape
        (4, 5, 3)
    """
    arr, notes = load_image(path)
    if warn:
        for note in notes:
            warnings.warn(note.message, DataWarning, stacklevel=2)
    return arr


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was. The
    parent folder is created when missing.

    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: text encoding (ignored for ``"wb"``).
        newline: passed to ``open`` for text mode.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> with atomic_write(path) as f:
        ...     _ = f.write("hello")
        >>> open(path).read()
        'hello'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}.")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if mode == "wb":
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)
