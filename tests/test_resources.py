"""The CPUs a process was granted: affinity, cgroup quota, Slurm, OMP_NUM_THREADS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cellkit.resources import apply_cpu_grant, granted_cpus


def test_the_smallest_grant_wins(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    none = tmp_path / "absent"
    assert granted_cpus({}, none)[0] == affinity
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs -> 2
    assert granted_cpus({}, quota)[0] == min(2, affinity)
    quota.write_text("max 100000\n")  # no quota
    assert granted_cpus({}, quota)[0] == affinity
    assert granted_cpus({"SLURM_CPUS_PER_TASK": "1"}, none) == (1, "SLURM_CPUS_PER_TASK=1")
    assert granted_cpus({"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "x"}, none) == (1, "OMP_NUM_THREADS=1")
    quota.write_text("garbage")
    assert granted_cpus({}, quota)[0] == affinity


def test_torch_threads_are_lowered_to_the_grant_and_said() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        line = apply_cpu_grant({"SLURM_CPUS_PER_TASK": "1"})
        assert torch.get_num_threads() == 1
        assert line is not None and "1 CPU thread (granted by SLURM_CPUS_PER_TASK=1" in line
        assert apply_cpu_grant({"SLURM_CPUS_PER_TASK": "1"}) is None  # already within the grant
    finally:
        torch.set_num_threads(before)


def test_under_a_scheduler_the_cpus_used_are_always_said(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from cellkit.cli import main
    from cellkit.resources import describe_grant

    assert describe_grant({"PATH": "/bin"}) is None
    line = describe_grant({"WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"})
    assert line is not None and "1 CPU thread (granted by OMP_NUM_THREADS=1" in line and "WORLD_SIZE" in line
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert main(["evaluate", "--pred", "/nonexistent", "--data", "/nonexistent", "--format", "csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellkit: ") and " CPU thread" in err.splitlines()[0]  # said first, before the error
