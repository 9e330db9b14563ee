"""Training you can see: curves.png, `cellkit plot`, progress lines in logs, errors.png of evaluate.

Tiny on purpose (2-core machines): synthetic 64x64 images, a quarter-width ResNet-18, two
rounds of one step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cellkit
import cellkit.engine.plots
from cellkit.cli import main
from cellkit.data import Sample
from cellkit.engine import TrainResult, fit
from cellkit.engine.plots import plot_errors, plot_training, read_metrics


def synthetic(key: str, seed: int, size: int = 64, n: int = 8) -> Sample:
    rng = np.random.default_rng(seed)
    points = rng.uniform(4, size - 5, (n, 2))
    classes = rng.integers(0, 2, n)
    image = np.full((size, size, 3), 225, np.uint8)
    for (x, y), c in zip(points, classes):
        r, col = int(round(y)), int(round(x))
        image[r - 2 : r + 3, col - 2 : col + 3] = (90, 50, 130) if c else (130, 70, 50)
    return Sample(image, points, classes, key)


def tiny() -> cellkit.CellkitConfig:
    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.encoder_kwargs["width_multiplier"] = 0.25
    cfg.model.decoder_kwargs.update(width=16, low_level_width=8)
    t = cfg.train
    t.crop_size, t.batch_size, t.steps, t.steps_per_epoch, t.epochs, t.num_workers = 64, 2, None, 1, 2, 0
    t.warmup, t.scheduler, t.calibrate = 0.0, None, False
    cfg.data.cell_diameter = 8.0
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("runs") / "run"
    splits = {"train": [synthetic(f"t{i}", i) for i in range(4)], "val": [synthetic("v0", 10)]}
    return fit(tiny(), out, splits=splits, device="cpu", progress=False)


def test_training_leaves_its_curves_and_prints_progress_lines(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Under pytest stderr is not a terminal: plain progress lines, not a bar, and the picture at the end."""
    splits = {"train": [synthetic(f"t{i}", i) for i in range(4)], "val": [synthetic("v0", 10)]}
    result = fit(tiny(), tmp_path / "run", splits=splits, device="cpu", progress=None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " steps/s  ETA " in line]
    assert [line.split("  ")[0] for line in lines] == ["step 1/2 (50%)", "step 2/2 (100%)"], err
    assert all("loss " in line for line in lines)
    assert "\r" not in err  # no progress bar in a log
    curves = result.out_dir / "curves.png"
    assert f"training curves: {curves}" in err
    with Image.open(curves) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and 300 <= im.size[1] <= 1000


def test_plot_training_from_a_real_run(run: TrainResult, tmp_path: Path) -> None:
    assert (run.out_dir / "curves.png").is_file()  # drawn with progress=False too
    records = read_metrics(run.out_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert {"total", "main/ce", "main/iou"} <= set(records[0]["train"])
    out = plot_training(run.out_dir, tmp_path / "elsewhere" / "c.png")
    assert out == tmp_path / "elsewhere" / "c.png"
    with Image.open(out) as im:
        one_stage = im.size
    # A stage 1 (ours_plus_plus's pretrain/) gets its own row.
    copy = tmp_path / "two_stages"
    shutil.copytree(run.out_dir, copy, ignore=shutil.ignore_patterns("*.pt"))
    (copy / "pretrain").mkdir()
    (copy / "pretrain" / "metrics.jsonl").write_text(
        "".join(json.dumps({**r, "stage": "pretrain"}) + "\n" for r in records))
    with Image.open(plot_training(copy)) as im:
        assert im.size[0] == one_stage[0] and im.size[1] > 1.6 * one_stage[1]


def test_plot_training_errors_name_the_file(tmp_path: Path, run: TrainResult) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist.*cellkit train"):
        plot_training(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (run.out_dir / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text(good[0] + "\n{not json\n" + good[1] + "\n")
    with pytest.raises(ValueError, match=r"bad/metrics\.jsonl, line 2: not JSON"):
        plot_training(bad)
    # A last line still being written (no newline yet) is left out, not an error.
    (bad / "metrics.jsonl").write_text(good[0] + "\n" + good[1][:40])
    assert len(read_metrics(bad)) == 1 and plot_training(bad).is_file()
    (bad / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no round yet"):
        plot_training(bad)


def test_cellkit_plot(run: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curves.png"
    assert main(["plot", str(run.out_dir), "--out", str(out)]) == 0
    assert f"training curves: {out}" in capsys.readouterr().out and out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cellkit plot: error: ") and "metrics.jsonl" in err[0]


# --------------------------------------------------------------------------- evaluate's errors.png


@pytest.fixture
def evaluated(tmp_path: Path) -> tuple[Path, Path]:
    """Five annotated CSV-format images and predictions with known errors (image 3 the worst)."""
    data, pred = tmp_path / "data", tmp_path / "pred"
    data.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        s = synthetic(f"img{i}", i, size=80)
        Image.fromarray(s.image).save(data / f"img{i}.png")
        rows = "".join(f"{x:.1f},{y:.1f},{c}\n" for (x, y), c in zip(s.points, s.classes))
        (data / f"img{i}.csv").write_text("x,y,class\n" + rows)
        found = s.points[: 8 - i] + rng.normal(0, 0.5, (8 - i, 2))  # image i misses i cells
        extra = rng.uniform(5, 75, (2 * (i == 3), 2))  # and image 3 has 2 false positives
        points = np.clip(np.concatenate([found, extra]), 0, 79)
        classes = np.concatenate([s.classes[: 8 - i], np.zeros(len(extra), np.int64)])
        (pred / f"img{i}.csv").write_text("x,y,class,score\n" + "".join(
            f"{x:.2f},{y:.2f},{c},0.9\n" for (x, y), c in zip(points, classes)))
    return data, pred


def test_evaluate_writes_the_errors_picture(evaluated: tuple[Path, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data, pred = evaluated
    argv = ["evaluate", "--pred", str(pred), "--data", str(data), "--format", "csv", "--radius", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"errors of the worst images: {pred / 'errors.png'}" in out
    with Image.open(pred / "errors.png") as im:
        assert im.format == "PNG" and 800 <= im.size[0] <= 1600 and 800 <= im.size[1] <= 1600


def test_plot_errors_picks_the_worst_images(evaluated: tuple[Path, Path], tmp_path: Path) -> None:
    from cellkit.engine.evaluate import evaluate_folder
    from cellkit.engine.plots import _classify

    data, pred = evaluated
    result = evaluate_folder(pred, data, "csv", radius=4)
    assert [Path(p).name for p in result.image_paths] == [f"img{i}.png" for i in range(5)]
    # The marks agree with the evaluation's counts.
    parts = [_classify(p, t, 4.0, 2, "hungarian") for p, t in zip(result.predictions, result.truths)]
    assert sum(len(p["tp"][1]) for p in parts) == int(result.report.tp.sum())
    assert sum(len(p["fp"][1]) for p in parts) == int(result.report.fp.sum())
    assert sum(len(p["fn"][1]) for p in parts) == int(result.report.fn.sum())
    with Image.open(plot_errors(result, tmp_path / "one.png", count=1)) as im:
        assert im.size[0] < 800  # one image, one column
    result.image_paths = []
    with pytest.raises(ValueError, match="files of 0 of its 5 images"):
        plot_errors(result, tmp_path / "none.png")


def test_unreadable_images_skip_the_picture_with_a_warning(evaluated: tuple[Path, Path],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import cellkit.data.io

    data, pred = evaluated

    def unreadable(path: object, **kwargs: object) -> None:
        raise OSError(f"cannot read {path}")

    monkeypatch.setattr(cellkit.engine.plots, "read_image", unreadable)
    with pytest.warns(UserWarning, match="errors.png was not drawn.*cannot read"):
        code = main(["evaluate", "--pred", str(pred), "--data", str(data), "--format", "csv"])
    assert code == 0 and (pred / "evaluation.json").is_file() and not (pred / "errors.png").exists()
