"""Inference on images of any size: overlapping tiles, blended maps, then peaks.

The image is cut into ``tile_size`` tiles that overlap by at least ``overlap`` pixels;
batches of tiles go through the encoder and the main decoder (``model.infer``, as in the
paper), and each tile's probability maps are added into one full-size sum with a weight
window that is 1 in the tile's middle and falls off linearly over ``overlap`` pixels toward
its borders (never to 0). The blended map is ``sum / weight``. So:

* an image that fits in one tile gets exactly the whole-image map (one tile, weights cancel);
* seams are invisible: where tiles overlap, the tile whose centre is nearer dominates;
* cells are found once: peaks are taken on the *blended full map*, never per tile, so a cell
  lying across a tile border (seen by two tiles) is one peak of one map. No merging of
  duplicate points is needed, by construction.

Only one batch of tiles is held at a time, and the weighted sums (in float64, so tiles that
agree blend back to exactly their value) cover one band of rows, one tile high; the float32
output is the only full-size array. Example::

    from cellkit.engine.predict import Predictor

    predictor = Predictor.from_checkpoint("runs/ours/best.pt", threshold=0.5)
    detections = predictor.predict(image)            # (H, W, 3) uint8
    for path, det in predictor.predict_paths(["slides/"]):
        print(path, det.counts(predictor.num_classes))
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellkit.imaging import check_image, image_to_tensor
from cellkit.points import Detections

__all__ = [
    "IMAGE_SUFFIXES",
    "Predictor",
    "blend_window",
    "list_images",
    "predict_image",
    "predict_probabilities",
    "resolve_device",
    "tile_starts",
]

#: File suffixes taken from a folder by :func:`list_images` (the formats' own, so every
#: image cellkit trains on can be predicted).
from cellkit.data.formats import IMAGE_SUFFIXES  # noqa: E402

PostProcess = Callable[[Any], Detections]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)`` with at least ``overlap`` shared pixels.

    Tiles step by ``tile - overlap``; the last one is moved back to end exactly at
    ``length`` (so it may overlap its neighbour more). A ``length <= tile`` gives one tile.

    Raises:
        ValueError: for ``tile < 1``, ``overlap < 0`` or ``overlap >= tile``.

    Examples:
        >>> tile_starts(10, 4, 1)
        [0, 3, 6]
        >>> tile_starts(3, 4, 1)
        [0]
    """
    _check_tiling(tile, overlap)
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """The weight of each pixel of a ``(height, width)`` tile when blending overlaps.

    1 in the middle, falling linearly over ``overlap`` pixels toward each border to
    ``1 / (overlap + 1)`` at the border pixel: positive everywhere, so every pixel of the
    image gets weight from at least one tile.

    Shapes:
        returns: ``(height, width)`` float32.

    Examples:
        >>> (3 * blend_window(5, 5, 2)[2]).round().tolist()  # the middle row, in thirds
        [1.0, 2.0, 3.0, 2.0, 1.0]
    """

    def ramp(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        edge = np.minimum(i + 1, n - i)
        return np.minimum(1.0, edge / (overlap + 1)) if overlap > 0 else np.ones(n)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


def _check_tiling(tile_size: int, overlap: int, batch_size: int = 1) -> None:
    if int(tile_size) != tile_size or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer (pixels), got {tile_size!r}.")
    if int(overlap) != overlap or overlap < 0:
        raise ValueError(f"overlap must be an integer >= 0 (pixels), got {overlap!r}.")
    if overlap >= tile_size:
        raise ValueError(
            f"overlap ({overlap}) must be smaller than tile_size ({tile_size}); "
            f"e.g. overlap={tile_size // 8} for tile_size={tile_size}."
        )
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: ``None`` -> CUDA when available, else the CPU; a name is checked.

    Training (:func:`cellkit.engine.fit`), inference and the command line all resolve their
    ``device`` argument here, so a bad one fails the same way everywhere, before any work.

    Raises:
        ValueError: for a name torch does not know, or CUDA asked for where there is none.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"Unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N' (or None: CUDA when available)."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Device {str(device)!r} was asked for, but CUDA is not available here; "
            "use device='cpu' (--device cpu)."
        )
    return dev


def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> np.ndarray:
    """Per-class probability (or density) maps of a whole image of any size, by tiles.

    Tiles go through ``model.infer`` (encoder + main decoder) in batches under
    ``torch.inference_mode``; ``model.activation`` (``sigmoid`` by default, ``identity``
    for density models) is applied to each tile's logits, and the tiles are blended with
    :func:`blend_window` into one map. The model is put in eval mode for the call (its
    mode is restored after).

    Args:
        model: a cellkit model (anything with ``infer(x (B, 3, h, w)) -> (B, C, h, w)``).
        image: ``(H, W, 3)`` uint8 RGB.
        tile_size: side of the square tiles (a tile is cut to the image when it is smaller).
        overlap: minimum overlap of neighbouring tiles, in pixels (``< tile_size``); the
            width of the weight ramp. A few times the decoder's receptive field near a
            border keeps seams away: 64 is plenty for cellkit's models.
        batch_size: tiles per forward pass.
        device: where to run; ``None`` = where the model's weights are. The model is
            moved there.
        amp: autocast to float16 on CUDA (ignored on the CPU).

    Returns:
        ``(C, H, W)`` float32 maps.

    Shapes:
        image: ``(H, W, 3)`` -> ``(C, H, W)``.

    Raises:
        ValueError: for a malformed image or tiling arguments.

    Examples:
        >>> import cellkit
        >>> model = cellkit.build_model(cellkit.presets.ours(size="cpu"))
        >>> predict_probabilities(model, np.zeros((40, 70, 3), np.uint8), tile_size=32, overlap=8).shape
        (2, 40, 70)
    """
    image = check_image(image, "predict_probabilities")
    _check_tiling(tile_size, overlap, batch_size)
    from cellkit.builder import apply_activation

    dev = _model_device(model) if device is None else resolve_device(device)
    if isinstance(model, nn.Module):
        model.to(dev)
    activation = getattr(model, "activation", "sigmoid")
    height, width = image.shape[:2]
    th, tw = min(tile_size, height), min(tile_size, width)
    tiles = [(y, x) for y in tile_starts(height, tile_size, overlap) for x in tile_starts(width, tile_size, overlap)]
    blender: _RowBandBlender | None = None

    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if amp and dev.type == "cuda"
        else contextlib.nullcontext()
    )
    try:
        with torch.inference_mode(), autocast:
            for i in range(0, len(tiles), batch_size):
                batch = tiles[i : i + batch_size]
                # .copy(): a writable tile (torch warns about read-only arrays, e.g. from PIL).
                inputs = torch.stack([image_to_tensor(image[y : y + th, x : x + tw].copy()) for y, x in batch])
                probs = apply_activation(model.infer(inputs.to(dev)).float(), activation)
                if probs.ndim != 4 or probs.shape[0] != len(batch) or tuple(probs.shape[-2:]) != (th, tw):
                    raise ValueError(
                        f"model.infer returned shape {tuple(probs.shape)} for tiles of shape "
                        f"{tuple(inputs.shape)}; expected (B, C, {th}, {tw}) logits at input resolution."
                    )
                out = probs.cpu().numpy()
                if blender is None:
                    blender = _RowBandBlender(out.shape[1], height, width, blend_window(th, tw, overlap))
                for (y, x), tile_probs in zip(batch, out):
                    blender.add(y, x, tile_probs)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    assert blender is not None  # there is at least one tile
    return blender.finish()


class _RowBandBlender:
    """Weighted average of tiles added in row-major order, into a ``(C, H, W)`` float32 map.

    Sums run in float64 over one band of rows (one tile high); rows above the band's next
    tile row are final and are written out as they complete. In float64, tiles that agree
    on a pixel blend back to exactly their float32 value (also 1.0 where a sigmoid
    saturates), so blending never makes the ripples that would split a plateau into
    several peaks.
    """

    def __init__(self, channels: int, height: int, width: int, window: np.ndarray) -> None:
        self.window = window.astype(np.float64)
        self.tile_h, self.tile_w = window.shape
        self.out = np.empty((channels, height, width), np.float32)
        self.total = np.zeros((channels, self.tile_h, width), np.float64)
        self.weight = np.zeros((self.tile_h, width), np.float64)
        self.top = 0  # the image row of the band's first row

    def add(self, y: int, x: int, probs: np.ndarray) -> None:
        if y != self.top:
            self._flush(y - self.top)
        self.total[:, :, x : x + self.tile_w] += probs * self.window
        self.weight[:, x : x + self.tile_w] += self.window

    def _flush(self, rows: int) -> None:
        """Write the band's first ``rows`` rows out and move the band down by ``rows``."""
        if not 0 < rows <= self.tile_h:
            raise AssertionError(f"tiles must come in row-major order (band moved by {rows}).")
        self.out[:, self.top : self.top + rows] = self.total[:, :rows] / self.weight[:rows]
        keep = self.tile_h - rows
        self.total[:, :keep] = self.total[:, rows:].copy()
        self.total[:, keep:] = 0.0
        self.weight[:keep] = self.weight[rows:].copy()
        self.weight[keep:] = 0.0
        self.top += rows

    def finish(self) -> np.ndarray:
        self._flush(self.tile_h)
        return self.out


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    postprocess: PostProcess | None = None,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> tuple[Detections, np.ndarray]:
    """Cells of one image: :func:`predict_probabilities`, then ``postprocess`` on the full map.

    Peaks are taken on the blended full-image map, so a cell in the overlap of two tiles
    is found once.

    Args:
        model: a cellkit model.
        image: ``(H, W, 3)`` uint8 RGB.
        postprocess: maps -> :class:`Detections`, e.g. ``POSTPROCESSORS.build("peaks",
            threshold=0.5, min_distance=3)``; ``None`` = ``peaks`` with its defaults.
        tile_size, overlap, batch_size, device, amp: see :func:`predict_probabilities`.

    Returns:
        ``(detections, probs)`` with ``probs`` the ``(C, H, W)`` float32 maps.

    Examples:
        >>> # det, probs = predict_image(model, image, POSTPROCESSORS.build("peaks"))
    """
    if postprocess is None:
        from cellkit.registry import POSTPROCESSORS
        import cellkit.postprocess  # noqa: F401  registers "peaks"

        postprocess = POSTPROCESSORS.build("peaks")
    probs = predict_probabilities(model, image, tile_size, overlap, batch_size, device, amp)
    return postprocess(probs), probs


def list_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files from files and folders: a folder gives its images (sorted, not recursive).

    A folder's images are the files whose suffix is in :data:`IMAGE_SUFFIXES` (any case);
    a file given by name is taken whatever its suffix.

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: for a folder with no images, no inputs, or two images with one stem
            (their outputs would overwrite each other).

    Examples:
        >>> # list_images(["slides/", "extra.tif"])
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(
                    f"Folder {p} holds no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})."
                )
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; pass image files or folders of images.")
    if not paths:
        raise ValueError("No input images given; pass image files or folders.")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems and stems[p.stem].resolve() != p.resolve():
            raise ValueError(
                f"Two inputs share the name {p.stem!r} ({stems[p.stem]} and {p}); outputs are named "
                "by stem, so predict them into different output folders."
            )
        stems[p.stem] = p
    return list(dict.fromkeys(paths))


class Predictor:
    """A model ready to predict images and folders, with its post-processing and tiling.

    Args:
        model: a cellkit model (in eval mode on ``device``).
        postprocess: maps -> :class:`Detections`.
        num_classes: output channels of the model.
        class_names: a name per class (default ``class0``, ``class1``...).
        tile_size, overlap, batch_size, amp: see :func:`predict_probabilities`.
        device: where the model runs.
        config: the :class:`~cellkit.config.CellkitConfig` it was built from, if known.

    Examples:
        >>> # predictor = Predictor.from_checkpoint("runs/ours/best.pt", threshold=[0.5, 0.4])
        >>> # det = predictor.predict(image); det.counts(predictor.num_classes)
    """

    def __init__(
        self,
        model: nn.Module,
        postprocess: PostProcess,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        *,
        tile_size: int = 512,
        overlap: int = 64,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        amp: bool = False,
        config: Any = None,
    ) -> None:
        _check_tiling(tile_size, overlap, batch_size)
        self.device = _model_device(model) if device is None else resolve_device(device)
        self.model = model.to(self.device).eval() if isinstance(model, nn.Module) else model
        self.postprocess = postprocess
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names else [f"class{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(names)} names {names} for a model with {self.num_classes} classes."
            )
        self.class_names = [str(n) for n in names]
        self.tile_size, self.overlap, self.batch_size, self.amp = tile_size, overlap, batch_size, amp
        self.config = config

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        threshold: float | Sequence[float] | None = None,
        min_distance: int | Sequence[int] | None = None,
        *,
        tile_size: int = 512,
        overlap: int = 64,
        batch_size: int = 4,
        amp: bool = False,
    ) -> Predictor:
        """Load a checkpoint (``RUN_DIR/best.pt``, or a run folder) and its post-processing.

        The checkpoint's config is rebuilt with this version of cellkit and its weights
        checked against the model (:func:`cellkit.engine.checkpoint.load_model`).

        Args:
            path: a checkpoint file, or a run folder holding ``best.pt`` / ``last.pt``.
            device: ``None`` = CUDA when available, else the CPU.
            threshold: peak threshold, one value or one per class (default: the one
                calibrated on the validation images, stored in the checkpoint, else the
                config's).
            min_distance: peak minimum distance in pixels, one or one per class.
            tile_size, overlap, batch_size, amp: see :func:`predict_probabilities`.

        Raises:
            FileNotFoundError: for a missing checkpoint.
            CheckpointError: for a corrupt checkpoint, or one whose config and weights do
                not match the code, saying what differs.
            ValueError: for a threshold or min_distance of the wrong length.
        """
        from cellkit.engine.checkpoint import load_model
        from cellkit.registry import POSTPROCESSORS
        import cellkit.postprocess  # noqa: F401  registers "peaks"

        dev = resolve_device(device)
        model, cfg, ckpt = load_model(path, device=dev)
        num_classes = int(cfg.model.num_classes)
        # The thresholds calibrated on the validation images at training time, when stored.
        kwargs = dict(ckpt.get("postprocess") or cfg.postprocess.kwargs)
        for name, value in (("threshold", threshold), ("min_distance", min_distance)):
            if value is None:
                continue
            if np.ndim(value) == 1:
                if len(value) == 1:
                    value = value[0]
                elif len(value) != num_classes:
                    raise ValueError(
                        f"{name} has {len(value)} values {list(value)} for a model with {num_classes} "
                        f"classes; give one value, or one per class."
                    )
                else:
                    value = list(value)
            kwargs[name] = value
        given = {n: kwargs[n] for n, v in (("threshold", threshold), ("min_distance", min_distance)) if v is not None}
        if cfg.postprocess.name == "peaks" and given:
            from cellkit.postprocess.peaks import check_peak_kwargs

            check_peak_kwargs(given, activation=cfg.model.activation, num_classes=num_classes, where="")
        postprocess = POSTPROCESSORS.build(cfg.postprocess.name, **kwargs)
        names = ckpt.get("class_names") or cfg.data.class_names
        if names is not None and len(names) != num_classes:
            names = None  # a stale name list is worse than numbered classes
        return cls(
            model,
            postprocess,
            num_classes,
            names,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            device=dev,
            amp=amp,
            config=cfg,
        )

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """``(C, H, W)`` float32 maps of an ``(H, W, 3)`` uint8 image (see :func:`predict_probabilities`)."""
        return predict_probabilities(
            self.model, image, self.tile_size, self.overlap, self.batch_size, self.device, self.amp
        )

    def predict_with_probabilities(self, image: np.ndarray) -> tuple[Detections, np.ndarray]:
        """``(detections, probs)`` of an ``(H, W, 3)`` uint8 image."""
        probs = self.probabilities(image)
        return self.postprocess(probs), probs

    def predict(self, image: np.ndarray) -> Detections:
        """The cells of an ``(H, W, 3)`` uint8 image."""
        return self.predict_with_probabilities(image)[0]

    def predict_file(self, path: str | Path) -> Detections:
        """The cells of an image file (read with :func:`cellkit.data.io.read_image`)."""
        from cellkit.data.io import read_image

        return self.predict(read_image(path))

    def predict_paths(
        self, inputs: Iterable[str | Path], progress: bool | None = None
    ) -> Iterator[tuple[Path, np.ndarray, Detections]]:
        """Predict image files and folders (see :func:`list_images`), one image at a time.

        Args:
            inputs: files and folders.
            progress: a tqdm bar over images; ``None`` = only when stderr is a terminal.

        Yields:
            ``(path, image, detections)`` per image.
        """
        from tqdm.auto import tqdm

        from cellkit.data.io import read_image

        paths = list_images(inputs)
        show = sys.stderr.isatty() if progress is None else progress
        for path in tqdm(paths, desc="predict", unit="image", disable=not show):
            image = read_image(path)
            yield path, image, self.predict(image)

    def predict_folder(self, folder: str | Path, progress: bool | None = None) -> dict[str, Detections]:
        """Detections of every image of ``folder``, by file stem."""
        return {p.stem: det for p, _, det in self.predict_paths([folder], progress)}
