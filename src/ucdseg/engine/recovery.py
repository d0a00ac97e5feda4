"""What of a damaged or interrupted run folder can be kept, and what must be trained again.

Each step starts from the one before, so a step is kept only with its whole past:

* a finished step's record in ``results.json`` is kept when its checkpoint is intact (its
  checksum matches the record) and every step before it is kept;
* a checkpoint without a record (``results.json`` lost or damaged, or a kill between the two
  writes) is *recovered* (evaluated again, ``recovered: true``) when this run's config wrote it
  and it was trained from the checkpoint of the step before as it is now (``parent_sha256``);
* once a step is trained again, every later step is too: their checkpoints, mid-step checkpoints
  and exemplar memories, made from the replaced step, are removed (a warning names them).
"""

from __future__ import annotations

import sys

from .. import io
from ..config import to_dict
from ..stats import average_over_steps
from . import build
from .build import RunContext, data_record, planned_iterations, step_memory
from .evaluation import evaluate_step
from .memory import memory_path
from .process_group import barrier
from .run_folder import RunFolder, config_differences


def _warn(message: str) -> None:
    print(f"ucdseg: warning: {message}", file=sys.stderr, flush=True)


def checkpoint_problem(folder: RunFolder, record: dict) -> str | None:
    """Why the checkpoint of a finished step cannot be trusted, or None."""
    path = folder.final(record["step"])
    if not path.is_file():
        return "is missing"
    expected = record.get("checkpoint_sha256")
    if expected is not None and io.sha256(path) != expected:
        return "does not match the checksum recorded in results.json (truncated or replaced)"
    return None


class Recovery:
    """The kept results of a run folder, and which of its checkpoints may still be used."""

    def __init__(self, folder: RunFolder, warn: bool = True):
        self.folder, self.warn = folder, warn
        self.untrusted_from: int | None = None  # the first step whose record was dropped: it and later are trained
        self.trained_anew = False  # a step was trained (not kept or recovered) by this command
        self.results = self._load()

    def _load(self) -> dict | None:
        """The saved results, keeping the steps whose checkpoint is intact and, since each step
        starts from the one before, none after a missing or damaged one."""
        path = self.folder.results
        if not path.exists():
            return None
        try:
            results = io.read_json(path, "results file")
            if not isinstance(results, dict) or not isinstance(results.get("steps"), list):
                raise io.FileError(f"results file {path} is corrupt (no list of steps)")
        except io.FileError as exc:
            if self.warn:
                _warn(f"{exc}; it is rebuilt from the checkpoints that are intact")
            return None
        kept = []
        for record in sorted(results["steps"], key=lambda r: r["step"]):
            problem = checkpoint_problem(self.folder, record)
            if problem:
                self.untrusted_from = record["step"]
                if self.warn:
                    _warn(f"{self.folder.final(record['step'])} {problem}; step {record['step']} and every step after "
                          "it are trained again (their checkpoints are replaced)")
                break
            kept.append(record)
        results["steps"] = kept
        return results

    # ------------------------------------------------------------------ a checkpoint without its record
    def recoverable(self, ctx: RunContext, step: int) -> dict | None:
        """The state of step ``step``'s checkpoint when it can be kept without its record (see the
        module's docstring), else None (with a warning when it exists but cannot be kept)."""
        path = self.folder.final(step)
        if not path.is_file() or self.folder.partial(step).exists():
            return None
        if self.trained_anew or (self.untrusted_from is not None and step >= self.untrusted_from):
            return None  # made from a step that is trained again: removed by :meth:`retrain`
        try:
            state = io.load_checkpoint(path, map_location=ctx.device)
        except io.FileError as exc:
            problem = f"{exc}; step {step} and every step after it are trained again"
        else:
            parent = state.get("parent_sha256")
            if state.get("step") != step or config_differences(state.get("config", {}), to_dict(ctx.cfg)):
                problem = f"{path} was not written by this run's config; step {step} and every step after it are trained again"
            elif step > 0 and parent is not None and parent != io.sha256(self.folder.final(step - 1)):
                problem = (f"{path} was trained from another {self.folder.final(step - 1)} than the one there now; "
                           f"step {step} and every step after it are trained again")
            else:
                return state
        if ctx.dist.is_main and self.warn:
            _warn(problem)
        return None

    def recover(self, ctx: RunContext, step: int, state: dict) -> dict:
        """The record of a finished step rebuilt from its checkpoint's ``state`` (evaluated again;
        the training time is unknown: ``train_seconds`` is null and ``recovered`` true)."""
        cfg, dist = ctx.cfg, ctx.dist
        model = build.step_model(cfg, ctx.train_task.classes_per_step[: step + 1], ctx.device)
        model.load_state_dict(state["model"])
        memory = step_memory(ctx, step, None, choose=False)
        index = build.train_index(cfg, ctx.train_task, ctx.train_set, step, ctx.progress)
        record = evaluate_step(model, cfg, ctx.train_task, ctx.num_base, ctx.val_set, step, dist, ctx.progress)
        record.update(data_record(index, memory))
        record.update(iterations=planned_iterations(ctx, step, index, memory), train_seconds=None,
                      world_size=dist.world_size, batch_per_process=cfg.train.batch_size // dist.world_size,
                      accumulate=cfg.train.accumulate, recovered=True)
        if dist.is_main:
            print(f"ucdseg: note: step {step} recovered from {self.folder.final(step)} (results.json had no record "
                  "of it)", file=sys.stderr, flush=True)
            record["checkpoint_sha256"] = io.sha256(self.folder.final(step))
        return record

    # ------------------------------------------------------------------ a step trained again
    def retrain(self, ctx: RunContext, step: int, results: dict) -> None:
        """Step ``step`` is trained (again) now: remove what later steps made from the step it
        replaces (checkpoints, mid-step checkpoints, exemplar memories) and their records."""
        self.trained_anew = True
        if ctx.dist.is_main:
            later = range(step + 1, ctx.train_task.num_steps)
            stale = [p for s in later for p in (self.folder.final(s), self.folder.partial(s),
                                                memory_path(self.folder.path, s)) if p.exists()]
            if stale:
                if self.warn:
                    _warn(f"step {step} is trained again: {', '.join(str(p) for p in stale)}, made from the step "
                          "it replaces, are removed; those steps are trained again")
                for path in stale:
                    path.unlink()
            dropped = [r for r in results["steps"] if r["step"] > step]
            if dropped:
                results["steps"] = [r for r in results["steps"] if r["step"] <= step]
                results["avg"] = average_over_steps(results["steps"])
                io.write_json(self.folder.results, results)
        barrier()
