"""Whole-slide images: levels, regions and the pixel size, through OpenSlide.

Slides are read with [OpenSlide](https://openslide.org) (``openslide-python`` with the
``openslide-bin`` wheel, which carries the C library, so ``pip install`` is enough). It was
chosen over ``tiffslide`` because it reads every format pathologists' scanners write
(Aperio SVS, Hamamatsu NDPI/VMS, 3DHISTECH MRXS, Leica SCN, Ventana BIF, Philips TIFF,
DICOM and generic tiled pyramidal TIFF), where ``tiffslide`` has no MRXS, and because it is
the reference reader that QuPath's and most peers' results are compared with. Plain images
(PNG, JPEG, BMP, untiled TIFF) are read whole with [`cellkit.data.io.read_image`][] and
served through the same [`Slide`][] interface, so one pipeline handles both.

Coordinates are OpenSlide's: ``(x, y)`` in pixels of level 0 (the full resolution), ``x``
the column. A level ``l`` has ``downsample[l]`` level-0 pixels per pixel. Pixels outside the
slide, and transparent pixels (OpenSlide's "no data"), read as white.

For example:

```python
from cellkit.wsi import open_slide

with open_slide("slide.svs") as slide:
    print(slide.dimensions, slide.mpp, slide.level_downsamples)
    # at half resolution
    tile = slide.read(x=1000, y=2000, width=512, height=512, scale=2.0)
```
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cellkit.data.io import (
    MPP_RANGE,
    SLIDE_SUFFIXES,  # defined with the image suffixes: inputs are listed below wsi
    DataError,
    read_image,
)

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideError", "is_whole_slide", "open_slide"]

_VENDOR_SUFFIXES = frozenset(SLIDE_SUFFIXES) - {".tif", ".tiff", ".dcm"}
_LARGE_PIXELS = 64_000_000  # a TIFF above this many pixels is read as a slide, never whole
_BLOCK_SIDE = 2048  # a read that shrinks more than _BLOCK_PIXELS level pixels goes block by block
_BLOCK_PIXELS = 4 * _BLOCK_SIDE * _BLOCK_SIDE


class SlideError(ValueError):
    """A slide file that cannot be read, or a request outside what it holds; names the file."""


def _openslide() -> Any:
    try:
        import openslide
    except ImportError as err:  # pragma: no cover - a dependency; only a broken install lacks it
        raise ImportError(
            "Reading whole slides needs openslide-python and openslide-bin (dependencies of cellkit); "
            "reinstall with: pip install openslide-python openslide-bin"
        ) from err
    return openslide


def _detect(path: Path) -> str | None:
    """OpenSlide's name of the file's format, or ``None`` when OpenSlide does not read it."""
    try:
        return _openslide().OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - detection failing means "not a slide"
        return None


def is_whole_slide(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` should be read as a whole slide (tiles on demand) rather than whole.

    A file is a slide when OpenSlide reads it and it is a scanner format (SVS, NDPI, MRXS...),
    or a TIFF that is pyramidal (several levels) or larger than 64 megapixels. A small
    single-level TIFF, like PNG and JPEG, is an ordinary image.

    Examples:
        >>> is_whole_slide("cells.png")
        False
    """
    p = Path(path)
    if not p.is_file() and p.suffix.lower() != ".mrxs":
        return False
    fmt = _detect(p)
    if fmt is None:
        return False
    if p.suffix.lower() in _VENDOR_SUFFIXES or fmt not in ("generic-tiff",):
        return True
    try:
        with _openslide().OpenSlide(str(p)) as s:
            w, h = s.dimensions
            return s.level_count > 1 or w * h > _LARGE_PIXELS
    except Exception:  # noqa: BLE001
        return False


def _mpp_from(properties: Any) -> float | None:
    """Micrometres per pixel from OpenSlide's properties (the mean of x and y), if recorded."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(properties.get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            values.append(v)
    return float(np.mean(values)) if values else None


class Slide:
    """A whole slide (or a plain image) read region by region.

    Open with [`open_slide`][]. Attributes:

    * ``path``: the file;
    * ``dimensions``: ``(width, height)`` of level 0;
    * ``level_dimensions``, ``level_downsamples``: per level;
    * ``mpp``: micrometres per level-0 pixel (from the file, or given), ``None`` when unknown;
    * ``vendor``: OpenSlide's format name, or ``"image"`` for a plain image.
    """

    def __init__(self, path: Path, backend: Any, array: np.ndarray | None, mpp: float | None,
                 vendor: str) -> None:
        self.path = path
        self._osr = backend
        self._array = array
        self.mpp = mpp
        self.vendor = vendor
        if backend is not None:
            self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
                (int(w), int(h)) for w, h in backend.level_dimensions)
            self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in backend.level_downsamples)
        else:
            assert array is not None
            self.level_dimensions = ((int(array.shape[1]), int(array.shape[0])),)
            self.level_downsamples = (1.0,)

    # ------------------------------------------------------------------ basics

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of levels (1 for a plain image)."""
        return len(self.level_dimensions)

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp:g} um/px" if self.mpp else "pixel size unknown"
        return f"Slide({str(self.path)!r}, {w}x{h}, {self.level_count} levels, {mpp}, {self.vendor})"

    def close(self) -> None:
        """Release the file."""
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        self._array = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def best_level(self, scale: float) -> int:
        """The coarsest level whose downsample is at most ``scale`` (level-0 px per output px).

        Reading there and shrinking the rest never enlarges pixels the scanner did not record.
        """
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (level-0 pixels per output pixel), got {scale}.")
        best = 0
        for level, down in enumerate(self.level_downsamples):
            if down <= scale * (1 + 1e-6) and down >= self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Pixels of ``level``: ``(height, width, 3)`` uint8 RGB whose top-left is level-0 ``(x, y)``.

        Pixels outside the slide or without data are white (255).

        Raises:
            SlideError: for a level that does not exist, a size < 1, or a closed slide.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path} has levels 0..{self.level_count - 1}; level {level} was asked for.")
        width, height, x, y = int(width), int(height), int(x), int(y)
        if width < 1 or height < 1:
            raise SlideError(f"a region of {self.path} must be at least 1x1 pixel, got {width}x{height}.")
        if self._osr is None and self._array is None:
            raise SlideError(f"{self.path} is closed.")
        if self._osr is not None:
            rgba = self._osr.read_region((x, y), level, (width, height))
            out = np.array(rgba.convert("RGBA"))
            alpha = out[..., 3:4].astype(np.uint16)
            # OpenSlide's RGBA is not premultiplied: blend onto white where there is no data.
            rgb = (out[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
            return rgb.astype(np.uint8)
        arr = self._array
        assert arr is not None
        out = np.full((height, width, 3), 255, np.uint8)
        h, w = arr.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = arr[y0:y1, x0:x1]
        return out

    def read(self, x: int, y: int, width: int, height: int, scale: float = 1.0) -> np.ndarray:
        """The level-0 box ``(x, y, width, height)`` resampled by ``scale`` (level-0 px per output px).

        Reads the coarsest level that is at least as fine as asked ([`best_level`][]) and
        resizes what remains with a box filter when shrinking (area averaging) or bilinear
        interpolation when enlarging. ``scale=1`` reads level 0 as it is.

        Returns:
            ``(round(height / scale), round(width / scale), 3)`` uint8 RGB.
        """
        out_w, out_h = max(1, int(round(width / scale))), max(1, int(round(height / scale)))
        level = self.best_level(scale)
        down = self.level_downsamples[level]
        lw, lh = max(1, int(math.ceil(width / down))), max(1, int(math.ceil(height / down)))
        if lw * lh > _BLOCK_PIXELS and (lw > out_w or lh > out_h):
            # A slide without a fine-enough pyramid level (one tiled level, say): shrink it block
            # by block, so memory is bounded whatever the slide declares.
            return self._read_in_blocks(x, y, width, height, level, out_w, out_h)
        region = self.read_region(x, y, lw, lh, level)
        if (lw, lh) == (out_w, out_h):
            return region
        # The level region may reach up to one level pixel past the box: crop in the resize.
        box = (0.0, 0.0, width / down, height / down)
        resample = Image.Resampling.BOX if scale / down >= 1 else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(region).resize((out_w, out_h), resample=resample, box=box))

    def _read_in_blocks(self, x: int, y: int, width: int, height: int, level: int, out_w: int,
                        out_h: int) -> np.ndarray:
        """:meth:`read` of a large box, a block of at most ``_BLOCK_SIDE`` level pixels a side at a time."""
        down = self.level_downsamples[level]
        rx, ry = width / down / out_w, height / down / out_h  # level pixels per output pixel
        step_x, step_y = max(1, int(_BLOCK_SIDE // rx)), max(1, int(_BLOCK_SIDE // ry))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, step_y):
            bh = min(step_y, out_h - oy)
            ly0, ly1 = oy * ry, (oy + bh) * ry
            iy0, iy1 = int(math.floor(ly0)), int(math.ceil(ly1))
            for ox in range(0, out_w, step_x):
                bw = min(step_x, out_w - ox)
                lx0, lx1 = ox * rx, (ox + bw) * rx
                ix0, ix1 = int(math.floor(lx0)), int(math.ceil(lx1))
                region = self.read_region(x + int(round(ix0 * down)), y + int(round(iy0 * down)),
                                          max(1, ix1 - ix0), max(1, iy1 - iy0), level)
                box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
                out[oy:oy + bh, ox:ox + bw] = np.asarray(
                    Image.fromarray(region).resize((bw, bh), resample=Image.Resampling.BOX, box=box))
        return out

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """A low-resolution RGB image of the whole slide and its scale (thumbnail px per level-0 px).

        The thumbnail's longer side is at most ``max_side`` pixels (exactly, unless the slide is
        smaller). It is read from the coarsest level fine enough, so it is cheap on pyramids.
        """
        w, h = self.dimensions
        scale = max(1.0, max(w, h) / float(max_side))
        image = self.read(0, 0, w, h, scale=scale)
        return image, image.shape[1] / float(w)


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a whole slide (any format OpenSlide reads) or a plain image as a [`Slide`][].

    Args:
        path: the slide or image file (for MRXS, the ``.mrxs`` file beside its data folder).
        mpp: micrometres per pixel of level 0; overrides what the file records (``--mpp``).

    Raises:
        FileNotFoundError: for a missing file.
        SlideError: for a file neither OpenSlide nor the image readers can read, or a bad ``mpp``.

    Examples:
        Not run here (the slide file is not included):

        >>> with open_slide("CMU-1.svs") as s:  # doctest: +SKIP
        ...     s.dimensions, s.mpp
        ((46000, 32914), 0.499)
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; give the slide file (e.g. slide.svs).")
    if mpp is not None and not (math.isfinite(float(mpp)) and MPP_RANGE[0] <= float(mpp) <= MPP_RANGE[1]):
        raise SlideError(f"mpp (micrometres per pixel) must be a number between {MPP_RANGE[0]:g} and "
                         f"{MPP_RANGE[1]:g} (0.25 for a 40x scan), got {mpp!r} for {p}.")
    fmt = _detect(p)
    if fmt is not None:
        openslide = _openslide()
        try:
            osr = openslide.OpenSlide(str(p))
        except Exception as err:  # noqa: BLE001 - openslide raises several types
            raise SlideError(
                f"{p} looks like a {fmt} slide but OpenSlide cannot open it ({err}); is the file complete "
                "(for MRXS, is its data folder beside it)?"
            ) from err
        found = _mpp_from(osr.properties)
        return Slide(p, osr, None, float(mpp) if mpp is not None else found, fmt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = read_image(p)
    except (DataError, OSError) as err:
        raise SlideError(
            f"{p} is neither a slide OpenSlide reads (SVS, NDPI, MRXS, SCN, BIF, tiled TIFF...) nor an image "
            f"(PNG, JPEG, TIFF, BMP): {err}"
        ) from err
    return Slide(p, None, arr, float(mpp) if mpp is not None else _image_mpp(p), "image")


def _image_mpp(path: Path) -> float | None:
    """The pixel size a TIFF records in its resolution tags (centimetre or inch units), if any."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if res is None or unit is None:
                return None
            num, den = res.value
            per_unit = num / den if den else 0.0
            um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            return um / per_unit if (um and per_unit > 0) else None
    except Exception:  # noqa: BLE001 - a missing tag is no pixel size, not an error
        return None

