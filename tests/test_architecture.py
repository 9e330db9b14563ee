"""The layer order of the package, checked over the source (every import, inside functions too).

core (registry, lookup, points, imaging, plugins) -> parts (data, masks, losses, models,
postprocess, metrics, viz) -> recipe (config, geometry, builder, presets) -> inference
(predict, checkpoints, export, shipped models) -> wsi -> engine (training, calibration,
prediction folders, evaluation, plots) -> cli. A module may import its own layer and the
layers before it, never a later one; ``cellkit/__init__.py`` (the facade that re-exports
the API) and imports under ``if TYPE_CHECKING:`` (types only, never run) are exempt. The
order is drawn in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cellkit"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("cellkit._version", "cellkit.registry", "cellkit.lookup", "cellkit.points", "cellkit.imaging", "cellkit.plugins",
              "cellkit.progress", "cellkit.resources")),
    ("parts", ("cellkit.data", "cellkit.masks", "cellkit.losses", "cellkit.models", "cellkit.postprocess",
               "cellkit.metrics", "cellkit.viz", "cellkit.weights")),
    ("recipe", ("cellkit.config", "cellkit.geometry", "cellkit.builder", "cellkit.presets")),
    ("inference", ("cellkit.engine.inference", "cellkit.engine.predict", "cellkit.engine.checkpoint", "cellkit.export", "cellkit.zoo")),
    ("wsi", ("cellkit.wsi",)),
    ("engine", ("cellkit.engine",)),
    ("cli", ("cellkit.cli", "cellkit.__main__")),
)


def layer_of(module: str) -> int | None:
    """The index of the layer of a dotted module name (the longest matching prefix wins)."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every cellkit import of a file, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    here = (module or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # "from cellkit.data import io" (or "from cellkit import wsi") names that module
            found += [(node.lineno, f"{name}.{a.name}" if _is_module(f"{name}.{a.name}") else name)
                      for a in node.names]
    return [(line, name) for line, name in found if name == "cellkit" or name.startswith("cellkit.")]


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in SOURCES if p != PACKAGE / "__init__.py" and layer_of(module_name(p)) is None]
    assert not missing, f"modules without a layer (add them to LAYERS here and to docs/architecture.md): {missing}"


def later_imports(path: Path, module: str | None = None) -> list[str]:
    """The imports of a file from layers after its own, as ``line N: module (layer)``."""
    own = layer_of(module or module_name(path))
    assert own is not None
    return [f"line {line}: {name} ({LAYERS[layer_of(name)][0]})" for line, name in imports(path, module)
            if name != "cellkit" and layer_of(name) is not None and layer_of(name) > own]


@pytest.mark.parametrize("path", [p for p in SOURCES if p != PACKAGE / "__init__.py"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_later_layer(path: Path) -> None:
    later = later_imports(path)
    assert not later, (f"{path.relative_to(ROOT)} is in the {LAYERS[layer_of(module_name(path))][0]} layer and "
                       f"imports later layers: {later}; move the shared piece down (see docs/architecture.md)")


def test_the_rule_sees_imports_inside_functions_and_skips_type_only_ones(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cellkit.cli import main\n"
                     "def f():\n    from ..engine.train import fit\n    from cellkit import wsi\n    return fit\n")
    assert later_imports(probe, "cellkit.data.probe") == [
        "line 5: cellkit.engine.train (engine)", "line 6: cellkit.wsi (wsi)"]


MAX_BODY_LINES = 60
"""No function in ``cellkit/`` is longer than this (docstring aside)."""


def _argparse_table(node: ast.FunctionDef) -> bool:
    """A function that is mostly ``add_argument``/``add_parser`` calls: a table of options, data not code."""
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    table = [c for c in calls if c.func.attr in ("add_argument", "add_parser", "add_mutually_exclusive_group",
                                                  "set_defaults", "add_subparsers")]
    return len(table) >= 20 and len(table) >= 0.6 * len(node.body)


def long_functions(source: str, where: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:]  # the docstring
        if not body:
            continue
        lines = body[-1].end_lineno - body[0].lineno + 1
        if lines > MAX_BODY_LINES and not _argparse_table(node):
            out.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_longer_than_60_lines() -> None:
    found = [f for p in SOURCES for f in long_functions(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not found, f"functions over {MAX_BODY_LINES} lines (split them into steps with names): {found}"


def test_the_length_rule_counts_code_not_docstrings() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f'def f():\n    """Doc."""\n{body}\n', "m.py") == ["m.py:1 f (61 lines)"]
    assert long_functions(f'def f():\n    """{"a" * 10}\n' + "\n" * 80 + '    """\n    return 1\n', "m.py") == []


def test_cellkit_imports_sit_at_the_top_or_say_why() -> None:
    """A cellkit import inside a function is a dependency hidden from the top of the file: only
    where a comment just above says why (an import cycle of a package with its parts), and in
    the command line (its start-up time: ``cellkit --help`` loads no torch model code)."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if not (node.level if isinstance(node, ast.ImportFrom) else 0) and not any(
                        n == "cellkit" or n.startswith("cellkit.") for n in names):
                    continue  # another library: imported where it is used, for start-up time
                above = lines[node.lineno - 2].strip()
                if not above.startswith("#"):
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not hidden, "imports inside functions without a reason above them:\n" + "\n".join(hidden)


def test_the_training_module_stays_a_thin_loop() -> None:
    """engine/train.py puts the stages together; the steps live in plan, loop, validation and runs."""
    lines = len((PACKAGE / "engine" / "train.py").read_text(encoding="utf-8").splitlines())
    assert lines < 400, f"cellkit/engine/train.py has {lines} lines (goal: under 400); move a step to its module"
