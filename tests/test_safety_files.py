"""Files received from others, bombs, and every writer: the second hostile round (issue 25).

Each test is one case of that round; each failed on the main branch before it: a file was
lost, code ran, a traceback or a silent acceptance. The rules are stated in docs/safety.md.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellkit.cli import main
from cellkit.data.io import MAX_IMAGE_PIXELS, DataError, atomic_write, load_image, read_image
from cellkit.engine.checkpoint import CheckpointError, load_model, save_checkpoint
from cellkit.data.guard import OutputClash, check_outputs, is_marked_png, mark_png, plain_name

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from test_safety import _error, _files, _images, _predict, _tiny_cfg, checkpoint  # noqa: F401  (the same fixture)
from test_wsi import write_pyramid


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header declares ``width x height`` grey pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)  # a few rows of zeros; the rest would follow
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _nested(depth: int = 200_000) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------- data loss


def test_a_received_record_never_deletes_outside_the_folder(checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("precious.csv", "precious.geojson"):
        (victim / name).write_text("x,y,class\n1,2,0\n")
    absolute = tmp_path / "elsewhere" / "abs"
    absolute.parent.mkdir()
    absolute.with_suffix(".csv").write_text("x,y,class\n")
    out = tmp_path / "received"
    out.mkdir()
    (out / "predict.json").write_text(json.dumps(
        {"inputs": ["../victim/precious", str(absolute)], "status": "done"}))
    before = _files(tmp_path)
    data = _images(tmp_path / "data", n=1)
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                 "--tile-size", "32", "--overlap", "8", "--overwrite", str(data)]) == 2
    line = _error(capsys)
    assert "'../victim/precious'" in line and "not a file name inside its folder" in line
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith("data")} == before


def test_overwrite_deletes_only_what_looks_like_cellkit_output(checkpoint: Path, tmp_path: Path) -> None:
    data, out = _images(tmp_path / "data", n=2), tmp_path / "out"
    assert _predict(checkpoint, out, data) == 0
    # The record is edited to name a file of the user's, beside the run.
    meta = json.loads((out / "predict.json").read_text())
    meta["inputs"].append("notes")
    (out / "predict.json").write_text(json.dumps(meta))
    (out / "notes.csv").write_text("my own notes, not cells\n")
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                 "--tile-size", "32", "--overlap", "8", "--overwrite", str(data / "img0.png")]) == 0
    assert (out / "notes.csv").read_text() == "my own notes, not cells\n"
    assert not (out / "img1.csv").exists()  # the earlier run's own files did go


def test_evaluate_never_replaces_pictures_it_did_not_draw(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", n=2, annotations=True)
    pred = tmp_path / "pred"
    assert _predict(checkpoint, pred, data) == 0
    args = ["evaluate", "--pred", str(pred), "--data", str(data), "--format", "csv", "--radii", "2,4"]
    for name in ("errors.png", "f1_vs_radius.csv", "f1_vs_radius.png"):
        (pred / name).write_text(f"the user's {name}")
        before = _files(pred)
        assert main(args) == 2
        line = _error(capsys)
        assert "cellkit evaluate would replace 1 file it did not write" in line and name in line
        assert _files(pred) == before
        (pred / name).unlink()
    assert main(args) == 0 and main(args) == 0  # its own pictures it replaces
    assert is_marked_png(pred / "errors.png") and is_marked_png(pred / "f1_vs_radius.png")


def test_plot_never_replaces_a_file_it_did_not_draw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 2, "loss": 1.0, "val_loss": 1.0, "f1": {"a": 0.5}, "score": 0.5}) + "\n")
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    assert main(["plot", str(run), "--out", str(table)]) == 2
    assert "ending in .png" in _error(capsys) and table.read_text() == "a,b\n1,2\n"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(photo)
    before = photo.read_bytes()
    assert main(["plot", str(run), "--out", str(photo)]) == 2
    assert "did not write" in _error(capsys) and photo.read_bytes() == before
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0  # its own: redrawn


def test_train_into_a_data_folder_never_replaces_its_files(tmp_path: Path) -> None:
    from test_train import SPLITS

    from cellkit.engine import fit

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "curves.png").write_bytes(b"the user's plot")
    (folder / "calibration.json").write_text('{"mine": true}')
    before = _files(folder)
    with pytest.raises(OutputClash, match="cellkit train would replace 2 files it did not write"):
        fit(_tiny_cfg(), folder, splits=SPLITS, device="cpu", progress=False)
    assert _files(folder) == before


def test_two_inputs_never_write_one_file(checkpoint: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    write_pyramid(inputs / "a.tif", [base, base[::2, ::2]], mpp=0.5)
    Image.fromarray(base[:40, :40]).save(inputs / "a.summary.png")
    out = tmp_path / "out"
    assert _predict(checkpoint, out, inputs / "a.tif", inputs / "a.summary.png") == 2
    line = _error(capsys)
    assert "a.tif and" in line and "a.summary.png would both write" in line and "a.summary.csv" in line
    assert not out.exists()


def test_stale_temporary_clean_up_takes_only_cellkit_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    ours = tmp_path / f".a.csv.cellkit-{dead}-k3j_x9.tmp"
    users = [tmp_path / ".a.csv.backup.tmp", tmp_path / ".a.csv.1234.tmp", tmp_path / ".a.csv.cellkit-x.tmp"]
    for f in [ours, *users]:
        f.write_text("old")
        os.utime(f, (time.time() - 7 * 86400,) * 2)  # a week old
    with atomic_write(target) as fh:
        fh.write("x,y,class\n")
    assert not ours.exists() and all(f.read_text() == "old" for f in users)


def test_check_outputs_and_record_names(tmp_path: Path) -> None:
    mine = tmp_path / "curves.png"
    buf = __import__("io").BytesIO()
    Image.new("RGB", (3, 3)).save(buf, format="PNG")
    mine.write_bytes(buf.getvalue())
    with pytest.raises(OutputClash, match="choose another"):
        check_outputs("cellkit plot", [mine])
    mine.write_bytes(mark_png(buf.getvalue()))
    check_outputs("cellkit plot", [mine])  # cellkit's own picture may be replaced
    assert np.asarray(Image.open(mine)).shape == (3, 3, 3)  # the mark keeps it a valid PNG
    link = tmp_path / "link.png"
    link.symlink_to(mine)
    with pytest.raises(OutputClash):
        check_outputs("cellkit plot", [link])  # a link is never written through
    for bad in ("../x", "/etc/passwd", "a/b", "..", "", None, 3, "a\\b"):
        with pytest.raises(ValueError, match="not a file name"):
            plain_name(bad, "out/predict.json")


# --------------------------------------------------------------------------- code from files


def test_a_received_run_folder_runs_no_code_without_consent(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    received = tmp_path / "colleague_run"
    received.mkdir()
    marker = tmp_path / "ran"
    (received / "helpers_ck25.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = _tiny_cfg().to_dict()
    cfg["plugins"] = [str(received / "helpers_ck25.py")]
    import yaml

    (received / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(received / "config.yaml"), "--out", str(tmp_path / "run")]) == 2
    line = _error(capsys)
    assert "--trust-plugins" in line and "helpers_ck25.py" in line
    assert not marker.exists() and "helpers_ck25" not in sys.modules


# --------------------------------------------------------------------------- crashes and exhaustion


def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = _png_declaring(tmp_path / "bomb.png", 40_000, 40_000)  # 1.6 gigapixels, 2 kB on disk
    assert bomb.stat().st_size < 5000
    with pytest.raises(DataError, match=r"bomb\.png: declares more pixels than cellkit reads whole"):
        read_image(bomb)
    big = _png_declaring(tmp_path / "big.png", 14_000, 13_000)
    assert 14_000 * 13_000 > MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match="than cellkit reads whole.*tiled, pyramidal TIFF"):
        read_image(big)
    # A TIFF that declares a huge page is refused before its pixels are read.
    small = tmp_path / "huge.tif"
    tifffile.imwrite(small, np.zeros((8, 8, 3), np.uint8))
    raw = bytearray(small.read_bytes())
    with tifffile.TiffFile(small) as tif:
        tags = tif.pages[0].tags
        for name in ("ImageWidth", "ImageLength"):
            tag = tags[name]
            fmt = {3: "<H", 4: "<I"}[tag.dtype]
            struct.pack_into(fmt, raw, tag.valueoffset, 30_000)
    small.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="30000 x 30000"):
        read_image(small)


def test_a_bomb_in_predict_and_training_is_an_error_or_skipped(checkpoint: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", n=2)
    _png_declaring(data / "zbomb.png", 40_000, 40_000)
    assert _predict(checkpoint, tmp_path / "a", data) == 2
    line = _error(capsys)
    assert "zbomb.png" in line and "Traceback" not in line
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--device", "cpu",
                 "--tile-size", "32", "--overlap", "8", "--skip-bad-images", str(data)]) == 0
    assert list(json.loads((tmp_path / "b" / "predict.json").read_text())["skipped"]) == ["zbomb.png"]
    train = _images(tmp_path / "train", n=2, annotations=True)
    _png_declaring(train / "zbomb.png", 40_000, 40_000)
    (train / "zbomb.csv").write_text("x,y,class\n3,3,1\n")
    capsys.readouterr()
    assert main(["train", "--data", str(train), "--format", "csv", "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "zbomb.png" in err and "Traceback" not in err


def test_deeply_nested_json_is_an_error_not_a_traceback(checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cellkit.data.readers import read_geojson_points

    labels = tmp_path / "cells.geojson"
    labels.write_text(_nested())
    with pytest.raises(DataError, match="nested deeper"):
        read_geojson_points(labels)
    # A --regions file, and a received predict.json.
    inputs = tmp_path / "in"
    inputs.mkdir()
    base = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    write_pyramid(inputs / "s.tif", [base, base[::2, ::2]], mpp=0.5)
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o1"), "--device", "cpu",
                 "--regions", str(labels), str(inputs / "s.tif")]) == 2
    assert "nested deeper" in _error(capsys)
    out = tmp_path / "o2"
    out.mkdir()
    (out / "predict.json").write_text(_nested())
    assert _predict(checkpoint, out, _images(tmp_path / "data", n=1)) == 2
    assert "predict.json is not the record" in _error(capsys)


# --------------------------------------------------------------------------- silent acceptances


def test_cmyk_and_multi_page_tiffs_are_converted_with_a_note(tmp_path: Path) -> None:
    cmyk = np.zeros((4, 5, 4), np.uint8)
    cmyk[..., 0] = 255  # full cyan: no red
    cmyk[1, :, 3] = 255  # a black row
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(path, cmyk, photometric="separated")
    rgb, notes = load_image(path)
    assert rgb.shape == (4, 5, 3)
    assert rgb[0, 0].tolist() == [0, 255, 255] and rgb[1, 0].tolist() == [0, 0, 0]
    assert [n.kind for n in notes] == ["cmyk"] and "without a colour profile" in notes[0].message
    pages = tmp_path / "pages.tif"
    with tifffile.TiffWriter(pages) as tif:
        for v in (10, 20, 30):
            tif.write(np.full((6, 7, 3), v, np.uint8), photometric="rgb")
    rgb, notes = load_image(pages)
    assert int(rgb[0, 0, 0]) == 10 and [n.kind for n in notes] == ["pages"]
    assert "3 pages; only the first" in notes[0].message


def test_absurd_annotations_stop_training_or_are_left_out(tmp_path: Path) -> None:
    from test_train import SPLITS

    from cellkit.data import Sample
    from cellkit.engine import fit
    from cellkit.geometry import check_estimated_diameter, estimate_cell_diameter

    rng = np.random.default_rng(0)
    dense = Sample(np.zeros((200, 200, 3), np.uint8), rng.uniform(0, 199, (1_000_000, 2)),
                   np.zeros(1_000_000, np.int64), key="dense", path="data/dense.png")
    with pytest.raises(ValueError, match=r"closer than any cell is wide.*data/dense\.png: 1000000 points"):
        check_estimated_diameter(estimate_cell_diameter([dense])[0], [dense])
    tiny = Sample(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 2)), np.zeros(1, np.int64), key="dot",
                  path="data/dot.png")
    splits = {"train": [*SPLITS["train"], tiny], "val": SPLITS["val"]}
    cfg = _tiny_cfg()
    with pytest.warns(UserWarning, match=r"smaller than 16 px.*data/dot\.png \(1 x 1\)"):
        result = fit(cfg, tmp_path / "run", splits=splits, device="cpu", progress=False, max_steps=1)
    import yaml

    stored = yaml.safe_load((result.out_dir / "config.yaml").read_text())
    assert stored["train"]["crop_size"] == cfg.train.crop_size  # not cut to the 1-px image


def test_a_checkpoint_is_checked_as_strictly_as_a_config(checkpoint: Path, tmp_path: Path) -> None:
    from cellkit.engine.checkpoint import load_checkpoint

    state = {k: v for k, v in load_checkpoint(checkpoint).items() if k != "path"}
    bad = tmp_path / "threshold.pt"
    save_checkpoint(bad, {**state, "postprocess": {"threshold": 7.0, "min_distance": 3}})
    with pytest.raises(CheckpointError, match=r"threshold.pt stores settings.*threshold"):
        load_model(bad)
    names = tmp_path / "names.pt"
    save_checkpoint(names, {**state, "class_names": ["a", "b", "c"]})
    with pytest.raises(CheckpointError, match=r"class_names: expected 2 names"):
        load_model(names)


def test_regions_outside_the_slide_or_on_plain_images_are_refused(checkpoint: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    base = np.random.default_rng(2).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    write_pyramid(inputs / "s.tif", [base, base[::2, ::2]], mpp=0.5)
    far = {"type": "Feature", "properties": {"objectType": "annotation", "name": "far"},
           "geometry": {"type": "Polygon", "coordinates": [[[5000, 5000], [5100, 5000], [5100, 5100],
                                                            [5000, 5000]]]}}
    regions = tmp_path / "regions.geojson"
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": [far]}))
    args = ["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--regions", str(regions)]
    assert main([*args, "--out", str(tmp_path / "o1"), str(inputs / "s.tif")]) == 2
    assert "None of the 1 regions" in _error(capsys)
    plain = _images(tmp_path / "plain", n=1)
    assert main([*args, "--out", str(tmp_path / "o2"), str(plain)]) == 2
    assert "img0.png is a plain image" in _error(capsys)


def test_values_that_cannot_be_right_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cellkit.data.classes import ClassMap
    from cellkit.data.readers import read_geojson_points

    labels = tmp_path / "cells.geojson"
    labels.write_text(json.dumps([{"type": "Feature", "properties": {"classification": {"name": "1"}},
                                   "geometry": {"type": "Point", "coordinates": ["12.5", "3"]}}]))
    with pytest.raises(DataError, match="must be numbers"):
        read_geojson_points(labels)
    with pytest.raises(ValueError, match="'0' more than once"):
        ClassMap.parse("0=0,0=1")
    assert main(["predict", "--model", "endonuke-epithelium", "--mpp", "1e-9", "--out", str(tmp_path / "o"),
                 str(tmp_path)]) == 2
    assert "between 0.01 and 100" in capsys.readouterr().err


# --------------------------------------------------------------------------- unclear


def test_exported_models_and_archives_given_as_checkpoints_say_what_they_are(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cellkit.export import export_model

    scripted = export_model(checkpoint, tmp_path / "model.pt", check=False)
    data = _images(tmp_path / "data", n=1)
    assert _predict(scripted, tmp_path / "o1", data) == 2
    assert "a TorchScript model" in _error(capsys)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))
    assert _predict(onnx, tmp_path / "o2", data) == 2
    assert "an ONNX model" in _error(capsys)
    archive = tmp_path / "best.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(checkpoint, arcname="best.pt")
    assert main(["train", "--data", str(data), "--format", "csv", "--init-from", str(archive),
                 "--out", str(tmp_path / "run")]) == 2
    assert "unpack it first" in _error(capsys)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    slide_in = tmp_path / "slides"
    slide_in.mkdir()
    base = np.random.default_rng(3).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    write_pyramid(slide_in / "s.tif", [base, base[::2, ::2]], mpp=0.5)
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o3"), "--device", "cpu",
                 "--index-class", "posittive", str(slide_in)]) == 2
    assert "posittive" in _error(capsys) and not (tmp_path / "o3").exists()


def test_overlays_in_a_data_folder_are_named_as_cellkit_s(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", n=2, annotations=True)
    for f in data.glob("*.csv"):  # predict into the data folder needs it free of annotations
        f.rename(f.with_suffix(".keep"))
    assert _predict(checkpoint, data, data) == 0
    for f in data.glob("*.csv"):
        f.unlink()
    for f in data.glob("*.keep"):
        f.rename(f.with_suffix(".csv"))
    assert main(["train", "--data", str(data), "--format", "csv", "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "an overlay that cellkit predict drew" in err and "img0_overlay.png" in err


def test_a_single_level_slide_is_read_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cellkit.wsi import open_slide, reader

    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(128, 128), photometric="rgb", compression="deflate")
    with open_slide(path) as slide:
        whole, _ = slide.thumbnail(200)
    monkeypatch.setattr(reader, "_BLOCK_SIDE", 96)
    monkeypatch.setattr(reader, "_BLOCK_PIXELS", 96 * 96)
    asked: list[int] = []
    real = reader.Slide.read_region

    def spy(self, x, y, width, height, level=0):
        asked.append(int(width) * int(height))
        return real(self, x, y, width, height, level)

    monkeypatch.setattr(reader.Slide, "read_region", spy)
    with open_slide(path) as slide:
        blocks, _ = slide.thumbnail(200)
    assert blocks.shape == whole.shape and len(asked) > 10
    assert max(asked) <= 100 * 100  # a block, never the slide
    assert np.abs(blocks.astype(int) - whole.astype(int)).mean() < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_image(path)[0].shape == image.shape


def test_a_taken_out_is_refused_before_the_model_loads(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data, out = _images(tmp_path / "data", n=1), tmp_path / "out"
    assert _predict(checkpoint, out, data) == 0
    capsys.readouterr()
    # The checkpoint named now does not exist: the refusal of --out comes first, before any loading.
    assert _predict(tmp_path / "absent.pt", out, data) == 2
    assert "holds the predictions of an earlier run" in _error(capsys)
    assert _predict(tmp_path / "absent.pt", tmp_path / "new", data, "--resume") == 2
    assert "Nothing to resume" in _error(capsys)


def test_positive_class_names_cells_for_qupaths_positivity(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import csv
    import json

    data = _images(tmp_path / "data", n=1)
    out = tmp_path / "out"
    assert _predict(checkpoint, out, data, "--positive-class", "pos", "--threshold", "0.0") == 0
    features = json.loads((out / "img0.geojson").read_text())["features"]
    rows = list(csv.DictReader((out / "img0.csv").open()))
    assert features and len(features) == len(rows)
    names = {f["properties"]["classification"]["name"] for f in features}
    assert names <= {"Positive", "Negative"}
    # The GeoJSON's Positive cells are the model's class "pos" (index 1); the CSV keeps the indices.
    assert [f["properties"]["classification"]["name"] == "Positive" for f in features] == \
        [r["class"] == "1" for r in rows]
    assert json.loads((out / "predict.json").read_text())["positive_class"] == "pos"
    capsys.readouterr()
    assert _predict(checkpoint, tmp_path / "o2", data, "--positive-class", "poss") == 2
    assert "Did you mean 'pos'" in _error(capsys)
