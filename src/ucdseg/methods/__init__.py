"""Incremental methods as compositions of loss terms.

A :class:`Method` names the loss terms it sums (each with a default weight), how the new
classifier is initialised, and optional hooks (a pass over the step's data before training, a
target transform such as PLOP's pseudo-labels). The training loop in :mod:`ucdseg.engine` is the
same for every method.
"""

from __future__ import annotations

from .method import LossContext, Method
from .registry import get_method, list_methods, register
from . import builtin as _builtin  # noqa: F401  (registers the built-in methods)

__all__ = ["LossContext", "Method", "get_method", "list_methods", "register"]
