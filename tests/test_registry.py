"""The generic Registry: registration, lookup, building, and helpful errors."""

from __future__ import annotations

import argparse

import pytest

import cellkit
from cellkit.lookup import UnknownOptionError, look_up_option
from cellkit.registry import Registry, RegistryError


def make_registry() -> Registry[object]:
    reg: Registry[object] = Registry("widget")

    @reg.register("circle")
    class Circle:
        def __init__(self, radius: int = 1) -> None:
            self.radius = radius

    @reg.register("square")
    def square(size: int = 2) -> dict:
        return {"size": size}

    return reg


def test_register_and_build_by_name():
    reg = make_registry()
    assert reg.names() == ["circle", "square"]
    assert reg.build("circle", radius=5).radius == 5
    assert reg.build("square") == {"size": 2}
    assert reg.build({"name": "square", "size": 7}) == {"size": 7}
    assert "circle" in reg and len(reg) == 2 and list(reg) == ["circle", "square"]


def test_names_pattern():
    reg = make_registry()
    assert reg.names("sq*") == ["square"]


def test_built_object_passes_through():
    reg = make_registry()
    obj = object()
    assert reg.build(obj) is obj
    with pytest.raises(TypeError, match="already built"):
        reg.build(obj, radius=1)


def test_duplicate_name_is_an_error():
    reg = make_registry()
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("circle")(lambda: None)
    reg.unregister("circle")
    reg.register("circle")(lambda: "new")
    assert reg.build("circle") == "new"


def test_typo_suggests_close_names_and_lists_all():
    reg = make_registry()
    with pytest.raises(RegistryError) as info:
        reg.build("circel")
    message = str(info.value)
    assert "Did you mean 'circle'" in message
    assert "Available: circle, square" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_look_up_option_returns_the_entry_or_fails_helpfully():
    assert look_up_option("b", {"a": 1, "b": 2}) == 2
    assert look_up_option(" B ", ("a", "b"), normalize=True) == "b"
    assert look_up_option("B", ("a", "b"), default=None) is None  # case matters unless normalize
    assert look_up_option("z", ["a"], default="a") == "a"
    with pytest.raises(UnknownOptionError) as info:
        look_up_option("circel", ["circle", "square"], what="shape", hint="Or draw one.")
    expected = "Unknown shape 'circel'. Did you mean 'circle'? Available: circle, square. Or draw one."
    assert str(info.value) == expected
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownOptionError, match=r"Unknown option \['x'\]\. Available: a\."):
        look_up_option(["x"], {"a": 1})  # unhashable: not found, not a TypeError
    with pytest.raises(argparse.ArgumentTypeError, match="Did you mean 'circle'"):
        look_up_option("Circel", ["circle"], error=argparse.ArgumentTypeError)
    assert issubclass(RegistryError, UnknownOptionError)


def test_unknown_kwarg_names_the_plugin():
    reg = make_registry()
    with pytest.raises(TypeError, match="Building widget 'circle'.*radus"):
        reg.build("circle", radus=3)


def test_spec_dict_without_name():
    with pytest.raises(RegistryError, match="needs a 'name' key"):
        make_registry().build({"radius": 3})


def test_bad_name_type():
    with pytest.raises(TypeError, match="non-empty string"):
        make_registry().register("")


def test_one_registry_per_kind_with_cellkit_plugins():
    assert {"circle", "random_polygon", "gaussian", "estimated", "prior"} <= set(cellkit.MASKS.names())
    assert {"ce", "iou", "dynamic", "consistency", "prior", "mse"} <= set(cellkit.LOSSES.names())
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= set(cellkit.ENCODERS.names())
    assert "deeplabv3plus" in cellkit.DECODERS.names()
    assert "peaks" in cellkit.POSTPROCESSORS.names()
    registries = [cellkit.MASKS, cellkit.LOSSES, cellkit.ENCODERS, cellkit.DECODERS, cellkit.POSTPROCESSORS]
    assert len({id(r) for r in registries}) == 5
