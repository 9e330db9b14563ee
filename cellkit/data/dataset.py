"""Training datasets: random crops, augmentation and targets built on the fly.

[`PointDataset`][] turns [`Sample`][]s (an image with its point annotations) into
training items. For each item it

1. computes the targets of the ``per_image`` mask generators (``prior``, ``estimated``)
   on the full, untransformed image (they cache themselves by ``key``);
2. takes a random crop (padding images smaller than the crop), keeping the points inside;
3. augments the crop, the points and the per-image targets together ([`Augment`][]);
4. builds the other targets (``circle``, ``random_polygon``, ``gaussian``) from the
   transformed points, with the item's random generator.

The item's generator is ``np.random.default_rng([seed, epoch, index])``: the same seed,
epoch and index give the same item (reproducible runs), a new epoch gives new crops,
augmentations and dynamic masks, and DataLoader workers share no random state. Call
[`PointDataset.set_epoch`][] at the start of every epoch; the epoch lives in shared
memory, so persistent DataLoader workers see it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cellkit.imaging import check_image, image_to_tensor
from cellkit.points import validate_points

from .augment import Augment

__all__ = ["PointDataset", "Sample", "collate", "crop", "pad_to", "random_crop"]


@dataclass
class Sample:
    """One image with its point annotations.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        points: ``(N, 2)`` float64 ``(x, y)`` pixel coordinates inside the image.
        classes: ``(N,)`` int64 class indices.
        key: an id of the image, unique in its dataset (the file stem, ``"test/3"``).
        path: the image file, when read from one.
        scores: ``(N,)`` float32 scores when the annotations carry them (a CSV ``score``
            column, GeoJSON ``measurements.score``), else None.

    Raises:
        ValueError: for a non-RGB image, points outside it or mismatched lengths.

    Examples:
        >>> s = Sample(np.zeros((4, 4, 3), np.uint8), [[1, 2]], [1], "a")
        >>> s.points.dtype.name, s.classes.tolist(), s.shape
        ('float64', [1], (4, 4))
    """

    image: np.ndarray
    points: np.ndarray
    classes: np.ndarray
    key: str
    path: str | None = None
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        where = f"sample {self.key!r}"
        self.image = check_image(self.image, where=where)
        self.points, self.classes = validate_points(
            self.points, self.classes, shape=self.image.shape[:2], where=where
        )
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            if len(self.scores) != len(self.points):
                raise ValueError(
                    f"{where}: {len(self.scores)} scores for {len(self.points)} points."
                )

    def __repr__(self) -> str:
        h, w = self.shape
        counts = np.bincount(self.classes).tolist() if len(self.classes) else []
        return (
            f"Sample(key={self.key!r}, image={h}x{w}, points={len(self.points)}, "
            f"per_class={counts}, path={self.path!r})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    def __len__(self) -> int:
        return len(self.points)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        values = tuple(int(s) for s in size)
        if len(values) != 2:
            raise ValueError(f"a crop size is an int or (height, width), got {size!r}.")
        h, w = values
    if h < 1 or w < 1:
        raise ValueError(f"a crop size must be positive, got {size!r}.")
    return h, w


def pad_to(
    image: np.ndarray,
    points: np.ndarray,
    size: int | Sequence[int],
    maps: np.ndarray | None = None,
    *,
    offset: tuple[int, int] | None = None,
    rng: np.random.Generator | int | None = None,
    value: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pad an image (and its maps) up to at least ``size``; the points move with it.

    The image is padded with the constant ``value`` (0, black) and the maps with 0 (no
    cell). Reflection padding is avoided on purpose: it would mirror cells that carry
    no annotation, which would train the model to miss them.

    Args:
        image: ``(H, W, 3)``.
        points: ``(N, 2)`` ``(x, y)``.
        size: the minimum ``(height, width)``; dimensions already large enough are kept.
        maps: optional ``(C, H, W)``.
        offset: ``(top, left)`` position of the image in the padded canvas; default
            random (from ``rng``), which adds translation.
        rng: generator or seed for the random offset.
        value: image pad value.

    Shapes:
        (H, W, 3) -> (max(H, h), max(W, w), 3); maps likewise; points (N, 2).

    Examples:
        >>> img, pts, _ = pad_to(np.ones((2, 2, 3), np.uint8),
        ...                      np.array([[0.0, 0.0]]), 4, offset=(1, 2))
        >>> img.shape, pts.tolist()
        ((4, 4, 3), [[2.0, 1.0]])
    """
    th, tw = _size2(size)
    h, w = image.shape[:2]
    ph, pw = max(th - h, 0), max(tw - w, 0)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if ph == 0 and pw == 0:
        return image, pts, maps
    if offset is None:
        gen = np.random.default_rng(rng)
        top, left = int(gen.integers(0, ph + 1)), int(gen.integers(0, pw + 1))
    else:
        top, left = int(offset[0]), int(offset[1])
        if not (0 <= top <= ph and 0 <= left <= pw):
            raise ValueError(f"pad offset {offset} is outside 0..{ph} x 0..{pw}.")
    out = np.full((h + ph, w + pw, *image.shape[2:]), value, dtype=image.dtype)
    out[top : top + h, left : left + w] = image
    out_maps = None
    if maps is not None:
        out_maps = np.zeros((maps.shape[0], h + ph, w + pw), dtype=maps.dtype)
        out_maps[:, top : top + h, left : left + w] = maps
    return out, pts + np.array([left, top], dtype=np.float64), out_maps


def crop(
    image: np.ndarray,
    points: np.ndarray,
    top: int,
    left: int,
    size: int | Sequence[int],
    maps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Cut a window out of the image and its maps, keeping the points inside it.

    A point is kept when its coordinates lie on the window's pixel centres' range,
    ``left <= x <= left + w - 1`` and ``top <= y <= top + h - 1``, so kept points always
    satisfy ``0 <= x <= w - 1`` in the crop, also after flips and rotations.

    Returns:
        ``(image, points, maps, keep)``: ``keep`` is the boolean ``(N,)`` mask of the
        input points that were kept (index classes and scores with it).

    Shapes:
        image (H, W, 3) -> (h, w, 3); maps (C, H, W) -> (C, h, w); points (N, 2) -> (K, 2).

    Examples:
        >>> img, pts, _, keep = crop(np.zeros((5, 5, 3), np.uint8),
        ...                          np.array([[1.0, 1.0], [4.0, 4.0]]), 0, 0, 3)
        >>> img.shape, pts.tolist(), keep.tolist()
        ((3, 3, 3), [[1.0, 1.0]], [True, False])
    """
    h, w = _size2(size)
    H, W = image.shape[:2]
    if not (0 <= top and top + h <= H and 0 <= left and left + w <= W):
        raise ValueError(
            f"crop window (top={top}, left={left}, {h}x{w}) does not fit the {H}x{W} image; "
            "pad the image first (pad_to)."
        )
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = pts[:, 0], pts[:, 1]
    keep = (x >= left) & (x <= left + w - 1) & (y >= top) & (y <= top + h - 1)
    out = np.ascontiguousarray(image[top : top + h, left : left + w])
    out_maps = None if maps is None else np.ascontiguousarray(maps[:, top : top + h, left : left + w])
    return out, pts[keep] - np.array([left, top], dtype=np.float64), out_maps, keep


def random_crop(
    image: np.ndarray,
    points: np.ndarray,
    size: int | Sequence[int],
    maps: np.ndarray | None = None,
    *,
    rng: np.random.Generator | int | None = None,
    cell_bias: float = 0.0,
    pad_value: int = 0,
    anchor: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """A random window of ``size``; images smaller than it are padded first ([`pad_to`][]).

    Args:
        image: ``(H, W, 3)``.
        points: ``(N, 2)`` ``(x, y)``.
        size: ``int`` or ``(height, width)``.
        maps: optional ``(C, H, W)`` cropped with the image.
        rng: generator or seed.
        cell_bias: probability of choosing a window that contains a random annotated
            point (useful when cells are sparse); otherwise the window is uniform.
        pad_value: image pad value.
        anchor: index of a point the window must contain (at a random place in it);
            overrides ``cell_bias``.

    Returns:
        ``(image, points, maps, keep)`` as [`crop`][].

    Examples:
        >>> img, pts, _, keep = random_crop(np.zeros((8, 8, 3), np.uint8),
        ...                                 np.array([[6.0, 6.0]]), 4, rng=0,
        ...                                 cell_bias=1.0)
        >>> img.shape, keep.tolist()
        ((4, 4, 3), [True])
    """
    gen = np.random.default_rng(rng)
    h, w = _size2(size)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    image, pts, maps = pad_to(image, pts, (h, w), maps, rng=gen, value=pad_value)
    H, W = image.shape[:2]
    top = left = None
    if anchor is not None and not 0 <= int(anchor) < n:
        raise ValueError(f"anchor {anchor} is not the index of one of the {n} points.")
    chosen = int(anchor) if anchor is not None else None
    if chosen is None and n and cell_bias > 0 and gen.random() < cell_bias:
        chosen = int(gen.integers(0, n))
    if chosen is not None:
        px, py = pts[chosen]
        # windows whose pixel-centre range [left, left + w - 1] contains px
        lo_x, hi_x = max(0, int(np.ceil(px)) - w + 1), min(W - w, int(np.floor(px)))
        lo_y, hi_y = max(0, int(np.ceil(py)) - h + 1), min(H - h, int(np.floor(py)))
        if lo_x <= hi_x and lo_y <= hi_y:
            top, left = int(gen.integers(lo_y, hi_y + 1)), int(gen.integers(lo_x, hi_x + 1))
    if top is None or left is None:
        top, left = int(gen.integers(0, H - h + 1)), int(gen.integers(0, W - w + 1))
    return crop(image, pts, top, left, (h, w), maps)


class PointDataset(Dataset):
    """Training items from point-annotated images, with targets built on the fly.

    Args:
        samples: the images and their annotations.
        targets: target name -> mask generator (see ``cellkit.masks``). Generators with
            ``per_image = True`` are called once on the full untransformed sample (with
            ``key=sample.key``; they cache themselves) and their maps are cropped,
            padded with 0, flipped and rotated with the image. The others are called
            after augmentation on the transformed points with the item's generator, so
            they change every epoch.
        num_classes: number of classes; every sample's classes must be below it.
        crop_size: ``int`` or ``(height, width)`` of random crops; None uses whole
            images (then batch only images of one size).
        augment: the augmentation, or None for none.
        seed: base seed of every item's generator.
        length: items per epoch (default ``len(samples)``); item ``i`` uses sample
            ``i % len(samples)``, so a longer epoch draws several crops per image.
        cell_bias: probability that a crop is placed to contain an annotated point.
        balance_classes: with ``cell_bias``, the point is drawn class first: a class
            uniformly among those annotated in ``samples``, then one of its cells anywhere
            in ``samples`` (the item's image is that cell's), so a rare class is seen as
            often as a common one. Otherwise a point of the item's own image.
        pad_value: image value used to pad images smaller than the crop.

    Items are dicts: ``image`` (3, h, w) float32 normalised (``image_to_tensor``),
    ``points`` (N, 2) float32 ``(x, y)``, ``classes`` (N,) int64, ``targets`` {name:
    (C, h, w) float32}, ``key`` str. Batch them with [`collate`][].

    Raises:
        ValueError: for no samples, a class >= ``num_classes``, a bad generator.

    Examples:
        >>> s = Sample(np.zeros((8, 8, 3), np.uint8), [[2.0, 3.0]], [1], "a")
        >>> ds = PointDataset([s], {}, num_classes=2, crop_size=4, seed=0)
        >>> item = ds[0]
        >>> tuple(item["image"].shape), item["key"]
        ((3, 4, 4), 'a')
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        targets: Mapping[str, Any] | None = None,
        num_classes: int = 2,
        crop_size: int | Sequence[int] | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        length: int | None = None,
        *,
        cell_bias: float = 0.0,
        balance_classes: bool = False,
        pad_value: int = 0,
    ) -> None:
        self.samples = list(samples)
        if not self.samples:
            raise ValueError("PointDataset needs at least one sample; the dataset is empty.")
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        self.num_classes = int(num_classes)
        for s in self.samples:
            if len(s.classes) and int(s.classes.max()) >= self.num_classes:
                raise ValueError(
                    f"sample {s.key!r} has class {int(s.classes.max())}, out of range for "
                    f"num_classes={self.num_classes}; map it with a ClassMap or raise num_classes."
                )
        self.targets = dict(targets or {})
        for name, gen in self.targets.items():
            if not callable(gen):
                raise ValueError(f"target {name!r} must be a mask generator (callable), got {gen!r}.")
        self.crop_size = None if crop_size is None else _size2(crop_size)
        self.augment = augment
        self.seed = int(seed)
        if length is not None and int(length) < 1:
            raise ValueError(f"length must be a positive int, got {length!r}.")
        self.length = len(self.samples) if length is None else int(length)
        if not 0.0 <= cell_bias <= 1.0:
            raise ValueError(f"cell_bias is a probability in [0, 1], got {cell_bias!r}.")
        self.cell_bias = float(cell_bias)
        self.balance_classes = bool(balance_classes)
        # class -> (M, 2) array of (sample index, point index), for class-balanced crops.
        self._cells: dict[int, np.ndarray] = {}
        if self.balance_classes:
            pairs: dict[int, list[np.ndarray]] = {}
            for si, s in enumerate(self.samples):
                for c in np.unique(s.classes):
                    idx = np.flatnonzero(s.classes == c)
                    pairs.setdefault(int(c), []).append(np.stack([np.full(len(idx), si), idx], axis=1))
            self._cells = {c: np.concatenate(v) for c, v in sorted(pairs.items())}
        self.pad_value = int(pad_value)
        # Shared memory: set_epoch in the main process reaches persistent workers too.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.length

    @property
    def epoch(self) -> int:
        """The current epoch (see [`set_epoch`][])."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; items of a new epoch get new crops, augmentation and masks."""
        self._epoch[0] = int(epoch)

    def _per_image(self, sample: Sample) -> tuple[np.ndarray | None, list[tuple[str, int]]]:
        parts, layout = [], []
        for name, gen in self.targets.items():
            if not getattr(gen, "per_image", False):
                continue
            m = gen(
                sample.points, sample.classes, shape=sample.shape, num_classes=self.num_classes,
                image=sample.image, rng=self.seed, key=sample.key,
            )
            m = self._check_map(name, m, sample.shape)
            parts.append(m)
            layout.append((name, m.shape[0]))
        return (np.concatenate(parts, axis=0) if parts else None), layout

    def _check_map(self, name: str, m: Any, shape: tuple[int, int]) -> np.ndarray:
        arr = np.asarray(m, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[1:] != tuple(shape):
            raise ValueError(
                f"target {name!r} returned shape {arr.shape}, expected (C, {shape[0]}, {shape[1]})."
            )
        return arr

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}.")
        index = index % self.length
        sample = self.samples[index % len(self.samples)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        anchor = None
        if self._cells and self.crop_size is not None and self.cell_bias > 0 and rng.random() < self.cell_bias:
            classes_present = list(self._cells)
            cells = self._cells[classes_present[int(rng.integers(0, len(classes_present)))]]
            si, anchor = (int(v) for v in cells[int(rng.integers(0, len(cells)))])
            sample = self.samples[si]
        maps, layout = self._per_image(sample)
        image = sample.image
        h, w = sample.shape
        # Float annotations in the last half pixel would leave the image after a flip.
        points = np.clip(sample.points, 0, [w - 1, h - 1])
        classes = sample.classes
        if self.augment is not None and getattr(self.augment, "scale_p", 0.0):
            image, points, maps = self.augment.rescale(image, points, maps, rng=rng)
        if self.crop_size is not None:
            image, points, maps, keep = random_crop(
                image, points, self.crop_size, maps, rng=rng,
                cell_bias=0.0 if self.balance_classes else self.cell_bias,
                pad_value=self.pad_value, anchor=anchor,
            )
            classes = classes[keep]
        if self.augment is not None:
            image, points, maps = self.augment(image, points, maps, rng=rng)
        shape = (int(image.shape[0]), int(image.shape[1]))
        targets: dict[str, torch.Tensor] = {}
        start = 0
        per_image = {}
        for name, channels in layout:
            per_image[name] = maps[start : start + channels]  # type: ignore[index]
            start += channels
        for name, gen in self.targets.items():
            if name in per_image:
                m = per_image[name]
            else:
                m = self._check_map(
                    name,
                    gen(points, classes, shape=shape, num_classes=self.num_classes, image=image, rng=rng),
                    shape,
                )
            targets[name] = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
        return {
            "image": image_to_tensor(image),
            "points": torch.from_numpy(np.asarray(points, dtype=np.float32).reshape(-1, 2)),
            "classes": torch.from_numpy(np.asarray(classes, dtype=np.int64).reshape(-1)),
            "targets": targets,
            "key": sample.key,
        }


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch [`PointDataset`][] items: stack images and targets, list the points.

    Returns:
        ``{"image": (B, 3, h, w), "targets": {name: (B, C, h, w)}, "points": [B x (N_i, 2)],
        "classes": [B x (N_i,)], "key": [B x str]}``.

    Raises:
        ValueError: when the images differ in size (set ``crop_size`` or use batch size 1).

    Examples:
        >>> item = {"image": torch.zeros(3, 2, 2), "points": torch.zeros(0, 2),
        ...         "classes": torch.zeros(0, dtype=torch.int64),
        ...         "targets": {}, "key": "a"}
        >>> tuple(collate([item, item])["image"].shape)
        (2, 3, 2, 2)
    """
    if not items:
        raise ValueError("collate needs at least one item.")
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(shapes)}; set crop_size on the "
            "dataset, or use batch_size=1."
        )
    names = list(items[0]["targets"])
    for it in items:
        if list(it["targets"]) != names:
            raise ValueError(f"items have different targets: {names} and {list(it['targets'])}.")
    return {
        "image": torch.stack([it["image"] for it in items]),
        "targets": {n: torch.stack([it["targets"][n] for it in items]) for n in names},
        "points": [it["points"] for it in items],
        "classes": [it["classes"] for it in items],
        "key": [it["key"] for it in items],
    }
