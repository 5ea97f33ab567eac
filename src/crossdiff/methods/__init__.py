"""Translation methods, each registered under the name the command line uses (`--method NAME`).

A method module decorates its class with `@register_method("name", "one-line description")`; the
registry is what `crossdiff methods` lists and what `crossdiff train --method` looks up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from crossdiff.errors import CrossdiffError

T = TypeVar("T")
_REGISTRY: dict[str, tuple[object, str]] = {}


def register_method(name: str, description: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = (cls, description)
        return cls

    return decorate


def available_methods() -> dict[str, str]:
    """Name -> description of every registered method."""
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


def get_method(name: str) -> object:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise CrossdiffError(f"unknown method {name!r}; available: {known}")
    return _REGISTRY[name][0]
