"""Fast inference, checked on the CPU: BatchNorm folding, bf16 autocast, uint8 upload, the torch blender.

The GPU runs of the same code paths are in ``tests/test_cuda.py``. Tolerances, measured on
the CPU (torch 2.13, oneDNN):

* folding: the folded model's logits differ from the original's by about 1e-5 (float32
  rounding of ``w * g / sqrt(var + eps)`` against BatchNorm's own sequence of operations),
  probabilities by about 1e-6; the tests allow 1e-4.
* bf16: a random model with calibrated BatchNorm (probabilities in 0.25-0.65) differs from
  float32 by at most 0.0065 (mean 0.0012); scaled to probabilities spanning 0-1 (logits to
  +-10, so bfloat16's 8-bit mantissa costs more), by at most 0.054 (mean 0.006) over six
  seeds. The tests allow 0.02 and 0.1 (means 0.005 and 0.015). On maps shaped like a
  trained model's (one smooth bump per cell) the peaks are the same points.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import cellkit
from cellkit.engine import predict as predict_module
from cellkit.engine.inference import PRECISIONS, InferenceModel, resolve_precision, tiles_to_tensor
from cellkit.engine.predict import (
    Predictor,
    _RowBandBlender,
    blend_window,
    predict_image,
    predict_probabilities,
)
from cellkit.imaging import image_to_tensor
from cellkit.models.fuse import fold_batchnorm, remaining_batchnorm
from cellkit.registry import POSTPROCESSORS

# ----------------------------------------------------------------------------- helpers


def randomise_batchnorm(model: nn.Module, seed: int = 0, passes: int = 3, size: int = 64) -> nn.Module:
    """Random BatchNorm scales and shifts, and running statistics from training-mode passes."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: the statistics of the passes below
            m.reset_running_stats()
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(2, 3, size, size, generator=gen))
    return model.eval()


def calibrated_model(seed: int = 0) -> nn.Module:
    """The ``cpu``-size ``ours`` model with BatchNorm statistics of real-looking tiles."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import model_bench

    torch.manual_seed(seed)
    model = cellkit.build_model(cellkit.presets.ours(size="cpu"))
    image = noise_image(seed)
    tiles = torch.stack([image_to_tensor(image[:64, :64]), image_to_tensor(image[-64:, -64:])])
    model_bench.calibrate_batchnorm(model, tiles)
    return model.eval()


def noise_image(seed: int = 0, height: int = 70, width: int = 93) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def blob_image(height: int, width: int, centres: list[tuple[int, int]], sigma: float = 2.5) -> np.ndarray:
    """White background with dark Gaussian blobs at ``(x, y)`` centres."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dark = np.zeros((height, width))
    for cx, cy in centres:
        dark = np.maximum(dark, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)))
    grey = (235 - 200 * dark).round().astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


class ConvBlobModel(nn.Module):
    """A conv-BN-ReLU-conv model whose maps look trained: one smooth bump per dark blob.

    Its convolutions run in bfloat16 under autocast, as a real model's do, and its
    BatchNorm (with set statistics) is folded by ``fold_batchnorm``.
    """

    activation = "sigmoid"

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 2, 7, padding=3, bias=False), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1)
        )
        r = torch.arange(-3, 4, dtype=torch.float32)
        blur = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2))
        blur = blur / blur.sum() / 3
        with torch.no_grad():
            # Channel 0 = darkness (a cell), channel 1 = brightness (background), blurred.
            self.net[0].weight.copy_(torch.stack([-blur.expand(3, 7, 7), blur.expand(3, 7, 7)]))
            bn = self.net[1]
            bn.running_mean.copy_(torch.tensor([-1.0, 1.0]))
            bn.running_var.copy_(torch.tensor([0.8, 1.2]))
            bn.weight.copy_(torch.tensor([1.2, 0.9]))
            bn.bias.copy_(torch.tensor([0.1, -0.1]))
            # Class 1 ("positive") follows the darkness; class 0 only a weak copy of it.
            self.net[3].weight.copy_(torch.tensor([[1.0, -0.5], [2.5, -0.5]]).view(2, 2, 1, 1))
            self.net[3].bias.copy_(torch.tensor([-3.0, -2.0]))
        self.eval()

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CELLS = [(10, 12), (31, 20), (52, 9), (75, 40), (24, 55), (60, 60), (85, 24), (45, 38)]


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize("preset", ["ours", "ours_plus_plus"])
def test_folded_model_infers_the_same_and_has_no_batchnorm(preset: str) -> None:
    torch.manual_seed(0)
    model = randomise_batchnorm(cellkit.build_model(cellkit.presets.get_preset(preset, size="cpu")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    folded = fold_batchnorm(model)
    assert model.training, "the original keeps its mode"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the original is unchanged"
    assert remaining_batchnorm(model) and remaining_batchnorm(folded) == []
    assert not folded.training
    gen = torch.Generator().manual_seed(1)
    for shape in ((1, 3, 37, 53), (2, 3, 65, 31)):
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            expected = model.eval().infer(x)
            got = folded.infer(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_fold_keeps_what_it_cannot_fold() -> None:
    class Reordered(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # BN before conv: not a foldable pair
            return self[0](self[1](x))

    class Declared(nn.Module):
        conv_bn_pairs = (("conv", "norm"),)

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x))

    model = nn.Sequential(
        Reordered(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)),
        Declared(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)),  # not adjacent
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    folded = fold_batchnorm(model)
    assert remaining_batchnorm(folded) == ["0.1", "1.1", "3.2"]  # Declared's norm is folded
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-5)


def test_fold_keeps_channels_last_and_rejects_non_modules() -> None:
    model = cellkit.build_model(cellkit.presets.ours(size="cpu")).to(memory_format=torch.channels_last)
    folded = fold_batchnorm(model)
    assert folded.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm(object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- uint8 upload


def test_tiles_to_tensor_equals_image_to_tensor() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(3, 17, 23, 3), dtype=np.uint8)
    expected = torch.stack([image_to_tensor(t) for t in tiles])
    got = tiles_to_tensor(tiles)
    assert got.dtype == torch.float32 and got.shape == (3, 3, 17, 23) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got, expected)  # on the CPU: the same operations, the same numbers
    last = tiles_to_tensor(torch.from_numpy(tiles), "cpu", memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, expected)
    read_only = tiles.copy()
    read_only.flags.writeable = False
    assert torch.equal(tiles_to_tensor(read_only), expected)


@pytest.mark.parametrize("bad", [np.zeros((4, 5, 3), np.uint8), np.zeros((1, 4, 5, 3), np.float32), [1, 2]])
def test_tiles_to_tensor_rejects_other_inputs(bad: object) -> None:
    with pytest.raises(ValueError, match=r"\(B, h, w, 3\) uint8"):
        tiles_to_tensor(bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- precision


def test_precision_choices() -> None:
    from cellkit.models.quantize import int8_available

    assert PRECISIONS == ("fp32", "bf16", "fp16", "int8", "auto")
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision(None, "cpu", amp=True) == "fp32"  # amp is ignored on the CPU, as before
    assert resolve_precision("auto", "cpu") == ("int8" if int8_available() else "fp32")
    assert resolve_precision("INT8", "cpu") == "int8"
    assert resolve_precision(" BF16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"


@pytest.mark.parametrize("bad", ["fp8", "float16", "", 16])
def test_bad_precision_names_the_choices(bad: object) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="precision.*fp32, bf16, fp16, int8, auto"):
        predict_probabilities(ConvBlobModel(), image, precision=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp32, bf16, fp16, int8, auto"):
        Predictor(ConvBlobModel(), POSTPROCESSORS.build("peaks"), 2, precision=bad)  # type: ignore[arg-type]


def test_fp16_on_the_cpu_and_amp_with_another_precision_are_errors() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="needs a GPU.*'bf16'"):
        predict_probabilities(ConvBlobModel(), image, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="amp=True.*disagree"):
        predict_probabilities(ConvBlobModel(), image, amp=True, precision="bf16")


def test_fold_bn_matches_fp32() -> None:
    model = calibrated_model()
    image = noise_image()
    reference = predict_probabilities(model, image, tile_size=32, overlap=8)
    folded = predict_probabilities(model, image, tile_size=32, overlap=8, fold_bn=True)
    assert folded.shape == (2, 70, 93) and folded.dtype == np.float32
    np.testing.assert_allclose(folded, reference, rtol=0, atol=1e-4)
    assert remaining_batchnorm(model), "predict_probabilities folds a copy, not the model"


def test_bf16_on_the_cpu_is_close_to_fp32() -> None:
    model = calibrated_model()
    image = noise_image()
    reference = predict_probabilities(model, image, tile_size=32, overlap=8)
    for fold_bn in (False, True):
        low = predict_probabilities(model, image, tile_size=32, overlap=8, precision="bf16", fold_bn=fold_bn)
        assert low.dtype == np.float32 and np.isfinite(low).all()
        diff = np.abs(low - reference)
        assert diff.max() < 0.02 and diff.mean() < 0.005, (diff.max(), diff.mean())
        assert diff.max() > 0, "bf16 autocast did not run"
    # Probabilities spanning 0-1 (logits to +-10) lose more to bfloat16's 8-bit mantissa.
    with torch.no_grad():
        model.decoders["main"].classifier.weight.mul_(8)
    reference = predict_probabilities(model, image, tile_size=32, overlap=8)
    assert reference.min() < 0.01 and reference.max() > 0.99
    diff = np.abs(predict_probabilities(model, image, tile_size=32, overlap=8, precision="bf16") - reference)
    assert diff.max() < 0.1 and diff.mean() < 0.015, (diff.max(), diff.mean())


def test_bf16_finds_the_same_cells_on_trained_looking_maps() -> None:
    model = ConvBlobModel()
    image = blob_image(70, 93, CELLS)
    post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
    det32, maps32 = predict_image(model, image, post, tile_size=32, overlap=8)
    assert sorted(map(tuple, det32.points[det32.classes == 1].tolist())) == sorted(
        (float(x), float(y)) for x, y in CELLS
    )
    for fold_bn in (False, True):
        det16, maps16 = predict_image(model, image, post, tile_size=32, overlap=8, precision="bf16",
                                      fold_bn=fold_bn)
        assert 0 < np.abs(maps16 - maps32).max() < 0.05
        np.testing.assert_array_equal(det16.points, det32.points)
        np.testing.assert_array_equal(det16.classes, det32.classes)


# ----------------------------------------------------------------------------- blending on the device


def test_blender_equals_a_whole_image_weighted_average() -> None:
    """The row-band blender gives the full-size weighted average of the tiles (float64: bit for bit)."""
    rng = np.random.default_rng(0)
    channels, height, width, tile, overlap = 3, 70, 93, 32, 8
    starts_y = predict_module.tile_starts(height, tile, overlap)
    starts_x = predict_module.tile_starts(width, tile, overlap)
    window = blend_window(tile, tile, overlap)
    tiles = {(y, x): rng.random((channels, tile, tile), dtype=np.float32) for y in starts_y for x in starts_x}
    total = np.zeros((channels, height, width))
    weight = np.zeros((height, width))
    exact = _RowBandBlender(channels, height, width, window, "cpu", torch.float64)
    single = _RowBandBlender(channels, height, width, window, "cpu", torch.float32)
    for (y, x), probs in tiles.items():
        total[:, y : y + tile, x : x + tile] += probs * window.astype(np.float64)
        weight[y : y + tile, x : x + tile] += window
        exact.add(y, x, torch.from_numpy(probs))
        single.add(y, x, torch.from_numpy(probs))
    expected = (total / weight).astype(np.float32)
    got64, got32 = exact.finish(), single.finish()
    assert got64.dtype == got32.dtype == torch.float32 and tuple(got64.shape) == (channels, height, width)
    np.testing.assert_array_equal(got64.numpy(), expected)
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match="row-major"):
        exact.add(0, 0, torch.from_numpy(tiles[(0, 0)]))  # back to a band already written out


def test_blender_with_skipped_tiles_averages_the_kept_ones_and_leaves_the_rest_zero() -> None:
    """Tiles left out (whole rows of them too) add nothing; pixels no tile covers are 0."""
    rng = np.random.default_rng(1)
    channels, height, width, tile, overlap = 2, 90, 93, 32, 8
    starts = [(y, x) for y in predict_module.tile_starts(height, tile, overlap)
              for x in predict_module.tile_starts(width, tile, overlap)]
    kept = [(y, x) for y, x in starts if (y, x) != starts[0] and y != starts[len(starts) // 2][0]]
    assert len({y for y, _ in starts}) - len({y for y, _ in kept}) == 1  # a whole tile row skipped
    window = blend_window(tile, tile, overlap)
    total, weight = np.zeros((channels, height, width)), np.zeros((height, width))
    blender = _RowBandBlender(channels, height, width, window, "cpu", torch.float64)
    for y, x in kept:
        probs = rng.random((channels, tile, tile), dtype=np.float32)
        total[:, y : y + tile, x : x + tile] += probs * window.astype(np.float64)
        weight[y : y + tile, x : x + tile] += window
        blender.add(y, x, torch.from_numpy(probs))
    with np.errstate(invalid="ignore"):
        expected = np.where(weight > 0, total / weight, 0.0).astype(np.float32)
    got = blender.finish().numpy()
    assert (weight == 0).any() and np.isfinite(got).all()
    np.testing.assert_array_equal(got, expected)


class CountingModel(nn.Module):
    """``ConvBlobModel`` that counts the tiles it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ConvBlobModel()
        self.tiles = 0

    @property
    def num_classes(self) -> int:
        return 2

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles += x.shape[0]
        return self.inner.infer(x)


def test_tile_filter_runs_only_the_tiles_it_keeps() -> None:
    image = blob_image(70, 93, CELLS)
    model = CountingModel()
    full = predict_probabilities(model, image, tile_size=32, overlap=8, batch_size=3)
    n_tiles = model.tiles
    model.tiles = 0
    same = predict_probabilities(model, image, tile_size=32, overlap=8, batch_size=3,
                                 tile_filter=lambda y, x, h, w: True)
    np.testing.assert_array_equal(same, full)
    model.tiles = 0
    seen: list[tuple[int, int, int, int]] = []

    def left(y: int, x: int, h: int, w: int) -> bool:
        seen.append((y, x, h, w))
        return x == 0

    maps = predict_probabilities(model, image, tile_size=32, overlap=8, batch_size=3, tile_filter=left)
    assert len(seen) == n_tiles and all(h == w == 32 for _, _, h, w in seen)
    assert 0 < model.tiles == sum(x == 0 for _, x, _, _ in seen) < n_tiles
    assert (maps[:, :, 32:] == 0).all()  # no kept tile reaches past column 32
    # Where only the kept tiles reached and no skipped tile did, the maps are unchanged.
    second_x = min(x for _, x, _, _ in seen if x > 0)
    np.testing.assert_allclose(maps[:, :, :second_x], full[:, :, :second_x], rtol=0, atol=1e-6)
    model.tiles = 0
    nothing = predict_probabilities(model, image, tile_size=32, overlap=8, tile_filter=lambda *a: False)
    assert model.tiles == 0 and nothing.shape == (2, 70, 93) and not nothing.any()


def test_as_tensor_gives_a_normal_tensor_of_the_same_map() -> None:
    model = ConvBlobModel()
    image = blob_image(70, 93, CELLS)
    expected = predict_probabilities(model, image, tile_size=32, overlap=8, batch_size=3)
    assert isinstance(expected, np.ndarray) and expected.dtype == np.float32
    maps = predict_probabilities(model, image, tile_size=32, overlap=8, batch_size=3, as_tensor=True)
    assert isinstance(maps, torch.Tensor) and maps.device.type == "cpu" and maps.dtype == torch.float32
    np.testing.assert_array_equal(maps.numpy(), expected)
    assert not maps.is_inference()  # a normal tensor: the caller may change it in place
    maps.clamp_(0, 1)


def test_channels_last_model_gets_channels_last_inputs() -> None:
    seen = []

    class Spy(ConvBlobModel):
        def infer(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return super().infer(x)

    image = blob_image(40, 50, CELLS[:2])
    contiguous = predict_probabilities(Spy(), image, tile_size=32, overlap=8)
    last = predict_probabilities(Spy().to(memory_format=torch.channels_last), image, tile_size=32, overlap=8)
    assert seen[0] is False and seen[-1] is True
    np.testing.assert_allclose(last, contiguous, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the InferenceModel


def test_every_prediction_path_runs_the_network_through_one_inference_model() -> None:
    calls: list[str] = []
    real = InferenceModel.tiles

    def spy(self: InferenceModel, tiles: Any) -> torch.Tensor:
        calls.append(self.precision)
        return real(self, tiles)

    model = ConvBlobModel()
    image = blob_image(70, 93, CELLS)
    post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InferenceModel, "tiles", spy)
        maps = predict_probabilities(model, image, tile_size=32, overlap=8, batch_size=3)
        n_batches = len(calls)
        predictor = Predictor(model, post, 2, tile_size=32, overlap=8, batch_size=3, fold_bn=True)
        det = predictor.predict(image)
        runner = InferenceModel(model, "cpu", "fp32", fold_bn=True)
        same = predict_probabilities(runner, image, tile_size=32, overlap=8, batch_size=3)
    # 3 x 4 tiles of 32 px with 8 px overlap, in batches of 3: 4 batches per image, 3 images.
    assert n_batches == 4 and calls == ["fp32"] * 12
    assert isinstance(predictor.runner, InferenceModel) and predictor.inference_model is predictor.runner.network
    # The folded network of a Predictor and of a bare InferenceModel are the same numbers.
    np.testing.assert_array_equal(same, predictor.probabilities(image))
    np.testing.assert_allclose(same, maps, rtol=0, atol=1e-5)
    assert len(det) > 0


def test_inference_model_folds_channels_last_and_restores_the_mode() -> None:
    modes: list[bool] = []

    class Spy(ConvBlobModel):
        def infer(self, x: torch.Tensor) -> torch.Tensor:
            modes.append(self.training)
            return super().infer(x)

    model = Spy().train()
    plain = InferenceModel(model, "cpu")
    assert plain.network is model and plain.precision == "fp32" and plain.memory_format == torch.contiguous_format
    predict_probabilities(plain, blob_image(40, 50, CELLS[:2]), tile_size=32, overlap=8)
    assert modes and not any(modes)  # eval mode inside the call
    assert model.training  # the caller's mode is back after it
    folded = InferenceModel(model, "cpu", fold_bn=True)
    assert folded.network is not model and remaining_batchnorm(folded.network) == []
    assert folded.memory_format == torch.channels_last and remaining_batchnorm(model) == ["net.1"]


def test_inference_model_rejects_maps_of_the_wrong_size() -> None:
    class Shrinking(ConvBlobModel):
        def infer(self, x: torch.Tensor) -> torch.Tensor:
            return super().infer(x)[..., ::2, ::2]

    with pytest.raises(ValueError, match=r"expected \(B, C, 32, 32\) logits at input resolution"):
        InferenceModel(Shrinking(), "cpu").tiles(np.zeros((1, 32, 32, 3), np.uint8))


# ----------------------------------------------------------------------------- the Predictor


def test_predictor_folds_once_and_finds_the_same_cells() -> None:
    model = ConvBlobModel()
    post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
    plain = Predictor(model, post, 2, tile_size=32, overlap=8)
    fast = Predictor(model, post, 2, tile_size=32, overlap=8, fold_bn=True, precision="auto")
    # "auto" is int8 on the CPU, but this test model is no cellkit encoder-decoder: fp32.
    assert fast.precision == "fp32" and plain.inference_model is plain.model
    assert remaining_batchnorm(fast.inference_model) == [] and remaining_batchnorm(fast.model) == ["net.1"]
    folded = fast.inference_model
    image = blob_image(70, 93, CELLS)
    det, probs = fast.predict_with_probabilities(image)
    assert isinstance(probs, np.ndarray) and fast.inference_model is folded  # folded once
    expected_det, expected_probs = plain.predict_with_probabilities(image)
    np.testing.assert_allclose(probs, expected_probs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(det.points, expected_det.points)
    np.testing.assert_array_equal(fast.predict(image).points, expected_det.points)
    bf16 = Predictor(model, post, 2, tile_size=32, overlap=8, fold_bn=True, precision="bf16")
    np.testing.assert_array_equal(bf16.predict(image).points, expected_det.points)


def test_predictor_from_checkpoint_with_precision_and_fold(tmp_path) -> None:
    from cellkit.engine.checkpoint import save_checkpoint

    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.encoder_kwargs["width_multiplier"] = 0.125
    cfg.model.decoder_kwargs.update(width=8, low_level_width=8)
    torch.manual_seed(0)
    model = randomise_batchnorm(cellkit.build_model(cfg))
    path = save_checkpoint(tmp_path / "best.pt", {"config": cfg.to_dict(), "model": model.state_dict()})
    with pytest.raises(ValueError, match="fp32, bf16, fp16, int8, auto"):
        Predictor.from_checkpoint(path, device="cpu", precision="half")
    fast = Predictor.from_checkpoint(path, device="cpu", precision="bf16", fold_bn=True, tile_size=32,
                                     overlap=8)
    plain = Predictor.from_checkpoint(path, device="cpu", tile_size=32, overlap=8)
    assert fast.precision == "bf16" and remaining_batchnorm(fast.inference_model) == []
    image = noise_image(3, 48, 80)
    diff = np.abs(fast.probabilities(image) - plain.probabilities(image))
    assert 0 < diff.max() < 0.02


def test_fold_bn_needs_a_module() -> None:
    class Duck:
        activation = "sigmoid"

        def infer(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2]

    with pytest.raises(ValueError, match="fold_bn=True needs an nn.Module"):
        predict_probabilities(Duck(), np.zeros((8, 8, 3), np.uint8), fold_bn=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fold_bn=True needs an nn.Module"):
        Predictor(Duck(), POSTPROCESSORS.build("peaks"), 2, fold_bn=True)  # type: ignore[arg-type]
