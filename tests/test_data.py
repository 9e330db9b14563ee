"""Readers, writers, class maps, splits and the bundled EndoNuke sample (cellkit.data)."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cellkit.data import (
    BCDATA,
    ENDONUKE_EPITHELIUM,
    FORMATS,
    ClassMap,
    DataError,
    DataWarning,
    Sample,
    atomic_write,
    bcdata_group,
    bundled_endonuke,
    detect_format,
    endonuke_group,
    get_class_map,
    load_dataset,
    read_bcdata_h5,
    read_csv_points,
    read_endonuke_labels,
    read_geojson_points,
    read_image,
    split_by_group,
    write_bytes_atomic,
    write_csv,
    write_geojson,
    write_text_atomic,
)
from cellkit.data import bundled as bundled_module
from cellkit.data.io import to_rgb_uint8
from cellkit.points import Detections

from conftest import need_shared  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BCDATA_SAMPLE = REPO / ".." / "shared" / "data" / "bcdata_sample"


def rgb(h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------- images


def test_read_image_rgb_png_and_jpeg(tmp_path):
    img = rgb()
    assert np.array_equal(read_image(save_png(tmp_path / "a.png", img)), img)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == img.shape and out.dtype == np.uint8


def test_read_image_greyscale_is_expanded_without_warning(tmp_path):
    grey = rgb()[:, :, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(save_png(tmp_path / "g.png", grey))
    assert out.shape == (8, 10, 3)
    assert all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_read_image_opaque_alpha_dropped_silently(tmp_path):
    rgba = np.dstack([rgb(), np.full((8, 10), 255, np.uint8)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(save_png(tmp_path / "o.png", rgba))
    assert np.array_equal(out, rgba[:, :, :3])


def test_read_image_transparent_alpha_warns(tmp_path):
    alpha = np.full((8, 10), 255, np.uint8)
    alpha[:4] = 0
    rgba = np.dstack([rgb(), alpha])
    with pytest.warns(DataWarning, match=r"t\.png: 50% of the pixels are \(partly\) transparent"):
        out = read_image(save_png(tmp_path / "t.png", rgba))
    assert np.array_equal(out, rgba[:, :, :3])


def test_read_image_16bit_is_scaled_with_warning(tmp_path):
    grey16 = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(grey16).save(path)
    with pytest.warns(DataWarning, match="16-bit image scaled to 8 bits"):
        out = read_image(path)
    assert out[0, :, 0].tolist() == [0, 1, 255, 4]


def test_read_image_12bit_in_16bit_hints_dark(tmp_path):
    path = tmp_path / "g12.png"
    Image.fromarray(np.array([[0, 4000]], dtype=np.uint16)).save(path)
    with pytest.warns(DataWarning, match="12-bit or lower"):
        read_image(path)


def test_read_image_16bit_rgb_tiff(tmp_path):
    import tifffile

    arr = np.zeros((4, 5, 3), np.uint16)
    arr[..., 1] = 65535
    tifffile.imwrite(tmp_path / "a.tif", arr)
    with pytest.warns(DataWarning, match="16-bit"):
        out = read_image(tmp_path / "a.tif")
    assert out.shape == (4, 5, 3) and out[..., 1].min() == 255 and out[..., 0].max() == 0


def test_read_image_palette(tmp_path):
    img = Image.fromarray(rgb()).convert("P")
    img.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8


def test_read_image_truncated_names_file(tmp_path):
    path = save_png(tmp_path / "cut.png", rgb(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.png: cannot read the image.*truncated"):
        read_image(path)


def test_read_image_corrupt_names_file(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk\.png: cannot read the image"):
        read_image(path)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_to_rgb_uint8_float_and_errors():
    out, notes = to_rgb_uint8(np.full((2, 2), 1.0))
    assert out.max() == 255 and notes == []
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\]"):
        to_rgb_uint8(np.full((2, 2), 3.0))
    with pytest.raises(DataError, match="expected an image of shape"):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's 0600


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# --------------------------------------------------------------------------- class maps


def test_class_map_presets():
    assert [ENDONUKE_EPITHELIUM(i) for i in (0, 1, 2)] == [0, 1, 0]
    assert ENDONUKE_EPITHELIUM.names == ("other", "epithelium")
    assert BCDATA("positive") == 1 and BCDATA("Negative") == 0
    assert BCDATA.names == ("negative", "positive")
    assert get_class_map("endonuke_epithelium") is ENDONUKE_EPITHELIUM


def test_class_map_parse_forms():
    a = ClassMap.parse(["0=0", "1=1", "2=0"], names=["other", "epithelium"])
    b = ClassMap.parse("0=0, 1=1, 2=0", names=["other", "epithelium"])
    c = ClassMap.parse({"0": 0, "1": 1, "2": "other"}, names=["other", "epithelium"])
    for cmap in (a, b, c):
        assert cmap.map_labels([0, "1", 2]).tolist() == [0, 1, 0]
    named = ClassMap.parse("Tumor=positive,Stroma=other,*=other")
    assert named.names == ("positive", "other")
    assert named("tumor") == 0 and named("anything") == 1
    assert ClassMap.parse("a=0,b=1").names == ("class0", "class1")
    with pytest.raises(ValueError, match=r"uses classes \{0, 2\}.*use a=0,b=1"):
        ClassMap.parse("a=0,b=2")  # class 1 would be trained with no cell
    assert ClassMap.parse(a) is a
    assert ClassMap.from_dict(a.to_dict()) == a
    assert ClassMap.identity(3)(2) == 2
    assert ClassMap.from_names(["other", "positive"])("positive") == 1


def test_class_map_unknown_label_lists_mapped_labels():
    with pytest.raises(DataError, match=r"f\.csv: line 3: label 'Tumour' is not in the class map; "
                       r"mapped labels are \['negative', 'positive'\]"):
        BCDATA("Tumour", "f.csv: line 3")


@pytest.mark.parametrize(
    ("spec", "names", "match"),
    [
        (["a=5"], ["x", "y"], r"target must be an integer class index in 0\.\.1"),
        (["a"], None, r"must look like 'source=target'"),
        ({"a": "zzz"}, ["x", "y"], r"'zzz' is not a class name"),
        ({"a": 0, "A": 1}, ["x", "y"], "maps label 'A' twice"),
    ],
)
def test_class_map_bad_specs(spec, names, match):
    with pytest.raises(ValueError, match=match):
        ClassMap.parse(spec, names=names)


def test_class_map_unknown_preset_suggests():
    with pytest.raises(ValueError, match="Did you mean 'endonuke_epithelium'"):
        get_class_map("endonuke_epitelium")


# --------------------------------------------------------------------------- CSV


def test_csv_round_trip_detections(tmp_path):
    det = Detections(
        points=np.array([[0.1, 2.5], [7.0, 3.25]], np.float32),
        classes=np.array([1, 0]),
        scores=np.array([0.9, 0.3], np.float32),
    )
    write_csv(tmp_path / "a.csv", det)
    assert (tmp_path / "a.csv").read_text().splitlines() == [
        "x,y,class,score", "0.1,2.5,1,0.9", "7,3.25,0,0.3"
    ]
    rec = read_csv_points(tmp_path / "a.csv")
    assert np.array_equal(rec.points.astype(np.float32), det.points)
    assert rec.classes.tolist() == [1, 0]
    assert np.array_equal(rec.scores, det.scores)


def test_csv_round_trip_annotations_and_empty(tmp_path):
    pts = np.random.default_rng(0).uniform(0, 9, (20, 2))
    cls = np.random.default_rng(1).integers(0, 3, 20)
    write_csv(tmp_path / "a.csv", points=pts, classes=cls)
    rec = read_csv_points(tmp_path / "a.csv")
    assert np.array_equal(rec.points, pts) and np.array_equal(rec.classes, cls) and rec.scores is None
    write_csv(tmp_path / "e.csv", points=np.zeros((0, 2)), classes=[])
    assert (tmp_path / "e.csv").read_text() == "x,y,class\n"
    assert len(read_csv_points(tmp_path / "e.csv")) == 0


def test_csv_folder_load_keeps_scores_and_maps_classes(tmp_path):
    save_png(tmp_path / "img2.png", rgb())
    save_png(tmp_path / "img10.png", rgb(seed=1))
    (tmp_path / "img2.csv").write_text("class,x,y,score\npositive,1,2,0.5\nnegative,3,4,0.25\n")
    (tmp_path / "img10.csv").write_text("x,y,class,score\n")
    samples = load_dataset(tmp_path, "csv", class_map="bcdata")
    assert [s.key for s in samples] == ["img2", "img10"]
    assert samples[0].classes.tolist() == [1, 0]
    assert samples[0].scores.tolist() == [0.5, 0.25]
    assert samples[0].path.endswith("img2.png") and len(samples[1]) == 0
    assert detect_format(tmp_path) == "csv"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("12,3,1\n", r"line 1: expected a header with the columns x,y,class"),
        ("x,y,class\n1,2,1.5\n", r"line 2: class '1\.5' is not an integer"),
        ("x,y,class\n1,2,1\n1,2,-1\n", r"line 3: class '-1' is negative"),
        ("x,y,class\n1,2,tumor\n", r"line 2: class 'tumor' is not an integer; pass a class map"),
        ("x,y,class\n1,2,1\n3,4\n", r"line 3: expected 3 fields \(x,y,class\), got 2.*truncated"),
        ("x,y,class\n1,abc,1\n", r"line 2: y = 'abc' is not a number"),
        ("x,y,class\n1,nan,1\n", r"line 2: y = 'nan' is not finite"),
        ("", r"the file is empty; expected at least the header line"),
        ("x,y,class\n1,2,0\n11,2,0\n", r"line 3: point \(x=11, y=2\) lies outside the 8x10 \(HxW\) image"),
        ("x,y,class\n1,-0.5,0\n", r"line 2: point \(x=1, y=-0.5\) lies outside"),
    ],
)
def test_csv_bad_inputs_name_file_and_line(tmp_path, content, match):
    save_png(tmp_path / "bad.png", rgb())
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "bad.csv")) + ".*" + match):
        load_dataset(tmp_path, "csv")


def test_csv_unpaired_files_raise_or_skip(tmp_path):
    save_png(tmp_path / "good.png", rgb())
    (tmp_path / "good.csv").write_text("x,y,class\n1,1,0\n")
    (tmp_path / "orphan.csv").write_text("x,y,class\n")
    save_png(tmp_path / "lonely.png", rgb())
    with pytest.raises(DataError, match=r"lonely\.png: image with no label file; expected lonely\.csv"):
        load_dataset(tmp_path, "csv")
    (tmp_path / "lonely.png").unlink()
    with pytest.raises(DataError, match=r"orphan\.csv: label file with no image"):
        load_dataset(tmp_path, "csv")
    save_png(tmp_path / "lonely.png", rgb())
    with pytest.warns(DataWarning, match=r"skipped 2 of 3 images:(.|\n)*lonely\.png(.|\n)*orphan\.csv"):
        samples = load_dataset(tmp_path, "csv", on_error="skip")
    assert [s.key for s in samples] == ["good"]


def test_skip_mode_skips_corrupt_images_and_bad_labels(tmp_path):
    save_png(tmp_path / "a.png", rgb())
    (tmp_path / "a.csv").write_text("x,y,class\n1,1,0\n")
    (tmp_path / "b.png").write_bytes(b"garbage")
    (tmp_path / "b.csv").write_text("x,y,class\n")
    save_png(tmp_path / "c.png", rgb())
    (tmp_path / "c.csv").write_text("x,y,class\n100,1,0\n")
    expected = r"skipped 2 of 3(.|\n)*b\.png: cannot read the image(.|\n)*c\.csv: line 2"
    with pytest.warns(DataWarning, match=expected):
        samples = load_dataset(tmp_path, "csv", on_error="skip")
    assert [s.key for s in samples] == ["a"]


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        load_dataset(tmp_path / "missing", "csv")
    with pytest.raises(ValueError, match="Did you mean 'geojson'"):
        load_dataset(tmp_path, "geojsn")
    with pytest.raises(ValueError, match="on_error must be"):
        load_dataset(tmp_path, "csv", on_error="ignore")
    with pytest.raises(DataError, match="no images or label files"):
        load_dataset(tmp_path, "csv")
    assert set(FORMATS) == {"csv", "bcdata", "endonuke", "geojson", "slides"}  # slides: cellkit.wsi.training


# --------------------------------------------------------------------------- GeoJSON


def test_geojson_round_trip_detections(tmp_path):
    det = Detections(
        points=np.array([[1.5, 2.0], [7.0, 3.0], [0.0, 0.0]], np.float32),
        classes=np.array([1, 0, 1]),
        scores=np.array([0.9, 0.3, 0.75], np.float32),
    )
    names = ["other", "positive"]
    write_geojson(tmp_path / "a.geojson", det, names)
    data = json.loads((tmp_path / "a.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 3
    f0 = data["features"][0]
    assert f0["type"] == "Feature"
    assert f0["geometry"] == {"type": "Point", "coordinates": [1.5, 2.0]}
    props = f0["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] == "positive"
    assert len(props["classification"]["color"]) == 3
    assert props["measurements"] == {"score": 0.9}
    rec = read_geojson_points(tmp_path / "a.geojson", ClassMap.from_names(names))
    assert np.array_equal(rec.points.astype(np.float32), det.points)
    assert rec.classes.tolist() == [1, 0, 1]
    assert np.array_equal(rec.scores, det.scores)
    # Every feature has a UUID, different per cell and the same when written again.
    ids = [f["id"] for f in data["features"]]
    assert len(set(ids)) == 3 and all(len(i) == 36 and i.count("-") == 4 for i in ids)
    write_geojson(tmp_path / "b.geojson", det, names, indent=2)
    assert [f["id"] for f in json.loads((tmp_path / "b.geojson").read_text())["features"]] == ids
    write_geojson(tmp_path / "c.geojson", det, names, ids=False)
    assert all("id" not in f for f in json.loads((tmp_path / "c.geojson").read_text())["features"])


@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=40),
       wide=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=40))
def test_number_texts_are_the_shortest_exact_ones(values, wide):
    from cellkit.data.writers import _json_floats, _num, _texts

    edges = [12.0, -0.0, 1e-7, 3e20, 1e16, 9999999999999998.0, 1e-4, 0.00012, -0.00099, 1e-3]
    for arr in (np.array(values, np.float32), np.array(wide, np.float64), np.array(edges),
                np.array(edges, np.float32)):
        texts = _texts(arr)
        assert texts == [_num(v) for v in arr]
        assert _json_floats(texts) == [json.dumps(float(_num(v))) for v in arr]
        finite = np.isfinite(arr)
        assert np.array_equal(np.array([float(t) for t in texts], arr.dtype)[finite], arr[finite])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_scores", [True, False])
def test_compact_geojson_is_the_json_of_its_features(tmp_path, dtype, with_scores):
    # The compact file is put together from text (fast); it must be exactly what json.dumps
    # writes for the same features (the indented file is written with json.dump).
    rng = np.random.default_rng(0)
    points = (rng.random((300, 2)) * 90000).astype(dtype)
    points[:3] = [[12, 3], [1e-7, 0], [0.1, 2.5]]
    scores = rng.random(300).astype(np.float32) if with_scores else None
    classes = rng.integers(0, 3, 300)
    kwargs = {"points": points, "classes": classes, "scores": scores, "class_names": ["a", 'b "q"', "c"]}
    write_geojson(tmp_path / "compact.geojson", **kwargs)
    write_geojson(tmp_path / "indented.geojson", indent=1, **kwargs)
    features = json.loads((tmp_path / "indented.geojson").read_text())
    assert (tmp_path / "compact.geojson").read_text() == json.dumps(features) + "\n"
    assert (tmp_path / "indented.geojson").read_text().endswith("}\n")


def test_geojson_annotations_folder_round_trip(tmp_path):
    save_png(tmp_path / "t1.png", rgb())
    write_geojson(tmp_path / "t1.geojson", points=[[2, 3], [4, 5]], classes=[0, 2],
                  class_names=["stroma", "epithelium", "other"])
    feature = json.loads((tmp_path / "t1.geojson").read_text())["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert "measurements" not in feature["properties"]
    cmap = ClassMap.from_names(["stroma", "epithelium", "other"])
    samples = load_dataset(tmp_path, "geojson", class_map=cmap)
    assert samples[0].points.tolist() == [[2, 3], [4, 5]] and samples[0].classes.tolist() == [0, 2]
    assert samples[0].scores is None
    assert detect_format(tmp_path) == "geojson"


def test_geojson_reads_qupath_variants(tmp_path):
    features = [
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 1], [2, 2]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Positive", "colorRGB": -1}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]},
         "properties": {"classification": {"names": ["Tumor", "Negative"], "color": [0, 0, 255]},
                        "measurements": [{"name": "Score", "value": 0.5}]}},
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]},
         "properties": {"classification": {"name": "Region"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [4, 4, 0]}, "properties": {}},
    ]
    (tmp_path / "q.geojson").write_text(json.dumps(features))
    cmap = ClassMap.parse({"Positive": 1, "Tumor: Negative": 0, "Unclassified": 0},
                          names=["other", "positive"])
    rec = read_geojson_points(tmp_path / "q.geojson", cmap)
    assert rec.points.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert rec.classes.tolist() == [1, 1, 0, 0]
    assert rec.scores is None  # not every point has a score
    assert rec.ignored == {"Polygon": 1}
    save_png(tmp_path / "q.png", rgb())
    with pytest.warns(DataWarning, match="ignored GeoJSON features that are not cells: 1 Polygon"):
        load_dataset(tmp_path, "geojson", class_map=cmap)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"type": "FeatureCollection", "features": [', r"line 1 column \d+: invalid JSON.*truncated"),
        (json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [50, 1]},
                      "properties": {"classification": {"name": "1"}}}]),
         r"feature 0: point \(x=50, y=1\) lies outside"),
        (json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]},
                      "properties": {"classification": {"name": "Tumor"}}}]),
         r"feature 0 \(class 'Tumor'\): class 'Tumor' is not an integer; pass a class map"),
        (json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1]},
                      "properties": {"classification": {"name": "1"}}}]),
         r"feature 0: coordinates must be \[x, y\]"),
        (json.dumps({"type": "Polygon"}), r"expected a GeoJSON FeatureCollection"),
    ],
)
def test_geojson_bad_inputs(tmp_path, content, match):
    save_png(tmp_path / "g.png", rgb())
    (tmp_path / "g.geojson").write_text(content)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "g.geojson")) + ".*" + match):
        load_dataset(tmp_path, "geojson")


def test_geojson_unmapped_class_lists_mapping(tmp_path):
    (tmp_path / "g.geojson").write_text(json.dumps(
        [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]},
          "properties": {"classification": {"name": "Tumour"}}}]))
    with pytest.raises(DataError, match=r"feature 0.*label 'Tumour' is not in the class map; mapped "
                       r"labels are \['negative', 'positive'\]"):
        read_geojson_points(tmp_path / "g.geojson", BCDATA)


# --------------------------------------------------------------------------- EndoNuke layout


def make_endonuke(root: Path) -> Path:
    save_png(root / "images" / "5.png", np.dstack([rgb(), np.full((8, 10), 255, np.uint8)]))
    save_png(root / "images" / "12.png", rgb(seed=2))
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "5.txt").write_text("1 2 0\n3 4 1\n\n9 7 2\n")
    (root / "labels" / "12.txt").write_text("")
    return root


def test_endonuke_reader(tmp_path):
    root = make_endonuke(tmp_path / "en")
    samples = load_dataset(root, "endonuke")
    assert [s.key for s in samples] == ["5", "12"]
    assert samples[0].points.tolist() == [[1, 2], [3, 4], [9, 7]]
    assert samples[0].classes.tolist() == [0, 1, 2]
    assert len(samples[1]) == 0 and samples[0].image.shape == (8, 10, 3)
    two = load_dataset(root, "endonuke", class_map=ENDONUKE_EPITHELIUM)
    assert two[0].classes.tolist() == [0, 1, 0]
    assert detect_format(root) == "endonuke"
    assert read_endonuke_labels(root / "labels" / "5.txt").where == ["line 1", "line 2", "line 4"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("1 2 0\n3 4\n", r"5\.txt: line 2: expected 3 fields 'x y class', got 2"),
        ("1 2 0\n3 4 x\n", r"5\.txt: line 2: class 'x' is not an integer"),
        ("1 2 -2\n", r"5\.txt: line 1: class '-2' is negative"),
        ("1 2 0.5\n", r"5\.txt: line 1: class '0\.5' is not an integer"),
        ("10 2 0\n", r"5\.txt: line 1: point \(x=10, y=2\) lies outside the 8x10"),
    ],
)
def test_endonuke_bad_labels(tmp_path, content, match):
    root = make_endonuke(tmp_path / "en")
    (root / "labels" / "5.txt").write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(root, "endonuke")


def test_endonuke_unpaired(tmp_path):
    root = make_endonuke(tmp_path / "en")
    (root / "labels" / "7.txt").write_text("1 1 0\n")
    with pytest.raises(DataError, match=r"7\.txt: label file with no image; expected one of 7\.png"):
        load_dataset(root, "endonuke")
    (root / "labels" / "7.txt").unlink()
    (root / "labels" / "12.txt").unlink()
    with pytest.raises(DataError, match=r"12\.png: image with no label file; expected 12\.txt"):
        load_dataset(root, "endonuke")
    with pytest.warns(DataWarning, match=r"skipped 1 of 2 images"):
        assert len(load_dataset(root, "endonuke", on_error="skip")) == 1


def test_endonuke_missing_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"labels: no such folder; the EndoNuke layout"):
        load_dataset(tmp_path, "endonuke")


# --------------------------------------------------------------------------- BCData layout


def make_bcdata(root: Path) -> Path:
    for i, (pos, neg) in enumerate([([[1, 2], [3, 4]], [[5, 6]]), (None, [[0, 0]])]):
        save_png(root / "images" / "test" / f"{i}.png", rgb(seed=i))
        for name, data in (("positive", pos), ("negative", neg)):
            folder = root / "annotations" / "test" / name
            folder.mkdir(parents=True, exist_ok=True)
            with h5py.File(folder / f"{i}.h5", "w") as f:
                if data is None:
                    f.create_dataset("coordinates", data=np.zeros((0,), np.float64))
                else:
                    f.create_dataset("coordinates", data=np.asarray(data, np.int64))
    return root


def test_bcdata_reader_reads_empty_float_arrays(tmp_path):
    root = make_bcdata(tmp_path / "bc")
    samples = load_dataset(root, "bcdata")
    assert [s.key for s in samples] == ["test/0", "test/1"]
    by_class = {int(c): p.tolist() for c in (0, 1) for p in [samples[0].points[samples[0].classes == c]]}
    assert by_class == {1: [[1, 2], [3, 4]], 0: [[5, 6]]}
    assert samples[1].points.tolist() == [[0, 0]] and samples[1].classes.tolist() == [0]
    assert read_bcdata_h5(root / "annotations/test/positive/1.h5").shape == (0, 2)
    assert len(load_dataset(root, "bcdata", split="test")) == 2
    assert detect_format(root) == "bcdata"


@pytest.mark.parametrize(
    ("writer", "match"),
    [
        (lambda f: f.create_dataset("points", data=np.zeros((1, 2))),
         r"0\.h5: no dataset 'coordinates' in the HDF5 file \(it holds \['points'\]\)"),
        (lambda f: f.create_dataset("coordinates", data=np.zeros((3, 3))),
         r"0\.h5: dataset 'coordinates': points must have shape \(N, 2\) .*got shape \(3, 3\)"),
        (lambda f: f.create_dataset("coordinates", data=np.array([[1.0, np.nan]])),
         r"0\.h5: dataset 'coordinates': points must be finite, got NaN or infinity in row 0"),
        (lambda f: f.create_dataset("coordinates", data=np.array([[1, 20]])),
         r"0\.h5 dataset 'coordinates' row 0: point \(x=1, y=20\) lies outside"),
    ],
)
def test_bcdata_bad_h5(tmp_path, writer, match):
    root = make_bcdata(tmp_path / "bc")
    path = root / "annotations" / "test" / "positive" / "0.h5"
    with h5py.File(path, "w") as f:
        writer(f)
    with pytest.raises(DataError, match=match):
        load_dataset(root, "bcdata")


def test_bcdata_corrupt_and_missing_files(tmp_path):
    root = make_bcdata(tmp_path / "bc")
    path = root / "annotations" / "test" / "negative" / "1.h5"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"negative/1\.h5: cannot open the HDF5 file.*truncated"):
        load_dataset(root, "bcdata")
    with pytest.warns(DataWarning, match=r"skipped 1 of 2 images"):
        assert [s.key for s in load_dataset(root, "bcdata", on_error="skip")] == ["test/0"]
    path.unlink()
    with pytest.raises(DataError, match=r"1\.png: image with no label file .*negative/1\.h5"):
        load_dataset(root, "bcdata")
    (root / "images" / "test" / "0.png").unlink()
    with pytest.raises(DataError, match=r"0\.h5: label file with no image"):
        load_dataset(root, "bcdata")
    with pytest.raises(FileNotFoundError, match="no such split 'train'"):
        load_dataset(root, "bcdata", split="train")


def test_bcdata_sample_counts():
    # Counts from ../shared/data/bcdata_sample/README-SOURCE.md.
    need_shared(BCDATA_SAMPLE)
    samples = load_dataset(BCDATA_SAMPLE, "bcdata")
    assert len(samples) == 20
    counts = np.bincount(np.concatenate([s.classes for s in samples]), minlength=2)
    assert counts[BCDATA("positive")] == 1086 and counts[BCDATA("negative")] == 1173
    assert all(s.image.shape == (640, 640, 3) for s in samples)
    assert sorted(int(s.key.split("/")[1]) for s in samples) == list(range(20))


# --------------------------------------------------------------------------- bundled sample


@pytest.fixture(scope="module")
def bundled():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = load_dataset(bundled_endonuke(), "endonuke")
    return samples, [w for w in caught if issubclass(w.category, DataWarning)]


def test_bundled_sample_reads(bundled):
    samples, _ = bundled
    assert len(samples) == 251
    assert all(s.image.shape == (200, 200, 3) and s.image.dtype == np.uint8 for s in samples)
    classes = np.concatenate([s.classes for s in samples])
    assert np.bincount(classes).tolist() == [16816, 5674, 233]
    two = np.bincount(ENDONUKE_EPITHELIUM.map_labels(classes)).tolist()
    assert two == [16816 + 233, 5674]


def test_bundled_transparency_said_once_in_the_notice_not_on_every_read(bundled, tmp_path):
    samples, caught = bundled
    assert caught == []  # the bundled sample reads without a warning...
    notice = (bundled_endonuke() / "NOTICE.md").read_text()
    assert all(f"{i}.png" in notice for i in (741, 742, 743, 744)) and "transparent black" in notice
    edge = next(s for s in samples if s.key == "741")
    assert not edge.image[124:].any()  # ...and reads those rows as the black they hold
    # A copy of the sample elsewhere is a folder of the user's: warned, as any folder is.
    copy = tmp_path / "mine"
    for sub in ("images", "labels"):
        (copy / sub).mkdir(parents=True)
    for stem in ("741", "435"):
        shutil.copy(bundled_endonuke() / "images" / f"{stem}.png", copy / "images")
        shutil.copy(bundled_endonuke() / "labels" / f"{stem}.txt", copy / "labels")
    with pytest.warns(DataWarning, match=r"1 of 2 images had transparent pixels.*741\.png"):
        load_dataset(copy, "endonuke")


def test_bundled_attribution_files():
    root = bundled_endonuke()
    notice = (root / "NOTICE.md").read_text()
    assert "10.3390/data7060075" in notice and "CC BY 4.0" in notice and "ispras/endonet" in notice
    assert (root / "README-SOURCE.md").is_file()
    assert (root / "LICENSE-ispras-endonet-Apache-2.0.txt").is_file()
    assert len((root / "images.txt").read_text().split()) == 251


def test_bundled_missing_says_where_and_data_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled_module, "_REPO_ROOT", tmp_path)
    expected = re.escape(str(tmp_path / "data" / "endonuke")) + r"(.|\n)*--data"
    with pytest.raises(FileNotFoundError, match=expected):
        bundled_endonuke()


# --------------------------------------------------------------------------- Sample, splits


def test_sample_validates():
    with pytest.raises(ValueError, match="outside"):
        Sample(rgb(), [[10, 0]], [0], "x")
    with pytest.raises(ValueError, match="RGB image"):
        Sample(np.zeros((4, 4), np.uint8), [], [], "x")
    assert "points=1" in repr(Sample(rgb(), [[1, 1]], [0], "x"))


def test_split_by_group_is_disjoint_and_reproducible():
    keys = [str(i) for i in list(range(321, 420)) + list(range(4560, 4600))]
    parts = split_by_group(keys, endonuke_group, seed=3)
    again = split_by_group(keys, endonuke_group, seed=3)
    assert parts == again
    assert split_by_group(keys, endonuke_group, seed=4) != parts
    assert sorted(sum(parts.values(), [])) == sorted(keys)
    groups = {name: {endonuke_group(k) for k in ks} for name, ks in parts.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    n_groups = len({endonuke_group(k) for k in keys})
    assert len(groups["train"]) == round(0.7 * n_groups)


def test_split_by_group_counts_samples_and_bcdata():
    samples = [Sample(rgb(), [], [], f"test/{i}") for i in range(10)]
    parts = split_by_group(samples, bcdata_group, fractions=(6, 2, 2), seed=0)
    assert [len(v) for v in parts.values()] == [6, 2, 2]
    assert all(isinstance(s, Sample) for s in parts["train"])
    tiny = split_by_group(["a", "b", "c"], fractions=(0.9, 0.05, 0.05))
    assert [len(v) for v in tiny.values()] == [1, 1, 1]
    with pytest.raises(ValueError, match="only 10"):
        split_by_group(samples, bcdata_group, fractions=(8, 2, 2))
    with pytest.raises(ValueError, match="split names"):
        split_by_group(samples, fractions=(0.5, 0.5))


def test_group_functions():
    assert endonuke_group("4787") == 478 and endonuke_group("images/325.png") == 32
    assert endonuke_group("325", width=100) == 3
    assert bcdata_group("test/19") == 19
    with pytest.raises(ValueError, match="numeric id"):
        endonuke_group("abc")


def test_data_beside_the_repository_is_skipped_when_missing_unless_ci_asks(tmp_path, monkeypatch):
    monkeypatch.delenv("CELLKIT_REQUIRE_SHARED", raising=False)
    with pytest.raises(pytest.skip.Exception, match="lives in ../shared/data"):
        need_shared(tmp_path / "absent.svs")
    monkeypatch.setenv("CELLKIT_REQUIRE_SHARED", "1")
    with pytest.raises(pytest.fail.Exception, match="CELLKIT_REQUIRE_SHARED=1 asks for it"):
        need_shared(tmp_path / "absent.svs")
    assert need_shared(tmp_path) == tmp_path
