"""Run every ucdseg benchmark and write ``benchmarks.json`` and ``benchmarks.md``.

    python benchmarks/run.py [--quick] [--output benchmarks/results] [--threads N] [--only NAME ...]

Benchmarks (see docs/performance.md): ``contrastive`` (streamed UCD loss vs a dense
implementation), ``train_step`` (UCD's overhead on a MiB / PLOP training step), ``frozen`` (an
SSUL step 1 with its frozen trunk against a MiB step 1), ``options``
(``train.channels_last`` and ``train.compile`` on a MiB+UCD step), ``profile`` (torch.profiler
over MiB+UCD steps: top operators, share of our code), ``data`` (embedded benchmark generation,
index, DataLoader) and ``evaluation``. ``--quick`` shrinks every size and runs each case once or
a few times (about a minute; 2-3 minutes when torch.compile's on-disk cache is cold); the full
run takes about 15-20 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_average, log, machine_info  # noqa: E402

BENCHMARKS = ("data", "train_step", "frozen", "options", "profile", "contrastive")  # "data" also produces "evaluation"
DOC = REPO / "docs" / "performance.md"
DOC_BEGIN, DOC_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the ucdseg benchmarks.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, few repeats (about a minute; more when torch.compile's cache is cold)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"),
                        help="folder for benchmarks.json and benchmarks.md (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default, one per core)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                        help="run only these benchmarks (data includes evaluation)")
    parser.add_argument("--concurrent", type=int, default=1,
                        help="contrastive: run its cases as N concurrent chains of processes (a shared machine)")
    parser.add_argument("--note", default="", help="free text stored with the run (e.g. what else ran)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other sections of an existing DIR/benchmarks.json (with their own run "
                             "information) and replace only the benchmarks run now")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"also replace the results section of {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def update_docs(markdown: str, doc: Path = DOC) -> None:
    """Replace the text between the benchmark markers of ``doc`` with ``markdown``."""
    text = doc.read_text(encoding="utf-8")
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError(f"{doc} has no '{DOC_BEGIN}' ... '{DOC_END}' section to update")
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    body = markdown.split("\n", 2)[2] if markdown.startswith("# ") else markdown  # drop the H1
    doc.write_text(f"{head}{DOC_BEGIN}\n{body.strip()}\n{DOC_END}{tail}", encoding="utf-8")


def merge_previous(result: dict, path: Path) -> dict:
    """``result`` plus the sections of ``path`` it did not run; each kept section keeps its run."""
    if not path.exists():
        return result
    previous = json.loads(path.read_text(encoding="utf-8"))
    kept = {k: v for k, v in previous.get("benchmarks", {}).items() if k not in result["benchmarks"]}
    if kept:
        earlier = [r for r in previous.get("earlier_runs", []) if set(r["sections"]) & set(kept)]
        for r in earlier:
            r["sections"] = [s for s in r["sections"] if s in kept]
        covered = {s for r in earlier for s in r["sections"]}
        rest = [s for s in kept if s not in covered]
        if rest:
            earlier.append({"sections": rest, "run": previous["run"], "machine": previous["machine"]})
        result["earlier_runs"] = earlier
        result["benchmarks"] = {**kept, **result["benchmarks"]}
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import bench_contrastive
    import bench_data
    import bench_frozen
    import bench_options
    import bench_train_step
    import profile_step
    from report import render

    selected = args.only or list(BENCHMARKS)
    started = time.perf_counter()
    result: dict = {
        "machine": machine_info(),
        "run": {"quick": args.quick, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                "load_start": load_average(), "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
                "note": args.note},
        "benchmarks": {},
    }
    timings = {}
    for name in BENCHMARKS:
        if name not in selected:
            continue
        log(f"[{name}] load {load_average()}")
        t0 = time.perf_counter()
        load = load_average()
        if name == "data":
            out = bench_data.run(quick=args.quick)
            out["data"]["load_before"] = load
            out["evaluation"]["load_before"] = load
            result["benchmarks"].update(out)
        elif name in ("train_step", "frozen", "options", "profile"):
            module = {"train_step": bench_train_step, "frozen": bench_frozen, "options": bench_options,
                      "profile": profile_step}[name]
            out = module.run(quick=args.quick)
            out["load_before"] = load
            result["benchmarks"][name] = out
        else:
            out = bench_contrastive.run(quick=args.quick, threads=args.threads, concurrent=args.concurrent)
            out["load_before"], out["load_after"] = load, load_average()
            result["benchmarks"]["contrastive"] = out
        timings[name] = time.perf_counter() - t0
        log(f"[{name}] done in {timings[name]:.0f} s")
    result["run"].update(wall_s=time.perf_counter() - started, section_wall_s=timings, load_end=load_average())

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.merge:
        result = merge_previous(result, out_dir / "benchmarks.json")
    (out_dir / "benchmarks.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    markdown = render(result)
    (out_dir / "benchmarks.md").write_text(markdown + "\n", encoding="utf-8")
    if args.update_docs:
        update_docs(markdown)
    print(markdown)
    log(f"wrote {out_dir / 'benchmarks.json'} and {out_dir / 'benchmarks.md'}")
    return result


if __name__ == "__main__":
    main()
