"""cellkit summarize: the slide summaries of a predictions folder, merged into cohort.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from shapely.geometry import box

from cellkit.cli import main
from cellkit.engine.cohort import summarize_folder
from cellkit.wsi.regions import Region
from cellkit.wsi.summary import summarize, write_summary

NAMES = ["negative", "positive"]


def _folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    a = summarize([0, 1, 1, 0], NAMES, mpp=0.5, tissue_area_px=4e6, region_index=[0, 0, -1, -1],
                  regions=[Region("core", "Tumor", box(0, 0, 2000, 1000))])
    write_summary(out, "slide-a", {**a, "cellkit_version": "0.1.0"})
    write_summary(out, "slide-b", summarize([1, 1, 1], NAMES, mpp=0.5, tissue_area_px=1e6))
    (out / "predict.json").write_text(json.dumps({
        "inputs": ["slide-a", "slide-b", "slide-c", "slide-d"], "checkpoint": "endonuke-epithelium",
        "skipped": {"slide-d.svs": "cannot open"}, "status": "running"}))
    return out


def test_summarize_merges_slides_and_regions_and_lists_what_is_missing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = _folder(tmp_path)
    assert main(["summarize", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 slides, 3 rows" in printed and "1 failed" in printed and "slide-d.svs: cannot open" in printed
    assert "1 inputs have no summary yet" in printed and "slide-c" in printed
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    assert [(r["slide"], r["scope"], r["name"]) for r in rows] == [
        ("slide-a", "slide", "slide-a"), ("slide-a", "region", "core"), ("slide-b", "slide", "slide-b")]
    a, core, b = rows
    assert (a["cells"], a["negative"], a["positive"], a["index"]) == ("4", "2", "2", "0.5")
    assert float(a["tissue_area_mm2"]) == pytest.approx(1.0) and float(a["cells_per_mm2"]) == pytest.approx(4.0)
    assert (core["cells"], core["positive"], core["index_class"]) == ("2", "1", "positive")
    assert b["index"] == "1.0" and a["model"] == "endonuke-epithelium" and a["cellkit_version"] == "0.1.0"
    # Again (a new slide finished meanwhile): the table it wrote is replaced, nothing else.
    write_summary(out, "slide-c", summarize([0], NAMES))
    result = summarize_folder(out)
    assert result.slides == ["slide-a", "slide-b", "slide-c"] and result.unfinished == []


def test_summarize_refuses_what_is_not_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _folder(tmp_path)
    (out / "cohort.csv").write_text("patient,age\n1,50\n")
    assert main(["summarize", str(out)]) == 2
    assert "not a cohort table" in capsys.readouterr().err
    assert (out / "cohort.csv").read_text() == "patient,age\n1,50\n"  # the user's file is kept
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["summarize", str(empty)]) == 2
    assert "holds no slide summary" in capsys.readouterr().err
    (out / "cohort.csv").unlink()
    (out / "slide-x.summary.json").write_text("[1, 2]")
    assert main(["summarize", str(out)]) == 2
    assert "slide-x.summary.json is not a slide summary" in capsys.readouterr().err
