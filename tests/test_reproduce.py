"""examples/reproduce_paper.py: the smoke run of every row, and the statistics behind the claims."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, script):
    out = tmp_path_factory.mktemp("reproduce")
    assert script.main(["--smoke", "--out", str(out)]) == 0
    return script, out


def test_smoke_trains_every_row_and_tables_finite_f1(smoke_run):
    script, out = smoke_run
    with open(out / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == script.ALL  # Table 1's five, then the ablations
    assert [r["ablation"] for r in rows] == ["false"] * 5 + ["true"] * 5
    for row in rows:
        for column in ("total_f1_n_mean", "total_f1_p_mean", "mean_f1_n_mean", "mean_f1_p_mean", "index_mae"):
            value = float(row[column])
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (row["method"], column, value)
    markdown = (out / "table1.md").read_text()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 1 + len(script.ALL)


def test_smoke_compares_every_row_with_its_references(smoke_run):
    script, out = smoke_run
    with open(out / "comparisons.csv") as fh:
        pairs = [(r["row"], r["against"]) for r in csv.DictReader(fh)]
    expected = [(row, ref) for row in script.ALL for ref in script.ROWS[row].against]
    assert pairs == expected
    assert ("Ours++", "Ours+") in pairs and ("FCRN", "Ours") in pairs


def test_smoke_writes_figures_records_and_runs(smoke_run):
    script, out = smoke_run
    for name in ("fig2.png", "fig3.png", "fig3.csv", "split.json", "run_info.json", "per_image.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for spec in (script.ROWS[row] for row in script.ALL):
        run = out / "runs" / spec.slug / "fold0" / "seed0"
        assert (run / "best.pt").is_file() and (run / "test_result.json").is_file(), spec.slug
    assert (out / "runs" / "ours_plus_plus" / "fold0" / "seed0" / "pretrain" / "last.pt").is_file()
    record = json.loads((out / "per_image.json").read_text())
    image = record["Ours"][0]["images"][0]
    assert np.array(image["counts"]).shape == (3, 2)
    assert np.array(image["counts_vs_radius"]).shape == (len(script.RADII), 3, 2)
    info = json.loads((out / "run_info.json").read_text())
    assert info["folds"] == 1 and info["seeds"] == 1 and set(info["run_minutes"]) == set(script.ALL)


def test_ablation_configs_change_what_they_say(script):
    plus = script.row_config("Ours+", script.SCHEDULES["default"], 0, 2)
    no_lc = script.row_config("Ours+ no Lc", script.SCHEDULES["default"], 0, 2)
    assert "consistency" in [s.name for s in plus.losses]
    assert "consistency" not in [s.name for s in no_lc.losses] and no_lc.model.heads == plus.model.heads
    fixed = script.row_config("Ours+ fixed target", script.SCHEDULES["default"], 0, 2)
    assert plus.targets["dynamic"].name == "random_polygon" and fixed.targets["dynamic"].name == "circle"
    prior = script.row_config("Ours + prior", script.SCHEDULES["default"], 0, 2)
    assert prior.model.heads == ("main", "prior") and prior.pretrain is not None
    assert {s.name for s in prior.losses} == {"ce", "iou", "prior"}
    pp = script.row_config("Ours++", script.SCHEDULES["default"], 0, 2)
    at10 = script.row_config("Ours++ prior@10%", script.SCHEDULES["default"], 0, 2)
    at50 = script.row_config("Ours++ prior@50%", script.SCHEDULES["default"], 0, 2)
    assert at10.pretrain.train.steps == 80 < pp.pretrain.train.steps == 200 < at50.pretrain.train.steps == 400
    # The shipped model fine-tuned: Ours with its weights to start from; by name only, not in 'all'.
    ours = script.row_config("Ours", script.SCHEDULES["default"], 0, 2)
    tuned = script.row_config("Ours fine-tuned", script.SCHEDULES["default"], 0, 2)
    assert ours.train.init_from is None and tuned.train.init_from == "endonuke-epithelium"
    tuned.train.init_from, tuned.name = None, ours.name
    assert tuned.to_dict() == ours.to_dict()  # nothing else changed
    assert "Ours fine-tuned" not in script.choose_rows("all") and script.ROWS["Ours fine-tuned"].against == ("Ours",)


def test_a_second_start_reuses_finished_runs(smoke_run, capsys):
    script, out = smoke_run
    before = (out / "runs" / "ours" / "fold0" / "seed0" / "best.pt").stat().st_mtime_ns
    assert script.main(["--smoke", "--out", str(out), "--rows", "Ours"]) == 0
    assert "finished earlier: reusing" in capsys.readouterr().err
    assert (out / "runs" / "ours" / "fold0" / "seed0" / "best.pt").stat().st_mtime_ns == before


def _record_of(out, tmp_path, rows):
    """A per_image.json of the smoke run's finished runs of ``rows`` (from their run folders)."""
    slugs = {"Ours": "ours", "Ours+": "ours_plus"}
    record = {row: [json.loads((out / "runs" / slugs[row] / "fold0" / "seed0" / "test_result.json").read_text())]
              for row in rows}
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    return path


def test_reuse_takes_recorded_runs_instead_of_training(smoke_run, tmp_path, capsys):
    script, out = smoke_run
    first = tmp_path / "first"  # its own run: other tests start the smoke run's folder again
    assert script.main(["--smoke", "--out", str(first), "--rows", "Ours,Ours+", "--reuse",
                        str(_record_of(out, tmp_path, ["Ours", "Ours+"]))]) == 0
    capsys.readouterr()
    fresh = tmp_path / "again"
    assert script.main(["--smoke", "--out", str(fresh), "--rows", "Ours,Ours+",
                        "--reuse", str(first / "per_image.json")]) == 0
    err = capsys.readouterr().err
    assert err.count(f"] taken from {first / 'per_image.json'}") == 2 and "training into" not in err
    assert not (fresh / "runs" / "ours" / "fold0" / "seed0" / "best.pt").exists()
    assert "fig2.png not drawn" in err  # the record keeps no checkpoint
    old = json.loads((first / "per_image.json").read_text())
    new = json.loads((fresh / "per_image.json").read_text())
    assert new == old  # the same counts, without the reuse marker
    assert json.loads((fresh / "run_info.json").read_text())["reused"] == {"Ours": 1, "Ours+": 1}
    assert (fresh / "table1.csv").read_text() == (first / "table1.csv").read_text()
    assert {r["commit"] for rs in new.values() for r in rs} == {script._commit()}  # provenance travels


def test_reuse_trains_a_run_whose_record_holds_other_images(smoke_run, tmp_path, capsys):
    script, out = smoke_run
    ours = json.loads(_record_of(out, tmp_path, ["Ours"]).read_text())["Ours"][0]
    ours["images"] = ours["images"][:1]  # another split: the record does not fit this run
    path = tmp_path / "per_image.json"
    path.write_text(json.dumps({"Ours": [ours]}))
    capsys.readouterr()
    assert script.main(["--smoke", "--out", str(tmp_path / "run"), "--rows", "Ours", "--reuse", str(path)]) == 0
    err = capsys.readouterr().err
    assert "holds other images or radii: training it" in err and f"training into {tmp_path / 'run'}" in err


@pytest.mark.parametrize("text, match", [("{not json", "is not JSON"),
                                         ('{"Ours": [{"row": "Ours"}]}', "not a per_image.json record"),
                                         ("[1, 2]", "not a per_image.json record")])
def test_reuse_of_a_bad_record_is_a_clear_error(tmp_path, script, text, match):
    path = tmp_path / "record.json"
    path.write_text(text)
    with pytest.raises(SystemExit, match=match) as info:
        script.main(["--smoke", "--out", str(tmp_path / "run"), "--reuse", str(path)])
    assert str(path) in str(info.value)
    with pytest.raises(SystemExit, match="cannot read it"):
        script.main(["--smoke", "--out", str(tmp_path / "run"), "--reuse", str(tmp_path / "missing.json")])


def test_default_rows_are_every_row_on_one_split_and_table1_with_folds(script):
    assert script.parse_args([]).rows is None  # chosen once the folds are known
    assert script.choose_rows(script.default_rows(1)) == script.ALL
    assert script.choose_rows(script.default_rows(3)) == script.TABLE1


def test_unknown_row_is_a_clear_error(tmp_path, script):
    with pytest.raises(SystemExit, match="unknown rows"):
        script.main(["--smoke", "--out", str(tmp_path), "--rows", "Ours+++"])


# --------------------------------------------------------------------------- statistics


def _row(script, counts, true=None, pred=None):
    counts = np.asarray(counts, dtype=np.int64)  # (S, I, 3, C)
    s, i = counts.shape[:2]
    true = np.asarray(true if true is not None else counts[0, :, 0] + counts[0, :, 2])
    pred = np.asarray(pred if pred is not None else counts[:, :, 0] + counts[:, :, 1])
    vs_r = np.repeat(counts[:, :, None], len(script.RADII), axis=2)
    return script.RowCounts([str(k) for k in range(i)], counts, vs_r, true, pred, [60.0] * s)


def test_total_and_image_f1_by_hand(script):
    # image 0: tp 3 fp 1 fn 0; image 1: tp 1 fp 0 fn 2 (one class)
    counts = np.array([[[3], [1], [0]], [[1], [0], [2]]])
    # pooled: tp 4, fp 1, fn 2 -> 8 / (8 + 3)
    assert script.total_f1(counts)[0] == pytest.approx(8 / 11)
    assert script.image_f1(counts)[:, 0] == pytest.approx([6 / 7, 2 / 4])
    assert np.isnan(script.image_f1(np.zeros((3, 1))))[0]


def test_index_error_by_hand(script):
    # true: 2 of 4 positive, 1 of 1; predicted: 1 of 4, none found at all in image 2
    rc = _row(script, np.zeros((1, 2, 3, 2)), true=[[2, 2], [0, 1]], pred=[[[3, 1], [0, 0]]])
    assert script.index_error(rc)[0] == pytest.approx([0.25, 1.0])


def test_paired_bootstrap_of_a_row_with_itself_is_zero(script):
    rng = np.random.default_rng(1)
    a = _row(script, rng.integers(0, 20, (3, 8, 3, 2)))
    result = script.paired_bootstrap(a, a, draws=200)
    np.testing.assert_allclose(result["diff"], 0.0, atol=1e-12)
    assert np.all(result["low"] <= 1e-12) and np.all(result["high"] >= -1e-12)


def test_paired_bootstrap_of_a_better_row_excludes_zero(script):
    rng = np.random.default_rng(2)
    base = rng.integers(5, 20, (3, 10, 3, 2))
    worse = base.copy()
    better = base.copy()
    better[:, :, 0] += 5  # five more true positives per image and class...
    better[:, :, 2] = np.maximum(better[:, :, 2] - 5, 0)  # ...five fewer misses
    a, b = _row(script, better, true=base[0, :, 0] + base[0, :, 2] + 5), _row(script, worse)
    result = script.paired_bootstrap(a, b, draws=300)
    assert np.all(result["diff"][:4] > 0) and np.all(result["low"][:4] > 0)
    assert result["better"][1] == 1.0
    assert np.all(result["low"] <= result["diff"] + 1e-12) and np.all(result["diff"] <= result["high"] + 1e-12)
    with pytest.raises(ValueError, match="same held-out images"):
        script.paired_bootstrap(a, _row(script, worse[:, :5]))


def test_folds_hold_every_image_out_once_and_keep_groups_apart(script):
    from cellkit.data import bundled_endonuke, load_dataset
    from cellkit.data.split import endonuke_group

    samples = load_dataset(bundled_endonuke(), "endonuke")[:60]
    folds = script.make_folds(samples, "endonuke", 3)
    held = [s.key for _, test in folds for s in test]
    assert sorted(held) == sorted(s.key for s in samples)
    for train, test in folds:
        assert not {endonuke_group(s.key) for s in train} & {endonuke_group(s.key) for s in test}
    one = script.make_folds(samples, "endonuke", 1)
    assert len(one) == 1 and 0 < len(one[0][1]) < len(samples) / 3
