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
output is the only full-size array.

On a GPU the work stays on the device: each batch of tiles is uploaded once, as uint8 (a
quarter of the bytes of float32, from pinned memory, without waiting), and normalised there
([`tiles_to_tensor`][cellkit.engine.inference.tiles_to_tensor]); the tiles are blended on the device, in float64 as on the CPU;
the map comes back to the host once, at the end (or not at all with ``as_tensor=True``, and
[`Predictor.predict`][] takes the peaks on the device). ``precision`` runs the network in
bfloat16 or float16 (autocast), or on the CPU in 8-bit integers
([`cellkit.models.quantize`][]: the CPU's default with ``"auto"``), and ``fold_bn`` folds
every BatchNorm into its convolution ([`cellkit.models.fuse.fold_batchnorm`][]): both are
chosen once, in the [`InferenceModel`][cellkit.engine.inference.InferenceModel] that every
prediction runs the network through. Example:

```python
from cellkit.engine.predict import Predictor

predictor = Predictor.from_checkpoint("runs/ours/best.pt", threshold=0.5)
detections = predictor.predict(image)            # (H, W, 3) uint8
fast = Predictor.from_checkpoint("runs/ours/best.pt",  # on a GPU
                                 precision="auto", fold_bn=True)
for path, image, det in predictor.predict_paths(["images/"]):
    print(path, det.counts(predictor.num_classes))
```
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellkit.imaging import check_image
from cellkit.points import Detections

__all__ = [
    "DEFAULT_TILE_SIZE",
    "IMAGE_SUFFIXES",
    "Predictor",
    "blend_window",
    "list_images",
    "predict_image",
    "predict_probabilities",
    "tile_starts",
]

DEFAULT_TILE_SIZE = 512
"""Side of the square tiles images are predicted by (``tile_size``); an image no larger is one tile."""

#: File suffixes taken from a folder by [`list_images`][] (the formats' own, so every
#: image cellkit trains on can be predicted).
from cellkit.data.formats import IMAGE_SUFFIXES  # noqa: E402
from cellkit.data.io import SLIDE_SUFFIXES, read_image
from cellkit.engine.checkpoint import load_model
from cellkit.engine.inference import InferenceModel, resolve_device, resolve_precision
from cellkit.imaging import lab_stats, reinhard
from cellkit.models.quantize import _bundled_tiles
from cellkit.postprocess import postprocess_problems
from cellkit.postprocess.peaks import LocalPeaks
from cellkit.registry import POSTPROCESSORS

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
        >>> # the middle row, in thirds
        >>> (3 * blend_window(5, 5, 2)[2]).round().tolist()
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


















def _stored_calibration(ckpt: dict[str, Any]) -> list[np.ndarray] | None:
    """The int8 calibration crops a checkpoint holds (``cellkit train`` stores them), if any."""
    crops = ckpt.get("int8_calibration")
    if not crops:
        return None
    out = []
    for crop in crops:
        arr = crop.cpu().numpy() if isinstance(crop, torch.Tensor) else np.asarray(crop)
        if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
            out.append(arr)
    return out or None


def _stain_target(ckpt: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The CIELAB statistics of a checkpoint's training crops (else of the bundled tiles)."""
    crops = _stored_calibration(ckpt)
    if not crops:
        crops = _bundled_tiles()
    return lab_stats(crops)














def _blend_dtype(dev: torch.device) -> torch.dtype:
    """float64 sums where the device has float64, else float32 (MPS)."""
    return torch.float64 if dev.type in ("cpu", "cuda") else torch.float32


def predict_probabilities(
    model: nn.Module | InferenceModel,
    image: np.ndarray,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = 64,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = False,
    *,
    precision: str | None = None,
    fold_bn: bool = False,
    as_tensor: bool = False,
    tile_filter: Callable[[int, int, int, int], bool] | None = None,
) -> np.ndarray | torch.Tensor:
    """Per-class probability (or density) maps of a whole image of any size, by tiles.

    Tiles go through ``model.infer`` (encoder + main decoder) in batches under
    ``torch.inference_mode``; ``model.activation`` (``sigmoid`` by default, ``identity``
    for density models) is applied to each tile's logits (in float32), and the tiles are
    blended with [`blend_window`][] into one map. The model is put in eval mode for the
    call (its mode is restored after).

    Each batch of tiles is uploaded to the device as uint8 and normalised there
    ([`tiles_to_tensor`][cellkit.engine.inference.tiles_to_tensor]). The tiles are blended where they are (the CPU or the GPU), by
    one row-band blender with float64 sums (float32 where a device has no float64), so the
    blend adds nothing to the difference between devices, and the map comes back once.

    Args:
        model: a cellkit model (anything with ``infer(x (B, 3, h, w)) -> (B, C, h, w)``),
            or an [`InferenceModel`][cellkit.engine.inference.InferenceModel], which
            carries its own device, precision and folding (``device``, ``amp``,
            ``precision`` and ``fold_bn`` are then not used).
        image: ``(H, W, 3)`` uint8 RGB.
        tile_size: side of the square tiles (a tile is cut to the image when it is smaller).
        overlap: minimum overlap of neighbouring tiles, in pixels (``< tile_size``); the
            width of the weight ramp. A few times the decoder's receptive field near a
            border keeps seams away: 64 is plenty for cellkit's models.
        batch_size: tiles per forward pass.
        device: where to run; ``None`` = where the model's weights are. The model is
            moved there.
        amp: autocast to float16 on CUDA (ignored on the CPU); the same as
            ``precision="fp16"`` on CUDA.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8"`` or ``"auto"`` (see
            [`resolve_precision`][cellkit.engine.inference.resolve_precision]); ``None`` = fp32, or fp16 with ``amp`` on CUDA.
            ``"int8"`` quantizes a copy of the model at every call (a second or two); a
            [`Predictor`][] quantizes once, and an [`Int8Model`][cellkit.models.quantize.Int8Model]
            given as ``model`` is used as it is.
        fold_bn: run a copy of the model with its BatchNorms folded into the convolutions
            ([`cellkit.models.fuse.fold_batchnorm`][]: the same maps within float32
            rounding, fewer layers). The copy is made at every call and moved to the
            device; ``model`` itself is then neither moved nor changed. To fold once for
            many images, use [`Predictor`][] or pass a folded model.
        as_tensor: return the maps as a torch tensor on the device (no copy to the host;
            [`cellkit.postprocess.peaks.peaks`][] takes them there).
        tile_filter: ``tile_filter(y, x, height, width) -> bool`` for each tile (its top-left
            corner and size in image pixels); a tile for which it returns False is not run
            and adds nothing (when it rejects every tile of a model without a ``num_classes``,
            one tile is run to learn the number of channels). Pixels that no tile covers are 0. Whole slides use
            it to skip the tiles of a chunk that hold no tissue. ``None``: every tile.

    Returns:
        ``(C, H, W)`` float32 maps: a numpy array, or a tensor on the device with
        ``as_tensor``.

    Shapes:
        image: ``(H, W, 3)`` -> ``(C, H, W)``.

    Raises:
        ValueError: for a malformed image, tiling arguments or precision, or
            ``fold_bn`` with a model that is not an ``nn.Module``.

    Examples:
        >>> import cellkit
        >>> model = cellkit.build_model(cellkit.presets.ours(size="cpu"))
        >>> image = np.zeros((40, 70, 3), np.uint8)
        >>> predict_probabilities(model, image, tile_size=32, overlap=8).shape
        (2, 40, 70)
        >>> fast = predict_probabilities(model, image, tile_size=32, overlap=8,
        ...                              precision="auto", fold_bn=True,
        ...                              as_tensor=True)
        >>> type(fast).__name__, tuple(fast.shape)
        ('Tensor', (2, 40, 70))
    """
    image = check_image(image, "predict_probabilities")
    _check_tiling(tile_size, overlap, batch_size)
    runner = (model if isinstance(model, InferenceModel)
              else InferenceModel(model, device, precision, amp=amp, fold_bn=fold_bn))
    return _tile_maps(runner, image, tile_size, overlap, batch_size, as_tensor, tile_filter)


def _tile_maps(runner: InferenceModel, image: np.ndarray, tile_size: int, overlap: int, batch_size: int,
               as_tensor: bool, tile_filter: Callable[[int, int, int, int], bool] | None) -> np.ndarray | torch.Tensor:
    """The blended maps of an image's tiles (see [`predict_probabilities`][])."""
    dev = runner.device
    height, width = image.shape[:2]
    th, tw = min(tile_size, height), min(tile_size, width)
    tiles = [(y, x) for y in tile_starts(height, tile_size, overlap) for x in tile_starts(width, tile_size, overlap)]
    if tile_filter is not None:
        kept = [(y, x) for y, x in tiles if tile_filter(y, x, th, tw)]
        # With every tile filtered out, the maps are zeros: their channels come from the
        # model (one tile is run for a model that does not say how many it has).
        tiles = kept or ([] if runner.num_classes is not None else tiles[:1])
    blender: _RowBandBlender | None = None
    pinned = dev.type == "cuda"
    with runner.evaluating(), torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            batch = tiles[i : i + batch_size]
            # One uint8 copy of the batch's tiles (into pinned memory for CUDA), one upload.
            host = torch.empty((len(batch), th, tw, 3), dtype=torch.uint8, pin_memory=pinned)
            np.stack([image[y : y + th, x : x + tw] for y, x in batch], out=host.numpy())
            probs = runner.tiles(host)
            if blender is None:
                window = blend_window(th, tw, overlap)
                blender = _RowBandBlender(probs.shape[1], height, width, window, dev, _blend_dtype(dev))
            for (y, x), tile_probs in zip(batch, probs):
                blender.add(y, x, tile_probs)
    if blender is None:  # every tile was filtered out
        result = torch.zeros((int(runner.num_classes or 0), height, width), dtype=torch.float32, device=dev)
    else:
        result = blender.finish()
    return result if as_tensor else result.cpu().numpy()




class _RowBandBlender:
    """Weighted average of tiles added in row-major order, into a ``(C, H, W)`` float32 tensor.

    Runs where the tiles are (the CPU or a GPU): sums over one band of rows (one tile high);
    rows above the band's next tile row are final and are written out as they complete. In
    float64 (``dtype``'s default, used on CPUs and CUDA), tiles that agree on a pixel blend
    back to exactly their float32 value (also 1.0 where a sigmoid saturates), so blending
    never makes the ripples that would split a plateau into several peaks. ``torch.float32``
    sums (for devices without float64, e.g. Apple's MPS) are a few rounding steps off (about
    1e-7 relative), so a flat plateau may then show a peak more or less.
    """

    def __init__(self, channels: int, height: int, width: int, window: np.ndarray,
                 device: torch.device | str, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.tile_h, self.tile_w = window.shape
        # Normal tensors even when made under inference_mode (as predict_probabilities does):
        # they are updated in place after it ends, and the map is handed to the caller.
        with torch.inference_mode(False):
            # window is float32; like numpy's astype(float64), the conversion is exact.
            self.window = torch.from_numpy(np.ascontiguousarray(window)).to(device=device, dtype=dtype)
            self.out = torch.empty((channels, height, width), dtype=torch.float32, device=device)
            self.total = torch.zeros((channels, self.tile_h, width), dtype=dtype, device=device)
            self.weight = torch.zeros((self.tile_h, width), dtype=dtype, device=device)
        self.top = 0  # the image row of the band's first row

    def add(self, y: int, x: int, probs: torch.Tensor) -> None:
        while y != self.top:  # rows of skipped tiles are flushed as uncovered (0)
            self._flush(min(y - self.top, self.tile_h))
        self.total[:, :, x : x + self.tile_w] += probs.to(self.dtype) * self.window
        self.weight[:, x : x + self.tile_w] += self.window

    def _flush(self, rows: int) -> None:
        """Write the band's first ``rows`` rows out and move the band down by ``rows``."""
        if not 0 < rows <= self.tile_h:
            raise AssertionError(f"tiles must come in row-major order (band moved by {rows}).")
        rows = min(rows, self.out.shape[1] - self.top)
        weight = self.weight[:rows]
        # Pixels no tile covered (tiles skipped by a filter) have no weight: they are 0.
        self.out[:, self.top : self.top + rows] = torch.where(
            weight > 0, self.total[:, :rows] / weight.clamp_min(torch.finfo(weight.dtype).tiny), 0.0)
        keep = self.tile_h - rows
        self.total[:, :keep] = self.total[:, rows:].clone()
        self.total[:, keep:] = 0.0
        self.weight[:keep] = self.weight[rows:].clone()
        self.weight[keep:] = 0.0
        self.top += rows

    def finish(self) -> torch.Tensor:
        while self.top < self.out.shape[1]:
            self._flush(self.tile_h)
        return self.out


def _takes_tensors(postprocess: Any) -> bool:
    """Whether ``postprocess`` is known to take maps as torch tensors on their device."""
    return isinstance(postprocess, LocalPeaks) or bool(getattr(postprocess, "accepts_tensors", False))


def _postprocess_maps(postprocess: PostProcess, maps: torch.Tensor) -> tuple[Detections, np.ndarray]:
    """Detections of maps made as a tensor (on the device when they were), and the maps in numpy."""
    if maps.device.type != "cpu" and _takes_tensors(postprocess):
        detections = with_probs(postprocess(maps), maps)  # the peaks on the device: only candidates travel
        return detections, maps.cpu().numpy()
    probs = maps.cpu().numpy()
    return with_probs(postprocess(probs), probs), probs


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    postprocess: PostProcess | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = 64,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = False,
    *,
    precision: str | None = None,
    fold_bn: bool = False,
) -> tuple[Detections, np.ndarray]:
    """Cells of one image: [`predict_probabilities`][], then ``postprocess`` on the full map.

    Peaks are taken on the blended full-image map, so a cell in the overlap of two tiles
    is found once. On a GPU, a ``peaks`` post-processor (or one with ``accepts_tensors =
    True``) runs on the map where it was made; any other gets the numpy map.

    Args:
        model: a cellkit model.
        image: ``(H, W, 3)`` uint8 RGB.
        postprocess: maps -> [`Detections`][], e.g. ``POSTPROCESSORS.build("peaks",
            threshold=0.5, min_distance=3)``; ``None`` = ``peaks`` with its defaults.
        tile_size, overlap, batch_size, device, amp, precision, fold_bn: see
            [`predict_probabilities`][].

    Returns:
        ``(detections, probs)`` with ``probs`` the ``(C, H, W)`` float32 maps.

    Examples:
        Not run here (``model`` and ``image`` stand for yours):

        >>> det, probs = predict_image(  # doctest: +SKIP
        ...     model, image, POSTPROCESSORS.build("peaks"))
    """
    if postprocess is None:
        postprocess = POSTPROCESSORS.build("peaks")
    maps = predict_probabilities(
        model, image, tile_size, overlap, batch_size, device, amp, precision=precision, fold_bn=fold_bn,
        as_tensor=True,
    )
    assert isinstance(maps, torch.Tensor)
    return _postprocess_maps(postprocess, maps)


def with_probs(det: Detections, maps: torch.Tensor | np.ndarray) -> Detections:
    """``det`` with ``probs``: every class's map value at each cell's nearest pixel.

    Examples:
        >>> maps = np.zeros((2, 4, 4), np.float32); maps[:, 1, 2] = [0.25, 0.75]
        >>> with_probs(Detections([[2, 1]], [1], [0.75]), maps).probs.tolist()
        [[0.25, 0.75]]
    """
    if det.probs is not None or maps.ndim != 3:
        return det
    h, w = maps.shape[-2:]
    x = np.clip(np.rint(det.points[:, 0]).astype(np.int64), 0, w - 1)
    y = np.clip(np.rint(det.points[:, 1]).astype(np.int64), 0, h - 1)
    if isinstance(maps, torch.Tensor):
        values = maps[:, torch.as_tensor(y, device=maps.device), torch.as_tensor(x, device=maps.device)]
        probs = values.float().T.cpu().numpy()
    else:
        probs = np.asarray(maps[:, y, x], np.float32).T
    return Detections(det.points, det.classes, det.scores, probs.reshape(len(det), maps.shape[0]))


def list_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files from files and folders: a folder gives its images (sorted, not recursive).

    A folder's images are the files whose suffix is in [`IMAGE_SUFFIXES`][] or
    [`cellkit.wsi.SLIDE_SUFFIXES`][] (any case);
    a file given by name is taken whatever its suffix.

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: for a folder with no images, no inputs, or two images with one stem
            (their outputs would overwrite each other).

    Examples:
        Not run here (the files do not exist):

        >>> list_images(["slides/", "extra.tif"])  # doctest: +SKIP
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            suffixes = tuple(dict.fromkeys((*IMAGE_SUFFIXES, *SLIDE_SUFFIXES)))
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise ValueError(
                    f"Folder {p} holds no images (expected files ending in {', '.join(suffixes)})."
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


# The dihedral transforms of test-time augmentation, in the order ``tta=k`` takes the first k:
# (transpose, flip rows, flip columns) applied in that order to the image.
_TTA = ((False, False, False), (False, False, True), (False, True, False), (False, True, True),
        (True, False, False), (True, True, True), (True, False, True), (True, True, False))
TTA_CHOICES = (1, 2, 4, 8)
"""The test-time augmentations ``tta`` takes: 1 (none), 2 (+ left-right flip), 4 (all flips),
8 (flips and quarter turns: the eight symmetries of the square)."""


def _tta_image(image: np.ndarray, t: tuple[bool, bool, bool]) -> np.ndarray:
    out = image.transpose(1, 0, 2) if t[0] else image
    if t[1]:
        out = out[::-1]
    if t[2]:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _tta_back(maps: torch.Tensor, t: tuple[bool, bool, bool]) -> torch.Tensor:
    """Undo ``_tta_image`` on ``(C, h, w)`` maps."""
    if t[2]:
        maps = maps.flip(-1)
    if t[1]:
        maps = maps.flip(-2)
    return maps.transpose(-1, -2) if t[0] else maps


def _tta_filter(tile_filter: Callable[[int, int, int, int], bool] | None, t: tuple[bool, bool, bool],
                height: int, width: int) -> Callable[[int, int, int, int], bool] | None:
    """``tile_filter`` of the original image, asked about a tile of the transformed one."""
    if tile_filter is None or t == (False, False, False):
        return tile_filter
    th, tw = (width, height) if t[0] else (height, width)  # the transformed image's size

    def wrapped(y: int, x: int, h: int, w: int) -> bool:
        if t[1]:
            y = th - y - h
        if t[2]:
            x = tw - x - w
        if t[0]:
            y, x, h, w = x, y, w, h
        return bool(tile_filter(y, x, h, w))

    return wrapped


def check_tta(tta: int | bool | None) -> int:
    """``tta`` as a number of transforms (``True`` = 8, ``False``/``None`` = 1).

    Raises:
        ValueError: for anything but 1, 2, 4, 8 (or a bool / None).
    """
    if tta is None or tta is False:
        return 1
    if tta is True:
        return 8
    if isinstance(tta, (int, np.integer)) and int(tta) in TTA_CHOICES:
        return int(tta)
    raise ValueError(f"tta must be one of {TTA_CHOICES} (1 = none, 8 = flips and quarter turns), got {tta!r}.")


def _postprocess_kwargs(ckpt: dict[str, Any], cfg: Any, threshold: Any, min_distance: Any,
                        num_classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The post-processor's arguments of a checkpoint, with ``threshold``/``min_distance`` given
    over them (checked by the post-processor's own rules); also just the given ones."""
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
    if given:
        problems = postprocess_problems(cfg.postprocess.name, given, activation=cfg.model.activation,
                                        num_classes=num_classes, where="")
        if problems:
            raise ValueError("; ".join(problems))
    return kwargs, given


class Predictor:
    """A model ready to predict images and folders, with its post-processing and tiling.

    On a GPU, [`predict`][] keeps the maps on the device and takes the peaks there (a
    ``peaks`` post-processor, or any with an ``accepts_tensors = True`` attribute; any other
    gets numpy maps); only the detections come back.

    Args:
        model: a cellkit model (in eval mode on ``device``).
        postprocess: maps -> [`Detections`][].
        num_classes: output channels of the model.
        class_names: a name per class (default ``class0``, ``class1``...).
        tile_size, overlap, batch_size, amp, precision: see [`predict_probabilities`][].
        fold_bn: fold the BatchNorms into the convolutions once, here
            ([`cellkit.models.fuse.fold_batchnorm`][]), and predict with the folded copy
            (`inference_model`, stored channels-last: faster convolutions on CPUs and GPUs);
            ``model`` is kept unchanged. A later change to
            ``model``'s weights does not reach the copy: make a new Predictor.
        device: where the model runs.
        config: the [`CellkitConfig`][cellkit.config.CellkitConfig] it was built from, if known.
        int8_calibration: ``(h, w, 3)`` uint8 images whose activations set the int8 ranges
            (``precision="int8"``, or ``"auto"`` on the CPU); default the bundled EndoNuke
            tiles. [`from_checkpoint`][cellkit.engine.predict.Predictor.from_checkpoint] passes
            the crops of the model's own training images that ``cellkit train`` stores in
            ``best.pt``.
        tta: test-time augmentation: the maps of ``tta`` flipped and turned copies of the
            image (1, 2, 4 or 8, see [`TTA_CHOICES`][]) are turned back and averaged before
            the peaks; ``tta`` times the network's work. 1 = none.
        stain_target: ``(mean, std)`` CIELAB statistics to move every image's colours to
            before it is predicted ([`cellkit.imaging.reinhard`][]); ``None`` = the image as
            it is. [`from_checkpoint`][cellkit.engine.predict.Predictor.from_checkpoint]
            with ``stain_norm="reinhard"`` takes them from the model's training crops.

    Attributes:
        runner: the [`InferenceModel`][cellkit.engine.inference.InferenceModel] that runs
            the network: ``model``, its folded copy with ``fold_bn``, or its 8-bit copy
            ([`Int8Model`][cellkit.models.quantize.Int8Model]) with ``"int8"`` (what
            ``"auto"`` is on the CPU), on ``device``, in ``precision`` (see the properties
            below).

    Raises:
        ValueError: for bad tiling arguments, device or precision, class names that do not
            fit ``num_classes``, or ``fold_bn`` with a model that is not an ``nn.Module``.

    Examples:
        Not run here (they need a trained checkpoint; ``fast`` is for a GPU):

        >>> predictor = Predictor.from_checkpoint(  # doctest: +SKIP
        ...     "runs/ours/best.pt", threshold=[0.5, 0.4])
        >>> det = predictor.predict(image)  # doctest: +SKIP
        >>> det.counts(predictor.num_classes)  # doctest: +SKIP
        >>> fast = Predictor.from_checkpoint(  # doctest: +SKIP
        ...     "runs/ours/best.pt", precision="auto", fold_bn=True)
    """

    def __init__(
        self,
        model: nn.Module,
        postprocess: PostProcess,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        *,
        tile_size: int = DEFAULT_TILE_SIZE,
        overlap: int = 64,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        amp: bool = False,
        config: Any = None,
        precision: str | None = None,
        fold_bn: bool = False,
        int8_calibration: Sequence[np.ndarray] | None = None,
        tta: int | bool = 1,
        stain_target: tuple[Any, Any] | None = None,
    ) -> None:
        _check_tiling(tile_size, overlap, batch_size)
        self.tta = check_tta(tta)
        self.stain_target = None if stain_target is None else (np.asarray(stain_target[0], float),
                                                               np.asarray(stain_target[1], float))
        self.postprocess = postprocess
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names else [f"class{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(names)} names {names} for a model with {self.num_classes} classes."
            )
        self.class_names = [str(n) for n in names]
        self.tile_size, self.overlap, self.batch_size, self.amp = tile_size, overlap, batch_size, amp
        self.fold_bn = bool(fold_bn)
        # Once: every image reuses the folded or quantized network.
        self.runner = InferenceModel(model.eval() if isinstance(model, nn.Module) else model, device, precision,
                                     amp=amp, fold_bn=fold_bn, calibration=int8_calibration)
        self.config = config

    @property
    def model(self) -> Any:
        """The model given, on [`device`][cellkit.engine.predict.Predictor.device], in eval mode."""
        return self.runner.model

    @property
    def inference_model(self) -> Any:
        """What predicts: ``model``, its folded copy, or its 8-bit copy (``runner.network``)."""
        return self.runner.network

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.runner.device

    @property
    def precision(self) -> str:
        """The precision inference runs in (see [`resolve_precision`][cellkit.engine.inference.resolve_precision])."""
        return self.runner.precision

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        threshold: float | Sequence[float] | None = None,
        min_distance: int | Sequence[int] | None = None,
        *,
        tile_size: int = DEFAULT_TILE_SIZE,
        overlap: int = 64,
        batch_size: int = 4,
        amp: bool = False,
        precision: str | None = None,
        fold_bn: bool = False,
        tta: int | bool = 1,
        stain_norm: str | None = None,
    ) -> Predictor:
        """Load a checkpoint (``RUN_DIR/best.pt``, or a run folder) and its post-processing.

        The checkpoint's config is rebuilt with this version of cellkit and its weights
        checked against the model ([`cellkit.engine.checkpoint.load_model`][]).

        Args:
            path: a checkpoint file, or a run folder holding ``best.pt`` / ``last.pt``.
            device: ``None`` = CUDA when available, else the CPU.
            threshold: peak threshold, one value or one per class (default: the one
                calibrated on the validation images, stored in the checkpoint, else the
                config's).
            min_distance: peak minimum distance in pixels, one or one per class.
            tile_size, overlap, batch_size, amp, precision: see [`predict_probabilities`][].
            fold_bn: fold the BatchNorms into the convolutions once (see [`Predictor`][]).
            tta: test-time augmentation, 1, 2, 4 or 8 transforms (see [`Predictor`][]).
            stain_norm: ``"reinhard"``: move every image's colours to those of the model's
                training crops (stored by ``cellkit train``, else the bundled tiles);
                ``None``/``"none"``: as they are.

        Raises:
            FileNotFoundError: for a missing checkpoint.
            CheckpointError: for a corrupt checkpoint, or one whose config and weights do
                not match the code, saying what differs.
            ValueError: for a threshold or min_distance of the wrong length, or a bad precision.
        """
        dev = resolve_device(device)
        resolve_precision(precision, dev, amp)  # a bad one fails before the checkpoint is read
        check_tta(tta)
        norm = (stain_norm or "none").strip().lower()
        if norm not in ("none", "reinhard"):
            raise ValueError(f"stain_norm must be 'none' or 'reinhard', got {stain_norm!r}.")
        model, cfg, ckpt = load_model(path, device=dev)
        num_classes = int(cfg.model.num_classes)
        kwargs, given = _postprocess_kwargs(ckpt, cfg, threshold, min_distance, num_classes)
        postprocess = POSTPROCESSORS.build(cfg.postprocess.name, **kwargs)
        names = ckpt.get("class_names") or cfg.data.class_names
        if names is not None and len(names) != num_classes:
            names = None  # a stale name list is worse than numbered classes
        predictor = cls(
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
            precision=precision,
            fold_bn=fold_bn,
            int8_calibration=_stored_calibration(ckpt),
            tta=tta,
            stain_target=_stain_target(ckpt) if norm == "reinhard" else None,
        )
        if predictor.precision == "int8" and isinstance(ckpt.get("postprocess_int8"), dict):
            # Thresholds calibrated at training time on the int8 maps this predictor makes.
            predictor.postprocess = POSTPROCESSORS.build(
                cfg.postprocess.name, **{**kwargs, **ckpt["postprocess_int8"], **given})
        return predictor

    def probabilities(self, image: np.ndarray, *, as_tensor: bool = False,
                      tile_filter: Callable[[int, int, int, int], bool] | None = None) -> np.ndarray | torch.Tensor:
        """``(C, H, W)`` float32 maps of an ``(H, W, 3)`` uint8 image (see [`predict_probabilities`][]).

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            as_tensor: return a torch tensor on `device` instead of a numpy array.
        """
        if getattr(self, "stain_target", None) is not None:
            image = reinhard(image, *self.stain_target)
        if getattr(self, "tta", 1) <= 1:
            return predict_probabilities(
                self.inference_model, image, self.tile_size, self.overlap, self.batch_size, self.device,
                precision=self.precision, as_tensor=as_tensor, tile_filter=tile_filter,
            )
        h, w = image.shape[:2]
        total: torch.Tensor | None = None
        for t in _TTA[: self.tta]:
            maps = predict_probabilities(
                self.inference_model, _tta_image(image, t), self.tile_size, self.overlap, self.batch_size,
                self.device, precision=self.precision, as_tensor=True, tile_filter=_tta_filter(tile_filter, t, h, w),
            )
            assert isinstance(maps, torch.Tensor)
            back = _tta_back(maps, t)
            total = back.clone() if total is None else total.add_(back)
        assert total is not None
        total.div_(self.tta)
        return total if as_tensor else total.cpu().numpy()

    def predict_with_probabilities(self, image: np.ndarray) -> tuple[Detections, np.ndarray]:
        """``(detections, probs)`` of an ``(H, W, 3)`` uint8 image; ``probs`` is a numpy array.

        On a GPU the peaks are taken on the device's map (see [`Predictor`][]) before it
        is copied to the host.
        """
        maps = self.probabilities(image, as_tensor=True)
        assert isinstance(maps, torch.Tensor)
        return _postprocess_maps(self.postprocess, maps)

    def predict(self, image: np.ndarray, *,
                tile_filter: Callable[[int, int, int, int], bool] | None = None) -> Detections:
        """The cells of an ``(H, W, 3)`` uint8 image.

        On a GPU with a ``peaks`` post-processor the maps never leave the device: only the
        detections come back. ``tile_filter``: see [`predict_probabilities`][] (tiles it
        rejects are not run and hold no cells).
        """
        return self.cells(self.probabilities(image, as_tensor=True, tile_filter=tile_filter))

    def cells(self, maps: torch.Tensor | np.ndarray) -> Detections:
        """The cells of maps made by [`probabilities`][cellkit.engine.predict.Predictor.probabilities]:
        the one step from maps to cells of every prediction path (images, slides' chunks).

        On a GPU with a post-processor that takes tensors, the peaks are found there and only
        the detections come back; else on the maps in numpy.
        """
        if isinstance(maps, torch.Tensor):
            if maps.device.type != "cpu" and _takes_tensors(self.postprocess):
                return with_probs(self.postprocess(maps), maps)
            maps = maps.cpu().numpy()
        return with_probs(self.postprocess(maps), maps)

    def predict_paths(
        self, inputs: Iterable[str | Path], progress: bool | None = None
    ) -> Iterator[tuple[Path, np.ndarray, Detections]]:
        """Predict image files and folders (see [`list_images`][]), one image at a time.

        Args:
            inputs: files and folders.
            progress: a tqdm bar over images; ``None`` = only when stderr is a terminal.

        Yields:
            ``(path, image, detections)`` per image.
        """
        from tqdm.auto import tqdm
        paths = list_images(inputs)
        show = sys.stderr.isatty() if progress is None else progress
        for path in tqdm(paths, desc="predict", unit="image", disable=not show):
            image = read_image(path)
            yield path, image, self.predict(image)
