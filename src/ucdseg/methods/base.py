"""The :class:`Method` type, the per-batch :class:`LossContext` and the method registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

Term = Callable[["LossContext"], torch.Tensor]


@dataclass
class LossContext:
    """What a loss term may look at for one batch of step ``step``."""

    step: int
    out: Any  # SegOutput of the model being trained
    old: Any | None  # SegOutput of the frozen previous-step model (None at step 0)
    labels: torch.Tensor  # (B, H, W) step-t training labels in model space, 255 = ignore
    num_old: int  # classes known before this step, background included (0 at step 0)
    num_new: int  # classes added by this step
    options: Any = None  # the run's MethodConfig
    state: dict = field(default_factory=dict)  # per-step state from the method's hooks
    batch: dict = field(default_factory=dict)  # per-batch values a target hook computed
    # The step's training labels as the loader gave them. A ``targets`` hook (PLOP's
    # pseudo-labels) rebinds ``labels`` and leaves this one alone: UCD reads it (SPEC §3 "Totals").
    step_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.step_labels is None:
            self.step_labels = self.labels

    @property
    def diagnostics(self) -> dict:
        """Per-batch values that are not losses (floats), for the logs: ``batch["diagnostics"]``."""
        return self.batch.setdefault("diagnostics", {})


@dataclass(frozen=True)
class Method:
    """A registered incremental method.

    ``terms`` maps a term name to ``(function, default weight)``; the total loss is the weighted
    sum. ``first_step_terms`` are used at step 0 (no old model). ``before_step`` runs once at the
    start of a step ``t >= 1`` and returns the step's state (e.g. PLOP's entropy thresholds);
    ``targets`` may rewrite ``ctx.labels`` of a batch before the terms see them (it must bind a
    new tensor, not write into the loader's one: ``ctx.step_labels`` keeps the original).
    ``first_step`` names the step-0 loss, so that runs can share step 0 only when it matches
    (``"ce"``: plain cross-entropy, every method but LwF-MC, whose step 0 is BCE as in MiB).
    """

    name: str
    description: str
    terms: Mapping[str, tuple[Term, float]]
    first_step_terms: Mapping[str, tuple[Term, float]]
    classifier_init: str = "none"  # how step t>=1 initialises its new classifier: mib | plop | none
    joint: bool = False  # train every class in a single step (the upper bound)
    before_step: Callable[..., dict] | None = None
    targets: Callable[[LossContext], None] | None = None
    first_step: str = "ce"

    @property
    def default_weights(self) -> dict[str, float]:
        return {name: weight for name, (_, weight) in self.terms.items()}

    def weights(self, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        """Default weights updated by ``overrides``; unknown term names are an error."""
        weights = self.default_weights
        for key, value in (overrides or {}).items():
            if key not in weights:
                raise ValueError(
                    f"method {self.name!r} has no loss term {key!r}; its terms are {sorted(weights)}"
                )
            weights[key] = float(value)
        return weights

    def losses(self, ctx: LossContext, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch (terms with weight 0 are skipped)."""
        if ctx.old is None:
            return {name: fn(ctx) * w for name, (fn, w) in self.first_step_terms.items()}
        if self.targets is not None:
            self.targets(ctx)
        return {name: fn(ctx) * weights[name] for name, (fn, _) in self.terms.items() if weights[name]}


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
