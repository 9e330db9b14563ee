"""Train/validation/test splits that keep each slide (or patient) in one split.

Tiles cut from one slide look alike; a tile in the training set and its neighbour in the
test set would overstate how well a model generalises. [`split_by_group`][] assigns
whole groups (a slide, a patient, a run of neighbouring tile ids) to one split,
reproducibly from a seed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Hashable, Sequence
from pathlib import PurePath
from typing import Any, TypeVar

import numpy as np

__all__ = ["bcdata_group", "endonuke_group", "split_by_group"]

T = TypeVar("T")

_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def _key_of(item: Any) -> str:
    key = getattr(item, "key", item)
    if isinstance(key, os.PathLike):
        key = os.fspath(key)
    return str(key)


def _last_number(key: str, what: str) -> int:
    stem = PurePath(key).stem if ("/" in key or "\\" in key or "." in key) else key
    match = _NUMBER.search(stem)
    if match is None:
        raise ValueError(
            f"{what}: expected a key ending in a numeric id (like '435' or 'test/3'), got {key!r}."
        )
    return int(match.group(1))


def endonuke_group(key: Any, width: int = 10) -> int:
    """The group of an EndoNuke tile: its numeric id divided by ``width`` (``id // 10``).

    EndoNuke does not publish which slide each tile comes from; its ids come in runs
    (``321 .. 1081``, ``4560 .. 4787`` in the bundled sample) and neighbouring ids tend
    to come from the same slide, so blocks of ``width`` consecutive ids stay together.
    Use a larger ``width`` for a stricter separation.

    Args:
        key: the sample key (``"435"``), a path (``"images/435.png"``) or a Sample.
        width: the number of consecutive ids per group.

    Examples:
        >>> endonuke_group("435"), endonuke_group("images/439.png")
        (43, 43)
        >>> endonuke_group("440")
        44
    """
    if width < 1:
        raise ValueError(f"endonuke_group: width must be >= 1, got {width!r}.")
    return _last_number(_key_of(key), "endonuke_group") // int(width)


def bcdata_group(key: Any) -> int:
    """The group of a BCData image: its index (``"test/3"`` -> 3).

    BCData publishes no slide ids, so each image is its own group; the split is then an
    ordinary random split by image that is stable across runs.

    Examples:
        >>> bcdata_group("test/3"), bcdata_group("images/train/12.png")
        (3, 12)
    """
    return _last_number(_key_of(key), "bcdata_group")


def split_by_group(
    items: Sequence[T],
    group_fn: Callable[[Any], Hashable] | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, list[T]]:
    """Split items so that every group lands in exactly one split.

    The distinct groups are sorted, shuffled with ``np.random.default_rng(seed)`` and cut
    into consecutive runs: a split gets ``round(fraction * number of groups)`` groups
    (largest remainders first, and at least one group for a positive fraction when
    there are enough groups). Fractions count groups, not items.

    Args:
        items: Samples (grouped by ``.key``) or keys.
        group_fn: key -> group (``endonuke_group``, ``bcdata_group``, a dict's ``get``);
            default: each key is its own group.
        fractions: a share per split (floats, normalised to sum 1), or ints: the number
            of groups per split (groups beyond their sum are left out of every split).
        seed: the shuffle seed; the same items and seed give the same split.
        names: the split names, one per fraction.

    Returns:
        split name -> the items in it, in their input order.

    Raises:
        ValueError: for mismatched names/fractions, negative fractions, or integer counts
            that exceed the number of groups.

    Examples:
        >>> keys = [str(i) for i in range(100, 140)]
        >>> parts = split_by_group(keys, endonuke_group, (0.5, 0.25, 0.25), seed=0)
        >>> sorted(len(v) for v in parts.values())
        [10, 10, 20]
    """
    if len(names) != len(fractions):
        raise ValueError(f"{len(names)} split names {list(names)} for {len(fractions)} fractions.")
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be unique, got {list(names)}.")
    values = [float(f) for f in fractions]
    if any(v < 0 or not np.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"fractions must be >= 0 and not all 0, got {list(fractions)}.")
    key_fn = group_fn if group_fn is not None else (lambda k: k)
    groups_of = [key_fn(_key_of(item)) for item in items]
    unique = sorted(set(groups_of), key=lambda g: (type(g).__name__, str(g)))
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    n = len(shuffled)

    counts_given = all(isinstance(f, (int, np.integer)) and not isinstance(f, bool) for f in fractions)
    if counts_given:
        counts = [int(v) for v in values]
        if sum(counts) > n:
            raise ValueError(f"asked for {sum(counts)} groups {counts}, but there are only {n}.")
    else:
        shares = np.asarray(values) / sum(values)
        exact = shares * n
        counts = [int(c) for c in np.floor(exact)]
        for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[: n - sum(counts)]:
            counts[i] += 1
        # Give an empty split with a positive share one group, taken from the largest.
        for i, share in enumerate(shares):
            if share > 0 and counts[i] == 0 and n >= int(np.count_nonzero(shares)):
                donor = int(np.argmax(counts))
                if counts[donor] > 1:
                    counts[donor] -= 1
                    counts[i] += 1
    assignment: dict[Hashable, str] = {}
    start = 0
    for name, count in zip(names, counts):
        for g in shuffled[start : start + count]:
            assignment[g] = name
        start += count
    result: dict[str, list[T]] = {name: [] for name in names}
    for item, g in zip(items, groups_of):
        name = assignment.get(g)
        if name is not None:
            result[name].append(item)
    return result
