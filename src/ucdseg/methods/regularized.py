"""EWC, PI and RW: cross-entropy plus a parameter-importance penalty (MiB's ``--regularizer``;
docs/methods.md "EWC, PI and RW").

Each is plain cross-entropy with the state of :mod:`ucdseg.losses.regularizers` kept over the
run: built at the start of every step from the previous step's (in its checkpoint, under
``method_state``), updated once per iteration from the cross-entropy's gradient, and its penalty
``importance * sum_n W_n (theta_n - theta*_n)^2`` added to the gradient before the optimizer step
(MiB train.py:125-139). Under DDP the gradient it reads is the all-reduced one, on every process
alike (docs/methods.md says how that relates to MiB's rank-0 update).
"""

from __future__ import annotations

from .. import losses  # losses.regularizers (torch) is imported when a step state is built
from .builtin import CE
from .method import Method, Option, StepSetup, StepState
from .registry import register

__all__ = ["RegularizerState", "regularizer_state", "EWC", "PI", "RW"]


class RegularizerState(StepState):
    """A :class:`~ucdseg.losses.regularizers.ParameterRegularizer` as a method's step state; what
    it carries to the next step names the regulariser, so a step of another method is refused."""

    def __init__(self, regularizer, importance: float, name: str):
        self.regularizer = regularizer
        self.penalty_weight = importance
        self.name = name

    def after_backward(self) -> None:
        self.regularizer.update()

    def penalty(self):
        return self.regularizer.penalty()

    def state_dict(self) -> dict:
        return self.regularizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.regularizer.load_state_dict(state)

    def carry(self) -> dict:
        return {"regularizer": self.name, "tables": self.regularizer.carry()}


def regularizer_state(setup: StepSetup, name: str) -> RegularizerState:
    """The regulariser ``name`` of the step: from the previous step's carried state at ``t >= 1``
    (one line naming the checkpoint when it has none of this regulariser's)."""
    options = setup.options
    if setup.step > 0 and not (isinstance(setup.previous, dict) and setup.previous.get("regularizer") == name):
        previous = setup.previous
        if not previous:
            held = "no method state"
        elif isinstance(previous, dict) and "regularizer" in previous:
            held = f"the state of {previous['regularizer']!r}"
        else:  # another method's state (SDR's prototypes)
            held = "a method state without a regulariser"
        raise ValueError(f"{setup.source} holds {held}, not the {name} importance state step {setup.step} needs; "
                         f"train its step 0 with method.name={name} (a step 0 of another method cannot be continued "
                         f"by {name})")
    previous = setup.previous["tables"] if setup.step > 0 else None
    old = dict(setup.old_model.named_parameters()) if setup.old_model is not None else None
    regularizer = losses.REGULARIZERS[name](dict(setup.model.named_parameters()), old, previous, alpha=options["alpha"],
                                     iterations=options["iterations"], normalize=options["normalize"])
    return RegularizerState(regularizer, options["importance"], name)


def _options(importance: float) -> dict[str, Option]:
    return {
        "importance": Option(importance, "weight of the penalty (MiB's --reg_importance)", positive=True),
        "alpha": Option(0.9, "EMA factor of the Fisher information (--reg_alpha)", positive=True),
        "iterations": Option(10, "RW: iterations between two score updates (--reg_iterations)", positive=True),
        "normalize": Option(True, "min-max normalise each tensor's importance (off: --reg_no_normalize)"),
    }


def _ewc(setup: StepSetup) -> RegularizerState:
    return regularizer_state(setup, "ewc")


def _pi(setup: StepSetup) -> RegularizerState:
    return regularizer_state(setup, "pi")


def _rw(setup: StepSetup) -> RegularizerState:
    return regularizer_state(setup, "rw")


EWC = register(Method("ewc", "EWC: cross-entropy + Fisher-weighted penalty on the parameters' drift (MiB's "
                      "--regularizer ewc)", {"ce": CE}, {"ce": CE}, options=_options(500.0), step_state=_ewc))
PI = register(Method("pi", "PI: cross-entropy + path-integral (synaptic intelligence) penalty (MiB's --regularizer "
                     "pi)", {"ce": CE}, {"ce": CE}, options=_options(500.0), step_state=_pi))
RW = register(Method("rw", "RW: cross-entropy + Riemannian-walk penalty, Fisher plus path score (MiB's "
                     "--regularizer rw)", {"ce": CE}, {"ce": CE}, options=_options(100.0), step_state=_rw))
