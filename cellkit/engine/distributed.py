r"""Multi-process training with ``torchrun``: detection, set-up and the few collectives [`fit`][] needs.

[`cellkit.engine.fit`][] runs unchanged on one process or under ``torchrun``:

```bash
torchrun --nproc_per_node 4 -m cellkit.cli train \
    --preset ours_plus_plus --out runs/x
```

A launch by ``torchrun`` is recognised from its environment variables (``WORLD_SIZE`` > 1,
``RANK``, ``LOCAL_RANK``). The process group then uses ``nccl`` on CUDA and ``gloo`` on
the CPU; the model is wrapped in `torch.nn.parallel.DistributedDataParallel`,
the training split is sharded with a `torch.utils.data.DistributedSampler`,
epoch metrics are reduced across ranks, and only rank 0 writes files.

Every helper here is a no-op (or the identity) on a single process, so the training loop
calls them unconditionally.

In [`fit`][cellkit.engine.fit], ``batch_size`` and ``steps_per_epoch`` are per process (the
global batch is ``batch_size x world_size``), and epoch losses are averaged over all ranks.
Validation is sharded: rank ``r`` predicts validation images ``r, r + world_size, ...`` and
the maps and losses are gathered, so every rank calibrates and computes the same F1 and
score. BatchNorm statistics are copied from rank 0 after each round, so every rank
validates the model rank 0 saves.

Examples:
    >>> info = dist_info({})          # no torchrun variables: one process
    >>> info.enabled, info.rank, info.world_size, info.is_main
    (False, 0, 1, True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "dist_info",
    "init_distributed",
    "shutdown_distributed",
    "sync_buffers",
    "unwrap",
    "wrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly distributed) run.

    Attributes:
        rank: global rank (0 on a single process).
        world_size: number of processes (1 on a single process).
        local_rank: rank on this machine; selects the GPU ``cuda:<local_rank>``.
        enabled: True when the run spans several processes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files (rank 0)."""
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"Environment variable {name} must be an integer, got {value!r}; it is set by torchrun, "
            "do not set it by hand."
        ) from None


def dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (as set by ``torchrun``).

    An already initialised process group (e.g. set up by the caller) takes precedence over
    the environment.

    Args:
        env: the environment to read (default ``os.environ``).

    Raises:
        ValueError: for non-integer or inconsistent values.

    Examples:
        >>> dist_info({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
        DistInfo(rank=1, world_size=2, local_rank=1, enabled=True)
    """
    if env is None and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        rank = dist.get_rank()
        local = _env_int(os.environ, "LOCAL_RANK", rank)
        return DistInfo(rank=rank, world_size=world, local_rank=local, enabled=world > 1)
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); launch with torchrun.")
    return DistInfo(rank=rank, world_size=world, local_rank=local, enabled=True)


def init_distributed(device_type: str) -> tuple[DistInfo, bool]:
    """Initialise the default process group when launched by ``torchrun``.

    Uses the ``nccl`` backend when ``device_type`` is ``"cuda"``, else ``gloo``. Does
    nothing on a single process or when a process group already exists.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.

    Returns:
        ``(info, created)``: ``created`` is True when this call made the process group (so
        the caller should destroy it with [`shutdown_distributed`][]).

    Raises:
        RuntimeError: when ``WORLD_SIZE`` > 1 but ``torch.distributed`` is unavailable.
    """
    info = dist_info()
    if not info.enabled:
        return info, False
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={info.world_size} asks for distributed training, but this torch build has no "
            "torch.distributed; run on one process (unset WORLD_SIZE)."
        )
    if dist.is_initialized():
        return info, False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info, True


def shutdown_distributed(created: bool) -> None:
    """Destroy the process group if ``created`` (the flag [`init_distributed`][] returned)."""
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _active():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks, in place, and return it (identity on one process).

    Shapes:
        - values: any shape; on the device the backend supports (CUDA for nccl).
    """
    if _active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` on one process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device,
               unused_heads: bool = False) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when the run is distributed.

    Every head is computed and scored in every step (all heads of the presets have loss
    terms; the ``prior`` head exists only in ``ours_plus_plus``), so
    ``find_unused_parameters=False``, which avoids a graph traversal per step. A custom
    config with a head that no loss reads sets ``unused_heads=True``.

    Args:
        model: the model, already on ``device``.
        info: from [`init_distributed`][].
        device: the process's device (``cuda:<local_rank>`` or ``cpu``).
        unused_heads: some parameters get no gradient (a head without a loss term).
    """
    if not info.enabled:
        return model
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=unused_heads
    )


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP averages gradients, so parameters stay equal across ranks, but each rank updates
    the BatchNorm running statistics from its own last batch. Syncing them after each
    epoch makes every rank hold exactly the state rank 0 saves, so validation sharded over
    ranks scores one model.
    """
    if not _active():
        return
    for buf in unwrap(model).buffers():
        dist.broadcast(buf.data, src=src)
