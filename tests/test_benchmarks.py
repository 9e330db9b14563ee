"""The benchmarks still run: ``benchmarks/run.py --quick`` end to end, and its JSON is complete.

The figures of a quick run are not checked (sizes are tiny and the machine is shared), only
that every stage ran, gave finite numbers and agreed with its baseline where it must.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
STAGES = ("targets", "peaks", "matching", "training", "inference", "gpu")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"the JSON holds {name}, which is not a finite number")


def _numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON value with its path (booleans are not numbers here)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _numbers(v, f"{path}[{i}]")]
    raise AssertionError(f"unexpected JSON value at {path}: {value!r}")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--device", "cpu", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"benchmarks/run.py --quick failed:\n{proc.stderr[-4000:]}"
    assert proc.stdout == "", "with --json FILE the JSON goes to the file, not stdout"
    report = json.loads(out.read_text(), parse_constant=_reject_constant)
    report["_stderr"] = proc.stderr
    return report


def test_quick_run_reports_every_stage_with_finite_numbers(quick: dict[str, Any]) -> None:
    assert quick["quick"] is True
    assert set(quick["stages"]) == set(STAGES)
    numbers = _numbers({k: v for k, v in quick.items() if k != "_stderr"})
    assert numbers, "no numbers in the report"
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, f"non-finite numbers: {bad[:5]}"
    # The readable tables go to stderr.
    for title in ("1. Targets", "2. Peaks", "3. Matching", "4. Training step", "5. Inference", "6. GPU"):
        assert title in quick["_stderr"]


def test_quick_run_describes_the_machine(quick: dict[str, Any]) -> None:
    machine = quick["machine"]
    for key in (
        "cpu_model",
        "logical_cpus",
        "usable_cpus",
        "torch",
        "torch_threads",
        "python",
        "numpy",
        "date",
    ):
        assert machine.get(key) not in (None, ""), f"machine info lacks {key}"
    assert machine["torch_threads"] >= 1


def test_quick_run_stages_agree_with_their_baselines(quick: dict[str, Any]) -> None:
    stages = quick["stages"]
    gens = stages["targets"]["generators"]
    for name in ("circle", "random_polygon", "gaussian", "estimated"):
        assert gens[name]["ms_per_image"] > 0
    assert stages["targets"]["reference_step"]["step_ms"] > 0

    for entry in stages["peaks"]["maps"]:
        assert entry["same_points"] is True, entry
        assert entry["points_cellkit"] > 0
        assert entry["cellkit_ms"] > 0 and entry["skimage_ms"] > 0

    for key in ("single_image", "many_images"):
        assert stages["matching"][key]["same_tp"] is True

    runs = stages["training"]["runs"]
    assert {r["preset"] for r in runs} == {"fcrn", "estimate_mask", "ours", "ours_plus", "ours_plus_plus"}
    for r in runs:
        assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["loss_finite"] is True
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0

    (inference,) = stages["inference"]["runs"]
    assert inference["output_finite"] is True
    assert inference["share_of_matmul"] > 0 and inference["megapixels_per_s"] > 0
    assert inference["matmul"]["float32"]["gflops_per_s"] > 0

    assert stages["gpu"].get("skipped"), "--device cpu must skip the GPU stage, saying why"
    checks = {c["check"] for c in quick["checks"]}
    assert any("random_polygon" in c for c in checks) and any("peak_local_max" in c for c in checks)


def test_unknown_stage_names_the_close_one() -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN), "--stages", "peak"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 'peaks'" in proc.stderr.lower()


# --------------------------------------------------------------------------- accuracy.py


def _bench(stem: str) -> Any:
    """``benchmarks/<stem>.py`` as a module (a fresh copy: its module-level caches start empty)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{stem}_bench", ROOT / "benchmarks" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracy_module() -> Any:
    return _bench("accuracy")


def test_accuracy_folds_hold_every_image_out_once(tmp_path: Path) -> None:
    acc = _accuracy_module()
    root = tmp_path / "bc"
    (root / "images" / "test").mkdir(parents=True)
    for i in range(20):
        (root / "images" / "test" / f"{i}.png").write_bytes(b"")
    _, folds = acc.folds_for("bcdata", acc.parse_args(["--bcdata", str(root), "--folds", "3"]))
    held_out = [s for _, test in folds for s in test]
    assert sorted(held_out, key=int) == [str(i) for i in range(20)]
    assert all(set(train).isdisjoint(test) and len(train) + len(test) == 20 for train, test in folds)
    assert sorted(len(test) for _, test in folds) == [6, 7, 7]


def test_accuracy_summary_pools_the_folds(tmp_path: Path) -> None:
    acc = _accuracy_module()

    def result(tp: int, fp: int, fn: int, errors: list[float]) -> dict:
        f1 = 2 * tp / (2 * tp + fp + fn)
        cls = {"tp": tp, "fp": fp, "fn": fn, "total_f1": f1, "mean_f1": f1}
        return {"evaluation": {"classes": {"a": cls}}, "index_errors": errors, "steps": 400, "train_seconds": 60}

    summary = acc.summarise([result(8, 2, 0, [0.1]), result(2, 0, 8, [0.3, 0.0])])
    a = summary["classes"]["a"]
    # pooled: tp 10, fp 2, fn 8 -> precision 10/12, recall 10/18, F1 = 20 / 30
    assert a["total_f1_pooled"] == pytest.approx(2 / 3, abs=1e-4)
    assert a["total_f1_per_fold"] == [pytest.approx(16 / 18, abs=1e-4), pytest.approx(4 / 12, abs=1e-4)]
    assert summary["index_error_mae"] == pytest.approx(0.1333, abs=1e-4) and summary["held_out_images"] == 3
    (tmp_path / "accuracy.json").write_text(json.dumps({"datasets": {"bcdata": {"presets": {"ours": summary}}}}))
    assert "| bcdata | ours | a | 0.667 |" in acc.table(tmp_path)


# --------------------------------------------------------------------------- slide_bench.py


def test_slide_bench_times_the_users_command_and_it_finds_the_same_cells(tmp_path: Path) -> None:
    out = tmp_path / "slide.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "slide_bench.py"), "--side", "2048", "--model",
         "endonuke-epithelium", "--command", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(), parse_constant=_reject_constant)
    # "auto" keeps float32 for the shipped EfficientNet-Lite0 (its int8 depthwise kernels are slower).
    assert report["model"] == "endonuke-epithelium" and report["precision"] == "fp32"
    assert report["cells"] > 100  # real weights on real IHC tiles
    assert report["command_cells"] == report["cells"], "cellkit predict and predict_slide disagree"
    assert report["command"].startswith("cellkit predict mosaic.tif --model endonuke-epithelium")
    assert len(report["command_seconds_all"]) == 1 and report["command_tissue_mp_per_s"] > 0


def test_slide_bench_command_needs_a_model() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "slide_bench.py"), "--command"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "give --model too" in proc.stderr


def test_accuracy_compare_and_transfer_table_pool_per_image_counts(tmp_path: Path) -> None:
    """Pooled totalF1 from per-image counts, paired by run and image, by hand."""
    acc = _accuracy_module()

    def write(variant: str, fold: int, seed: int, images: dict) -> None:
        run = tmp_path / variant / (f"fold{fold}" + (f"-seed{seed}" if seed else ""))
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(
            {"fold": fold, "seed": seed, "per_image": {"classes": ["a"], "images": images}}))

    # ours: tp 6, fp 2, fn 2 -> F1 = 12 / 16 = 0.75; better: tp 8, fp 0, fn 0 -> 1.0
    write("ours", 0, 0, {"x": {"tp": [3], "fp": [1], "fn": [1]}, "y": {"tp": [3], "fp": [1], "fn": [1]}})
    write("better", 0, 0, {"x": {"tp": [4], "fp": [0], "fn": [0]}, "y": {"tp": [4], "fp": [0], "fn": [0]}})
    out = acc.compare(tmp_path / "ours", tmp_path / "better", n_boot=200)
    assert out["pairs"] == 2 and out["classes"]["a"]["a"] == 0.75 and out["classes"]["a"]["b"] == 1.0
    assert out["classes"]["a"]["b_minus_a"] == 0.25 and out["classes"]["a"]["ci95"] == [0.25, 0.25]
    table = acc.transfer_table(tmp_path, "ours").splitlines()
    assert table[2].startswith("| ours | 1 folds x 1 seeds | 0.750 ± 0.000 | 0.75 |")
    assert "| better |" in table[3] and "+0.250 [+0.250, +0.250]" in table[3]


def test_accuracy_steps_curve_pools_each_complete_seed(tmp_path: Path) -> None:
    """``--steps-curve``: a dot per seed pooled over its folds; a seed with a fold missing is left out."""
    acc = _accuracy_module()

    def write(variant: str, fold: int, seed: int, steps: int, tp: int, fp: int) -> None:
        run = tmp_path / variant / (f"fold{fold}" + (f"-seed{seed}" if seed else ""))
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"fold": fold, "seed": seed, "steps": steps, "per_image": {
            "classes": ["a"], "images": {"x": {"tp": [tp], "fp": [fp], "fn": [0]}}}}))

    for fold in (0, 1):
        write("short", fold, 0, 400, 1, 1)  # pooled: tp 2, fp 2 -> F1 4 / 6
        write("long", fold, 0, 800, 3, 1)   # tp 6, fp 2 -> 12 / 14
    write("long", 0, 1, 800, 1, 0)          # seed 1 has one fold of two: not a point
    classes, points = acc.steps_points(tmp_path, ["short", "long"])
    assert classes == ["a"] and [(n, seed) for n, seed, _ in points] == [(400, 0), (800, 0)]
    import numpy as np
    np.testing.assert_allclose([p[2][0] for p in points], [4 / 6, 12 / 14])
    png = acc.steps_curve(tmp_path, tmp_path / "steps.png", ["short", "long"])
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit, match="no finished runs"):
        acc.steps_points(tmp_path, ["absent"])


# --------------------------------------------------------------------------- train_profile.py


def test_train_profile_reads_a_finished_run_and_flags_contention(tmp_path: Path) -> None:
    module = _bench("train_profile")
    args = module.parse_args(["--presets", "ours", "--datasets", "endonuke", "--arms", "native",
                              "--out", str(tmp_path), "--bcdata", str(tmp_path / "absent")])
    run = tmp_path / "endonuke-ours-native"
    (run / "pretrain").mkdir(parents=True)
    (run / "timings.json").write_text(json.dumps({"seconds": {"steps": 3.0}}))
    (run / "pretrain" / "timings.json").write_text(json.dumps({"seconds": {"steps": 1.0}}))
    record = module.one_run("endonuke", "ours", "native", args)  # finished: read, not run again
    assert record["stages"] == {"train": {"seconds": {"steps": 3.0}}, "pretrain": {"seconds": {"steps": 1.0}}}
    with pytest.raises(SystemExit, match="no such folder"):
        module.data_args("bcdata", args)
    harness = module.contention
    assert harness(1.0, 2.1, cores=2) is None and "other work shared the cores" in harness(3.5, 1.0, cores=2)


def test_suggest_loop_draws_one_row_per_held_out_range(tmp_path: Path) -> None:
    """``suggest_loop.py --plot-only A B``: the curve of each recorded range, titled by its tile ids."""
    module = _bench("suggest_loop")
    fold = tmp_path / "fold2"
    (fold / "run").mkdir(parents=True)
    (fold / "result.json").write_text(json.dumps({"test_images": ["4560", "4600", "4787"]}))
    runs = [{"strategy": s, "n": n, "seed": seed, "f1": {"other": 0.8 + n / 1000, "epithelium": 0.7}}
            for s in ("suggested", "random") for n in (5, 10) for seed in (0, 1)]
    record = {"start": str(fold / "run" / "best.pt"), "fold": 2, "pool_images": 62, "runs": runs,
              "before": {"other": 0.8, "epithelium": 0.7}, "full": {"other": 0.85, "epithelium": 0.75}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    paths[0].write_text(json.dumps(record))
    paths[1].write_text(json.dumps({**record, "start": str(tmp_path / "elsewhere" / "run" / "best.pt"), "fold": 1}))
    assert module._range_of(record) == "4560-4787" and module._range_of(json.loads(paths[1].read_text())) == "fold 1"
    png = tmp_path / "loop.png"
    assert module.main(["--plot-only", *map(str, paths), "--png", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as image:
        width, height = image.size
    assert height > width * 0.7  # two rows of two panels (one row would be about 0.38)


def test_suggest_loop_novelty_ranks_unfamiliar_tiles_first(tmp_path: Path) -> None:
    """``--strategies novel``: a tile unlike the training crops stored in best.pt is the most novel."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    import cellkit
    from cellkit.engine.checkpoint import save_checkpoint

    module = _bench("suggest_loop")
    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.encoder_kwargs["width_multiplier"] = 0.125
    cfg.model.decoder_kwargs.update(width=8, low_level_width=8)
    torch.manual_seed(0)
    model = cellkit.build_model(cfg)
    rng = np.random.default_rng(0)
    pinkish = [np.clip(rng.normal((200, 150, 180), 8, (48, 48, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    path = save_checkpoint(tmp_path / "best.pt", {"config": cfg.to_dict(), "model": model.state_dict(),
                                                  "int8_calibration": [torch.from_numpy(c) for c in pinkish]})
    like = [SimpleNamespace(key=str(i), image=np.clip(rng.normal((200, 150, 180), 8, (48, 48, 3)), 0, 255)
                            .astype(np.uint8)) for i in range(3)]
    unlike = SimpleNamespace(key="9", image=rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    novelty = module.novelty(path, [*like, unlike])
    assert max(novelty, key=novelty.get) == "9" and novelty["9"] > 1.5 * max(novelty[s.key] for s in like)
    save_checkpoint(tmp_path / "bare.pt", {"config": cfg.to_dict(), "model": model.state_dict()})
    with pytest.raises(SystemExit, match="holds no training crops"):
        module.novelty(tmp_path / "bare.pt", like)


def test_suggest_loop_medoids_take_each_clusters_typical_field(tmp_path: Path) -> None:
    """``--strategies medoids``: the field nearest the centre of each cluster of encoder features."""
    from types import SimpleNamespace

    import numpy as np

    module = _bench("suggest_loop")
    pool = [SimpleNamespace(key=str(i)) for i in range(6)]
    module.FEATURES["medoid_features"] = np.array([[0.0, 0], [0.1, 0], [-0.1, 0.02],
                                                   [10, 10], [10.1, 10], [13, 10]])
    assert sorted(module.medoids(tmp_path, pool, 2, tmp_path), key=int) == ["0", "4"]


def test_suggest_loop_reuses_a_run_only_with_the_same_picks(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """``--reuse``: a run folder whose picks.json lists the same tiles is scored, not trained again."""
    from types import SimpleNamespace

    import cellkit

    module = _bench("suggest_loop")
    cfg = cellkit.presets.ours(size="cpu").to_dict()
    fitted: list[Path] = []

    def fit(cfg: Any, out: Path, splits: Any, device: str, progress: bool) -> None:
        out.mkdir(parents=True)
        (out / "best.pt").write_bytes(b"weights")
        fitted.append(out)

    monkeypatch.setattr(module, "load_checkpoint", lambda start: {"config": cfg})
    monkeypatch.setattr(module, "fit", fit)
    monkeypatch.setattr(module, "Predictor", SimpleNamespace(from_checkpoint=lambda path, device: path))
    monkeypatch.setattr(module, "REUSE", True)
    picks = [SimpleNamespace(key="12"), SimpleNamespace(key="3")]
    out = tmp_path / "random-n2-seed0"
    assert module.fine_tune(tmp_path / "start.pt", picks, 5, 0, out, 1e-4) == out / "best.pt"
    assert json.loads((out / "picks.json").read_text()) == ["3", "12"] and len(fitted) == 1
    module.fine_tune(tmp_path / "start.pt", picks[::-1], 5, 0, out, 1e-4)
    assert len(fitted) == 1  # the same picks: scored again, not trained
    module.fine_tune(tmp_path / "start.pt", picks[:1], 5, 0, out, 1e-4)
    assert len(fitted) == 2 and json.loads((out / "picks.json").read_text()) == ["12"]
    monkeypatch.setattr(module, "REUSE", False)
    module.fine_tune(tmp_path / "start.pt", picks[:1], 5, 0, out, 1e-4)
    assert len(fitted) == 3


def test_the_memory_high_water_mark_never_goes_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``VmHWM`` read below an earlier one (the kernel sums per-CPU counters approximately)
    is reported as the earlier, higher mark: a measurement's peak is never below its baseline."""
    import io

    harness = _bench("harness")
    reads = iter(["VmHWM:\t  454216 kB\n", "VmHWM:\t  454028 kB\n", "VmHWM:\t  460000 kB\n"])
    monkeypatch.setattr(harness, "open", lambda path: io.StringIO(next(reads)), raising=False)
    first, second, third = harness.peak_rss_mb(), harness.peak_rss_mb(), harness.peak_rss_mb()
    assert first == second == pytest.approx(454216 / 1024) and third == pytest.approx(460000 / 1024)
