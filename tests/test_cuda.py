"""The CUDA code paths: peaks on the GPU, tiled inference, the prior target, and a training run
with mixed precision and channels_last. They run where CUDA is available (the device machine
lent to some sessions); elsewhere they are skipped with this reason shown by ``pytest -ra``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellkit
from cellkit.engine.predict import predict_probabilities
from cellkit.postprocess.peaks import peaks, window_max

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
