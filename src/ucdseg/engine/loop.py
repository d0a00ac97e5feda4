"""The training loop: one iteration, and the iterations of one step (torchvision's shape).

:func:`train_one_iteration` is one SGD update of the model on one batch under the method's
:class:`Criterion`; :func:`train_iterations` runs a step's iterations from ``start`` to
``total``, logging and checkpointing on the way; :func:`run_plan` runs a step's plan
(:func:`.build.plan_step`). None of them reads the config.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from ..methods import LossContext, Method, StepState
from .process_group import Dist


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs an iteration (the config's ``train.*`` keys the loop needs)."""

    batch_size: int  # global
    accumulate: int
    amp_dtype: torch.dtype | None
    log_every: int
    checkpoint_every: int
    compile: bool
    channels_last: bool
    bn: str
    sampler_seed: int


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class CompileError(RuntimeError):
    """``train.compile=true`` but torch.compile cannot build the model here."""


@contextlib.contextmanager
def compile_errors(active: bool):
    """Turn a failure of torch.compile's backend (no C/C++ toolchain, ...) into one clear line."""
    if not active:
        yield
        return
    import torch._dynamo as dynamo

    try:
        yield
    except dynamo.exc.BackendCompilerFailed as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CompileError(
            "train.compile=true: torch.compile failed to build the model; it needs a working C/C++ toolchain "
            f"(a C++ compiler such as g++ on the PATH and the Python headers; Triton on CUDA), "
            f"or set train.compile=false ({first})") from exc


def _float(out):
    """Losses are computed in float32 even when the forward ran under autocast."""
    return type(out)(*(None if v is None else [t.float() for t in v] if isinstance(v, list) else v.float()
                       for v in out))


@dataclass
class Criterion:
    """The method's loss for the batches of one step: its weighted terms on a :class:`LossContext`,
    bound once (weights and options) when the criterion is built."""

    method: Method
    weights: Mapping[str, float]
    options: Mapping[str, Any]
    step: int
    num_old: int  # classes known before the step, background included
    num_new: int
    state: Any = None  # the method's step state (step_state, or what begin_step returned)
    diagnostics: dict = field(default_factory=dict)  # the last batch's, for the logs

    def __post_init__(self) -> None:
        self.bound = self.method.bind(self.step, self.weights, self.options)

    def __call__(self, out, old, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        ctx = LossContext(self.step, _float(out), None if old is None else _float(old), labels, self.num_old,
                          self.num_new, options=self.options, state=self.state)
        terms = self.method.losses(ctx, self.bound)
        self.diagnostics = ctx.diagnostics
        return terms

    @property
    def step_state(self) -> StepState | None:
        return self.state if isinstance(self.state, StepState) else None


@dataclass
class Trainee:
    """What one step trains: the model (plain, for state dicts), the forward to call (DDP and/or
    compiled), the frozen old model, and the optimisation state."""

    model: torch.nn.Module
    forward: Callable
    old_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    # the old model's trunk (backbone and head) is the model's, frozen: computed once per batch, for both
    shared_trunk: bool = False
    step_state: StepState | None = None  # the method's state over the step (saved with the checkpoint)

    def state_dict(self, iteration: int, step: int) -> dict:
        """A mid-step checkpoint: everything :meth:`load_state_dict` needs to continue bit for bit."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": torch.get_rng_state(), "iteration": iteration, "step": step}
        if self.step_state is not None:
            state["method_state"] = self.step_state.state_dict()
        return state

    def load_state_dict(self, state: dict) -> int:
        """Continue from a mid-step checkpoint; returns its iteration."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if self.step_state is not None:
            self.step_state.load_state_dict(state.get("method_state", {}))
        return state["iteration"]


def shares_trunk(model: torch.nn.Module, old_model: torch.nn.Module | None) -> bool:
    """Whether the old model's trunk (backbone and head) can stand for the model's: every trunk
    parameter frozen, every trunk BatchNorm in eval mode, and the same weights and statistics.
    Then one forward of the trunk serves both models (SSUL at steps ``t >= 1``)."""
    if old_model is None or not hasattr(model, "trunk"):
        return False
    trunk = [model.backbone, model.head]
    if any(p.requires_grad for m in trunk for p in m.parameters()):
        return False
    if any(m.training for part in trunk for m in part.modules()
           if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout))):
        return False
    mine = {**model.backbone.state_dict(prefix="backbone."), **model.head.state_dict(prefix="head.")}
    theirs = old_model.state_dict()
    return all(k in theirs and torch.equal(v, theirs[k]) for k, v in mine.items())


def _forward(trainee: Trainee, x: torch.Tensor):
    """The model's and the old model's outputs of ``x`` (the old one without gradient)."""
    if trainee.shared_trunk:
        with torch.no_grad():
            trunk = trainee.old_model.trunk(x)
            old = trainee.old_model(x, trunk=trunk)
        return trainee.forward(x, trunk=trunk), old
    out = trainee.forward(x)
    old = None
    if trainee.old_model is not None:
        with torch.no_grad():
            old = trainee.old_model(x)
    return out, old


def _add_penalty(trainee: Trainee) -> torch.Tensor | None:
    """The step state's update from the loss's gradients, then its weighted penalty's gradient added
    to them (a function of the parameters alone: no forward, so DDP's hooks do not run again)."""
    state = trainee.step_state
    if state is None:
        return None
    if trainee.scaler.is_enabled():
        trainee.scaler.unscale_(trainee.optimizer)  # the state reads true gradients
        grads = [p.grad for p in trainee.model.parameters() if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return None  # an fp16 overflow: the scaler skips this step, and the state does not take it in
    state.after_backward()
    penalty = state.penalty()
    if penalty is None or not state.penalty_weight or not penalty.requires_grad:
        return None if penalty is None else penalty.detach()
    params = [p for p in trainee.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(state.penalty_weight * penalty, params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)
    return penalty.detach()


def train_one_iteration(trainee: Trainee, criterion: Criterion, images: torch.Tensor, labels: torch.Tensor,
                        opts: LoopOptions, dist: Dist, where: str = "") -> dict[str, torch.Tensor]:
    """One SGD update on a batch; returns the loss and its terms (detached, averaged over micro-batches).

    ``train.accumulate=N``: the process's images in N equal micro-batches, each loss divided by N,
    the gradients summed; DDP all-reduces once, after the last micro-batch's backward.
    """
    trainee.optimizer.zero_grad(set_to_none=True)
    logged: dict[str, torch.Tensor] = {}
    device = images.device
    for micro, (x, y) in enumerate(zip(images.chunk(opts.accumulate), labels.chunk(opts.accumulate))):
        last = micro == opts.accumulate - 1
        with trainee.forward.no_sync() if dist.enabled and not last else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=opts.amp_dtype or torch.bfloat16, enabled=opts.amp_dtype is not None), \
                    compile_errors(opts.compile):
                out, old = _forward(trainee, x)
            terms = criterion(out, old, y)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} {where}(terms: {', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())})")
            with compile_errors(opts.compile):
                trainee.scaler.scale(loss / opts.accumulate).backward()
        for k, v in {"loss": loss, **terms}.items():
            logged[k] = logged.get(k, 0) + v.detach() / opts.accumulate
    penalty = _add_penalty(trainee)
    if penalty is not None:
        logged["penalty"] = penalty
    trainee.scaler.step(trainee.optimizer)
    trainee.scaler.update()
    trainee.scheduler.step()
    return logged


def averaged(values: Mapping[str, torch.Tensor], dist: Dist) -> dict[str, float]:
    """The logged values averaged over the processes: under DDP the quantity whose gradient is
    applied (each process's value alone is a mean over its slice of the batch)."""
    stacked = torch.stack([v.detach() for v in values.values()]).float()
    if dist.enabled:
        torch.distributed.all_reduce(stacked)
        stacked /= dist.world_size
    return dict(zip(values, stacked.tolist()))


def train_iterations(trainee: Trainee, criterion: Criterion, loader: Iterable, opts: LoopOptions, dist: Dist,
                     step: int, start: int, total: int, log: Callable[[int, dict], None],
                     checkpoint: Callable[[int], None], progress: bool = True, overall=None) -> None:
    """Iterations ``start .. total-1`` of step ``step``: ``log(iteration, values)`` every
    ``log_every`` iterations and at the end, ``checkpoint(iteration)`` every ``checkpoint_every``.

    The logged ``lr`` is the learning rate the iteration used (read before the scheduler's step),
    so a step's curve ends at its last rate, not at the 0 the poly schedule reaches after it.
    ``overall``: the run's outer bar (:class:`.plan.OverallBar`), advanced with this step's bar.
    """
    device = next(trainee.model.parameters()).device
    memory_format = torch.channels_last if opts.channels_last else torch.preserve_format
    bar = tqdm(loader, total=total, initial=start, desc=f"step {step} train", disable=not (progress and dist.is_main),
               dynamic_ncols=True, leave=overall is None)
    if overall is not None and start:
        overall.skip(start)
    for it, (images, labels) in enumerate(bar, start=start):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        lr = trainee.optimizer.param_groups[0]["lr"]
        values = train_one_iteration(trainee, criterion, images, labels, opts, dist,
                                     where=f"at step {step}, iteration {it} ")
        if overall is not None:
            overall.update()
        if (it + 1) % opts.log_every == 0 or it + 1 == total:
            means = averaged(values, dist)
            bar.set_postfix(**{k: f"{v:.3f}" for k, v in means.items()})
            log(it + 1, {**means, **{k: float(v) for k, v in criterion.diagnostics.items()}, "lr": lr})
        if opts.checkpoint_every and (it + 1) % opts.checkpoint_every == 0 and it + 1 < total:
            checkpoint(it + 1)
    bar.close()


def run_plan(plan, dist: Dist, log: Callable[[int, dict], None], checkpoint: Callable[[int], None],
             progress: bool = True, overall=None) -> float:
    """Train a :class:`~.build.StepPlan` (iterations ``plan.start .. plan.total-1``); returns the
    seconds it took."""
    t0 = time.perf_counter()
    train_iterations(plan.trainee, plan.criterion, plan.loader, plan.opts, dist, plan.step, plan.start, plan.total,
                     log, checkpoint, progress, overall)
    return time.perf_counter() - t0
