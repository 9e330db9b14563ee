"""Nothing lost, nothing executed: checkpoints, atomic writes, resume, and the prediction folder.

The fault-injection tests kill real processes with SIGKILL (at chosen file writes, and
in the middle of training steps) and resume them until they finish; the outputs must
equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellkit.builder import build_model
from cellkit.cli import main
from cellkit.config import ConfigError
from cellkit.data.io import WriteError, atomic_write, remove_stale_temporaries, write_text_atomic
from cellkit.engine import fit
from cellkit.engine.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
POSIX = pytest.mark.skipif(os.name == "nt", reason="SIGKILL and folder fsync are POSIX")


def _tiny_cfg():
    sys.path.insert(0, str(TESTS))
    from test_train import tiny

    return tiny("ours", epochs=2)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this runs ``os.system``: what a hostile .pt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_never_runs_code_when_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = _tiny_cfg()
    path = tmp_path / "evil.pt"
    torch.save({"format": 2, "config": cfg.to_dict(), "model": build_model(cfg).state_dict(),
                "history": [_Payload(marker)]}, path)
    with pytest.raises(CheckpointError, match="Refused .*evil.pt") as err:
        load_checkpoint(path)
    assert "never runs code" in str(err.value)
    assert not marker.exists()
    # Through the command line too: nothing run.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(path), "--out", str(tmp_path / "o"), str(tmp_path / "a.png")]) == 2
    assert not marker.exists()


def test_checkpoints_are_plain_data_and_old_ones_still_load(tmp_path: Path) -> None:
    cfg = _tiny_cfg()
    model = build_model(cfg)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "rng": rng, "best_score": np.float64(0.5)}
    new = save_checkpoint(tmp_path / "new.pt", state)
    # Plain torch reads it without unpickling anything but data.
    plain = torch.load(new, weights_only=True)
    assert plain["format"] == 2 and isinstance(plain["rng"]["numpy"][1], torch.Tensor)
    assert plain["best_score"] == 0.5 and type(plain["best_score"]) is float
    # A format-1 file (numpy arrays pickled as such) still loads, and its random state restores.
    torch.save({"format": 1, **state}, tmp_path / "old.pt")
    with pytest.raises(Exception):
        torch.load(tmp_path / "old.pt", weights_only=True)  # plain torch refuses numpy ...
    old = load_checkpoint(tmp_path / "old.pt")  # ... cellkit allows numpy arrays (data) only
    assert np.array_equal(old["rng"]["numpy"][1], rng["numpy"][1])
    loaded, _, _ = load_model(tmp_path / "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_checkpoint_errors_are_short_and_say_what_to_do(tmp_path: Path) -> None:
    cfg = _tiny_cfg()
    torch.save(build_model(cfg).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bare.pt")
    message = str(err.value)
    assert "bare state dict" in message and "cellkit train" in message and len(message) < 600
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "run")


# --------------------------------------------------------------------------- atomic writes


def test_write_errors_name_the_file_not_the_temporary(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(WriteError) as err:
        write_text_atomic(blocker / "counts.csv", "y")
    message = str(err.value)
    assert str(blocker / "counts.csv") in message and "is a file, not a folder" in message
    assert ".tmp" not in message
    assert isinstance(err.value, OSError)  # callers catching OSError still do


def test_a_read_only_folder_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refused(*args, **kwargs):  # what mkstemp raises in a read-only folder (root ignores chmod)
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.txt.cellkit-1-abc.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(WriteError) as err:
        write_text_atomic(tmp_path / "x.txt", "y")
    assert f"Cannot write {tmp_path / 'x.txt'}: Permission denied; you may not write into {tmp_path}" in str(err.value)
    assert ".tmp" not in str(err.value)


@POSIX
def test_a_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import os, signal
        from cellkit.data.io import atomic_write
        with atomic_write({str(target)!r}, "wb") as fh:
            fh.write(b"half a checkpoint")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert not target.exists() and len(left) == 1 and left[0].startswith(".last.pt.cellkit-")
    # A live writer's temporary is kept; the dead one's goes.
    live = tmp_path / f".last.pt.cellkit-{os.getpid()}-abc.tmp"
    live.write_bytes(b"")
    with atomic_write(target, "wb") as fh:
        fh.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", live.name])
    assert remove_stale_temporaries(tmp_path) == []  # the folder sweep keeps the live one too


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS

    out = tmp_path_factory.mktemp("safety") / "run"
    fit(_tiny_cfg(), out, splits=SPLITS, device="cpu", progress=False)
    return out


def test_resume_without_last_pt_refuses_and_keeps_best_and_metrics(finished_run: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "best.pt", "metrics.jsonl", "calibration.json"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    before = _files(run)
    with pytest.raises(FileNotFoundError, match="last.pt is missing but best.pt and metrics.jsonl exist"):
        fit(_tiny_cfg(), run, splits=SPLITS, device="cpu", progress=False, resume=True)
    assert _files(run) == before


def test_resume_of_a_folder_without_a_run_is_an_error(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS

    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        fit(_tiny_cfg(), tmp_path / "empty", splits=SPLITS, device="cpu", progress=False, resume=True)
    assert not (tmp_path / "empty").exists()


def test_a_run_folder_under_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS

    (tmp_path / "notes").write_text("mine")
    with pytest.raises(NotADirectoryError, match="notes is a file; the run folder"):
        fit(_tiny_cfg(), tmp_path / "notes" / "run", splits=SPLITS, device="cpu", progress=False)
    assert (tmp_path / "notes").read_text() == "mine"


def test_resume_with_another_max_steps_is_refused(finished_run: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS

    assert load_checkpoint(finished_run / "last.pt")["max_steps"] is None
    before = _files(finished_run)
    with pytest.raises(ConfigError, match="max_steps=None"):
        fit(_tiny_cfg(), finished_run, splits=SPLITS, device="cpu", progress=False, resume=True, max_steps=1)
    assert _files(finished_run) == before


# --------------------------------------------------------------------------- fault injection

_DRIVER = """
import contextlib, os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import cellkit.data.io as cio
import cellkit.data.writers as cw

kind, at = os.environ.get("KILL_AT", "none:0").split(":")
at, count = int(at), [0, 0]
real_write = cio.atomic_write

@contextlib.contextmanager
def killing_write(path, *args, **kwargs):
    with real_write(path, *args, **kwargs) as fh:
        yield fh
        count[0] += 1
        if kind == "write" and count[0] == at:  # the new file is written, not yet renamed
            fh.flush()
            print("killed writing", path, file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

import cellkit.engine, cellkit.wsi  # every module that imports atomic_write by name gets the killing one
for module in [m for name, m in sys.modules.items() if name.startswith("cellkit")]:
    if getattr(module, "atomic_write", None) is real_write:
        module.atomic_write = killing_write
real_step = torch.optim.Adam.step

def killing_step(self, *args, **kwargs):
    count[1] += 1
    if kind == "step" and count[1] == at:
        print("killed in step", at, file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, *args, **kwargs)

torch.optim.Adam.step = killing_step
{body}
"""

_TRAIN = """
from test_train import SPLITS, tiny
from cellkit.engine import fit
out = sys.argv[1]
fit(tiny("ours", epochs=3), out, splits=SPLITS, device="cpu", progress=False,
    resume=os.path.exists(os.path.join(out, "config.yaml")))
"""


def _run_driver(script: Path, args: list[str], kill: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT": kill, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _kill_until_done(script: Path, args: list[str], kills: list[str]) -> list[str]:
    """Run with each kill point in turn, then without; the lines saying where each run died."""
    died = []
    for kill in [*kills, "none:0"]:
        done = _run_driver(script, args, kill)
        if done.returncode == 0:
            return died
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        died.append(done.stderr.strip().splitlines()[-1])
    raise AssertionError(f"the last, unkilled run did not finish: {died}")


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


@POSIX
def test_training_killed_again_and_again_resumes_to_the_same_result(tmp_path: Path) -> None:
    script = tmp_path / "train_driver.py"
    script.write_text(_DRIVER.format(tests=str(TESTS), body=_TRAIN))
    baseline, killed = tmp_path / "baseline", tmp_path / "killed"
    assert _run_driver(script, [str(baseline)], "none:0").returncode == 0
    # Kill points drawn at random (seeded): at the n-th file write (checkpoints included, after
    # the data is written and before the rename) or in the n-th optimizer step; every resumed
    # process counts from 1 again.
    rng = random.Random(11)
    kills = [f"write:{rng.randint(2, 4)}", f"step:{rng.randint(1, 3)}", "write:3", f"write:{rng.randint(3, 5)}"]
    died = _kill_until_done(script, [str(killed)], kills)
    assert len(died) >= 3, died
    assert any(".pt" in line for line in died), died  # killed while writing a checkpoint
    assert any("step" in line for line in died), died
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(baseline / name), load_checkpoint(killed / name)
        assert a["epoch"] == b["epoch"] and a["postprocess"] == b["postprocess"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    assert _metrics(killed) == _metrics(baseline)
    assert (killed / "calibration.json").read_text() == (baseline / "calibration.json").read_text()
    assert not [p.name for p in killed.rglob("*.tmp")]  # no killed write's temporary is left


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "model": build_model(cfg).state_dict(),
                           "class_names": ["neg", "pos"], "postprocess": {"threshold": 0.45, "min_distance": 3}})
    return path


def _images(folder: Path, n: int = 4, annotations: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if annotations:
            (folder / f"img{i}.csv").write_text(f"x,y,class\n{i + 3},5,1\n")
    return folder


def _predict(checkpoint: Path, out: Path, *inputs: Path | str) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                 "--tile-size", "32", "--overlap", "8", *map(str, inputs)])


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_predict_into_the_data_folder_never_replaces_annotations(checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", annotations=True)
    before = _files(data)
    assert _predict(checkpoint, data, data) == 2
    line = _error(capsys)
    assert "would replace" in line and "it did not write" in line and "img0.csv" in line and "annotations" in line
    assert _files(data) == before  # nothing written, nothing replaced


def test_predict_twice_needs_resume_or_overwrite(checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data, out = _images(tmp_path / "data"), tmp_path / "out"
    assert _predict(checkpoint, out, data) == 0
    first = _files(out)
    assert json.loads((out / "predict.json").read_text())["status"] == "done"
    # A second run into the same folder is refused, nothing changes.
    assert _predict(checkpoint, out, data / "img0.png") == 2
    assert "--resume" in _error(capsys) and _files(out) == first
    # --resume of a finished run changes nothing; with other settings it is refused.
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--tile-size",
                 "32", "--overlap", "8", "--resume", str(data)]) == 0
    assert _files(out) == first
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--tile-size",
                 "32", "--overlap", "8", "--threshold", "0.9", "--resume", str(data)]) == 2
    assert "postprocess" in _error(capsys)
    # --overwrite deletes the earlier run's files: no stale file of img1..3 stays beside the new counts.
    (out / "notes.txt").write_text("mine")
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--tile-size",
                 "32", "--overlap", "8", "--overwrite", str(data / "img0.png")]) == 0
    left = sorted(p.name for p in out.iterdir())
    assert left == ["counts.csv", "img0.csv", "img0.geojson", "img0_overlay.png", "notes.txt", "predict.json"]
    assert (out / "notes.txt").read_text() == "mine"


def test_predict_skips_bad_images_when_asked(checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", n=3)
    (data / "broken.png").write_bytes(b"not a png")
    assert _predict(checkpoint, tmp_path / "a", data) == 2
    line = _error(capsys)
    assert "broken.png" in line and "--skip-bad-images" in line
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--device", "cpu",
                 "--skip-bad-images", str(data)]) == 0
    err = capsys.readouterr().err
    assert "1 images could not be read and were skipped" in err and "broken.png" in err
    meta = json.loads((tmp_path / "b" / "predict.json").read_text())
    assert list(meta["skipped"]) == ["broken.png"] and meta["images"] == ["img0", "img1", "img2"]
    counts = (tmp_path / "b" / "counts.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in counts[1:]] == ["img0", "img1", "img2"]


_PREDICT = """
from cellkit.cli import main
sys.exit(main(["predict", "--checkpoint", sys.argv[1], "--out", sys.argv[2], "--device", "cpu", "--tile-size", "32",
               "--overlap", "8", *(["--resume"] if os.path.exists(os.path.join(sys.argv[2], "predict.json")) else []),
               sys.argv[3]]))
"""


@POSIX
def test_predict_killed_again_and_again_resumes_to_the_same_files(checkpoint: Path, tmp_path: Path) -> None:
    data = _images(tmp_path / "data", n=5)
    script = tmp_path / "predict_driver.py"
    script.write_text(_DRIVER.format(tests=str(TESTS), body=_PREDICT))
    baseline, killed = tmp_path / "baseline", tmp_path / "killed"
    assert _run_driver(script, [str(checkpoint), str(baseline), str(data)], "none:0").returncode == 0
    died = _kill_until_done(script, [str(checkpoint), str(killed), str(data)],
                            ["write:3", "write:7", "write:1"])
    assert len(died) == 3, died
    assert _files(killed) == _files(baseline)  # no temporary left, every file the same


# --------------------------------------------------------------------------- found by a hostile try


def test_evaluate_json_never_replaces_a_file_that_is_not_a_report(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", n=1, annotations=True)
    before = _files(data)
    assert main(["evaluate", "--pred", str(data), "--data", str(data), "--format", "csv",
                 "--json", str(data / "img0.csv")]) == 2
    assert "is not a report of cellkit evaluate" in _error(capsys)
    assert _files(data) == before


def test_predict_does_not_read_its_own_overlays(checkpoint: Path, tmp_path: Path) -> None:
    data = _images(tmp_path / "data", n=2)
    assert _predict(checkpoint, data, data) == 0  # into the image folder (no annotations there)
    assert _predict(checkpoint, tmp_path / "out", data) == 0
    rows = (tmp_path / "out" / "counts.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["img0", "img1"]


def test_a_full_disk_during_a_checkpoint_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 48576 vs 48470")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError, match=r"Cannot write .*last.pt: No space left on device; the disk .* full"):
        save_checkpoint(tmp_path / "last.pt", {"model": {}})
    assert not list(tmp_path.iterdir())


def test_encoder_weights_with_a_payload_are_refused_unread(tmp_path: Path) -> None:
    from cellkit.models.encoders import load_torchvision_weights
    from cellkit.registry import ENCODERS

    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused unread"):
        load_torchvision_weights(ENCODERS.build("resnet18", width_multiplier=0.25), tmp_path / "evil.pth")
    assert not marker.exists()


def test_training_warns_about_a_class_without_cells(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS

    from cellkit.data import Sample
    from cellkit.data.io import DataWarning

    one_class = [Sample(s.image, s.points, np.zeros_like(s.classes), s.key) for s in SPLITS["train"]]
    with pytest.warns(DataWarning, match=r"no cell of class\(es\) 1 \(class1\)"):
        fit(_tiny_cfg(), tmp_path / "run", splits={"train": one_class, "val": SPLITS["val"]}, device="cpu",
            progress=False, max_steps=1)


def test_resume_before_the_first_checkpoint_checks_the_config(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS, tiny

    run = tmp_path / "run"
    run.mkdir()
    first = tiny("ours", epochs=2)
    first.data.cell_diameter = 8.0
    first.to_yaml(run / "config.yaml")  # a run killed before its first checkpoint
    with pytest.raises(ConfigError, match="train.lr"):
        fit(tiny("ours", epochs=2, lr=0.05), run, splits=SPLITS, device="cpu", progress=False, resume=True)


def test_a_config_error_leaves_no_run_folder_behind(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from test_train import SPLITS

    cfg = _tiny_cfg()
    cfg.data.cell_diameter = None  # keep the config's own (bad) radius
    cfg.targets["circle"].kwargs["radius"] = -4.0
    with pytest.raises((ValueError, TypeError), match="radius"):
        fit(cfg, tmp_path / "run", splits=SPLITS, device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_corrupt_record_and_a_class_map_the_model_does_not_have(tmp_path: Path) -> None:
    from cellkit.engine.evaluate import evaluate_folder

    data = _images(tmp_path / "data", n=1, annotations=True)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "img0.csv").write_text("x,y,class\n3,5,1\n")
    (pred / "predict.json").write_text("{garbage")
    with pytest.raises(ValueError, match="is not the record of a cellkit prediction run"):
        evaluate_folder(pred, data, "csv", 5.0)
    (pred / "predict.json").write_text(json.dumps({"inputs": ["img0"], "class_names": ["neg", "pos"],
                                                   "class_map": None, "status": "done"}))
    with pytest.raises(ValueError, match="predicts 2"):
        evaluate_folder(pred, data, "csv", 5.0, class_map="0=0,1=1,2=2")
    (data / "img0.csv").write_text("x,y,class\n")
    from cellkit.data.io import DataWarning

    with pytest.warns(DataWarning, match="no image has an annotated cell"):
        evaluate_folder(pred, data, "csv", 5.0)


def test_yaml_training_values_are_errors_naming_the_file(tmp_path: Path) -> None:
    from cellkit.config import CellkitConfig, ConfigError

    cfg = _tiny_cfg()
    cfg.train.steps = -3
    cfg.data.val_fraction = 1.5
    path = tmp_path / "bad.yaml"
    cfg.to_yaml(path)
    with pytest.raises(ConfigError) as err:
        CellkitConfig.from_yaml(path)
    message = str(err.value)
    assert "bad.yaml" in message and "train.steps" in message and "val_fraction" in message


def test_class_names_with_a_preset_class_map_are_used_or_refused() -> None:
    from cellkit.data.classes import ClassMap

    assert ClassMap.parse("endonuke_epithelium", names=["x", "y"]).names == ("x", "y")
    with pytest.raises(ValueError, match="maps onto 3 classes"):
        ClassMap.parse("endonuke", names=["a", "b"])


def test_a_yaml_key_given_twice_is_an_error() -> None:
    from cellkit.config import CellkitConfig, ConfigError

    text = _tiny_cfg().to_yaml()
    with pytest.raises(ConfigError, match="the key 'name' is given twice"):
        CellkitConfig.from_yaml(text + "name: again\n")


def test_a_threshold_list_with_an_empty_entry_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--checkpoint", "x.pt", "--out", "o", "--threshold", "0.5,", "a.png"]) == 2
    assert "expected one float or a comma-separated list" in _error(capsys)


def test_resume_accepts_the_same_checkpoint_named_another_way(checkpoint: Path, tmp_path: Path) -> None:
    data, out = _images(tmp_path / "data", n=1), tmp_path / "out"
    assert _predict(checkpoint, out, data) == 0
    assert main(["predict", "--checkpoint", str(checkpoint.parent), "--out", str(out), "--device", "cpu",
                 "--tile-size", "32", "--overlap", "8", "--resume", str(data)]) == 0


def test_evaluate_refuses_a_prediction_outside_its_image(tmp_path: Path) -> None:
    from cellkit.engine.evaluate import evaluate_folder

    data = _images(tmp_path / "data", n=1, annotations=True)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "img0.csv").write_text("x,y,class\n-5,5,1\n")
    with pytest.raises(ValueError, match=r"img0.csv: row 1 \(x=-5, y=5\) lies outside its 48x40"):
        evaluate_folder(pred, data, "csv", 5.0)
