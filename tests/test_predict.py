"""Tiled inference (cellkit.engine.predict): tiling is exact, cells on tile borders are found once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cellkit
from cellkit.engine.checkpoint import CheckpointError, save_checkpoint
from cellkit.engine.predict import (
    Predictor,
    blend_window,
    list_images,
    predict_image,
    predict_probabilities,
    tile_starts,
)
from cellkit.imaging import image_to_tensor
from cellkit.registry import POSTPROCESSORS


class PointwiseModel(nn.Module):
    """Logits that depend on each pixel alone: tiling is exact everywhere.

    Class 1 = dark pixels (a "cell"), class 0 = its complement, so a dark blob is one peak.
    """

    activation = "sigmoid"

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        darkness = -x.mean(dim=1, keepdim=True)  # normalised input: dark = high
        return torch.cat([-self.scale * darkness - 2.0, self.scale * darkness], dim=1)


class BlurModel(PointwiseModel):
    """A 5x5 box blur of the darkness: local, so tiles differ only near their own borders."""

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(super().infer(x), 5, stride=1, padding=2, count_include_pad=False)


def blob_image(height: int, width: int, centres: list[tuple[float, float]], sigma: float = 2.5) -> np.ndarray:
    """White background with dark Gaussian blobs at ``(x, y)`` centres."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dark = np.zeros((height, width))
    for cx, cy in centres:
        dark = np.maximum(dark, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)))
    grey = (235 - 200 * dark).round().astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def whole_image_probs(model: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model.infer(image_to_tensor(image)[None]))[0].numpy()


def tiny_config(**kwargs: object) -> cellkit.CellkitConfig:
    cfg = cellkit.presets.ours(size="cpu", **kwargs)
    cfg.model.encoder_kwargs["width_multiplier"] = 0.125
    cfg.model.decoder_kwargs.update(width=8, low_level_width=8)
    return cfg


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return cellkit.build_model(tiny_config()).eval()


# --------------------------------------------------------------------------- tiling


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 300), tile=st.integers(1, 64), data=st.data())
def test_tiles_cover_the_image_and_overlap(length: int, tile: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, tile - 1))
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert a + size - b >= overlap  # neighbours share at least `overlap` pixels


def test_blend_window_is_positive_and_flat_inside() -> None:
    w = blend_window(20, 30, 4)
    assert w.shape == (20, 30) and w.min() > 0
    assert np.all(w[4:-4, 4:-4] == 1.0)
    assert np.all(blend_window(5, 5, 0) == 1.0)


@pytest.mark.parametrize("tile, overlap", [(0, 0), (8, 8), (8, -1), (8, 9)])
def test_bad_tiling_arguments_are_clear(tile: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="tile_size|overlap"):
        predict_probabilities(PointwiseModel(), np.zeros((8, 8, 3), np.uint8), tile_size=tile, overlap=overlap)


def test_one_tile_equals_whole_image() -> None:
    model = PointwiseModel()
    image = blob_image(37, 53, [(20, 10)])
    probs = predict_probabilities(model, image, tile_size=64, overlap=16)
    assert probs.dtype == np.float32 and probs.shape == (2, 37, 53)
    np.testing.assert_allclose(probs, whole_image_probs(model, image), rtol=1e-6, atol=1e-6)
    # Blending sums in float64, so one tile gives back its map bit for bit.
    np.testing.assert_array_equal(probs, whole_image_probs(model, image))


def test_tiled_pointwise_model_is_exact_and_batch_size_free() -> None:
    model = PointwiseModel()
    image = blob_image(70, 90, [(30, 30), (60, 50)])
    whole = whole_image_probs(model, image)
    for batch_size in (1, 3, 64):
        tiled = predict_probabilities(model, image, tile_size=32, overlap=8, batch_size=batch_size)
        # Tiles that agree blend back to exactly their value (float64 sums): no ripples
        # that could split a flat or saturated region into several peaks.
        np.testing.assert_array_equal(tiled, whole)


def test_tiled_local_model_matches_away_from_tile_borders() -> None:
    model = BlurModel()
    image = blob_image(64, 96, [(20, 20), (50, 40), (80, 30)])
    whole = whole_image_probs(model, image)
    tiled = predict_probabilities(model, image, tile_size=40, overlap=16)
    # Tile-border errors only reach 2 px into a tile, where its blend weight is <= 3/17.
    assert np.abs(tiled - whole).max() < 0.05
    # Tiles of 40 step by 24 on x: 0-40, 24-64, 56-96; on y: 0-40, 24-64. The middles of
    # the overlaps are pixels more than 2 px from every tile's inner border: exact there.
    np.testing.assert_allclose(tiled[:, 10:20, 40:50], whole[:, 10:20, 40:50], atol=1e-6)


def test_image_smaller_than_tile_in_one_axis() -> None:
    model = PointwiseModel()
    image = blob_image(12, 100, [(50, 6)])
    tiled = predict_probabilities(model, image, tile_size=32, overlap=4)
    np.testing.assert_array_equal(tiled, whole_image_probs(model, image))


@pytest.mark.parametrize("x_cell", [23.0, 24.0, 28.5, 31.0, 32.0])
def test_cell_across_a_tile_border_is_found_once(x_cell: float) -> None:
    # tile_size 32, overlap 8: tiles start at x = 0, 24, 48; the cell straddles a border.
    model = PointwiseModel()
    image = blob_image(40, 80, [(x_cell, 20.0)])
    post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
    det, probs = predict_image(model, image, post, tile_size=32, overlap=8, batch_size=2)
    ones = det.points[det.classes == 1]
    assert len(ones) == 1
    assert abs(ones[0, 0] - x_cell) <= 0.5 and ones[0, 1] == 20
    whole = post(whole_image_probs(model, image))
    np.testing.assert_array_equal(det.points, whole.points)
    np.testing.assert_array_equal(det.classes, whole.classes)


def test_real_model_one_tile_and_tiles(tiny_model: nn.Module) -> None:
    image = blob_image(48, 80, [(20, 20), (60, 30)])
    one = predict_probabilities(tiny_model, image, tile_size=128, overlap=16)
    np.testing.assert_allclose(one, whole_image_probs(tiny_model, image), rtol=1e-4, atol=1e-5)
    tiled = predict_probabilities(tiny_model, image, tile_size=32, overlap=8, batch_size=4)
    assert tiled.shape == (2, 48, 80) and np.isfinite(tiled).all()
    assert tiled.min() >= 0 and tiled.max() <= 1
    assert not tiny_model.training


def test_model_mode_is_restored() -> None:
    model = PointwiseModel().train()
    predict_probabilities(model, np.zeros((8, 8, 3), np.uint8))
    assert model.training


def test_bad_image_is_clear() -> None:
    with pytest.raises(ValueError, match="uint8"):
        predict_probabilities(PointwiseModel(), np.zeros((8, 8, 3), np.float32))


# --------------------------------------------------------------------------- files and checkpoints


def test_list_images(tmp_path) -> None:
    from PIL import Image

    for name in ("b.png", "a.JPG", "c.tif"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images([tmp_path])] == ["a.JPG", "b.png", "c.tif"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list_images([tmp_path / "missing.png"])
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images([other])
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(other / "b.png")
    with pytest.raises(ValueError, match="share the name 'b'"):
        list_images([tmp_path, other])


def _save(tmp_path, cfg: cellkit.CellkitConfig, model: nn.Module, name: str = "best.pt"):
    return save_checkpoint(
        tmp_path / name,
        {"config": cfg.to_dict(), "model": model.state_dict(), "class_names": ["other", "positive"]},
    )


def test_predictor_from_checkpoint(tmp_path, tiny_model: nn.Module) -> None:
    path = _save(tmp_path, tiny_config(), tiny_model)
    predictor = Predictor.from_checkpoint(path, device="cpu", threshold=[0.4, 0.6], min_distance=2,
                                          tile_size=32, overlap=8)
    assert predictor.num_classes == 2 and predictor.class_names == ["other", "positive"]
    assert list(predictor.postprocess.threshold) == [0.4, 0.6] and predictor.postprocess.min_distance == 2
    image = blob_image(40, 70, [(20, 20)])
    det, probs = predictor.predict_with_probabilities(image)
    assert probs.shape == (2, 40, 70)
    expected = predictor.postprocess(predict_probabilities(tiny_model, image, 32, 8))
    np.testing.assert_array_equal(det.points, expected.points)
    # A run folder works too, and folders of images are predicted image by image.
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "img.png")
    found = {p.stem: det for p, _, det in
             Predictor.from_checkpoint(tmp_path, device="cpu").predict_paths([tmp_path], progress=False)}
    assert list(found) == ["img"]


def test_threshold_of_wrong_length(tmp_path, tiny_model: nn.Module) -> None:
    path = _save(tmp_path, tiny_config(), tiny_model)
    with pytest.raises(ValueError, match="one per class"):
        Predictor.from_checkpoint(path, device="cpu", threshold=[0.1, 0.2, 0.3])


def test_checkpoint_whose_config_differs_from_its_weights(tmp_path, tiny_model: nn.Module) -> None:
    cfg = tiny_config()
    cfg.model.decoder_kwargs["width"] = 16  # the weights were trained with width 8
    path = _save(tmp_path, cfg, tiny_model)
    with pytest.raises(CheckpointError, match="do not match.*shape mismatches"):
        Predictor.from_checkpoint(path, device="cpu")
    cfg = tiny_config(num_classes=3)
    path = _save(tmp_path, cfg, tiny_model, "three.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        Predictor.from_checkpoint(path, device="cpu")


def test_checkpoint_whose_config_does_not_build(tmp_path, tiny_model: nn.Module) -> None:
    data = tiny_config().to_dict()
    data["model"]["encoder"] = "resnet19"
    path = save_checkpoint(tmp_path / "bad.pt", {"config": data, "model": tiny_model.state_dict()})
    with pytest.raises(CheckpointError, match="(?s)does not build.*resnet19.*resnet18"):
        Predictor.from_checkpoint(path, device="cpu")


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="best.pt"):
        Predictor.from_checkpoint(tmp_path / "nothing.pt", device="cpu")
