"""Shared helpers of the benchmarks: timing, peak memory, machine description, subprocess cases."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_PREFIX = "BENCHMARK-RESULT "


# ---------------------------------------------------------------------------------- timing
def median(values: list[float]) -> float:
    return float(statistics.median(values))


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    """Median, min, max and all values (seconds) of a list of timings."""
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


# ---------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


class PeakRSS:
    """Peak resident memory of this process while a block runs, above its resident memory at entry.

    Linux only. On entry the kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``,
    Linux >= 4.0), so ``VmHWM`` (the value ``getrusage().ru_maxrss`` reports) measures the peak of
    this block alone; ``peak_mib = VmHWM(exit) - VmRSS(entry)``. If the reset is refused, the
    measurement falls back to ``ru_maxrss(exit) - VmRSS(entry)``, which is only valid when nothing
    before the block peaked higher; ``method`` says which one was used.
    """

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.method = "VmHWM reset via /proc/self/clear_refs, peak minus RSS at start"
        except OSError:
            self.method = "ru_maxrss (not reset) minus RSS at start"
        self.start_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        peak_kib = max(_status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self.peak_mib = (peak_kib - self.start_kib) / 1024.0


# ---------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def memory_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return round(kib / 2**20, 1)
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    import numpy
    import torch
    import torchvision

    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }


# ---------------------------------------------------------------------------------- subprocess cases
def emit(result: dict) -> None:
    """Print a case's result on one line for :func:`run_case` (the child side)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_case(module: str, args: dict, timeout: float = 1800.0, env: dict | None = None) -> dict:
    """Run ``python benchmarks/<module>.py --case '<json args>'`` in a fresh process; return its result.

    A fresh interpreter per case keeps peak-memory figures independent of earlier cases; ``env``:
    its environment (default: this process's).
    """
    cmd = [sys.executable, str(HERE / f"{module}.py"), "--case", json.dumps(args)]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    raise RuntimeError(f"benchmark case {module} {args} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
