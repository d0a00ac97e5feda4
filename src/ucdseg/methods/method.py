"""The :class:`Method` type, its :class:`Term` s, and what a method may own.

A method is a declaration: weighted loss terms (each a function of the batch's
:class:`LossContext`), and hooks with defaults for what a method may own beyond its loss:

* its model (``model``: the classifier layout, :class:`~ucdseg.models.ModelSpec`) and how a new
  step's classifier is initialised (``classifier_init``);
* its parameter groups, their learning rates and weight decay, and what is frozen
  (``param_groups``: parameters in no group are frozen; ``train_mode``: BatchNorm layers put in
  eval mode at steps ``t >= 1``);
* its label transform (``label_transform``, with the per-image inputs it ``needs``: SSUL's
  unknown class from saliency) and its batch targets (``targets``: PLOP's pseudo-labels);
* its inference rule (``predict``: argmax by default; ``eval``, ``predict`` and the metrics go
  through it);
* a state kept across steps (``step_state``: EWC's importance, SDR's prototypes; saved in each
  step's checkpoint) or computed before a step (``begin_step``: PLOP's thresholds);
* how exemplar memory joins its batches (``memory``).

A variant is derived from its base (``MIB.extend("mib+ucd", ..., terms={"ucd": UCD})``); the
step-0 identity (:attr:`Method.first_step`, which runs may share a step 0) and joint training
(:meth:`Method.as_joint`) are derived, not declared.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..models import ModelSpec  # torch-free: a declaration imports no network

if TYPE_CHECKING:  # the annotations only: a method's functions get torch where they run
    import torch


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
    state: Any = None  # the method's step state (step_state or begin_step: EWC's importance, PLOP's thresholds)
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
class RunShape:
    """How a run splits its batch, for a method's warnings (:attr:`Term.notes`)."""

    world_size: int
    accumulate: int
    micro_batch: int  # images per process and micro-batch
    device: str


@dataclass(frozen=True)
class Term:
    """A loss term: ``fn(ctx, **options)`` and its default weight.

    ``options`` declares the method options ``fn`` takes as keyword arguments: they are bound once,
    when the step's criterion is built (:meth:`bind`). ``notes(shape, options)`` returns the
    warning lines the term has for a run of that shape (UCD under DDP or gradient accumulation).
    """

    fn: Callable[..., torch.Tensor]
    weight: float
    options: Mapping[str, Option] = field(default_factory=dict)
    notes: Callable[[RunShape, Mapping[str, Any]], list[str]] | None = None

    def bind(self, values: Mapping[str, Any]) -> Callable[[LossContext], torch.Tensor]:
        if not self.options:
            return self.fn
        return functools.partial(self.fn, **{name: values[name] for name in self.options})

    def with_weight(self, weight: float) -> "Term":
        return dataclasses.replace(self, weight=weight)

    @property
    def signature(self) -> str:
        """The term's computation: its function's qualified name and its weight."""
        return f"{_qualname(self.fn)}*{self.weight:g}"


def _qualname(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return f"{_qualname(fn.func)}{sorted(fn.keywords.items())}"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _as_term(value: Term | tuple) -> Term:
    """``Term`` or ``(function, weight)``."""
    if isinstance(value, Term):
        return value
    fn, weight = value
    return Term(fn, float(weight))


def argmax_prediction(logits: torch.Tensor) -> torch.Tensor:
    """The default inference rule: (B, C, H, W) logits -> (B, H, W) model-space ids of the highest logit."""
    return logits.argmax(1)


def softmax_confident(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Model-space ids where the softmax's most likely class is a foreground class with probability
    >= ``threshold``, else 0 (the default rule of memory selection's pseudo-labels)."""
    score, label = logits.softmax(1).max(1)
    return label.where((label > 0) & (score >= threshold), 0)


def one_group(model: torch.nn.Module, step: int, lr: float, weight_decay: float) -> list[dict]:
    """The default parameter groups: every parameter at ``lr`` and ``weight_decay``."""
    return [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}]


@dataclass(frozen=True)
class MemorySpec:
    """How exemplar memory (``data.memory.size``) joins a method's training batches.

    ``mixing``: ``concat`` adds the memory to the step's images (DKD, data_loaders.py:64-76; the
    default for every method); ``replace_half`` replaces a random half of each batch by memory
    samples (SSUL, main.py:429-443). ``labels``: ``seen`` labels a memory image with every class
    seen so far (SSUL, voc.py:76-79), ``current`` with the step's classes only (DKD,
    dataset.py:501-520). ``pseudo_threshold``: for choosing the memory of step ``t >= 2``, the old
    model's confident predictions (this threshold) add the old classes it finds to each candidate
    (SSUL 0.7, DKD 0.9); None: the ground truth of the previous step's classes only.
    """

    mixing: str = "concat"
    labels: str = "seen"
    pseudo_threshold: float | None = None


class StepState:
    """A method's state over a step, kept across steps in each step's checkpoint.

    The engine builds it with :attr:`Method.step_state` at the start of every step (from the
    previous step's :meth:`carry`, ``None`` at step 0), calls :meth:`before_losses` for each batch
    before the terms (which read it as ``ctx.state``), :meth:`after_backward` once per iteration
    after the loss's backward (the gradients of the loss are in ``.grad``), adds the gradient of
    ``penalty_weight * penalty()`` (a function of the parameters only), and saves
    :meth:`state_dict` in mid-step checkpoints and :meth:`carry` in the step's checkpoint.
    """

    penalty_weight: float = 0.0

    def before_losses(self, ctx: LossContext) -> None:
        return None

    def after_backward(self) -> None:
        return None

    def penalty(self) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def carry(self) -> dict:
        return {}


@dataclass(frozen=True)
class StepSetup:
    """What a method's ``begin_step`` and ``step_state`` hooks receive at the start of a step."""

    step: int
    model: torch.nn.Module
    old_model: torch.nn.Module | None
    num_old: int
    num_new: int
    options: Mapping[str, Any]
    previous: dict | None  # the previous step's StepState.carry() (None at step 0 or without one)
    device: torch.device
    loader: Callable[[], Any] | None = None  # one pass over the step's images (built on demand)
    progress: bool = False
    source: str = ""  # the previous step's checkpoint, for messages
    setting: str = "overlapped"  # data.setting


@dataclass(frozen=True)
class BoundTerms:
    """A method's terms for one step, with their weights and options bound (:meth:`Method.bind`)."""

    terms: tuple[tuple[str, Callable[[LossContext], torch.Tensor], float], ...]


#: Readable names of the usual step-0 computations (:attr:`Method.first_step`).
_FIRST_STEP_NAMES: dict[str, str] = {}


@dataclass(frozen=True)
class Method:
    """A registered incremental method (see the module docstring).

    ``terms`` maps a term name to a :class:`Term` (or ``(function, default weight)``); the total
    loss is the weighted sum. ``first_step_terms`` are used at step 0 (no old model).
    ``before_step`` (``begin_step``) runs once at the start of a step ``t >= 1`` and returns the
    step's state, which the terms read as ``ctx.state`` (PLOP: its entropy thresholds);
    ``targets(ctx)`` may rewrite ``ctx.labels`` of a batch before the terms see them (it must bind
    a new tensor, not write into the loader's one: ``ctx.step_labels`` keeps the original) and
    returns what the terms read as ``ctx.batch``. ``options`` are the method's own settings beyond
    those its terms declare (``method.options.<name>``); ``base`` names the method this one
    extends, so reports can pair the two runs of each seed.
    """

    name: str
    description: str
    terms: Mapping[str, Term]
    first_step_terms: Mapping[str, Term]
    classifier_init: str = "none"  # how step t>=1 initialises its new classifier (IncrementalDeepLab modes)
    joint: bool = False  # train every class in a single step (derived by as_joint)
    before_step: Callable[..., Any] | None = None  # begin_step(setup: StepSetup) -> ctx.state, t >= 1
    targets: Callable[[LossContext], Any] | None = None
    options: Mapping[str, Option] = field(default_factory=dict)  # method.options.<name>
    base: str | None = None  # the method this one adds to (mib+ucd -> mib): reports pair them by seed
    model: ModelSpec = field(default_factory=ModelSpec)
    param_groups: Callable[[torch.nn.Module, int, float, float], list[dict]] = one_group
    train_mode: Callable[[torch.nn.Module, int], None] | None = None  # after model.train(), steps t >= 1
    label_transform: Callable[..., Any] | None = None  # (labels uint8 array, options, **inputs) -> labels
    needs: tuple[str, ...] | Callable[[Mapping[str, Any]], tuple[str, ...]] = ()  # label_transform's inputs
    predict: Callable[[torch.Tensor], torch.Tensor] = argmax_prediction  # logits -> model-space ids
    step_state: Callable[[StepSetup], StepState] | None = None  # every step, carried in the checkpoints
    memory: MemorySpec = field(default_factory=MemorySpec)
    memory_size: int = 0  # exemplars when data.memory.size is not set (ssul-m, dkd-m: 100)
    # (logits, threshold) -> model-space ids of confident foreground predictions, else 0 (memory selection)
    confident_classes: Callable[[torch.Tensor, float], torch.Tensor] = softmax_confident
    notes_hook: Callable[[RunShape, Mapping[str, Any]], list[str]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", {k: _as_term(v) for k, v in self.terms.items()})
        object.__setattr__(self, "first_step_terms", {k: _as_term(v) for k, v in self.first_step_terms.items()})

    # ------------------------------------------------------------------ derived
    def extend(self, name: str, description: str, terms: Mapping[str, Term | tuple] | None = None,
               options: Mapping[str, Option] | None = None, **changes: Any) -> "Method":
        """A method that adds ``terms`` (and ``options``) to this one's, with this one as its ``base``;
        every other field is inherited unless given in ``changes``."""
        changes = {"base": self.name, **changes}
        return dataclasses.replace(self, name=name, description=description, terms={**self.terms, **(terms or {})},
                                   options={**self.options, **(options or {})}, **changes)

    def as_joint(self, name: str, description: str) -> "Method":
        """This method's step-0 training on every class in a single step (the upper bound)."""
        return dataclasses.replace(self, name=name, description=description, terms=self.first_step_terms,
                                   joint=True, base=None)

    @property
    def all_options(self) -> dict[str, Option]:
        """The method's options and those its terms declare."""
        found: dict[str, Option] = {}
        for term in [*self.first_step_terms.values(), *self.terms.values()]:
            found.update(term.options)
        return {**found, **self.options}

    @property
    def first_step(self) -> str:
        """What step 0 computes, so that runs share a step 0 only when it is the same: the step-0
        terms (functions and weights), the model, the parameter groups, the label transform and
        the carried state, and whether it is a joint run's only step (every class at once). ``"ce"`` /
        ``"bce"`` name the usual ones (plain cross-entropy, LwF-MC's BCE)."""
        parts = [f"{k}={t.signature}" for k, t in sorted(self.first_step_terms.items())]
        if self.joint:
            parts.append("joint")
        if self.model != ModelSpec():
            parts.append(f"model={self.model}")
        for hook in ("param_groups", "label_transform", "step_state"):
            value = getattr(self, hook)
            if value is not None and value is not getattr(Method, hook, None) and value is not one_group:
                parts.append(f"{hook}={_qualname(value)}")
        signature = ";".join(parts)
        return _FIRST_STEP_NAMES.get(signature, signature)

    @staticmethod
    def name_first_step(method: "Method", name: str) -> None:
        """Give ``method``'s step-0 computation a readable name (``"ce"``)."""
        _FIRST_STEP_NAMES[method.first_step] = name

    def inputs(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The per-image inputs the label transform needs with these options (``("saliency",)``)."""
        return tuple(self.needs(options) if callable(self.needs) else self.needs)

    @property
    def default_weights(self) -> dict[str, float]:
        return {name: term.weight for name, term in self.terms.items()}

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
        options = self.all_options
        values = {name: option.default for name, option in options.items()}
        for key, value in (overrides or {}).items():
            if key not in options:
                known = ", ".join(sorted(options)) or "none"
                raise ValueError(f"config key 'method.options.{key}': method {self.name!r} has no such option; "
                                 f"its options: {known}")
            values[key] = options[key].check(self.name, key, value)
        return values

    def notes(self, shape: RunShape, options: Mapping[str, Any], weights: Mapping[str, float]) -> list[str]:
        """The method's warning lines for a run of ``shape`` (its terms' with a non-zero weight)."""
        lines: list[str] = []
        for name, term in self.terms.items():
            if term.notes is not None and weights.get(name):
                lines += term.notes(shape, options)
        if self.notes_hook is not None:
            lines += self.notes_hook(shape, options)
        return lines

    # ------------------------------------------------------------------ one batch
    def bind(self, step: int, weights: Mapping[str, float], options: Mapping[str, Any]) -> BoundTerms:
        """The terms of step ``step`` with their weights and options bound (terms of weight 0 dropped)."""
        if step == 0 or self.joint:
            chosen = [(k, t, t.weight) for k, t in self.first_step_terms.items()]
        else:
            chosen = [(k, t, float(weights[k])) for k, t in self.terms.items() if weights[k]]
        return BoundTerms(tuple((k, t.bind(options), w) for k, t, w in chosen))

    def losses(self, ctx: LossContext, weights: Mapping[str, float] | BoundTerms) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch (terms with weight 0 are skipped). ``weights``: the
        step's :meth:`bind` (the engine's), or a weights mapping, bound here with ``ctx.options``."""
        bound = weights if isinstance(weights, BoundTerms) else self.bind(
            0 if ctx.old is None else ctx.step, weights, {**self.resolve_options(), **ctx.options})
        if ctx.old is not None and self.targets is not None:
            ctx.batch = self.targets(ctx)
        if isinstance(ctx.state, StepState):
            ctx.state.before_losses(ctx)
        return {name: fn(ctx) * w for name, fn, w in bound.terms}
