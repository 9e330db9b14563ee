"""Reading images as ``(H, W, 3)`` uint8 RGB arrays, and writing files atomically.

Every reader in [`cellkit.data`][cellkit.data] loads images with [`read_image`][], so every image
reaches the rest of cellkit in one form: ``(H, W, 3)`` uint8 RGB. The conversions:

- an alpha channel is dropped (a warning when some pixels are transparent, because those
  pixels then show whatever RGB values the file stores under them);
- greyscale (and greyscale + alpha) is repeated into three channels;
- 16-bit images are scaled to 8 bits by ``value / 257`` (65535 -> 255), with a warning
  (precision is lost, and 12-bit data stored in 16 bits comes out dark);
- palette, CMYK and other colour modes are converted to RGB (CMYK without a colour
  profile, with a note);
- float images in ``[0, 1]`` are scaled by 255;
- a multi-page TIFF gives its first page, with a note saying how many it holds.

Images are read whole, so their size is bounded: one that declares more than
[`MAX_IMAGE_PIXELS`][] pixels (Pillow's own bomb limit, about 13,400 x 13,400) is refused
from its header, before anything is decoded, with a [`DataError`][] that says to save it as
a tiled pyramidal TIFF (read as a whole slide, tile by tile) or cut it into tiles.

Files are written through [`atomic_write`][]: a temporary file in the same folder,
then ``os.replace``, so a reader never sees a half-written file and an interrupted
write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MPP_RANGE",
    "SLIDE_SUFFIXES",
    "DataError",
    "DataWarning",
    "ImageNote",
    "WriteError",
    "atomic_write",
    "create_text_if_absent",
    "image_mpp",
    "jsonable",
    "load_image",
    "make_folder",
    "read_image",
    "remove_stale_temporaries",
    "to_rgb_uint8",
    "write_bytes_atomic",
    "write_text_atomic",
]

MAX_IMAGE_PIXELS = 178_956_970
"""The most pixels an image read whole may declare (twice Pillow's warning limit, where
Pillow itself refuses decompression bombs): 537 MB of RGB. Larger images are read as whole
slides (tiled TIFF, scanner formats) or must be cut into tiles."""

MPP_RANGE = (0.01, 100.0)
"""Micrometres per pixel a user may give (``--mpp``): a 100x objective's 0.05 to a 1x
overview's 20, with room; a value outside is a typo or another unit (nanometres, mm)."""

SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide",
                                   ".tif", ".tiff", ".dcm")
"""Suffixes of whole-slide files (``.tif``/``.tiff`` only when tiled and pyramidal, or large);
[`cellkit.wsi.reader`][] reads them, and folders of inputs list them."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Image file extensions the folder readers look for, in order of preference."""


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
        The RGB image and a list of [`ImageNote`][] for conversions that lose
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
    [`read_image`][].

    Raises:
        FileNotFoundError: when the file does not exist.
        DataError: when the file is truncated, corrupt or not an image, or declares more
            than [`MAX_IMAGE_PIXELS`][] pixels (checked before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file.")
    notes: list[ImageNote] = []
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff(p, notes)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # cellkit's limit below
                with Image.open(p) as im:
                    _check_size(p, *im.size)
                    arr = _pil_to_array(im, p, notes)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{p}: declares more pixels than cellkit reads whole ({MAX_IMAGE_PIXELS / 1e6:.0f} "
                        f"megapixels; Pillow says: {exc}); {_TOO_LARGE_FIX}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{p}: cannot read the image ({type(exc).__name__}: {exc}); the file is truncated, "
            "corrupt or not an image. Re-export it, or skip such images "
            "(--skip-bad-images in cellkit predict, on_error='skip' in Python)."
        ) from exc
    rgb, more = to_rgb_uint8(arr, where=str(p))
    return rgb, notes + more


_TOO_LARGE_FIX = (
    "save it as a tiled, pyramidal TIFF (QuPath: File > Export images > OME TIFF; or "
    "vips tiffsave in.png out.tif --tile --pyramid), which cellkit predict reads as a whole slide, tile by "
    "tile; or cut it into tiles for training."
)


def _check_size(p: Path, width: int, height: int) -> None:
    """Refuse, from the header, an image that declares more pixels than cellkit reads whole."""
    if int(width) * int(height) > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{p}: declares {int(width)} x {int(height)} pixels ({int(width) * int(height) / 1e6:.0f} "
            f"megapixels), more than cellkit reads whole ({MAX_IMAGE_PIXELS / 1e6:.0f} megapixels); "
            f"{_TOO_LARGE_FIX}"
        )


def _pil_to_array(im: Any, p: Path | None = None, notes: list[ImageNote] | None = None) -> np.ndarray:
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        if mode == "CMYK" and notes is not None:
            notes.append(ImageNote("cmyk", f"{p}: a CMYK image, converted to RGB without a colour profile; "
                                   "colours may differ from a viewer's. Save it as RGB for exact colours."))
        im = im.convert("RGB")
    elif mode in ("RGBa", "La"):
        im = im.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    im.load()
    return np.asarray(im)


def _read_tiff(p: Path, notes: list[ImageNote] | None = None) -> np.ndarray:
    # Pillow cannot read 16-bit RGB TIFFs; tifffile (a scikit-image dependency) can.
    notes = notes if notes is not None else []
    try:
        import tifffile
    except ImportError:  # pragma: no cover - tifffile ships with scikit-image
        from PIL import Image

        with Image.open(p) as im:
            _check_size(p, *im.size)
            return _pil_to_array(im, p, notes)
    try:
        with tifffile.TiffFile(p) as tif:
            page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
            _check_size(p, int(page.imagewidth), int(page.imagelength))
            pages = sum(1 for pg in tif.pages if not getattr(pg, "is_reduced", False))  # not pyramid levels
            photometric = int(page.photometric)
            colormap = page.colormap
            samples = int(page.samplesperpixel)
            arr = page.asarray()
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(
            f"{p}: cannot read the TIFF ({type(exc).__name__}: {exc}); the file is truncated, "
            "corrupt or not a TIFF. Re-export it, or skip such images "
            "(--skip-bad-images in cellkit predict, on_error='skip' in Python)."
        ) from exc
    arr = np.asarray(arr)
    if pages > 1:
        notes.append(ImageNote("pages", f"{p}: a TIFF of {pages} pages; only the first "
                               f"({int(arr.shape[1])} x {int(arr.shape[0])} pixels) is read. Save each page "
                               "as its own file to use the others."))
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) storage
    if photometric == 3 and colormap is not None and arr.ndim == 2:  # palette
        cmap = np.asarray(colormap)
        cmap = (cmap / 257.0).round().astype(np.uint8) if cmap.max() > 255 else cmap.astype(np.uint8)
        return np.ascontiguousarray(cmap.T[np.clip(arr, 0, cmap.shape[1] - 1)])
    if photometric == 0 and arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):  # white is zero
        return np.iinfo(arr.dtype).max - arr if arr.dtype != np.bool_ else ~arr
    if photometric == 5:  # separated: CMYK
        if arr.ndim != 3 or samples < 4 or arr.shape[2] < 4:
            raise DataError(f"{p}: a separated (CMYK) TIFF with {samples} inks; expected 4 (C, M, Y, K). Save "
                            "it as RGB.")
        ink = arr[..., :4].astype(np.float64) / float(_dtype_max(arr))
        rgb = (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:4])
        notes.append(ImageNote("cmyk", f"{p}: a CMYK TIFF, converted to RGB without a colour profile; "
                               "colours may differ from a viewer's. Save it as RGB for exact colours."))
        return np.round(rgb * 255.0).astype(np.uint8)
    return arr


# Pixel sizes outside this range (micrometres) are a default resolution tag (72 or 96 dpi),
# not a microscope's: they are ignored.
_PLAUSIBLE_MPP = (0.05, 20.0)


def image_mpp(path: str | os.PathLike[str]) -> float | None:
    """The micrometres per pixel an image file records, or ``None`` when it records none.

    Read from OME-TIFF (``PhysicalSizeX`` and its unit), ImageJ TIFF (``unit`` with the
    resolution tags) and plain TIFF resolution tags in centimetres (or inches) per pixel;
    PNG and JPEG hold only a screen resolution, which is not a pixel size. A value outside
    0.05-20 um per pixel (a default 72 dpi, say) is not taken.

    Examples:
        >>> import tempfile, tifffile
        >>> f = tempfile.NamedTemporaryFile(suffix=".tif", delete=False).name
        >>> tifffile.imwrite(f, np.zeros((4, 4, 3), np.uint8),
        ...                  resolution=(20000, 20000),
        ...                  resolutionunit="CENTIMETER")
        >>> image_mpp(f)
        0.5
    """
    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            value = _ome_mpp(tif.ome_metadata) if tif.is_ome else None
            page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
            tags = page.tags
            if value is None and "XResolution" in tags:
                num, den = tags["XResolution"].value
                per_unit = num / den if den else 0.0
                unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 1
                ij_unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
                if per_unit > 0:
                    if ij_unit in ("micron", "um", "\u00b5m", "µm"):
                        value = 1.0 / per_unit
                    elif unit == 3:  # centimetre
                        value = 1e4 / per_unit
                    elif unit == 2:  # inch
                        value = 25400.0 / per_unit
    except Exception:  # noqa: BLE001 - an unreadable tag is "no pixel size", never an error
        return None
    if value is None or not (_PLAUSIBLE_MPP[0] <= value <= _PLAUSIBLE_MPP[1]):
        return None
    return round(float(value), 6)


def _ome_mpp(xml: str | None) -> float | None:
    if not xml:
        return None
    match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
    if match is None:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
    scale = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit.group(1) if unit else "µm", 1.0)
    return float(match.group(1)) * scale


def read_image(path: str | os.PathLike[str], *, warn: bool = True) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Args:
        path: a PNG, JPEG, TIFF or BMP file (anything Pillow or tifffile reads).
        warn: emit a [`DataWarning`][] for conversions that lose information
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


def jsonable(value: Any) -> Any:
    """``value`` for ``json.dumps(allow_nan=False)``: NaN/inf -> None, numpy -> builtins.

    The one conversion of the JSON files cellkit writes (``metrics.jsonl``,
    ``calibration.json``, ``predict.json``, ``evaluation.json``): mappings (keys as strings),
    sequences and arrays recursively; numpy numbers and booleans as Python ones.

    Examples:
        >>> jsonable({"f1": np.array([0.5, np.nan]), "n": np.int64(3),
        ...           "ok": np.bool_(True)})
        {'f1': [0.5, None], 'n': 3, 'ok': True}
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


class WriteError(OSError):
    """A file cellkit was asked to write could not be written; the message names it (never a
    temporary file) and says how to fix it."""


#: Temporary files are named ``.<target name>.cellkit-<pid>-<random>.tmp`` beside their target.
_TMP_MARK = ".cellkit-"
_TMP_NAME = re.compile(r"\.(.+)\.cellkit-([0-9]+)-[A-Za-z0-9_]+\.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or we cannot tell
    return True


def _temporary_is_stale(tmp: Path, target_name: str | None) -> bool:
    """Whether ``tmp`` is a temporary file of a cellkit write whose process is gone.

    Only names of cellkit's exact pattern (``.<name>.cellkit-<pid>-<random>.tmp``, the
    random part as ``tempfile`` makes it) with a process id that no longer runs qualify;
    a file of any other name (a user's ``.notes.csv.backup.tmp``), of a live process, or
    where processes cannot be asked (Windows) is never stale.
    """
    match = _TMP_NAME.fullmatch(tmp.name)
    if match is None or os.name == "nt":
        return False
    if target_name is not None and match.group(1) != target_name:
        return False
    return not _pid_alive(int(match.group(2)))


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writes left behind.

    A write interrupted by ``SIGKILL`` or a power cut cannot clean up after itself; its
    temporary file (``.<name>.cellkit-<pid>-<random>.tmp``) stays. This removes those whose
    process is gone. A temporary file of a write still running, any file of another name
    (a user's own ``.<name>.<something>.tmp``), and, on Windows, every file is left alone.

    Args:
        path: a file (its temporaries beside it), or a folder (every cellkit temporary in it).

    Returns:
        the files removed.

    Examples:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> stale = os.path.join(folder, ".a.txt.cellkit-999999999-x.tmp")
        >>> open(stale, "w").close()
        >>> [p.name for p in remove_stale_temporaries(os.path.join(folder, "a.txt"))]
        ['.a.txt.cellkit-999999999-x.tmp']
    """
    target = Path(path)
    if target.is_dir():
        folder, name, pattern = target, None, "." + "*" + _TMP_MARK + "*.tmp"
    else:
        folder, name, pattern = target.parent, target.name, glob.escape(f".{target.name}.") + "*.tmp"
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(pattern):
        try:
            if _temporary_is_stale(tmp, name):
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue  # gone already, or not ours to delete
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(target: Path, err: OSError) -> WriteError:
    """The error for a failed write of ``target``, naming it and not the temporary file."""
    parent = target.parent
    reason = err.strerror or str(err)
    if isinstance(err, (FileExistsError, NotADirectoryError)) or (parent.exists() and not parent.is_dir()):
        blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), parent)
        fix = f"{blocker} is a file, not a folder: choose another output folder"
    elif isinstance(err, PermissionError):
        fix = f"you may not write into {parent}: choose a folder you can write to, or change its permissions"
    elif getattr(err, "errno", None) == 28:  # ENOSPC
        fix = f"the disk holding {parent} is full: free space or choose another folder"
    else:
        fix = "check that the folder exists and can be written, or choose another one"
    return WriteError(f"Cannot write {target}: {reason}; {fix}.")


def make_folder(path: str | os.PathLike[str]) -> Path:
    """Create the folder ``path`` (and its parents); a failure is a [`WriteError`][] naming it.

    Examples:
        >>> import tempfile, os
        >>> make_folder(os.path.join(tempfile.mkdtemp(), "a", "b")).is_dir()
        True
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(folder, err) from err
    return folder


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The data is flushed and ``fsync``-ed before the rename, and the folder after it, so
    after a crash ``path`` holds either its old or its new content, never a part. On an
    exception the temporary file is removed and ``path`` is left as it was; a write killed
    outright (``SIGKILL``) leaves its temporary file, which the next write of ``path``
    removes ([`remove_stale_temporaries`][]). The parent folder is created when missing.
    A failure raises [`WriteError`][] naming ``path`` and saying how to fix it.

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
    try:
        if target.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}{_TMP_MARK}{os.getpid()}-", suffix=".tmp"
        )
    except OSError as err:
        raise _write_error(target, err) from err
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
        _fsync_folder(target.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(target, err) from err
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see [`atomic_write`][])."""
    with atomic_write(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


def create_text_if_absent(path: str | os.PathLike[str], text: str) -> bool:
    """Write ``text`` to ``path`` only when no file is there, atomically; ``True`` when written.

    Of several processes that call this at once, exactly one writes (a complete file is
    linked into place; a link never replaces a file).

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.json")
        >>> create_text_if_absent(path, "1"), create_text_if_absent(path, "2")
        (True, False)
        >>> open(path).read()
        '1'
    """
    target = Path(path)
    if target.exists():
        return False
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, delete=False,
                                     prefix=f".{target.name}{_TMP_MARK}{os.getpid()}-", suffix=".tmp") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.chmod(fh.name, 0o666 & ~_UMASK)
        os.link(fh.name, target)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: an exclusive create, then the text
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        except OSError as err:
            raise _write_error(target, err) from err
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(fh.name)
    return True


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see [`atomic_write`][])."""
    with atomic_write(path, "wb") as f:
        f.write(data)
