"""One generic registry, instantiated once per kind of plug-in.

A [`Registry`][] maps a name to a factory (a class or a function). Plug-ins register
themselves where they are defined, with a decorator; users register their own plug-ins
from their own modules the same way, without editing cellkit:

```python
from cellkit import MASKS

@MASKS.register("my_mask")
class MyMask:
    ...

generator = MASKS.build("my_mask", radius=3)
```
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cellkit.lookup import UnknownOptionError, look_up_option, unknown_option_message

if TYPE_CHECKING:  # the plug-in protocols live with their kind; nothing imports them at run time
    from torch import nn

    from cellkit.masks.base import MaskGenerator
    from cellkit.postprocess import PostProcessor

__all__ = ["Registry", "RegistryError"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class RegistryError(UnknownOptionError):
    """An unknown name, or a name registered twice. Subclasses both KeyError and ValueError.

    An [`UnknownOptionError`][cellkit.lookup.UnknownOptionError], so one ``except`` catches a typo in any
    name cellkit looks up.
    """


_REGISTER_HINT = "Register your own with the registry's .register(name) decorator."


class Registry(Generic[T]):
    """A named collection of factories for one kind of plug-in.

    Args:
        kind: what the registry holds, used in error messages (``"mask generator"``).

    ``T`` is what the factories build: ``Registry[MaskGenerator]`` for the mask generators,
    so ``MASKS.build(...)`` is typed as a [`MaskGenerator`][cellkit.masks.base.MaskGenerator].

    Examples:
        >>> reg = Registry("widget")
        >>> @reg.register("box")
        ... def box(size: int = 1) -> dict:
        ...     return {"size": size}
        >>> reg.names()
        ['box']
        >>> reg.build("box", size=3)
        {'size': 3}
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers ``factory`` under ``name``.

        Raises:
            RegistryError: when ``name`` is already registered (names are never silently
                overwritten; call [`unregister`][] first to replace one on purpose).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"A {self.kind} name must be a non-empty string, got {name!r}.")

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise RegistryError(
                    f"A {self.kind} named {name!r} is already registered "
                    f"({self._factories[name]!r}). Pick another name, or call "
                    f"unregister({name!r}) first to replace it on purpose."
                )
            self._factories[name] = factory
            self._factories = dict(sorted(self._factories.items()))  # errors list them sorted
            return factory

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (used by tests and to replace a plug-in on purpose)."""
        self.get(name)
        del self._factories[name]

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a shell-style ``pattern``."""
        names = list(self._factories)
        if pattern is not None:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        return names

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``.

        Raises:
            RegistryError: for an unknown name, with the closest names and every available one.
        """
        factory: Callable[..., T] = look_up_option(
            name, self._factories, what=self.kind, hint=_REGISTER_HINT, error=RegistryError
        )
        return factory

    def unknown_message(self, name: object) -> str:
        """The message for an unknown ``name``: close matches and the available names."""
        return unknown_option_message(name, self._factories, what=self.kind, hint=_REGISTER_HINT)

    def build(self, spec: str | T | dict[str, Any], /, **kwargs: Any) -> T:
        """Build a plug-in from a name and keyword arguments, or pass a built one through.

        Args:
            spec: a registered name; a dict ``{"name": ..., **kwargs}``; or an already
                built object, returned unchanged (``kwargs`` must then be empty).
            **kwargs: keyword arguments for the factory.

        Raises:
            RegistryError: for an unknown name.
            TypeError: for keyword arguments the factory does not accept, naming them.
        """
        if isinstance(spec, dict):
            spec = dict(spec)
            try:
                name = spec.pop("name")
            except KeyError:
                raise RegistryError(
                    f"A {self.kind} spec dict needs a 'name' key, got keys {sorted(spec)}."
                ) from None
            return self.build(name, **{**spec, **kwargs})
        if not isinstance(spec, str):
            if kwargs:
                raise TypeError(
                    f"Got an already built {self.kind} ({type(spec).__name__}) and keyword "
                    f"arguments {sorted(kwargs)}; pass a name to build one, or no arguments."
                )
            return spec
        factory = self.get(spec)
        try:
            return factory(**kwargs)
        except TypeError as err:
            # Re-raise argument errors with the plug-in's name so typos in configs are clear.
            if "argument" in str(err):
                raise TypeError(f"Building {self.kind} {spec!r}: {err}") from err
            raise

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._factories)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


# One instance per kind of plug-in. The plug-ins register themselves where they are
# defined (cellkit.masks, cellkit.losses, cellkit.models, cellkit.postprocess).
# Encoders and decoders are ``nn.Module``s that also follow cellkit.models.base.Encoder
# and .Decoder; losses are ``nn.Module``s that follow cellkit.losses.LossModule.
MASKS: Registry[MaskGenerator] = Registry("mask generator")
"""Mask generators, point annotations -> training targets
([`MaskGenerator`][cellkit.masks.base.MaskGenerator])."""
LOSSES: Registry[nn.Module] = Registry("loss")
"""Losses, ``loss(logits, reference) -> scalar`` ([`LossModule`][cellkit.losses.modules.LossModule])."""
ENCODERS: Registry[nn.Module] = Registry("encoder")
"""Encoders, images -> features ([`Encoder`][cellkit.models.base.Encoder])."""
DECODERS: Registry[nn.Module] = Registry("decoder")
"""Decoders, features -> class logits ([`Decoder`][cellkit.models.base.Decoder])."""
POSTPROCESSORS: Registry[PostProcessor] = Registry("post-processor")
"""Post-processors, probability maps -> detections ([`PostProcessor`][cellkit.postprocess.PostProcessor])."""

__all__ += ["MASKS", "LOSSES", "ENCODERS", "DECODERS", "POSTPROCESSORS"]
