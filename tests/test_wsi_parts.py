"""The parts of whole-slide support (cellkit.wsi): tissue masks, regions, summaries, the overview picture."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from shapely.geometry import MultiPolygon, Point, Polygon, box

from cellkit.data.io import DataWarning
from cellkit.wsi.regions import Region, assign_regions, read_regions
from cellkit.wsi.summary import density_map, draw_thumbnail, summarize, write_summary
from cellkit.wsi.tissue import SATURATION_FLOOR, mask_fraction, tissue_mask
from conftest import need_shared

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


# --------------------------------------------------------------------------- tissue masks


def _synthetic_thumbnail() -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], tuple[int, int]]:
    """Glass with a pink disc (with a small white hole), a brown ellipse and a pink bar, and specks.

    Returns the image, the true tissue (hole filled), the speck centres and the hole centre (row, col).
    """
    rng = np.random.default_rng(0)
    h, w = 240, 320
    rr, cc = np.mgrid[0:h, 0:w]
    disc = (rr - 80) ** 2 + (cc - 90) ** 2 <= 50**2
    ellipse = ((rr - 150) / 45.0) ** 2 + ((cc - 230) / 70.0) ** 2 <= 1.0
    bar = (rr >= 190) & (rr < 225) & (cc >= 20) & (cc < 140)
    truth = disc | ellipse | bar
    image = np.empty((h, w, 3), np.float64)
    image[:] = (242, 241, 244)  # glass
    image[disc | bar] = (215, 140, 185)  # eosin pink
    image[ellipse] = (150, 100, 60)  # DAB brown
    hole = (80, 90)
    image[hole[0] - 2 : hole[0] + 3, hole[1] - 2 : hole[1] + 3] = (242, 241, 244)  # 25 px: filled
    specks = [(20, 300), (30, 180), (225, 290)]
    for r, c in specks:
        image[r - 1 : r + 2, c - 1 : c + 2] = (120, 60, 110)  # 9 px each: removed
    image += rng.normal(0.0, 3.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), truth, specks, hole


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_tissue_mask_finds_synthetic_blobs_removes_specks_and_fills_holes() -> None:
    image, truth, specks, hole = _synthetic_thumbnail()
    mask = tissue_mask(image)
    assert mask.shape == truth.shape and mask.dtype == np.bool_
    assert _iou(mask, truth) > 0.9
    for r, c in specks:
        assert not mask[r - 1 : r + 2, c - 1 : c + 2].any(), f"speck at {(r, c)} kept"
    assert mask[hole], "the 25-pixel hole was not filled"
    # Without filling the hole stays; with a tiny min_object_px the specks stay.
    assert not tissue_mask(image, fill_holes=False)[hole]
    assert tissue_mask(image, min_object_px=4)[specks[0]]


def test_tissue_mask_empty_on_glass_even_with_noise() -> None:
    assert not tissue_mask(np.full((64, 80, 3), 255, np.uint8)).any()
    rng = np.random.default_rng(1)
    noisy = np.clip(rng.normal(232, 4, (64, 80, 3)), 0, 255).astype(np.uint8)  # below the white cut-off
    assert not tissue_mask(noisy).any()  # Otsu splits the noise; the floor keeps it glass


def test_tissue_mask_black_borders_are_not_tissue_and_threshold_overrides() -> None:
    image, truth, _, _ = _synthetic_thumbnail()
    framed = image.copy()
    framed[:12] = (5, 0, 10)  # a scanner border: highly "saturated" but black
    framed[:, -12:] = (0, 20, 3)
    mask = tissue_mask(framed)
    assert not mask[:12].any() and not mask[:, -12:].any()
    assert _iou(mask, truth) > 0.9
    assert tissue_mask(image, threshold=1.0).sum() == 0
    loose = tissue_mask(image, threshold=0.0)
    assert loose.sum() >= truth.sum() * 0.95
    assert SATURATION_FLOOR == pytest.approx(0.05)


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((10, 10), np.uint8), "got shape (10, 10)"),
        (np.zeros((10, 10, 4), np.uint8), "got shape (10, 10, 4)"),
        (np.zeros((10, 10, 3), np.float32), "got dtype float32"),
        (np.zeros((0, 10, 3), np.uint8), "got shape (0, 10, 3)"),
    ],
)
def test_tissue_mask_rejects_other_images(bad: np.ndarray, words: str) -> None:
    with pytest.raises(ValueError, match=r"expected .*" + words.replace("(", r"\(").replace(")", r"\)")):
        tissue_mask(bad)


def test_tissue_mask_rejects_bad_options() -> None:
    image = np.full((8, 8, 3), 240, np.uint8)
    with pytest.raises(ValueError, match="min_object_px"):
        tissue_mask(image, min_object_px=0)
    with pytest.raises(ValueError, match="threshold"):
        tissue_mask(image, threshold=2.0)


def test_tissue_mask_on_a_real_slide_thumbnail() -> None:
    need_shared(SLIDE)
    import openslide

    with openslide.OpenSlide(str(SLIDE)) as slide:
        thumb = np.asarray(slide.get_thumbnail((512, 512)).convert("RGB"))
    mask = tissue_mask(thumb)
    assert mask.shape == thumb.shape[:2]
    share = float(mask.mean())
    assert 0.05 < share < 0.95, share
    # The glass in the corners of this slide is glass.
    assert not mask[:40, -40:].any() and not mask[-40:, :40].any()


# --------------------------------------------------------------------------- mask_fraction


def test_mask_fraction_hand_computed_boxes() -> None:
    mask = np.zeros((4, 6), bool)
    mask[0:2, 0:3] = True  # tissue: mask rows 0-1, columns 0-2
    s = 1 / 32
    assert mask_fraction(mask, (0, 0, 64, 64), s) == 1.0  # inside the tissue
    assert mask_fraction(mask, (0, 0, 192, 128), s) == pytest.approx(6 / 24)  # the whole mask
    assert mask_fraction(mask, (64, 0, 64, 32), s) == pytest.approx(0.5)  # half on tissue
    assert mask_fraction(mask, (80, 0, 32, 32), s) == pytest.approx(0.5)  # pixel 2 half, pixel 3 half
    assert mask_fraction(mask, (-64, -32, 96, 64), s) == 1.0  # clipped to (0, 0, 32, 32)
    # Partly beyond the right edge: clipped to columns 5 .. 6 (glass) and row 0.
    assert mask_fraction(mask, (160, 0, 320, 32), s) == 0.0
    assert mask_fraction(mask, (64, 0, 320, 32), s) == pytest.approx(1 / 4)  # columns 2-5, 1 of 4 tissue
    assert mask_fraction(mask, (1000, 1000, 64, 64), s) == 0.0  # outside
    assert mask_fraction(mask, (-500, 0, 100, 32), s) == 0.0  # outside, to the left
    assert mask_fraction(mask, (4, 4, 8, 8), s) == 1.0  # far below one mask pixel
    # A scale per axis.
    assert mask_fraction(mask, (0, 0, 96, 128), (1 / 16, 1 / 32)) == pytest.approx(6 / 24)  # the whole mask
    assert mask_fraction(mask, (0, 0, 96, 128), 1 / 32) == pytest.approx(6 / 12)  # its left half


def test_mask_fraction_rejects_bad_input() -> None:
    mask = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="w > 0 and h > 0"):
        mask_fraction(mask, (0, 0, 0, 10), 0.5)
    with pytest.raises(ValueError, match="four numbers"):
        mask_fraction(mask, (0, 0, 10), 0.5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        mask_fraction(mask, (0, 0, 10, 10), 0)
    with pytest.raises(ValueError, match="2-D"):
        mask_fraction(np.ones((4, 4, 3)), (0, 0, 10, 10), 0.5)


# --------------------------------------------------------------------------- read_regions


SQUARE_WITH_HOLE = {
    "type": "Polygon",
    "coordinates": [
        [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
        [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]],
    ],
}
TWO_SQUARES = {
    "type": "MultiPolygon",
    "coordinates": [
        [[[200, 0], [210, 0], [210, 10], [200, 10], [200, 0]]],
        [[[300, 0], [320, 0], [320, 10], [300, 10], [300, 0]]],
    ],
}
TRIANGLE = {"type": "Polygon", "coordinates": [[[0, 200], [30, 200], [0, 230], [0, 200]]]}


def _feature(geometry: dict | None, **props: object) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation", **props}}


def _features() -> list[dict]:
    return [
        _feature(
            SQUARE_WITH_HOLE, name="Tumour core", classification={"name": "Tumor", "color": [200, 0, 0]}
        ),
        _feature(TWO_SQUARES, classification={"name": "Stroma"}),
        _feature(TRIANGLE),  # unnamed, unclassified
        _feature({"type": "Point", "coordinates": [5, 5]}, classification={"name": "Positive"}),
        _feature({"type": "LineString", "coordinates": [[0, 0], [10, 10]]}),
        _feature(
            box(500, 500, 510, 520).__geo_interface__, classification={"name": "Stroma"}
        ),  # repeated name
    ]


def _write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.mark.parametrize("shape", ["collection", "list", "feature"])
def test_read_regions_reads_all_three_shapes_of_qupath_export(tmp_path: Path, shape: str) -> None:
    features = _features()
    if shape == "feature":
        path = _write(tmp_path, "one.geojson", features[0])
        regions = read_regions(path)
        assert [r.name for r in regions] == ["Tumour core"]
        return
    data = {"type": "FeatureCollection", "features": features} if shape == "collection" else features
    path = _write(tmp_path, f"{shape}.geojson", data)
    with pytest.warns(DataWarning, match=r"skipped 2 features .*1 LineString, 1 Point") as record:
        regions = read_regions(path)
    assert len(record) == 1 and str(path) in str(record[0].message)
    assert [r.name for r in regions] == ["Tumour core", "Stroma", "region 3", "Stroma (2)"]
    assert [r.classification for r in regions] == ["Tumor", "Stroma", None, "Stroma"]
    assert regions[0].area_px == pytest.approx(100 * 100 - 20 * 20)  # the hole is honoured
    assert isinstance(regions[1].geometry, MultiPolygon) and regions[1].area_px == pytest.approx(100 + 200)
    assert regions[2].area_px == pytest.approx(450.0)
    assert isinstance(regions[0].geometry, Polygon)


def test_read_regions_repairs_invalid_outlines_and_skips_cells(tmp_path: Path) -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    cell = {
        "type": "Feature",
        "geometry": box(0, 0, 5, 5).__geo_interface__,
        "properties": {"objectType": "cell", "classification": {"name": "Positive"}},
    }
    path = _write(tmp_path, "a.geojson", [_feature(bowtie, name="bowtie"), cell])
    with pytest.warns(DataWarning, match="1 cell Polygon"):
        (region,) = read_regions(path)
    assert region.geometry.is_valid and region.area_px == pytest.approx(50.0)  # two triangles of 25


def test_read_regions_unique_names_do_not_collide_with_existing_ones(tmp_path: Path) -> None:
    a = box(0, 0, 1, 1).__geo_interface__
    path = _write(
        tmp_path, "a.geojson", [_feature(a, name="A"), _feature(a, name="A (2)"), _feature(a, name="A")]
    )
    assert [r.name for r in read_regions(path)] == ["A", "A (2)", "A (3)"]


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "invalid JSON"),
        (
            json.dumps([_feature({"type": "Point", "coordinates": [1, 2]})]),
            "no Polygon or MultiPolygon.*1 Point",
        ),
        (json.dumps({"type": "FeatureCollection", "features": []}), "no Polygon or MultiPolygon"),
        (json.dumps([_feature({"type": "Polygon", "coordinates": "abc"})]), "not a GeoJSON Polygon"),
        (
            json.dumps([_feature({"type": "Polygon", "coordinates": [[[0, 0], [1]]]})]),
            "not a GeoJSON Polygon",
        ),
        (json.dumps([_feature([[0, 0], [1, 1]])]), "'geometry' is not a GeoJSON geometry"),
        (json.dumps({"type": "Polygon", "coordinates": []}), "expected a GeoJSON FeatureCollection"),
        (json.dumps(42), "expected a GeoJSON FeatureCollection.*'int'"),
    ],
)
def test_read_regions_errors_name_the_file(tmp_path: Path, content: str, words: str) -> None:
    path = _write(tmp_path, "bad regions.geojson", content)
    with pytest.raises(ValueError, match=words) as err:
        read_regions(path)
    assert str(path) in str(err.value)


def test_read_regions_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.geojson"):
        read_regions(tmp_path / "nope.geojson")


# --------------------------------------------------------------------------- assign_regions


def test_assign_regions_hand_computed() -> None:
    holed = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], holes=[[(4, 4), (6, 4), (6, 6), (4, 6)]])
    regions = [Region("A", None, holed), Region("B", "Stroma", box(8, 0, 20, 20))]
    points = [
        (1, 1),  # A
        (5, 5),  # in A's hole, not in B
        (9, 5),  # in A and B: the first, A
        (10, 5),  # on A's outer boundary (and inside B): A
        (4, 5),  # on the hole's boundary: A's boundary, so inside
        (15, 5),  # B
        (20, 20),  # B's corner
        (25, 5),  # none
        (-0.5, 3),  # none, left of A
    ]
    assert assign_regions(points, regions).tolist() == [0, -1, 0, 0, 0, 1, 1, -1, -1]
    # Bare geometries too; order decides overlaps.
    assert assign_regions(points, [box(8, 0, 20, 20), holed]).tolist() == [1, -1, 0, 0, 1, 0, 0, -1, -1]


def test_assign_regions_edge_cases() -> None:
    out = assign_regions(np.zeros((0, 2)), [box(0, 0, 1, 1)])
    assert out.shape == (0,) and out.dtype == np.int64
    assert assign_regions([[0.5, 0.5]], []).tolist() == [-1]
    with pytest.raises(ValueError, match=r"shape \(N, 2\).*got shape \(3,\)"):
        assign_regions([1, 2, 3], [box(0, 0, 1, 1)])
    with pytest.raises(ValueError, match="point 1 is not finite"):
        assign_regions([[0, 0], [np.nan, 1]], [box(0, 0, 1, 1)])


def test_assign_regions_many_points_quickly() -> None:
    import time

    rng = np.random.default_rng(0)
    points = rng.uniform(0, 10_000, (1_000_000, 2))
    regions = [Point(3000, 3000).buffer(2000, 64), box(0, 0, 5000, 5000)] + [
        box(x, y, x + 150, y + 150) for x in range(0, 10_000, 400) for y in range(0, 10_000, 400)
    ]
    start = time.perf_counter()
    out = assign_regions(points, regions)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, elapsed  # about 0.5 s on a loaded laptop core
    inside_disc = (points[:, 0] - 3000) ** 2 + (points[:, 1] - 3000) ** 2 < 1999**2
    assert np.all(out[inside_disc] == 0)


@st.composite
def _rectangles_and_points(draw: st.DrawFn) -> tuple[list[tuple[float, float, float, float]], np.ndarray]:
    coord = st.integers(0, 20).map(float) | st.floats(0, 20, allow_nan=False, allow_infinity=False)
    rects = []
    for _ in range(draw(st.integers(0, 4))):
        x0, x1 = sorted((draw(coord), draw(coord)))
        y0, y1 = sorted((draw(coord), draw(coord)))
        if x1 - x0 < 0.5 or y1 - y0 < 0.5:
            continue
        rects.append((x0, y0, x1, y1))
    n = draw(st.integers(0, 30))
    pts = [(draw(coord), draw(coord)) for _ in range(n)]
    for x0, y0, x1, y1 in rects:  # points on the edges and corners, where "covers" matters
        pts += [(x0, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x1, y1)]
    return rects, np.asarray(pts, dtype=np.float64).reshape(-1, 2)


@settings(max_examples=150)
@given(_rectangles_and_points())
def test_assign_regions_agrees_with_shapely_covers(case: tuple[list, np.ndarray]) -> None:
    rects, points = case
    geoms = [box(*r) for r in rects]
    expected = [next((i for i, g in enumerate(geoms) if g.covers(Point(x, y))), -1) for x, y in points]
    assert (
        assign_regions(points, [Region(f"r{i}", None, g) for i, g in enumerate(geoms)]).tolist() == expected
    )


# --------------------------------------------------------------------------- summarize


NAMES = ["negative", "positive", "stroma"]
CLASSES = [0, 1, 1, 0, 0, 2, 1, 0]  # 4 negative, 3 positive, 1 stroma


def test_summarize_counts_index_and_densities() -> None:
    s = summarize(CLASSES, NAMES, mpp=0.5, tissue_area_px=8e6)
    assert s["cells"] == 8
    assert s["counts"] == {"negative": 4, "positive": 3, "stroma": 1}
    assert s["index"] == {"class": "positive", "value": pytest.approx(3 / 8)}
    assert s["tissue_area_mm2"] == pytest.approx(2.0)  # 8e6 px * 0.25 um2 / 1e6
    assert s["cells_per_mm2"] == pytest.approx({"all": 4.0, "negative": 2.0, "positive": 1.5, "stroma": 0.5})
    assert s["regions"] == []
    json.dumps(s, allow_nan=False)  # JSON-ready


def test_summarize_without_mpp_or_area_has_no_densities() -> None:
    s = summarize(CLASSES, NAMES, tissue_area_px=8e6)
    assert s["tissue_area_mm2"] is None and s["cells_per_mm2"] is None
    assert summarize(CLASSES, NAMES, mpp=0.5)["cells_per_mm2"] is None
    assert summarize(CLASSES, NAMES, mpp=0.5, tissue_area_px=0)["cells_per_mm2"] is None
    # Different pixel sizes along x and y.
    assert summarize(CLASSES, NAMES, mpp=(0.5, 0.25), tissue_area_px=8e6)["tissue_area_mm2"] == pytest.approx(
        1.0
    )


def test_summarize_index_class_choice() -> None:
    assert summarize([0, 1], ["other", "Ki-67"])["index"] == {"class": "Ki-67", "value": 0.5}
    assert summarize([0, 1], ["tumor_negative", "TUMOR_POSITIVE"])["index"]["class"] == "TUMOR_POSITIVE"
    # No class so named: class 1 (cellkit's class of interest); one class: no index.
    assert summarize([0, 1, 1], ["a", "b"])["index"] == {"class": "b", "value": pytest.approx(2 / 3)}
    assert summarize([0, 0], ["cells"])["index"] is None
    assert summarize([0, 1, 1], ["a", "b"], index_class="a")["index"] == {
        "class": "a",
        "value": pytest.approx(1 / 3),
    }
    assert summarize([], ["negative", "positive"])["index"] == {"class": "positive", "value": None}
    with pytest.raises(ValueError, match="Did you mean 'positive'"):
        summarize([0], ["negative", "positive"], index_class="postive")


def test_summarize_regions() -> None:
    regions = [Region("core", "Tumor", box(0, 0, 2000, 1000)), Region("margin", None, box(0, 0, 4000, 1000))]
    region_index = [0, 0, 0, 1, -1, 1, 1, -1]  # core: classes 0, 1, 1; margin: 0, 2, 1
    s = summarize(CLASSES, NAMES, mpp=0.5, tissue_area_px=8e6, region_index=region_index, regions=regions)
    core, margin = s["regions"]
    assert core == {
        "name": "core",
        "classification": "Tumor",
        "area_mm2": pytest.approx(0.5),
        "tissue_area_mm2": pytest.approx(0.5),  # no tissue areas given: the whole region
        "cells": 3,
        "counts": {"negative": 1, "positive": 2, "stroma": 0},
        "index": {"class": "positive", "value": pytest.approx(2 / 3)},
        "cells_per_mm2": pytest.approx({"all": 6.0, "negative": 2.0, "positive": 4.0, "stroma": 0.0}),
    }
    assert margin["area_mm2"] == pytest.approx(1.0) and margin["cells"] == 3
    assert margin["counts"] == {"negative": 1, "positive": 1, "stroma": 1}
    assert margin["cells_per_mm2"]["all"] == pytest.approx(3.0)
    assert s["cells"] == 8  # the slide counts every cell, in a region or not
    # Without mpp: counts and indices, no areas.
    s = summarize(CLASSES, NAMES, region_index=region_index, regions=regions)
    assert s["regions"][0]["area_mm2"] is None and s["regions"][0]["cells_per_mm2"] is None
    assert s["regions"][0]["counts"]["positive"] == 2
    # With the tissue inside each region: densities over it, the outline's area kept beside.
    s = summarize(CLASSES, NAMES, mpp=0.5, tissue_area_px=3e6, region_index=region_index, regions=regions,
                  region_tissue_px=[1e6, 2e6])
    core, margin = s["regions"]
    assert core["area_mm2"] == pytest.approx(0.5) and core["tissue_area_mm2"] == pytest.approx(0.25)
    assert core["cells_per_mm2"]["all"] == pytest.approx(12.0) and margin["cells_per_mm2"]["all"] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="one per region"):
        summarize(CLASSES, NAMES, mpp=0.5, region_index=region_index, regions=regions, region_tissue_px=[1.0])


def test_tissue_in_regions_counts_tissue_not_glass() -> None:
    from cellkit.wsi.pipeline import tissue_in_regions

    mask = np.zeros((40, 40), bool)
    mask[:, :20] = True  # tissue on the left half of a 4000 x 4000 slide (thumbnail at 1/100)
    regions = [Region("half glass", None, box(1000, 0, 3000, 4000)),  # 2000 x 4000, half of it tissue
               Region("all tissue", None, box(0, 0, 1000, 1000)),
               Region("tiny", None, box(10, 10, 20, 20))]  # smaller than a thumbnail pixel, on tissue
    union, each = tissue_in_regions(mask, (0.01, 0.01), regions)
    assert each == pytest.approx([4e6, 1e6, 100.0])
    assert union == pytest.approx(4e6 + 1e6 + 100.0)  # no overlap between the first two
    overlapping = [Region("a", None, box(0, 0, 2000, 2000)), Region("b", None, box(0, 0, 1000, 4000))]
    union, each = tissue_in_regions(mask, (0.01, 0.01), overlapping)
    assert each == pytest.approx([4e6, 4e6]) and union == pytest.approx(6e6)  # the shared 2e6 counted once


def test_summarize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"class 3 has no name: expected classes in 0..2"):
        summarize([0, 3], NAMES)
    with pytest.raises(ValueError, match="class -1"):
        summarize([-1], NAMES)
    with pytest.raises(ValueError, match="integer class indices"):
        summarize([0.5], NAMES)
    with pytest.raises(ValueError, match="unique"):
        summarize([0], ["a", "a"])
    with pytest.raises(ValueError, match="mpp must be > 0"):
        summarize([0], NAMES, mpp=0)
    with pytest.raises(ValueError, match="without region_index"):
        summarize([0], NAMES, regions=[Region("r", None, box(0, 0, 1, 1))])
    with pytest.raises(ValueError, match="without regions"):
        summarize([0], NAMES, region_index=[0])
    with pytest.raises(ValueError, match=r"one region per cell: \(1,\)"):
        summarize([0], NAMES, region_index=[0, 0], regions=[Region("r", None, box(0, 0, 1, 1))])
    with pytest.raises(ValueError, match=r"-1..0"):
        summarize([0], NAMES, region_index=[1], regions=[Region("r", None, box(0, 0, 1, 1))])


# --------------------------------------------------------------------------- write_summary


def test_write_summary_json_and_csv(tmp_path: Path) -> None:
    regions = [Region("core", "Tumor", box(0, 0, 2000, 1000)), Region("empty", None, box(0, 0, 10, 10))]
    region_index = [0, 0, 0, -1, -1, -1, -1, -1]  # core: classes 0, 1, 1
    s = summarize(CLASSES, NAMES, mpp=0.5, tissue_area_px=8e6, region_index=region_index, regions=regions)
    json_path, csv_path = write_summary(tmp_path / "out", "slide-01", s)
    assert json_path == tmp_path / "out" / "slide-01.summary.json"
    assert csv_path == tmp_path / "out" / "slide-01.summary.csv"
    text = json_path.read_text()
    assert text.startswith('{\n  "cells": 8,')  # indent 2
    assert json.loads(text) == json.loads(json.dumps(s))
    rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    assert rows[0] == ["scope", "name", "cells", "area_mm2", "cells_per_mm2", *NAMES, "index"]
    assert rows[1] == ["slide", "slide-01", "8", "2.0", "4.0", "4", "3", "1", "0.375"]
    assert rows[2][:3] == ["region", "core", "3"]
    assert float(rows[2][3]) == pytest.approx(0.5) and float(rows[2][4]) == pytest.approx(6.0)
    assert rows[2][5:] == ["1", "2", "0", repr(2 / 3)]
    assert rows[3][:3] == ["region", "empty", "0"] and rows[3][-1] == ""  # no cells: no index
    assert len(rows) == 4
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_write_summary_without_areas_and_with_clashing_class_names(tmp_path: Path) -> None:
    s = summarize([0, 1, 1], ["cells", "index"], index_class="index")
    _, csv_path = write_summary(tmp_path, "s", s)
    rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    assert rows[0] == [
        "scope",
        "name",
        "cells",
        "area_mm2",
        "cells_per_mm2",
        "count_cells",
        "count_index",
        "index",
    ]
    assert rows[1] == ["slide", "s", "3", "", "", "1", "2", repr(2 / 3)]


def test_write_summary_rejects_bad_input(tmp_path: Path) -> None:
    s = summarize([0], NAMES)
    with pytest.raises(ValueError, match="stem"):
        write_summary(tmp_path, "a/b", s)
    with pytest.raises(ValueError, match="lacks"):
        write_summary(tmp_path, "a", {"cells": 1})
    with pytest.raises(ValueError, match="NaN"):
        write_summary(tmp_path, "a", {**s, "tissue_area_mm2": float("nan")})


# --------------------------------------------------------------------------- draw_thumbnail


def test_draw_thumbnail_writes_a_two_panel_png_without_pyplot_state(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    image, truth, _, _ = _synthetic_thumbnail()
    rng = np.random.default_rng(2)
    rows, cols = np.nonzero(truth)
    pick = rng.choice(len(rows), 400, replace=False)
    points = np.c_[cols[pick], rows[pick]] + 0.5
    classes = rng.integers(0, 2, 400)
    before = plt.get_fignums()
    path = tmp_path / "pictures" / "slide.overview.png"
    draw_thumbnail(
        image, path, tissue=truth, points=points, classes=classes, class_names=["negative", "positive"]
    )
    assert plt.get_fignums() == before
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert width > height
    # Many points (density only), no mask, no classes; and a tall thumbnail stays wider than tall.
    many = rng.uniform(0, 200, (6000, 2))
    draw_thumbnail(image, path, points=many, density_sigma=0)
    tall = np.ascontiguousarray(np.repeat(image, 4, axis=0)[:, :100])
    draw_thumbnail(tall, tmp_path / "tall.png")
    with Image.open(tmp_path / "tall.png") as png:
        assert png.size[0] > png.size[1]
    assert plt.get_fignums() == before


def test_density_map_in_cells_per_mm2_matches_a_known_density() -> None:
    # One cell every 4 x 4 thumbnail pixels of 8 um: 1 cell per (32 um)² = 976.6 cells per mm².
    ys, xs = np.mgrid[2:200:4, 2:200:4]
    points = np.c_[xs.ravel(), ys.ravel()].astype(float)
    pixel_area = (8e-3) ** 2
    d = density_map(points, (200, 200), sigma=6.0, pixel_area_mm2=pixel_area)
    inside = d[40:160, 40:160]  # away from the border, where zero padding takes density away
    assert inside.mean() == pytest.approx(1 / (32e-3) ** 2, rel=1e-3)
    assert inside.std() / inside.mean() < 0.01  # smooth at sigma > the lattice's spacing
    assert d.sum() * pixel_area == pytest.approx(len(points), rel=0.05)  # a few % lost at the border
    raw = density_map(points, (200, 200), sigma=0.0)
    assert raw.sum() == len(points) and raw.max() == 1.0  # cells per pixel without an area


def test_draw_thumbnail_with_a_pixel_size_labels_the_density_in_mm2(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    labels: list[str] = []
    original = Figure.colorbar

    def spy(self, *args, **kwargs):  # the colour bar's label, read where the figure makes it
        bar = original(self, *args, **kwargs)
        real = bar.set_label
        bar.set_label = lambda text, *a, **k: (labels.append(text), real(text, *a, **k))[1]
        return bar

    image = np.full((40, 60, 3), 240, np.uint8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "colorbar", spy)
        draw_thumbnail(image, tmp_path / "um.png", points=[[10, 10]], pixel_um=8.0)
        draw_thumbnail(image, tmp_path / "px.png", points=[[10, 10]])
    assert labels == ["cells per mm² (smoothed)", "cells per thumbnail pixel (smoothed)"]
    with pytest.raises(ValueError, match=r"draw_thumbnail: pixel_um must be > 0"):
        draw_thumbnail(image, tmp_path / "bad.png", pixel_um=0.0)
    assert not (tmp_path / "bad.png").exists()


def test_draw_thumbnail_shows_regions_and_the_class_of_interest(tmp_path: Path) -> None:
    from matplotlib.axes import Axes

    titles: list[str] = []
    plotted: list[np.ndarray] = []
    original_title, original_plot = Axes.set_title, Axes.plot

    def spy_title(self, text, *a, **k):
        titles.append(text)
        return original_title(self, text, *a, **k)

    def spy_plot(self, *args, **kwargs):
        plotted.append(np.asarray(args[0]))
        return original_plot(self, *args, **kwargs)

    image = np.full((40, 60, 3), 240, np.uint8)
    square = np.array([[5, 5], [25, 5], [25, 25], [5, 25], [5, 5]], float)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Axes, "set_title", spy_title)
        mp.setattr(Axes, "plot", spy_plot)
        draw_thumbnail(image, tmp_path / "t.png", points=[[10, 10], [12, 12], [30, 30]], classes=[1, 0, 1],
                       class_names=["negative", "positive"], regions=[("core", square)], density_class=1)
    assert any(np.array_equal(x, square[:, 0]) for x in plotted)  # the region's outline is drawn
    assert any(t.startswith("density of positive cells (2 positive cells") for t in titles)
    with pytest.raises(ValueError, match="density_class 5"):
        draw_thumbnail(image, tmp_path / "bad.png", points=[[1, 1]], classes=[0], density_class=5)


def test_draw_thumbnail_rejects_bad_input(tmp_path: Path) -> None:
    image = np.full((20, 30, 3), 240, np.uint8)
    with pytest.raises(ValueError, match=r"tissue mask has shape \(30, 20\), the thumbnail \(20, 30\)"):
        draw_thumbnail(image, tmp_path / "a.png", tissue=np.zeros((30, 20), bool))
    with pytest.raises(ValueError, match="2 classes for 1 points"):
        draw_thumbnail(image, tmp_path / "a.png", points=[[1, 2]], classes=[0, 1])
    with pytest.raises(ValueError, match="class 2 has no name"):
        draw_thumbnail(image, tmp_path / "a.png", points=[[1, 2]], classes=[2], class_names=["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        draw_thumbnail(image.astype(np.float32), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_modules_declare_their_api() -> None:
    from cellkit.wsi import regions, summary, tissue

    for module in (tissue, regions, summary):
        assert module.__doc__ and module.__all__
        for name in module.__all__:
            obj = getattr(module, name)
            assert not callable(obj) or (obj.__doc__ and "Examples:" in obj.__doc__), (
                f"{module.__name__}.{name}"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Region("a", None, box(0, 0, 2, 3)).area_px == 6.0
