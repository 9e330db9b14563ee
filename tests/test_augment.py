"""Augmentation, crops and the training dataset (cellkit.data.augment, cellkit.data.dataset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellkit.data import (
    Augment,
    PointDataset,
    Sample,
    brightness_contrast,
    collate,
    crop,
    flip,
    flip_points,
    hed_jitter,
    pad_to,
    random_crop,
    rot90,
    rot90_points,
)
from cellkit.imaging import IMAGENET_MEAN, IMAGENET_STD

FAST = settings(max_examples=25, deadline=None)


@st.composite
def marked_images(draw, max_side: int = 12, max_points: int = 6):
    """An image whose annotated pixels carry unique marker values (marker = 1 + point index)."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    cells = draw(st.lists(st.tuples(st.integers(0, w - 1), st.integers(0, h - 1)),
                          max_size=min(max_points, h * w), unique=True))
    image = np.zeros((h, w, 3), np.uint8)
    for i, (x, y) in enumerate(cells):
        image[y, x] = (i + 1, 255 - i, 7)
    points = np.asarray(cells, np.float64).reshape(-1, 2)
    return image, points


def marker_at(image: np.ndarray, point: np.ndarray) -> int:
    x, y = int(round(point[0])), int(round(point[1]))
    return int(image[y, x, 0])


def denormalise(tensor: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((tensor * std + mean) * 255).round().byte().permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- geometry


@FAST
@given(marked_images(), st.sampled_from([0, 1]))
def test_flipped_point_lands_on_its_pixel(data, axis):
    image, points = data
    out, moved, _ = flip(image, points, axis=axis)
    assert np.array_equal(out, np.flip(image, axis=axis))
    for i, p in enumerate(moved):
        assert marker_at(out, p) == i + 1


@FAST
@given(marked_images(), st.integers(-1, 5))
def test_rotated_point_lands_on_its_pixel(data, k):
    image, points = data
    out, moved, _ = rot90(image, points, k=k)
    assert np.array_equal(out, np.rot90(image, k=k))
    for i, p in enumerate(moved):
        assert marker_at(out, p) == i + 1


@FAST
@given(st.integers(1, 9), st.integers(1, 9),
       st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=5))
def test_float_points_inverse_transforms(h, w, unit):
    pts = np.asarray(unit, np.float64).reshape(-1, 2) * [w - 1, h - 1]
    for axis in (0, 1):
        np.testing.assert_allclose(flip_points(flip_points(pts, (h, w), axis), (h, w), axis), pts, atol=1e-12)
    np.testing.assert_allclose(rot90_points(rot90_points(pts, (h, w), 1), (w, h), 3), pts, atol=1e-12)
    rotated = rot90_points(pts, (h, w), 1)  # stays inside the (w, h) result
    assert np.all(rotated >= 0) and np.all(rotated[:, 0] <= h - 1) and np.all(rotated[:, 1] <= w - 1)


def test_flip_and_rot90_examples():
    assert flip_points([[0, 2]], (3, 4), axis=1).tolist() == [[3, 2]]
    assert flip_points([[0, 2]], (3, 4), axis=0).tolist() == [[0, 0]]
    assert rot90_points([[0, 2]], (3, 4), k=1).tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="axis must be 0"):
        flip_points([[0, 0]], (2, 2), axis=2)
    with pytest.raises(ValueError, match=r"maps must have shape \(C, H, W\)"):
        flip(np.zeros((2, 3, 3), np.uint8), [], 1, maps=np.zeros((1, 3, 2)))


@FAST
@given(marked_images(), st.integers(0, 2**32 - 1))
def test_augment_keeps_classes_and_moves_maps_with_image(data, seed):
    image, points = data
    classes = np.arange(len(points)) % 3
    maps = np.stack([image[:, :, 0], image[:, :, 1]]).astype(np.float32)
    aug = Augment(flip_p=0.5, rot90_p=0.7, keep_shape=False, hed_p=0.0, brightness_contrast_p=0.0)
    out, moved, out_maps = aug(image, points, maps, rng=seed)
    assert len(moved) == len(points)
    for i, p in enumerate(moved):  # the point's marker identifies it, so its class is kept
        assert marker_at(out, p) == i + 1 and classes[marker_at(out, p) - 1] == classes[i]
    assert np.array_equal(out_maps[0], out[:, :, 0]) and np.array_equal(out_maps[1], out[:, :, 1])


def test_augment_keep_shape_and_reproducible():
    image = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    aug = Augment(flip_p=0.5, rot90_p=1.0, keep_shape=True)
    for seed in range(10):
        assert aug(image, [[1.0, 2.0]], rng=seed)[0].shape == (6, 9, 3)
    a, b = aug(image, [[1.0, 2.0]], rng=5), aug(image, [[1.0, 2.0]], rng=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    out, pts, maps = Augment.none()(image, [[1.0, 2.0]], rng=0)
    assert np.array_equal(out, image) and pts.tolist() == [[1.0, 2.0]] and maps is None
    assert Augment(**aug.to_dict()) == aug
    with pytest.raises(ValueError, match=r"flip_p is a probability in \[0, 1\]"):
        Augment(flip_p=1.5)
    with pytest.raises(ValueError, match="hed_sigma must be >= 0"):
        Augment(hed_sigma=-0.1)


# --------------------------------------------------------------------------- colour


def test_hed_jitter():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(hed_jitter(image, 0, sigma=0.0, bias=0.0), image)
    a, b = hed_jitter(image, 1, sigma=0.2, bias=0.05), hed_jitter(image, 1, sigma=0.2, bias=0.05)
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == image.shape
    assert not np.array_equal(a, image)
    default = hed_jitter(image, 2)
    assert np.abs(default.astype(int) - image).mean() < 20  # a jitter, not a new image


def test_brightness_contrast():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(brightness_contrast(image, 0, brightness=0, contrast=0), image)
    out = brightness_contrast(image, 3, brightness=0.3, contrast=0.3)
    assert out.dtype == np.uint8 and not np.array_equal(out, image)


# --------------------------------------------------------------------------- crops


@FAST
@given(marked_images(max_side=14), st.integers(1, 10), st.integers(1, 10),
       st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1.0]))
def test_random_crop_never_returns_points_outside(data, ch, cw, seed, bias):
    image, points = data
    maps = image[:, :, :1].transpose(2, 0, 1).astype(np.float32)
    out, pts, out_maps, keep = random_crop(image, points, (ch, cw), maps, rng=seed, cell_bias=bias)
    h, w = out.shape[:2]
    assert h == max(ch, image.shape[0]) or h == ch
    assert (h, w) == (ch, cw)
    assert np.all(pts >= 0) and np.all(pts[:, 0] <= cw - 1) and np.all(pts[:, 1] <= ch - 1)
    assert len(pts) == int(keep.sum())
    kept_ids = np.flatnonzero(keep)
    for p, i in zip(pts, kept_ids):  # each kept point still sits on its own marker
        assert marker_at(out, p) == i + 1
    # every marker visible in the crop belongs to a kept point
    visible = set(np.unique(out[:, :, 0]).tolist()) - {0}
    assert visible == {int(i) + 1 for i in kept_ids}
    assert np.array_equal(out_maps[0], out[:, :, 0])


def test_pad_and_crop_examples():
    img, pts, maps = pad_to(np.ones((2, 3, 3), np.uint8), np.array([[2.0, 1.0]]), (4, 5),
                            np.ones((1, 2, 3), np.float32), offset=(1, 2))
    assert img.shape == (4, 5, 3) and pts.tolist() == [[4.0, 2.0]]
    assert img[0].max() == 0 and img[1:3, 2:5].min() == 1 and maps[0, 0, 0] == 0
    with pytest.raises(ValueError, match="does not fit"):
        crop(img, pts, 1, 1, 4)
    with pytest.raises(ValueError, match="pad offset"):
        pad_to(np.ones((2, 2, 3), np.uint8), np.zeros((0, 2)), 3, offset=(2, 0))


def test_cell_bias_crops_contain_a_cell():
    image = np.zeros((64, 64, 3), np.uint8)
    points = np.array([[60.0, 3.0]])
    hits = [len(random_crop(image, points, 8, rng=s, cell_bias=1.0)[1]) for s in range(20)]
    assert all(h == 1 for h in hits)


# --------------------------------------------------------------------------- dataset


class DotMask:
    """Dynamic target: 1 at each point's pixel of its class channel."""

    per_image = False

    def channels(self, num_classes: int) -> int:
        return num_classes

    def __call__(self, points, classes, *, shape, num_classes, image=None, rng=None, key=None):
        out = np.zeros((num_classes, *shape), np.float32)
        pts = np.asarray(points).reshape(-1, 2)
        assert np.all(pts >= 0) and np.all(pts[:, 0] <= shape[1] - 1) and np.all(pts[:, 1] <= shape[0] - 1)
        for (x, y), c in zip(pts, classes):
            out[c, int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] = 1.0
        return out


class NoiseMask:
    """Dynamic target drawn from the item's generator."""

    per_image = False

    def channels(self, num_classes: int) -> int:
        return 1

    def __call__(self, points, classes, *, shape, num_classes, image=None, rng=None, key=None):
        return np.random.default_rng(rng).random((1, *shape)).astype(np.float32)


class RedChannelMask:
    """Per-image target: the image's red channel; counts its calls per key."""

    per_image = True

    def __init__(self):
        self.calls: dict[str, int] = {}

    def channels(self, num_classes: int) -> int:
        return 1

    def __call__(self, points, classes, *, shape, num_classes, image=None, rng=None, key=None):
        assert image is not None and image.shape[:2] == tuple(shape)
        self.calls[key] = self.calls.get(key, 0) + 1
        return image[None, :, :, 0].astype(np.float32)


def make_samples(n: int = 3, size: tuple[int, int] = (20, 24)) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        h, w = size
        k = int(rng.integers(3, 12))
        pts = np.column_stack([rng.integers(0, w, k), rng.integers(0, h, k)]).astype(np.float64)
        pts = np.unique(pts, axis=0)
        cls = rng.integers(0, 2, len(pts))
        image = rng.integers(20, 256, (h, w, 3), dtype=np.uint8)
        image[:, :, 1] = 10  # marker channel: class + 1 at annotated pixels
        for (x, y), c in zip(pts.astype(int), cls):
            image[y, x, 1] = 100 + c
        samples.append(Sample(image, pts, cls, f"s{i}"))
    return samples


def test_point_dataset_items_are_consistent():
    prior = RedChannelMask()
    aug = Augment(flip_p=0.5, rot90_p=0.5, hed_p=0.0, brightness_contrast_p=0.0)
    ds = PointDataset(make_samples(), {"main": DotMask(), "prior": prior, "noise": NoiseMask()},
                      num_classes=2, crop_size=12, augment=aug, seed=1, length=12)
    assert len(ds) == 12
    for index in range(len(ds)):
        item = ds[index]
        assert item["image"].shape == (3, 12, 12) and item["image"].dtype == torch.float32
        assert item["points"].dtype == torch.float32 and item["classes"].dtype == torch.int64
        assert item["key"] == f"s{index % 3}"
        assert list(item["targets"]) == ["main", "prior", "noise"]
        image = denormalise(item["image"])
        for (x, y), c in zip(item["points"].numpy(), item["classes"].numpy()):
            assert image[int(y), int(x), 1] == 100 + c  # the point's class moved with the image
        main = item["targets"]["main"].numpy()
        assert main.sum() == len(item["points"])
        # the per-image map was cropped/flipped/rotated with the image
        assert np.array_equal(item["targets"]["prior"][0].numpy(), image[:, :, 0].astype(np.float32))
        marked = (image[:, :, 1] >= 100).sum()
        assert marked == len(item["points"])  # crops keep exactly the points inside them
    assert prior.calls == {"s0": 4, "s1": 4, "s2": 4}


def test_point_dataset_randomness_by_seed_epoch_index():
    ds = PointDataset(make_samples(1), {"noise": NoiseMask()}, num_classes=2, crop_size=8,
                      augment=Augment(), seed=7, length=2)
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["targets"]["noise"], b["targets"]["noise"])
    assert not torch.equal(ds[0]["targets"]["noise"], ds[1]["targets"]["noise"])
    ds.set_epoch(1)
    assert ds.epoch == 1
    assert not torch.equal(ds[0]["targets"]["noise"], a["targets"]["noise"])
    ds.set_epoch(0)
    assert torch.equal(ds[0]["targets"]["noise"], a["targets"]["noise"])


def test_point_dataset_pads_small_images_and_whole_images():
    small = make_samples(1, size=(5, 7))
    ds = PointDataset(small, {"main": DotMask()}, num_classes=2, crop_size=(9, 10))
    item = ds[0]
    assert item["image"].shape == (3, 9, 10)
    assert len(item["points"]) == len(small[0].points)
    whole = PointDataset(small, {"main": DotMask()}, num_classes=2)[0]
    assert whole["image"].shape == (3, 5, 7)
    assert torch.equal(whole["points"], torch.from_numpy(small[0].points.astype(np.float32)))


def test_float_point_in_last_half_pixel_stays_inside():
    s = Sample(np.zeros((4, 4, 3), np.uint8), [[3.7, 3.9]], [1], "f")
    ds = PointDataset([s], {"main": DotMask()}, num_classes=2,
                      augment=Augment(flip_p=1.0, rot90_p=0.0, hed_p=0.0, brightness_contrast_p=0.0))
    assert ds[0]["points"].tolist() == [[0.0, 0.0]]


def test_collate_batches_variable_points():
    ds = PointDataset(make_samples(), {"main": DotMask(), "prior": RedChannelMask()},
                      num_classes=2, crop_size=10)
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 10, 10)
    assert batch["targets"]["main"].shape == (3, 2, 10, 10)
    assert batch["targets"]["prior"].shape == (3, 1, 10, 10)
    assert len(batch["points"]) == 3 and batch["key"] == ["s0", "s1", "s2"]
    whole = PointDataset(make_samples(1) + make_samples(1, size=(8, 8)), {}, num_classes=2)
    with pytest.raises(ValueError, match="cannot batch images of different sizes"):
        collate([whole[0], whole[1]])


def test_dataloader_workers_see_set_epoch():
    ds = PointDataset(make_samples(2), {"noise": NoiseMask()}, num_classes=2, crop_size=8, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate,
                                         persistent_workers=True)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(next(iter(loader))["targets"]["noise"])
    assert not torch.equal(epochs[0], epochs[1])
    ds.set_epoch(1)
    assert torch.equal(collate([ds[0], ds[1]])["targets"]["noise"], epochs[1])


def test_point_dataset_errors():
    samples = make_samples(1)
    with pytest.raises(ValueError, match="out of range for num_classes=1"):
        PointDataset(samples, {}, num_classes=1)
    with pytest.raises(ValueError, match="at least one sample"):
        PointDataset([], {}, num_classes=2)
    with pytest.raises(IndexError):
        PointDataset(samples, {}, num_classes=2)[5]

    class Wrong(NoiseMask):
        def __call__(self, *a, shape, **k):
            return np.zeros((1, 2, 2), np.float32)

    with pytest.raises(ValueError, match=r"target 'bad' returned shape \(1, 2, 2\)"):
        PointDataset(samples, {"bad": Wrong()}, num_classes=2)[0]
