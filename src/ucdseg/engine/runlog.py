"""What a run says: a banner when it starts, a line per finished step, a final summary, and
``runs/<name>/log.txt`` holding all of it with every warning (as MiB's, PLOP's and mmseg's logs).

:class:`RunLog` is a stdlib :mod:`logging` logger of its own (not propagated to the root logger),
active on rank 0 only:

* the terminal (stderr, through ``tqdm.write`` so that progress bars stay whole) gets the banner,
  the step lines and the summary, unless the run is quiet (``ucdseg --quiet run``,
  ``run(cfg, progress=False)``): quiet silences the terminal, never the file;
* ``log.txt`` is opened in append mode once the run folder is locked (:meth:`RunLog.attach`;
  what was said before is kept in memory until then), so the resumptions of a run add to one
  file, each session starting with a marker line (``==== resumed ...`` or ``==== new run ...``);
* the warning and note lines ucdseg prints on stderr (``ucdseg: warning: ...``) and Python
  warnings are copied into ``log.txt`` while the run is active.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

__all__ = ["RunLog", "LOG_FILE", "format_miou", "format_seconds"]

LOG_FILE = "log.txt"
_FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
_TERMINAL_FORMAT = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")


def format_seconds(seconds: float | None) -> str:
    """``4.2 s``, ``42 s``, ``3 min 05 s``, ``2 h 04 min``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_miou(miou: Mapping[str, Mapping[str, float | None]]) -> str:
    """``old/new/all 45.1/12.3/30.2 (without bg), 50.0/11.1/31.0 (with bg)``."""
    def groups(conv: str) -> str:
        return "/".join(_pct(miou[conv].get(g)) for g in ("old", "new", "all"))

    return (f"mIoU old/new/all {groups('without_background')} (without bg), "
            f"{groups('with_background')} (with bg)")


class _TerminalHandler(logging.Handler):
    """Writes through ``tqdm.write`` to the current ``sys.stderr``, leaving progress bars intact."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(_TERMINAL_FORMAT)
        self.addFilter(lambda record: not getattr(record, "file_only", False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging break a run
            self.handleError(record)


class _StderrCopy:
    """``sys.stderr`` while a run is active: everything goes to the real stream, and each complete
    line that starts with ``ucdseg:`` (the warnings and notes ucdseg prints) is also given to ``sink``."""

    def __init__(self, stream, sink):
        self._stream, self._sink, self._pending = stream, sink, ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                line = line.rsplit("\r", 1)[-1].strip()  # a progress bar's carriage returns
                if line.startswith("ucdseg:"):
                    self._sink(line)
        if len(self._pending) > 8192:  # a bar redrawn with "\r" only: keep the tail
            self._pending = self._pending[-1024:]
        return written

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


class RunLog:
    """The log of one run (see the module docstring); ``enabled=False`` (ranks > 0) does nothing."""

    def __init__(self, echo: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path: Path | None = None
        self.started = time.perf_counter()
        self._last = self.started
        self._cfg = None
        self._capture = None
        if not enabled:
            return
        self.logger = logging.getLogger(f"ucdseg.run.{os.getpid()}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        # what is said before the folder is locked waits here for log.txt
        self._buffer = logging.handlers.MemoryHandler(capacity=10 ** 6, flushLevel=logging.CRITICAL + 1)
        self.logger.addHandler(self._buffer)
        self._file: logging.Handler | None = None
        if echo:
            self.logger.addHandler(_TerminalHandler())

    # ---------------------------------------------------------------------------- plumbing
    def _to_file(self, level: int, message: str) -> None:
        if self.enabled:
            self.logger.log(level, message, extra={"file_only": True})

    def start_capture(self) -> None:
        """From now on the ``ucdseg:`` lines printed on stderr and Python warnings go to the log too
        (until :meth:`stop_capture`)."""
        if not self.enabled or self._capture is not None:
            return
        stream, showwarning = sys.stderr, warnings.showwarning
        copy = _StderrCopy(stream, lambda line: self._to_file(logging.WARNING, line))

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            showwarning(message, category, filename, lineno, file, line)
            self._to_file(logging.WARNING, f"{category.__name__}: {message} ({filename}:{lineno})")

        sys.stderr, warnings.showwarning = copy, show
        self._capture = (stream, showwarning, copy, show)

    def stop_capture(self) -> None:
        """Give stderr and ``warnings.showwarning`` back (unless someone replaced them since)."""
        if self._capture is None:
            return
        stream, showwarning, copy, show = self._capture
        if sys.stderr is copy:
            sys.stderr = stream
        if warnings.showwarning is show:
            warnings.showwarning = showwarning
        self._capture = None

    def info(self, message: str) -> None:
        if self.enabled:
            for line in message.splitlines() or [""]:
                self.logger.info(line)

    def attach(self, folder: Path) -> None:
        """Open ``folder/log.txt`` (appending), mark the session, and write what was said so far."""
        if not self.enabled or self._file is not None:
            return
        self.path = Path(folder) / LOG_FILE
        resumed = self.path.is_file() and self.path.stat().st_size > 0
        handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        handler.setFormatter(_FILE_FORMAT)
        handler.setLevel(logging.INFO)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        handler.stream.write(f"{chr(10) if resumed else ''}==== {'resumed' if resumed else 'new run'} {stamp}, "
                             f"process {os.getpid()} on {socket.gethostname()}, {_command()}\n")
        self._buffer.setTarget(handler)
        self._buffer.flush()
        self.logger.removeHandler(self._buffer)
        self._buffer.close()
        self.logger.addHandler(handler)
        self._file = handler

    def close(self) -> None:
        """Close ``log.txt`` and forget the logger."""
        self.stop_capture()
        if not self.enabled:
            return
        self.enabled = False
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
        logging.Logger.manager.loggerDict.pop(self.logger.name, None)

    # ---------------------------------------------------------------------------- what is said
    def banner(self, cfg, task, results: dict, options: Mapping[str, Any], train_set, val_set, dist,
               plan: list[dict] | None = None, threads=None) -> None:
        """Task, steps (with their images and iterations, :func:`.plan.step_plan`), method, data,
        device and world size, torch's threads (``threads``: this segment's
        :class:`~ucdseg.threads.ThreadChoice`), output folder, new or resumed."""
        if not self.enabled:
            return
        from ..code_version import describe

        self._cfg = cfg

        done = [s["step"] for s in results.get("steps", [])]
        versions = results.get("versions", {})
        state = "new run" if not done else (
            f"resumed: {len(done)} of {task.num_steps} step(s) done ({_steps_text(done)})")
        names = results.get("class_names", [])
        lines = [
            f"ucdseg {describe(results.get('code'))}, torch {versions.get('torch', '?')}",
            f"run:     {cfg.run_dir} ({state})",
            f"task:    {task.dataset} {task.name} ({cfg.data.setting}), {task.num_steps} step(s), classes per step "
            f"{task.classes_per_step}",
        ]
        rows = {row["step"]: row for row in plan or []}
        for step, classes in enumerate(task.steps):
            shown = ", ".join(names[c] if c < len(names) else str(c) for c in classes)
            row = rows.get(step)
            size = f"{row['num_images']} images, {row['iterations']} iterations at lr {row['lr']:g}; " if row else ""
            lines.append(f"  step {step}: {size}{len(classes)} classes: {_clip(shown, 150)}")
        weights = ", ".join(f"{k}={v:g}" for k, v in results.get("weights", {}).items())
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        lines += [
            f"method:  {results.get('method', cfg.method.name)} [{weights}]" + (f" options {opts}" if opts else ""),
            f"data:    {cfg.data.dataset} at {getattr(train_set, 'root', cfg.data.root)}: {len(train_set)} train / "
            f"{len(val_set)} val images",
            f"device:  {dist.device}, world size {dist.world_size}, global batch {cfg.train.batch_size} "
            f"({cfg.train.batch_size // dist.world_size} per process, accumulate {cfg.train.accumulate}), "
            f"seed {cfg.seed}",
            "threads: " + (threads.describe() if threads is not None else
                           f"{versions.get('torch_threads', '?')} torch thread(s)"),
        ]
        if getattr(cfg.train, "steps", None) is not None:
            from ..step_range import parse_steps

            first, last = parse_steps(cfg.train.steps, task.num_steps)
            lines.append(f"steps:   train.steps={cfg.train.steps}: this command trains up to step {last} and stops"
                         + (f" (steps before {first} must be finished)" if first else ""))
        self.info("\n".join(lines))
        self._last = time.perf_counter()

    def step_done(self, results: dict, step: int, num_steps: int) -> None:
        """One line for a finished step: its mIoU (both conventions) and its time."""
        if not self.enabled:
            return
        record = next((r for r in results.get("steps", []) if r["step"] == step), None)
        now = time.perf_counter()
        if record is None:
            return
        how = ""
        if record.get("recovered"):
            how = " (recovered from its checkpoint, evaluated again)"
        elif step == 0 and (record.get("step0_from") or getattr(getattr(self._cfg, "train", None), "step0_from", None)):
            how = " (reused from another run)"
        train = record.get("train_seconds")
        self.info(f"step {step} done ({step + 1} of {num_steps}): {format_miou(record['miou'])}; "
                  f"{record.get('iterations', '?')} iterations on {record.get('num_train_images', '?')} images"
                  + (f", training {format_seconds(train)}" if train is not None else "")
                  + f", step {format_seconds(now - self._last)}{how}")
        self._last = now

    def summary(self, results: dict, num_steps: int, stop: int | None = None) -> None:
        """The final lines: the last step's mIoU, avg, total time, where the files are."""
        if not self.enabled:
            return
        steps = results.get("steps", [])
        elapsed = time.perf_counter() - self.started
        if not steps:
            self.info(f"no step finished ({format_seconds(elapsed)})")
            return
        last = steps[-1]
        avg = results.get("avg") or {}
        steps_arg = getattr(getattr(self._cfg, "train", None), "steps", None)
        if len(steps) < num_steps:
            head = (f"stopped after step {last['step']} as train.steps={steps_arg} asks: {len(steps)} of {num_steps} "
                    f"steps done ({format_seconds(elapsed)} this session); run the same command without --steps "
                    "(or with the next steps) to continue")
        else:
            head = f"finished: {num_steps} of {num_steps} step(s) done ({format_seconds(elapsed)} this session)"
        folder = self.path.parent if self.path else None
        files = [n for n in ("results.json", "summary.md", "forgetting.png") if folder and (folder / n).is_file()]
        self.info(f"{head}\n"
                  f"after step {last['step']}: {format_miou(last['miou'])}\n"
                  f"avg (mean over the steps of mIoU all): {_pct(avg.get('without_background'))} (without bg), "
                  f"{_pct(avg.get('with_background'))} (with bg)\n"
                  f"results in {folder or '?'} ({', '.join(files + [LOG_FILE])})")

    def failed(self, exc: BaseException) -> None:
        """The error that ended the run, in ``log.txt`` (the terminal gets it from the command)."""
        if self.enabled:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            interrupted = "interrupted" + (f" ({exc})" if str(exc) else "")  # (SIGTERM): ucdseg.cli.Terminated
            what = interrupted if isinstance(exc, KeyboardInterrupt) else f"failed: {type(exc).__name__}: {text}"
            self.logger.error(f"run {what}", extra={"file_only": True})


def _command() -> str:
    """``command: ucdseg run ...`` for the command line (its script or ``-m ucdseg.cli``), else the
    Python program that called :func:`ucdseg.run` (a notebook's kernel, a script)."""
    import shlex

    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("ucdseg", "cli.py"):
        return "command: " + shlex.join(["ucdseg", *argv[1:]])
    return "from Python: " + shlex.join(argv)


def _steps_text(steps: list[int]) -> str:
    """``0-2`` for [0, 1, 2], ``0, 2`` otherwise."""
    if steps and steps == list(range(steps[0], steps[-1] + 1)) and len(steps) > 1:
        return f"steps {steps[0]}-{steps[-1]}"
    return "step " + ", ".join(map(str, steps)) if len(steps) == 1 else "steps " + ", ".join(map(str, steps))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 5] + " ..."
