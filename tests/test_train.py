"""Tests of cellkit.engine.train: run folders, the two stages, resuming, repeatability, every preset.

Tiny on purpose (2-core machines): synthetic 64x64 images, a quarter-width ResNet-18 with
16-wide decoders, 64-pixel crops, batches of 2 and 2 steps per epoch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cellkit
from cellkit.config import CellkitConfig, ConfigError
from cellkit.data import Sample
from cellkit.engine import (
    RUN_EXISTS_MESSAGE,
    TrainResult,
    file_fingerprint,
    fit,
    load_checkpoint,
    load_model,
    run_score,
    save_checkpoint,
)
from cellkit.engine import inference as inference_module
from cellkit.engine import runs as runs_module
from cellkit.engine import train as train_module
from cellkit.engine import validation as validation_module
from cellkit.presets import PRESETS

RUN_FILES = {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"}


def tiny(name: str = "ours", epochs: int = 1, **train: object) -> CellkitConfig:
    """A preset shrunk for the CPU tests (stage 1 too)."""
    cfg = PRESETS[name](size="cpu")
    for c in [cfg] + ([cfg.pretrain] if cfg.pretrain is not None else []):
        c.model.encoder_kwargs["width_multiplier"] = 0.25
        c.model.decoder_kwargs.update(width=16, low_level_width=8)
        c.train.crop_size = 64
        c.train.batch_size = 2
        c.train.steps = None  # an epoch schedule (the step schedule is tested in test_recipe.py)
        c.train.steps_per_epoch = 2
        c.train.epochs = 1
        c.train.num_workers = 0
        c.data.cell_diameter = 8.0  # the presets' placeholder sizes: the config round-trips as is
        c.train.warmup, c.train.scheduler = 0.0, None  # a constant learning rate
    cfg.train.epochs = epochs
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def synthetic(key: str, seed: int, h: int = 64, w: int = 64, n: int = 8) -> Sample:
    """An image with dark nuclei at random points of two classes."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, [w - 1, h - 1], (n, 2))
    classes = rng.integers(0, 2, n)
    image = np.full((h, w, 3), 225, np.uint8)
    for (x, y), c in zip(points, classes):
        r, col = int(round(y)), int(round(x))
        image[max(0, r - 2) : r + 3, max(0, col - 2) : col + 3] = (90, 50, 130) if c else (130, 70, 50)
    return Sample(image, points, classes, key)


# Four training images, two whole validation images (one not square: the model pads any size).
SPLITS = {
    "train": [synthetic(f"t{i}", i) for i in range(4)],
    "val": [synthetic("v0", 10, 48, 72), synthetic("v1", 11)],
    "test": [synthetic("x0", 20)],
}


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


def kill_in_epoch_2(cfg: CellkitConfig, out, monkeypatch) -> None:
    """Train ``cfg`` into ``out`` and kill the run as its second epoch starts (last.pt holds epoch 1)."""
    real_train_epoch = train_module.train_one_epoch
    calls = []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        fit(cfg, out, splits=SPLITS, device="cpu", progress=False)
    monkeypatch.setattr(train_module, "train_one_epoch", real_train_epoch)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> TrainResult:
    """``ours`` trained for 2 epochs without interruption."""
    out = tmp_path_factory.mktemp("runs") / "baseline"
    return fit(tiny("ours", epochs=2), out, splits=SPLITS, device="cpu", progress=False)


def test_run_folder(baseline: TrainResult) -> None:
    out = baseline.out_dir
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert baseline.best_path == out / "best.pt" and baseline.last_path == out / "last.pt"
    # The resolved config round-trips.
    assert CellkitConfig.from_yaml(out / "config.yaml") == tiny("ours", epochs=2)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 == len(baseline.history)
    labels = {"total", "main/ce", "main/iou"}
    for epoch, line in enumerate(lines, start=1):
        assert line["epoch"] == epoch and line["stage"] == "train" and line["steps"] == 2
        assert set(line["train"]) == labels and set(line["val"]) == labels
        assert set(line["f1"]) == {"class0", "class1"} == set(line["mean_f1"])
        assert line["lr"] == pytest.approx(1e-3) and line["time"] > 0
        assert all(np.isfinite(v) for v in line["train"].values())
        assert line["score"] == pytest.approx(run_score(line["f1"]))
    # best.pt is the epoch with the highest score; ties keep the earlier one.
    scores = [line["score"] for line in lines]
    best_epoch = int(np.argmax(scores)) + 1
    assert [line["best"] for line in lines][best_epoch - 1]
    assert baseline.best_score == pytest.approx(max(scores))
    best, last = load_checkpoint(baseline.best_path), load_checkpoint(baseline.last_path)
    assert best["epoch"] == best_epoch and last["epoch"] == 2
    for key in ("optimizer", "rng", "config", "history", "class_names", "split", "cellkit_version"):
        assert key in last, key
    assert last["split"] == {k: [s.key for s in v] for k, v in SPLITS.items()}
    assert last["class_names"] == ["class0", "class1"] and last["stage"] == "train"
    assert {"python", "numpy", "torch"} <= set(last["rng"])
    model, cfg, _ = load_model(baseline.best_path)
    assert cfg.name == "ours" and not model.training


def test_timings_say_where_the_time_went(baseline: TrainResult) -> None:
    timings = json.loads((baseline.out_dir / "timings.json").read_text())
    seconds = timings["seconds"]
    assert {"steps", "data loading", "validation", "checkpoints", "calibration", "other"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values()) and seconds["steps"] > 0 and seconds["validation"] > 0
    # The phases add up to the stage's time (``other`` is the rest).
    assert sum(seconds.values()) == pytest.approx(timings["total_seconds"], abs=0.01)
    assert timings["steps_run"] == 4 and timings["stage"] == "train" and timings["resumed_at_round"] == 0
    assert timings["steps_per_second"] == pytest.approx(4 / seconds["steps"], rel=0.01)


def test_resume_after_interruption_matches_uninterrupted_run(baseline, tmp_path, monkeypatch) -> None:
    """A run killed in its second epoch, resumed in a new call, ends with the same weights."""
    out = tmp_path / "run"
    kill_in_epoch_2(tiny("ours", epochs=2), out, monkeypatch)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    # The same seed gives the same first epoch (a repeatable CPU run).
    assert without_time(load_checkpoint(out / "last.pt")["history"]) == without_time(baseline.history[:1])

    result = fit(tiny("ours", epochs=2), out, splits=SPLITS, device="cpu", progress=False, resume=True)
    assert_same_weights(weights(result.last_path), weights(baseline.last_path))
    assert without_time(result.history) == without_time(baseline.history)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_weight_average_is_what_validates_and_is_saved_and_it_resumes(tmp_path, monkeypatch) -> None:
    """``train.ema``: best.pt and last.pt hold the average, training goes on from the raw weights,
    and a run killed in its second epoch ends as an uninterrupted one."""
    whole = fit(tiny("ours", epochs=2, ema=0.9), tmp_path / "whole", splits=SPLITS, device="cpu", progress=False)
    last = load_checkpoint(whole.last_path)
    assert last["averaged_steps"] == 4 and last["model"].keys() == last["train_model"].keys()
    assert any(not torch.equal(last["model"][k], last["train_model"][k]) for k in last["model"])
    # The decay rule itself is checked by WeightAverage's docstring example.

    out = tmp_path / "killed"
    kill_in_epoch_2(tiny("ours", epochs=2, ema=0.9), out, monkeypatch)
    resumed = fit(tiny("ours", epochs=2, ema=0.9), out, splits=SPLITS, device="cpu", progress=False, resume=True)
    again = load_checkpoint(resumed.last_path)
    assert_same_weights(again["model"], last["model"])
    assert_same_weights(again["train_model"], last["train_model"])
    assert without_time(resumed.history) == without_time(whole.history)


def test_a_run_saved_before_a_config_field_existed_resumes(baseline: TrainResult) -> None:
    """A field added since (``train.ema``), at its default, is not a difference; a set one is."""
    from cellkit.engine.runs import _check_resume

    ckpt = load_checkpoint(baseline.last_path)
    old = ckpt["config"]
    del old["train"]["ema"]
    _check_resume({"config": old}, tiny("ours", epochs=2), baseline.last_path)
    with pytest.raises(ConfigError, match="train.ema"):
        _check_resume({"config": old}, tiny("ours", epochs=2, ema=0.99), baseline.last_path)
    with pytest.raises(ConfigError, match="train.ema: expected None or a decay between 0 and 1"):
        tiny("ours", ema=1.5).check()


def test_refuses_to_overwrite_a_run(baseline: TrainResult) -> None:
    before = {p.name: p.read_bytes() for p in baseline.out_dir.iterdir() if p.is_file()}
    expected = "already holds a run; pass --resume to continue it or choose another --out"
    with pytest.raises(FileExistsError, match=expected):
        fit(tiny("ours", epochs=2), baseline.out_dir, splits=SPLITS, device="cpu", progress=False)
    assert {p.name: p.read_bytes() for p in baseline.out_dir.iterdir() if p.is_file()} == before
    assert "{out}" in RUN_EXISTS_MESSAGE


def test_resume_of_finished_run_returns_it(baseline: TrainResult) -> None:
    before = (baseline.out_dir / "last.pt").read_bytes()
    result = fit(tiny("ours", epochs=2), baseline.out_dir, splits=SPLITS, device="cpu", progress=False,
                 resume=True)
    assert (baseline.out_dir / "last.pt").read_bytes() == before
    assert without_time(result.history) == without_time(baseline.history)
    assert result.best_score == pytest.approx(baseline.best_score)


def test_resume_refuses_a_changed_config(baseline: TrainResult) -> None:
    cfg = tiny("ours", epochs=2, lr=5e-4)
    before = (baseline.out_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="train.lr"):
        fit(cfg, baseline.out_dir, splits=SPLITS, device="cpu", progress=False, resume=True)
    assert (baseline.out_dir / "config.yaml").read_text() == before


def test_ours_plus_plus_runs_both_stages_and_caches_the_prior(tmp_path, monkeypatch) -> None:
    import cellkit.builder

    checks = []
    real = cellkit.builder.config_problems
    monkeypatch.setattr(cellkit.builder, "config_problems", lambda cfg, **kw: checks.append(cfg) or real(cfg, **kw))
    out = tmp_path / "pp"
    given = tiny("ours_plus_plus")
    before = given.to_dict()
    result = fit(given, out, splits=SPLITS, device="cpu", progress=False, max_steps=1)
    # The run's config is checked once (its stage 1 within that one pass; the stage-1 model is
    # loaded back from its checkpoint for the prior, whose stored config is checked as any file's)...
    assert sum(1 for cfg in checks if cfg.pretrain is not None) == 1
    assert given.to_dict() == before  # ...and the caller's config is left as it was
    assert RUN_FILES <= {p.name for p in (out / "pretrain").iterdir()}
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert result.pretrain is not None and len(result.pretrain.history) == 1
    assert set(result.pretrain.history[0]["train"]) == {"total", "main/ce"}  # stage 1: CE only
    assert "prior/prior" in result.history[0]["train"]
    stage1 = out / "pretrain" / "last.pt"
    assert load_checkpoint(stage1)["stage"] == "pretrain"
    assert CellkitConfig.from_yaml(out / "pretrain" / "config.yaml").losses[0].name == "ce"
    # One cached prior per train/val image, in a folder named by the stage-1 checkpoint.
    fingerprint = file_fingerprint(stage1)
    cached = sorted(p.stem for p in (out / "prior_cache" / fingerprint).glob("*.npy"))
    assert cached == sorted(s.key for s in SPLITS["train"] + SPLITS["val"])
    old_prior = np.load(out / "prior_cache" / fingerprint / "t0.npy")
    assert old_prior.shape == (1, 64, 64) and 0 <= old_prior.min() and old_prior.max() <= 1

    # A changed stage-1 checkpoint invalidates the cache; the finished stage 1 is not rerun.
    ckpt = load_checkpoint(stage1)
    ckpt.pop("path")
    ckpt["model"]["decoders.main.classifier.bias"] += 1.0
    save_checkpoint(stage1, ckpt)
    new_fingerprint = file_fingerprint(stage1)
    assert new_fingerprint != fingerprint
    cfg = tiny("ours_plus_plus", epochs=2)  # resuming may raise the epochs
    result = fit(cfg, out, splits=SPLITS, device="cpu", progress=False, resume=True, max_steps=1)
    assert CellkitConfig.from_yaml(out / "config.yaml").train.epochs == 2
    assert file_fingerprint(stage1) == new_fingerprint  # stage 1 skipped
    assert len(result.pretrain.history) == 1 and len(result.history) == 2
    new_dir = out / "prior_cache" / new_fingerprint
    assert sorted(p.stem for p in new_dir.glob("*.npy")) == cached
    assert not np.array_equal(np.load(new_dir / "t0.npy"), old_prior)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_trains_one_step(name, tmp_path, capsys) -> None:
    options = {"fcrn": {"scheduler": "cosine"}, "ours_plus": {"scheduler": "step", "grad_clip": 1.0}}
    cfg = tiny(name, **options.get(name, {}))
    result = fit(cfg, tmp_path / name, splits=SPLITS, device="cpu", max_steps=1, progress=None)
    record = result.history[-1]
    assert record["steps"] == 1
    assert set(record["train"]) == {"total"} | {spec.resolved_label for spec in cfg.losses}
    assert all(np.isfinite(v) for v in record["train"].values())
    assert set(record["f1"]) == {"class0", "class1"}
    assert (tmp_path / name / "best.pt").is_file()
    # The one step moved the shared encoder (every preset's losses reach it).
    torch.manual_seed(cfg.train.seed)
    initial = cellkit.build_model(cfg).state_dict()
    trained = load_checkpoint(result.last_path)["model"]
    assert any(not torch.equal(initial[k], trained[k]) for k in initial if k.startswith("encoder."))
    err = capsys.readouterr().err
    assert "epoch 1/1  loss " in err and "val F1 class0" in err
    # No long phase is silent: each says it starts and how long it took, and the stage its time.
    assert "calibrating the peaks of the best weights on 2 validation images...\n" in err
    assert "\ntime " in err
    if cfg.pretrain is not None:
        assert "preparing the targets prior of 6 images..." in err and "\nstage 1 time " in err


def test_default_data_is_read_and_split_by_group(tmp_path) -> None:
    """``samples=None``: load_dataset of cfg.data (a 6-tile EndoNuke folder), split by group."""
    from cellkit.data import bundled_endonuke

    try:
        source = bundled_endonuke()
    except FileNotFoundError:
        pytest.skip("the bundled EndoNuke sample is not in this checkout")
    root = tmp_path / "endonuke"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for key in ("1010", "1025", "1030", "1041", "1058", "1077"):  # six groups (id // 10)
        shutil.copy(source / "images" / f"{key}.png", root / "images")
        shutil.copy(source / "labels" / f"{key}.txt", root / "labels")
    cfg = tiny("ours")
    cfg.data.root = str(root)
    cfg.data.val_fraction = cfg.data.test_fraction = 1 / 3
    cfg.data.group = "blocks:10"  # the format's own rule (blocks of 100 ids) would make them one group
    result = fit(cfg, tmp_path / "run", device="cpu", max_steps=1, progress=False)
    split = load_checkpoint(result.last_path)["split"]
    assert [len(split[k]) for k in ("train", "val", "test")] == [2, 2, 2]
    assert sorted(sum(split.values(), [])) == ["1010", "1025", "1030", "1041", "1058", "1077"]
    # EndoNuke read as the paper's two classes (epithelium = 1).
    assert set(result.history[0]["f1"]) == {"other", "epithelium"}


def test_bad_arguments_fail_clearly(tmp_path) -> None:
    with pytest.raises(ValueError, match="'train' and 'val'"):
        fit(tiny(), tmp_path / "a", splits={"train": SPLITS["train"]}, device="cpu")
    with pytest.raises(ConfigError, match="Did you mean 'cosine'"):
        fit(tiny(scheduler="cosin"), tmp_path / "b", splits=SPLITS, device="cpu")
    with pytest.raises(ValueError, match="max_steps"):
        fit(tiny(), tmp_path / "c", splits=SPLITS, device="cpu", max_steps=0)
    with pytest.raises(ConfigError, match="num_classes"):
        bad = {"train": [Sample(np.zeros((16, 16, 3), np.uint8), [[1, 1]], [2], "k")], "val": []}
        fit(tiny(), tmp_path / "d", splits=bad, device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_score() -> None:
    assert run_score({"a": 0.5, "b": 1.0}) == pytest.approx(0.75)
    assert run_score({"a": None, "b": 0.4}) == pytest.approx(0.4)
    assert np.isnan(run_score({})) and np.isnan(run_score(None))


def test_best_checkpoint_keeps_calibration_crops_for_int8(baseline: TrainResult, monkeypatch) -> None:
    from cellkit.engine.predict import Predictor
    from cellkit.models import quantize
    from cellkit.models.quantize import int8_available

    crops = load_checkpoint(baseline.best_path)["int8_calibration"]
    # One central crop (at most 192 px a side) per evenly spaced training image, at most 16.
    expected = [s.image[:192, :192] for s in SPLITS["train"]][: runs_module.INT8_CALIBRATION_CROPS]
    assert [c.dtype for c in crops] == [torch.uint8] * len(expected)
    assert all(np.array_equal(c.numpy(), e) for c, e in zip(crops, expected))
    if not int8_available():
        return
    seen = []
    real = quantize.quantize_int8
    monkeypatch.setattr(inference_module, "quantize_int8", lambda model, calibration=None: seen.append(calibration)
                        or real(model, calibration))
    predictor = Predictor.from_checkpoint(baseline.best_path, device="cpu", precision="auto")
    assert predictor.precision == "int8" and len(seen) == 1  # calibrated on the crops, not the bundled tiles
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(seen[0], crops)) and len(seen[0]) == len(crops)


def test_predict_default_uses_thresholds_calibrated_on_its_own_maps(tmp_path: Path, monkeypatch) -> None:
    """Training calibrates the peaks on the maps that cellkit predict's default (int8 on the CPU) makes."""
    from cellkit.engine.predict import Predictor
    from cellkit.models.quantize import int8_available

    cfg = tiny("ours", epochs=1)
    cfg.train.calibrate = True
    result = fit(cfg, tmp_path / "run", splits=SPLITS, device="cpu", progress=False)
    ckpt = load_checkpoint(result.best_path)
    report = json.loads((result.out_dir / "calibration.json").read_text())
    if not int8_available():  # no x86 int8 engine: predict's default is fp32, calibrated as before
        assert "postprocess_int8" not in ckpt and "int8" not in report
        return
    assert "postprocess_int8" in ckpt and report["int8"]["postprocess"] == ckpt["postprocess_int8"]
    default = Predictor.from_checkpoint(result.best_path, device="cpu", precision="auto")
    fp32 = Predictor.from_checkpoint(result.best_path, device="cpu", precision="fp32")
    assert default.precision == "int8"
    assert list(np.atleast_1d(default.postprocess.threshold)) == list(np.atleast_1d(
        ckpt["postprocess_int8"]["threshold"]))
    assert list(np.atleast_1d(fp32.postprocess.threshold)) == list(np.atleast_1d(ckpt["postprocess"]["threshold"]))
    # The maps the int8 thresholds were calibrated on are the maps the default predictor makes.
    seen = []
    real = validation_module.calibrate_peaks
    monkeypatch.setattr(validation_module, "calibrate_peaks",
                        lambda maps, *a, **k: seen.append(list(maps)) or real(maps, *a, **k))
    model = Predictor.from_checkpoint(result.best_path, device="cpu", precision="fp32").model
    truths = [(s.points, s.classes) for s in SPLITS["val"]]
    again = validation_module._int8_calibration(cfg, model, ckpt, SPLITS["val"], truths, default.class_names,
                                           ckpt["postprocess"], None)
    assert again is not None and len(seen) == 1
    for maps, sample in zip(seen[0], SPLITS["val"]):
        assert np.array_equal(maps, default.probabilities(sample.image))


def test_bf16_on_cpus_that_compute_it(tmp_path, monkeypatch, capsys) -> None:
    """train.amp on a CPU with native bfloat16 (forced here: CELLKIT_CPU_BF16=1) trains under bf16
    autocast, losses in float32; elsewhere (and with amp off) float32, as before."""
    from cellkit.engine.inference import training_autocast_dtype

    monkeypatch.setenv("CELLKIT_CPU_BF16", "0")
    assert training_autocast_dtype("cpu", amp=True) is None  # emulated bf16 would be slower
    monkeypatch.setenv("CELLKIT_CPU_BF16", "1")
    assert training_autocast_dtype("cpu", amp=True) == torch.bfloat16
    assert training_autocast_dtype("cpu", amp=False) is None
    seen = []
    real = train_module.train_one_epoch

    def spy(model, loader, steps, loss_fn, optimizer, scaler, grad_clip, ctx, **kw):
        seen.append((ctx.amp_dtype, ctx.use_amp, scaler.is_enabled()))
        return real(model, loader, steps, loss_fn, optimizer, scaler, grad_clip, ctx, **kw)

    monkeypatch.setattr(train_module, "train_one_epoch", spy)
    tiled = []  # the precision of the maps made by tiles: the final calibration's
    real_maps = validation_module.predict_probabilities
    monkeypatch.setattr(validation_module, "predict_probabilities",
                        lambda *a, **k: tiled.append(k.get("precision")) or real_maps(*a, **k))
    result = fit(tiny("ours"), tmp_path / "bf16", splits=SPLITS, device="cpu", max_steps=1, progress=None)
    assert seen == [(torch.bfloat16, False, False)]  # no gradient scaler: bfloat16 keeps float32's range
    # The stored thresholds are calibrated on the float32 maps cellkit predict makes on the CPU.
    assert tiled == ["fp32"] * len(SPLITS["val"])
    assert all(np.isfinite(v) for v in result.history[-1]["train"].values())
    timings = (tmp_path / "bf16" / "timings.json").read_text()
    assert json.loads(timings)["precision"] == "bf16"
    # Resuming the finished run does no work and keeps the timings of the run that did it.
    fit(tiny("ours"), tmp_path / "bf16", splits=SPLITS, device="cpu", max_steps=1, progress=False, resume=True)
    assert (tmp_path / "bf16" / "timings.json").read_text() == timings
    assert "the network runs in bfloat16" in capsys.readouterr().err
    # The weights stay float32 (autocast computes in bfloat16, the parameters are not cast).
    assert all(v.dtype == torch.float32 for v in weights(result.last_path).values() if v.is_floating_point())
