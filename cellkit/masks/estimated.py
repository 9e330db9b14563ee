"""Masks estimated from the image: the EstimateMask baseline.

After Qu et al. 2019, "Weakly supervised deep nuclei segmentation using points
annotation in histopathology images" (MIDL): the Voronoi diagram of the points gives
each cell a region, and a k-means clustering of the pixels on colour and distance to
the nearest point (k = 3) separates cell pixels from the rest. A cell's estimated mask
is the part of the cell cluster inside its Voronoi cell, near its point and connected
to it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cellkit.masks.base import check_call, check_positive, point_pixels
from cellkit.registry import MASKS

__all__ = ["EstimatedMask", "kmeans"]


def kmeans(
    data: np.ndarray,
    k: int,
    rng: np.random.Generator | int | None = 0,
    *,
    max_iter: int = 30,
    sample_size: int | None = 20000,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding (`scipy.cluster.vq.kmeans2`), deterministic for a seed.

    The centres are fitted with ``max_iter`` Lloyd iterations on at most ``sample_size``
    rows drawn at random (all rows when None), then every row is assigned to its nearest
    centre. Empty clusters keep their previous centre, so constant data does not fail.

    Shapes:
        data ``(N, D)`` -> centres ``(k, D)`` float64, labels ``(N,)`` int64.

    Raises:
        ValueError: when ``data`` is not a non-empty 2-D array or ``k < 1``.

    Examples:
        >>> data = np.array([[0.0], [0.1], [5.0], [5.2]])
        >>> centres, labels = kmeans(data, 2, rng=0)
        >>> sorted(np.round(centres[:, 0], 2).tolist())
        [0.05, 5.1]
        >>> labels.tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
        True
    """
    from scipy.cluster.vq import kmeans2, vq

    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans: data must be a non-empty (N, D) array, got shape {x.shape}.")
    if int(k) < 1:
        raise ValueError(f"kmeans: k must be >= 1, got {k}.")
    gen = np.random.default_rng(rng)
    fit = x
    if sample_size is not None and len(x) > sample_size:
        fit = x[np.sort(gen.choice(len(x), size=int(sample_size), replace=False))]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # Data with fewer distinct rows than k: k-means++ divides 0 by 0 (and picks the
        # first row) and some clusters stay empty, keeping their centre (missing="warn").
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        centres, _ = kmeans2(fit, int(k), iter=int(max_iter), minit="++", missing="warn",
                             **{_kmeans2_rng_keyword(): gen})
    labels, _ = vq(x, centres, check_finite=False)
    return centres, labels.astype(np.int64)


@functools.cache
def _kmeans2_rng_keyword() -> str:
    # scipy >= 1.15 names the generator `rng`; older versions (cellkit allows 1.10) `seed`.
    from scipy.cluster.vq import kmeans2

    return "rng" if "rng" in inspect.signature(kmeans2).parameters else "seed"


@MASKS.register("estimated")
@dataclass
class EstimatedMask:
    """Cell masks estimated from the image colours and the points (per-class binary).

    Steps, deterministic for a given ``seed``:

    1. Voronoi: every pixel goes to its nearest point's own pixel (exact Euclidean
       distance transform; the sites are the points' own pixels).
    2. Clustering: k-means with ``num_clusters`` clusters on per-pixel features
       ``(R, G, B) / 255`` and ``min(d, distance_clip) / distance_clip``, with ``d`` the
       distance to the nearest point. The cluster holding most own pixels of a class's
       points is that class's cell cluster (Qu et al. have one class; per class, as
       brown positive and blue negative cells may fall into different clusters).
    3. A cell's mask: the pixels of the cell cluster inside its Voronoi cell, within
       ``max_radius`` of its point and 4-connected to its own pixel, which is always set.

    Cells of one class are a union in their channel; Voronoi cells do not overlap, so a
    pixel is set in at most one channel (except when points of different classes share
    an own pixel). ``per_image`` is True: the dataset calls it on the full image. Calls
    with a ``key`` are cached in memory (``cache=True``): a later call with the same key,
    points, classes and image returns the cached mask (a copy).

    Args:
        radius: the typical cell radius in pixels (> 0).
        max_radius: largest distance of a mask pixel from its point; default
            ``2.5 * radius``.
        num_clusters: k of the k-means (>= 2; Qu et al. use 3).
        distance_clip: distances beyond this count as far, in pixels (> 0).
        seed: seed of the k-means (the call's ``rng`` is not used, so the target does not
            change between epochs).
        sample_size: pixels used to fit the cluster centres (all are then assigned).
        cache: keep the masks of calls with a ``key`` in memory.

    Shapes:
        points ``(N, 2)`` ``(x, y)``, classes ``(N,)``, image ``(H, W, 3)`` uint8 ->
        ``(num_classes, H, W)`` float32.

    Raises:
        ValueError: for invalid parameters, and (on call) a missing or mismatched image,
            points outside the image, wrong shapes or classes >= ``num_classes``.

    Examples:
        >>> image = np.full((6, 10, 3), 230, np.uint8)
        >>> image[1:5, 1:4] = 60                      # a dark cell around (x=2, y=2)
        >>> image[2:5, 6:9] = 90                      # another around (x=7, y=3)
        >>> gen = EstimatedMask(radius=2)
        >>> mask = gen([[2, 2], [7, 3]], [1, 0], shape=(6, 10), num_classes=2,
        ...            image=image)
        >>> print(mask.astype(int))
        [[[0 0 0 0 0 0 0 0 0 0]
          [0 0 0 0 0 0 0 0 0 0]
          [0 0 0 0 0 0 1 1 1 0]
          [0 0 0 0 0 0 1 1 1 0]
          [0 0 0 0 0 0 1 1 1 0]
          [0 0 0 0 0 0 0 0 0 0]]
        <BLANKLINE>
         [[0 0 0 0 0 0 0 0 0 0]
          [0 1 1 1 0 0 0 0 0 0]
          [0 1 1 1 0 0 0 0 0 0]
          [0 1 1 1 0 0 0 0 0 0]
          [0 1 1 1 0 0 0 0 0 0]
          [0 0 0 0 0 0 0 0 0 0]]]
    """

    radius: float = 4.0
    max_radius: float | None = None
    num_clusters: int = 3
    distance_clip: float = 20.0
    seed: int = 0
    sample_size: int = 20000
    cache: bool = True

    #: Keyword arguments that scale with the cell diameter (as a multiple of it), set by
    #: ``cellkit.geometry.apply_geometry`` when the geometry comes from the points.
    geometry: ClassVar[dict[str, float]] = {"radius": 0.5}
    per_image: ClassVar[bool] = True
    _memory: dict[str, tuple[bytes, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        owner = "estimated mask"
        self.radius = check_positive("radius", self.radius, owner)
        if self.max_radius is None:
            self.max_radius = 2.5 * self.radius
        self.max_radius = check_positive("max_radius", self.max_radius, owner)
        self.distance_clip = check_positive("distance_clip", self.distance_clip, owner)
        if int(self.num_clusters) != self.num_clusters or self.num_clusters < 2:
            raise ValueError(f"{owner}: num_clusters must be an integer >= 2, got {self.num_clusters!r}.")
        self.num_clusters = int(self.num_clusters)
        if int(self.sample_size) != self.sample_size or self.sample_size < self.num_clusters:
            raise ValueError(
                f"{owner}: sample_size must be an integer >= num_clusters, got {self.sample_size!r}."
            )
        self.sample_size = int(self.sample_size)

    def channels(self, num_classes: int) -> int:
        """One channel per class."""
        return num_classes

    def __call__(
        self,
        points: Any,
        classes: Any,
        *,
        shape: tuple[int, int],
        num_classes: int,
        image: np.ndarray | None = None,
        rng: np.random.Generator | int | None = None,
        key: str | None = None,
    ) -> np.ndarray:
        """The estimated masks of one image (cached by ``key``; ``rng`` is not used)."""
        pts, cls, (h, w), img = check_call(
            points, classes, shape, num_classes, image, where="estimated mask", need_image=True
        )
        assert img is not None
        if key is None or not self.cache:
            return self._estimate(pts, cls, int(num_classes), img)
        digest = hashlib.blake2b(digest_size=16)
        for part in (pts, cls, np.asarray([h, w, int(num_classes)]), np.ascontiguousarray(img)):
            digest.update(part.tobytes())
        signature = digest.digest()
        cached = self._memory.get(key)
        if cached is None or cached[0] != signature:
            cached = (signature, self._estimate(pts, cls, int(num_classes), img))
            self._memory[key] = cached
        return cached[1].copy()

    def _estimate(self, pts: np.ndarray, cls: np.ndarray, c: int, img: np.ndarray) -> np.ndarray:
        from scipy import ndimage
        from skimage.measure import label

        h, w = img.shape[:2]
        if len(pts) == 0:
            return np.zeros((c, h, w), dtype=np.float32)
        own_r, own_c = point_pixels(pts, (h, w))
        sites = np.zeros((h, w), dtype=np.int64)
        sites[own_r, own_c] = np.arange(1, len(pts) + 1)  # shared own pixels: the last point
        dist, (near_r, near_c) = ndimage.distance_transform_edt(sites == 0, return_indices=True)
        voronoi = sites[near_r, near_c]

        features = np.concatenate(
            [
                img.reshape(-1, 3).astype(np.float64) / 255.0,
                (np.minimum(dist, self.distance_clip) / self.distance_clip).reshape(-1, 1),
            ],
            axis=1,
        )
        _, clusters = kmeans(features, self.num_clusters, rng=self.seed, sample_size=self.sample_size)
        clusters = clusters.reshape(h, w)
        # The cell cluster of each class: the one holding most of its points' own pixels.
        votes = np.zeros((c, self.num_clusters), dtype=np.int64)
        np.add.at(votes, (cls, clusters[own_r, own_c]), 1)
        cell_cluster = np.argmax(votes, axis=1)
        owner_class = cls[voronoi - 1]

        candidate = (clusters == cell_cluster[owner_class]) & (dist <= self.max_radius)
        candidate[own_r, own_c] = True
        # Labelling the Voronoi ids (not a binary mask) keeps every component inside one
        # Voronoi cell: neighbours with different ids are not connected.
        components = label(np.where(candidate, voronoi, 0), background=0, connectivity=1)
        table = np.zeros((int(components.max()) + 1, c), dtype=bool)
        table[components[own_r, own_c], cls] = True
        table[0] = False
        return np.ascontiguousarray(np.moveaxis(table[components], -1, 0), dtype=np.float32)
