"""A run: every step of a task, in a run folder that makes it resumable.

For step ``t`` the run builds the model for the classes seen so far, loads step ``t-1`` into it
and into a frozen copy (the old model), initialises the new classifier as the method says,
selects and maps the step's images, trains (:mod:`.loop`), evaluates (:mod:`.evaluation`) and
saves. The run folder (``output_dir/name``) holds ``config.yaml``, ``results.json``,
``checkpoints/stepN.pt`` (and ``stepN-last.pt`` mid-step), ``tensorboard/`` and the reports;
running the same command again continues from the last checkpoint.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import ucdseg

from .. import io, threads
from ..code_version import code_version
from ..config import RunConfig, from_dict, migrate, to_dict, to_yaml
from ..methods import RunShape, StepSetup, get_method
from ..models import load_previous_step
from ..step_range import parse_steps
from . import build, runlog, tensorboard_log
from .evaluation import evaluate_step
from .loop import Criterion, NonFiniteLossError, Trainee, shares_trunk, train_iterations
from .memory import choose_memory, load_memory, memory_checksum, memory_path
from .metrics import average_over_steps
from .plan import OverallBar, step_plan
from .process_group import Dist, barrier, setup

# Keys that may change between a run and its resumption without changing its results.
# The paths only locate the run and its inputs (a moved dataset or run directory may resume).
# train.channels_last and train.compile only choose how the same computation is laid out in
# memory and which kernels run it: like ``device`` they can change the last bits of the floats,
# never what is computed, so a run may be resumed with them switched (e.g. on a machine without
# a C++ compiler for torch.compile). train.steps only says where a command stops. train.threads
# may change the last bits too (a resume says so, ucdseg.threads); results.json records each count.
RESUMABLE_KEYS = {"device", "data.workers", "data.cache_dir", "train.log_every", "eval.batch_size",
                  "eval.num_images", "train.checkpoint_every", "name", "output_dir", "data.root",
                  "model.pretrained", "train.channels_last", "train.compile", "train.steps", "train.threads"}

# Settings a reused step 0 must share with this run (the method may differ: step 0 is plain CE).
STEP0_TRAIN_KEYS = {f"train.{k}" for k in ("batch_size", "epochs", "iterations", "lr", "momentum", "nesterov",
                                           "weight_decay", "poly_power", "amp", "bn", "accumulate")}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("weights", "options"):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(a: dict, b: dict, ignore: set[str] = RESUMABLE_KEYS) -> list[str]:
    """Keys whose values differ; a key missing from a config (saved before the key existed) has
    its default value."""
    defaults = _flatten(to_dict(RunConfig()))
    fa, fb = defaults | _flatten(migrate(a)), defaults | _flatten(migrate(b))
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def versions() -> dict:
    """Versions, platform and torch's intra-op thread count: on CPU a seed fixes a run for a given
    thread count (reductions split across threads add in another order)."""
    import torchvision

    return {"ucdseg": ucdseg.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """``train.bn=frozen``: every BatchNorm layer in eval mode, so it normalises with its running
    statistics and never updates them; its affine weight and bias are still trained."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


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


class RunFolder:
    """The files of a run folder: its lock, config, results and checkpoints."""

    LOCK = ".ucdseg.lock"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._lock = None

    def final(self, step: int) -> Path:
        return self.checkpoints / f"step{step}.pt"

    def partial(self, step: int) -> Path:
        return self.checkpoints / f"step{step}-last.pt"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    # ---------------------------------------------------------------- exclusive use
    def acquire(self) -> None:
        """Take the folder's lock (``.ucdseg.lock``, an OS file lock: a killed process releases it,
        so a stale lock is simply taken over); a second process gets one line naming the holder."""
        io.make_dirs(self.path)
        io.make_dirs(self.checkpoints)
        try:
            import fcntl
        except ImportError:  # no POSIX file locks (Windows): the folder is not locked
            return
        path = self.path / self.LOCK
        for _ in range(10):  # the holder removes the file when it finishes: lock the file that is there
            try:
                handle = open(path, "a+", encoding="utf-8")
            except OSError as exc:
                raise io.os_error(path, exc, "open") from None
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RuntimeError(f"run folder {self.path} is in use by {holder}; wait for it to finish, "
                                   "or give this run another name=") from None
            if _same_file(handle, path):
                break
            handle.close()  # locked a file its holder removed meanwhile
        else:
            raise RuntimeError(f"run folder {self.path}: its lock file {path} keeps being replaced; is another "
                               "process starting there?")
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle
        io.remove_orphans(self.path)  # temporary files of a killed writer: ours, as we hold the lock
        io.remove_orphans(self.checkpoints)

    def release(self) -> None:
        """Give the folder up; the lock file goes too (removed while still locked: a process that
        opened it meanwhile sees it replaced, :meth:`acquire`)."""
        if self._lock is not None:
            (self.path / self.LOCK).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    # ---------------------------------------------------------------- config and results
    def has_progress(self) -> bool:
        """Whether anything of a run was trained here (a finished step or a mid-step checkpoint)."""
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("step*.pt"))

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse to continue a run folder started with a different config; write ``config.yaml``.

        A folder where nothing was trained yet (a start that failed) takes the new config."""
        if self.config.exists() and self.has_progress():
            import yaml

            try:
                saved = yaml.safe_load(self.config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise io.FileError(f"{self.config} is corrupt ({first}); it records the config of the run in "
                                   f"{self.path}: restore it, or give this run another name=") from None
            if not isinstance(saved, dict):
                raise io.FileError(f"{self.config} is corrupt (not a mapping of config keys); restore it, or give "
                                   "this run another name=")
            diff = config_differences(saved, to_dict(cfg))
            if diff:
                raise ValueError(f"run directory {self.path} was started with a different config "
                                 f"(differing keys: {', '.join(diff)}); use another name= or the saved config")
        io.write_text(self.config, to_yaml(cfg))

    def load_results(self, warn: bool = True) -> dict | None:
        """The saved results, keeping the steps whose checkpoint is intact (its checksum, recorded in
        the step's record, matches) and, since each step starts from the one before, none after a
        missing or damaged one; a warning line names what will be trained again."""
        if not self.results.exists():
            return None
        try:
            results = io.read_json(self.results, "results file")
            if not isinstance(results, dict) or not isinstance(results.get("steps"), list):
                raise io.FileError(f"results file {self.results} is corrupt (no list of steps)")
        except io.FileError as exc:  # rebuilt from the intact checkpoints (Run.recover_step)
            if warn:
                print(f"ucdseg: warning: {exc}; it is rebuilt from the checkpoints that are intact",
                      file=sys.stderr, flush=True)
            return None
        kept = []
        for record in sorted(results["steps"], key=lambda r: r["step"]):
            problem = self.checkpoint_problem(record)
            if problem:
                if warn:
                    print(f"ucdseg: warning: {self.final(record['step'])} {problem}; step {record['step']} and the "
                          "steps after it are trained again", file=sys.stderr, flush=True)
                break
            kept.append(record)
        results["steps"] = kept
        return results

    def checkpoint_problem(self, record: dict) -> str | None:
        """Why the checkpoint of a finished step cannot be trusted, or None."""
        path = self.final(record["step"])
        if not path.is_file():
            return "is missing"
        expected = record.get("checkpoint_sha256")
        if expected is not None and io.sha256(path) != expected:
            return "does not match the checksum recorded in results.json (truncated or replaced)"
        return None


class Run:
    """Runs every step of ``cfg``'s task and writes the run folder."""

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
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
            self.train_set = build.open_dataset(cfg, "train", progress=progress)
        barrier()
        if not self.dist.is_main:
            self.train_set = build.open_dataset(cfg, "train", prepare=False)
        self.val_set = build.open_dataset(cfg, "val", prepare=False)
        build.check_readable(self.train_set, self.method.inputs(self.options))  # saliency: training images only
        build.check_readable(self.val_set)
        build.scan_datasets(cfg, self.train_set, self.val_set, self.dist, progress)
        build.check_memory_size(cfg, self.train_task, self.train_set)
        self.meta = self.train_set.meta
        self.data_identity = build.data_identity(cfg, self.train_set, self.val_set)
        saved = self.folder.load_results(warn=self.dist.is_main)
        if saved is not None and saved.get("data", self.data_identity) != self.data_identity:
            theirs = saved["data"]
            raise ValueError(f"run directory {self.folder.path} was trained on other data ({theirs['dataset']} with "
                             f"train/val lists {theirs['train_files'][:12]}/{theirs['val_files'][:12]}; data.root now "
                             f"gives {self.data_identity['train_files'][:12]}/{self.data_identity['val_files'][:12]}); "
                             "point data.root at the same dataset, or use another name=")
        self.results = saved or self._new_results()
        self.results["data"] = self.data_identity
        self.writer = self._tensorboard()
        for note in distributed_notes(cfg, self.weights, self.dist):
            print(note, file=sys.stderr, flush=True)

    def _new_results(self) -> dict:
        return {
            "format": 1,
            "seed": self.cfg.seed,
            "config": to_dict(self.cfg),
            "versions": versions(),
            "code": code_version(),  # git commit and dirty flag from a checkout, the package version always
            "method": self.method.name,
            "weights": self.weights,
            "task": {"dataset": self.task.dataset, "name": self.task.name, "steps": self.task.steps,
                     "order": list(self.task.order), "setting": self.cfg.data.setting},
            "class_names": list(self.meta.class_names),
            "steps": [],
        }

    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # a dependency since issue 14: only a broken install lacks it
            print(f"ucdseg: warning: TensorBoard logging is off ({exc}); install it with "
                  f"`pip install tensorboard` to log to {self.folder.path / 'tensorboard'}", file=sys.stderr)
            return None
        writer = SummaryWriter(str(self.folder.path / "tensorboard"))
        tensorboard_log.log_config(writer, self.cfg)
        return writer

    def _add_step(self, record: dict) -> None:
        """Append a finished step to ``results.json``, with the average over the steps so far."""
        record.setdefault("code", code_version())  # the code that made this step (a resumed run may change it)
        self.results["steps"].append(record)
        self.results["avg"] = average_over_steps(self.results["steps"])
        io.write_json(self.folder.results, self.results)

    # ----------------------------------------------------------------- the steps
    def run(self) -> dict:
        self._overall = self.threads = None
        try:
            self.log.start_capture()
            self.threads = threads.start(self.cfg, self.results)  # torch's threads for this segment
            done = {s["step"] for s in self.results["steps"]}
            last = self._last_step(done)
            self._announce(done, last)
            for step in range(self.train_task.num_steps):
                if step in done:
                    continue
                if step > last:  # train.steps: stop here, the next command continues
                    break
                if step == 0 and self.cfg.train.step0_from:
                    self.reuse_step0(Path(self.cfg.train.step0_from))
                elif (state := self._recoverable(step)) is not None:
                    self.recover_step(step, state)
                else:
                    self.train_step(step)
                self._step_finished(step)
            if self.dist.is_main:
                from .. import reporting

                reporting.write_run_reports(self.results, self.folder.path)
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

    def _last_step(self, done: set[int]) -> int:
        """The last step this command trains (``train.steps``); the steps before the range must be
        finished (or be taken from a checkpoint or another run)."""
        first, last = parse_steps(self.cfg.train.steps, self.train_task.num_steps)
        missing = [s for s in range(first) if s not in done and not (s == 0 and self.cfg.train.step0_from)
                   and not self.folder.final(s).is_file()]
        if missing:
            raise ValueError(f"train.steps={self.cfg.train.steps}: step {missing[0]} is not finished in "
                             f"{self.folder.path}; train it first (train.steps={missing[0]}-{last}, or no "
                             "train.steps)")
        return last

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

    def _recoverable(self, step: int) -> dict | None:
        """A finished step's checkpoint without its record (``results.json`` deleted or damaged):
        its state when it was written by this run's config (kept, not trained again), else None."""
        path = self.folder.final(step)
        if not path.is_file() or self.folder.partial(step).exists():
            return None
        try:
            state = io.load_checkpoint(path, map_location=self.device)
        except io.FileError as exc:
            problem = f"{exc}; step {step} is trained again"
        else:
            if state.get("step") == step and not config_differences(state.get("config", {}), to_dict(self.cfg)):
                return state
            problem = f"{path} was not written by this run's config; step {step} is trained again"
        if self.dist.is_main:
            print(f"ucdseg: warning: {problem}", file=sys.stderr, flush=True)
        return None

    def recover_step(self, step: int, state: dict) -> dict:
        """The record of a finished step rebuilt from its checkpoint's ``state`` (evaluated again;
        the training time is unknown: ``train_seconds`` is null and ``recovered`` true)."""
        cfg, dist = self.cfg, self.dist
        model = build.step_model(cfg, self.train_task.classes_per_step[: step + 1], self.device)
        model.load_state_dict(state["model"])
        memory = self._memory(step, None, choose=False)
        train_data, index = build.train_data(cfg, self.train_task, self.train_set, step, self.progress, memory)
        record = evaluate_step(model, cfg, self.train_task, len(self.task.steps[0]), self.val_set, step, dist,
                               self.progress)
        record.update(self._data_record(index, memory))
        record.update(iterations=self._iterations(step, index, memory), train_seconds=None,
                      world_size=dist.world_size, batch_per_process=cfg.train.batch_size // dist.world_size,
                      accumulate=cfg.train.accumulate, recovered=True)
        if dist.is_main:
            print(f"ucdseg: note: step {step} recovered from {self.folder.final(step)} (results.json had no record "
                  "of it)", file=sys.stderr, flush=True)
            record["checkpoint_sha256"] = io.sha256(self.folder.final(step))
            self._add_step(record)
        barrier()
        return record

    def _models(self, step: int) -> tuple[torch.nn.Module, torch.nn.Module | None, dict | None]:
        """Step ``step``'s model (step ``t-1``'s weights, new classifier initialised), the frozen
        old model (None at step 0) and the method state step ``t-1`` carried (None without one)."""
        classes = self.train_task.classes_per_step
        pretrained = build.pretrained_weights(self.cfg, self.dist, self.progress) if step == 0 else None
        model = build.step_model(self.cfg, classes[: step + 1], self.device, pretrained)
        if step == 0:
            return model, None, None
        checkpoint = io.load_checkpoint(self.folder.final(step - 1), map_location=self.device)
        previous = checkpoint["model"]
        old_model = build.step_model(self.cfg, classes[:step], self.device)
        old_model.load_state_dict(previous)
        old_model.eval().requires_grad_(False)
        load_previous_step(model, previous)
        model.init_new_classifier(self.method.classifier_init)
        return model, old_model, checkpoint.get("method_state")

    def train_step(self, step: int) -> dict:
        """Train step ``step`` (continuing a mid-step checkpoint), evaluate it and save it."""
        cfg, dist, opts = self.cfg, self.dist, build.loop_options(self.cfg, step)
        torch.manual_seed(cfg.seed * 1000 + step)
        model, old_model, carried = self._step_models(step, opts)
        memory = self._memory(step, old_model)
        train_data, index = build.train_data(cfg, self.train_task, self.train_set, step, self.progress, memory)
        total = self._iterations(step, index, memory)
        criterion = self._criterion(step, model, old_model, len(index.indices), train_data, carried)
        trainee, start = self._trainee(step, model, old_model, opts, total, criterion.step_state)
        if threads.begin_segment(self.threads, self.results, step, start, dist):  # rank 0, once per process
            io.write_json(self.folder.results, self.results)  # a segment killed before its first step is on record
        sampler = build.batch_sampler(cfg, step, len(index.indices), total, dist, start, memory=len(memory or []))
        loader = build.train_loader(cfg, train_data, sampler, self.device)

        t0 = time.perf_counter()
        self._train(step, trainee, criterion, loader, opts, start, total)
        train_seconds = time.perf_counter() - t0

        model = trainee.model
        if opts.channels_last:  # evaluate and save in the default layout, as without the option
            model.to(memory_format=torch.contiguous_format)
        record = evaluate_step(model, cfg, self.train_task, len(self.task.steps[0]), self.val_set, step, dist,
                               self.progress, predictions=self.folder.path / "predictions" / f"step{step}.png")
        record.update(self._data_record(index, memory))
        record.update(iterations=total, train_seconds=round(train_seconds, 2), world_size=dist.world_size,
                      batch_per_process=cfg.train.batch_size // dist.world_size, accumulate=cfg.train.accumulate)
        self._save_step(step, model, record, criterion.step_state)
        return record

    def _iterations(self, step: int, index, memory: list[dict] | None) -> int:
        """The step's iterations: over its images, and its memory when the memory joins them (concat)."""
        joined = len(memory or []) if self.method.memory.mixing == "concat" else 0
        return build.step_iterations(self.cfg, step, len(index.indices) + joined)

    @staticmethod
    def _data_record(index, memory: list[dict] | None) -> dict:
        """What a step was trained on: its images (count, checksum) and its memory's."""
        record = {"num_train_images": len(index.indices), "index_checksum": index.checksum}
        if memory:
            record.update(num_memory_images=len(memory), memory_checksum=memory_checksum(memory))
        return record

    def _memory(self, step: int, old_model, choose: bool = True) -> list[dict] | None:
        """The exemplars of ``step`` (``data.memory.size``): read from ``memory/stepT.json`` when this
        run chose them already, else chosen by rank 0 (:mod:`.memory`) and written there."""
        size = build.memory_size(self.cfg, step)
        if not size:
            return None
        path = memory_path(self.folder.path, step)
        if self.dist.is_main and not path.is_file() and choose:
            previous = None
            if step > 1:
                previous = load_memory(memory_path(self.folder.path, step - 1), self.data_identity, self.train_set)
            entries = choose_memory(self.method, self.train_task, self.train_set, step, size,
                                    seed=self.cfg.seed * 1000 + step,
                                    setting_index=build.train_index(self.cfg, self.train_task, self.train_set,
                                                                    step - 1, progress=False),
                                    previous=previous, old_model=old_model, device=self.device,
                                    crop_size=self.cfg.data.crop_size, cache_dir=self.cfg.data.cache_dir,
                                    batch_size=self.cfg.eval.batch_size)
            io.write_json(path, {"step": step, "size": size, "data": self.data_identity, "entries": entries})
        barrier()
        return load_memory(path, self.data_identity, self.train_set)

    def _step_models(self, step: int, opts) -> tuple[torch.nn.Module, torch.nn.Module | None, dict | None]:
        """:meth:`_models`, with SyncBatchNorm under CUDA DDP and the memory layout applied."""
        model, old_model, carried = self._models(step)
        if opts.bn == "sync" and self.dist.enabled and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if opts.channels_last:  # parameters keep their identity: the optimizer sees them
            for m in (model, old_model):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        return model, old_model, carried

    def _trainee(self, step: int, model, old_model, opts, total: int, step_state=None) -> tuple[Trainee, int]:
        """SGD and the schedule around the step's models (and the method's step state), continued
        from a mid-step checkpoint if a killed run left one; and the iteration to start at."""
        optimizer, scheduler = build.optimizer_and_schedule(self.cfg, model, step, total)
        scaler = torch.amp.GradScaler(self.device.type, enabled=opts.amp_dtype == torch.float16)
        trainee = Trainee(model, model, old_model, optimizer, scheduler, scaler, step_state=step_state)
        partial = self.folder.partial(step)
        start = trainee.load_state_dict(io.load_checkpoint(partial, self.device)) if partial.exists() else 0
        trainee.forward = DistributedDataParallel(model) if self.dist.enabled else model
        if opts.compile:  # the training forward only; ``model`` stays plain for state dicts and evaluation
            import torch._dynamo as dynamo

            dynamo.reset()  # the previous step's graphs are of no use; keep clear of the recompile limit
            trainee.forward = torch.compile(trainee.forward)
        return trainee, start

    def _criterion(self, step: int, model, old_model, num_images: int, train_data, carried: dict | None) -> Criterion:
        """The method's loss for the step, with its state: the state it carries across steps
        (``step_state``, from ``carried``) or its ``before_step`` pass over the step's ``num_images``
        images (PLOP's thresholds)."""
        num_old, num_new = sum(self.train_task.classes_per_step[:step]), self.train_task.classes_per_step[step]

        def one_pass():
            sampler = build.one_epoch_sampler(self.cfg, step, num_images, self.dist)
            return build.train_loader(self.cfg, train_data, sampler, self.device)

        setup = StepSetup(step=step, model=model, old_model=old_model, num_old=num_old, num_new=num_new,
                          options=self.options, previous=carried, device=self.device, loader=one_pass,
                          progress=self.progress and self.dist.is_main,
                          source=str(self.folder.final(step - 1)) if step else "", setting=self.cfg.data.setting)
        state = None
        if self.method.step_state is not None:
            state = self.method.step_state(setup)
        elif old_model is not None and self.method.before_step is not None:
            state = self.method.before_step(setup)
        return Criterion(self.method, self.weights, self.options, step, num_old, num_new, state)

    def _train(self, step: int, trainee: Trainee, criterion: Criterion, loader, opts, start: int, total: int) -> None:
        """The step's iterations, logging to TensorBoard and checkpointing mid-step."""
        partial = self.folder.partial(step)

        def log(iteration: int, values: dict) -> None:
            if self.writer is not None:
                for k, v in values.items():
                    self.writer.add_scalar(f"step{step}/{k}", v, iteration)

        def checkpoint(iteration: int) -> None:
            if self.dist.is_main:
                io.save_checkpoint(partial, trainee.state_dict(iteration, step))
            barrier()

        getattr(trainee.forward, "_orig_mod", trainee.forward).train()  # the DDP wrapper (or the model)
        if opts.bn == "frozen":
            freeze_batchnorm(trainee.model)
        if step > 0 and self.method.train_mode is not None:  # the method's frozen layers (SSUL, DKD)
            self.method.train_mode(trainee.model, step)
        trainee.shared_trunk = shares_trunk(trainee.model, trainee.old_model)
        try:
            train_iterations(trainee, criterion, loader, opts, self.dist, step, start, total, log, checkpoint,
                             self.progress, overall=getattr(self, "_overall", None))
        except NonFiniteLossError as exc:
            kept = next((p for p in (partial, self.folder.final(step - 1)) if p.exists()), None)
            raise NonFiniteLossError(f"{exc}; " + (f"the last good checkpoint is {kept}" if kept else
                                                   "no checkpoint of this run was written yet")) from None

    def _save_step(self, step: int, model: torch.nn.Module, record: dict, step_state=None) -> None:
        """``checkpoints/stepN.pt`` (with the method state it carries to the next step), then the
        step's record (with the checkpoint's checksum) in ``results.json``; the mid-step checkpoint
        is no longer needed."""
        if self.dist.is_main:
            state = {
                "model": model.state_dict(), "step": step, "config": to_dict(self.cfg),
                "classes_per_step": self.train_task.classes_per_step[: step + 1],
                # dataset space (index = class id), so ``ucdseg predict`` needs nothing else
                "class_names": list(self.meta.class_names), "palette": [list(c) for c in self.meta.palette]}
            if step_state is not None:
                state["method_state"] = step_state.carry()
            io.save_checkpoint(self.folder.final(step), state)
            record["checkpoint_sha256"] = io.sha256(self.folder.final(step))
            self._add_step(record)
            self.folder.partial(step).unlink(missing_ok=True)
            if self.writer is not None:
                for conv, groups in record["miou"].items():
                    for group, value in groups.items():
                        if value is not None:
                            self.writer.add_scalar(f"miou_{conv}/{group}", value, step)
        barrier()

    # ----------------------------------------------------------------- a shared step 0
    def reuse_step0(self, source: Path) -> None:
        """Take step 0 from another run with the same data, task and model (as papers share it):
        its run directory (step 0's checkpoint and record are copied) or a step-0 checkpoint file
        (copied, and evaluated here for step 0's record)."""
        if source.is_file():
            state = io.load_checkpoint(source)
            if "config" not in state or state.get("step") != 0 or "classes_per_step" not in state:
                raise ValueError(f"train.step0_from={source}: not a step-0 checkpoint written by ucdseg (it has "
                                 f"{'step ' + str(state['step']) if 'step' in state else 'no step or config'}); "
                                 "give a run directory or its checkpoints/step0.pt")
            self._check_step0_source(source, state["config"], _step0_classes(source, state["config"]), eval_keys=False)
            checkpoint, model = source, self._check_step0_weights(source, state["model"])
            record = evaluate_step(model, self.cfg, self.train_task, len(self.task.steps[0]), self.val_set, 0,
                                   self.dist, self.progress)
            record["step0_from"] = str(source)
        elif (source / "results.json").is_file():
            results = io.read_json(source / "results.json", "results file")
            self._check_step0_source(source, results["config"], results["steps"][0]["classes"], eval_keys=True)
            checkpoint, record = source / "checkpoints" / "step0.pt", results["steps"][0]
            self._check_step0_weights(source, io.load_checkpoint(checkpoint, map_location=self.device)["model"])
        else:
            raise FileNotFoundError(f"train.step0_from={source}: neither a checkpoint file nor a run directory "
                                    "(with results.json)")
        if self.dist.is_main:
            with io.atomic_path(self.folder.final(0)) as tmp:
                shutil.copyfile(checkpoint, tmp)
            record = {**record, "checkpoint_sha256": io.sha256(self.folder.final(0))}
            self._add_step(record)
        barrier()

    def _check_step0_source(self, source: Path, theirs: dict, their_classes: list[int], eval_keys: bool) -> None:
        """Same seed, data, task, model and step-0 training settings (and, when step 0's record is
        copied rather than measured here, the same evaluation conventions); same step-0 classes."""
        keys = STEP0_TRAIN_KEYS | ({"eval.images", "eval.unseen"} if eval_keys else set())
        # exemplar memory starts at step 1: it is no setting of step 0 (ssul-m shares ssul's step 0)
        diff = [k for k in config_differences(theirs, to_dict(self.cfg), RESUMABLE_KEYS | {"data.memory.size"})
                if k == "seed" or k.split(".")[0] in ("data", "task", "model") or k in keys]
        if diff:
            raise ValueError(f"train.step0_from={source}: its step 0 was trained with different settings ({', '.join(diff)})")
        their_method = get_method(theirs.get("method", {}).get("name", "ft"))
        if their_method.first_step != self.method.first_step:
            theirs_, mine_ = their_method.first_step, self.method.first_step
            if "=" in theirs_ or "=" in mine_:  # no readable name: say what differs in words
                raise ValueError(f"train.step0_from={source}: its step 0 was trained by {their_method.name}, whose "
                                 f"step 0 computes other terms or hooks than {self.method.name}'s; it cannot be shared")
            raise ValueError(f"train.step0_from={source}: its step 0 was trained by {their_method.name} with the "
                             f"{theirs_} loss, {self.method.name} trains step 0 with {mine_}; it cannot be shared")
        # the options both methods have may change step 0 (DKD's pos_weight_step0, SSUL's unknown rule)
        mine = self.options
        their_options = their_method.resolve_options(theirs.get("method", {}).get("options") or {})
        differing = sorted(k for k in set(mine) & set(their_options) if mine[k] != their_options[k])
        if differing:
            raise ValueError(f"train.step0_from={source}: its step 0 was trained with other method options "
                             f"({', '.join(f'method.options.{k}={their_options[k]!r}' for k in differing)}); it cannot "
                             "be shared")
        if self.method.joint or their_classes != self.train_task.steps[0]:
            raise ValueError(f"train.step0_from={source}: its step 0 has classes {their_classes}, "
                             f"this run's step 0 needs {self.train_task.steps[0]}; joint runs cannot share step 0")

    def _check_step0_weights(self, source: Path, weights: dict) -> torch.nn.Module:
        """This run's step-0 model holding ``weights`` (all of them, with the same shapes)."""
        model = build.step_model(self.cfg, self.train_task.classes_per_step[:1], self.device)
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
            raise ValueError(f"train.step0_from={source}: its weights do not fit this run's step-0 model "
                             f"({self.cfg.model.backbone}, {self.train_task.classes_per_step[0]} classes): {first}") from None
        return model


def _same_file(handle, path: Path) -> bool:
    """Whether the open file ``handle`` is still the file at ``path`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def _step0_classes(source: Path, config: dict) -> list[int]:
    """The classes (dataset ids, model order) of the step 0 that ``config`` trained."""
    try:
        cfg = from_dict(config)
        return build.training_task(cfg).steps[0]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"train.step0_from={source}: its config cannot be read: {exc}") from None


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Run (or continue) every step of ``cfg``'s task; returns the results dictionary."""
    return Run(cfg, progress=progress).run()
