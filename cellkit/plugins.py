"""Load plug-ins: the modules that register your own parts in cellkit's registries.

A plug-in is a Python module that registers mask generators, losses, encoders, decoders or
post-processors with the registries' decorators (see the page "Write a plug-in"). Once it
is imported, its names work everywhere a config names a part. `load_plugins` imports them
from three places:

* **the command line**: `cellkit train --plugins my_plugins ...` (also `predict`,
  `evaluate` and every other command), a comma-separated list;
* **a training YAML**: a top-level `plugins: [my_plugins]` list, imported by
  `cellkit train --config my.yaml` only with your consent on the command line: the same
  names in `--plugins`, or `--trust-plugins` (a YAML, like a run's `config.yaml`, may come
  from someone else);
* **installed packages**: every entry point of the group `cellkit.plugins`, loaded by
  every `cellkit` command. A package declares one in its `pyproject.toml`:

```toml
[project.entry-points."cellkit.plugins"]
mine = "my_pkg_plugins"              # a module, imported
other = "my_pkg.parts:register"      # or a function, called with no arguments
```

A name is a dotted module name (`my_plugins`, `my_lab.cells.masks`), found on `sys.path`
or, as `python -m` would, in the current folder; or the path of a `.py` file
(`plugins/my_masks.py`), whose folder is then put on `sys.path` so that data-loader worker
processes can import it by name too. Each module is imported once per process, however many
times it is named.

**Importing a plug-in runs its code.** That is the user's explicit choice: a module named on
the command line (or a YAML's `plugins:` list with `--trust-plugins`), or declared by a
package they installed; the command line prints a line for each plug-in it imports. Nothing
else imports anything: a checkpoint or a config read by
`cellkit predict`, `load_model` or `CellkitConfig.from_yaml` never does, even when its
`plugins:` list names modules; a checkpoint whose parts are not registered fails with an
error that names the missing part and the `--plugins` to pass.

```python
from cellkit.plugins import load_plugins

# my_plugins.py in the current folder or on sys.path
load_plugins(["my_plugins"])
```
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cellkit.registry import DECODERS, ENCODERS, LOSSES, MASKS, POSTPROCESSORS

__all__ = [
    "DISABLE_ENTRY_POINTS_VARIABLE",
    "ENTRY_POINT_GROUP",
    "PluginError",
    "load_plugins",
    "missing_plugin_hint",
    "split_plugin_names",
    "unregistered_names",
]

ENTRY_POINT_GROUP = "cellkit.plugins"
"""The entry-point group whose entries every `cellkit` command loads."""

DISABLE_ENTRY_POINTS_VARIABLE = "CELLKIT_NO_ENTRY_POINTS"
"""An environment variable: set to `1`, the entry points of installed packages are not loaded
(a way around a broken installed plug-in until it is fixed or uninstalled)."""

# (module, function) of the entry points already called: a function registers names, and a
# second call would register them twice.
_CALLED: set[tuple[str, str]] = set()


class PluginError(ImportError):
    """A plug-in that cannot be loaded: the message names it, what failed and how to fix it."""


def split_plugin_names(names: str | Iterable[str] | None) -> list[str]:
    """Module names from a comma-separated string or a list of them, stripped, in order, once each.

    Raises:
        PluginError: for an empty name (`"a,,b"`) or one that is not a string.

    Examples:
        >>> split_plugin_names("my_plugins, lab.masks")
        ['my_plugins', 'lab.masks']
        >>> split_plugin_names(["a", "b,a"])
        ['a', 'b']
    """
    if names is None:
        return []
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise PluginError(
                f"A plug-in must be named by a string (a module name or a .py path), got {item!r}."
            )
        for part in item.split(","):
            name = part.strip()
            if not name:
                raise PluginError(
                    f"Empty plug-in name in {item!r}; expected module names separated by commas, "
                    "e.g. --plugins my_plugins,lab.masks."
                )
            if name not in out:
                out.append(name)
    return out


def load_plugins(
    modules: str | Sequence[str] = (),
    *,
    entry_points: bool = True,
    origin: str = "--plugins",
    announce: bool = False,
) -> list[str]:
    """Import the plug-in modules named, and those that installed packages declare.

    Importing a module runs its code: pass only modules you trust, as you would `import`
    them (see the module's notes). A module already imported is not imported again, and an
    entry point's function is called once per process.

    Args:
        modules: module names (`"my_plugins"`, `"lab.cells.masks"`) or paths of `.py` files
            (`"plugins/my_masks.py"`); a string is split at commas. A name is looked up on
            `sys.path`, then in the current folder (as `python -m` does); a file's folder is
            put on `sys.path` and the file imported under its stem.
        entry_points: also load every entry point of the group `cellkit.plugins`
            (`ENTRY_POINT_GROUP`) of the installed packages, unless the environment
            variable `CELLKIT_NO_ENTRY_POINTS` is `1`. An entry point's value is a module
            (imported) or `module:function` (the function is called with no arguments).
        origin: where the names come from, for error messages (`"--plugins"`,
            `"my.yaml's plugins: list"`).
        announce: print a line to stderr for each plug-in module not imported yet, as the
            command line does: importing runs its code, and the user sees whose.

    Returns:
        What was loaded, in order and once each: the module names, then the entry points'
        values (`"module"` or `"module:function"`).

    Raises:
        PluginError: for a module that cannot be found or fails while it is imported (the
            message names it, gives the exception's line and how to fix it), or a broken
            entry point (naming the installed distribution that declares it).

    Examples:
        >>> load_plugins(["json"], entry_points=False)   # any importable module
        ['json']
    """
    loaded = []
    for name in split_plugin_names(modules):
        if announce and _module_name(name) not in sys.modules:
            print(f"cellkit: importing the plug-in {name} (named in {origin}); this runs its code",
                  file=sys.stderr, flush=True)
        loaded.append(_import_module(name, origin))
    loaded = list(dict.fromkeys(loaded))
    if entry_points and os.environ.get(DISABLE_ENTRY_POINTS_VARIABLE, "").strip() not in ("1", "true", "yes"):
        loaded += _load_entry_points(announce)
    return loaded


def _module_name(name: str) -> str:
    """The module a plug-in name imports (a ``.py`` path's stem)."""
    if name.endswith(".py") or os.sep in name or (os.altsep and os.altsep in name):
        return Path(name).stem
    return name


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"


def _import_module(name: str, origin: str) -> str:
    """Import one plug-in module (a dotted name or a ``.py`` path); returns its module name."""
    if name.endswith(".py") or os.sep in name or (os.altsep and os.altsep in name):
        return _import_file(Path(name), origin)
    try:
        importlib.import_module(name)
        return name
    except ModuleNotFoundError as err:
        if not _is_the_module(err, name):
            raise _failed(name, origin, err) from err
        if _add_current_folder(name):
            try:
                importlib.import_module(name)
                return name
            except ModuleNotFoundError as again:
                if not _is_the_module(again, name):
                    raise _failed(name, origin, again) from again
                err = again
            except Exception as again:  # noqa: BLE001  any error of the plug-in's own code
                raise _failed(name, origin, again) from again
        raise PluginError(
            f"Cannot load the plug-in module {name!r} named in {origin}: {_one_line(err)}. Expected a "
            f"module importable by name: a file {name.split('.')[0]}.py (or a package folder) in the "
            "current folder or on PYTHONPATH, or an installed package (pip install <the package>); or "
            f"the path of a .py file. Check the spelling of {origin}."
        ) from err
    except Exception as err:  # noqa: BLE001  any error of the plug-in's own code
        raise _failed(name, origin, err) from err


def _is_the_module(err: ModuleNotFoundError, name: str) -> bool:
    """Whether ``err`` says the plug-in itself (or a package above it) is missing, not a dependency."""
    missing = getattr(err, "name", None)
    parts = name.split(".")
    return missing in {".".join(parts[: i + 1]) for i in range(len(parts))}


def _add_current_folder(name: str) -> bool:
    """Put the current folder on ``sys.path`` (last) when it holds ``name``; whether it was added."""
    cwd = Path.cwd()
    on_path = {str(Path(p or ".").resolve()) for p in sys.path}
    top = name.split(".")[0]
    if str(cwd.resolve()) in on_path or not ((cwd / f"{top}.py").is_file() or (cwd / top).is_dir()):
        return False
    sys.path.append(str(cwd))
    importlib.invalidate_caches()
    return True


def _import_file(path: Path, origin: str) -> str:
    """Import a ``.py`` file by its stem, with its folder on ``sys.path``."""
    file = path.expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise PluginError(
            f"Cannot load the plug-in file {path} named in {origin}: it {what}. Expected the path of a "
            ".py file, or a module name without '.py' or '/' (e.g. my_plugins for my_plugins.py on "
            "PYTHONPATH)."
        )
    if file.suffix != ".py" or not file.stem.isidentifier():
        raise PluginError(
            f"Cannot load the plug-in file {path} named in {origin}: expected a .py file whose name is a "
            f"Python identifier (e.g. my_plugins.py), got {file.name!r}; rename it."
        )
    file = file.resolve()
    stem = file.stem
    known = sys.modules.get(stem)
    if known is not None:
        where = getattr(known, "__file__", None)
        if where is not None and Path(where).resolve() == file:
            return stem
        raise PluginError(
            f"Cannot load the plug-in file {path} named in {origin}: a module named {stem!r} is already "
            f"imported from {where or 'elsewhere'}; rename the file so its name is not taken."
        )
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(stem)
    except Exception as err:  # noqa: BLE001  any error of the plug-in's own code
        raise _failed(str(path), origin, err) from err
    where = getattr(module, "__file__", None)
    if where is None or Path(where).resolve() != file:
        raise PluginError(
            f"Cannot load the plug-in file {path} named in {origin}: importing {stem!r} found {where} "
            "instead; rename the file so its name is not taken by another module."
        )
    return stem


def _failed(name: str, origin: str, err: BaseException) -> PluginError:
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    fix = (f"install what it needs (pip install {missing.split('.')[0]}) or fix the import"
           if missing else "fix the error in the module")
    return PluginError(
        f"Importing the plug-in module {name!r} named in {origin} failed: {_one_line(err)}. "
        f"It is your code that failed: {fix}, or leave it out of {origin}."
    )


def _distribution(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an installed distribution"
    return f"the installed distribution {dist.name!r} {dist.version}"


def _load_entry_points(announce: bool = False) -> list[str]:
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        module_name, _, attr = ep.value.partition(":")
        module_name, attr = module_name.strip(), attr.strip()
        dist = _distribution(ep)
        fix = (f"reinstall or upgrade it (pip install --force-reinstall {ep.dist.name}) or uninstall it "
               f"(pip uninstall {ep.dist.name})" if getattr(ep, "dist", None) is not None
               else "reinstall or uninstall the package that declares it")
        fix += f"; or set {DISABLE_ENTRY_POINTS_VARIABLE}=1 to skip the entry points of installed packages"
        if announce and module_name not in sys.modules:
            print(f"cellkit: importing the plug-in {ep.value} (entry point {ep.name!r} of {dist}); this runs "
                  f"its code ({DISABLE_ENTRY_POINTS_VARIABLE}=1 skips installed packages' plug-ins)",
                  file=sys.stderr, flush=True)
        try:
            loaded = ep.load()
            if attr and (module_name, attr) not in _CALLED:
                if not callable(loaded):
                    raise TypeError(f"{ep.value} is a {type(loaded).__name__}, not a function")
                _CALLED.add((module_name, attr))
                loaded()
        except Exception as err:  # noqa: BLE001  any error of the installed package's code
            raise PluginError(
                f"The cellkit plug-in entry point {ep.name!r} ({ep.name} = {ep.value!r} in the group "
                f"{ENTRY_POINT_GROUP!r}) of {dist} failed to load: {_one_line(err)}. Expected a module, or "
                f"module:function with a function that takes no arguments; {fix}."
            ) from err
        out.append(ep.value)
    return out


# --------------------------------------------------------------------------- missing names


def unregistered_names(cfg: Any) -> list[tuple[str, str]]:
    """The parts a config names that no registry holds: `(kind, name)` pairs, once each.

    Looks at every stage (the config and its `pretrain`): the encoder, the decoder, every
    target's mask generator, every loss and the post-processor. A name listed here is a
    typo or belongs to a plug-in that is not loaded.

    Examples:
        >>> import cellkit
        >>> cfg = cellkit.presets.ours(size="cpu")
        >>> cfg.model.decoder = "my_decoder"
        >>> unregistered_names(cfg)
        [('decoder', 'my_decoder')]
    """
    found: list[tuple[str, str]] = []

    def check(registry: Any, name: Any) -> None:
        if isinstance(name, str) and name not in registry and (registry.kind, name) not in found:
            found.append((registry.kind, name))

    stages = cfg.stages() if hasattr(cfg, "stages") else [cfg]
    for stage in stages:
        check(ENCODERS, stage.model.encoder)
        check(DECODERS, stage.model.decoder)
        for spec in (stage.targets or {}).values():
            check(MASKS, getattr(spec, "name", None))
        for spec in stage.losses or []:
            check(LOSSES, getattr(spec, "name", None))
        check(POSTPROCESSORS, stage.postprocess.name)
    return found


def missing_plugin_hint(cfg: Any, command: str = "train") -> str | None:
    """A sentence for a config whose parts are not registered: which, and the `--plugins` to pass.

    Returns `None` when every part is registered. The config's own `plugins:` list (what the
    run was trained with) is named when it has one.

    Examples:
        >>> import cellkit
        >>> cfg = cellkit.presets.ours(size="cpu")
        >>> cfg.targets["circle"].name, cfg.plugins = "class_circle", ["my_plugins"]
        >>> hint = missing_plugin_hint(cfg, "predict")
        >>> print(hint)  # doctest: +NORMALIZE_WHITESPACE
        mask generator 'class_circle' is not registered: if a plug-in registers
        it, load that plug-in first, e.g. cellkit predict --plugins my_plugins
        (the config lists the plug-ins my_plugins); in Python, import the
        module before building the config.
    """
    missing = unregistered_names(cfg)
    if not missing:
        return None
    listed = [str(p) for p in (getattr(cfg, "plugins", None) or [])]
    parts = ", ".join(f"{kind} {name!r}" for kind, name in missing)
    verb = "is" if len(missing) == 1 else "are"
    example = ",".join(listed) if listed else "MODULE"
    recorded = f" (the config lists the plug-ins {', '.join(listed)})" if listed else ""
    yaml_too = " or a plugins: list in the YAML" if command == "train" else ""
    them = "it" if len(missing) == 1 else "them"
    return (
        f"{parts} {verb} not registered: if a plug-in registers {them}, load that plug-in first, e.g. "
        f"cellkit {command} --plugins {example}{yaml_too}{recorded}; in Python, import the module before "
        "building the config."
    )
