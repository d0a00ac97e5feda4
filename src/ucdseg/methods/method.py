"""The :class:`Method` type and the per-batch :class:`LossContext` its loss terms read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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
    options: Mapping[str, Any] = field(default_factory=dict)  # the method's options (Method.resolve_options)
    state: Any = None  # what the method's ``before_step`` returned for this step (PLOP: PlopStepState)
    batch: Any = None  # what the method's ``targets`` hook returned for this batch (PLOP: PseudoLabelStats)
    # The step's training labels as the loader gave them. A ``targets`` hook (PLOP's
    # pseudo-labels) rebinds ``labels`` and leaves this one alone: UCD reads it
    # (docs/protocol.md §3 "Totals").
    step_labels: torch.Tensor | None = None
    diagnostics: dict = field(default_factory=dict)  # non-loss floats of the batch for the logs (``ucd_*``)

    def __post_init__(self) -> None:
        if self.step_labels is None:
            self.step_labels = self.labels


@dataclass(frozen=True)
class Option:
    """An option of a method (``method.options.<name>``): its default, and what it accepts."""

    default: Any
    help: str
    choices: tuple | None = None
    positive: bool = False  # numbers: must be > 0

    def check(self, method: str, name: str, value: Any) -> Any:
        key = f"method.options.{name}"
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is float and isinstance(value, str):  # "nan", "inf" stay strings on the command line
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"config key {key!r} is {value!r}; method {method!r} expects a {kind.__name__}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"config key {key!r} is {value!r}; expected one of {list(self.choices)}")
        if self.positive and not (value > 0 and value != float("inf")):  # nan fails "> 0" too
            raise ValueError(f"config key {key!r} is {value}; expected a finite number > 0")
        return value


@dataclass(frozen=True)
class Method:
    """A registered incremental method.

    ``terms`` maps a term name to ``(function, default weight)``; the total loss is the weighted
    sum. ``first_step_terms`` are used at step 0 (no old model). ``before_step`` runs once at the
    start of a step ``t >= 1`` and returns the step's state, which the terms read as ``ctx.state``
    (PLOP: its entropy thresholds); ``targets(ctx)`` may rewrite ``ctx.labels`` of a batch before
    the terms see them (it must bind a new tensor, not write into the loader's one:
    ``ctx.step_labels`` keeps the original) and returns what the terms read as ``ctx.batch``.
    ``first_step`` names the step-0 loss, so that runs can share step 0 only when it matches
    (``"ce"``: plain cross-entropy, every method but LwF-MC, whose step 0 is BCE as in MiB).
    ``options`` are the method's own settings (``method.options.<name>`` in a config; the terms
    read them as ``ctx.options[name]``); ``base`` names the method this one extends, so reports
    can pair the two runs of each seed.
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
    options: Mapping[str, Option] = field(default_factory=dict)  # method.options.<name>
    base: str | None = None  # the method this one adds to (mib+ucd -> mib): reports pair them by seed

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

    def resolve_options(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The option defaults updated by ``overrides``; unknown names and bad values are an error."""
        values = {name: option.default for name, option in self.options.items()}
        for key, value in (overrides or {}).items():
            if key not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise ValueError(f"config key 'method.options.{key}': method {self.name!r} has no such option; "
                                 f"its options: {known}")
            values[key] = self.options[key].check(self.name, key, value)
        return values

    def losses(self, ctx: LossContext, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch (terms with weight 0 are skipped)."""
        if ctx.old is None:
            return {name: fn(ctx) * w for name, (fn, w) in self.first_step_terms.items()}
        if self.targets is not None:
            ctx.batch = self.targets(ctx)
        return {name: fn(ctx) * weights[name] for name, (fn, _) in self.terms.items() if weights[name]}
