"""Tests of the mask generators (cellkit.masks).

The contract tests iterate over ``MASKS.names()``, so a newly registered generator is
tested by construction; a generator that needs construction arguments adds them to
``BUILD_KWARGS``.
"""

from __future__ import annotations

import doctest
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import shapely
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellkit.masks
from cellkit.imaging import image_to_tensor
from cellkit.masks import (
    CircleMask,
    EstimatedMask,
    GaussianMask,
    MaskGenerator,
    PriorMask,
    RandomPolygonMask,
    point_pixels,
)
from cellkit.registry import MASKS

try:
    from tests.strategies import Annotations, annotations, images, seeds
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from strategies import Annotations, annotations, images, seeds  # type: ignore[no-redef]

SETTINGS = settings(max_examples=25, deadline=None)


class TinyModel(torch.nn.Module):
    """A stand-in for a cellkit model: a 1x1 convolution with an ``infer`` method."""

    def __init__(self, num_classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, num_classes, kernel_size=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.infer(x)}

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """What the engine hands the prior: image -> (C, H, W) probabilities."""
        with torch.inference_mode():
            return torch.sigmoid(self.infer(image_to_tensor(image)[None]))[0].numpy()


# Construction arguments of generators that need some (default: none).
BUILD_KWARGS: dict[str, Callable[[], dict[str, Any]]] = {
    "prior": lambda: {"predictor": TinyModel(num_classes=2).probabilities},
}
# Generators whose target does not come from the points (an empty point set is no zero mask).
IMAGE_ONLY = {"prior"}
# Generators drawing shapes around points: own pixel set, bounded by max_radius.
SHAPE_GENERATORS: dict[str, Callable[..., Any]] = {
    "circle": lambda exclusive=False: CircleMask(radius=2.5, exclusive=exclusive),
    "random_polygon": lambda exclusive=False: RandomPolygonMask(base_radius=3.0, exclusive=exclusive),
}
# Fixed annotations of the contract tests (border points, repeated point, 3 classes).
SHAPE = (13, 17)
NUM_CLASSES = 3
POINTS = np.array([[0, 0], [16.9, 12.9], [8.2, 6.7], [8.2, 6.7], [3.0, 11.0], [15.5, 0.4]])
CLASSES = np.array([0, 1, 2, 1, 0, 2])


def build(name: str) -> Any:
    return MASKS.build(name, **BUILD_KWARGS.get(name, dict)())


def contract_image(shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def call(gen: Any, ann: Annotations, image: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
    if image is None:
        image = contract_image(ann.shape)
    return gen(ann.points, ann.classes, shape=ann.shape, num_classes=ann.num_classes, image=image, **kwargs)


def own_pixel_table(ann: Annotations) -> np.ndarray:
    """(C, H, W) bool: the own pixels of each class's points."""
    table = np.zeros((ann.num_classes, *ann.shape), dtype=bool)
    rows, cols = point_pixels(ann.points, ann.shape)
    table[ann.classes, rows, cols] = True
    return table


def distance_to_class(ann: Annotations) -> np.ndarray:
    """(C, H, W) distance from each pixel centre to the nearest point of each class (inf if none)."""
    h, w = ann.shape
    rows, cols = np.mgrid[0:h, 0:w]
    out = np.full((ann.num_classes, h, w), np.inf)
    for (x, y), c in zip(ann.points, ann.classes):
        out[c] = np.minimum(out[c], np.hypot(cols - x, rows - y))
    return out


# --------------------------------------------------------------------------- contract


def test_registered_names() -> None:
    assert {"circle", "random_polygon", "gaussian", "estimated", "prior"} <= set(MASKS.names())


@pytest.mark.parametrize("name", MASKS.names())
def test_contract_output(name: str) -> None:
    gen = build(name)
    assert isinstance(gen, MaskGenerator)
    assert isinstance(gen.per_image, bool)
    out = gen(POINTS, CLASSES, shape=SHAPE, num_classes=NUM_CLASSES, image=contract_image(), rng=0)
    assert out.shape == (gen.channels(NUM_CLASSES), *SHAPE)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert out.min() >= 0
    assert out.max() > 0


@pytest.mark.parametrize("name", MASKS.names())
def test_contract_same_rng_same_mask(name: str) -> None:
    gen = build(name)
    kwargs = dict(shape=SHAPE, num_classes=NUM_CLASSES, image=contract_image())
    first = gen(POINTS, CLASSES, rng=7, **kwargs)
    np.testing.assert_array_equal(first, gen(POINTS, CLASSES, rng=7, **kwargs))
    np.testing.assert_array_equal(
        gen(POINTS, CLASSES, rng=np.random.default_rng(3), **kwargs),
        gen(POINTS, CLASSES, rng=np.random.default_rng(3), **kwargs),
    )


@pytest.mark.parametrize("name", MASKS.names())
def test_contract_empty_annotations(name: str) -> None:
    gen = build(name)
    kwargs = dict(shape=SHAPE, num_classes=NUM_CLASSES, image=contract_image(), rng=0)
    for empty_points, empty_classes in [(np.zeros((0, 2)), np.zeros(0, np.int64)), ([], [])]:
        out = gen(empty_points, empty_classes, **kwargs)
        assert out.shape == (gen.channels(NUM_CLASSES), *SHAPE)
        assert out.dtype == np.float32
        if name in IMAGE_ONLY:
            np.testing.assert_array_equal(out, gen(POINTS, CLASSES, **kwargs))
        else:
            assert not out.any()


BAD_INPUTS = [
    pytest.param(dict(points=[[17.0, 3.0]], classes=[0]), "outside the 13x17", id="x-outside"),
    pytest.param(dict(points=[[3.0, -0.5]], classes=[0]), "outside the 13x17", id="y-outside"),
    pytest.param(dict(points=[[1.0, 2.0, 3.0]], classes=[0]), r"shape \(N, 2\)", id="points-shape"),
    pytest.param(
        dict(points=[[1.0, 2.0]], classes=[0, 1]), r"classes must have shape \(N,\)", id="classes-shape"
    ),
    pytest.param(dict(points=[[1.0, 2.0]], classes=[3]), "out of range for num_classes=3", id="class-range"),
    pytest.param(dict(points=[[1.0, 2.0]], classes=[-1]), "classes must be >= 0", id="negative-class"),
    pytest.param(dict(points=[[np.nan, 2.0]], classes=[0]), "finite", id="nan-point"),
    pytest.param(dict(shape=(13,)), r"shape must be \(H, W\)", id="bad-shape"),
    pytest.param(dict(shape=(0, 17)), r"shape must be \(H, W\)", id="empty-shape"),
    pytest.param(dict(num_classes=0), "num_classes must be a positive int", id="num-classes"),
    pytest.param(dict(image=np.zeros((12, 17, 3), np.uint8)), "image is 12x17", id="image-size"),
    pytest.param(dict(image=np.zeros((13, 17), np.uint8)), r"\(H, W, 3\)", id="image-grey"),
]


@pytest.mark.parametrize("name", MASKS.names())
@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_contract_bad_inputs(name: str, override: dict[str, Any], message: str) -> None:
    gen = build(name)
    kwargs: dict[str, Any] = dict(
        points=[[1.0, 2.0]], classes=[0], shape=SHAPE, num_classes=NUM_CLASSES, image=contract_image()
    )
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        gen(kwargs.pop("points"), kwargs.pop("classes"), **kwargs)


@pytest.mark.parametrize("name", MASKS.names())
@SETTINGS
@given(data=st.data())
def test_contract_any_annotations(name: str, data: st.DataObject) -> None:
    ann = data.draw(annotations(max_side=32))
    image = data.draw(images(ann.shape, ann.points))
    seed = data.draw(seeds())
    gen = build(name)
    out = call(gen, ann, image, rng=seed)
    assert out.shape == (gen.channels(ann.num_classes), *ann.shape)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= 0
    np.testing.assert_array_equal(out, call(gen, ann, image, rng=seed))


MASK_MODULES = ["base", "circle", "random_polygon", "gaussian", "estimated", "prior"]


@pytest.mark.parametrize(
    "module", [cellkit.masks, *(getattr(cellkit.masks, m) for m in MASK_MODULES)], ids=lambda m: m.__name__
)
def test_docstring_examples(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: CircleMask(radius=0), "radius must be a finite number > 0"),
        (lambda: RandomPolygonMask(min_scale=2.0, max_scale=1.0), "min_scale"),
        (lambda: RandomPolygonMask(jitter=1.0), "jitter must be in"),
        (lambda: RandomPolygonMask(min_vertices=2), "3 <= min_vertices"),
        (lambda: RandomPolygonMask(min_vertices=3, angle_jitter=0.6), "angle_jitter must be below"),
        (lambda: GaussianMask(sigma=-1), "sigma"),
        (lambda: EstimatedMask(num_clusters=1), "num_clusters"),
        (lambda: PriorMask(predictor=TinyModel().probabilities, class_index=-1), "class_index"),
        (lambda: PriorMask(predictor=lambda im: im, cache_dir="x"), "explicit fingerprint"),
    ],
)
def test_invalid_parameters(factory: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_registry_build_rejects_typos() -> None:
    with pytest.raises(TypeError, match="circle"):
        MASKS.build("circle", radios=3)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", sorted(SHAPE_GENERATORS))
@SETTINGS
@given(ann=annotations(), seed=seeds())
def test_own_pixel_always_set(name: str, ann: Annotations, seed: int) -> None:
    out = call(SHAPE_GENERATORS[name](), ann, rng=seed)
    assert np.all(out[own_pixel_table(ann)] == 1)


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("name", sorted(SHAPE_GENERATORS))
@SETTINGS
@given(ann=annotations(), seed=seeds())
def test_no_pixel_beyond_max_radius(name: str, exclusive: bool, ann: Annotations, seed: int) -> None:
    gen = SHAPE_GENERATORS[name](exclusive=exclusive)
    out = call(gen, ann, rng=seed)
    assert set(np.unique(out)) <= {0.0, 1.0}
    near = distance_to_class(ann) <= gen.max_radius + 1e-9
    assert np.all(near | own_pixel_table(ann) | (out == 0))


@pytest.mark.parametrize("name", sorted(SHAPE_GENERATORS))
@SETTINGS
@given(ann=annotations(min_points=1), seed=seeds())
def test_exclusive_gives_each_pixel_to_its_nearest_point(name: str, ann: Annotations, seed: int) -> None:
    out = call(SHAPE_GENERATORS[name](exclusive=True), ann, rng=seed)
    assert out.sum(axis=0).max() <= 1
    dist = distance_to_class(ann)
    nearest = dist.min(axis=0)
    set_c, set_r, set_col = np.nonzero(out)
    np.testing.assert_allclose(dist[set_c, set_r, set_col], nearest[set_r, set_col], rtol=1e-9, atol=1e-9)
    # Points far from every other point keep their own pixel.
    rows, cols = point_pixels(ann.points, ann.shape)
    for i, (x, y) in enumerate(ann.points):
        others = np.delete(ann.points, i, axis=0)
        if len(others) == 0 or np.hypot(*(others - [x, y]).T).min() > 3:
            assert out[ann.classes[i], rows[i], cols[i]] == 1


def test_exclusive_splits_touching_cells() -> None:
    points, classes = [[3.0, 3.0], [6.0, 3.0]], [0, 1]
    union = CircleMask(radius=3)(points, classes, shape=(7, 10), num_classes=2)
    split = CircleMask(radius=3, exclusive=True)(points, classes, shape=(7, 10), num_classes=2)
    assert (union.sum(axis=0) > 1).any()  # default: independent channels overlap
    assert split.sum(axis=0).max() == 1
    assert not split[0, :, 5:].any() and not split[1, :, :5].any()  # boundary between x=4 and x=5
    np.testing.assert_array_equal(split.sum(axis=0) > 0, union.sum(axis=0) > 0)


def test_overlapping_cells_of_one_class_are_a_union() -> None:
    out = CircleMask(radius=2)([[3, 3], [4, 3]], [0, 0], shape=(7, 8), num_classes=1)
    assert set(np.unique(out)) == {0.0, 1.0}
    single = CircleMask(radius=2)([[3, 3]], [0], shape=(7, 8), num_classes=1)
    assert np.all(out >= single)


def test_circle_is_a_disc() -> None:
    out = CircleMask(radius=4)([[10.0, 9.0]], [0], shape=(20, 22), num_classes=1)[0]
    rows, cols = np.mgrid[0:20, 0:22]
    np.testing.assert_array_equal(out == 1, (cols - 10.0) ** 2 + (rows - 9.0) ** 2 <= 16)


@SETTINGS
@given(ann=annotations(min_points=1, min_side=16, max_points=5), seed=seeds())
def test_random_polygon_changes_between_calls(ann: Annotations, seed: int) -> None:
    gen = RandomPolygonMask(base_radius=4.0)
    rng = np.random.default_rng(seed)
    masks = [call(gen, ann, rng=rng) for _ in range(4)]
    assert len({m.tobytes() for m in masks}) > 1


@SETTINGS
@given(ann=annotations(max_points=8), seed=seeds())
def test_random_polygon_matches_shapely(ann: Annotations, seed: int) -> None:
    gen = RandomPolygonMask(base_radius=3.0)
    out = call(gen, ann, rng=seed)
    polygons = gen.polygons(ann.points, rng=seed)
    h, w = ann.shape
    rows, cols = np.mgrid[0:h, 0:w]
    centres = shapely.points(cols.ravel(), rows.ravel())
    own = own_pixel_table(ann)
    for c in range(ann.num_classes):
        union = shapely.union_all([p for p, k in zip(polygons, ann.classes) if k == c])
        inside = shapely.contains_xy(union, cols.ravel(), rows.ravel()).reshape(h, w)
        on_or_inside = inside if union.is_empty else (shapely.distance(union, centres) <= 1e-6).reshape(h, w)
        assert np.all(out[c][inside] == 1)
        assert np.all(on_or_inside | own[c] | (out[c] == 0))


def test_random_polygon_draws_within_parameters() -> None:
    gen = RandomPolygonMask(base_radius=5.0, min_vertices=6, max_vertices=9, jitter=0.2)
    draw = gen.draw(500, rng=0)
    assert draw.num_vertices.min() >= 6 and draw.num_vertices.max() <= 9
    assert len(np.unique(draw.num_vertices)) == 4
    valid = np.isfinite(draw.angles)
    assert np.array_equal(valid.sum(axis=1), draw.num_vertices)
    radii = draw.radii[valid]
    assert radii.min() >= 5.0 * 0.6 * 0.8 - 1e-9 and radii.max() <= gen.max_radius
    for n, angles in zip(draw.num_vertices, draw.angles):
        assert np.all(np.diff(angles[:n]) > 0) and angles[n - 1] - angles[0] < 2 * np.pi
        gaps = np.diff(np.append(angles[:n], angles[0] + 2 * np.pi))
        assert gaps.max() < np.pi  # star-shaped around the point


# --------------------------------------------------------------------------- gaussian


@SETTINGS
@given(
    ann=annotations(),
    sigma=st.floats(min_value=0.05, max_value=6.0),
    scale=st.floats(min_value=0.1, max_value=100.0),
)
def test_gaussian_channels_count_the_points(ann: Annotations, sigma: float, scale: float) -> None:
    out = call(GaussianMask(sigma=sigma, scale=scale), ann)
    counts = np.bincount(ann.classes, minlength=ann.num_classes)
    np.testing.assert_allclose(out.sum(axis=(1, 2), dtype=np.float64), scale * counts, rtol=1e-5, atol=1e-4)


def test_gaussian_is_centred_on_the_point() -> None:
    out = GaussianMask(sigma=2.0)([[20.3, 18.6]], [0], shape=(41, 41), num_classes=1)[0].astype(np.float64)
    rows, cols = np.mgrid[0:41, 0:41]
    assert (out * cols).sum() == pytest.approx(20.3, abs=1e-4)
    assert (out * rows).sum() == pytest.approx(18.6, abs=1e-4)
    assert out[19, 20] == out.max()


# --------------------------------------------------------------------------- estimated


@SETTINGS
@given(data=st.data())
def test_estimated_sets_own_pixel_inside_its_voronoi_cell(data: st.DataObject) -> None:
    ann = data.draw(annotations(max_side=40))
    image = data.draw(images(ann.shape, ann.points))
    out = call(EstimatedMask(radius=3.0), ann, image)
    own = own_pixel_table(ann)
    assert np.all(out[own] == 1)
    if len(ann.points) == 0:
        return
    # Voronoi sites are the own pixels: a set pixel is nearest to a site of its class.
    rows, cols = point_pixels(ann.points, ann.shape)
    sites = Annotations(np.column_stack([cols, rows]).astype(float), ann.classes, ann.shape, ann.num_classes)
    dist = distance_to_class(sites)
    set_c, set_r, set_col = np.nonzero(out)
    np.testing.assert_allclose(dist[set_c, set_r, set_col], dist.min(axis=0)[set_r, set_col], atol=1e-9)
    assert np.all(dist[set_c, set_r, set_col] <= 2.5 * 3.0 + 1e-9)


def test_estimated_recovers_dark_cells() -> None:
    rng = np.random.default_rng(1)
    h, w = 48, 48
    image = rng.normal(225, 6, size=(h, w, 3))
    truth = np.zeros((2, h, w), dtype=bool)
    rows, cols = np.mgrid[0:h, 0:w]
    points = np.array([[8, 8], [24, 10], [40, 9], [10, 30], [26, 28], [40, 38], [16, 42]], dtype=float)
    classes = np.array([1, 1, 1, 0, 0, 0, 1])
    for (x, y), c in zip(points, classes):
        disc = (cols - x) ** 2 + (rows - y) ** 2 <= 4.0**2
        image[disc] = (110, 70, 40) if c == 1 else (60, 60, 140)  # brown and blue cells
        truth[c] |= disc
    image = np.clip(image, 0, 255).astype(np.uint8)
    out = EstimatedMask(radius=4.0)(points, classes, shape=(h, w), num_classes=2, image=image) > 0
    for c in range(2):
        iou = (out[c] & truth[c]).sum() / (out[c] | truth[c]).sum()
        assert iou > 0.7, (c, iou)


def test_estimated_needs_the_image_and_ignores_rng() -> None:
    gen = EstimatedMask()
    with pytest.raises(ValueError, match="pass image="):
        gen([[1, 1]], [0], shape=(5, 5), num_classes=1)
    image = contract_image((13, 17))
    np.testing.assert_array_equal(
        gen(POINTS, CLASSES, shape=SHAPE, num_classes=3, image=image, rng=1),
        gen(POINTS, CLASSES, shape=SHAPE, num_classes=3, image=image, rng=2),
    )


def test_estimated_caches_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = EstimatedMask()
    calls = []
    original = gen._estimate
    monkeypatch.setattr(gen, "_estimate", lambda *a: calls.append(1) or original(*a))
    image, kwargs = contract_image(), dict(shape=SHAPE, num_classes=3)
    first = gen(POINTS, CLASSES, image=image, key="a", **kwargs)
    first[:] = 7  # the caller's copy, not the cache
    second = gen(POINTS, CLASSES, image=image, key="a", **kwargs)
    assert len(calls) == 1 and second.max() == 1
    gen(POINTS[:2], CLASSES[:2], image=image, key="a", **kwargs)  # same key, other points
    gen(POINTS, CLASSES, image=image, key=None, **kwargs)
    assert len(calls) == 3


def test_kmeans_handles_constant_data() -> None:
    centres, labels = cellkit.masks.estimated.kmeans(np.ones((50, 4)), 3, rng=0)
    assert centres.shape == (3, 4) and np.all(np.isfinite(centres))
    assert labels.shape == (50,)


# --------------------------------------------------------------------------- prior


def prior_call(prior: PriorMask, image: np.ndarray, key: str | None) -> np.ndarray:
    return prior([], [], shape=image.shape[:2], num_classes=2, image=image, key=key)


def test_prior_is_the_class_channel_of_the_predictor() -> None:
    model = TinyModel()
    image = contract_image()
    out = PriorMask(predictor=model.probabilities, class_index=1)(POINTS, CLASSES, shape=SHAPE, num_classes=3,
                                                                  image=image)
    expected = torch.sigmoid(model.conv(image_to_tensor(image)[None]))[0, 1:2].detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out.shape == (1, *SHAPE) and out.dtype == np.float32


def test_prior_memory_cache_calls_the_model_once_per_key() -> None:
    model, image = TinyModel(), contract_image()
    prior = PriorMask(predictor=model.probabilities)
    first = prior_call(prior, image, key="a")
    first[:] = -1  # the caller's copy, not the cache
    second = prior_call(prior, image, key="a")
    assert model.calls == 1
    assert second.min() >= 0
    prior_call(prior, image, key=None)
    prior_call(prior, image, key=None)
    assert model.calls == 3  # no key, no caching


def test_prior_disk_cache_is_shared_by_fingerprint(tmp_path: Any) -> None:
    image = contract_image()
    writer = PriorMask(predictor=TinyModel(seed=0).probabilities, cache_dir=tmp_path, fingerprint="early-stop")
    written = prior_call(writer, image, key="slides/img 1")
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 1 and files[0].parts[0] == "early-stop" and files[0].suffix == ".npy"
    assert not list(tmp_path.rglob("*.tmp"))

    reader_model = TinyModel(seed=1)
    reader = PriorMask(predictor=reader_model.probabilities, cache_dir=tmp_path, fingerprint="early-stop")
    np.testing.assert_array_equal(prior_call(reader, image, key="slides/img 1"), written)
    assert reader_model.calls == 0

    other_model = TinyModel(seed=1)
    other = PriorMask(predictor=other_model.probabilities, cache_dir=tmp_path, fingerprint="another-model")
    recomputed = prior_call(other, image, key="slides/img 1")
    assert other_model.calls == 1
    assert not np.array_equal(recomputed, written)


def test_a_disk_cache_needs_a_fingerprint(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="explicit fingerprint"):
        PriorMask(predictor=TinyModel().probabilities, cache_dir=tmp_path)


def test_prior_recomputes_a_cached_entry_of_the_wrong_size(tmp_path: Any) -> None:
    model = TinyModel()
    prior = PriorMask(predictor=model.probabilities, cache_dir=tmp_path, fingerprint="fp", memory_cache=False)
    prior_call(prior, contract_image((5, 6)), key="k")
    with pytest.warns(UserWarning, match="recomputing"):
        out = prior_call(prior, contract_image(), key="k")
    assert out.shape == (1, *SHAPE) and model.calls == 2


def test_prior_without_a_model_says_what_is_needed() -> None:
    prior = MASKS.build("prior")
    with pytest.raises(ValueError, match="needs the pre-trained .*model.*prepare"):
        prior_call(prior, contract_image(), key="a")


def test_prior_uses_the_predictor() -> None:
    image = contract_image()
    probs = np.random.default_rng(0).uniform(size=(3, *SHAPE)).astype(np.float32)
    calls = []

    def predictor(img: np.ndarray) -> torch.Tensor:
        calls.append(img.shape)
        return torch.from_numpy(probs)

    prior = PriorMask(predictor=predictor, class_index=2, cache_dir=None)
    np.testing.assert_array_equal(prior_call(prior, image, key="x"), probs[2:3])
    prior_call(prior, image, key="x")
    assert calls == [image.shape]
    with pytest.raises(ValueError, match=r"predictor\(image\) has shape"):
        prior_call(PriorMask(predictor=lambda img: probs[:, :5]), image, key=None)


def test_prior_rejects_a_class_index_beyond_the_output() -> None:
    with pytest.raises(ValueError, match=r"class_index=4 but predictor\(image\)"):
        prior_call(PriorMask(predictor=TinyModel(num_classes=2).probabilities, class_index=4), contract_image(), key=None)


def test_prior_leaves_no_temporary_files(tmp_path: Any) -> None:
    prior = PriorMask(predictor=TinyModel().probabilities, cache_dir=tmp_path, fingerprint="fp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in ["a", "b", "../escape", ".hidden"]:
            prior_call(prior, contract_image(), key=key)
    names = sorted(p.name for p in (tmp_path / "fp").iterdir())
    assert len(names) == 4 and all(n.endswith(".npy") and not n.startswith(".") for n in names)
    assert [p for p in tmp_path.iterdir()] == [tmp_path / "fp"]



def test_prior_prepare_takes_the_stage1_model_and_fills_the_cache(tmp_path: Any) -> None:
    from cellkit.data import Sample
    from cellkit.masks.prepare import PrepareContext

    model, loads = TinyModel(), []

    def load_stage1():
        loads.append(1)
        return model.probabilities

    samples = [Sample(contract_image(), np.zeros((0, 2)), np.zeros(0, int), key=f"s{i}") for i in range(3)]
    context = PrepareContext(num_classes=2, cache_dir=tmp_path, is_main=True, fingerprint="ckpt-hash",
                             stage1=tmp_path / "last.pt", load_stage1=load_stage1)
    prior = MASKS.build("prior")
    assert type(prior).needs_stage1
    prior.prepare(samples, context)
    assert loads == [1] and model.calls == 3
    assert sorted(p.name for p in (tmp_path / "ckpt-hash").iterdir()) == ["s0.npy", "s1.npy", "s2.npy"]
    # Another process (not the main one) reads the cache the main one filled: no model call.
    other = MASKS.build("prior")
    other.prepare(samples, PrepareContext(num_classes=2, cache_dir=tmp_path, is_main=False,
                                          fingerprint="ckpt-hash", load_stage1=lambda: TinyModel(seed=3).probabilities))
    np.testing.assert_array_equal(prior_call(other, contract_image(), key="s1"),
                                  prior_call(prior, contract_image(), key="s1"))
    # Without a stage 1 the hook says what is missing.
    with pytest.raises(ValueError, match="no stage 1"):
        MASKS.build("prior").prepare(samples, PrepareContext(num_classes=2))
