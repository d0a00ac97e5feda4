"""Benchmark: the demo model's training iteration by torch thread count and OpenMP wait policy, on
a quiet machine and beside two busy processes.

    python benchmarks/bench_threads.py [--rounds N] [--output benchmarks/results] [--note TEXT]

The iteration is the engine's (:func:`ucdseg.engine.loop.train_one_iteration`) at step 1 of the
demo (the packaged ``demo.yaml``: embedded ResNet at output stride 4, batch 16, 64 x 64 crops,
channels-last, MiB+UCD, classes per step [5, 3]; random weights and batch, no data on disk): new
and old model forwards, the losses, backward, SGD. Two conditions:

* ``quiet``: nothing of the benchmark's own beside it (what else the machine runs is noted: the
  load average before and after, and the other runnable threads :func:`ucdseg.threads.other_load`
  sees);
* ``loaded``: two busy processes started by the benchmark (pure Python loops, at the
  benchmark's own niceness), killed when the condition is done.

In each condition, three fresh processes (OpenMP reads its wait policy once, when torch loads),
each timing its variants round-robin (one iteration of each per round) after one warm-up:

* ``default``: ``OMP_WAIT_POLICY`` unset (libgomp spins, then sleeps): 1 thread and torch's
  default count (one per core), i.e. today's behaviour without ucdseg's choice;
* ``PASSIVE``: ``OMP_WAIT_POLICY=PASSIVE`` for every count: 1 thread and torch's default count;
* ``auto``: what ``ucdseg run`` does: the policy of :func:`ucdseg.threads.set_wait_policy`
  (before torch loads) and the count of :func:`ucdseg.threads.auto_threads` (no
  ``OMP_NUM_THREADS``, no ``UCDSEG_THREADS``), and 1 thread.

1 thread (whose time no wait policy changes) is timed in every process: each variant's ratio to
1 thread is taken within its process (median over rounds of the per-round ratio), so that a change
of the machine's load between processes cancels out. Targets: loaded, auto <= 1.3x the 1-thread
time; quiet, auto no slower than torch's default count under the default policy (today's
behaviour), within 5 % for noise. Figures go to ``OUTPUT/threads.json`` and ``OUTPUT/threads.md``
(docs/performance.md "Threads on a busy machine" quotes them). About 3 minutes on a quiet 2-core
machine; more on a busy one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit, load_average, log, machine_info, median, run_case  # noqa: E402

BUSY = 2
BUSY_CODE = "while True:\n    pass\n"
MODES = ("default", "PASSIVE", "auto")  # the processes of a condition (see the module docstring)
WARMUP = 1
LOAD_TARGET, QUIET_TOLERANCE = 1.3, 1.05


# ------------------------------------------------------------------------------------ the child
def _demo_iteration():
    """A function running one training iteration of the demo's step 1 (fixed batch)."""
    import torch

    from bench_train_step import make_batch
    from ucdseg.cli import packaged_config
    from ucdseg.config import load_config
    from ucdseg.engine import build
    from ucdseg.engine.loop import Criterion, Trainee, train_one_iteration
    from ucdseg.engine.process_group import Dist
    from ucdseg.models import load_previous_step

    cfg = load_config(str(packaged_config("demo.yaml")), ["method.name=mib+ucd", "model.pretrained=null"])
    classes = [5, 3]  # 4-3-3 at step 1: background and 4 classes, then 3 new ones
    device = torch.device("cpu")
    torch.manual_seed(0)
    old_model = build.step_model(cfg, classes[:1], device).eval().requires_grad_(False)
    model = build.step_model(cfg, classes, device)
    load_previous_step(model, old_model.state_dict())
    method = build.build_method(cfg)
    model.init_new_classifier(method.classifier_init)
    opts = build.loop_options(cfg, 1)
    if opts.channels_last:
        for m in (model, old_model):
            m.to(memory_format=torch.channels_last)
    optimizer, scheduler = build.optimizer_and_schedule(cfg, model, 1, total=10_000)
    trainee = Trainee(model, model, old_model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    model.train()
    criterion = Criterion(method, build.method_weights(cfg), build.method_options(cfg), 1, classes[0], classes[1])
    images, labels = make_batch(cfg.train.batch_size, cfg.data.crop_size)
    labels = torch.where(labels == 16, torch.full_like(labels, classes[0] + 1), labels)  # a new class
    if opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dist = Dist(0, 1, 0, device)
    return lambda: train_one_iteration(trainee, criterion, images, labels.clone(), opts, dist)


def case(args: dict) -> dict:
    """One process of ``args["mode"]``: its variants timed round-robin."""
    from ucdseg import threads

    if args["mode"] == "auto":
        threads.set_wait_policy()  # before torch loads, as `ucdseg run` does
    import torch

    default = torch.get_num_threads()
    iterate = _demo_iteration()
    counts, why = {"1": 1}, None
    if args["mode"] == "auto":
        counts["auto"], why = threads.auto_threads()
    else:
        counts["default"] = default
    for name, count in counts.items():
        torch.set_num_threads(count)
        for _ in range(WARMUP):
            iterate()
    times: dict[str, list[float]] = {name: [] for name in counts}
    for _ in range(args["rounds"]):
        for name, count in counts.items():
            torch.set_num_threads(count)
            t0 = time.perf_counter()
            iterate()
            times[name].append(time.perf_counter() - t0)
    return {"mode": args["mode"], "omp_wait_policy": threads.wait_policy(), "threads": counts, "auto_why": why,
            "times_s": times}


# ------------------------------------------------------------------------------------ the parent
def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_CODE], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def _env(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "UCDSEG_THREADS",
                                                           "OMP_WAIT_POLICY")}
    if mode == "PASSIVE":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
    return env


def condition(name: str, rounds: int) -> dict:
    from ucdseg.threads import other_load

    busy = _busy(BUSY) if name == "loaded" else []
    try:
        if busy:
            time.sleep(1.0)  # the busy loops are running
        out: dict = {"busy_processes": len(busy), "load_before": load_average(), "other_runnable_before": other_load(),
                     "processes": {}}
        for mode in MODES:
            t0 = time.perf_counter()
            res = run_case("bench_threads", {"rounds": rounds, "mode": mode}, env=_env(mode))
            res["wall_s"] = time.perf_counter() - t0
            out["processes"][mode] = res
            log(f"  {name}, {mode} (wait policy {res['omp_wait_policy'] or 'default'}): " + ", ".join(
                f"{k} ({res['threads'][k]}) {median(v):.3f} s" for k, v in res["times_s"].items())
                + f" [{res['wall_s']:.0f} s]")
        out["load_after"], out["other_runnable_after"] = load_average(), other_load()
    finally:
        _stop(busy)
    out["variants"] = {}
    for mode, res in out["processes"].items():
        one = res["times_s"]["1"]
        for variant, values in res["times_s"].items():
            out["variants"][f"{variant} {mode}"] = {
                "threads": res["threads"][variant], "omp_wait_policy": res["omp_wait_policy"],
                "median_s": median(values), "runs_s": values,
                "ratio_to_1_thread": median([v / o for v, o in zip(values, one)])}
    auto = out["processes"]["auto"]
    out["auto"] = {"threads": auto["threads"]["auto"], "why": auto["auto_why"], "omp_wait_policy": auto["omp_wait_policy"]}
    return out


def render(result: dict) -> str:
    m, run = result["machine"], result["run"]
    lines = ["# Threads on a busy machine (benchmarks/bench_threads.py)", "",
             f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores; torch {m['torch']}; "
             f"run {run['started']}, {run['wall_s'] / 60:.1f} min, {run['rounds']} rounds per variant"
             + (f" -- {run['note']}" if run["note"] else "") + ".", "",
             "The demo's training iteration (step 1, MiB+UCD, batch 16, 64 x 64, channels-last): median seconds "
             "over round-robin rounds, and in brackets the ratio to 1 thread in the same process (median of the "
             "per-round ratios). `default count` = torch's (one per core); `auto` = what `ucdseg run` chooses "
             "there (threads and wait policy).", "",
             "| condition | load before / after (1 min) | other runnable threads before / after | 1 thread | "
             "default count, default policy (today) | default count, PASSIVE | auto | auto chose | target |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for name, c in result["conditions"].items():
        v = c["variants"]
        cell = lambda key: f"{v[key]['median_s']:.3f} s ({v[key]['ratio_to_1_thread']:.2f}x)"  # noqa: E731
        target = result["targets"][name]
        auto = c["auto"]
        lines.append(f"| {name} | {c['load_before'][0]} / {c['load_after'][0]} | "
                     f"{c['other_runnable_before']} / {c['other_runnable_after']} | {v['1 default']['median_s']:.3f} s | "
                     f"{cell('default default')} | {cell('default PASSIVE')} | {cell('auto auto')} | "
                     f"{auto['threads']} thread(s), policy {auto['omp_wait_policy'] or 'default'} | "
                     f"{target['what']}: {target['value']:.2f} {'pass' if target['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed iterations per variant and condition")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--note", default="", help="free text stored with the run (e.g. what else ran)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case is not None:
        emit(case(json.loads(args.case)))
        return {}
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    started = time.perf_counter()
    result: dict = {"machine": machine_info(),
                    "run": {"started": _dt.datetime.now().isoformat(timespec="seconds"), "rounds": args.rounds,
                            "note": args.note, "command": " ".join(["python", "benchmarks/bench_threads.py",
                                                                    *sys.argv[1:]])},
                    "conditions": {}}
    for name in ("quiet", "loaded"):
        log(f"[{name}] load {load_average()}")
        result["conditions"][name] = condition(name, args.rounds)
    quiet, loaded = (result["conditions"][k]["variants"] for k in ("quiet", "loaded"))
    loaded_ratio = loaded["auto auto"]["ratio_to_1_thread"]
    quiet_ratio = quiet["auto auto"]["ratio_to_1_thread"] / quiet["default default"]["ratio_to_1_thread"]
    result["targets"] = {
        "loaded": {"what": "auto / 1 thread", "value": loaded_ratio, "limit": LOAD_TARGET,
                   "pass": loaded_ratio <= LOAD_TARGET},
        "quiet": {"what": "auto / today", "value": quiet_ratio, "limit": QUIET_TOLERANCE,
                  "pass": quiet_ratio <= QUIET_TOLERANCE}}
    result["run"]["wall_s"] = time.perf_counter() - started
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    markdown = render(result)
    (out / "threads.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    log(f"wrote {out / 'threads.json'} and {out / 'threads.md'}")
    return result


if __name__ == "__main__":
    main()
