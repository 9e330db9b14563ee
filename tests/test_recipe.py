"""The default recipe: formats table, geometry from the points, step schedule, crops, calibrated peaks.

Ends with the test that training *learns*: discs of two colours on noise, the default recipe
shortened, F1 > 0.9 on new images through ``Predictor.from_checkpoint`` (calibrated peaks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cellkit
from cellkit.data import ClassMap, DataError, PointDataset, Sample, load_dataset
from cellkit.data.formats import FORMATS, IMAGE_SUFFIXES, DatasetFormat, get_format
from cellkit.engine import fit
from cellkit.engine.calibrate import calibrate_peaks, score_maps
from cellkit.engine.predict import Predictor, list_images
from cellkit.engine.plan import _plan, describe_schedule, resolve_for_data, schedule_factor
from cellkit.engine.validation import run_score
from cellkit.geometry import Geometry, apply_geometry, estimate_cell_diameter, resolve_geometry

# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_contract(name: str, tmp_path: Path) -> None:
    """Every registered format: its entry is complete, its defaults fit, bad folders say why."""
    fmt = get_format(name)
    assert isinstance(fmt, DatasetFormat) and fmt.name == name
    assert callable(fmt.jobs) and fmt.description
    assert fmt.image_suffixes and all(s.startswith(".") and s == s.lower() for s in fmt.image_suffixes)
    for k, cmap in fmt.class_maps.items():
        assert isinstance(cmap, ClassMap) and cmap.num_classes == k
        assert fmt.class_names(k) == list(cmap.names)
    assert fmt.class_map(99) is None and fmt.class_names(99) is None
    if fmt.group is not None and fmt.takes_mpp:  # areas of slides: keyed <slide>/<area>, grouped by slide
        assert fmt.group("case/region 1") == fmt.group("case/region 2") != fmt.group("other/region 1")
    elif fmt.group is not None:
        assert fmt.group("images/17.png") == fmt.group("17")
    # An empty folder is a clear error naming the folder, never an empty dataset.
    with pytest.raises((DataError, FileNotFoundError)) as err:
        load_dataset(tmp_path, name)
    assert str(tmp_path) in str(err.value)


def test_formats_are_one_table() -> None:
    assert get_format("BCData ").name == "bcdata"
    assert get_format("endonuke").class_names(2) == ["other", "epithelium"]
    with pytest.raises(KeyError, match="Did you mean 'geojson'"):
        get_format("geojsn")
    # predict takes every suffix training reads (a .bmp trained on is predicted too)
    assert ".bmp" in IMAGE_SUFFIXES


def test_predict_lists_bmp(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.bmp")
    assert [p.name for p in list_images([tmp_path])] == ["a.bmp"]


# --------------------------------------------------------------------------- geometry

# Clicks land on a 1/16-pixel grid (annotation tools store a few decimals); floats closer than that
# are not cells, and scaling a subnormal distance by 0.5 underflows to a duplicate.
coordinate = st.integers(0, 500 * 16).map(lambda v: v / 16)
point_sets = st.lists(
    st.lists(st.tuples(coordinate, coordinate), min_size=2, max_size=30), min_size=1, max_size=4
).filter(lambda sets: any(len(set(s)) >= 2 for s in sets))


@settings(max_examples=60, deadline=None)
@given(point_sets, st.sampled_from([0.5, 2.0, 3.0, 10.0]))
def test_geometry_scales_with_the_coordinates(sets, s) -> None:
    arrays = [np.array(p, dtype=np.float64) for p in sets]
    d, _ = estimate_cell_diameter(arrays)
    ds, _ = estimate_cell_diameter([a * s for a in arrays])
    assert ds == pytest.approx(s * d, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(point_sets, st.data())
def test_duplicate_points_do_not_change_the_geometry(sets, data) -> None:
    arrays = [np.array(p, dtype=np.float64) for p in sets]
    doubled = []
    for a in arrays:
        idx = data.draw(st.lists(st.integers(0, len(a) - 1), max_size=len(a)))
        doubled.append(np.concatenate([a, a[idx]]))
    assert estimate_cell_diameter(doubled)[0] == estimate_cell_diameter(arrays)[0]


def test_geometry_of_a_grid_and_its_errors() -> None:
    grid = np.array([[x, y] for x in range(0, 200, 12) for y in range(0, 200, 12)], np.float64)
    d, source = estimate_cell_diameter([grid, grid[:1]])
    assert d == pytest.approx(12.0) and "1 training images" in source
    # Double clicks (1 px from a cell, far under a quarter of the median) are not neighbours.
    clicked = np.concatenate([grid, grid[::10] + [1.0, 0.0]])
    assert 11.0 <= estimate_cell_diameter([clicked])[0] <= 12.0  # (11: a click's other neighbours)
    assert estimate_cell_diameter([np.concatenate([grid, grid[::10] + [12.0, 0.0]])])[0] == 12.0
    with pytest.raises(ValueError, match="--cell-diameter"):
        estimate_cell_diameter([np.zeros((0, 2)), np.array([[3.0, 3.0], [3.0, 3.0]])])
    with pytest.raises(ValueError, match="positive"):
        Geometry(0.0)


def test_geometry_of_the_bundled_endonuke_matches_the_hand_choice() -> None:
    """EndoNuke's cells: the 4-px circles and r = 6 chosen by hand in docs/results.md."""
    samples = load_dataset(cellkit.data.bundled_endonuke(), "endonuke")
    d, _ = estimate_cell_diameter(samples)
    g = Geometry(d)
    assert 7.0 <= d <= 9.0 and 3.5 <= g.radius <= 4.5 and 5.0 <= g.match_radius <= 7.0


def test_geometry_sets_every_size_of_a_preset() -> None:
    cfg = cellkit.presets.ours_plus_plus()
    assert cfg.data.cell_diameter == "auto"
    out = apply_geometry(cfg, Geometry(20.0))
    assert out.targets["circle"].kwargs["radius"] == 10.0
    assert out.targets["dynamic"].kwargs["base_radius"] == 10.0
    assert out.postprocess.kwargs["min_distance"] == 8 and out.train.radius == 15.0
    assert out.pretrain.targets["circle"].kwargs["radius"] == 10.0 and out.pretrain.train.radius == 15.0
    assert cfg.targets["circle"].kwargs["radius"] == 4.0  # the input is not changed
    fcrn = apply_geometry(cellkit.presets.fcrn(), Geometry(20.0))
    sigma = fcrn.targets["density"].kwargs["sigma"]
    assert sigma == 5.0
    assert fcrn.postprocess.kwargs["threshold"] == pytest.approx(0.3 * 100 / (2 * np.pi * 25), abs=1e-4)
    # A size given to the preset fixes the geometry; none given estimates it.
    assert cellkit.presets.ours(radius=6).data.cell_diameter is None
    assert cellkit.presets.ours(radius=6).train.radius == 9.0
    assert cellkit.presets.ours(cell_diameter=10).targets["circle"].kwargs["radius"] == 5.0
    with pytest.raises(ValueError, match="not both"):
        cellkit.presets.ours(radius=3, cell_diameter=10)


def _disc_sample(key: str, seed: int, size: int = 96, n: int = 10, spacing: float = 16.0) -> Sample:
    """Discs of radius 4 (brown = class 1, blue = class 0) on noise, at least ``spacing`` apart."""
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(6, size - 7, 2)
        if all(np.hypot(*(p - q)) >= spacing for q in pts):
            pts.append(p)
        if len(pts) < n and rng.random() < 0.002:
            break
    points = np.array(pts)
    classes = rng.integers(0, 2, len(points))
    image = rng.normal(215, 12, (size, size, 3)).clip(0, 255)
    yy, xx = np.mgrid[:size, :size]
    for (x, y), c in zip(points, classes):
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= 16
        image[disc] = (150, 90, 40) if c else (60, 70, 150)
    return Sample(image.astype(np.uint8), points, classes, key)


def test_resolve_for_data_estimates_and_cuts_crops() -> None:
    train = [_disc_sample(f"t{i}", i) for i in range(3)]
    given = cellkit.presets.ours(radius=5)  # no geometry to estimate: the crops alone change
    assert resolve_for_data(given, train)[0].train.crop_size == 96
    assert given.train.crop_size == 256  # the caller's config is never changed
    cfg, notes = resolve_for_data(cellkit.presets.ours(), train)
    assert cfg.data.cell_diameter == pytest.approx(estimate_cell_diameter(train)[0], abs=0.01)
    assert cfg.train.crop_size == 96  # 256 is larger than the 96-px images
    assert notes[0].startswith("geometry: cell diameter") and any(n.startswith("crops: 96") for n in notes)
    assert notes[-1].startswith("schedule: 800 steps")
    # Two stages cut alike are said once.
    _, notes = resolve_for_data(cellkit.presets.ours_plus_plus(), train)
    assert sum(n.startswith("crops: ") for n in notes) == 1
    # A given diameter is used as given; None keeps the config's sizes.
    cfg.data.cell_diameter = 12.0
    assert resolve_geometry(cfg, train)[1].cell_diameter == 12.0
    kept = cellkit.presets.ours(radius=5)
    assert resolve_geometry(kept, train) == (kept, None)
    kept.data.cell_diameter = "big"
    with pytest.raises(ValueError, match="'auto'"):
        resolve_geometry(kept, train)


# --------------------------------------------------------------------------- schedule


def test_learning_rate_schedule() -> None:
    total = 100
    f = [schedule_factor(s, total, 0.1, "cosine") for s in range(total)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to 1
    assert f[10] == 1.0 and all(a >= b for a, b in zip(f[10:], f[11:]))  # then never rises
    assert f[55] == pytest.approx(0.5)  # half way through the decay
    assert 0 < f[-1] < 0.001
    assert [schedule_factor(s, 30, 0.0, "step") for s in (0, 19, 20, 29)] == [1.0, 1.0, 0.1, 0.1]
    assert schedule_factor(50, 100, 0.0, None) == 1.0


def test_plan_in_steps_is_independent_of_the_data() -> None:
    t = cellkit.presets.ours().train
    assert _plan(t, loader_len=2, max_steps=None) == (16, [50] * 16)
    t.steps, t.val_every_steps = 120, 50
    assert _plan(t, loader_len=999, max_steps=None) == (3, [50, 50, 20])
    assert _plan(t, loader_len=999, max_steps=4) == (3, [4, 4, 4])
    t.steps, t.epochs = None, 3
    assert _plan(t, loader_len=7, max_steps=None) == (3, [7, 7, 7])


def test_pretrain_fraction_follows_stage_two() -> None:
    cfg = cellkit.presets.ours_plus_plus(steps=1000, pretrain_fraction=0.3)
    assert cfg.pretrain.train.steps == 300
    assert "stage 1: 300 steps" in describe_schedule(cfg)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cellkit.presets.ours_plus_plus(pretrain_fraction=1.5)
    assert cellkit.presets.ours_plus_plus(pretrain_epochs=3).pretrain.train.steps is None


def test_bad_schedule_values_are_errors(tmp_path: Path) -> None:
    from cellkit.config import ConfigError

    for key, value in (("steps", 0), ("warmup", 1.0), ("cell_crop", 1.5), ("val_every_steps", 0)):
        cfg = cellkit.presets.ours()
        setattr(cfg.train, key, value)
        with pytest.raises(ConfigError, match=f"train.{key}"):
            fit(cfg, tmp_path / key, splits={"train": [_disc_sample("a", 0)], "val": []}, device="cpu")


# --------------------------------------------------------------------------- crops


def test_class_balanced_crops_find_a_rare_class() -> None:
    """One class-1 cell among 60 class-0 cells: half of the cell-centred crops hold it."""
    rng = np.random.default_rng(0)
    common = [Sample(np.zeros((128, 128, 3), np.uint8), rng.uniform(0, 127, (30, 2)), np.zeros(30, int), f"c{i}")
              for i in range(2)]
    rare = Sample(np.zeros((128, 128, 3), np.uint8), [[100.0, 100.0]], [1], "rare")
    samples = common + [rare]

    def share(balance: bool) -> float:
        ds = PointDataset(samples, {}, num_classes=2, crop_size=32, seed=0, length=300, cell_bias=1.0,
                          balance_classes=balance)
        return float(np.mean([(ds[i]["classes"] == 1).any().item() for i in range(len(ds))]))

    assert 0.4 <= share(True) <= 0.6
    assert share(False) < 0.45  # the rare image is one item in three, and 1/3 is well below 1/2


# --------------------------------------------------------------------------- calibration


def _maps_with_known_best(rng: np.random.Generator) -> tuple[list[np.ndarray], list[tuple]]:
    """Class 0: true cells peak at 0.6, false blobs at 0.3 (best threshold in [0.3, 0.6));
    class 1: true cells peak at 0.25 only (best threshold below 0.25)."""
    maps, truths = [], []
    yy, xx = np.mgrid[:64, :64]
    for _ in range(3):
        m = np.zeros((2, 64, 64), np.float32)
        pts, cls = [], []
        spots = [(x, y) for x in range(8, 56, 12) for y in range(8, 56, 12)]
        for k, i in enumerate(rng.choice(len(spots), 6, replace=False)):
            x, y = spots[i]
            c, peak = (0, 0.6) if k < 2 else ((0, 0.3) if k < 4 else (1, 0.25))
            blob = peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)
            m[c] = np.maximum(m[c], blob)
            if peak != 0.3:
                pts.append((x, y))
                cls.append(c)
        maps.append(m)
        truths.append((np.array(pts, float), np.array(cls)))
    return maps, truths


def test_calibration_finds_the_known_best_thresholds() -> None:
    maps, truths = _maps_with_known_best(np.random.default_rng(1))
    base = {"threshold": 0.5, "min_distance": 3, "exclusive": False}
    cal = calibrate_peaks(maps, truths, radius=3, class_names=["a", "b"], kwargs=base, rounds=2)
    t0, t1 = cal.kwargs["threshold"]
    assert 0.3 <= t0 < 0.6 and t1 < 0.25
    assert cal.f1 == {"a": 1.0, "b": 1.0} and cal.score == 1.0
    assert cal.before < 0.8  # at 0.5 every class-1 cell is missed
    f1, score = score_maps(maps, truths, radius=3, class_names=["a", "b"], kwargs=cal.kwargs)
    assert f1 == cal.f1 and score == cal.score
    assert json.dumps(cal.to_dict())  # plain data for calibration.json


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.booleans(), st.sampled_from([np.float32, np.float64]))
def test_the_threshold_scan_equals_one_peak_search_per_threshold(seed: int, k: int, exclusive: bool,
                                                                dtype: type) -> None:
    """Peaks found once and filtered give each class the F1 that a search per threshold gives."""
    from cellkit.engine.calibrate import THRESHOLD_GRID, _class_f1_per_threshold

    rng = np.random.default_rng(seed)
    # Coarse values (plateaus, ties across classes) on a grid that hits the thresholds exactly.
    maps = [(rng.integers(0, 20, size=(k, 12, 14)) / 20).astype(dtype) for _ in range(2)]
    truths = [(rng.uniform(0, 12, size=(n, 2)), rng.integers(0, k, n)) for n in rng.integers(0, 12, 2)]
    names = [f"c{i}" for i in range(k)]
    kwargs = {"threshold": rng.choice(THRESHOLD_GRID, k).tolist(),
              "min_distance": rng.integers(1, 4, k).tolist(), "exclusive": exclusive}
    c = int(rng.integers(0, k))
    fast = _class_f1_per_threshold("peaks", kwargs, c, THRESHOLD_GRID, maps, truths, 2.0, names)
    for t, value in zip(THRESHOLD_GRID, fast):
        trial = {**kwargs, "threshold": [t if i == c else v for i, v in enumerate(kwargs["threshold"])]}
        f1, _ = score_maps(maps, truths, radius=2.0, class_names=names, kwargs=trial)
        assert value == (f1[names[c]] or 0.0), (t, value, f1)


def test_calibration_leaves_a_class_without_cells_out() -> None:
    maps, truths = _maps_with_known_best(np.random.default_rng(1))
    truths = [(p[c == 0], c[c == 0]) for p, c in truths]
    cal = calibrate_peaks(maps, truths, radius=3, class_names=["a", "b"],
                          kwargs={"threshold": 0.5, "min_distance": 3, "exclusive": False})
    assert cal.f1["b"] is None and cal.kwargs["threshold"][1] == 0.5 and cal.counts["b"] == 0
    assert cal.score == cal.f1["a"] == 1.0
    assert run_score({"a": 0.8, "b": None}) == 0.8


def test_calibration_of_density_maps_is_relative() -> None:
    maps, truths = _maps_with_known_best(np.random.default_rng(2))
    maps = [m * 40 for m in maps]  # density values far above 1
    cal = calibrate_peaks(maps, truths, radius=3, class_names=["a", "b"], relative=True,
                          kwargs={"threshold": 5.0, "min_distance": 3, "exclusive": False},
                          min_distances=[2, 3])
    assert cal.score == 1.0 and 0.3 * 40 <= cal.kwargs["threshold"][0] < 0.6 * 40
    assert set(cal.kwargs["min_distance"]) <= {2, 3}


# --------------------------------------------------------------------------- it learns


def test_the_default_recipe_learns(tmp_path: Path) -> None:
    """Discs on noise: the default ``ours`` recipe, shortened, finds and classes new cells."""
    cfg = cellkit.presets.ours(steps=100)
    cfg.train.val_every_steps = 50
    cfg.train.batch_size = 4
    cfg.train.crop_size = 64
    splits = {"train": [_disc_sample(f"t{i}", i) for i in range(8)],
              "val": [_disc_sample(f"v{i}", 100 + i) for i in range(2)]}
    result = fit(cfg, tmp_path / "run", splits=splits, device="cpu", progress=False)
    stored = cellkit.CellkitConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert 7.0 < stored.data.cell_diameter < 20.0  # estimated from the points, recorded
    assert [r["step"] for r in result.history] == [50, 100]
    assert (tmp_path / "run" / "calibration.json").is_file()
    predictor = Predictor.from_checkpoint(result.best_path, device="cpu")
    assert isinstance(predictor.postprocess.threshold, list)  # the calibrated thresholds
    test = [_disc_sample(f"x{i}", 200 + i) for i in range(3)]
    report = cellkit.metrics.evaluate([predictor.predict(s.image) for s in test],
                                      [(s.points, s.classes) for s in test], radius=4, num_classes=2)
    assert report.total_f1.min() > 0.9, report
    # --threshold still wins over the calibrated values
    assert Predictor.from_checkpoint(result.best_path, device="cpu", threshold=0.7).postprocess.threshold == 0.7


def test_a_run_with_estimated_geometry_resumes(tmp_path: Path) -> None:
    """The resolved config (diameter, crops) is what the run records, so a resume matches it."""
    def cfg():
        c = cellkit.presets.ours(steps=4)
        c.model.encoder_kwargs["width_multiplier"] = 0.25
        c.model.decoder_kwargs.update(width=16, low_level_width=8)
        c.train.val_every_steps, c.train.batch_size = 2, 2
        return c

    splits = {"train": [_disc_sample(f"t{i}", i) for i in range(3)], "val": [_disc_sample("v", 50)]}
    first = fit(cfg(), tmp_path / "run", splits=splits, device="cpu", progress=False, max_steps=1)
    again = fit(cfg(), tmp_path / "run", splits=splits, device="cpu", progress=False, resume=True, max_steps=1)
    assert [r["step"] for r in first.history] == [1, 2] and len(again.history) == 2
    stored = cellkit.CellkitConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert isinstance(stored.data.cell_diameter, float) and stored.train.crop_size == 96
