"""Incremental methods as compositions of loss terms.

A :class:`Method` names the loss terms it sums (each with a default weight), how the new
classifier is initialised, and optional hooks (a pass over the step's data before training, a
target transform such as PLOP's pseudo-labels). The training loop in :mod:`ucdseg.engine` is the
same for every method.
"""

from __future__ import annotations

from .method import LossContext, MemorySpec, Method, Option, RunShape, StepSetup, StepState, Term
from .registry import get_method, list_methods, register, unregister
from . import builtin as _builtin  # noqa: F401  (registers the built-in methods)
from . import regularized as _regularized  # noqa: F401  (EWC, PI, RW)
from . import sdr as _sdr  # noqa: F401  (MiB+SDR)
from . import frozen as _frozen  # noqa: F401  (SSUL and DKD)

__all__ = ["LossContext", "MemorySpec", "Method", "Option", "RunShape", "StepSetup", "StepState", "Term",
           "get_method", "list_methods", "register", "unregister"]
