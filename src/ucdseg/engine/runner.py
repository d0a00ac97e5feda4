"""A run: every step of a task, in a run folder that makes it resumable.

:class:`Run` orchestrates. For each step it keeps a finished step, recovers one whose record was
lost (:mod:`.recovery`), takes step 0 from another run (:mod:`.step0`) or trains it: the step's
plan (:func:`.build.plan_step`: models, memory, data, criterion, optimiser), its iterations
(:func:`.loop.run_plan`), its evaluation (:mod:`.evaluation`) and its checkpoint
(:func:`.build.save_step`). The run folder (:mod:`.run_folder`, ``output_dir/name``) holds
``config.yaml``, ``results.json``, ``checkpoints/stepN.pt`` (and ``stepN-last.pt`` mid-step),
``tensorboard/`` and the reports; running the same command again continues from the last
checkpoint.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import io, threads
from ..code_version import __version__, code_version
from ..config import RunConfig, to_dict
from ..data.identity import identity_difference
from ..methods import RunShape
from ..stats import average_over_steps
from ..step_range import parse_steps
from . import build, runlog, step0, tensorboard_log
from .build import RunContext, StepPlan, checkpoint_state, plan_step, save_step
from .evaluation import evaluate_step
from .loop import NonFiniteLossError, run_plan
from .plan import OverallBar, step_plan
from .process_group import Dist, barrier, setup
from .recovery import Recovery
from .run_folder import RESUMABLE_KEYS, RunFolder, config_differences  # noqa: F401  (re-exported)


def versions() -> dict:
    """Versions, platform and torch's intra-op thread count: on CPU a seed fixes a run for a given
    thread count (reductions split across threads add in another order)."""
    import torchvision

    return {"ucdseg": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def distributed_notes(cfg: RunConfig, weights: dict, dist: Dist) -> list[str]:
    """Warning lines for a run of several processes or micro-batches (printed by rank 0 only): the
    method's own (UCD's, :meth:`Method.notes`) and BatchNorm's."""
    if not dist.is_main:
        return []
    micro = cfg.train.batch_size // dist.world_size // cfg.train.accumulate
    shape = RunShape(world_size=dist.world_size, accumulate=cfg.train.accumulate, micro_batch=micro,
                     device=dist.device.type)
    notes = build.build_method(cfg).notes(shape, build.method_options(cfg), weights)
    if dist.enabled and cfg.train.bn == "sync" and dist.device.type != "cuda":
        notes.append(f"ucdseg: warning: train.bn=sync: SyncBatchNorm needs CUDA; on {dist.device.type} each of the "
                     f"{dist.world_size} processes normalises with its own batch statistics (as train.bn=local)")
    return notes


def new_results(ctx: RunContext) -> dict:
    """The ``results.json`` of a run that starts: what it is (seed, config, versions, code, method,
    task, class names) and no step yet."""
    cfg, task = ctx.cfg, ctx.task
    return {
        "format": 1,
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "versions": versions(),
        "code": code_version(),  # git commit and dirty flag from a checkout, the package version always
        "method": ctx.method.name,
        "weights": ctx.weights,
        "task": {"dataset": task.dataset, "name": task.name, "steps": task.steps,
                 "order": list(task.order), "setting": cfg.data.setting},
        "class_names": list(ctx.train_set.meta.class_names),
        "steps": [],
    }


def last_step(cfg: RunConfig, folder: RunFolder, num_steps: int, done: set[int]) -> int:
    """The last step this command trains (``train.steps``); the steps before the range must be
    finished (or be taken from a checkpoint or another run)."""
    first, last = parse_steps(cfg.train.steps, num_steps)
    missing = [s for s in range(first) if s not in done and not (s == 0 and cfg.train.step0_from)
               and not folder.final(s).is_file()]
    if missing:
        raise ValueError(f"train.steps={cfg.train.steps}: step {missing[0]} is not finished in {folder.path}; "
                         f"train it first (train.steps={missing[0]}-{last}, or no train.steps)")
    return last


class Run:
    """Runs every step of ``cfg``'s task and writes the run folder. ``reports``: called on rank 0
    with the results and the run folder when the steps are done, before the summary
    (``ucdseg.reporting.write_run_reports`` from ``ucdseg run`` and ``ucdseg.run``)."""

    def __init__(self, cfg: RunConfig, progress: bool = True, reports: Callable[[dict, Path], None] | None = None):
        self.cfg = cfg
        self.progress = progress
        self.reports = reports
        self.dist: Dist = setup(cfg.device)
        self.device = self.dist.device
        per_process, accumulate = cfg.train.batch_size // self.dist.world_size, cfg.train.accumulate
        if cfg.train.batch_size % self.dist.world_size or per_process % accumulate:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} does not split into {self.dist.world_size} "
                             f"process(es) x train.accumulate={accumulate} equal micro-batches")
        self.method = build.build_method(cfg)
        self.weights = build.method_weights(cfg)
        self.options = build.method_options(cfg)
        self.task = build.build_task(cfg)  # the benchmark's task; old/new are reported against its step 0
        self.train_task = build.training_task(cfg, self.task)
        parse_steps(cfg.train.steps, self.train_task.num_steps)  # a bad train.steps fails before the folder is touched
        threads.env_threads()  # and so does a bad UCDSEG_THREADS
        self.folder = RunFolder(cfg.run_dir)
        self.log = runlog.RunLog(echo=progress, enabled=self.dist.is_main)  # banner, step lines, log.txt
        self.log.start_capture()
        try:
            self._open(cfg, progress)
        except BaseException as exc:
            self.log.failed(exc)
            self.log.close()
            self.folder.release()
            raise
        finally:
            self.log.stop_capture()

    def _open(self, cfg: RunConfig, progress: bool) -> None:
        """Everything a run needs, checked before any step trains: the folder (locked, writable),
        the config against the folder's, the data (first and last files of each split readable,
        the same data as the steps already trained, a memory that fits), the results so far."""
        if self.dist.is_main:
            self.folder.acquire()
            self.log.attach(self.folder.path)
            self.folder.check_config(cfg)
            train_set = build.open_dataset(cfg, "train", progress=progress)
        barrier()
        if not self.dist.is_main:
            train_set = build.open_dataset(cfg, "train", prepare=False)
        val_set = build.open_dataset(cfg, "val", prepare=False)
        build.check_readable(train_set, self.method.inputs(self.options))  # saliency: training images only
        build.check_readable(val_set)
        build.scan_datasets(cfg, train_set, val_set, self.dist, progress)
        build.check_memory_size(cfg, self.train_task, train_set)
        identity = build.data_identity(cfg, train_set, val_set)
        self.ctx = RunContext(cfg, self.dist, self.method, self.weights, self.options, self.task, self.train_task,
                              train_set, val_set, self.folder, identity, progress)
        self.train_set, self.val_set, self.meta = train_set, val_set, train_set.meta
        self.recovery = Recovery(self.folder, warn=self.dist.is_main)
        saved = self.recovery.results
        difference = None if saved is None else identity_difference(saved.get("data", identity), identity)
        if difference:
            raise ValueError(f"run directory {self.folder.path} was trained on other data: {difference}; point "
                             "data.root at the same dataset, or use another name=")
        self.results = saved or new_results(self.ctx)
        self.results["data"] = identity
        if self.dist.is_main:
            self.folder.write_config(cfg)
        self.writer = tensorboard_log.open_writer(self.folder.path, cfg) if self.dist.is_main else None
        for note in distributed_notes(cfg, self.weights, self.dist):
            print(note, file=sys.stderr, flush=True)

    def _add_step(self, record: dict) -> None:
        """Append a finished step to ``results.json``, with the average over the steps so far."""
        if self.dist.is_main:
            record.setdefault("code", code_version())  # the code that made this step (a resumed run may change it)
            self.results["steps"].append(record)
            self.results["avg"] = average_over_steps(self.results["steps"])
            io.write_json(self.folder.results, self.results)
            if self.writer is not None:
                for conv, groups in record["miou"].items():
                    for group, value in groups.items():
                        if value is not None:
                            self.writer.add_scalar(f"miou_{conv}/{group}", value, record["step"])

    # ----------------------------------------------------------------- the steps
    def run(self) -> dict:
        self._overall = self.threads = None
        try:
            self.log.start_capture()
            self.threads = threads.start(self.cfg, self.results)  # torch's threads for this segment
            done = {s["step"] for s in self.results["steps"]}
            last = last_step(self.cfg, self.folder, self.train_task.num_steps, done)
            self._announce(done, last)
            for step in range(self.train_task.num_steps):
                if step in done:
                    continue
                if step > last:  # train.steps: stop here, the next command continues
                    break
                self._add_step(self._step_record(step))
                barrier()
                self._step_finished(step)
            if self.dist.is_main:
                if self.reports is not None:
                    self.reports(self.results, self.folder.path)
                if self._overall is not None:  # the summary below the finished bar
                    self._overall.close()
                self.log.summary(self.results, self.train_task.num_steps, last)
            return self.results
        except BaseException as exc:
            self.log.failed(exc)
            raise
        finally:
            if self.threads is not None:
                self.threads.restore_previous()
            if self._overall is not None:
                self._overall.close()
            if self.writer is not None:
                self.writer.close()
            self.folder.release()
            self.log.close()

    def _step_record(self, step: int) -> dict:
        """Step ``step``'s record: taken from another run (step 0), recovered from its checkpoint,
        or trained (and every later step with it)."""
        if step == 0 and self.cfg.train.step0_from:
            self.recovery.retrain(self.ctx, 0, self.results)
            return step0.reuse_step0(self.ctx, Path(self.cfg.train.step0_from))
        if (state := self.recovery.recoverable(self.ctx, step)) is not None:
            return self.recovery.recover(self.ctx, step, state)
        self.recovery.retrain(self.ctx, step, self.results)
        return self.train_step(step)

    def _announce(self, done: set[int], last: int) -> None:
        """The banner with each step's images and iterations, and the overall bar (rank 0)."""
        if not self.dist.is_main:
            return
        plan = step_plan(self.cfg, self.train_task, self.train_set)
        self.log.banner(self.cfg, self.train_task, self.results, self.options, self.train_set, self.val_set,
                        self.dist, plan, threads=self.threads)
        if self.progress and any(s not in done for s in range(last + 1)):
            self._overall = OverallBar(plan, done, last, label=self.cfg.name)

    def _step_finished(self, step: int) -> None:
        """A step's line in the log, its per-class IoU and prediction figure in TensorBoard."""
        record = next((r for r in self.results["steps"] if r["step"] == step), None)
        tensorboard_log.log_step(self.writer, record, self.folder.path / "predictions" / f"step{step}.png")
        self.log.step_done(self.results, step, self.train_task.num_steps)
        if self._overall is not None:
            self._overall.step_done(step)

    def train_step(self, step: int) -> dict:
        """Train step ``step`` (continuing a mid-step checkpoint), evaluate it and save it; returns
        its record."""
        cfg, dist = self.cfg, self.dist
        plan = plan_step(self.ctx, step)
        if threads.begin_segment(self.threads, self.results, step, plan.start, dist):  # rank 0, once per process
            io.write_json(self.folder.results, self.results)  # a segment killed before its first step is on record
        train_seconds = self._train(plan)
        model = plan.trainee.model
        if plan.opts.channels_last:  # evaluate and save in the default layout, as without the option
            model.to(memory_format=torch.contiguous_format)
        record = evaluate_step(model, cfg, self.train_task, len(self.task.steps[0]), self.val_set, step, dist,
                               self.progress, predictions=self.folder.path / "predictions" / f"step{step}.png")
        record.update(plan.data)
        record.update(iterations=plan.total, train_seconds=round(train_seconds, 2), world_size=dist.world_size,
                      batch_per_process=cfg.train.batch_size // dist.world_size, accumulate=cfg.train.accumulate)
        digest = save_step(self.ctx, step, model, plan.trainee.step_state, plan.parent_sha256)
        if digest is not None:
            record["checkpoint_sha256"] = digest
        return record

    def _train(self, plan: StepPlan) -> float:
        """The step's iterations, logging to TensorBoard and checkpointing mid-step; their seconds."""
        step = plan.step

        def log(iteration: int, values: dict) -> None:
            if self.writer is not None:
                for k, v in values.items():
                    self.writer.add_scalar(f"step{step}/{k}", v, iteration)

        def checkpoint(iteration: int) -> None:
            if self.dist.is_main:
                io.save_checkpoint(self.folder.partial(step), checkpoint_state(plan, iteration))
            barrier()

        try:
            return run_plan(plan, self.dist, log, checkpoint, self.progress, overall=getattr(self, "_overall", None))
        except NonFiniteLossError as exc:
            kept = next((p for p in (self.folder.partial(step), self.folder.final(step - 1)) if p.exists()), None)
            raise NonFiniteLossError(f"{exc}; " + (f"the last good checkpoint is {kept}" if kept else
                                                   "no checkpoint of this run was written yet")) from None


def run(cfg: RunConfig, progress: bool = True, reports: Callable[[dict, Path], None] | None = None) -> dict:
    """Run (or continue) every step of ``cfg``'s task; returns the results dictionary. ``reports``
    writes the run's reports from its results and folder (:class:`Run`)."""
    return Run(cfg, progress=progress, reports=reports).run()
