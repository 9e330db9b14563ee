"""Every ``>>>`` example in cellkit's docstrings runs and shows what it says (the API pages show them).

An example that cannot run here (it needs a trained checkpoint, a GPU or a slide file) is marked
``# doctest: +SKIP`` in its docstring, next to a line saying why.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import cellkit

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(cellkit.__path__, prefix="cellkit.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # an example never writes beside the user's files
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    failures = []
    for test in finder.find(module, name):
        runner.run(test, out=failures.append)  # the report of each failing example
    assert not failures, "".join(failures)
    assert not list(tmp_path.iterdir()), f"{name}'s examples wrote {sorted(p.name for p in tmp_path.iterdir())}"


def test_the_examples_cover_the_api() -> None:
    examples = sum(len(t.examples) for name in MODULES
                   for t in doctest.DocTestFinder().find(importlib.import_module(name), name))
    assert examples > 150
