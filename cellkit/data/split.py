"""Train/validation/test splits that keep each slide (or patient) in one split.

Tiles cut from one slide look alike; a tile in the training set and its neighbour in the
test set would overstate how well a model generalises. [`split_by_group`][] assigns
whole groups (a slide, a patient, a run of neighbouring tile ids) to one split,
reproducibly from a seed.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Hashable, Sequence
from pathlib import PurePath
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "GROUP_RULES",
    "bcdata_group",
    "endonuke_group",
    "endonuke_region",
    "group_folds",
    "id_runs",
    "resolve_groups",
    "split_by_group",
]

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


def endonuke_region(key: Any) -> int:
    """The group cellkit trains EndoNuke with: blocks of 100 tile ids (``id // 100``).

    Blocks of 10 ids (``endonuke_group``) keep a validation tile beside training tiles of
    its own region, so validation measures how well a region is learnt, not how well the
    model transfers. Blocks of 100 put most validation tiles tens of ids away from any
    training tile while leaving enough groups (9 on the bundled sample) to split. For
    the honest figure, hold out whole runs of ids ([`id_runs`][], leave-one-range-out).

    Examples:
        >>> endonuke_region("435"), endonuke_region("images/4599.png")
        (4, 45)
    """
    return endonuke_group(key, width=100)


def id_runs(keys: Sequence[Any], gap: int = 100) -> list[int]:
    """The run of numeric ids each key belongs to: runs are separated by more than ``gap``.

    Tile ids of a scan are consecutive, so a jump in the ids is a jump to another place
    (another slide, or another part of one). The bundled EndoNuke sample has three runs:
    321-784, 1010-1081 and 4560-4787. Runs are numbered 0, 1, ... in increasing id.

    Args:
        keys: sample keys, paths or Samples whose stems end in a number.
        gap: the largest difference between neighbouring ids inside one run.

    Returns:
        One run number per key, in the keys' order.

    Examples:
        >>> id_runs(["5", "7", "300", "301", "9"], gap=100)
        [0, 0, 1, 1, 0]
    """
    if gap < 1:
        raise ValueError(f"id_runs: gap must be >= 1, got {gap!r}.")
    ids = [_last_number(_key_of(k), "id_runs") for k in keys]
    run_of: dict[int, int] = {}
    run, previous = -1, None
    for value in sorted(set(ids)):
        if previous is None or value - previous > gap:
            run += 1
        run_of[value] = run
        previous = value
    return [run_of[i] for i in ids]


_PREFIX_SPLIT = re.compile(r"[_\-. ]")

GROUP_RULES = ("format", "image", "blocks:N", "runs:GAP", "prefix", "regex:PATTERN", "csv:FILE")
"""The group rules [`resolve_groups`][] takes (``cellkit train --group``)."""


def _stem(key: str) -> str:
    return PurePath(key).stem if ("/" in key or "\\" in key or "." in key) else key


def _read_group_csv(path: str) -> dict[str, str]:
    file = PurePath(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as err:
        raise ValueError(
            f"group rule csv:{path}: cannot read {file} ({err.strerror or err}); expected a CSV with "
            "two columns, image and group (a header line 'image,group' is allowed)."
        ) from None
    table: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise ValueError(
                f"{file}, line {number}: expected two columns 'image,group', got {row!r}; "
                "write one image (its file name or stem) and its group (a slide or patient id) per line."
            )
        image, group = row[0].strip(), row[1].strip()
        if number == 1 and image.lower() in ("image", "file", "key", "stem"):
            continue
        table[_stem(image)] = group
    if not table:
        raise ValueError(f"{file}: no 'image,group' rows; write one image and its group per line.")
    return table


def resolve_groups(keys: Sequence[Any], rule: str | None, default: Callable[[Any], Hashable] | None = None
                   ) -> list[Hashable]:
    """The group of every key under a group rule: what keeps a slide in one split.

    Rules (``cellkit train --group RULE``, ``data.group`` in a config):

    * ``format`` or ``None``: the dataset format's own rule (``default``; EndoNuke: blocks
      of 100 ids, BCData and other formats: each image);
    * ``image``: each image is its own group (no grouping);
    * ``blocks:N``: the last number in the file name, divided by ``N``;
    * ``runs:GAP``: runs of consecutive numeric ids, a new run after a jump of more than
      ``GAP`` ([`id_runs`][]);
    * ``prefix``: the file name up to its first ``_``, ``-``, ``.`` or space
      (``slide12_x400_y800.png`` -> ``slide12``): tiles named after their slide;
    * ``regex:PATTERN``: the first group of ``PATTERN`` searched in the file name (the whole
      match when it has no group);
    * ``csv:FILE``: a CSV of ``image,group`` rows (image by file name or stem).

    Raises:
        ValueError: for an unknown rule, or a key the rule cannot group, naming both.

    Examples:
        >>> resolve_groups(["a_1", "a_2", "b_1"], "prefix")
        ['a', 'a', 'b']
        >>> resolve_groups(["321", "390", "1010"], "runs:100")
        [0, 0, 1]
        >>> resolve_groups(["435", "439"], "blocks:10")
        [43, 43]
    """
    names = [_key_of(k) for k in keys]
    spec = "format" if rule is None else str(rule).strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "format":
        fn = default if default is not None else (lambda k: k)
        return [fn(k) for k in names]
    if kind == "image":
        return list(names)
    if kind in ("blocks", "runs"):
        try:
            value = int(arg)
        except ValueError:
            raise ValueError(
                f"group rule {spec!r}: expected {kind}:N with a whole number N >= 1 (e.g. {kind}:100)."
            ) from None
        if value < 1:
            raise ValueError(f"group rule {spec!r}: expected {kind}:N with N >= 1.")
        if kind == "runs":
            return list(id_runs(names, value))
        return [_last_number(k, f"group rule {spec}") // value for k in names]
    if kind == "prefix":
        return [_PREFIX_SPLIT.split(_stem(k), maxsplit=1)[0] for k in names]
    if kind == "regex":
        try:
            pattern = re.compile(arg)
        except re.error as err:
            raise ValueError(f"group rule {spec!r}: not a valid regular expression ({err}).") from None
        out: list[Hashable] = []
        for k in names:
            match = pattern.search(_stem(k))
            if match is None:
                raise ValueError(
                    f"group rule {spec!r}: the image {k!r} does not match; expected a pattern that finds "
                    "the slide in every file name (e.g. regex:^(\\w+?)_)."
                )
            out.append(match.group(1) if pattern.groups else match.group(0))
        return out
    if kind == "csv":
        table = _read_group_csv(arg)
        missing = [k for k in names if _stem(k) not in table]
        if missing:
            raise ValueError(
                f"{arg}: no group for {len(missing)} image(s), e.g. {missing[:3]}; add a row "
                "'image,group' for every image of the dataset."
            )
        return [table[_stem(k)] for k in names]
    raise ValueError(
        f"unknown group rule {spec!r}; expected one of {', '.join(GROUP_RULES)} "
        "(e.g. --group prefix when tiles are named after their slide)."
    )


def group_folds(items: Sequence[T], groups: Sequence[Hashable]) -> list[tuple[Hashable, list[T], list[T]]]:
    """Leave-one-group-out folds: ``(held-out group, training items, held-out items)`` per group.

    Examples:
        >>> [(g, tr, te) for g, tr, te in group_folds(["a", "b", "c"], [0, 1, 0])]
        [(0, ['b'], ['a', 'c']), (1, ['a', 'c'], ['b'])]
    """
    if len(items) != len(groups):
        raise ValueError(f"group_folds: {len(items)} items but {len(groups)} groups.")
    out = []
    for g in sorted(set(groups), key=lambda v: (type(v).__name__, v if isinstance(v, (int, float)) else str(v))):
        out.append((g, [i for i, h in zip(items, groups) if h != g], [i for i, h in zip(items, groups) if h == g]))
    return out


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
