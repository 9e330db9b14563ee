"""Validation scores the maps cellkit predict makes, with one network pass per small image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellkit
from cellkit.data import PointDataset, Sample
from cellkit.engine.distributed import DistInfo
from cellkit.engine.loop import _StepContext
from cellkit.engine.predict import DEFAULT_TILE_SIZE, predict_probabilities
from cellkit.engine.validation import _fits_one_tile, _validation_pass


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return cellkit.build(cellkit.presets.ours(size="cpu"))


def _samples():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (72, 90, 3), dtype=np.uint8)
    # Wider than one tile: validation tiles it as cellkit predict does.
    wide = rng.integers(0, 256, (40, DEFAULT_TILE_SIZE + 60, 3), dtype=np.uint8)
    return [Sample(small, [[10.0, 12.0], [40.0, 50.0]], [0, 1], "small"),
            Sample(wide, [[300.0, 20.0]], [1], "wide")]


def test_one_tile_rule():
    assert _fits_one_tile(np.zeros((DEFAULT_TILE_SIZE, DEFAULT_TILE_SIZE, 3), np.uint8))
    assert not _fits_one_tile(np.zeros((DEFAULT_TILE_SIZE + 1, 8, 3), np.uint8))


def test_validation_maps_are_the_maps_of_predict(parts):
    samples = _samples()
    k = parts.config.model.num_classes
    val_ds = PointDataset(samples, targets=parts.targets, num_classes=k, crop_size=None, augment=None, seed=0)
    ctx = _StepContext(torch.device("cpu"), amp_dtype=None, channels_last=False)
    model = parts.model
    model.train()
    terms, maps = _validation_pass(model, val_ds, samples, parts.loss, ctx, DistInfo())
    assert model.training  # the mode is given back
    assert set(terms) == {"total", *parts.loss.labels} and all(np.isfinite(v) for v in terms.values())
    for sample, got in zip(samples, maps):
        want = predict_probabilities(model, sample.image, device="cpu")
        assert got.shape == want.shape == (k, *sample.image.shape[:2])
        np.testing.assert_allclose(got, want, atol=1e-5)
