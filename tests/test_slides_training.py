"""Training from annotated whole slides (``--format slides``): the areas read equal the tiles they came from.

A pyramidal TIFF is written from bundled EndoNuke tiles at twice their resolution (0.25 um/px),
with the tiles' points in slide coordinates in a QuPath-style GeoJSON (point annotations, one
annotation polygon per tile marking the annotated area). Read back at the tiles' 0.5 um/px,
each area must be its tile, pixel for pixel, with its points: a model trained from the slide
then trains on exactly what a model trained from the tiles trains on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cellkit.cli import main
from cellkit.data import load_dataset
from cellkit.data.bundled import bundled_endonuke
from cellkit.data.io import DataError
from cellkit.data.readers import read_endonuke_labels
from cellkit.wsi import training


def cellkit_mpp(checkpoint: Path) -> float | None:
    from cellkit.engine.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["config"]["data"]["mpp"]
from test_wsi import write_pyramid

NAMES = {"stroma": 0, "epithelium": 1, "other": 2}
CLASS_MAP = {"stroma": 0, "epithelium": 1, "other": 2}


def _tiles(n: int, start: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    root = bundled_endonuke()
    out = []
    for f in sorted((root / "images").glob("*.png"))[start : start + n]:
        rec = read_endonuke_labels(root / "labels" / f"{f.stem}.txt")
        out.append((np.asarray(Image.open(f).convert("RGB")), rec.points, rec.classes, f.stem))
    return out


def _point(x: float, y: float, cls: int) -> dict[str, Any]:
    name = [k for k, v in NAMES.items() if v == cls][0]
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]},
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def _region(name: str, x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": name}}


def write_annotated_slide(folder: Path, stem: str, tiles: list[Any], regions: bool = True) -> Path:
    """Tiles side by side (a row), written at 0.25 um/px, with their points and one region per tile."""
    row = np.concatenate([t[0] for t in tiles], axis=1)
    write_pyramid(folder / f"{stem}.tif", [row.repeat(2, 0).repeat(2, 1), row], 0.25)
    features = []
    for i, (image, points, classes, key) in enumerate(tiles):
        dx = i * image.shape[1]
        features += [_point((x + dx) * 2, y * 2, int(c)) for (x, y), c in zip(points, classes)]
        if regions:
            features.append(_region(key, dx * 2, 0, (dx + image.shape[1]) * 2, image.shape[0] * 2))
    (folder / f"{stem}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return folder / f"{stem}.tif"


def test_slide_areas_are_the_tiles_they_came_from(tmp_path: Path) -> None:
    tiles = _tiles(3)
    write_annotated_slide(tmp_path, "case1", tiles)
    samples = load_dataset(tmp_path, "slides", class_map=CLASS_MAP, mpp=0.5)
    assert [s.key for s in samples] == [f"case1/{t[3]}" for t in tiles]
    for sample, (image, points, classes, _) in zip(samples, tiles):
        assert sample.image.shape == image.shape and np.array_equal(sample.image, image)
        order = np.lexsort((points[:, 1], points[:, 0]))
        got = np.lexsort((sample.points[:, 1], sample.points[:, 0]))
        assert np.allclose(sample.points[got], points[order], atol=1e-6)
        assert np.array_equal(sample.classes[got], classes[order])
    from cellkit.data import get_format

    assert {get_format("slides").group(s.key) for s in samples} == {"case1"}  # split by slide


def test_without_regions_the_box_around_the_cells_and_outside_a_region_is_white(tmp_path: Path) -> None:
    tiles = _tiles(2)
    write_annotated_slide(tmp_path, "a", tiles, regions=False)
    (sample,) = load_dataset(tmp_path, "slides", class_map=CLASS_MAP, mpp=0.5)
    assert sample.key == "a/cells" and len(sample.points) == sum(len(t[1]) for t in tiles)
    # A triangle region: cells outside it are left out, pixels outside it are white.
    data = json.loads((tmp_path / "a.geojson").read_text())
    data["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [400, 0], [0, 400], [0, 0]]]}, "properties": {"objectType": "annotation", "name": "tri"}})
    (tmp_path / "a.geojson").write_text(json.dumps(data))
    (sample,) = load_dataset(tmp_path, "slides", class_map=CLASS_MAP, mpp=0.5)
    assert sample.key == "a/tri" and sample.image.shape[:2] == (200, 200)
    assert (sample.image[190, 190] == 255).all() and (sample.points.sum(1) < 200 + 1).all()
    inside = [(x * 2, y * 2) for (x, y) in tiles[0][1] if x + y < 199]
    assert abs(len(sample.points) - len(inside)) <= 2  # points on the edge


def test_slides_errors_name_the_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_annotated_slide(tmp_path, "a", _tiles(1))
    with pytest.raises(DataError, match=r"pass --mpp .*record 0.25 um/px"):
        load_dataset(tmp_path, "slides", class_map=CLASS_MAP)
    write_pyramid(tmp_path / "b.tif", [np.full((512, 512, 3), 200, np.uint8)], 0.25)
    with pytest.raises(DataError, match=r"b.tif: slide with no annotations; expected b.geojson"):
        load_dataset(tmp_path, "slides", class_map=CLASS_MAP, mpp=0.5)
    (tmp_path / "b.tif").unlink()
    monkeypatch.setattr(training, "MAX_PIXELS", 10_000)
    with pytest.raises(DataError, match=r"a.geojson: the annotated areas of a.tif hold .* annotate smaller"):
        load_dataset(tmp_path, "slides", class_map=CLASS_MAP, mpp=0.5)


def test_cellkit_train_from_slides_splits_by_slide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "slides"
    data.mkdir()
    for i in range(3):
        write_annotated_slide(data, f"case{i}", _tiles(1, start=i))
    run = tmp_path / "run"
    code = main(["train", "--preset", "ours", "--size", "cpu", "--data", str(data), "--format", "slides",
                 "--class-map", "stroma=0,epithelium=1,other=0", "--class-names", "other,epithelium", "--out", str(run), "--epochs", "1",
                 "--steps-per-epoch", "1", "--crop-size", "64", "--batch-size", "2", "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "slides read at their full resolution, 0.25 um/px" in printed.err
    split = json.loads((run / "split.json").read_text())
    slides = {part: {k.split("/")[0] for k in split[part]} for part in ("train", "validation")}
    assert slides["train"] and slides["validation"] and not slides["train"] & slides["validation"]
    # The model keeps the slides' pixel size (predicting a slide with it: tests/test_suggest.py's guide).
    assert cellkit_mpp(run / "best.pt") == 0.25
