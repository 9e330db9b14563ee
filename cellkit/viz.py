"""Pictures of results: points coloured by class on an image, and the F1-against-radius plot.

Drawing uses `skimage.draw` (no display needed); plots use matplotlib's Agg canvas
directly, never ``pyplot``, so nothing depends on a GUI backend or global figure state:

```python
from cellkit.viz import draw_points, save_png

overlay = draw_points(image, det.points, det.classes, num_classes=2)
save_png("overlay.png", overlay)
```
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellkit.imaging import check_image
from cellkit.points import validate_points

__all__ = ["BASE_COLORS", "class_colors", "draw_points", "plot_f1_vs_radius", "save_png"]

BASE_COLORS: tuple[tuple[int, int, int], ...] = (
    (112, 112, 225),
    (200, 0, 0),
    (0, 160, 0),
    (230, 160, 0),
    (150, 0, 200),
    (0, 170, 200),
    (140, 90, 40),
    (230, 0, 150),
)
"""Colours of the first classes (RGB): class 0 ("other cells") grey-blue, class 1 (the class of
interest, like QuPath's "Positive") red, then distinct hues. The GeoJSON files cellkit writes use
the same table ([`cellkit.data.writers.DEFAULT_COLORS`][]).
"""


def class_colors(num_classes: int) -> np.ndarray:
    """One RGB colour per class: [`BASE_COLORS`][], then evenly spread hues.

    Shapes:
        returns: ``(num_classes, 3)`` uint8.

    Examples:
        >>> class_colors(2).tolist()
        [[112, 112, 225], [200, 0, 0]]
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}.")
    colours = list(BASE_COLORS[:num_classes])
    golden = 0.618033988749895
    for i in range(len(colours), num_classes):
        r, g, b = colorsys.hsv_to_rgb((i * golden) % 1.0, 0.85, 0.95)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


def draw_points(
    image: np.ndarray,
    points: np.ndarray,
    classes: np.ndarray,
    num_classes: int | None = None,
    radius: int = 3,
    colors: np.ndarray | Sequence[Sequence[int]] | None = None,
    outline: tuple[int, int, int] | None = (0, 0, 0),
) -> np.ndarray:
    """A copy of ``image`` with a filled disc at each point, coloured by its class.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        points: ``(N, 2)`` ``(x, y)`` pixel coordinates.
        classes: ``(N,)`` class indices.
        num_classes: classes in the colour table (default: the largest class + 1).
        radius: disc radius in pixels.
        colors: ``(num_classes, 3)`` RGB colours (default [`class_colors`][]).
        outline: colour of a one-pixel ring around each disc (``None``: no ring); it keeps
            the points visible on stains of their own colour.

    Returns:
        ``(H, W, 3)`` uint8; discs are clipped at the image border.

    Raises:
        ValueError: for a malformed image or points, or a class without a colour.

    Examples:
        >>> out = draw_points(np.zeros((7, 7, 3), np.uint8), [[3, 3]], [1],
        ...                   radius=2, outline=None)
        >>> (out[..., 0] > 0).astype(int)
        array([[0, 0, 0, 0, 0, 0, 0],
               [0, 0, 1, 1, 1, 0, 0],
               [0, 1, 1, 1, 1, 1, 0],
               [0, 1, 1, 1, 1, 1, 0],
               [0, 1, 1, 1, 1, 1, 0],
               [0, 0, 1, 1, 1, 0, 0],
               [0, 0, 0, 0, 0, 0, 0]])
    """
    from skimage.draw import circle_perimeter, disk
    out = check_image(image, "draw_points").copy()
    pts, cls = validate_points(points, classes, where="draw_points")
    if num_classes is None:
        num_classes = int(cls.max()) + 1 if cls.size else 1
    table = class_colors(num_classes) if colors is None else np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if cls.size and cls.max() >= len(table):
        raise ValueError(
            f"draw_points: class {int(cls.max())} has no colour; the table holds {len(table)} colours. "
            "Pass num_classes or more colors."
        )
    shape = out.shape[:2]
    radius = max(int(radius), 1)
    for (x, y), c in zip(pts, cls):
        row, col = int(round(y)), int(round(x))
        if outline is not None:
            rr, cc = circle_perimeter(row, col, radius + 1, shape=shape)
            out[rr, cc] = outline
        rr, cc = disk((row, col), radius + 0.5, shape=shape)
        out[rr, cc] = table[c]
    return out


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG, atomically."""
    from PIL import Image

    # Here, not at the top: cellkit.data imports its writers, which import this module.
    from cellkit.data.guard import write_png

    buf = io.BytesIO()
    Image.fromarray(check_image(image, str(path))).save(buf, format="PNG")
    return write_png(path, buf.getvalue())


def plot_f1_vs_radius(
    curve: Mapping[str, Any],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Plot totalF1 (solid) and meanF1 (dashed) per class against the matching radius, as PNG.

    Each class keeps its colour of [`class_colors`][] (as in the overlays). Drawn on
    matplotlib's Agg canvas, without pyplot.

    Args:
        curve: the output of [`cellkit.metrics.f1_vs_radius`][]: ``{"radii": (R,),
            "classes": names, "total_f1": {name: (R,)}, "mean_f1": {name: (R,)}}``.
        path: the PNG file to write.
        title: the plot title.

    Raises:
        ValueError: when a curve has not one value per radius.

    Examples:
        >>> import tempfile, os
        >>> curve = {"radii": [2, 4], "classes": ["a"], "total_f1": {"a": [0.5, 0.8]},
        ...          "mean_f1": {"a": [0.4, 0.7]}}
        >>> path = os.path.join(tempfile.mkdtemp(), "f1.png")
        >>> plot_f1_vs_radius(curve, path).suffix
        '.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Here, not at the top: cellkit.data imports its writers, which import this module.
    from cellkit.data.guard import write_png

    radii = [float(r) for r in curve["radii"]]
    names = [str(n) for n in curve["classes"]]
    colours = class_colors(len(names)) / 255.0
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c, name in enumerate(names):
        for key, label, style in (("total_f1", "totalF1", "-"), ("mean_f1", "meanF1", "--")):
            values = [float(v) for v in curve[key][name]]
            if len(values) != len(radii):
                raise ValueError(f"{key}[{name!r}] has {len(values)} values for {len(radii)} radii.")
            ax.plot(radii, values, style, color=colours[c], marker="o", markersize=3, label=f"{label} {name}")
    ax.set_xlabel("matching radius (pixels)")
    ax.set_ylabel("F1")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if names:
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "F1 against matching radius")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_png(path, buf.getvalue())
