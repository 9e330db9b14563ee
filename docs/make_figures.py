"""Make the pictures of the documentation from the bundled data and a trained ``cpu`` model.

    python docs/make_figures.py                     # train (a few minutes on 2 CPU cores), then draw
    python docs/make_figures.py --run runs/docs     # reuse the run folder (train into it if empty)
    python docs/make_figures.py --figures pipeline  # redraw one figure (the others stay as they are)
    python docs/make_figures.py --figures viz       # no training: the shipped model

Trains ``ours_plus_plus`` at the ``cpu`` size on the bundled EndoNuke sample with a short
schedule (75 steps of the first stage, the early-stopped model that makes the prior, then 500
steps of the three-decoder model; batches of 8 crops of 96 pixels), split like
``examples/reproduce_paper.py`` (by groups of tile ids, seed 0), and writes into
``docs/images/``:

* ``predictions.png``: the model's cells on a test tile, next to the annotated cells;
* ``masks.png``: one panel per mask generator (``circle``, two draws of ``random_polygon``,
  ``gaussian``, ``estimated``, ``prior``), all made from one training tile;
* ``pipeline.png``: points -> target -> probability maps -> peaks matched to the points, on a
  test tile, in four panels whose text stays legible at the page's width (688 pixels in a
  1280-pixel window);
* ``viz.png`` (the picture of the ``cellkit.viz`` API page): the annotated cells and the cells
  the shipped ``endonuke-epithelium`` model finds on one of its held-out tiles, drawn with
  ``cellkit.viz.draw_points``. It needs no training.

The PNGs are palette images (256 colours) to stay small. Everything is seeded: the same
commit on the same machine draws the same pictures.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))

import cellkit  # noqa: E402
from cellkit.data import bundled_endonuke, endonuke_group, load_dataset, split_by_group  # noqa: E402
from cellkit.viz import class_colors, draw_points  # noqa: E402

CLASS_NAMES = ["other", "epithelium"]
RADIUS = 4.0  # circle radius: EndoNuke nuclei are about 8 pixels wide
EVAL_RADIUS = 6.0  # matching radius, as examples/reproduce_paper.py on EndoNuke
DEFAULT_RUN = REPO / "runs" / "docs-figures"
COLORS = class_colors(2).astype(np.float64)  # blue: other cells, red: the class of interest
FIGURES = ("predictions", "masks", "pipeline", "viz")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None,
                   help="a run folder to use as it is (e.g. a run of examples/reproduce_paper.py); default: "
                   "train into runs/docs-figures, or finish the run there")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="where the PNGs go")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the second stage")
    p.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of the first (prior) stage")
    p.add_argument("--steps-per-epoch", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--test-tile", default="646", help="the test tile to show (else the busiest one)")
    p.add_argument("--train-tile", default="723", help="the training tile of the mask panels")
    p.add_argument("--figures", default=",".join(FIGURES),
                   help=f"comma-separated figures to draw, of {', '.join(FIGURES)} (default: all)")
    args = p.parse_args(argv)
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    unknown = sorted(set(args.figures) - set(FIGURES))
    if unknown or not args.figures:
        p.error(f"--figures: unknown {unknown}; choose from {', '.join(FIGURES)}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- model


def config(args: argparse.Namespace) -> cellkit.CellkitConfig:
    cfg = cellkit.presets.ours_plus_plus(size="cpu", radius=RADIUS, eval_radius=EVAL_RADIUS,
                                         pretrain_epochs=args.pretrain_epochs)
    cfg.data.class_names = tuple(CLASS_NAMES)
    for stage in (cfg.pretrain, cfg):
        stage.train.steps_per_epoch = args.steps_per_epoch
        stage.train.batch_size = 8
        stage.train.crop_size = 96
        stage.train.seed = args.seed
    cfg.train.steps = None  # the presets count steps; this schedule is in epochs (20 x 25 steps)
    cfg.train.epochs = args.epochs
    cfg.train.val_every = 4
    return cfg


def trained_run(args: argparse.Namespace, splits: dict[str, list[Any]]) -> Path:
    """The run folder: a given one that holds a checkpoint is used as it is; else train into it."""
    from cellkit.engine.train import fit

    run = args.run if args.run is not None else DEFAULT_RUN
    if args.run is not None and (run / "best.pt").is_file():
        log(f"using the run in {run}")
        return run
    started = time.time()
    log(f"training ours_plus_plus (cpu size) into {run}")
    # Resuming finishes an interrupted run, and returns a finished one as it is.
    result = fit(config(args), run, splits=splits, resume=(run / "last.pt").is_file(), device=args.device)
    log(f"trained in {time.time() - started:.0f} s; best validation score {result.best_score:.3f}")
    return run


# --------------------------------------------------------------------------- drawing helpers


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so that mask pixels stay visible as pixels."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def tint(image: np.ndarray, weights: np.ndarray, dim: float = 0.55) -> np.ndarray:
    """The image, dimmed, with each class colour blended in by its weight map in [0, 1].

    Shapes:
        image ``(H, W, 3)`` uint8, weights ``(C, H, W)`` -> ``(H, W, 3)`` uint8.
    """
    base = image.astype(np.float64) * dim
    w = np.clip(weights, 0.0, 1.0)
    total = w.sum(axis=0)
    alpha = np.clip(total, 0.0, 1.0)[..., None] * 0.8
    mix = np.einsum("chw,ck->hwk", w, COLORS[: len(w)]) / np.maximum(total, 1e-9)[..., None]
    return np.clip(base * (1 - alpha) + mix * alpha, 0, 255).astype(np.uint8)


def heat(image: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A one-channel map in [0, 1] over the dimmed image, through matplotlib's magma."""
    from matplotlib import colormaps

    rgb = colormaps["magma"](np.clip(values, 0, 1))[..., :3] * 255.0
    return np.clip(image.astype(np.float64) * 0.25 + rgb * 0.75, 0, 255).astype(np.uint8)


def points_in(points: np.ndarray, classes: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The points inside ``box = (x0, y0, width, height)``, shifted to the box."""
    x0, y0, w, h = box
    keep = (points[:, 0] >= x0) & (points[:, 0] <= x0 + w - 1) & (points[:, 1] >= y0) & (points[:, 1] <= y0 + h - 1)
    return points[keep] - [x0, y0], classes[keep]


def scaled(points: np.ndarray, factor: int) -> np.ndarray:
    """Point coordinates after ``upscale`` (pixel ``j`` covers ``[j f, (j + 1) f)``)."""
    return points * factor + (factor - 1) / 2.0


def busiest_box(sample: Any, size: int) -> tuple[int, int, int, int]:
    """The ``size`` window with the most cells of the rarer class (ties: most cells)."""
    h, w = sample.shape
    best, best_key = (0, 0, size, size), (-1, -1)
    for y0 in range(0, h - size + 1, 8):
        for x0 in range(0, w - size + 1, 8):
            _, cls = points_in(sample.points, sample.classes, (x0, y0, size, size))
            counts = np.bincount(cls, minlength=2)
            key = (int(counts.min()), int(counts.sum()))
            if key > best_key:
                best, best_key = (x0, y0, size, size), key
    return best


def figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def show(ax: Any, image: np.ndarray, title: str, fontsize: float = 10) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def legend(fig: Any, extra: list[tuple[str, Any]] | None = None, fontsize: float = 9, ncol: int | None = None,
           names: list[str] | None = None) -> None:
    from matplotlib.patches import Patch

    names = names or [f"{CLASS_NAMES[c]}" + (" (class of interest)" if c == 1 else "") for c in (0, 1)]
    handles = [Patch(color=COLORS[c] / 255.0, label=names[c]) for c in (1, 0)]
    for label, color in extra or []:
        handles.append(Patch(facecolor="none", edgecolor=color, linewidth=2, label=label))
    fig.legend(handles=handles, loc="lower center", ncol=ncol or len(handles), fontsize=fontsize, frameon=False)


#: Colours drawn on the pictures, kept exact in the 256-colour palette.
PURE_COLORS = [tuple(int(v) for v in c) for c in COLORS] + [
    (0, 0, 0), (255, 255, 255), (40, 220, 40), (255, 0, 255), (255, 230, 0),
]


def save(fig: Any, path: Path) -> None:
    """Write a figure as a 256-colour PNG (photographs of tissue compress badly otherwise).

    The palette is a median cut of the picture plus the pure colours of the drawing, so the
    tissue keeps its shades and the dots, rings and legend keep their exact colours.
    """
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_palette(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), path)


def _save_palette(image: Any, path: Path) -> None:
    """Write a PIL RGB image as a 256-colour PNG: a median cut plus ``PURE_COLORS``."""
    from PIL import Image

    shades = image.quantize(colors=256 - len(PURE_COLORS), method=Image.Quantize.MEDIANCUT)
    palette = [tuple(c) for c in np.asarray(shades.getpalette()[: 3 * (256 - len(PURE_COLORS))]).reshape(-1, 3)]
    palette_image = Image.new("P", (1, 1))
    palette_image.putpalette([v for c in palette + PURE_COLORS for v in c])
    small = image.quantize(palette=palette_image, dither=Image.Dither.NONE)
    # Pillow's palette look-up is approximate (white can become 249, 250, 250): give the pixels
    # of each pure colour its exact entry.
    rgb, index = np.asarray(image), np.array(small)
    for k, colour in enumerate(PURE_COLORS):
        index[np.all(rgb == colour, axis=-1)] = len(palette) + k
    small = Image.fromarray(index.astype(np.uint8))  # mode L: putpalette makes it P
    small.putpalette([v for c in palette + PURE_COLORS for v in c])
    small.save(path, format="PNG", optimize=True)
    log(f"wrote {path} ({path.stat().st_size // 1024} KB, {image.size[0]}x{image.size[1]})")


# --------------------------------------------------------------------------- figures


def predictions_figure(sample: Any, det: Any, f1: dict[str, float], steps: int, out: Path) -> None:
    factor = 2
    image = upscale(sample.image, factor)
    pred = draw_points(image, scaled(det.points, factor), det.classes, 2, radius=4)
    truth = draw_points(image, scaled(sample.points, factor), sample.classes, 2, radius=4)
    fig = figure(8.6, 5.0)
    axes = fig.subplots(1, 2)
    counts = lambda c: ", ".join(f"{n} {CLASS_NAMES[i]}" for i, n in enumerate(np.bincount(c, minlength=2)))  # noqa: E731
    show(axes[0], pred, f"cellkit: {len(det)} cells ({counts(det.classes)})")
    show(axes[1], truth, f"annotation: {len(sample.points)} cells ({counts(sample.classes)})")
    scores = ", ".join(f"{name} {value:.2f}" for name, value in f1.items())
    fig.suptitle(f"EndoNuke test tile {sample.key}: ours_plus_plus, cpu size, {steps} training steps on a CPU\n"
                 f"totalF1 on the whole test split (r = {EVAL_RADIUS:g} px): {scores}", fontsize=10)
    legend(fig)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.08, top=0.86, wspace=0.03)
    save(fig, out / "predictions.png")


def prior_maps(model: Any) -> Any:
    """image -> (C, H, W) probability maps of ``model``: what the prior mask generator calls."""
    from cellkit.engine.predict import predict_probabilities

    return lambda image: predict_probabilities(model, image, tile_size=256, overlap=32)


def masks_figure(sample: Any, prior_model: Any, out: Path) -> None:
    shape, pts, cls = sample.shape, sample.points, sample.classes
    call = dict(shape=shape, num_classes=2, image=sample.image)
    rng = np.random.default_rng(0)
    polygons = cellkit.MASKS.build("random_polygon", base_radius=RADIUS)
    maps = {
        "circle": cellkit.MASKS.build("circle", radius=RADIUS)(pts, cls, **call),
        "random_polygon, draw 1": polygons(pts, cls, rng=rng, **call),
        "random_polygon, draw 2": polygons(pts, cls, rng=rng, **call),
        "gaussian": cellkit.MASKS.build("gaussian", sigma=RADIUS / 2)(pts, cls, **call),
        "estimated": cellkit.MASKS.build("estimated", radius=RADIUS)(pts, cls, **call),
        "prior": cellkit.MASKS.build("prior", predictor=prior_maps(prior_model), class_index=1)(pts, cls, **call),
    }
    size, factor = 96, 3
    x0, y0, w, h = busiest_box(sample, size)
    crop = lambda a: a[..., y0 : y0 + h, x0 : x0 + w]  # noqa: E731
    image = crop(sample.image.transpose(2, 0, 1)).transpose(1, 2, 0)
    local_pts, local_cls = points_in(pts, cls, (x0, y0, w, h))
    panels = [(f"image + points (tile {sample.key})",
               draw_points(upscale(image, factor), scaled(local_pts, factor), local_cls, 2, radius=3))]
    for name, target in maps.items():
        target = crop(target)
        if name == "prior":
            picture = heat(image, target[0])
        elif name == "gaussian":
            picture = tint(image, target / max(float(target.max()), 1e-9))
        else:
            picture = tint(image, target)
        panels.append((name, upscale(picture, factor)))
    # Drawn about as wide as the docs' content column shows it (688 px), so the text stays legible.
    fig = figure(9.6, 5.9)
    axes = fig.subplots(2, 4)
    for ax, (title, picture) in zip(axes.flat, panels):
        show(ax, picture, title, fontsize=11.5)
    notes = axes.flat[-1]
    notes.axis("off")
    notes.text(0.0, 0.97, "Targets made from the points\n(96 x 96 crop, enlarged 3x)\n\n"
               "circle: radius 4 px\nrandom_polygon: new shapes\n  at every call (radius 4)\n"
               "gaussian: sigma 2 px,\n  each cell sums to 1\nestimated: Voronoi cells\n  x colour clusters\n"
               "prior: class-1 probability\n  of the early-stopped\n  model (dark 0, bright 1)",
               va="top", fontsize=9, family="monospace", transform=notes.transAxes)
    legend(fig, fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.08, top=0.94, wspace=0.04, hspace=0.16)
    save(fig, out / "masks.png")


def pipeline_figure(sample: Any, probs: np.ndarray, det: Any, out: Path) -> None:
    """Four panels on a canvas 960 pixels wide, so that at the page's width (688 px in a
    1280-px window, 760 px without the table of contents) the capitals and digits of the
    titles are 13 px high and those of the legend 12 px (the five panels before were 1500
    pixels wide, with 6-px text).
    """
    from cellkit.metrics import match_points
    from skimage.draw import circle_perimeter

    size, factor = 80, 3
    x0, y0, w, h = busiest_box(sample, size)
    image = sample.image[y0 : y0 + h, x0 : x0 + w]
    big = upscale(image, factor)
    true_pts, true_cls = points_in(sample.points, sample.classes, (x0, y0, w, h))
    pred_pts, pred_cls = points_in(det.points, det.classes, (x0, y0, w, h))
    target = cellkit.MASKS.build("circle", radius=RADIUS)(true_pts, true_cls, shape=(h, w), num_classes=2)
    crop_probs = probs[:, y0 : y0 + h, x0 : x0 + w]

    matched = draw_points(big, scaled(pred_pts, factor), pred_cls, 2, radius=3)
    tp_pred: set[int] = set()
    tp_true: set[int] = set()
    for c in range(2):
        ip, it = np.flatnonzero(pred_cls == c), np.flatnonzero(true_cls == c)
        p_idx, t_idx = match_points(pred_pts[ip], true_pts[it], EVAL_RADIUS)
        tp_pred |= set(ip[p_idx].tolist())
        tp_true |= set(it[t_idx].tolist())
    green, magenta, yellow = PURE_COLORS[-3:]
    rings = [(scaled(pred_pts[i], factor), green) for i in sorted(tp_pred)]
    rings += [(scaled(pred_pts[i], factor), magenta) for i in range(len(pred_pts)) if i not in tp_pred]
    rings += [(scaled(true_pts[i], factor), yellow) for i in range(len(true_pts)) if i not in tp_true]
    for (x, y), colour in rings:
        for r in (6, 7, 8):
            rr, cc = circle_perimeter(int(round(y)), int(round(x)), r, shape=big.shape[:2])
            matched[rr, cc] = colour

    panels = [
        ("1. points", draw_points(big, scaled(true_pts, factor), true_cls, 2, radius=3)),
        ("2. target", upscale(tint(image, target), factor)),
        ("3. probabilities", upscale(tint(image, crop_probs), factor)),
        ("4. matched peaks", matched),
    ]
    fig = figure(9.6, 3.9)
    axes = fig.subplots(1, 4)
    for ax, (title, picture) in zip(axes, panels):
        show(ax, picture, title, fontsize=18)
    rings = ("true positive", "false positive", f"missed (> {EVAL_RADIUS:g} px)")
    legend(fig, [(label, tuple(v / 255 for v in colour)) for label, colour in zip(rings, (green, magenta, yellow))],
           fontsize=17, ncol=3, names=["other", "epithelium"])
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.215, top=0.885, wspace=0.04)
    save(fig, out / "pipeline.png")


def viz_figure(out: Path, device: str = "cpu") -> None:
    """The annotated and the found cells of a held-out tile, drawn by ``cellkit.viz`` alone.

    The tile is the held-out tile of the shipped model (the 15 % of the group split of
    ``benchmarks/accuracy.py``) with the most epithelium cells. What ``docs/api/viz.md`` shows
    is this function's drawing, without the tile choice and the 256-colour palette.
    """
    import warnings

    from cellkit.viz import draw_points, save_png

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # four half-transparent tiles
        samples = load_dataset(bundled_endonuke(), "endonuke", class_map="endonuke_epithelium")
    held_out = split_by_group(samples, endonuke_group, fractions=(0.85, 0.0, 0.15), seed=0)["test"]
    tile = max(held_out, key=lambda s: (int(np.sum(s.classes == 1)), s.key))

    # --- the code of docs/api/viz.md (there: the tile by its key, the default device)
    found = cellkit.pretrained("endonuke-epithelium", device=device).predict(tile.image)
    big = tile.image.repeat(2, axis=0).repeat(2, axis=1)  # 400 x 400
    truth = draw_points(big, tile.points * 2 + 0.5, tile.classes, num_classes=2)
    cells = draw_points(big, found.points * 2 + 0.5, found.classes, num_classes=2)
    white = np.full((400, 16, 3), 255, np.uint8)
    save_png(out / "viz.png", np.hstack([truth, white, cells]))
    # ---

    log(f"viz.png: tile {tile.key}: {len(tile.points)} annotated cells, {len(found)} found")
    from PIL import Image

    _save_palette(Image.open(out / "viz.png").convert("RGB"), out / "viz.png")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    import warnings

    import torch

    from cellkit.engine.checkpoint import load_model
    from cellkit.engine.predict import Predictor
    from cellkit.metrics import evaluate

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if "viz" in args.figures:
        viz_figure(args.out, device=args.device)
    if not set(args.figures) - {"viz"}:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # four half-transparent tiles; the warning is in the data docs
        samples = load_dataset(bundled_endonuke(), "endonuke", class_map="endonuke_epithelium")
    splits = split_by_group(samples, endonuke_group, fractions=(0.7, 0.15, 0.15), seed=0)
    run = trained_run(args, splits)

    predictor = Predictor.from_checkpoint(run / "best.pt", device=args.device)
    test = splits["test"]
    by_key = {s.key: i for i, s in enumerate(test)}
    if args.test_tile in by_key:
        index = by_key[args.test_tile]
    else:
        index = max(range(len(test)), key=lambda i: (int(np.bincount(test[i].classes, minlength=2).min()), i))
    tile = test[index]
    if "predictions" in args.figures:
        predictions = [predictor.predict(s.image) for s in test]
        report = evaluate(predictions, [(s.points, s.classes) for s in test], radius=EVAL_RADIUS, num_classes=2,
                          class_names=CLASS_NAMES)
        log(str(report))
        f1 = {name: float(report.total_f1[c]) for c, name in enumerate(CLASS_NAMES)}
        steps = sum(int(h.get("steps", 0)) for h in _history(run))
        predictions_figure(tile, predictions[index], f1, steps, args.out)
    if "pipeline" in args.figures:
        from cellkit.engine.predict import predict_probabilities

        probs = predict_probabilities(predictor.model, tile.image, device=args.device)
        pipeline_figure(tile, probs, predictor.predict(tile.image), args.out)
    if "masks" not in args.figures:
        return 0

    train = {s.key: s for s in splits["train"]}
    mask_tile = train.get(args.train_tile) or max(
        splits["train"], key=lambda s: int(np.bincount(s.classes, minlength=2).min()))
    # The prior target is the output of the early-stopped first stage (a run without one: its model).
    stage1 = run / "pretrain" / "last.pt"
    prior_model, _, _ = load_model(stage1 if stage1.is_file() else run / "best.pt", device=args.device)
    masks_figure(mask_tile, prior_model, args.out)
    return 0


def _history(run: Path) -> list[dict[str, Any]]:
    """Every epoch of both stages, from the run's metrics logs."""
    import json

    lines = []
    for path in (run / "pretrain" / "metrics.jsonl", run / "metrics.jsonl"):
        if path.is_file():
            lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


if __name__ == "__main__":
    sys.exit(main())
