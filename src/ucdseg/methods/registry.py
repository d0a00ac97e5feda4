"""The method registry: built-in methods (:mod:`.builtin`) and your own (docs/extending.md)."""

from __future__ import annotations

from typing import Iterable

from .method import Method

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(_METHODS)}") from None


def list_methods() -> Iterable[Method]:
    return list(_METHODS.values())
