"""Shared test set-up: the hypothesis profiles, and the data that lives beside the repository.

``ci`` (loaded by default) is deterministic: every run tries the same examples, so a red
CI run reproduces on any machine, and no example database is written. It has no deadline,
since CPU time varies with the machine and the load (the suites run on two workers).
Tests keep their own ``@settings(max_examples=...)``: a profile only fills in what a test
leaves out.

``dev`` explores: new random examples on every run, remembered in ``.hypothesis/`` when
they fail. Pick a profile with ``HYPOTHESIS_PROFILE=dev python -m pytest ...``.

A few tests read data that is not in the repository (``../shared/data``: a real Aperio slide,
the BCData sample). In a clone without it they are skipped, saying what is missing;
``CELLKIT_REQUIRE_SHARED=1`` (which ``.ci/run`` sets) makes a missing file a failure, so CI
never passes by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need_shared(path: Path) -> Path:
    """``path`` (under ``../shared/data``), or skip the test with the reason (fail under CI's variable)."""
    if not path.exists():
        message = f"{path} is missing: it lives in ../shared/data beside the repository (see its README-SOURCE.md)"
        if os.environ.get("CELLKIT_REQUIRE_SHARED") == "1":
            pytest.fail(message + "; CELLKIT_REQUIRE_SHARED=1 asks for it")
        pytest.skip(message)
    return path


def _share_the_cores() -> None:
    """Under pytest-xdist, each of N workers gets cores // N torch threads (at least one).

    torch's default (one thread per core in every process) makes the workers' threads spin-wait
    on each other: a training step measured several times slower beside another worker than
    alone. ``OMP_NUM_THREADS`` passes the share on to the commands the tests start.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores()

settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
