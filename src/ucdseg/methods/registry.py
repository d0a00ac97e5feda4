"""The method registry: built-in methods (:mod:`.builtin`) and your own (docs/extending.md).

Thin functions over :data:`ucdseg.registry.METHODS` (its duplicate policy and error wording).
"""

from __future__ import annotations

from ..registry import METHODS, caller_module
from .method import Method

__all__ = ["register", "unregister", "get_method", "list_methods"]


def register(method: Method) -> Method:
    """Make ``method`` available as ``method.name=<its name>``; returns it."""
    if not isinstance(method, Method):
        raise ValueError(f"register() takes a Method, got {method!r}")
    return METHODS.register(method.name, method, by=caller_module())


def unregister(name: str) -> None:
    """Forget the method ``name`` (e.g. before registering a changed one in a notebook)."""
    METHODS.unregister(name)


def get_method(name: str) -> Method:
    """The method registered as ``name`` (case-insensitive); else a one-line error naming the others."""
    key = name.lower() if isinstance(name, str) else name
    return METHODS.get(key if key in METHODS else name)


def list_methods() -> list[Method]:
    """Every registered method, in the order they were registered."""
    return [method for _, method in METHODS.items()]
