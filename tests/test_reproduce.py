"""examples/reproduce_paper.py --smoke: five rows of finite F1 values, figures written, rows reused."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    script = load_script()
    assert script.main(["--smoke", "--out", str(out)]) == 0
    return script, out


def test_smoke_table_has_five_rows_of_finite_f1(smoke_run):
    _, out = smoke_run
    with open(out / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["Method"] for r in rows] == ["FCRN", "EstimateMask", "Ours", "Ours+", "Ours++"]
    for row in rows:
        for column in ("totalF1(N)_mean", "totalF1(P)_mean", "meanF1(N)_mean", "meanF1(P)_mean"):
            value = float(row[column])
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (row["Method"], column, value)
    markdown = (out / "table1.md").read_text()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 6  # a header and five rows


def test_smoke_writes_figures_and_runs(smoke_run):
    _, out = smoke_run
    for name in ("fig2.png", "fig3.png", "fig3.csv", "split.json", "run_info.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for preset in ("fcrn", "estimate_mask", "ours", "ours_plus", "ours_plus_plus"):
        run = out / "runs" / preset / "seed0"
        assert (run / "best.pt").is_file() and (run / "config.yaml").is_file() and (run / "test_result.json").is_file()
    assert (out / "runs" / "ours_plus_plus" / "seed0" / "pretrain" / "last.pt").is_file()


def test_a_second_start_reuses_finished_rows(smoke_run, capsys):
    script, out = smoke_run
    before = (out / "runs" / "ours" / "seed0" / "best.pt").stat().st_mtime_ns
    assert script.main(["--smoke", "--out", str(out), "--rows", "Ours"]) == 0
    assert "finished earlier: reusing" in capsys.readouterr().err
    assert (out / "runs" / "ours" / "seed0" / "best.pt").stat().st_mtime_ns == before


def test_unknown_row_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown rows"):
        load_script().main(["--smoke", "--out", str(tmp_path), "--rows", "Ours+++"])
