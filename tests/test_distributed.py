"""Tests of cellkit.engine.distributed: torchrun detection, and fit under DDP on the CPU (gloo).

The DDP test launches ``torchrun --nproc_per_node 2`` on a tiny ``ours_plus_plus`` run (stage
1 and stage 2, so the prior cache and the barriers are exercised) and checks that rank 0
alone wrote the run folder and that both ranks ended with the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cellkit.engine import load_checkpoint
from cellkit.engine.distributed import DistInfo, all_gather_objects, barrier, dist_info

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    '''
    import json, os, sys
    import numpy as np
    import torch
    import cellkit
    from cellkit.config import CellkitConfig
    from cellkit.data import Sample
    from cellkit.engine import fit
    from cellkit.engine import runs as R
    from cellkit.engine import train as T
    from cellkit.engine import validation as V

    out, record = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    writes, models = [], []

    def recording(fn):
        def wrapper(path, *args, **kwargs):
            if path is not None:
                writes.append(str(path))
            return fn(path, *args, **kwargs)
        return wrapper

    for module in (T, R, V):  # every module of the engine that writes into the run folder
        for name in ("save_checkpoint", "_append_metrics", "_write_metrics"):
            if hasattr(module, name):
                setattr(module, name, recording(getattr(module, name)))
    to_yaml = CellkitConfig.to_yaml
    CellkitConfig.to_yaml = lambda self, path=None: recording(lambda p: to_yaml(self, p))(path)
    wrap_model = T.wrap_model
    def keep_model(model, *args, **kwargs):
        models.append(model)
        return wrap_model(model, *args, **kwargs)
    T.wrap_model = keep_model

    def synthetic(key, seed, h=64, w=64, n=8):
        rng = np.random.default_rng(seed)
        points = rng.uniform(0, [w - 1, h - 1], (n, 2))
        classes = rng.integers(0, 2, n)
        image = np.full((h, w, 3), 225, np.uint8)
        for (x, y), c in zip(points, classes):
            r, col = int(round(y)), int(round(x))
            image[max(0, r - 2):r + 3, max(0, col - 2):col + 3] = (90, 50, 130) if c else (130, 70, 50)
        return Sample(image, points, classes, key)

    cfg = cellkit.presets.ours_plus_plus(size="cpu")
    for c in (cfg, cfg.pretrain):
        c.model.encoder_kwargs["width_multiplier"] = 0.25
        c.model.decoder_kwargs.update(width=16, low_level_width=8)
        c.train.crop_size, c.train.batch_size, c.train.steps_per_epoch = 64, 2, 2
        c.train.epochs, c.train.num_workers, c.train.steps = 1, 0, None  # an epoch schedule
    cfg.train.epochs = 2
    splits = {"train": [synthetic(f"t{i}", i) for i in range(4)],
              "val": [synthetic("v0", 10, 48, 72), synthetic("v1", 11), synthetic("v2", 12)]}
    result = fit(cfg, out, splits=splits, device="cpu", progress=False)
    torch.save({k: v.clone() for k, v in models[-1].state_dict().items()}, f"{record}/weights{rank}.pt")
    with open(f"{record}/rank{rank}.json", "w") as fh:
        json.dump({"writes": writes, "history": result.history, "best": result.best_score}, fh)
    '''
)


def test_dist_info_reads_torchrun_variables() -> None:
    assert dist_info({}) == DistInfo()
    assert dist_info({"WORLD_SIZE": "1", "RANK": "0"}).enabled is False
    info = dist_info({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (3, 4, 1, True, False)
    with pytest.raises(ValueError, match="RANK=5 is outside"):
        dist_info({"WORLD_SIZE": "2", "RANK": "5"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        dist_info({"WORLD_SIZE": "two"})


def test_collectives_are_identities_on_one_process() -> None:
    barrier()
    assert all_gather_objects({"a": 1}) == [{"a": 1}]


def test_fit_under_torchrun_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), str(record)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    # The run folder: both stages, metrics once per epoch (so no rank wrote twice).
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "pretrain", "prior_cache"} <= {
        p.name for p in out.iterdir()}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert len((out / "pretrain" / "metrics.jsonl").read_text().splitlines()) == 1
    assert all(line["steps"] == 2 for line in lines)
    last = load_checkpoint(out / "last.pt")
    assert last["world_size"] == 2 and last["epoch"] == 2

    # Only rank 0 wrote.
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["writes"] == []
    assert any(w.endswith("last.pt") for w in ranks[0]["writes"])

    # Both ranks ended with the same weights (and BatchNorm statistics), equal to last.pt,
    # and saw the same (gathered) validation results.
    w0, w1 = (torch.load(record / f"weights{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() == last["model"].keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(w0[k], last["model"][k]) for k in w0)

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"} for r in history]

    assert strip(ranks[0]["history"]) == strip(ranks[1]["history"])
    assert ranks[0]["history"][-1]["f1"] == lines[-1]["f1"]
