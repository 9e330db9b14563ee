"""Bad input data and configs that used to be accepted silently, or reported unclearly (issue 11).

Each test feeds one bad input and checks that cellkit stops with a message that says what was
expected, what it got and how to fix it, naming the user's file; or that it does what the
docs say, visibly. No test trains.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cellkit
from cellkit.cli import build_parser, build_train_config, main
from cellkit.config import CellkitConfig, ConfigError
from cellkit.data import ClassMap, DataError, DataWarning, load_dataset, read_geojson_points
from cellkit.postprocess import LocalPeaks


def _png(path: Path, h: int = 32, w: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _train_args(*argv: str):
    return build_parser().parse_args(["train", *argv])


def _no_data_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DataWarning)]


# --------------------------------------------------------------------------- 1. class maps


def test_class_map_with_a_gap_is_an_error_that_gives_the_fix() -> None:
    with pytest.raises(ValueError) as err:
        ClassMap.parse("0=0,1=5")
    msg = str(err.value)
    assert "class map 0=0,1=5" in msg and "uses classes {0, 5}" in msg  # what was got
    assert "0..K-1 with none left out" in msg  # what was expected
    assert "use 0=0,1=1" in msg  # how to fix it
    with pytest.raises(ValueError, match=r"uses classes \{0, 2\}.*use Tumor=0,\*=1"):
        ClassMap.parse("Tumor=0,*=2")


def test_class_names_must_be_one_per_mapped_class() -> None:
    with pytest.raises(ValueError) as err:
        ClassMap.parse("0=0,1=1", names=["a", "b", "c"])
    msg = str(err.value)
    assert "maps onto 2 classes {0, 1}" in msg and "3 class names were given (a, b, c)" in msg
    assert "--class-names a,b" in msg
    # A class name no label maps to, in the middle: renumber, or map a label onto it.
    with pytest.raises(ValueError, match=r"no label maps to 1 \('b'\).*use 0=0,1=1 with --class-names a,c"):
        ClassMap.parse("0=0,1=2", names=["a", "b", "c"])
    # Named targets: a name no label maps to.
    with pytest.raises(ValueError, match=r"no label maps to 0 \('other'\).*--class-names positive"):
        ClassMap.parse("Tumor=positive", names=["other", "positive"])
    # What is right still reads.
    assert ClassMap.parse("0=0,1=1,2=0", names=["other", "epithelium"]).num_classes == 2
    assert ClassMap.parse("Tumor=positive,*=other", names=["other", "positive"]).used_classes == [0, 1]


def test_cli_class_map_with_a_gap_or_extra_names_stops_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"uses classes \{0, 5\}.*use 0=0,1=1"):
        build_train_config(_train_args("--class-map", "0=0,1=5", "--out", str(tmp_path / "run")))
    with pytest.raises(ValueError, match=r"3 class names were given.*--class-names a,b"):
        build_train_config(_train_args("--class-map", "0=0,1=1", "--class-names", "a,b,c",
                                       "--out", str(tmp_path / "run")))
    # One clear line from the command itself, and no run folder.
    assert main(["train", "--class-map", "0=0,1=5", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_yaml_class_map_is_checked_when_the_config_is_read(tmp_path: Path) -> None:
    gap = _yaml(tmp_path / "gap.yaml", "data:\n  class_map: {'0': 0, '1': 5}\n")
    with pytest.raises(ConfigError, match=r"gap\.yaml: config\.data\.class_map: class map 0=0,1=5 .*0=0,1=1"):
        CellkitConfig.from_yaml(gap)
    names = _yaml(tmp_path / "names.yaml",
                  "data:\n  class_map: {'0': 0, '1': 1}\n  class_names: [a, b, c]\n"
                  "model:\n  num_classes: 3\n")
    with pytest.raises(ConfigError, match=r"names\.yaml: .*3 class names were given \(a, b, c\)"):
        CellkitConfig.from_yaml(names)
    count = _yaml(tmp_path / "count.yaml",
                  "data:\n  class_map: {'0': 0, '1': 1, '2': 2}\nmodel:\n  num_classes: 2\n")
    with pytest.raises(ConfigError, match=r"count\.yaml: .*maps onto 3 classes .* model\.num_classes is 2; "
                                          r".*set model\.num_classes: 3"):
        CellkitConfig.from_yaml(count)
    bare = _yaml(tmp_path / "bare.yaml", "data:\n  class_names: [a, b, c]\n")  # 2 classes by default
    with pytest.raises(ConfigError, match=r"bare\.yaml: config\.data\.class_names: expected one name per"):
        CellkitConfig.from_yaml(bare)
    good = _yaml(tmp_path / "good.yaml",
                 "data:\n  class_map: {'0': 0, '1': 1, '2': 0}\n  class_names: [other, epithelium]\n")
    assert CellkitConfig.from_yaml(good).data.class_names == ("other", "epithelium")


def test_load_dataset_rejects_a_class_map_with_a_gap(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.csv").write_text("x,y,class\n3,4,0\n5,6,1\n")
    with pytest.raises(ValueError, match=r"uses classes \{0, 5\}"):
        load_dataset(tmp_path, "csv", class_map="0=0,1=5")


# --------------------------------------------------------------------------- 2. QuPath polygons


def _square(x: float, y: float, r: float) -> list:
    return [[[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r], [x - r, y - r]]]


def _qupath_feature(geometry: dict, object_type: str | None, name: str | None, **extra) -> dict:
    props: dict = {"isLocked": False}
    if object_type is not None:
        props["objectType"] = object_type
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "id": "0b3e52a4-4d59-4a3d-8f4f-7b5f6f1c2d11", "geometry": geometry,
            "properties": props, **extra}


def test_qupath_polygon_detections_are_cells_at_their_centroids(tmp_path: Path) -> None:
    features = [
        _qupath_feature({"type": "Polygon", "coordinates": _square(10, 12, 3)}, "detection", "Positive"),
        _qupath_feature({"type": "Polygon", "coordinates": _square(30, 8, 2)}, "cell", "Negative",
                        nucleusGeometry={"type": "Polygon", "coordinates": _square(31, 9, 1)}),
        _qupath_feature({"type": "MultiPolygon", "coordinates": [_square(20, 20, 1), _square(24, 20, 1)]},
                        "detection", "Positive"),
        # The region the user drew around the cells: not a cell.
        _qupath_feature({"type": "Polygon", "coordinates": _square(20, 16, 15)}, "annotation", "Tumor"),
        # QuPath 0.2 had no objectType: the object's class was the feature's id.
        {"type": "Feature", "id": "PathCellObject",
         "geometry": {"type": "Polygon", "coordinates": _square(5, 25, 2)},
         "properties": {"classification": {"name": "Negative", "colorRGB": -3670016}}},
        {"type": "Feature", "id": "PathAnnotationObject",
         "geometry": {"type": "Polygon", "coordinates": _square(20, 16, 10)}, "properties": {}},
    ]
    (tmp_path / "slide.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    cmap = ClassMap.parse("Negative=0,Positive=1", names=["negative", "positive"])
    rec = read_geojson_points(tmp_path / "slide.geojson", cmap)
    assert rec.points.tolist() == [[10, 12], [30, 8], [22, 20], [5, 25]]
    assert rec.classes.tolist() == [1, 0, 1, 0]
    assert rec.where[0] == "feature 0 (Polygon centroid)"
    assert rec.ignored == {"annotation Polygon": 1, "PathAnnotationObject Polygon": 1}
    _png(tmp_path / "slide.png")
    with pytest.warns(DataWarning, match=r"not cells: 1 PathAnnotationObject Polygon, 1 annotation Polygon\. "
                                         r".*regions drawn by hand"):
        samples = load_dataset(tmp_path, "geojson", class_map=cmap)
    assert len(samples[0].points) == 4


def test_bad_polygon_detections_name_the_feature(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", h=20, w=20)
    empty = _qupath_feature({"type": "Polygon", "coordinates": []}, "detection", "1")
    (tmp_path / "a.geojson").write_text(json.dumps([empty]))
    with pytest.raises(DataError, match=r"a\.geojson: feature 0 \(Polygon detection\): the polygon is empty"):
        load_dataset(tmp_path, "geojson")
    outside = _qupath_feature({"type": "Polygon", "coordinates": _square(50, 5, 2)}, "detection", "1")
    (tmp_path / "a.geojson").write_text(json.dumps([outside]))
    with pytest.raises(DataError, match=r"a\.geojson: feature 0 \(Polygon centroid\): point \(x=50, y=5\)"):
        load_dataset(tmp_path, "geojson")


def test_geojson_of_annotation_polygons_only_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    region = _qupath_feature({"type": "Polygon", "coordinates": _square(16, 16, 10)}, "annotation", "Tumor")
    for stem in ("a", "b"):
        _png(tmp_path / f"{stem}.png")
        collection = {"type": "FeatureCollection", "features": [region]}
        (tmp_path / f"{stem}.geojson").write_text(json.dumps(collection))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path, "geojson", class_map="*=0")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: none of the 2 images has a cell")
    assert "2 annotation Polygon" in msg and "regions drawn by hand" in msg
    # Polygons that do not say what they are: the message says how they would be read.
    plain = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(16, 16, 3)},
             "properties": {}}
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.geojson").write_text(json.dumps([plain]))
    with pytest.raises(DataError, match=r"2 Polygon\. A polygon is read as a cell .*'detection' or 'cell'"):
        load_dataset(tmp_path, "geojson", class_map="*=0")


def test_a_dataset_with_no_cell_at_all_is_an_error(tmp_path: Path) -> None:
    for stem in ("1", "2", "3"):
        _png(tmp_path / "images" / f"{stem}.png")
        (tmp_path / "labels").mkdir(exist_ok=True)
        (tmp_path / "labels" / f"{stem}.txt").write_text("")
    with pytest.raises(DataError, match=rf"^{tmp_path}: none of the 3 images has a cell .*'endonuke' layout"):
        load_dataset(tmp_path, "endonuke")
    # Read on purpose (the ground truth of empty images), it is three images without cells.
    assert [len(s.points) for s in load_dataset(tmp_path, "endonuke", require_cells=False)] == [0, 0, 0]


# --------------------------------------------------------------------------- 3. images without points


def test_empty_endonuke_label_files_are_counted_in_one_warning(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    for i in range(1, 9):
        _png(tmp_path / "images" / f"{i}.png", seed=i)
        (tmp_path / "labels" / f"{i}.txt").write_text("3 4 1\n" if i in (1, 4) else "")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        samples = load_dataset(tmp_path, "endonuke")
    messages = _no_data_warnings(record)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{tmp_path}: 6 of 8 images have no points")
    assert "labels/2.txt, labels/3.txt, labels/5.txt, labels/6.txt, labels/7.txt, ... (1 more)" in messages[0]
    assert "read as images without cells" in messages[0]
    assert [len(s.points) for s in samples] == [1, 0, 0, 1, 0, 0, 0, 0]
    # No warning when every image has its points.
    for i in range(1, 9):
        (tmp_path / "labels" / f"{i}.txt").write_text("3 4 1\n")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_dataset(tmp_path, "endonuke")
    assert _no_data_warnings(record) == []


# --------------------------------------------------------------------------- 4. peak thresholds


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ("{threshold: 5}", r"threshold: expected a value in \[0, 1\] .*got 5; use e\.g\. 0\.5"),
        ("{threshold: -0.2}", r"threshold: expected a value in \[0, 1\] .*got -0\.2"),
        ("{threshold: [0.5, 1.5]}", r"threshold: expected a value in \[0, 1\] .*got \[0\.5, 1\.5\]"),
        ("{threshold: [0.5, 0.5, 0.5]}", r"threshold: expected one value or one per class \(2 classes\)"),
        ("{min_distance: -3}", r"min_distance: expected an integer >= 1 .*got -3"),
        ("{min_distance: [3, 0]}", r"min_distance: expected an integer >= 1 .*got \[3, 0\]"),
    ],
)
def test_yaml_peak_arguments_out_of_range_are_errors(tmp_path: Path, kwargs: str, match: str) -> None:
    path = _yaml(tmp_path / "config.yaml", f"postprocess:\n  name: peaks\n  kwargs: {kwargs}\n")
    with pytest.raises(ConfigError, match=rf"config\.yaml: config\.postprocess\.kwargs\.{match}"):
        CellkitConfig.from_yaml(path)


def test_threshold_checks_know_density_maps() -> None:
    cfg = cellkit.presets.ours(size="cpu")
    cfg.postprocess.kwargs["threshold"] = 5
    with pytest.raises(ConfigError, match=r"config\.postprocess\.kwargs\.threshold: expected a value in"):
        cfg.check()
    cfg.postprocess.kwargs["threshold"] = [0.4, 0.6]
    cfg.check()
    # FCRN regresses densities whose peaks exceed 1: its thresholds (1.19 here) are fine, negative ones not.
    fcrn = cellkit.presets.fcrn(size="cpu")
    assert fcrn.postprocess.kwargs["threshold"] > 1 and fcrn.problems() == []
    fcrn.postprocess.kwargs["threshold"] = -1
    assert fcrn.problems() == ["config.postprocess.kwargs.threshold: expected a value >= 0 (a peak of the "
                               "density map), got -1"]
    # A stage 1 is checked too.
    opp = cellkit.presets.ours_plus_plus(size="cpu")
    opp.pretrain.postprocess.kwargs["threshold"] = 2
    assert [p.split(":")[0] for p in opp.problems()] == ["config.pretrain.postprocess.kwargs.threshold"]


def test_peaks_reject_negative_thresholds_at_construction() -> None:
    from cellkit.postprocess.peaks import check_peak_kwargs

    with pytest.raises(ValueError, match=r"threshold must be >= 0, got -0\.5.*Use a value in \[0, 1\]"):
        LocalPeaks(threshold=-0.5)
    with pytest.raises(ValueError, match=r"threshold must be >= 0, got \[0\.5, -1\]"):
        cellkit.registry.POSTPROCESSORS.build("peaks", threshold=[0.5, -1])
    with pytest.raises(ValueError, match=r"min_distance must be an integer >= 1 \(pixels\), got -2"):
        LocalPeaks(min_distance=-2)
    # What `cellkit predict --threshold 5` needs checked against the model's maps (sigmoid).
    with pytest.raises(ValueError, match=r"^threshold: expected a value in \[0, 1\].*got 5"):
        check_peak_kwargs({"threshold": 5}, where="")
    check_peak_kwargs({"threshold": 5}, activation="identity", where="")


# --------------------------------------------------------------------------- 5. YAML syntax


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _yaml(tmp_path / "config.yaml", "name: mine\nmodel:\n\tencoder: resnet18\n")
    with pytest.raises(ConfigError) as err:
        CellkitConfig.from_yaml(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} line 3 column 1: not valid YAML: found character '\\t'")
    assert "indented by spaces (no tabs)" in msg and "fix that line" in msg
    # The command line says the same, on one line.
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err_text = capsys.readouterr().err
    assert f"{path} line 3 column 1" in err_text and "Traceback" not in err_text
    # YAML text (not a file) is named as such.
    with pytest.raises(ConfigError, match=r"^config text line 2 column \d+: not valid YAML"):
        CellkitConfig.from_yaml("name: [a, b\nmodel: {}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: a config must be a YAML mapping"):
        CellkitConfig.from_yaml(_yaml(path, "- 1\n- 2\n"))


# --------------------------------------------------------------------------- 6. class out of range


def test_class_out_of_range_names_the_file_line_and_class_map(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.csv").write_text("x,y,class\n3,4,0\n5,6,7\n7,8,1\n")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path, "csv", num_classes=2)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'a.csv'}: line 3: class 7, but the model has 2 classes")
    assert "expected classes 0..1" in msg and "--class-map 0=0,1=1,7=1" in msg and "data.class_map" in msg
    assert len(load_dataset(tmp_path, "csv", num_classes=8)[0].points) == 3
    # With a class map, an unmapped label names the file, the line and --class-map.
    (tmp_path / "labels").mkdir()
    _png(tmp_path / "images" / "1.png")
    (tmp_path / "labels" / "1.txt").write_text("3 4 0\n5 6 7\n")
    with pytest.raises(DataError, match=r"1\.txt: line 2: label .7. is not in the class map.*--class-map"):
        load_dataset(tmp_path, "endonuke", class_map="endonuke_epithelium")
