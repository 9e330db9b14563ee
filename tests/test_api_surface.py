"""The public API surface: what ``__all__`` promises exists and is documented on an API page.

``cellkit.__all__`` and the ``__all__`` of every subpackage are the API. Each name must be
importable from where it is exported and appear on a page of ``docs/api/``: a
``::: module`` block renders it (the block of the module that exports it or of the one that
defines it, without ``members: false``), and it has a docstring, without which mkdocstrings
leaves it out (a constant needs a string literal right below its assignment; ``#:``
comments are not read).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Exported names without a docstring, reported to the owner of their module.
KNOWN_UNDOCUMENTED: set[str] = set()


try:
    from tests.test_docs import public_modules
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from test_docs import public_modules  # type: ignore[no-redef]

MODULES = public_modules()
PACKAGES = [m for m in MODULES if hasattr(importlib.import_module(m), "__path__")]


def exported(module: ModuleType) -> list[str]:
    return list(getattr(module, "__all__", []))


@cache
def rendered_members() -> dict[str, frozenset[str] | None]:
    """Module -> the names its ``:::`` block renders: ``None`` for all, a set for a list."""
    blocks: dict[str, frozenset[str] | None] = {}
    for page in sorted((REPO / "docs" / "api").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"^::: *([\w.]+)[ \t]*\n((?:[ \t]+\S.*\n?)*)", text, flags=re.MULTILINE):
            option = re.search(r"^\s*members:\s*(.+)$", match[2], flags=re.MULTILINE)
            if option is None:
                members: frozenset[str] | None = None
            elif option[1].strip().lower() == "false":
                members = frozenset()
            else:
                members = frozenset(re.findall(r"\w+", option[1]))
            previous = blocks.get(match[1], frozenset())
            blocks[match[1]] = None if members is None or previous is None else previous | members
    return blocks


def rendered_on(obj: object, attr: str) -> list[str]:
    """The documented modules whose block renders ``obj`` under the name ``attr``."""
    pages = []
    for module_name, members in rendered_members().items():
        module = importlib.import_module(module_name)
        if getattr(module, attr, None) is not obj:
            continue
        if attr not in exported(module) and getattr(obj, "__module__", None) != module_name:
            continue  # merely imported there: not rendered
        if members is None or attr in members:
            pages.append(module_name)
    return pages


@cache
def _griffe_package() -> Any:
    import griffe

    return griffe.load("cellkit", search_paths=[str(REPO)], docstring_parser="google", allow_inspection=False)


def docstring_of(package: str, attr: str) -> tuple[str, str | None]:
    """``(defining path, docstring)`` of ``package.attr``, read statically as mkdocstrings does."""
    obj = getattr(importlib.import_module(package), attr)
    if importlib.util.find_spec("griffe") is None:
        if inspect.isclass(obj) or inspect.isfunction(obj):
            return f"{obj.__module__}.{obj.__qualname__}", obj.__doc__
        return f"{package}.{attr}", "(griffe is not installed: not checked)"
    found = _griffe_package()
    for part in package.split(".")[1:]:
        found = found.members[part]
    member = found.members[attr]
    target = member.final_target if member.is_alias else member
    return target.path, target.docstring.value if target.docstring else None


def test_every_package_declares_its_api() -> None:
    missing = [m for m in PACKAGES if not hasattr(importlib.import_module(m), "__all__")]
    assert not missing, f"packages without __all__ (list what they export): {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_exported_names_exist_once(name: str) -> None:
    module = importlib.import_module(name)
    names = exported(module)
    absent = [n for n in names if not hasattr(module, n)]
    assert not absent, f"{name}.__all__ names what {name} does not have: {absent}"
    doubles = sorted({n for n in names if names.count(n) > 1})
    assert not doubles, f"{name}.__all__ lists these twice: {doubles}"


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_is_on_an_api_page(name: str) -> None:
    package = importlib.import_module(name)
    problems = []
    for attr in exported(package):
        obj = getattr(package, attr)
        if isinstance(obj, ModuleType):
            if obj.__name__ not in rendered_members():
                problems.append(f"{attr}: module {obj.__name__} has no '::: {obj.__name__}' block")
            continue
        if not rendered_on(obj, attr):
            problems.append(f"{attr}: no '::: module' block of docs/api renders it")
        path, doc = docstring_of(name, attr)
        if not (doc or "").strip() and path not in KNOWN_UNDOCUMENTED:
            problems.append(f"{attr}: {path} has no docstring, so the API page leaves it out")
    assert not problems, f"{name} exports names missing from the API pages:\n  " + "\n  ".join(problems)


def test_the_surface_test_sees_a_missing_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import cellkit.masks

    monkeypatch.setattr(cellkit.masks, "__all__", [*cellkit.masks.__all__, "not_there"])
    with pytest.raises(AssertionError, match="not_there"):
        test_exported_names_exist_once("cellkit.masks")
