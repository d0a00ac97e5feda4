"""How many CPU threads torch computes with, and the record of them in a run.

The count, in order of precedence (docs/performance.md "Threads on a busy machine"):

1. ``train.threads=N`` in the config (a YAML file or an override);
2. the environment variable ``UCDSEG_THREADS=N`` (``auto`` or unset: the next rule);
3. ``auto`` (the default):

   a. a resumed run takes the count of its previous segment: on CPU a run is bit-identical across
      a resume only with the same count (a reduction split across threads adds in another order);
   b. else ``OMP_NUM_THREADS`` when it is set (the user's standing choice, or torchrun's);
   c. else the cores this process may use (its CPU affinity, capped by a cgroup CPU quota, shared
      by the processes of one torchrun on the machine), less the cores that other runnable
      processes keep busy right now (sampled for a quarter of a second), and at least 1.

torch's threads wait for one another at every parallel region, spinning for a while before they
sleep (OpenMP's default wait policy): with more runnable threads than cores a thread the kernel has
descheduled holds up its team, and the spinning ones burn the time slices the others need. On the
2-core development machine beside two busy processes, a training iteration of the demo model took
3.4x longer with torch's default of 2 threads than with 1; with ``OMP_WAIT_POLICY=PASSIVE``
(threads sleep at once) 2 threads took 0.7x the 1-thread time, but on the quiet machine PASSIVE
made 2 threads 20 % slower (benchmarks/bench_threads.py). So the ``ucdseg run`` and ``ucdseg demo``
commands, before torch loads (OpenMP reads the policy once, then), set ``OMP_WAIT_POLICY=PASSIVE``
when the machine is busy and leave OpenMP's default when it is quiet (:func:`set_wait_policy`),
unless the variable is set. The policy never changes a result, only its speed, so each process
chooses its own; the count is kept across a resume (rule a).

A *segment* is one process that trained part of a run; ``results.json`` lists them all under
``segments`` (the step and iteration it started at, its threads and how they were chosen, the
wait policy, host, process and time), since the thread count is part of what fixes a run's
numbers.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

ENV = "UCDSEG_THREADS"
WAIT_POLICY = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"
EXPECTED = "auto or an integer >= 1"
SAMPLES, SAMPLE_INTERVAL = 10, 0.025  # the load is sampled for a quarter of a second

# OMP_WAIT_POLICY as it was when torch loaded, and why, when set_wait_policy ran before torch loaded
_policy_at_import: dict[str, str | None] = {}


def parse_threads(value: object, what: str) -> int | None:
    """``value`` as a thread count, or None for ``auto``; else a one-line ``ValueError`` naming ``what``."""
    text = "" if value is None else str(value).strip()
    if text == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1 or isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{what} is {value!r}; expected {EXPECTED}")
    return count


def env_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """``UCDSEG_THREADS`` as a count (None: unset, empty or ``auto``); a bad value is one line."""
    value = environ.get(ENV, "").strip()
    return None if not value else parse_threads(value, f"environment variable {ENV}")


# ------------------------------------------------------------------------------------ the machine
def available_cores() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    """CPUs of the cgroup's quota (``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` of v1), rounded
    up; None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii").split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text(encoding="ascii"))
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text(encoding="ascii"))
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _running_here() -> int:
    """Threads of this process that are runnable now (at least this one)."""
    count = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                with open(f"{task.path}/stat", encoding="ascii") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            count += state == "R"
    except OSError:
        return 1
    return max(1, count)


def other_load(samples: int = SAMPLES, interval: float = SAMPLE_INTERVAL) -> float | None:
    """Runnable threads of other processes on the machine, averaged over ``samples`` readings of
    ``/proc/loadavg`` ``interval`` seconds apart (its fourth field counts the runnable threads now,
    this process's among them); None where there is no ``/proc/loadavg``."""
    readings = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        readings.append(max(0, running - _running_here()))
        if i + 1 < samples:
            time.sleep(interval)
    return sum(readings) / len(readings)


def local_processes(environ: Mapping[str, str] = os.environ) -> int:
    """Processes of this run on this machine (torchrun's ``LOCAL_WORLD_SIZE``, else 1)."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def auto_threads(environ: Mapping[str, str] = os.environ, load: float | None = -1.0) -> tuple[int, str]:
    """Rules 3b and 3c of the module docstring: ``(count, why)`` for a run that starts. ``load``:
    the other runnable threads (-1: measure them now; None: unknown)."""
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        try:
            count = int(omp.split(",")[0])
        except ValueError:
            count = 0
        if count >= 1:
            return count, f"OMP_NUM_THREADS={omp}"
    cores = available_cores()
    share = max(1, cores // local_processes(environ))
    where = f"{cores} core(s)" + (f" for {local_processes(environ)} processes" if share != cores else "")
    if load is not None and load < 0:
        load = other_load()
    if load is None:
        return share, f"{where}, load unknown"
    count = max(1, min(share, free_cores(load, cores)))
    return count, f"{where}, {load:.1f} other runnable thread(s) on {max(os.cpu_count() or cores, cores)}"


def free_cores(load: float, cores: int | None = None) -> int:
    """The machine's cores that ``load`` other runnable threads leave free (``/proc/loadavg``
    counts the whole machine), rounded to the nearest: a shell or an editor that wakes now and then
    takes none."""
    total = max(os.cpu_count() or 1, cores or available_cores())
    return math.floor(total - load + 0.5)


def busy(load: float | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether other processes keep some of this process's cores busy (``load`` as :func:`other_load`)."""
    if load is None:
        return False
    share = max(1, available_cores() // local_processes(environ))
    return free_cores(load) < share


# ------------------------------------------------------------------------------------ the choice
@dataclass
class ThreadChoice:
    """The torch thread count of this segment of a run, and why."""

    threads: int
    source: str  # "train.threads", "UCDSEG_THREADS" or "auto"
    why: str  # auto: the rule that chose (e.g. "as the run's previous segment", "OMP_NUM_THREADS=1")
    previous: int | None  # the threads of the run's previous segment (None: a new run)
    fresh: int | None = None  # auto restoring the previous count: what the rules 3b-3c choose now
    restore: int | None = field(default=None, repr=False)  # torch's count before apply()
    recorded: bool = field(default=False, repr=False)

    def describe(self) -> str:
        """``1 torch thread (train.threads=auto: 2 core(s), 2.0 other runnable ...), OpenMP wait policy ...``."""
        how = {"train.threads": f"train.threads={self.threads}", ENV: f"{ENV}={self.threads}"}.get(
            self.source, f"train.threads=auto: {self.why}")
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({how}), {describe_wait_policy()}"

    def apply(self) -> None:
        """torch computes with :attr:`threads` from now on (:meth:`restore_previous` undoes it)."""
        import torch

        self.restore = torch.get_num_threads()
        if self.restore != self.threads:
            torch.set_num_threads(self.threads)

    def restore_previous(self) -> None:
        """torch's thread count as it was before :meth:`apply` (a Python caller keeps its own)."""
        if self.restore is not None:
            import torch

            if torch.get_num_threads() != self.restore:
                torch.set_num_threads(self.restore)
            self.restore = None


def previous_threads(results: Mapping | None) -> int | None:
    """The threads of the last segment that trained part of the run of ``results``; for a run
    written before segments were recorded, the count it started with (``versions.torch_threads``)."""
    if not results:
        return None
    segments = results.get("segments")
    if isinstance(segments, list) and segments and isinstance(segments[-1], dict):
        count = segments[-1].get("threads")
        return count if isinstance(count, int) and count >= 1 else None
    if results.get("steps"):
        count = (results.get("versions") or {}).get("torch_threads")
        return count if isinstance(count, int) and count >= 1 else None
    return None


def choose(configured: object, results: Mapping | None, environ: Mapping[str, str] = os.environ,
           load: float | None = -1.0) -> ThreadChoice:
    """The threads of a segment: ``train.threads`` (``configured``) > ``UCDSEG_THREADS`` > auto,
    for a run whose ``results.json`` so far is ``results`` (None or no segment: a new run)."""
    previous = previous_threads(results)
    count = parse_threads(configured, "config key 'train.threads'")
    if count is not None:
        return ThreadChoice(count, "train.threads", "", previous)
    count = env_threads(environ)
    if count is not None:
        return ThreadChoice(count, ENV, "", previous)
    if previous is not None:
        fresh, why = auto_threads(environ, load)
        return ThreadChoice(previous, "auto", "as the run's previous segment, for a bit-identical resume", previous,
                            fresh=fresh)
    count, why = auto_threads(environ, load)
    return ThreadChoice(count, "auto", why, None)


def start(cfg, results: dict) -> ThreadChoice:
    """Choose (:func:`choose`) and apply this segment's threads; a new run's ``versions.torch_threads``
    (the count it starts with) follows."""
    choice = choose(cfg.train.threads, results)
    choice.apply()
    if previous_threads(results) is None and isinstance(results.get("versions"), dict):
        results["versions"]["torch_threads"] = choice.threads
    return choice


# ------------------------------------------------------------------------------------ the record
def resume_note(choice: ThreadChoice) -> str | None:
    """The line a resumed run prints when its count is not the previous segment's (or when auto
    restored a count that the machine's load would not choose now)."""
    if choice.previous is None:
        return None
    if choice.source != "auto" and choice.threads != choice.previous:
        given = f"train.threads={choice.threads}" if choice.source == "train.threads" else f"{ENV}={choice.threads}"
        return (f"ucdseg: warning: {given}: this run's previous segment trained with {choice.previous} torch "
                f"thread(s); a resume is bit-identical to an uninterrupted run only with the same count "
                f"(train.threads={choice.previous})")
    if choice.source == "auto" and choice.fresh is not None and choice.fresh != choice.threads:
        return (f"ucdseg: note: train.threads=auto: {choice.threads} torch thread(s), as this run's previous "
                f"segment, so that the resume is bit-identical; {choice.fresh} would suit this machine now: set "
                f"train.threads={choice.fresh} (or {ENV}={choice.fresh}) to trade bit-identity for speed")
    return None


def segment(choice: ThreadChoice, step: int, iteration: int, world_size: int = 1) -> dict:
    """The record of a segment that starts training at ``iteration`` of ``step``."""
    how = choice.source if choice.source != "auto" else f"auto: {choice.why}"
    return {"step": step, "iteration": iteration, "threads": choice.threads, "chosen_by": how,
            "omp_wait_policy": wait_policy(), "world_size": world_size, "host": socket.gethostname(),
            "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def begin_segment(choice: ThreadChoice | None, results: dict, step: int, iteration: int, dist=None) -> bool:
    """Once per segment, when it starts training (``iteration`` of ``step``): its record appended to
    ``results["segments"]`` and the resume line (:func:`resume_note`) printed, if any. True when a
    record was added: the caller writes ``results.json`` at once, so that a segment killed before
    it finishes a step is on record. ``dist``: the run's processes
    (:class:`~ucdseg.engine.process_group.Dist`); only rank 0 records."""
    if choice is None or choice.recorded:
        return False
    choice.recorded = True
    if dist is not None and not dist.is_main:
        return False
    note = resume_note(choice)
    if note:
        print(note, file=sys.stderr, flush=True)
    results.setdefault("segments", []).append(segment(choice, step, iteration, dist.world_size if dist else 1))
    return True


# ------------------------------------------------------------------------------------ OpenMP
def choose_wait_policy(environ: Mapping[str, str] = os.environ, load: float | None = -1.0) -> tuple[str | None, str]:
    """``(OMP_WAIT_POLICY, why)`` for a process that trains: the user's when set, else ``PASSIVE``
    on a busy machine and OpenMP's default (None) on a quiet one. ``load`` as in :func:`auto_threads`."""
    given = environ.get(WAIT_POLICY, "").strip()
    if given:
        return given, f"{WAIT_POLICY} set before ucdseg started"
    if load is not None and load < 0:
        load = other_load()
    if busy(load, environ):
        return PASSIVE, f"the machine was busy when the command started ({load:.1f} other runnable thread(s))"
    return None, "the machine was quiet when the command started" if load is not None else "load unknown"


def set_wait_policy(environ=os.environ, load: float | None = -1.0) -> None:
    """Set ``OMP_WAIT_POLICY`` as :func:`choose_wait_policy` says, before torch loads (OpenMP reads it
    once, when torch loads it): for the ``ucdseg`` commands that train. Once torch is loaded it is
    too late: the environment is left alone."""
    if "torch" in sys.modules:
        return
    value, why = choose_wait_policy(environ, load)
    if value is not None and not environ.get(WAIT_POLICY, "").strip():
        environ[WAIT_POLICY] = value
    _policy_at_import.update(value=value, why=why)


def wait_policy() -> str | None:
    """The OpenMP wait policy torch runs with: as set before it loaded (None: OpenMP's default)."""
    if "value" in _policy_at_import:
        return _policy_at_import["value"]
    return os.environ.get(WAIT_POLICY, "").strip().upper() or None


def describe_wait_policy() -> str:
    """``OpenMP wait policy PASSIVE (the machine was busy ...)`` for the banner."""
    value = wait_policy()
    shown = value or "default (spin, then sleep)"
    why = _policy_at_import.get("why")
    return f"OpenMP wait policy {shown}" + (f" ({why})" if why else "")
