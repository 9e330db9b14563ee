"""Several workers on one folder: shards from flags and schedulers, first-come claims, a killed worker.

The last test runs real ``cellkit predict`` processes on the CPU over a folder of small
pyramidal TIFFs (two shards; two claiming workers, one killed mid-slide and a third started)
and checks that the folder ends as one worker alone leaves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cellkit
from cellkit.cli import main
from cellkit.engine.checkpoint import save_checkpoint
from cellkit.engine.outputs import write_predictions
from cellkit.engine.workers import Claims, Shard, claimed, merged_skipped, parse_shard, shard_from_env
from cellkit.resources import granted_device
from cellkit.wsi.pipeline import PARTS_SUFFIX
from test_wsi import MPP, mosaic, stain_predictor, write_pyramid

REPO = Path(__file__).resolve().parents[1]


def test_shards_split_the_inputs_once_and_come_from_the_scheduler() -> None:
    items = list(range(10))
    shares = [Shard(k, 3).take(items) for k in range(3)]
    assert sorted(sum(shares, [])) == items and shares[0] == [0, 3, 6, 9]
    assert parse_shard("3/3") == Shard(2, 3)
    for bad in ("0/3", "4/3", "1/0", "two/3", "1-3"):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == Shard(
        1, 4, "RANK=1 of WORLD_SIZE=4")  # torchrun's first
    array = {"SLURM_ARRAY_TASK_ID": "40", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "10",
             "SLURM_ARRAY_TASK_COUNT": "5"}  # --array=10-50:10
    assert shard_from_env(array).index == 3
    assert shard_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}).index == 2
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}) is None
    assert shard_from_env({}) is None
    with pytest.raises(ValueError, match="pass --shard"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3"})


def test_the_gpu_of_a_local_rank() -> None:
    assert granted_device({"LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, cuda_devices=4)[0] == "cuda:1"
    assert granted_device({"LOCAL_RANK": "1"}, cuda_devices=0) == (None, "")
    assert granted_device({"RANK": "1"}, cuda_devices=2) == (None, "")


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path: Path) -> None:
    said: list[str] = []
    a, b = Claims(tmp_path, "a", say=said.append), Claims(tmp_path, "b", say=said.append)
    assert a.take("s1") and not b.take("s1") and b.take("s2")
    lock = tmp_path / "workers" / "claims" / "s1.lock"
    record = json.loads(lock.read_text())
    assert record["worker"] == "a" and record["pid"] == os.getpid()
    a.release("s1")
    assert not lock.exists() and b.take("s1")
    b.close()
    assert list((tmp_path / "workers" / "claims").iterdir()) == []
    # A lock of a process that is gone (this host), and one of another host not refreshed for long.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = json.loads(json.dumps(record))["host"]
    lock.write_text(json.dumps({"worker": "w9", "host": host, "pid": int(dead.stdout), "taken": 0}))
    assert a.take("s1") and "took over s1 from w9" in said[-1] and "process is gone" in said[-1]
    other = tmp_path / "workers" / "claims" / "s3.lock"
    other.write_text(json.dumps({"worker": "far", "host": "elsewhere", "pid": 1, "taken": 0}))
    assert not a.take("s3")  # another host's lock, refreshed recently: alive
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    assert a.take("s3") and "not refreshed for" in said[-1] and a.took_over == ["s1", "s3"]
    a.close()


def test_a_held_claim_is_refreshed_and_released_after_its_turn(tmp_path: Path) -> None:
    claims = Claims(tmp_path, "a", heartbeat=0.05)
    paths = [tmp_path / "s1.tif", tmp_path / "s2.tif", tmp_path / "s3.tif"]
    lock = tmp_path / "workers" / "claims" / "s1.lock"
    seen = []
    for path in claimed(paths, claims, is_done=lambda p: p.stem == "s2"):  # s2 done by another worker
        seen.append(path.stem)
        if path.stem == "s1":
            os.utime(lock, (0, 0))
            time.sleep(0.3)
            assert lock.stat().st_mtime > time.time() - 5  # the heartbeat touched it
    assert seen == ["s1", "s3"] and not lock.exists()
    claims.close()


def _images(tmp_path: Path, n: int) -> Path:
    from PIL import Image

    image, _ = mosaic(2, 1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.roll(image, 29 * i, axis=1)).save(folder / f"im{i}.png")
    return folder


def test_shards_in_one_process_fill_the_folder_and_the_last_writes_the_totals(tmp_path: Path) -> None:
    folder, predictor = _images(tmp_path, 5), stain_predictor()
    one = write_predictions(predictor, [folder], tmp_path / "one", overlay=False, mpp=MPP)
    out = tmp_path / "shared"
    first = write_predictions(predictor, [folder], out, overlay=False, mpp=MPP, shard=Shard(0, 2))
    assert [s for s, _ in first.counts] == ["im0", "im2", "im4"]
    assert not (out / "counts.csv").exists()  # the other shard has not run
    assert json.loads((out / "predict.json").read_text())["status"] == "running"
    with pytest.raises(ValueError, match="--overwrite cannot go with --shard"):
        write_predictions(predictor, [folder], out, overlay=False, mpp=MPP, shard=Shard(1, 2), overwrite=True)
    with pytest.raises(ValueError, match="choose one"):
        write_predictions(predictor, [folder], out, overlay=False, mpp=MPP, shard=Shard(1, 2), claim=True)
    with pytest.raises(ValueError, match="overlay"):  # another setting: not the same run
        write_predictions(predictor, [folder], out, overlay=True, shard=Shard(1, 2))
    write_predictions(predictor, [folder], out, overlay=False, mpp=MPP, shard=Shard(1, 2))
    assert (out / "counts.csv").read_text() == (tmp_path / "one" / "counts.csv").read_text()
    meta = json.loads((out / "predict.json").read_text())
    assert meta["status"] == "done" and meta["images"] == [s for s, _ in one.counts]
    records = sorted((out / "workers").glob("*.json"))
    assert [json.loads(r.read_text())["predicted"] for r in records] == [["im0", "im2", "im4"], ["im1", "im3"]]
    # Replacing the shared run later removes the workers' records with its files.
    again = write_predictions(predictor, [folder], out, overlay=False, mpp=MPP, overwrite=True)
    assert not (out / "workers").exists() and len(again.counts) == 5


def test_a_failed_input_of_one_worker_is_listed_once_for_the_folder(tmp_path: Path) -> None:
    folder, predictor = _images(tmp_path, 3), stain_predictor()
    (folder / "im1.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    for k in range(2):
        write_predictions(predictor, [folder], out, overlay=False, mpp=MPP, shard=Shard(k, 2), on_error="skip")
    meta = json.loads((out / "predict.json").read_text())
    assert meta["status"] == "done" and list(meta["skipped"]) == ["im1.png"] and meta["images"] == ["im0", "im2"]
    assert list(merged_skipped(out)) == ["im1.png"]


# --------------------------------------------------------------------------- real worker processes


def _cohort(tmp_path: Path, slides: int = 2) -> tuple[Path, Path]:
    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.encoder_kwargs["width_multiplier"] = 0.125
    cfg.model.decoder_kwargs.update(width=8, low_level_width=8)
    cfg.data.mpp = MPP
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "best.pt", {"config": cfg.to_dict(),
                                                  "model": cellkit.build_model(cfg).state_dict(),
                                                  "class_names": ["negative", "positive"]})
    image, _ = mosaic(4, 3)
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(slides):
        moved = np.roll(image, 37 * i, axis=1)
        write_pyramid(folder / f"s{i}.tif", [moved.repeat(2, 0).repeat(2, 1), moved], MPP / 2)
    return ckpt, folder


def _worker(args: list[str], out: Path, **env: str) -> subprocess.Popen[str]:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-m", "cellkit.cli", *args, "--out", str(out)], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    return stderr


def _same_folder(one: Path, other: Path) -> None:
    assert (other / "cohort.csv").read_text() == (one / "cohort.csv").read_text()
    assert (other / "counts.csv").read_text() == (one / "counts.csv").read_text()
    for csv in sorted(one.glob("s*.csv")):
        assert (other / csv.name).read_bytes() == csv.read_bytes(), csv.name
    assert not list(other.glob(f".*{PARTS_SUFFIX}"))  # every slide's chunks merged and cleaned


def _kill_mid_slide(proc: subprocess.Popen[str], out: Path, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` once a slide it holds has finished chunks; whether that moment came."""
    claims, start = out / "workers" / "claims", time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        for lock in claims.glob("*.lock") if claims.is_dir() else []:
            try:
                pid = json.loads(lock.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            parts = out / f".{lock.stem}{PARTS_SUFFIX}"
            if pid == proc.pid and parts.is_dir() and any(parts.iterdir()):
                proc.send_signal(signal.SIGKILL)
                proc.wait()  # reaped: its pid is gone, as after a real crash
                return True
        time.sleep(0.02)
    return False


def test_worker_processes_shards_and_claims_end_as_one_worker_alone(tmp_path: Path) -> None:
    ckpt, slides = _cohort(tmp_path)
    args = ["predict", str(slides), "--checkpoint", str(ckpt), "--threshold", "0.3", "--no-tissue-mask",
            "--chunk-size", "160", "--device", "cpu", "--no-overlay"]
    one = tmp_path / "one"
    assert main([*args, "--out", str(one)]) == 0  # one worker: it writes cohort.csv too
    confidence = json.loads((one / "s0.summary.json").read_text())["confidence"]
    assert 0 < confidence["mean"] <= 1 and 0 <= confidence["uncertain_cells"] and confidence["below"] == 0.5
    # Two shards of a Slurm job array (--array=1-2), from the environment alone (in this process,
    # one after the other: the concurrent workers are the claiming ones below).
    for i in (1, 2):
        with pytest.MonkeyPatch.context() as env:
            for name, value in (("SLURM_ARRAY_TASK_ID", str(i)), ("SLURM_ARRAY_TASK_MIN", "1"),
                                ("SLURM_ARRAY_TASK_COUNT", "2")):
                env.setenv(name, value)
            assert main([*args, "--out", str(tmp_path / "sharded")]) == 0
    records = sorted((tmp_path / "sharded" / "workers").glob("*.json"))
    assert [json.loads(r.read_text())["shard_source"] for r in records] == [
        f"SLURM_ARRAY_TASK_ID={i} of SLURM_ARRAY_TASK_COUNT=2" for i in (1, 2)]
    _same_folder(one, tmp_path / "sharded")
    # Two claiming workers; one is killed inside a slide, a third starts later and takes it over.
    out = tmp_path / "claimed"
    first, second = _worker([*args, "--claim"], out), _worker([*args, "--claim"], out)
    killed = _kill_mid_slide(first, out)
    third = _worker([*args, "--claim"], out)
    said = [_finish(second), _finish(third)]
    _same_folder(one, out)
    records = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("*.json"))]
    finished = [r for r in records if r["status"] == "done"]
    done = sum((r["predicted"] for r in finished), [])
    assert len(done) == len(set(done))  # no slide predicted twice by the workers that finished
    if killed:  # the usual case: the dead worker's lock was left and taken over
        assert "took over" in "".join(said) and sum(len(r["took_over"]) for r in finished) == 1
    assert not list((out / "workers" / "claims").glob("*.lock"))


# --------------------------------------------------------------------------- per-class probabilities


def test_every_cell_carries_each_classes_probability_into_csv_and_geojson(tmp_path: Path) -> None:
    image, _ = mosaic(2, 1)
    predictor = stain_predictor()
    det = predictor.predict(image)
    maps = predictor.probabilities(image)
    assert det.probs is not None and det.probs.shape == (len(det), 2) and len(det) > 20
    x, y = np.rint(det.points[:, 0]).astype(int), np.rint(det.points[:, 1]).astype(int)
    assert np.allclose(det.probs, maps[:, y, x].T, atol=1e-6)
    assert np.allclose(det.probs[np.arange(len(det)), det.classes], det.scores, atol=1e-5)  # a peak's own map
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "im.png")
    out = tmp_path / "out"
    write_predictions(predictor, [tmp_path / "im.png"], out, overlay=False, mpp=MPP, positive_class="positive")
    header = (out / "im.csv").read_text().splitlines()[0]
    assert header == "x,y,class,score,confidence,prob_negative,prob_positive"
    feature = json.loads((out / "im.geojson").read_text())["features"][0]
    assert set(feature["properties"]["measurements"]) == {"score", "confidence", "prob negative", "prob positive"}
    assert feature["properties"]["classification"]["name"] in ("Positive", "Negative")


def test_geojson_gz_is_smaller_reads_back_the_same_and_resumes(tmp_path: Path) -> None:
    import gzip

    from cellkit.data import ClassMap
    from cellkit.data.readers import read_geojson_points

    image, _ = mosaic(2, 2)
    slide = write_pyramid(tmp_path / "s.tif", [image.repeat(2, 0).repeat(2, 1), image], MPP / 2)
    predictor = stain_predictor()
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    write_predictions(predictor, [slide], plain, overlay=False, slide_options={"tissue": False})
    run = write_predictions(predictor, [slide], packed, overlay=False, slide_options={"tissue": False},
                            geojson_gz=True)
    assert not (packed / "s.geojson").exists() and (packed / "s.geojson.gz").is_file()
    assert gzip.decompress((packed / "s.geojson.gz").read_bytes()) == (plain / "s.geojson").read_bytes()
    assert (packed / "s.geojson.gz").stat().st_size < (plain / "s.geojson").stat().st_size / 4
    names = ClassMap.from_names(["negative", "positive"])
    back = read_geojson_points(packed / "s.geojson.gz", names)
    assert len(back) == run.cells and np.allclose(back.points, read_geojson_points(plain / "s.geojson", names).points)
    again = write_predictions(predictor, [slide], packed, overlay=False, slide_options={"tissue": False},
                              geojson_gz=True, resume=True)
    assert again.resumed == 1
    with pytest.raises(ValueError, match="geojson_gz"):  # another run: not the same settings
        write_predictions(predictor, [slide], packed, overlay=False, slide_options={"tissue": False}, resume=True)
    bomb = tmp_path / "bomb.geojson.gz"
    bomb.write_bytes(b"\x1f\x8b" + b"junk")
    from cellkit.data.io import DataError

    with pytest.raises(DataError, match="not a readable gzip file"):
        read_geojson_points(bomb, names)
