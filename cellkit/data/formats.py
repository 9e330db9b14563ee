"""The one table of dataset formats: how each is read, named, classed and split.

Every place in cellkit that needs to know something about a dataset layout (the command
line, training, evaluation, [`load_dataset`][cellkit.data.readers.load_dataset], the
examples) asks this registry, so a new layout is one registration:

```python
from cellkit.data.formats import FORMATS, DatasetFormat

FORMATS.register("my_lab")(DatasetFormat(
    name="my_lab", jobs=my_jobs, description="my lab's layout"))
```

A [`DatasetFormat`][] holds

* ``jobs(root, class_map, split)``: lists the images and their label readers (see
  [`cellkit.data.readers`][cellkit.data.readers]);
* ``image_suffixes``: the image files it reads (also what ``cellkit predict`` takes from a
  folder: [`IMAGE_SUFFIXES`][]);
* ``class_maps``: the usual class map for a number of classes (EndoNuke with 2 classes is
  the paper's task, epithelium against the rest);
* ``group``: the key -> group function used to split it (EndoNuke: blocks of 100 tile ids,
  so validation tiles sit away from training tiles of one scan; others: each image on its
  own). ``cellkit train --group`` replaces it for one run
  ([`resolve_groups`][cellkit.data.split.resolve_groups]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellkit.registry import Registry

from .classes import BCDATA, ENDONUKE, ENDONUKE_EPITHELIUM, ClassMap
from .io import IMAGE_EXTENSIONS
from .split import bcdata_group, endonuke_region

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "DatasetFormat", "get_format", "resolve_class_map"]

IMAGE_SUFFIXES: tuple[str, ...] = IMAGE_EXTENSIONS
"""The image suffixes cellkit reads (training, ``cellkit predict`` on a folder)."""


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset layout.

    Attributes:
        name: the format's name (``--format``).
        jobs: ``(root: Path, class_map: ClassMap | None, split) -> list`` of read jobs.
        description: one line for ``--help``.
        image_suffixes: image file suffixes it reads.
        class_maps: number of classes -> the default [`ClassMap`][] of that task.
        group: key -> group id for [`split_by_group`][cellkit.data.split_by_group];
            ``None`` = each image is its own group.
        takes_mpp: ``jobs`` also takes ``mpp=`` (micrometres per pixel to read at: whole
            slides, ``data.mpp``).
    """

    name: str
    jobs: Callable[[Path, ClassMap | None, Any], list[Any]]
    description: str = ""
    image_suffixes: tuple[str, ...] = IMAGE_SUFFIXES
    class_maps: Mapping[int, ClassMap] = field(default_factory=dict)
    group: Callable[[Any], Any] | None = None
    takes_mpp: bool = False

    def class_map(self, num_classes: int) -> ClassMap | None:
        """The default class map for ``num_classes`` classes, or ``None`` (labels as written)."""
        return self.class_maps.get(int(num_classes))

    def class_names(self, num_classes: int) -> list[str] | None:
        """The default class names for ``num_classes`` classes, if the format has them."""
        cmap = self.class_map(num_classes)
        return list(cmap.names) if cmap is not None else None


FORMATS: Registry[DatasetFormat] = Registry("dataset format")
"""Dataset formats by name."""


def _register(fmt: DatasetFormat) -> None:
    FORMATS.register(fmt.name)(lambda fmt=fmt: fmt)


def get_format(name: str) -> DatasetFormat:
    """The format ``name`` (case-insensitive); an unknown name lists the known ones.

    Raises:
        RegistryError: for an unknown name, suggesting the closest.

    Examples:
        >>> get_format("bcdata").class_names(2)
        ['negative', 'positive']
    """
    return FORMATS.build(str(name).strip().lower())


def resolve_class_map(format: str, num_classes: int, class_map: Any = None,
                      class_names: Sequence[str] | None = None) -> ClassMap | None:
    """The class map a run uses: the one given, else the format's usual map for ``num_classes``.

    The one place the default is chosen (``cellkit train``, training in Python, and
    ``cellkit evaluate`` ask here): EndoNuke with 2 classes reads as the paper's task
    (epithelium = 1, the rest 0), BCData as negative = 0, positive = 1; other formats (and
    other class counts) keep their labels as written (``None``).

    Examples:
        >>> resolve_class_map("endonuke", 2).names
        ('other', 'epithelium')
        >>> resolve_class_map("csv", 2) is None
        True
        >>> resolve_class_map("csv", 2, "Tumor=1,Stroma=0",
        ...                   ["stroma", "tumour"]).names
        ('stroma', 'tumour')
    """
    if class_map is not None:
        return ClassMap.parse(class_map if isinstance(class_map, (str, ClassMap)) else dict(class_map),
                              names=list(class_names) if class_names else None)
    if str(format) not in FORMATS:
        return None
    return get_format(format).class_map(num_classes)


def _builtin() -> None:
    # Here, not at the top: the readers look formats up by name in this module.
    from . import readers as r

    _register(DatasetFormat(
        "csv", r._csv_jobs, "<stem>.csv (x,y,class) beside each image"))
    _register(DatasetFormat(
        "bcdata", r._bcdata_jobs, "images/<split>/<i>.png + annotations/<split>/{positive,negative}/<i>.h5",
        class_maps={2: BCDATA}, group=bcdata_group))
    _register(DatasetFormat(
        "endonuke", r._endonuke_jobs, "images/<id>.png + labels/<id>.txt (x y class)",
        class_maps={2: ENDONUKE_EPITHELIUM, 3: ENDONUKE}, group=endonuke_region))
    _register(DatasetFormat(
        "geojson", r._geojson_jobs, "<stem>.geojson (QuPath points or cell detections) beside each image"))


_builtin()
