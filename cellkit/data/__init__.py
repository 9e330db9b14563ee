"""Reading and writing point annotations, datasets and augmentation.

Readers ([`load_dataset`][]) turn cellkit CSV folders, BCData, EndoNuke and QuPath
GeoJSON into [`Sample`][]s: an ``(H, W, 3)`` uint8 RGB image with ``(x, y)`` points
and integer classes, mapped by a [`ClassMap`][]. Writers ([`write_csv`][],
[`write_geojson`][]) write predictions that cellkit and QuPath read back.
[`PointDataset`][] yields random crops with augmentation ([`Augment`][]) and
targets built on the fly by the mask generators; [`collate`][] batches them;
[`split_by_group`][] splits by slide or patient.

Examples:
    >>> from cellkit.data import load_dataset, bundled_endonuke
    >>> samples = load_dataset(bundled_endonuke(), "endonuke",
    ...                        class_map="endonuke_epithelium")  # doctest: +SKIP
"""

from __future__ import annotations

from .augment import (
    AUGMENT_PROFILES,
    Augment,
    augment_profile,
    brightness_contrast,
    flip,
    flip_points,
    hed_jitter,
    rot90,
    rot90_points,
)
from .bundled import ENDONUKE_MPP, bundled_endonuke
from .classes import BCDATA, CLASS_MAPS, ENDONUKE, ENDONUKE_EPITHELIUM, ClassMap, get_class_map
from .dataset import PointDataset, Sample, collate, crop, pad_to, random_crop
from .formats import FORMATS, DatasetFormat, get_format
from .io import (
    IMAGE_EXTENSIONS,
    DataError,
    DataWarning,
    atomic_write,
    load_image,
    read_image,
    write_bytes_atomic,
    write_text_atomic,
)
from .readers import (
    PointRecords,
    detect_format,
    load_dataset,
    read_bcdata_h5,
    read_csv_points,
    read_endonuke_labels,
    read_geojson_points,
)
from .split import (
    GROUP_RULES,
    bcdata_group,
    endonuke_group,
    endonuke_region,
    group_folds,
    id_runs,
    resolve_groups,
    split_by_group,
)
from .writers import DEFAULT_COLORS, write_csv, write_geojson

__all__ = [
    "BCDATA",
    "CLASS_MAPS",
    "DEFAULT_COLORS",
    "ENDONUKE",
    "ENDONUKE_EPITHELIUM",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "AUGMENT_PROFILES",
    "Augment",
    "augment_profile",
    "ClassMap",
    "DatasetFormat",
    "DataError",
    "DataWarning",
    "PointDataset",
    "PointRecords",
    "Sample",
    "atomic_write",
    "GROUP_RULES",
    "bcdata_group",
    "brightness_contrast",
    "ENDONUKE_MPP",
    "bundled_endonuke",
    "collate",
    "crop",
    "detect_format",
    "endonuke_group",
    "endonuke_region",
    "group_folds",
    "id_runs",
    "resolve_groups",
    "get_format",
    "flip",
    "flip_points",
    "get_class_map",
    "hed_jitter",
    "load_dataset",
    "load_image",
    "pad_to",
    "random_crop",
    "read_bcdata_h5",
    "read_csv_points",
    "read_endonuke_labels",
    "read_geojson_points",
    "read_image",
    "rot90",
    "rot90_points",
    "split_by_group",
    "write_bytes_atomic",
    "write_csv",
    "write_geojson",
    "write_text_atomic",
]
