"""Parameter regularisers of MiB's release: EWC, PI (path integral) and RW (Riemannian walk).

MiB (Cermelli et al., CVPR 2020) compares against three parameter-importance penalties, implemented
in ``fcdl94/MiB@1c58983:utils/regularizer.py`` (cited below as ``regularizer.py:LINE``) and driven
by ``train.py:124-139`` (``MiB:train.py``). The classes here compute exactly what those do, on a
mapping of named parameters instead of a model, so they are usable without ucdseg's trainer::

    # previous = the last step's carry(), None at step 0
    reg = EWC(dict(model.named_parameters()), old_params, previous)
    for images, labels in loader:
        optimizer.zero_grad()
        task_loss(model(images), labels).backward()
        reg.update()                     # reads p.grad: the task loss's gradient only
        penalty = reg_importance * reg.penalty()
        if penalty.requires_grad:        # MiB skips the backward when l_reg == 0 (train.py:135)
            penalty.backward()
        optimizer.step()
    previous = reg.carry()              # goes in the step checkpoint (MiB: train.py:263-266)

* ``params``: the model's named parameters (live tensors; the penalty differentiates through them,
  :meth:`~ParameterRegularizer.update` reads their ``.grad``). Only entries with
  ``requires_grad`` get an importance, as in the release (``regularizer.py:92-94,252-257``).
* ``old_params``: θ*, the old model's named parameters (``None`` at step 0). The penalty runs over
  the parameters present in both (``regularizer.py:107,181,294``): a new step's classifier is
  free.
* ``previous``: the previous step's :meth:`~ParameterRegularizer.carry` (``None`` at step 0, or
  when the previous step trained without this regulariser: then, as in MiB, no penalty). A
  missing entry or a wrong shape raises a one-line ``ValueError``.

Importances are normalised per tensor by :func:`normalize_importance` (``regularizer.py:37-38``)
unless ``normalize=False`` (MiB's ``--reg_no_normalize``). MiB's weights: ``--method EWC/PI/RW``
sets ``reg_importance`` 500/500/100 (``MiB:argparser.py:25-33``), ``reg_alpha`` 0.9 and
``reg_iterations`` 10 (``argparser.py:160-165``). docs/methods.md ("EWC, PI and RW") lists the
release's quirks that are reproduced here, and the two resume bugs that are not.

A ``p.grad`` that is ``None`` (a parameter that took no part in this iteration's loss) is
skipped, as PI and RW do (``regularizer.py:169,267,277``); MiB's EWC reads every gradient and
would fail on one. Under PyTorch 1.x's ``zero_grad`` MiB saw zeros rather than ``None`` for a
parameter that had received a gradient before; every parameter of a segmentation network
receives one at every iteration, so both agree there.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

__all__ = [
    "NORMALIZE_EPS",
    "PI_EPS",
    "normalize_importance",
    "ParameterRegularizer",
    "EWC",
    "PathIntegral",
    "RiemannianWalk",
    "REGULARIZERS",
]

#: ``EPS = 1e-8`` (``regularizer.py:4``): min-max normalisation and RW's score denominator.
NORMALIZE_EPS = 1e-8
#: ``EPS = 1e-20`` in ``PI.get`` (``regularizer.py:187``): PI's ω denominator.
PI_EPS = 1e-20

Tables = dict[str, dict[str, Tensor]]


def normalize_importance(m: Tensor) -> Tensor:
    """Per-tensor min-max ``(m - min m) / (max m - min m + 1e-8)`` (``regularizer.py:37-38``).

    The smallest entry of every tensor maps to 0, so it is never penalised; a constant tensor
    (one-element parameters included) maps to all zeros.
    """
    return (m - m.min()) / (m.max() - m.min() + NORMALIZE_EPS)


class ParameterRegularizer:
    """Common part of :class:`EWC`, :class:`PathIntegral` and :class:`RiemannianWalk`.

    Call :meth:`update` once per iteration after the task loss's backward and before the
    penalty's backward and the optimizer step; :meth:`penalty` returns the *unweighted* penalty
    ``sum_n sum W_n * (θ_n - θ*_n)^2`` over the parameters of the old model (the caller multiplies
    by ``reg_importance``). Without an old state (step 0, or ``previous=None``) the penalty is a
    zero scalar **without** a gradient path (``requires_grad`` false): skip its backward, as MiB
    does (``train.py:135``). :attr:`active` says which case holds.

    :meth:`state_dict` holds everything :meth:`update` changes (mid-step resume): a new object
    built with the same ``params``, ``old_params`` and ``previous``, then
    :meth:`load_state_dict`, continues bit for bit as the interrupted one. Tensors are returned
    without copies; this object never modifies them in place afterwards.
    """

    name: ClassVar[str] = ""
    #: the tables :meth:`carry` returns and ``previous`` must hold
    carried: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        params: Mapping[str, Tensor],
        old_params: Mapping[str, Tensor] | None,
        previous: Mapping[str, Mapping[str, Tensor]] | None,
        *,
        alpha: float = 0.9,
        iterations: int = 10,
        normalize: bool = True,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(
                f"{self.name} regulariser: alpha must be a number in [0, 1], got {alpha!r}"
            )
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(
                f"{self.name} regulariser: iterations must be a positive int, got {iterations!r}"
            )
        self.params: dict[str, Tensor] = dict(params)
        if not self.params:
            raise ValueError(f"{self.name} regulariser needs at least one parameter, got none")
        for key, p in self.params.items():
            if not isinstance(p, Tensor):
                raise ValueError(f"{self.name} regulariser: params[{key!r}] is not a tensor")
        self.alpha = float(alpha)
        self.iterations = iterations
        self.normalize = bool(normalize)
        self.calls = 0  # update() calls in this step (RW's ``count``, regularizer.py:223,274)

        if previous is not None and old_params is None:
            raise ValueError(
                f"{self.name} regulariser: a previous step's state was given without the old "
                "model's parameters"
            )
        self.old_params: dict[str, Tensor] | None = None
        self.penalized: list[str] = []
        if old_params is not None:
            self.old_params = {}
            for key, old in old_params.items():
                if key in self.params and old.shape != self.params[key].shape:
                    raise ValueError(
                        f"{self.name} regulariser: old parameter {key!r} has shape "
                        f"{tuple(old.shape)}, the parameter has {tuple(self.params[key].shape)}"
                    )
                self.old_params[key] = old.detach()
            self.penalized = [
                k for k, p in self.params.items() if k in self.old_params and p.requires_grad
            ]
            if not self.penalized:
                raise ValueError(
                    f"{self.name} regulariser: no trainable parameter is among the old model's "
                    f"{len(self.old_params)} parameters (names differ, e.g. a 'module.' prefix?)"
                )
        self.active = previous is not None
        if previous is not None:
            for kind in self.carried:
                if not isinstance(previous.get(kind), Mapping):
                    raise ValueError(
                        f"{self.name} regulariser state of the previous step has no {kind!r} table "
                        f"(it holds {sorted(previous)})"
                    )
        self._weights: dict[str, Tensor] = {}  # W_n of the penalty, set by the subclasses

    # -- the interface -------------------------------------------------------------------------

    def update(self) -> None:
        """Accumulate this iteration's importance from ``p.grad`` (the task loss's gradient)."""
        raise NotImplementedError

    def penalty(self) -> Tensor:
        """``sum_n sum W_n (θ_n - θ*_n)^2`` over the old model's trainable parameters."""
        if not self.active:
            first = next(iter(self.params.values()))
            return torch.zeros((), dtype=first.dtype, device=first.device)
        assert self.old_params is not None
        total: Tensor | None = None
        for key in self.penalized:  # in params order, as model.named_parameters() in the release
            term = (self._weights[key] * (self.params[key] - self.old_params[key]).pow(2)).sum()
            total = term if total is None else total + term
        assert total is not None
        return total

    def carry(self) -> Tables:
        """What the next step receives as ``previous`` (call once, at the end of the step)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this step bit for bit (see the class docstring)."""
        return {
            "name": self.name,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "normalize": self.normalize,
            "calls": self.calls,
            **self._tensor_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into an object built with the same constructor arguments."""
        if not isinstance(state, Mapping) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"cannot load a {got!r} regulariser state into {self.name}")
        for key in ("alpha", "iterations", "normalize"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"{self.name} regulariser state has {key}={state.get(key)!r}, "
                    f"this run has {getattr(self, key)!r}"
                )
        calls = state.get("calls")
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(
                f"{self.name} regulariser state: calls must be an int >= 0, got {calls!r}"
            )
        self._load_tensor_state(state)
        self.calls = calls

    # -- helpers -------------------------------------------------------------------------------

    def _tensor_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_tensor_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _previous_table(
        self, previous: Mapping[str, Mapping[str, Tensor]], kind: str
    ) -> dict[str, Tensor]:
        """``previous[kind]`` checked against ``params``: every penalised key present, shapes equal.

        Entries of parameters in ``params`` move to that parameter's device and dtype; others are
        kept as they are (MiB's EWC and RW carry them on, ``regularizer.py:82-86,234-237``).
        """
        table = previous[kind]
        for key in self.penalized:
            if key not in table:
                raise ValueError(
                    f"{self.name} regulariser state of the previous step has no {kind}[{key!r}], "
                    f"needed for the old model's parameter {key!r} of shape "
                    f"{tuple(self.params[key].shape)}"
                )
        out = {}
        for key, value in table.items():
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"{self.name} regulariser state of the previous step: {kind}[{key!r}] "
                    "is not a tensor"
                )
            p = self.params.get(key)
            if p is None:
                out[key] = value.detach()
                continue
            if value.shape != p.shape:
                raise ValueError(
                    f"{self.name} regulariser state of the previous step: {kind}[{key!r}] has "
                    f"shape {tuple(value.shape)}, the parameter has {tuple(p.shape)}"
                )
            out[key] = value.detach().to(device=p.device, dtype=p.dtype)
        return out

    def _norm(self, m: Tensor) -> Tensor:
        return normalize_importance(m) if self.normalize else m

    def _restore(
        self, state: Mapping[str, Any], kind: str, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """``state[kind]`` with exactly the keys and shapes of ``reference``, on its devices."""
        table = state.get(kind)
        if not isinstance(table, Mapping):
            raise ValueError(f"{self.name} regulariser state has no {kind!r} table")
        if set(table) != set(reference):
            extra = sorted(set(table) - set(reference))
            missing = sorted(set(reference) - set(table))
            raise ValueError(
                f"{self.name} regulariser state: {kind} keys differ from this run's "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        out = {}
        for key, ref in reference.items():
            value = table[key]
            if not isinstance(value, Tensor) or value.shape != ref.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{self.name} regulariser state: {kind}[{key!r}] has shape {shape}, "
                    f"expected {tuple(ref.shape)}"
                )
            out[key] = value.detach().to(device=ref.device, dtype=ref.dtype)
        return out

    def _restore_snapshot(self, state: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """``state["theta_prev"]``: ``None`` or a subset of ``params`` with their shapes."""
        table = state.get("theta_prev", ...)
        if table is None:
            return None
        if not isinstance(table, Mapping) or not set(table) <= set(self.params):
            raise ValueError(
                f"{self.name} regulariser state: theta_prev must be None or a table of this run's "
                "parameters"
            )
        return self._restore(state, "theta_prev", {k: self.params[k] for k in table})

    def _snapshot(self) -> dict[str, Tensor]:
        """θ of every parameter holding a gradient (``model_temp``, ``regularizer.py:173,272``)."""
        return {k: p.detach().clone() for k, p in self.params.items() if p.grad is not None}

    def _ones_for_new_keys(self, fisher: dict[str, Tensor]) -> None:
        """F = 1 for trainable parameters without a carried F (``regularizer.py:92-94,255-257``)."""
        for key, p in self.params.items():
            if p.requires_grad and key not in fisher:
                fisher[key] = torch.ones_like(p, requires_grad=False)

    def _ema_update(self, fisher: dict[str, Tensor]) -> None:
        """``F <- α g^2 + (1 - α) F`` where there is a gradient (``regularizer.py:99,279``)."""
        for key, p in self.params.items():
            if p.grad is not None and key in fisher:
                g = p.grad.detach()
                fisher[key] = (self.alpha * g.pow(2)) + ((1 - self.alpha) * fisher[key])


class EWC(ParameterRegularizer):
    """Elastic weight consolidation as MiB's ``EWC`` (``regularizer.py:59-123``).

    * F starts at ones (new keys) or at the previous step's **unnormalised** F (``:79-94``), and
      every :meth:`update` sets ``F <- α g^2 + (1-α) F`` with the task loss's mini-batch gradient
      g (``:96-99``): an exponential moving average dominated by the last ~1/α batches, not a
      dataset average of g^2. The F carried to the next step is therefore mostly the last few
      batches of this step (the previous steps' F decays as (1-α)^iterations).
    * Penalty ``sum_n sum norm(F_{t-1,n}) (θ_n - θ*_n)^2`` (``:101-109``); 0 at step 0.
    * ``carry() == {"fisher": F}`` (``state_dict()["fisher"]`` in the release, ``:114-116``);
      keys of the previous F that are not parameters here are carried unchanged, as in the release.
    ``iterations`` is accepted for a uniform signature and unused.
    """

    name = "ewc"
    carried = ("fisher",)

    def __init__(self, params, old_params, previous, *, alpha=0.9, iterations=10, normalize=True):
        super().__init__(
            params, old_params, previous, alpha=alpha, iterations=iterations, normalize=normalize
        )
        with torch.no_grad():
            self.fisher: dict[str, Tensor] = {}
            if previous is not None:
                previous_f = self._previous_table(previous, "fisher")
                self.fisher = dict(previous_f)
                self._weights = {k: self._norm(previous_f[k]) for k in self.penalized}
            self._ones_for_new_keys(self.fisher)

    @torch.no_grad()
    def update(self) -> None:
        """``F <- α g^2 + (1-α) F`` from the current ``p.grad`` (``regularizer.py:96-99``)."""
        self._ema_update(self.fisher)
        self.calls += 1

    def carry(self) -> Tables:
        return {"fisher": dict(self.fisher)}

    def _tensor_state(self) -> dict[str, Any]:
        return {"fisher": dict(self.fisher)}

    def _load_tensor_state(self, state: Mapping[str, Any]) -> None:
        self.fisher = self._restore(state, "fisher", self.fisher)


class PathIntegral(ParameterRegularizer):
    """Path integral (SI-like) importance as MiB's ``PI`` (``regularizer.py:126-206``).

    * θ_start is θ* for the old model's keys and the value at construction for the others; at
      step 0 it is the value at construction for every key (``:139-148``). θ* equals the weights
      at the start of the step unless the step's initialisation changes an old parameter.
    * Every :meth:`update` after the first adds ``δ += g ⊙ (θ_prev - θ)``, θ_prev being the
      snapshot taken at the previous call (``:164-174``). The release takes g at the *current*
      θ (after the displacement), i.e. one iteration later than SI's path integral; the last
      optimizer step's displacement is never counted. g is the task loss's gradient only.
    * At the end of the step ``ω = max(δ / ((θ - θ_start)^2 + 1e-20), 0) + ω_{t-1}``, for every
      parameter (``:185-193``). The release's comment says "averaged"; the code **sums** over
      steps, and so does this. No SI damping: a parameter ending near θ_start gets a huge ω,
      which the per-tensor normalisation then turns into ~0 for the rest of its tensor.
    * Penalty ``sum_n sum norm(ω_{t-1,n}) (θ_n - θ*_n)^2``, only with a previous ω
      (``:150-158,176-183``).
    * ``carry() == {"omega": ω}`` (the release's ``state_dict()["score"]``, ``:195-198``).
    ``alpha`` and ``iterations`` are accepted for a uniform signature and unused.
    """

    name = "pi"
    carried = ("omega",)

    def __init__(self, params, old_params, previous, *, alpha=0.9, iterations=10, normalize=True):
        super().__init__(
            params, old_params, previous, alpha=alpha, iterations=iterations, normalize=normalize
        )
        with torch.no_grad():
            old = self.old_params or {}
            # θ_start: θ* where the old model has the key, else the value now (kept in the state).
            self._own_start = {
                k: p.detach().clone() for k, p in self.params.items() if k not in old
            }
            self.theta_start = {k: old[k] if k in old else self._own_start[k] for k in self.params}
            self.omega_prev: dict[str, Tensor] = {}
            if previous is not None:
                previous_w = self._previous_table(previous, "omega")
                self.omega_prev = {k: v for k, v in previous_w.items() if k in self.params}
                self._weights = {k: self._norm(previous_w[k]) for k in self.penalized}
            self.delta = {k: torch.zeros_like(p) for k, p in self.params.items()}
            self.theta_prev: dict[str, Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        """``δ += g ⊙ (θ_prev - θ)`` from the second call on, then θ_prev <- θ (``:164-174``)."""
        if self.theta_prev is not None:
            for key, p in self.params.items():
                if p.grad is not None and key in self.theta_prev:
                    step = p.grad.detach() * (self.theta_prev[key] - p.detach())
                    self.delta[key] = self.delta[key] + step
        self.theta_prev = self._snapshot()
        self.calls += 1

    @torch.no_grad()
    def omega(self) -> dict[str, Tensor]:
        """``max(δ / ((θ - θ_start)^2 + 1e-20), 0) + ω_{t-1}`` (``regularizer.py:185-193``)."""
        out = {}
        for key, p in self.params.items():
            score = self.delta[key] / ((p.detach() - self.theta_start[key]).pow(2) + PI_EPS)
            score = torch.where(score > 0, score, torch.zeros_like(score))
            if key in self.omega_prev:
                score = self.omega_prev[key] + score
            out[key] = score
        return out

    def carry(self) -> Tables:
        return {"omega": self.omega()}

    def _tensor_state(self) -> dict[str, Any]:
        return {
            "delta": dict(self.delta),
            "theta_prev": None if self.theta_prev is None else dict(self.theta_prev),
            "theta_start": dict(self._own_start),
        }

    def _load_tensor_state(self, state: Mapping[str, Any]) -> None:
        delta = self._restore(state, "delta", self.delta)
        own_start = self._restore(state, "theta_start", self._own_start)
        theta_prev = self._restore_snapshot(state)
        self.delta, self._own_start, self.theta_prev = delta, own_start, theta_prev
        self.theta_start.update(own_start)


class RiemannianWalk(ParameterRegularizer):
    """Riemannian walk as MiB's ``RW`` (``regularizer.py:209-313``).

    * F as :class:`EWC`'s (ones for new keys, else the previous unnormalised F), updated by
      ``F <- α g^2 + (1-α) F`` at every call (``:231-257,276-279``).
    * Every ``iterations`` calls (calls 0, k, 2k, ... with k = ``iterations``): from the second
      such call on, ``s += g ⊙ (θ_prev - θ) / (½ F ⊙ (θ - θ_prev)^2 + 1e-8)``, θ_prev the
      snapshot of k calls earlier, g this call's gradient and F the value **before** this call's
      update; then θ_prev <- θ (``:261-274``). The gradient is that of the current point only,
      not a sum over the k iterations.
    * At the end of the step ``S = ½ (max(s, 0) + S_{t-1})`` for keys with an ``S_{t-1}``, and
      ``max(s, 0)`` (not halved) for new keys (``:281-287``): S is a running halving over steps.
    * Penalty ``sum_n sum (norm(F_{t-1,n}) + norm(S_{t-1,n})) (θ_n - θ*_n)^2``
      (``:231-243,289-297``).
    * ``carry() == {"fisher": F, "score": S}`` (``:299-302``).
    """

    name = "rw"
    carried = ("fisher", "score")

    def __init__(self, params, old_params, previous, *, alpha=0.9, iterations=10, normalize=True):
        super().__init__(
            params, old_params, previous, alpha=alpha, iterations=iterations, normalize=normalize
        )
        with torch.no_grad():
            self.fisher: dict[str, Tensor] = {}
            self.score_prev: dict[str, Tensor] = {}
            if previous is not None:
                previous_f = self._previous_table(previous, "fisher")
                previous_s = self._previous_table(previous, "score")
                self.fisher = dict(previous_f)
                self.score_prev = {k: v for k, v in previous_s.items() if k in self.params}
                self._weights = {
                    k: self._norm(previous_f[k]) + self._norm(previous_s[k]) for k in self.penalized
                }
            self._ones_for_new_keys(self.fisher)
            self.score_sum = {
                k: torch.zeros_like(p) for k, p in self.params.items() if p.requires_grad
            }
            self.theta_prev: dict[str, Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        """Score every ``iterations`` calls, then the F update (``regularizer.py:261-279``)."""
        if self.calls % self.iterations == 0:
            if self.theta_prev is not None:
                for key, p in self.params.items():
                    if p.grad is not None and key in self.theta_prev and key in self.score_sum:
                        prev, theta = self.theta_prev[key], p.detach()
                        delta = p.grad.detach() * (prev - theta)
                        den = 0.5 * self.fisher[key] * (theta - prev).pow(2) + NORMALIZE_EPS
                        self.score_sum[key] = self.score_sum[key] + (delta / den)
            self.theta_prev = self._snapshot()
        self.calls += 1
        self._ema_update(self.fisher)

    @torch.no_grad()
    def score(self) -> dict[str, Tensor]:
        """``½ (max(s, 0) + S_{t-1})``, ``max(s, 0)`` for a new key (``regularizer.py:281-287``)."""
        out = {}
        for key, s in self.score_sum.items():
            value = torch.where(s >= 0, s, torch.zeros_like(s))
            if key in self.score_prev:
                value = 0.5 * (value + self.score_prev[key])
            out[key] = value
        return out

    def carry(self) -> Tables:
        return {"fisher": dict(self.fisher), "score": self.score()}

    def _tensor_state(self) -> dict[str, Any]:
        return {
            "fisher": dict(self.fisher),
            "score_sum": dict(self.score_sum),
            "theta_prev": None if self.theta_prev is None else dict(self.theta_prev),
        }

    def _load_tensor_state(self, state: Mapping[str, Any]) -> None:
        fisher = self._restore(state, "fisher", self.fisher)
        score_sum = self._restore(state, "score_sum", self.score_sum)
        theta_prev = self._restore_snapshot(state)
        self.fisher, self.score_sum, self.theta_prev = fisher, score_sum, theta_prev


#: ``--regularizer`` names (``MiB:argparser.py:156``) to classes.
REGULARIZERS: dict[str, type[ParameterRegularizer]] = {
    "ewc": EWC,
    "pi": PathIntegral,
    "rw": RiemannianWalk,
}
