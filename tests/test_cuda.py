"""The CUDA code paths: peaks on the GPU, tiled inference, the prior target, and a training run
with mixed precision and channels_last; fast inference (bf16, folded BatchNorm, uint8 upload,
blending and peaks on the device). They run where CUDA is available (the device machine
lent to some sessions); elsewhere they are skipped with this reason shown by ``pytest -ra``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellkit
from cellkit.engine.predict import predict_probabilities
from cellkit.postprocess.peaks import peaks, window_max

try:
    from tests.test_fast_inference import CELLS, ConvBlobModel, blob_image
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from test_fast_inference import CELLS, ConvBlobModel, blob_image  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: run on a machine with a GPU (python -m pytest tests/test_cuda.py)"
)


def tiny(cfg: cellkit.CellkitConfig) -> cellkit.CellkitConfig:
    for stage in (cfg, cfg.pretrain):
        if stage is not None:
            stage.model.encoder_kwargs["width_multiplier"] = 0.25
            stage.model.decoder_kwargs.update(width=16, low_level_width=8)
    return cfg


def smooth_maps(seed: int = 0, size: int = 96) -> torch.Tensor:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    maps = np.stack([gaussian_filter(rng.random((size, size)), 2.0) for _ in range(2)]).astype(np.float32)
    return torch.from_numpy((maps - maps.min()) / (maps.max() - maps.min()))


def test_window_max_and_peaks_on_cuda_match_cpu():
    maps = smooth_maps()
    for d in (1, 3, 6):
        assert torch.equal(window_max(maps.cuda(), d, method="pool").cpu(), window_max(maps, d, method="shift"))
    on_gpu, on_cpu = peaks(maps.cuda(), threshold=0.4, min_distance=3), peaks(maps, threshold=0.4, min_distance=3)
    assert len(on_cpu) > 0
    np.testing.assert_array_equal(on_gpu.points, on_cpu.points)
    np.testing.assert_array_equal(on_gpu.classes, on_cpu.classes)


def test_tiled_inference_on_cuda_matches_cpu_and_runs_with_amp():
    torch.manual_seed(0)
    model = cellkit.build_model(tiny(cellkit.presets.ours(size="cpu"))).eval()
    image = np.random.default_rng(0).integers(0, 255, size=(300, 260, 3), dtype=np.uint8)
    cpu = predict_probabilities(model, image, tile_size=128, overlap=32, device="cpu")
    gpu = predict_probabilities(model, image, tile_size=128, overlap=32, device="cuda")
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)
    mixed = predict_probabilities(model, image, tile_size=128, overlap=32, device="cuda", amp=True)
    assert mixed.dtype == np.float32 and np.abs(mixed - cpu).max() < 0.05


def test_prior_target_on_cuda():
    model = cellkit.build_model(tiny(cellkit.presets.ours(size="cpu")))
    image = np.random.default_rng(1).integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    from cellkit.engine.predict import Predictor

    post = cellkit.build_postprocess(tiny(cellkit.presets.ours(size="cpu")))
    on_gpu = cellkit.MASKS.build("prior", predictor=Predictor(model, post, 2, device="cuda").probabilities)(
        np.zeros((0, 2)), np.zeros(0, int), shape=(64, 80), num_classes=2, image=image)
    on_cpu = cellkit.MASKS.build("prior", predictor=Predictor(model, post, 2, device="cpu").probabilities)(
        np.zeros((0, 2)), np.zeros(0, int), shape=(64, 80), num_classes=2, image=image)
    assert on_gpu.shape == (1, 64, 80)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)


def test_training_on_cuda_with_amp_and_channels_last(tmp_path):
    from cellkit.data import bundled_endonuke, get_class_map, load_dataset
    from cellkit.engine.checkpoint import load_model
    from cellkit.engine.train import fit

    samples = load_dataset(bundled_endonuke(), "endonuke", class_map=get_class_map("endonuke_epithelium"))[:6]
    cfg = tiny(cellkit.presets.ours_plus_plus(size="cpu", pretrain_epochs=1))
    for stage in (cfg, cfg.pretrain):
        stage.train.epochs, stage.train.steps_per_epoch, stage.train.steps = 1, 2, None
        stage.train.batch_size, stage.train.crop_size = 2, 64
        stage.train.amp = stage.train.channels_last = True
    result = fit(cfg, tmp_path / "run", splits={"train": samples[:4], "val": samples[4:]}, device="cuda",
                 progress=False)
    assert result.best_path.is_file()
    model, _, _ = load_model(result.best_path, device="cpu")  # a CUDA checkpoint loads on the CPU
    assert next(model.parameters()).device.type == "cpu"


# ----------------------------------------------------------------------------- fast inference


def calibrated(cfg: cellkit.CellkitConfig, seed: int = 0) -> torch.nn.Module:
    """A seeded model whose BatchNorm statistics come from training-mode passes (as a trained one's)."""
    torch.manual_seed(seed)
    model = cellkit.build_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 128, 128))
    return model.eval()


def test_upload_and_blending_on_cuda_match_the_cpu():
    from cellkit.engine.inference import tiles_to_tensor
    from cellkit.engine.predict import _RowBandBlender, blend_window
    from cellkit.imaging import image_to_tensor

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(3, 33, 47, 3), dtype=np.uint8)
    on_gpu = tiles_to_tensor(tiles, "cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    expected = torch.stack([image_to_tensor(t) for t in tiles])
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=0, atol=1e-6)

    window = blend_window(32, 32, 8)
    cpu, gpu = _RowBandBlender(2, 70, 93, window, "cpu"), _RowBandBlender(2, 70, 93, window, "cuda")
    for y in (0, 24, 38):
        for x in (0, 24, 48, 61):
            probs = rng.random((2, 32, 32), dtype=np.float32)
            cpu.add(y, x, torch.from_numpy(probs))
            gpu.add(y, x, torch.from_numpy(probs).cuda())
    np.testing.assert_array_equal(gpu.finish().cpu().numpy(), cpu.finish().numpy())  # float64 sums on both


def test_bf16_and_folded_batchnorm_on_cuda_match_cpu_fp32():
    from cellkit.engine.inference import resolve_precision

    model = calibrated(tiny(cellkit.presets.ours(size="cpu")))
    image = np.random.default_rng(0).integers(0, 255, size=(300, 260, 3), dtype=np.uint8)
    cpu = predict_probabilities(model, image, tile_size=128, overlap=32, device="cpu")
    folded = predict_probabilities(model, image, tile_size=128, overlap=32, device="cuda", fold_bn=True)
    np.testing.assert_allclose(folded, cpu, atol=1e-3)  # TF32 convolutions (cuDNN's default) and folding
    fast = predict_probabilities(model, image, tile_size=128, overlap=32, device="cuda", precision="bf16",
                                 fold_bn=True, as_tensor=True)
    assert isinstance(fast, torch.Tensor) and fast.device.type == "cuda" and fast.dtype == torch.float32
    diff = np.abs(fast.cpu().numpy() - cpu)
    # On the CPU, bf16 autocast differs from fp32 by at most 0.0065 (mean 0.0012) for such a
    # model (tests/test_fast_inference.py); the GPU's bf16 convolutions accumulate in float32 too.
    assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported(False) else "fp16")
    auto = predict_probabilities(model, image, tile_size=128, overlap=32, device="cuda", precision="auto",
                                 fold_bn=True)
    assert np.isfinite(auto).all() and np.abs(auto - cpu).max() < 0.05
    half = predict_probabilities(model, image, tile_size=128, overlap=32, device="cuda", precision="fp16")
    assert np.abs(half - cpu).max() < 0.05


def test_predictor_on_cuda_finds_the_cells_the_cpu_finds():
    """Detections of a fixed random model on CUDA (peaks on the device) and on the CPU.

    The random model's maps are noise-like, with many shallow local maxima: the GPU's TF32
    convolutions (about 1e-3 relative) can move a peak between two near-equal neighbours or
    make one appear or vanish at the threshold. So the CUDA points must match the CPU points
    of the same class within 2 px for at least 95 % of them, and their counts agree within
    5 % (+ 2). On trained-looking maps (one bump per cell, neighbours 0.02 below the peak,
    20x the bf16 error) the points are the same, also in bf16 with folded BatchNorm.
    """
    from scipy.spatial import cKDTree

    from cellkit.engine.predict import Predictor
    from cellkit.registry import POSTPROCESSORS

    cfg = tiny(cellkit.presets.ours(size="cpu"))
    model = calibrated(cfg)
    post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
    image = np.random.default_rng(2).integers(0, 255, size=(320, 290, 3), dtype=np.uint8)
    on_cpu = Predictor(model, post, 2, tile_size=128, overlap=32, device="cpu").predict(image)
    gpu = Predictor(model, post, 2, tile_size=128, overlap=32, device="cuda")
    assert gpu.probabilities(image, as_tensor=True).device.type == "cuda"
    on_gpu = gpu.predict(image)
    det, probs = gpu.predict_with_probabilities(image)
    assert isinstance(probs, np.ndarray) and probs.shape == (2, 320, 290)
    np.testing.assert_array_equal(det.points, on_gpu.points)
    assert len(on_cpu) > 20
    assert abs(len(on_gpu) - len(on_cpu)) <= 0.05 * len(on_cpu) + 2
    matched = 0
    for c in (0, 1):
        a, b = on_cpu.points[on_cpu.classes == c], on_gpu.points[on_gpu.classes == c]
        if len(a) and len(b):
            dist, _ = cKDTree(b).query(a, p=np.inf)
            matched += int((dist <= 2).sum())
    assert matched >= 0.95 * len(on_cpu), (matched, len(on_cpu))

    blobs = blob_image(70, 93, CELLS)
    expected = Predictor(ConvBlobModel(), post, 2, tile_size=32, overlap=8, device="cpu").predict(blobs)
    fast = Predictor(ConvBlobModel(), post, 2, tile_size=32, overlap=8, device="cuda", precision="auto",
                     fold_bn=True)
    assert fast.precision in ("bf16", "fp16")
    got = fast.predict(blobs)
    assert len(expected) == len(CELLS)
    np.testing.assert_array_equal(got.points, expected.points)
    np.testing.assert_array_equal(got.classes, expected.classes)
