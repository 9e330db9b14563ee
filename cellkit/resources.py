"""The CPUs a process was granted, from its environment rather than the machine's size.

A cluster job is given a share of a node: a Slurm task its ``SLURM_CPUS_PER_TASK``, a
container a cgroup CPU quota, a ``taskset`` its affinity mask, a worker that ``torchrun`` started
on a node of several GPUs its ``LOCAL_RANK`` ([`granted_device`][]). ``os.cpu_count()`` reports the
whole node (128 CPUs where 20 were granted), and a torch process that spins one thread per
CPU there runs many times slower than one that uses its share. [`granted_cpus`][] takes the
smallest of what the environment says; [`apply_cpu_grant`][] lowers torch's threads to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SCHEDULER_VARIABLES", "apply_cpu_grant", "describe_grant", "granted_cpus", "granted_device"]

SCHEDULER_VARIABLES = ("SLURM_JOB_ID", "WORLD_SIZE", "LOCAL_RANK", "PBS_JOBID", "LSB_JOBID", "NXF_TASK_WORKDIR")
"""Variables a scheduler or launcher sets; under one, the resources a command uses are always said."""

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def granted_cpus(environ: Mapping[str, str] | None = None, cgroup_cpu_max: Path | None = None) -> tuple[int, str]:
    """``(cpus, why)``: the CPUs this process may use, and what said so.

    The smallest of: the affinity mask (``os.sched_getaffinity``, where there is one), the
    cgroup v2 quota (``/sys/fs/cgroup/cpu.max``: quota / period, rounded up), Slurm's
    ``SLURM_CPUS_PER_TASK``, and ``OMP_NUM_THREADS`` when set; else ``os.cpu_count()``.

    Examples:
        >>> granted_cpus({"SLURM_CPUS_PER_TASK": "1"})
        (1, 'SLURM_CPUS_PER_TASK=1')
    """
    env = os.environ if environ is None else environ
    found: list[tuple[int, str]] = []
    try:
        found.append((len(os.sched_getaffinity(0)), "the CPU affinity mask"))
    except (AttributeError, OSError):  # not on Linux
        pass
    quota = _cgroup_quota(cgroup_cpu_max or _CGROUP_CPU_MAX)
    if quota is not None:
        found.append((quota, "the cgroup CPU quota"))
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = str(env.get(name, "")).strip()
        if value.isdigit() and int(value) > 0:
            found.append((int(value), f"{name}={value}"))
    if not found:
        return max(1, os.cpu_count() or 1), "os.cpu_count()"
    return min(found, key=lambda item: item[0])


def _cgroup_quota(path: Path) -> int | None:
    """CPUs of a cgroup v2 ``cpu.max`` (``"quota period"``, or ``"max period"`` for none)."""
    try:
        text = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(text) != 2 or text[0] == "max":
        return None
    try:
        quota, period = int(text[0]), int(text[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def apply_cpu_grant(environ: Mapping[str, str] | None = None) -> str | None:
    """Lower torch's threads to the granted CPUs; a line saying so, or ``None`` when nothing changed.

    Examples:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> line = apply_cpu_grant({"SLURM_CPUS_PER_TASK": "1"})
        >>> torch.get_num_threads(), line is None or "1 CPU" in line
        (1, True)
        >>> torch.set_num_threads(before)
    """
    import torch

    cpus, why = granted_cpus(environ)
    threads = torch.get_num_threads()
    if threads <= cpus:
        return None
    torch.set_num_threads(cpus)
    return (f"cellkit: {cpus} CPU thread{'s' if cpus > 1 else ''} (granted by {why}; torch would have used "
            f"{threads} of the machine's {os.cpu_count()})")


def granted_device(environ: Mapping[str, str] | None = None, cuda_devices: int | None = None) -> tuple[str | None, str]:
    """``(device, why)``: the GPU a launcher gave this worker, or ``(None, "")`` to choose as usual.

    ``torchrun --nproc-per-node G`` (and ``srun`` with ``--gpus-per-task``) starts one worker per
    GPU with ``LOCAL_RANK`` = 0..G-1, each seeing every card of the node: worker ``r`` takes card
    ``r`` modulo the cards visible (``CUDA_VISIBLE_DEVICES`` already narrows what is visible).
    Without ``LOCAL_RANK``, or without CUDA, nothing is chosen here.

    Args:
        environ: the environment (default ``os.environ``).
        cuda_devices: the CUDA cards visible (default ``torch.cuda.device_count()``).

    Examples:
        >>> granted_device({"LOCAL_RANK": "3"}, cuda_devices=2)
        ('cuda:1', 'LOCAL_RANK=3 of 2 visible CUDA devices')
        >>> granted_device({}, cuda_devices=2)
        (None, '')
    """
    env = os.environ if environ is None else environ
    rank = str(env.get("LOCAL_RANK", "")).strip()
    if not rank.isdigit():
        return None, ""
    if cuda_devices is None:
        import torch  # start-up time: torch is loaded by then in every caller

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_devices < 1:
        return None, ""
    return f"cuda:{int(rank) % cuda_devices}", f"LOCAL_RANK={rank} of {cuda_devices} visible CUDA devices"


def describe_grant(environ: Mapping[str, str] | None = None) -> str | None:
    """The line a command prints at start under a scheduler (any of [`SCHEDULER_VARIABLES`][]), else ``None``.

    Examples:
        >>> line = describe_grant({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"})
        >>> line.startswith("cellkit: 1 CPU thread (granted by SLURM_CPUS")
        True
        >>> describe_grant({}) is None
        True
    """
    env = os.environ if environ is None else environ
    under = [name for name in SCHEDULER_VARIABLES if str(env.get(name, "")).strip()]
    if not under:
        return None
    cpus, why = granted_cpus(env)
    return f"cellkit: {cpus} CPU thread{'s' if cpus > 1 else ''} (granted by {why}; the job runs under {under[0]})"
