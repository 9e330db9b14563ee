"""cellkit suggest: the field whose cells the model is unsure of is ranked first, on images and slides."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_wsi import stain_predictor, write_pyramid

from cellkit.cli import main
from cellkit.engine.outputs import write_predictions
from cellkit.engine.suggest import Field, rank_fields, suggest_folder

SURE = (40, 40, 115)  # dark blue: class 0 of the stain model, sure
UNSURE = (77, 51, 45)  # half brown: both classes' maps alike


def _image() -> np.ndarray:
    """600 x 200 px at 0.5 um/px (three fields of 100 um): dots every 25 px, the middle field's unsure."""
    image = np.full((200, 600, 3), 235, np.uint8)
    for y in range(12, 200, 25):
        for x in range(12, 600, 25):
            image[y - 4 : y + 5, x - 4 : x + 5] = UNSURE if 200 <= x < 400 else SURE
    return image


def test_the_unsure_field_comes_first_and_the_files_are_for_qupath(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(_image()).save(tmp_path / "im.png")
    out = tmp_path / "out"
    write_predictions(stain_predictor(), [tmp_path / "im.png"], out, overlay=False, mpp=0.5)
    assert main(["suggest", "--pred", str(out), "--top", "3"]) == 0
    assert "#1  im  x=200 y=0 200x200 px" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "suggestions" / "suggestions.csv").open()))
    assert [(r["rank"], r["x"]) for r in rows][0] == ("1", "200") and len(rows) == 3
    first, *rest = rows
    assert float(first["mean_confidence"]) < 0.5 < min(float(r["mean_confidence"]) for r in rest)
    assert int(first["uncertain_cells"]) == int(first["cells"]) > 30
    per_class = [k for k in first if k.startswith("cells_")]
    assert len(per_class) >= 2 and all(sum(int(r[k]) for k in per_class) == int(r["cells"]) for r in rows)
    feature = json.loads((out / "suggestions" / "im.geojson").read_text())["features"][0]
    assert feature["geometry"]["coordinates"][0][:3] == [[200, 0], [400, 0], [400, 200]]
    assert feature["properties"]["name"].startswith("#1: ") and feature["properties"]["objectType"] == "annotation"
    measured = feature["properties"]["measurements"]
    assert sum(v for k, v in measured.items() if k.startswith("cells ")) == int(first["cells"])
    assert (out / "suggestions" / "suggestions.png").stat().st_size > 1000
    from cellkit.cli import build_parser
    from cellkit.engine.suggest import RANKINGS

    (ranking,) = [a for a in build_parser()._subparsers._group_actions[0].choices["suggest"]._actions
                  if a.dest == "ranking"]
    assert tuple(ranking.choices) == RANKINGS and ranking.default == RANKINGS[0]
    assert main(["suggest", "--pred", str(out), "--top", "3", "--ranking", "doubt", "--no-picture"]) == 0
    assert "#1  im  x=200 y=0 200x200 px" in capsys.readouterr().out  # the unsure field first either way
    # Again: its own files are replaced; a file it did not write is not.
    assert [f.rank for f in suggest_folder(out, top=1)] == [1]
    (out / "suggestions" / "suggestions.csv").write_text("my,notes\n")
    assert main(["suggest", "--pred", str(out)]) == 2
    assert (out / "suggestions" / "suggestions.csv").read_text() == "my,notes\n"


def test_on_a_slide_the_field_is_in_level_0_pixels(tmp_path: Path) -> None:
    image = _image()
    slide = write_pyramid(tmp_path / "s.tif", [image.repeat(2, 0).repeat(2, 1), image], 0.25)
    out = tmp_path / "out"
    write_predictions(stain_predictor(), [slide], out, overlay=False, slide_options={"tissue": False})
    (best,) = suggest_folder(out, top=1, picture=False)
    assert (best.image, best.x, best.width) == ("s", 400, 400)  # 100 um at 0.25 um/px


def test_the_picks_spread_and_the_errors_say_what_to_do(tmp_path: Path) -> None:
    fields = [Field("a", x, 0, 10, 10, s, 4, 4, 0.2) for x, s in ((0, 4.0), (10, 3.9), (20, 3.8), (500, 2.5))]
    assert [f.x for f in rank_fields(fields, 3)] == [0, 500, 10]
    with pytest.raises(FileNotFoundError, match="run cellkit predict"):
        suggest_folder(tmp_path)
    (tmp_path / "im.csv").write_text("x,y,class,score\n1,1,0,0.9\n")
    (tmp_path / "predict.json").write_text(json.dumps({"inputs": ["im"], "images": ["im"], "status": "done"}))
    with pytest.raises(ValueError, match="no confidence column"):
        suggest_folder(tmp_path)
    # A class number from elsewhere must not size the per-class table: refused, naming the file.
    (tmp_path / "im.csv").write_text("x,y,class,score,confidence\n1,1,0,0.9,0.8\n2,2,1000000000,0.9,0.8\n")
    with pytest.raises(ValueError, match=r"im\.csv has class 1000000000 .*expected 0-255"):
        suggest_folder(tmp_path)
    record = {"inputs": ["im"], "images": ["im"], "status": "done", "class_names": ["other", "epithelium"]}
    (tmp_path / "predict.json").write_text(json.dumps(record))
    (tmp_path / "im.csv").write_text("x,y,class,score,confidence\n1,1,2,0.9,0.8\n")
    with pytest.raises(ValueError, match=r"class 2 .*expected 0-1 \(its 2 class names\)"):
        suggest_folder(tmp_path)


def test_the_new_slide_guide_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/new-slide.md: predict -> suggest -> annotate the fields (simulated) -> train --init-from -> predict."""
    from test_slides_training import CLASS_MAP, _point, _region, _tiles
    from test_workers import _cohort

    ckpt, _ = _cohort(tmp_path, slides=0)  # a small model (random weights) with the bundled tiles' pixel size
    tiles = _tiles(2)
    row = np.concatenate([t[0] for t in tiles], axis=1)
    slide = write_pyramid(tmp_path / "new.tif", [row.repeat(2, 0).repeat(2, 1), row], 0.25)
    out = tmp_path / "out"
    assert main(["predict", str(slide), "--checkpoint", str(ckpt), "--out", str(out), "--threshold", "0.2",
                 "--device", "cpu", "--no-tissue-mask"]) == 0
    assert main(["suggest", "--pred", str(out), "--top", "2", "--no-picture"]) == 0
    fields = list(csv.DictReader((out / "suggestions" / "suggestions.csv").open()))
    assert len(fields) == 2 and all(int(f["width"]) == 400 for f in fields)  # 100 um at 0.25 um/px
    # In QuPath: the rectangles imported, the cells inside clicked, points and rectangles exported.
    annotated = tmp_path / "annotated"
    annotated.mkdir()
    (annotated / "new.tif").write_bytes(slide.read_bytes())
    truth = [((x + i * 200) * 2, y * 2, int(c)) for i, t in enumerate(tiles) for (x, y), c in zip(t[1], t[2])]
    features = []
    for f in fields:
        x0, y0, w, h = (int(f[k]) for k in ("x", "y", "width", "height"))
        features.append(_region(f"#{f['rank']}", x0, y0, x0 + w, y0 + h))
        features += [_point(x, y, c) for x, y, c in truth if x0 <= x < x0 + w and y0 <= y < y0 + h]
    (annotated / "new.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    class_map = ",".join(f"{k}={min(v, 1)}" for k, v in CLASS_MAP.items())
    run = tmp_path / "run"
    from cellkit.data.io import DataWarning

    with pytest.warns(DataWarning, match="validation and test images come from the training slides"):
        assert main(["train", "--data", str(annotated), "--format", "slides", "--class-map", class_map,
                     "--class-names", "other,epithelium", "--init-from", str(ckpt), "--steps", "2",
                     "--crop-size", "64", "--batch-size", "2", "--size", "cpu", "--device", "cpu", "--out", str(run)]) == 0
    assert json.loads((run / "split.json").read_text())["validation"]  # areas of the one slide
    assert main(["predict", str(slide), "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "after"),
                 "--device", "cpu", "--no-tissue-mask"]) == 0
    assert (tmp_path / "after" / "new.summary.json").is_file()


def test_the_mix_ranking_keeps_the_tissues_class_mix() -> None:
    """The three most doubtful fields are all rich in the rare class: ``doubt`` takes two of them,
    ``mix`` (the default) the most doubtful of the poor half and of the rich half."""
    scores = (9.0, 8.0, 7.0, 3.0, 2.0, 1.0)
    rare = (9, 8, 7, 0, 1, 2)
    fields = [Field(f"im{i}", 0, 0, 10, 10, s, 10 + r, 5, 0.5, mix=(10, r)) for i, (s, r) in enumerate(zip(scores, rare))]
    assert [f.image for f in rank_fields(fields, 2, ranking="doubt")] == ["im0", "im1"]
    assert [f.image for f in rank_fields(fields, 2)] == ["im0", "im3"]
    assert len(rank_fields(fields, 10)) == 6  # more fields asked than there are: all of them
    unknown = [Field(f.image, 0, 0, 10, 10, f.score, f.cells, 5, 0.5) for f in fields]  # no class mix
    assert [f.image for f in rank_fields(unknown, 2)] == ["im0", "im1"]
    with pytest.raises(ValueError, match="not one of mix, doubt"):
        rank_fields(fields, 2, ranking="novel")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 100), st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=30),
       st.integers(1, 12))
def test_mix_picks_one_field_per_stratum_the_most_doubtful_first(rows: list[tuple[float, int, int]],
                                                                 top: int) -> None:
    from cellkit.engine.suggest import _strata

    fields = [Field(f"im{i}", 0, 0, 10, 10, s, a + b, 0, 0.5, mix=(a, b)) for i, (s, a, b) in enumerate(rows)]
    stratum = dict(zip((f.image for f in fields), _strata(fields, top)))
    chosen = rank_fields(fields, top)
    assert len(chosen) == min(top, len(fields)) and len({f.image for f in chosen}) == len(chosen)
    assert chosen[0].score == max(f.score for f in fields)
    assert [f.rank for f in chosen] == list(range(1, len(chosen) + 1))
    strata = [stratum[f.image] for f in chosen]
    assert len(set(strata)) == len(strata) or len(set(stratum.values())) == 1
    for f in chosen:  # each pick is the most doubtful field of its stratum
        assert f.score == max(g.score for g in fields if stratum[g.image] == stratum[f.image]) or len(set(
            stratum.values())) == 1
