"""A whole slide, predicted in bounded memory: what ``cellkit predict slide.svs`` runs.

[`predict_slide`][] goes through a slide in **chunks** of the model's resolution:

1. **Resolution.** The model's pixel size (``mpp`` recorded in its checkpoint when it was
   trained with ``--mpp``) and the slide's (from the file, or ``--mpp``) give the scale:
   level-0 pixels per model pixel. Each chunk is read from the coarsest pyramid level at
   least as fine as that and resampled the rest of the way ([`Slide.read`][]). When
   either pixel size is unknown the slide is read at level 0 as it is (and a warning says so
   when only one is known).
2. **Tissue only.** A tissue mask is computed on a thumbnail
   ([`tissue_mask`][cellkit.wsi.tissue.tissue_mask]); chunks without tissue are not read. With ``regions`` (a QuPath GeoJSON of annotation
   polygons) only chunks that meet a region are read and only cells inside one are kept,
   counted per region.
3. **Chunks and seams.** The slide, at the model's resolution, is cut into a grid of square
   *cores* of ``chunk_size`` pixels. Each core is read with a margin around it (the tiling
   overlap plus twice the peak distance), predicted with the [`Predictor`][cellkit.engine.predict.Predictor]
   (its tiles, blending and peaks, as for any image) and only the cells whose point falls
   in the core are kept. Cores partition the slide, so a cell on a seam is kept by one chunk
   only; the margin gives the pixels near a seam the same context as anywhere else, so the
   maps near a seam differ from a whole-image prediction only by the tiles' different
   placement. Tolerance (``tests/test_wsi.py``): cells farther than the peak distance from a
   seam are found exactly; on a seam a cell's point may move by a pixel or two, or, rarely,
   a cell whose two peaks straddle the seam is reported twice or missed (in the test's
   mosaic of 1,929 cells in 12 chunks, every cell was the whole image's).
4. **Memory.** One chunk's image and maps are held at a time (plus the chunks being read
   ahead by ``workers`` threads and, on the CPU, the previous chunk's maps, whose peaks a
   thread finds while the network runs), never a full-slide map; cells are kept as arrays.
5. **Resume.** Each finished chunk's cells are written atomically into
   ``OUT/.STEM.cellkit-parts/``; a run killed part-way and started again with ``resume=True``
   (``--resume``) reads them back and predicts only the chunks left. The folder is deleted
   once the slide's files are written.
6. **Output**, in level-0 slide coordinates (``x`` the column): ``STEM.geojson`` (QuPath
   detections: import onto the same slide in QuPath with *File > Import objects*),
   ``STEM.csv`` (``x,y,class,score``; written last, it marks the slide done),
   ``STEM.summary.json`` / ``.csv`` (counts per class, the share of the class of interest
   such as the Ki-67 index, cells per mm², per slide and per region) and
   ``STEM.thumbnail.png`` (the tissue mask and a cell density heat map).
"""

from __future__ import annotations

import inspect
import io
import json
import math
import shutil
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellkit._version import __version__
from cellkit.data.io import atomic_write, jsonable, make_folder, remove_stale_temporaries, write_text_atomic
from cellkit.data.writers import write_csv, write_geojson
from cellkit.engine.predict import Predictor
from cellkit.points import Detections
from cellkit.progress import ChunkProgress
from cellkit.viz import class_colors
from cellkit.wsi.reader import Slide, open_slide
from cellkit.wsi.regions import assign_regions, read_regions
from cellkit.wsi.summary import _index_class, confidence_summary, draw_thumbnail, summarize, write_summary
from cellkit.wsi.tissue import mask_fraction, tissue_mask

__all__ = ["MASK_UM_PER_PX", "PARTS_SUFFIX", "TILE_TISSUE_MARGIN_UM", "SlideResult", "chunk_grid", "predict_slide",
           "slide_files"]

PARTS_SUFFIX = ".cellkit-parts"
"""The folder ``OUT/.STEM.cellkit-parts/`` holds the finished chunks of a slide being predicted."""

MASK_UM_PER_PX = 8.0
"""The tissue mask's resolution when the slide's pixel size is known (micrometres per mask pixel):
fine enough for the tissue's outline, coarse enough that pale gaps between cells do not split it."""

TILE_TISSUE_MARGIN_UM = 100.0
"""Inside a chunk, a tile is run only when the tissue mask finds tissue within this many
micrometres of it (200 px when the slide's pixel size is unknown). The margin keeps pale tissue
that the low-resolution mask misses beside stained tissue (and the tissue's edge); tiles of glass
farther away than that are not run at all."""


@dataclass
class SlideResult:
    """What [`predict_slide`][] did.

    Attributes:
        path: the slide file.
        stem: the name of its output files.
        detections: every cell kept, in level-0 slide pixels.
        summary: the summary written to ``STEM.summary.json``.
        files: the files written.
        chunks: chunks with tissue (predicted or resumed); ``chunks_resumed`` of them were
            done by an earlier run.
        scale: level-0 pixels per model pixel.
        seconds: wall time of this call.
        megapixels: level-0 megapixels of the chunks' cores predicted by this call.
    """

    path: Path
    stem: str
    detections: Detections
    summary: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    chunks: int = 0
    chunks_resumed: int = 0
    scale: float = 1.0
    seconds: float = 0.0
    megapixels: float = 0.0


def slide_files(out: Path, stem: str, gz: bool = False) -> list[Path]:
    """A slide's output files, the one that marks it done (its ``.csv``) last; ``gz``: the GeoJSON gzipped."""
    return [out / f"{stem}.thumbnail.png", out / f"{stem}.summary.json", out / f"{stem}.summary.csv",
            out / f"{stem}.geojson{'.gz' if gz else ''}", out / f"{stem}.csv"]


def chunk_grid(width: int, height: int, chunk_size: int) -> list[tuple[int, int, int, int]]:
    """Square cores ``(x, y, w, h)`` of ``chunk_size`` covering a ``width x height`` image, row-major.

    Examples:
        >>> chunk_grid(5, 3, 4)
        [(0, 0, 4, 3), (4, 0, 1, 3)]
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return [(x, y, min(chunk_size, width - x), min(chunk_size, height - y))
            for y in range(0, height, chunk_size) for x in range(0, width, chunk_size)]


def _max_min_distance(predictor: Any) -> int:
    value = getattr(predictor.postprocess, "min_distance", 3)
    return int(np.max(np.atleast_1d(np.asarray(value, dtype=np.float64))))


def _model_mpp(predictor: Any) -> float | None:
    cfg = getattr(predictor, "config", None)
    mpp = getattr(getattr(cfg, "data", None), "mpp", None)
    return float(mpp) if mpp else None


def _default_chunk(predictor: Any) -> int:
    dev = getattr(predictor, "device", None)
    return 4096 if getattr(dev, "type", "cpu") == "cuda" else 2048


def predict_slide(
    predictor: Any,
    path: str | Path,
    out_dir: str | Path,
    *,
    stem: str | None = None,
    mpp: float | None = None,
    regions: str | Path | Sequence[Any] | None = None,
    tissue: bool = True,
    chunk_size: int | None = None,
    workers: int = 2,
    resume: bool = False,
    progress: bool | None = None,
    thumbnail_size: int = 1024,
    index_class: str | None = None,
    overwrite: bool = False,
    geojson_names: Sequence[str] | None = None,
    geojson_gz: bool = False,
) -> SlideResult:
    """Predict a whole slide (or a large image) chunk by chunk into ``out_dir`` (see the module).

    Args:
        predictor: a [`Predictor`][cellkit.engine.predict.Predictor].
        path: the slide (any format [`open_slide`][cellkit.wsi.open_slide] reads).
        out_dir: the output folder (created).
        stem: the output files' name (default: the slide's file stem).
        mpp: micrometres per level-0 pixel of the slide; overrides the file's.
        regions: a QuPath GeoJSON file of annotation polygons (or a list of
            [`Region`][cellkit.wsi.regions.Region]): count only inside them, per region.
        tissue: skip chunks without tissue ([`tissue_mask`][cellkit.wsi.tissue.tissue_mask]),
            and inside a chunk the tiles with no tissue within [`TILE_TISSUE_MARGIN_UM`][].
        chunk_size: side of a chunk's core in model pixels (default 2048 on the CPU, 4096 on CUDA).
        workers: threads reading chunks ahead of the model.
        resume: keep the chunks an earlier, interrupted run of the same settings finished.
        progress: a bar; ``None`` = a bar on a terminal, a line every 30 s otherwise.
        thumbnail_size: longer side of the thumbnail (tissue mask and picture), pixels.
        index_class: the class whose share is reported (default: a class named ``positive``,
            else class 1, cellkit's class of interest; see
            [`summarize`][cellkit.wsi.summary.summarize]).
        geojson_names: the classes' names in the GeoJSON (e.g. QuPath's ``Positive`` and
            ``Negative``: [`qupath_positivity_names`][cellkit.data.writers.qupath_positivity_names]);
            default the model's.
        geojson_gz: write the GeoJSON gzipped, ``<stem>.geojson.gz`` (QuPath >= 0.4 imports it;
            a tenth of the size).
        overwrite: replace the slide's output files when they exist. Without it (and without
            ``resume``, which continues a run of this function), an existing output file stops
            the call before any work: it may be the user's (``STEM.csv`` annotations).

    Returns:
        a [`SlideResult`][].

    Raises:
        FileNotFoundError, SlideError: for a slide that cannot be read.
        ValueError: for regions that cannot be read, or ``resume`` with other settings.
        FileExistsError: for an output file that exists, without ``overwrite`` or ``resume``.

    Examples:
        Not run here (it needs a trained checkpoint and a slide, and writes ``out/``):

        >>> predictor = Predictor.from_checkpoint("runs/x/best.pt")  # doctest: +SKIP
        >>> result = predict_slide(predictor, "slide.svs", "out/")  # doctest: +SKIP
        >>> result.summary["counts"], result.summary["index"]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    _index_class(index_class, list(predictor.class_names))  # a typo fails now, not after the slide
    out = Path(out_dir)
    make_folder(out)
    remove_stale_temporaries(out)
    with open_slide(path, mpp=mpp) as slide:
        stem = stem or slide.path.stem
        _refuse_existing(out, stem, overwrite or resume)
        region_list = _regions(regions)
        _check_regions_overlap(region_list, slide, regions)
        model_mpp = _model_mpp(predictor)
        scale = _scale(slide, model_mpp)
        thumb, _ = slide.thumbnail(thumbnail_size)
        # Thumbnail pixels per level-0 pixel along x and y (the sides round differently).
        thumb_scale = (thumb.shape[1] / slide.dimensions[0], thumb.shape[0] / slide.dimensions[1])
        mask = _tissue(slide, thumb, tissue)
        chunk = int(chunk_size or _default_chunk(predictor))
        margin = int(getattr(predictor, "overlap", 64)) + 2 * _max_min_distance(predictor) + 2
        work_w = max(1, int(math.ceil(slide.dimensions[0] / scale)))
        work_h = max(1, int(math.ceil(slide.dimensions[1] / scale)))
        cores = chunk_grid(work_w, work_h, chunk)
        wanted = [i for i, c in enumerate(cores) if _wanted(c, scale, mask, thumb_scale, region_list)]
        settings = {"slide": str(slide.path.resolve()), "dimensions": list(slide.dimensions), "mpp": slide.mpp,
                    "model_mpp": model_mpp, "scale": scale, "chunk_size": chunk, "margin": margin,
                    "tissue": bool(tissue), "regions": [r.name for r in region_list],
                    "postprocess": _jsonable_post(predictor),
                    # Chunks predicted with other tile skipping or arithmetic are not mixed in.
                    "tile_tissue_margin_um": TILE_TISSUE_MARGIN_UM, "precision": getattr(predictor, "precision", None)}
        parts = _Parts(out / f".{stem}{PARTS_SUFFIX}", settings, resume)
        done = parts.done()
        todo = [i for i in wanted if i not in done]
        bar = ChunkProgress(len(todo), f"predict {slide.path.name}", progress)
        # Tiles run where tissue lies within TILE_TISSUE_MARGIN_UM (pale tissue by stained tissue).
        near = TILE_TISSUE_MARGIN_UM / slide.mpp if slide.mpp else TILE_TISSUE_MARGIN_UM / 0.5
        skip_tiles = (tissue or bool(region_list)) and _takes_tile_filter(predictor)

        def tile_filter(box: tuple[float, float, float, float]) -> dict[str, Any]:
            # Tiles of the chunk with no tissue (or outside the regions) are not run.
            return {"tile_filter": _tile_filter(box, mask, thumb_scale, region_list, near)} if skip_tiles else {}

        chunks = _read_ahead(slide, cores, todo, scale, margin, work_w, work_h, workers)
        try:
            mp = _predict_chunks(predictor, chunks, cores, scale, parts, bar, tile_filter)
        finally:
            chunks.close()  # its reading threads stop now, not when the traceback is freed
            bar.close()
        cells, region_index = _in_regions(parts.load_all(wanted), region_list)
        files = _write_outputs(out, stem, predictor, slide, cells, thumb, thumb_scale, mask, region_list,
                               region_index, index_class, settings, geojson_names, geojson_gz)
        parts.remove()
        result = SlideResult(slide.path, stem, cells, json.loads(files[1].read_text(encoding="utf-8")), files,
                             chunks=len(wanted), chunks_resumed=len(wanted) - len(todo), scale=scale,
                             seconds=time.perf_counter() - t0, megapixels=mp)
    return result


def _refuse_existing(out: Path, stem: str, allowed: bool) -> None:
    """Refuse to replace a slide's outputs unless overwrite (or resume) was asked for."""
    existing = [f for f in dict.fromkeys(slide_files(out, stem) + slide_files(out, stem, gz=True)) if f.exists()]
    if existing and not allowed:
        raise FileExistsError(
            f"{existing[0]} exists and predict_slide would replace it (and {len(existing) - 1} more of the "
            f"slide's outputs); pass overwrite=True (or resume=True to finish an interrupted run), or choose "
            "another output folder."
        )


def _predict_chunks(predictor: Any, chunks: Any, cores: list[tuple[int, int, int, int]], scale: float,
                    parts: Any, bar: Any, tile_filter: Any) -> float:
    """Predict each ``(index, (image, box))`` chunk and save its cells; the megapixels done.

    On the CPU, a chunk's peaks are found (and its cells saved) in a thread while the
    network runs on the next chunk: the peaks use one core, the network both.
    """
    def finish(index: int, det: Detections, box: tuple[float, float, float, float]) -> float:
        parts.save(index, _in_core(det, box, cores[index], scale))
        core_mp = cores[index][2] * cores[index][3] * scale * scale / 1e6
        bar.update(core_mp)
        return core_mp

    def peaks_then_finish(index: int, maps: Any, box: tuple[float, float, float, float]) -> float:
        return finish(index, predictor.cells(maps), box)

    if not _splits_peaks(predictor):
        return sum(finish(index, predictor.predict(image, **tile_filter(box)), box)
                   for index, (image, box) in chunks)
    mp = 0.0
    post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellkit-peaks")
    pending: Future[float] | None = None
    try:
        for index, (image, box) in chunks:
            maps = predictor.probabilities(image, as_tensor=True, **tile_filter(box))
            if pending is not None:
                mp += pending.result()
            pending = post.submit(peaks_then_finish, index, maps, box)
        if pending is not None:
            mp += pending.result()
    finally:
        post.shutdown(wait=True)  # a chunk being saved is finished, never left half-written
    return mp


def _in_regions(cells: Detections, region_list: Sequence[Any]) -> tuple[Detections, np.ndarray | None]:
    """The cells inside the regions and the region of each (all cells and ``None`` without regions)."""
    if not region_list:
        return cells, None
    region_index = assign_regions(cells.points, region_list)
    inside = region_index >= 0
    return cells.subset(inside), region_index[inside]


def _scale(slide: Slide, model_mpp: float | None) -> float:
    if slide.mpp is None and model_mpp is not None:
        warnings.warn(
            f"{slide.path} records no pixel size and none was given (--mpp); the model was trained at "
            f"{model_mpp:g} um/px, so the slide is read as if it were at that resolution. Give --mpp to be sure.",
            stacklevel=3,
        )
    if slide.mpp is not None and model_mpp is None:
        warnings.warn(
            f"The model records no pixel size (train it with --mpp), so {slide.path} is read at its full "
            f"resolution ({slide.mpp:g} um/px); a model trained at another resolution sees cells of another size.",
            stacklevel=3,
        )
    if slide.mpp is None or model_mpp is None:
        return 1.0
    return float(model_mpp) / float(slide.mpp)


def _tissue(slide: Slide, thumb: np.ndarray, tissue: bool) -> np.ndarray:
    """The tissue mask on the thumbnail's grid, computed at about [`MASK_UM_PER_PX`][] when the pixel size is known."""
    if not tissue:
        return np.ones(thumb.shape[:2], bool)
    from PIL import Image
    from scipy import ndimage
    low = thumb
    if slide.mpp:
        side = int(round(max(slide.dimensions) * slide.mpp / MASK_UM_PER_PX))
        if 64 <= side < max(thumb.shape[:2]):
            # Averaged down from the thumbnail (already read): a slide without a coarse
            # pyramid level is not read a second time.
            h, w = thumb.shape[:2]
            size = (max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w))))
            low = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BOX))
    mask = tissue_mask(low)
    if low.shape != thumb.shape:
        mask = np.asarray(Image.fromarray(mask).resize((thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST))
    # One thumbnail pixel of dilation: a chunk that only touches tissue is still read.
    return ndimage.binary_dilation(mask, iterations=1)


def _check_regions_overlap(region_list: Sequence[Any], slide: Any, source: Any) -> None:
    """Refuse regions that all lie outside the slide; warn about those that do."""
    if not region_list:
        return
    from shapely.geometry import box

    w, h = slide.dimensions
    bounds = box(0, 0, w, h)
    outside = [str(r.name) for r in region_list if not r.geometry.intersects(bounds)]
    named = source if isinstance(source, (str, Path)) else "the regions given"
    if len(outside) == len(region_list):
        x0, y0, x1, y1 = region_list[0].geometry.bounds
        raise ValueError(
            f"None of the {len(region_list)} regions of {named} overlaps {slide.path} ({w} x {h} pixels; the "
            f"first region spans x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}): are they drawn on another slide, or "
            "in other units than the slide's full-resolution pixels (as QuPath exports them)?"
        )
    if outside:
        warnings.warn(f"{len(outside)} of the {len(region_list)} regions of {named} lie outside {slide.path} "
                      f"({w} x {h} pixels) and count no cells: {', '.join(outside[:5])}.", stacklevel=3)


def _regions(regions: Any) -> list[Any]:
    if regions is None:
        return []
    if isinstance(regions, (str, Path)):
        return list(read_regions(regions))
    return list(regions)


def _wanted(core: tuple[int, int, int, int], scale: float, mask: np.ndarray, thumb_scale: tuple[float, float],
            regions: Sequence[Any]) -> bool:
    x, y, w, h = core
    return _box_wanted((x * scale, y * scale, w * scale, h * scale), mask, thumb_scale, regions)


def _splits_peaks(predictor: Any) -> bool:
    """Whether the chunks' peaks can run beside the network: a cellkit Predictor on the CPU."""
    return isinstance(predictor, Predictor) and predictor.device.type == "cpu"


def _takes_tile_filter(predictor: Any) -> bool:
    try:
        return "tile_filter" in inspect.signature(predictor.predict).parameters
    except (TypeError, ValueError):
        return False


def _tile_filter(box: tuple[float, float, float, float], mask: np.ndarray, thumb_scale: tuple[float, float],
                 regions: Sequence[Any], near: float) -> Any:
    """``(y, x, h, w) -> bool`` for the tiles of one chunk image: is there tissue within ``near``
    level-0 pixels of the tile?"""
    lx0, ly0, sx, sy = box

    def wanted(y: int, x: int, h: int, w: int) -> bool:
        return _box_wanted((lx0 + x * sx - near, ly0 + y * sy - near, w * sx + 2 * near, h * sy + 2 * near),
                           mask, thumb_scale, regions)

    return wanted


def _box_wanted(box: tuple[float, float, float, float], mask: np.ndarray, thumb_scale: tuple[float, float],
                regions: Sequence[Any]) -> bool:
    """Whether a level-0 box ``(x, y, w, h)`` touches tissue (and a region, when there are any)."""
    if mask_fraction(mask, box, thumb_scale) <= 0:
        return False
    if regions:
        import shapely

        rect = shapely.box(box[0], box[1], box[0] + box[2], box[1] + box[3])
        return any(r.geometry.intersects(rect) for r in regions)
    return True


def _read_ahead(slide: Slide, cores: Sequence[tuple[int, int, int, int]], todo: Sequence[int], scale: float,
                margin: int, work_w: int, work_h: int, workers: int
                ) -> Iterator[tuple[int, tuple[np.ndarray, tuple[float, float, float, float]]]]:
    """``(index, (image, box))`` per chunk in order, read by ``workers`` threads ahead of the caller.

    ``box = (x0, y0, sx, sy)``: the level-0 position of the chunk image's pixel (0, 0)'s corner
    and level-0 pixels per image pixel along x and y.
    """

    def read(index: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        x, y, w, h = cores[index]
        wx0, wy0 = max(0, x - margin), max(0, y - margin)
        wx1, wy1 = min(work_w, x + w + margin), min(work_h, y + h + margin)
        lx0, ly0 = int(round(wx0 * scale)), int(round(wy0 * scale))
        lw = max(1, int(round(wx1 * scale)) - lx0)
        lh = max(1, int(round(wy1 * scale)) - ly0)
        image = slide.read(lx0, ly0, lw, lh, scale=scale)
        return image, (float(lx0), float(ly0), lw / image.shape[1], lh / image.shape[0])

    if workers <= 0:
        for index in todo:
            yield index, read(index)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cellkit-read") as pool:
        queue: deque[tuple[int, Future[Any]]] = deque()
        pending = iter(todo)
        for index in pending:
            queue.append((index, pool.submit(read, index)))
            if len(queue) > workers:
                break
        while queue:
            index, fut = queue.popleft()
            nxt = next(pending, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(read, nxt)))
            yield index, fut.result()


def _in_core(det: Detections, box: tuple[float, float, float, float], core: tuple[int, int, int, int],
             scale: float) -> Detections:
    """The chunk's cells in level-0 coordinates, keeping those whose point falls in the core."""
    lx0, ly0, sx, sy = box
    pts = det.points.astype(np.float64)
    # A chunk pixel j covers level-0 [x0 + j sx, x0 + (j + 1) sx): its centre is at x0 + (j + 0.5) sx - 0.5.
    gx = lx0 + (pts[:, 0] + 0.5) * sx - 0.5
    gy = ly0 + (pts[:, 1] + 0.5) * sy - 0.5
    x, y, w, h = core
    # The core in level-0 pixel-centre coordinates: [x scale - 0.5, (x + w) scale - 0.5).
    cx0, cy0 = x * scale - 0.5, y * scale - 0.5
    keep = (gx >= cx0) & (gx < cx0 + w * scale) & (gy >= cy0) & (gy < cy0 + h * scale)
    moved = det.subset(keep)
    moved.points = np.stack([gx, gy], axis=1)[keep].astype(np.float32)
    return moved


def _jsonable_post(predictor: Any) -> dict[str, Any]:
    post = predictor.postprocess
    return json.loads(json.dumps({k: jsonable(getattr(post, k)) for k in ("threshold", "min_distance", "exclusive")
                                  if hasattr(post, k)}))


class _Parts:
    """The finished chunks of one slide, one ``.npz`` each, written atomically."""

    def __init__(self, folder: Path, settings: Mapping[str, Any], resume: bool) -> None:
        self.folder = folder
        record = folder / "settings.json"
        settings = json.loads(json.dumps(settings))
        if folder.is_dir():
            earlier = None
            try:
                earlier = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                earlier = None
            if resume and earlier is not None and earlier != settings:
                diffs = [k for k in sorted(set(earlier) | set(settings)) if earlier.get(k) != settings.get(k)]
                raise ValueError(
                    f"Cannot resume {folder.parent}: the interrupted prediction of this slide used other settings "
                    f"({', '.join(diffs)}). Resume with the same options, or pass --overwrite to predict again."
                )
            if not resume or earlier is None:
                shutil.rmtree(folder)  # ours: a killed run's chunks, not asked to be kept
        make_folder(folder)
        write_text_atomic(record, json.dumps(settings, indent=2) + "\n")

    def _file(self, index: int) -> Path:
        return self.folder / f"chunk-{index:07d}.npz"

    def done(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.folder.glob("chunk-*.npz")}

    def save(self, index: int, det: Detections) -> None:
        buf = io.BytesIO()
        extra = {} if det.probs is None else {"probs": det.probs}
        np.savez(buf, points=det.points, classes=det.classes, scores=det.scores, **extra)
        with atomic_write(self._file(index), "wb") as f:
            f.write(buf.getvalue())

    def load_all(self, indices: Sequence[int]) -> Detections:
        parts = []
        for index in indices:
            path = self._file(index)
            try:
                with np.load(path, allow_pickle=False) as z:
                    parts.append(Detections(z["points"], z["classes"], z["scores"],
                                            z["probs"] if "probs" in z.files else None))
            except (OSError, ValueError, KeyError) as err:
                raise ValueError(
                    f"{path} (a finished chunk of an earlier run) cannot be read ({err}); pass --overwrite to "
                    "predict the slide again."
                ) from err
        return Detections.concatenate(parts)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def tissue_in_regions(mask: np.ndarray, thumb_scale: tuple[float, float],
                      regions: Sequence[Any]) -> tuple[float, list[float]]:
    """The tissue area inside the regions together, and inside each, in level-0 pixels (squared).

    Each region's area times the share of the thumbnail pixels inside it that are tissue
    (their centres, tested against the polygon; a region too small to hold a pixel centre takes
    the mask at its representative point). The union counts each tissue pixel once.

    Args:
        mask: ``(h, w)`` bool tissue mask on the thumbnail.
        thumb_scale: thumbnail pixels per level-0 pixel, ``(x, y)``.
        regions: [`Region`][cellkit.wsi.regions.Region] objects (level-0 polygons).

    Examples:
        >>> from shapely.geometry import box
        >>> from cellkit.wsi.regions import Region
        >>> mask = np.zeros((10, 10), bool)
        >>> mask[:, :5] = True  # tissue on the left half
        >>> square = Region("a", None, box(0, 0, 100, 100))
        >>> total, each = tissue_in_regions(mask, (0.1, 0.1), [square])
        >>> round(total), [round(a) for a in each]
        (5000, [5000])
    """
    import shapely

    sx, sy = float(thumb_scale[0]), float(thumb_scale[1])
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = (xs.ravel() + 0.5) / sx, (ys.ravel() + 0.5) / sy  # pixel centres on level 0
    flat = mask.ravel().astype(bool)
    in_any = np.zeros(flat.shape, bool)
    each, sub_pixel = [], []
    for region in regions:
        inside = shapely.contains_xy(region.geometry, cx, cy)
        in_any |= inside
        sub_pixel.append(not inside.any())
        if inside.any():
            share = float(flat[inside].mean())
        else:  # smaller than a thumbnail pixel
            point = region.geometry.representative_point()
            row = min(h - 1, max(0, int(point.y * sy)))
            col = min(w - 1, max(0, int(point.x * sx)))
            share = float(mask[row, col])
        each.append(float(region.area_px) * share)
    union = float((flat & in_any).sum()) / (sx * sy)
    # A region smaller than a pixel adds its own tissue (no pixel centre counted it).
    union += sum(a for a, small in zip(each, sub_pixel) if small)
    return union, each


def _write_outputs(out: Path, stem: str, predictor: Any, slide: Slide, cells: Detections, thumb: np.ndarray,
                   thumb_scale: tuple[float, float], mask: np.ndarray, regions: Sequence[Any], region_index: np.ndarray | None,
                   index_class: str | None, settings: Mapping[str, Any],
                   geojson_names: Sequence[str] | None = None, gz: bool = False) -> list[Path]:
    names = list(predictor.class_names)
    files = slide_files(out, stem, gz)
    tissue_px = float(mask.sum()) / (thumb_scale[0] * thumb_scale[1])
    region_tissue = None
    if regions:  # cells are found inside the regions only: densities over the tissue there
        tissue_px, region_tissue = tissue_in_regions(mask, thumb_scale, regions)
    summary = summarize(cells.classes, names, mpp=slide.mpp, tissue_area_px=tissue_px, index_class=index_class,
                        region_index=region_index, regions=list(regions) or None, region_tissue_px=region_tissue)
    summary = {"slide": str(slide.path), "dimensions": list(slide.dimensions), "mpp": slide.mpp,
               "model_mpp": settings.get("model_mpp"), "scale": settings.get("scale"),
               "cellkit_version": __version__, **summary}
    if cells.probs is not None:  # how sure the model is, per slide and region
        summary["confidence"] = confidence_summary(cells.confidence)
        for r, region in enumerate(summary["regions"]):
            region["confidence"] = confidence_summary(cells.confidence[region_index == r]
                                                      if region_index is not None else cells.confidence[:0])
    # Micrometres per thumbnail pixel: the density map in cells per mm² where the slide has an mpp.
    pixel_um = (slide.mpp / thumb_scale[0], slide.mpp / thumb_scale[1]) if slide.mpp else None
    outlines = [(r.name, np.asarray(g.exterior.coords) * np.array(thumb_scale)) for r in regions
                for g in getattr(r.geometry, "geoms", [r.geometry])]
    index = summary.get("index")
    draw_thumbnail(thumb, files[0], tissue=mask, points=(cells.points + 0.5) * np.array(thumb_scale, np.float32) - 0.5,
                   classes=cells.classes, class_names=names, pixel_um=pixel_um, regions=outlines,
                   density_class=names.index(index["class"]) if index and index.get("class") in names else None)
    write_summary(out, stem, summary)
    colors = class_colors(len(names))
    write_geojson(files[3], cells, list(geojson_names or names), colors=colors.tolist(), prob_names=list(names))
    write_csv(files[4], cells, class_names=list(names))
    return files
