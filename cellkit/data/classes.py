"""Class maps: from a dataset's own labels to cellkit's class indices.

Every dataset labels cells its own way: BCData has ``positive``/``negative`` files,
EndoNuke numbers stroma/epithelium/other as 0/1/2, a QuPath project has class names.
A [`ClassMap`][] says which cellkit class index each source label becomes and what
the classes are called. The paper's setting is two classes, ``other cells = 0`` and
``class of interest = 1``, but a map may produce any number of classes.

Labels are matched after normalisation: integers and integer strings are the same label
(``1 == "1"``), and names are matched case-insensitively (``"Positive" == "positive"``).
The key ``"*"`` maps every label that is not listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from cellkit.data.io import DataError
from cellkit.lookup import did_you_mean, look_up_option

__all__ = [
    "BCDATA",
    "CLASS_MAPS",
    "ENDONUKE",
    "ENDONUKE_EPITHELIUM",
    "ClassMap",
    "get_class_map",
]

Label = Union[str, int]

#: The key that maps every label not listed explicitly.
WILDCARD = "*"


def normalize_label(label: Any) -> Label:
    """A label as the key it is looked up by: an ``int`` or a case-folded, stripped ``str``.

    Examples:
        >>> normalize_label(" Positive "), normalize_label("2")
        ('positive', 2)
        >>> normalize_label(np.int64(2))
        2
    """
    if isinstance(label, (bool, np.bool_)):
        return int(label)
    if isinstance(label, (int, np.integer)):
        return int(label)
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        return int(label)
    text = str(label).strip()
    if text.lstrip("+-").isdigit():
        return int(text)
    return text.casefold()


@dataclass(frozen=True)
class ClassMap:
    """Maps source labels to cellkit class indices ``0 .. len(names) - 1``.

    Args:
        mapping: source label -> class index (or class name from ``names``). The key
            ``"*"`` maps every label not listed; without it an unlisted label is an error.
        names: the name of each cellkit class, index order.

    Raises:
        ValueError: when a target index is out of range or names repeat.

    Examples:
        >>> cmap = ClassMap({"negative": 0, "positive": 1}, ["negative", "positive"])
        >>> cmap("Positive"), cmap.num_classes
        (1, 2)
        >>> ClassMap.parse(["0=0", "1=1", "2=0"], names=["other", "epithelium"])(2)
        0
    """

    mapping: Mapping[Label, int]
    names: Sequence[str]
    _lookup: dict[Label, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [str(n) for n in self.names]
        if not names:
            raise ValueError("ClassMap needs at least one class name.")
        if len(set(names)) != len(names):
            raise ValueError(f"ClassMap class names must be unique, got {names}.")
        lookup: dict[Label, int] = {}
        clean: dict[Label, int] = {}
        by_name = {n.casefold(): i for i, n in enumerate(names)}
        for src, dst in dict(self.mapping).items():
            index = _target_index(dst, names, by_name, src)
            key = _key(src)
            if key in lookup and lookup[key] != index:
                raise ValueError(
                    f"ClassMap maps label {src!r} twice (to {lookup[key]} and {index}); "
                    "labels match case-insensitively and 1 == '1'."
                )
            lookup[key] = index
            clean[src if not isinstance(src, np.integer) else int(src)] = index
        if not lookup:
            raise ValueError("ClassMap needs at least one label in its mapping.")
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "mapping", clean)
        object.__setattr__(self, "_lookup", lookup)

    @property
    def num_classes(self) -> int:
        """The number of cellkit classes (``len(names)``)."""
        return len(self.names)

    def labels(self) -> list[str]:
        """The mapped source labels, as written in the mapping."""
        return [str(k) for k in self.mapping]

    def __contains__(self, label: object) -> bool:
        return normalize_label(label) in self._lookup or WILDCARD in self._lookup

    def __call__(self, label: Any, where: str = "") -> int:
        """The class index of one source label.

        Raises:
            DataError: when the label is not mapped; the message lists the mapped labels.
        """
        key = normalize_label(label)
        index = self._lookup.get(key)
        if index is None:
            index = self._lookup.get(WILDCARD)
        if index is None:
            prefix = f"{where}: " if where else ""
            mapped = self.labels()
            raise DataError(
                f"{prefix}label {label!r} is not in the class map; mapped labels are "
                f"{mapped}.{did_you_mean(label, mapped)} Add it to the class map (--class-map, or data.class_map in "
                f"a config; e.g. '{label}=0'), or map every other label with '*=0'."
            )
        return index

    def map_labels(self, labels: Iterable[Any], where: str = "") -> np.ndarray:
        """Class indices of many labels, shape ``(N,)`` int64."""
        return np.asarray([self(label, where) for label in labels], dtype=np.int64).reshape(-1)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for YAML/JSON configs); [`from_dict`][] reads it back."""
        return {"mapping": {str(k): v for k, v in self.mapping.items()}, "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassMap:
        """Inverse of [`to_dict`][]."""
        return cls(dict(data["mapping"]), list(data["names"]))

    @classmethod
    def identity(cls, num_classes_or_names: int | Sequence[str]) -> ClassMap:
        """Label ``i`` -> class ``i`` for ``i < num_classes``.

        Examples:
            >>> ClassMap.identity(3).names
            ('class0', 'class1', 'class2')
        """
        if isinstance(num_classes_or_names, int):
            names = [f"class{i}" for i in range(num_classes_or_names)]
        else:
            names = [str(n) for n in num_classes_or_names]
        return cls({i: i for i in range(len(names))}, names)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> ClassMap:
        """Each class name (and its index) -> its index: how cellkit's GeoJSON reads back.

        Examples:
            >>> ClassMap.from_names(["other", "positive"])("positive")
            1
        """
        mapping: dict[Label, int] = {}
        for i, n in enumerate(names):
            mapping[str(n)] = i
            if normalize_label(n) != i and i not in {normalize_label(m) for m in names}:
                mapping[i] = i
        return cls(mapping, list(names))

    @classmethod
    def parse(
        cls,
        spec: ClassMap | Mapping[Any, Any] | Sequence[str] | str,
        names: Sequence[str] | None = None,
    ) -> ClassMap:
        """Build a class map from a dict, ``"src=dst"`` strings or a preset name.

        Args:
            spec: a [`ClassMap`][] (returned as is); a mapping label -> index or class
                name; a list of ``"src=dst"`` strings or one comma-separated string
                (``"0=0,1=1,2=0"``, ``"Tumor=positive"``); or a preset name
                (``"bcdata"``, ``"endonuke_epithelium"``, see [`CLASS_MAPS`][]).
            names: class names; by default ``class0 .. classK`` for the largest index,
                or the target names used in ``spec`` when every target is a name.

        Raises:
            ValueError: for malformed entries, naming the entry; when the classes mapped
                to are not exactly ``0 .. K-1`` (``"0=0,1=5"`` leaves classes 1-4 without a
                label) or ``names`` has a name no label maps to.

        Examples:
            >>> ClassMap.parse("negative=0,positive=1").names
            ('class0', 'class1')
        """
        if isinstance(spec, (ClassMap, str)) and (isinstance(spec, ClassMap) or "=" not in spec):
            preset = spec if isinstance(spec, ClassMap) else get_class_map(spec)
            if names is None:
                return preset
            names = [str(n) for n in names]
            if len(names) != preset.num_classes:
                raise ValueError(
                    f"class names {names} for the class map {spec if isinstance(spec, str) else 'given'}, which maps "
                    f"onto {preset.num_classes} classes {list(preset.names)}; expected one name per class: give "
                    f"{preset.num_classes} names, or leave the names out."
                )
            return cls(dict(preset.mapping), names)
        if isinstance(spec, str):
            spec = [part for part in spec.split(",") if part.strip()]
        if isinstance(spec, Mapping):
            items = list(spec.items())
        elif isinstance(spec, (list, tuple)):
            items = []
            for entry in spec:
                if not isinstance(entry, str) or entry.count("=") != 1:
                    raise ValueError(
                        f"class map entries must look like 'source=target' (e.g. 'Tumor=1'), "
                        f"got {entry!r}."
                    )
                src, dst = (s.strip() for s in entry.split("="))
                if not src or not dst:
                    raise ValueError(f"class map entry {entry!r} has an empty side.")
                items.append((src, int(dst) if dst.lstrip("+-").isdigit() else dst))
            sources = [str(src) for src, _ in items]
            twice = sorted({s for s in sources if sources.count(s) > 1})
            if twice:
                raise ValueError(
                    f"the class map gives the source label(s) {', '.join(repr(s) for s in twice)} more than once "
                    f"({', '.join(e.strip() for e in spec if str(e).split('=')[0].strip() in twice)}); a label "
                    "maps to one class: keep one entry each."
                )
        else:
            raise ValueError(
                f"a class map must be 'source=target' pairs ('0=0,1=1,2=0'), a dict or a preset "
                f"name ({', '.join(sorted(CLASS_MAPS))}), got {type(spec).__name__} {spec!r}."
            )
        if names is not None:
            names = [str(n) for n in names]
        given = names is not None
        if names is None:
            targets = [d for _, d in items]
            if targets and all(isinstance(d, str) for d in targets):
                names = list(dict.fromkeys(str(d) for d in targets))
            else:
                ints = [int(d) for d in targets if not isinstance(d, str)]
                if any(isinstance(d, str) for d in targets):
                    raise ValueError(
                        "class map targets mix indices and names; pass names=[...] so the "
                        "names can be resolved."
                    )
                names = [f"class{i}" for i in range(max(ints) + 1 if ints else 1)]
        cmap = cls(dict(items), list(names))
        _check_numbering(cmap, items, given)
        return cmap

    @property
    def used_classes(self) -> list[int]:
        """The class indices some label maps to, ascending.

        Examples:
            >>> ClassMap({"a": 0}, ["x", "y"]).used_classes
            [0]
        """
        return sorted(set(self._lookup.values()))


def _spec_text(items: Sequence[tuple[Any, Any]]) -> str:
    """A class map as the command line writes it: ``0=0,1=1,2=0``."""
    return ",".join(f"{src}={dst}" for src, dst in items)


def _check_numbering(cmap: ClassMap, items: Sequence[tuple[Any, Any]], names_given: bool) -> None:
    """Class indices must be exactly ``0 .. K-1``, every one used, one name each.

    A gap (``0=0,1=5``) would train classes no label maps to, and their F1 (no cells, no
    detections) would read as a perfect 1.00; a surplus class name would do the same.
    """
    used = cmap.used_classes
    k = cmap.num_classes
    if used == list(range(k)):
        return
    unused = [i for i in range(k) if i not in used]
    renumber = {c: i for i, c in enumerate(used)}
    fixed = ",".join(
        f"{src}={dst}" if isinstance(dst, str) and not dst.strip().lstrip("+-").isdigit()
        else f"{src}={renumber[cmap._lookup[_key(src)]]}"
        for src, dst in items
    )
    text = _spec_text(items)
    what = f"class map {text} (--class-map, data.class_map)"
    empty = (f"class {unused[0]}" if len(unused) == 1 else
             f"classes {', '.join(map(str, unused))}")
    if not names_given:
        raise ValueError(
            f"{what} uses classes {{{', '.join(map(str, used))}}}; expected classes numbered "
            f"0..K-1 with none left out, else {empty} would be trained with no cell (and score "
            f"F1 1.00): use {fixed}."
        )
    names = list(cmap.names)
    kept = ",".join(names[c] for c in used)
    fix = f"--class-names {kept}" if fixed == text else f"{fixed} with --class-names {kept}"
    raise ValueError(
        f"{what} maps onto {len(used)} class{'es' if len(used) > 1 else ''} "
        f"{{{', '.join(map(str, used))}}}, but {k} class names were given ({', '.join(names)}); "
        f"no label maps to {', '.join(f'{i} ({names[i]!r})' for i in unused)}, which would be "
        f"trained with no cell. Expected classes 0..K-1 with one name each: use {fix}, or map "
        f"a label onto {' and '.join(repr(names[i]) for i in unused)}."
    )


def _key(src: Any) -> Label:
    """The lookup key of a mapping's source label (``"*"`` stays the wildcard)."""
    return WILDCARD if str(src).strip() == WILDCARD else normalize_label(src)


def _target_index(dst: Any, names: list[str], by_name: dict[str, int], src: Any) -> int:
    if isinstance(dst, str) and not dst.strip().lstrip("+-").isdigit():
        index = by_name.get(dst.strip().casefold())
        if index is None:
            raise ValueError(
                f"class map entry {src!r} -> {dst!r}: {dst!r} is not a class name; "
                f"class names are {names}."
            )
        return index
    try:
        index = int(dst)
    except (TypeError, ValueError):
        raise ValueError(
            f"class map entry {src!r} -> {dst!r}: the target must be a class index or name."
        ) from None
    if float(dst) != index or not 0 <= index < len(names):
        raise ValueError(
            f"class map entry {src!r} -> {dst!r}: the target must be an integer class index "
            f"in 0..{len(names) - 1} (classes {names}); map the label onto one of them, or give "
            f"one class name per class (--class-names, data.class_names)."
        )
    return index


BCDATA = ClassMap({"negative": 0, "positive": 1}, ["negative", "positive"])
"""BCData: ``negative`` (Ki-67 negative tumour cells) -> 0, ``positive`` -> 1."""

ENDONUKE_EPITHELIUM = ClassMap({0: 0, 1: 1, 2: 0}, ["other", "epithelium"])
"""EndoNuke as the paper's two-class task: epithelium (1) is the class of interest; stroma (0) and
other (2) nuclei are "other cells".
"""

ENDONUKE = ClassMap({0: 0, 1: 1, 2: 2}, ["stroma", "epithelium", "other"])
"""EndoNuke's own three classes."""

CLASS_MAPS: dict[str, ClassMap] = {
    "bcdata": BCDATA,
    "endonuke": ENDONUKE,
    "endonuke_epithelium": ENDONUKE_EPITHELIUM,
}
"""Presets by name, for configs and the command line."""


def get_class_map(name: str) -> ClassMap:
    """A preset class map by name.

    Raises:
        ValueError: for an unknown name, suggesting the closest one.

    Examples:
        >>> get_class_map("bcdata").names
        ('negative', 'positive')
    """
    cmap: ClassMap = look_up_option(
        name, CLASS_MAPS, what="class map preset", normalize=True,
        hint="Or give 'source=target' pairs such as '0=0,1=1,2=0'.",
    )
    return cmap
