"""Translation methods, each registered under the name the command line uses (`--method NAME`).

A method module decorates its class with `@register_method("name", "one-line description")`; the
registry is what `crossdiff methods` lists and what `crossdiff train --method` looks up. Every module
of this package is imported before a look-up, so a new method is one new file and no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

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


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> dict[str, str]:
    """Name -> description of every registered method."""
    _import_all()
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


def get_method(name: str) -> Any:
    """The class registered as `name` (a subclass of crossdiff.methods.base.Method)."""
    _import_all()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise CrossdiffError(f"unknown method {name!r}; available: {known}")
    return _REGISTRY[name][0]
