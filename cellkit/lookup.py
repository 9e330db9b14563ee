"""Name lookups that fail helpfully: the one helper behind every table and registry of names.

Modelled on MONAI's ``look_up_option``: a known name returns its entry, and a typo is an
error that names the closest choices and lists every available one, so the user can fix
it without opening the code:

```pycon
>>> look_up_option("circle", ["circle", "gaussian"], what="mask generator")
'circle'
>>> try:
...     look_up_option("circel", ["circle", "gaussian"],
...                    what="mask generator")
... except KeyError as err:  # also a ValueError
...     print(err)
Unknown mask generator 'circel'. Did you mean 'circle'?
Available: circle, gaussian.

```

The registries ([`Registry`][cellkit.registry.Registry]), the presets, the class-map
presets, the dataset formats, the command line's choices, the matching methods, the norms
and the config keys all answer through it.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

__all__ = ["UnknownOptionError", "did_you_mean", "look_up_option", "unknown_option_message"]

_REQUIRED: Any = object()


class UnknownOptionError(KeyError, ValueError):
    """A name that is not one of the choices. Subclasses both KeyError and ValueError.

    Both, so that code catching the error of a dict lookup (``KeyError``) and code catching
    a bad argument (``ValueError``) keep working whichever table the name was looked up in.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _normalized(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def did_you_mean(value: object, options: Iterable[Any], n: int = 3) -> str:
    """``" Did you mean 'a', 'b'?"`` for the options closest to ``value``, or ``""``.

    Closeness is `difflib.get_close_matches` (similarity ratio >= 0.6) on the
    lower-cased text, so a wrong case always finds its option.

    Examples:
        >>> did_you_mean("hungarain", ["greedy", "hungarian"])
        " Did you mean 'hungarian'?"
        >>> did_you_mean("xyz", ["greedy", "hungarian"])
        ''
    """
    by_text: dict[str, Any] = {}
    for option in options:
        by_text.setdefault(str(option).lower(), option)
    close = difflib.get_close_matches(str(value).lower(), list(by_text), n=n)
    if not close:
        return ""
    return f" Did you mean {', '.join(repr(by_text[c]) for c in close)}?"


def unknown_option_message(value: object, options: Iterable[Any], *, what: str = "option",
                           hint: str | None = None) -> str:
    """The message for a ``value`` that is not in ``options``: what was got, the closest
    options, every available one, and ``hint`` (how else to fix it).

    Examples:
        >>> print(unknown_option_message("cosin", ["cosine", "step"],
        ...                              what="scheduler", hint="Or pass None."))
        Unknown scheduler 'cosin'. Did you mean 'cosine'?
        Available: cosine, step. Or pass None.
    """
    names = [str(o) for o in options]
    message = (
        f"Unknown {what} {value!r}.{did_you_mean(value, names)} "
        f"Available: {', '.join(names) or '(none)'}."
    )
    return f"{message} {hint}" if hint else message


def look_up_option(
    value: Any,
    options: Mapping[Any, Any] | Collection[Any],
    *,
    what: str = "option",
    default: Any = _REQUIRED,
    hint: str | None = None,
    normalize: bool = False,
    error: type[Exception] = UnknownOptionError,
) -> Any:
    """The entry of ``options`` named ``value``; a clear error (or ``default``) otherwise.

    Args:
        value: the name to look up (usually a string from a config or the command line).
        options: a mapping (the value stored under the name is returned) or a collection
            of names (the matching name itself is returned). The error lists them in
            their iteration order.
        what: what the names are, for the message (``"mask generator"``, ``"preset"``).
        default: returned when ``value`` is not found, instead of raising.
        hint: a sentence appended to the message saying how else to fix it.
        normalize: compare strings stripped and case-insensitively (``" BCData"`` finds
            ``"bcdata"``); the canonical spelling of ``options`` is returned.
        error: the exception class raised (called with the message); by default
            [`UnknownOptionError`][], a ``KeyError`` and a ``ValueError``.

    Returns:
        ``options[name]`` for a mapping, else the matching name of ``options``.

    Raises:
        UnknownOptionError: (or ``error``) when ``value`` is not one of ``options`` and no
            ``default`` is given: the message names the closest options and every one.

    Examples:
        >>> look_up_option("ours", {"fcrn": 1, "ours": 2}, what="preset")
        2
        >>> look_up_option(" BCData", ["bcdata", "endonuke"], normalize=True)
        'bcdata'
        >>> look_up_option("gpu", ["cpu", "paper"], what="size", default="cpu")
        'cpu'
    """
    try:
        if value in options:
            return options[value] if isinstance(options, Mapping) else value
    except TypeError:  # an unhashable value is no name
        pass
    names = list(options)
    if normalize:
        wanted = _normalized(value)
        for name in names:
            if _normalized(name) == wanted:
                return options[name] if isinstance(options, Mapping) else name
    if default is not _REQUIRED:
        return default
    raise error(unknown_option_message(value, names, what=what, hint=hint))
