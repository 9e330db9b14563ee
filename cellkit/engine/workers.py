"""Several ``cellkit predict`` workers on one folder of slides: shares and first-come claims.

A cohort runs as many workers (a Slurm job array, ``torchrun``, a few shells) that write into
one ``--out`` folder. Each worker is an ordinary ``cellkit predict`` process; two ways share
the inputs between them so that every input is predicted exactly once:

* **Shards** ([`Shard`][]): ``--shard K/N`` takes every N-th input, starting at the K-th
  (1-based), of the inputs in the order ``cellkit predict`` lists them. Without ``--shard``
  the share comes from the environment a scheduler sets ([`shard_from_env`][]):
  ``RANK``/``WORLD_SIZE`` (``torchrun``), ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``
  (a job array), ``SLURM_PROCID``/``SLURM_NTASKS`` (``srun -n``). A restarted shard resumes
  its own share.
* **Claims** ([`Claims`][]): ``--claim`` lets any number of workers, started or restarted at
  any time, take inputs first-come. A worker takes an input by creating
  ``OUT/workers/claims/<stem>.lock`` exclusively (``O_CREAT | O_EXCL``, atomic on local disks
  and on NFS v3+), predicts it, and deletes the lock after the input's files are written.
  While it holds a lock a background thread refreshes the lock's time every
  [`HEARTBEAT_S`][] seconds. A lock is stale, and is taken over (and said so), when its process
  is gone (same host) or when it was not refreshed for ``stale_after`` seconds (another host
  that died): a killed worker's slide is then resumed from its finished chunks by whoever
  takes it.

Each worker writes ``OUT/workers/<worker>.json`` (the inputs it predicted, those it skipped
with the reason, the locks it took over); the worker that finds every input done writes
``counts.csv``, the final ``predict.json`` and, for slides, ``cohort.csv``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cellkit.data.io import _pid_alive, make_folder, write_text_atomic

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "WORKERS", "Claims", "Shard", "WorkerLog", "claimed", "merged_skipped",
           "parse_shard", "read_worker_logs", "remove_worker_files", "shard_from_env"]

WORKERS = "workers"
"""The folder, inside ``--out``, of the workers' records and claims."""

HEARTBEAT_S = 30.0
"""Seconds between two refreshes of a held claim."""

STALE_AFTER_S = 600.0
"""A claim not refreshed for this long is stale (its worker died on another host)."""

_MAX_RECORD_BYTES = 16 * 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (0-based) of ``count`` shares of the inputs, and what said so.

    Examples:
        >>> Shard(1, 3).take(list("abcdefg"))
        ['b', 'e']
        >>> Shard(1, 3).name, str(Shard(1, 3))
        ('shard-2-of-3', 'shard 2/3')
    """

    index: int
    count: int
    source: str = "--shard"

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard is K/N with 1 <= K <= N, got {self.index + 1}/{self.count} (from "
                             f"{self.source}).")

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's items: every ``count``-th, from the ``index``-th."""
        return list(items[self.index :: self.count])

    @property
    def name(self) -> str:
        """The worker's name in ``OUT/workers/``."""
        return f"shard-{self.index + 1}-of-{self.count}"

    def __str__(self) -> str:
        return f"shard {self.index + 1}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"K/N"`` (1-based K) as a [`Shard`][].

    Examples:
        >>> parse_shard("2/4")
        Shard(index=1, count=4, source='--shard')
    """
    parts = str(text).strip().split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shard expects K/N with whole numbers, e.g. 2/8 (the second of eight shares); "
                         f"got {text!r}.")
    k, n = (int(p) for p in parts)
    return Shard(k - 1, n)


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = str(env.get(name, "")).strip()
    return int(value) if value.lstrip("-").isdigit() else None


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The share a scheduler gave this process, or ``None`` (one worker, or no scheduler).

    In order: ``RANK``/``WORLD_SIZE`` (``torchrun``); ``SLURM_ARRAY_TASK_ID`` with
    ``SLURM_ARRAY_TASK_COUNT`` (ids counted from ``SLURM_ARRAY_TASK_MIN`` in steps of
    ``SLURM_ARRAY_TASK_STEP``); ``SLURM_PROCID``/``SLURM_NTASKS``. A count of 1 is no share.

    Examples:
        >>> env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
        ...        "SLURM_ARRAY_TASK_COUNT": "4"}
        >>> shard = shard_from_env(env)
        >>> str(shard), shard.index
        ('shard 3/4', 2)
        >>> shard.source
        'SLURM_ARRAY_TASK_ID=3 of SLURM_ARRAY_TASK_COUNT=4'
        >>> shard_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
        True
    """
    env = os.environ if environ is None else environ
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                                 ("SLURM_PROCID", "SLURM_NTASKS")):
        rank, size = _int(env, rank_name), _int(env, size_name)
        if rank is None or size is None:
            continue
        if size <= 1:
            return None
        source = f"{rank_name}={rank} of {size_name}={size}"
        if rank_name == "SLURM_ARRAY_TASK_ID":
            first, step = _int(env, "SLURM_ARRAY_TASK_MIN") or 0, _int(env, "SLURM_ARRAY_TASK_STEP") or 1
            rank = (rank - first) // max(step, 1)
        if not 0 <= rank < size:
            raise ValueError(f"the environment gives this worker share {rank + 1} of {size} ({source}), which is "
                             "not one; pass --shard K/N.")
        return Shard(rank, size, source)
    return None


def _host() -> str:
    return socket.gethostname() or "localhost"


class Claims:
    """First-come claims on inputs through lock files in ``OUT/workers/claims/`` (see the module).

    Args:
        out: the ``--out`` folder.
        worker: this worker's name (written in its locks).
        stale_after: seconds without a refresh after which another host's lock is stale.
        heartbeat: seconds between refreshes of the locks held.
        say: where takeovers are reported (a function of one line), or ``None``.

    Examples:
        >>> import tempfile
        >>> claims = Claims(tempfile.mkdtemp(), "w1")
        >>> claims.take("slide-a"), claims.take("slide-a")
        (True, False)
        >>> claims.release("slide-a"); claims.take("slide-a")
        True
        >>> claims.close()
    """

    def __init__(self, out: str | Path, worker: str, stale_after: float = STALE_AFTER_S,
                 heartbeat: float = HEARTBEAT_S, say: Any = None) -> None:
        self.folder = make_folder(Path(out) / WORKERS / "claims")
        self.worker, self.stale_after, self.heartbeat, self.say = worker, float(stale_after), float(heartbeat), say
        self.held: set[str] = set()
        self.took_over: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _path(self, stem: str) -> Path:
        return self.folder / f"{stem}.lock"

    def take(self, stem: str) -> bool:
        """Claim ``stem``: ``True`` when this worker now holds it, ``False`` when another does."""
        path = self._path(stem)
        if not self._create(path):
            stale = self._stale(path)
            if stale is None or not self._take_over(path, stale):
                return False
            self.took_over.append(stem)
            if self.say is not None:
                self.say(f"took over {stem} from {stale.get('worker', '?')} on {stale.get('host', '?')} "
                         f"(pid {stale.get('pid', '?')}: {stale['why']})")
        with self._lock:
            self.held.add(stem)
        self._start_heartbeat()
        return True

    def _create(self, path: Path) -> bool:
        record = json.dumps({"worker": self.worker, "host": _host(), "pid": os.getpid(), "taken": time.time()})
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(record + "\n")
        return True

    def _stale(self, path: Path) -> dict[str, Any] | None:
        """The lock's record with ``why`` when it is stale, else ``None``."""
        try:
            info = os.stat(path)
            record = json.loads(path.read_text(encoding="utf-8")[:4096]) if info.st_size < 4096 else {}
        except FileNotFoundError:
            return {"why": "released", "ino": None}
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        age = time.time() - info.st_mtime
        pid = record.get("pid")
        if record.get("host") == _host() and isinstance(pid, int) and not _pid_alive(pid):
            return {**record, "why": "its process is gone", "ino": info.st_ino}
        if age > self.stale_after:
            return {**record, "why": f"not refreshed for {age:.0f} s", "ino": info.st_ino}
        return None

    def _take_over(self, path: Path, stale: Mapping[str, Any]) -> bool:
        """Move the stale lock aside (one worker wins the rename) and create ours."""
        if stale.get("ino") is not None:
            aside = path.with_name(f"{path.name}.{self.worker}.{os.getpid()}.stale")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False  # another worker moved it first
            if os.stat(aside).st_ino != stale["ino"]:  # a fresh lock replaced the stale one meanwhile
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink()
                return False
            aside.unlink()
        return self._create(path)

    def release(self, stem: str) -> None:
        """Give ``stem`` back (after its files are written, or when it failed)."""
        with self._lock:
            self.held.discard(stem)
        try:
            self._path(stem).unlink()
        except FileNotFoundError:
            pass

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="cellkit-claims", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                held = list(self.held)
            for stem in held:
                try:
                    os.utime(self._path(stem))
                except OSError:
                    pass

    def close(self) -> None:
        """Stop the heartbeat and release every claim held."""
        self._stop.set()
        for stem in list(self.held):
            self.release(stem)


def claimed(paths: Sequence[Path], claims: Claims | None, is_done: Any) -> Iterator[Path]:
    """The paths this worker holds a claim on and that are not done, each released after its turn.

    Without ``claims`` every path is yielded. A claim is released when the loop asks for the
    next path (the path's files are written by then), or when the loop stops.
    """
    for path in paths:
        if claims is None:
            yield path
            continue
        if not claims.take(path.stem):
            continue
        try:
            if not is_done(path):  # finished by another worker between our listing and our claim
                yield path
        finally:
            claims.release(path.stem)


class WorkerLog:
    """``OUT/workers/<name>.json``: what one worker did, rewritten after every input."""

    def __init__(self, out: str | Path, name: str, shard: Shard | None, claim: bool) -> None:
        self.path = Path(out) / WORKERS / f"{name}.json"
        self.record: dict[str, Any] = {
            "worker": name, "host": _host(), "pid": os.getpid(), "shard": None if shard is None else str(shard),
            "shard_source": None if shard is None else shard.source, "claim": bool(claim), "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "predicted": [], "skipped": {}, "took_over": [],
        }
        earlier = _read_record(self.path)
        if earlier is not None:  # a restarted shard keeps what it did before
            for key in ("predicted", "skipped"):
                if isinstance(earlier.get(key), type(self.record[key])):
                    self.record[key] = earlier[key]
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.record, indent=2) + "\n")

    def predicted(self, stem: str) -> None:
        if stem not in self.record["predicted"]:
            self.record["predicted"].append(stem)
        self.record["skipped"] = {k: v for k, v in self.record["skipped"].items() if Path(k).stem != stem}
        self.save()

    def skipped(self, name: str, why: str) -> None:
        self.record["skipped"][name] = why
        self.save()

    def finish(self, took_over: Sequence[str] = ()) -> None:
        self.record.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           took_over=list(took_over))
        self.save()


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_worker_logs(out: str | Path) -> list[dict[str, Any]]:
    """The records of the workers of a predictions folder (unreadable ones left out), by name."""
    folder = Path(out) / WORKERS
    if not folder.is_dir() or folder.is_symlink():
        return []
    records = [_read_record(p) for p in sorted(folder.glob("*.json"))]
    return [r for r in records if r is not None]


def merged_skipped(out: str | Path, predicted: Sequence[str] = ()) -> dict[str, str]:
    """``{input name: reason}`` over every worker's record, less the inputs done since."""
    done = set(predicted)
    for record in read_worker_logs(out):
        if isinstance(record.get("predicted"), list):
            done.update(str(s) for s in record["predicted"])
    merged: dict[str, str] = {}
    for record in read_worker_logs(out):
        skipped = record.get("skipped")
        if isinstance(skipped, dict):
            merged.update({str(k): str(v) for k, v in skipped.items() if Path(str(k)).stem not in done})
    return merged


def remove_worker_files(out: str | Path) -> list[Path]:
    """Delete the workers' records and claims of ``OUT/workers`` (for ``--overwrite``), nothing else.

    Only ``<name>.json`` files that read as a worker's record and ``claims/*.lock`` /
    ``*.stale`` files go; the folders are removed when that leaves them empty.
    """
    folder = Path(out) / WORKERS
    if not folder.is_dir() or folder.is_symlink():
        return []
    removed = []
    for path in sorted(folder.glob("*.json")):
        record = _read_record(path)
        if record is not None and "worker" in record and "predicted" in record:
            path.unlink()
            removed.append(path)
    claims = folder / "claims"
    if claims.is_dir() and not claims.is_symlink():
        for path in sorted([*claims.glob("*.lock"), *claims.glob("*.stale")]):
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
    for empty in (claims, folder):
        try:
            empty.rmdir()
        except OSError:
            pass  # not empty (a file cellkit did not write), or gone
    return removed
