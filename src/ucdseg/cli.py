"""The ucdseg command line: class-incremental semantic segmentation (UCD, MiB, PLOP and baselines).

Torch is imported only by the commands that need it, so that listing commands (configs, runs,
methods, --help) answer at once: the parser names the datasets from the registry
(:mod:`ucdseg.registry`), which imports none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

from .registry import DATASETS  # the standard library only: the listing commands stay torch-free

DEMO_METHODS = ("ft", "mib", "mib+ucd")


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``configs/`` in the source tree)."""
    return Path(str(resources.files("ucdseg") / "configs" / name))


def _load(config: str | None, overrides: Sequence[str]):
    """The config of a path or of a packaged config's name (``voc/15-1-overlapped/mib_ucd``)."""
    from .config import load_config, resolve_config

    return load_config(None if config is None else resolve_config(config), overrides)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    cfg = _load(args.config, overrides)  # a bad config fails before the engine (torch) is imported
    if args.dry_run:
        from .engine.dry_run import dry_run

        print(dry_run(cfg, progress=not args.quiet))
        return 0
    from .engine import run
    from .reporting import write_run_reports

    results = run(cfg, progress=not args.quiet, reports=write_run_reports)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        from .reporting import summary_markdown

        print(summary_markdown(results))
        print(f"results in {cfg.run_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import reporting
    from .engine import run
    from .io import write_text

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from .methods import get_method

    for name in methods:
        get_method(name)  # fail early on a typo
    out = Path(args.output_dir)
    runs, timings = [], {}
    step0_dirs: dict[str, Path] = {}  # step-0 loss -> the first run that trained such a step 0
    for name in methods:
        method = get_method(name)
        overrides = [f"output_dir={out}", f"name={name}", f"method.name={name}", f"seed={args.seed}",
                     *args.overrides]
        if method.first_step in step0_dirs:  # the same step 0 (a joint run's is its own): share it
            overrides.append(f"train.step0_from={step0_dirs[method.first_step]}")
        cfg = _load(args.config or str(packaged_config("demo.yaml")), overrides)
        print(f"== {name}: {method.description}", flush=True)
        t0 = time.perf_counter()
        runs.append((name, run(cfg, progress=not args.quiet, reports=reporting.write_run_reports)))
        timings[name] = time.perf_counter() - t0
        step0_dirs.setdefault(method.first_step, cfg.run_dir)
    table = reporting.comparison_markdown(runs)
    task = runs[0][1]["task"]
    header = (f"# Demo: {task['dataset']} {task['name']} ({task['setting']}), seed {args.seed}\n\n"
              "mIoU (%) after the last step.\n\n")
    write_text(out / "comparison.md", header + table)
    write_text(out / "comparison.csv", reporting.to_csv(reporting.comparison_rows(runs)))
    reporting.plot_miou(runs, out / "comparison.png")
    print()
    print(header + table)
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"comparison written to {out / 'comparison.md'} and {out / 'comparison.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.evaluation import evaluate_checkpoint

    record = evaluate_checkpoint(args.checkpoint, overrides=args.overrides, progress=not args.quiet,
                                 save_predictions=args.save_predictions)
    print(f"step {record['step']}: mIoU " + ", ".join(
        f"{conv} " + "/".join("-" if v is None else f"{100 * v:.1f}" for v in groups.values())
        for conv, groups in record["miou"].items()) + " (old/new/all)")
    for name, value in record["per_class_iou"].items():
        print(f"  {name:24s} {'-' if value is None else f'{100 * value:.1f}'}")
    if args.save_predictions:
        print(f"{record['saved_predictions']} predicted masks (palette PNGs of the dataset's class ids) in "
              f"{args.save_predictions}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    rows = predict(args.checkpoint, args.inputs, args.output, batch_size=args.batch_size, device=args.device,
                   size=args.size, overlays=not args.no_overlays, progress=not args.quiet, max_pixels=args.max_pixels)
    out = Path(args.output)
    images = len({row["image"] for row in rows})
    print(f"{images} image(s) segmented: masks in {out / 'masks'}"
          + ("" if args.no_overlays else f", overlays in {out / 'overlays'}") + f", summary in {out / 'summary.csv'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reporting import write_aggregate

    print(write_aggregate(args.run_dirs, args.output_dir, paper=args.paper))
    print(f"written to {Path(args.output_dir) / 'report.md'}, report.csv, report.png and the forgetting map "
          "report_forgetting*.png")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import list_methods
    from .plugins import load_plugins

    load_plugins()

    for method in list_methods():
        weights = ", ".join(f"{k}={v:g}" for k, v in method.default_weights.items())
        print(f"{method.name:10s} {method.description}  [{weights}]")
        for name, option in method.all_options.items():  # method.options.<name>
            print(f"{'':10s}   option {name}={option.default}: {option.help}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from .configs_index import config_root, format_configs, list_configs

    names = list_configs(args.pattern)
    if not names:
        raise ValueError(f"no packaged config matches {args.pattern!r}; `ucdseg configs` lists them all")
    print(format_configs(names))
    print(f"({len(names)} config(s) in {config_root()}; run one with `ucdseg run NAME`, e.g. ucdseg run {names[0]})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .runs_list import format_runs, list_runs

    print(format_runs(list_runs(args.dir), args.dir))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import DATASETS, TaskError, get_task, list_tasks

    if args.dataset not in DATASETS:  # a registered dataset has no named task (the registry imports torch)
        from .data import dataset_names

        if args.dataset not in dataset_names():
            raise TaskError(f"unknown dataset {args.dataset!r}: expected one of {', '.join(dataset_names())}")
        return 0
    for name in list_tasks(args.dataset):
        task = get_task(args.dataset, name)
        print(f"{name:10s} {len(task.steps)} steps: {task.classes_per_step}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.index import format_index_report, index_report
    from .engine.build import build_task, open_dataset

    overrides = [f"data.dataset={args.dataset}", f"task.name={args.task}", f"data.setting={args.setting}",
                 f"seed={args.seed}"]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    cfg = load_config(None, overrides)
    dataset = open_dataset(cfg, args.split, prepare=False)  # indexes what is there, never generates data
    rows = index_report(dataset, build_task(cfg), args.setting, cache_dir=cfg.data.cache_dir, seed=args.seed,
                        progress=not args.quiet)
    print(format_index_report(rows))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import dataset_class
    from .plugins import load_plugins

    load_plugins()  # datasets of installed packages
    return dataset_class(args.dataset).run_check(args.dataset, args.root, limit=args.limit, progress=not args.quiet,
                                                 saliency=args.saliency)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import run_prepare

    return run_prepare(args.dataset, args.root, args.archives, checksums=args.checksum, verify=not args.skip_checksums,
                       download=args.download, progress=not args.quiet, limit=args.limit)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .embedded import default_root, prepare_embedded

    from .embedded.saliency import ensure_saliency

    root = prepare_embedded(args.root or default_root(), num_train=args.num_train, num_val=args.num_val,
                            image_size=args.image_size, seed=args.seed, fashion_mnist_dir=args.fashion_mnist,
                            progress=not args.quiet)
    ensure_saliency(root)  # SSUL's saliency maps, derived from the masks
    print(f"embedded benchmark ready in {root}")
    return 0


def cmd_device_check(args: argparse.Namespace) -> int:
    from .device_check import execute

    return execute(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucdseg", description=__doc__.split("\n\n")[0])
    datasets_help = f"a registered dataset: {', '.join(DATASETS.names())} or your own"  # named, not imported
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars, no run log on the terminal (runs still write log.txt)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every step of a task (continues an interrupted run)",
                       description="Run every step of a task in runs/NAME (running it again continues it).")
    p.add_argument("config", help="a YAML config file, or a packaged config's name (ucdseg configs lists them), "
                                  "e.g. voc/15-1-overlapped/mib_ucd")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=8")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the plan (steps, classes, images, iterations, memory); "
                        "train and write nothing")
    p.add_argument("--steps", default=None, metavar="RANGE",
                   help="train only these steps, then stop: N, A-B, A- or -B (train.steps); running again "
                        "without it continues")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="fine-tuning vs MiB vs MiB+UCD on the embedded benchmark")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated methods to compare")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="base config (default: the packaged demo.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every method's run")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="evaluate a step checkpoint on its validation set")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides (e.g. data.root=DIR)")
    p.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="also write the prediction of every validation image as a palette PNG of the dataset's "
                        "class ids, DIR/<image>.png")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment your own images with a step checkpoint")
    p.add_argument("checkpoint", help="a finished step's checkpoint, runs/<name>/checkpoints/stepN.pt")
    p.add_argument("inputs", nargs="+", help="image files and folders of images")
    p.add_argument("--output", required=True, help="folder for masks/, overlays/ and summary.csv")
    p.add_argument("--batch-size", type=int, default=4, help="images of the same size per forward pass")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda or cuda:N")
    p.add_argument("--size", type=int, default=None,
                   help="resize the shorter side to this for the model (default: the image's own size)")
    p.add_argument("--no-overlays", action="store_true", help="write only the masks and the summary")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="the most pixels the model segments at once (default 4096x4096, ucdseg.predict.MAX_PIXELS); "
                        "a larger image is refused with the --size that fits")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="one table (mean and std over seeds) and plot from several runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--output-dir", default="runs/report")
    p.add_argument("--paper", action="store_true", help="add UCD Table 1's values beside VOC runs")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("methods", help="list the methods with their loss weights")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("configs", help="list the packaged configs (run one by name: ucdseg run embedded/mib)")
    p.add_argument("pattern", nargs="?", default=None,
                   help="keep the names containing it (voc, 15-1, plop) or matching a glob (voc/*/plop*)")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("runs", help="list the run folders under DIR: task, method, seed, steps, last mIoU, state")
    p.add_argument("dir", nargs="?", default="runs", help="a folder of runs (default: runs)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("tasks", help="list the named tasks of a dataset")
    p.add_argument("dataset", help=datasets_help)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("index", help="per-step image counts and checksums of a task")
    p.add_argument("--dataset", required=True, help=datasets_help)
    p.add_argument("--root", default=None)
    p.add_argument("--task", required=True)
    p.add_argument("--setting", default="overlapped", choices=("overlapped", "disjoint", "partitioned"))
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="verify a dataset's layout, lists, images and masks")
    p.add_argument("--dataset", required=True, help=datasets_help)
    p.add_argument("--root", required=True)
    p.add_argument("--limit", type=int, default=None,
                   help="read N evenly spaced image/mask pairs per split; every entry is still checked for existence")
    p.add_argument("--saliency", action="store_true",
                   help="also check the training images' saliency maps (SSUL's unknown class: VOC saliency_map/, "
                        "a folder dataset's saliency/)")
    p.set_defaults(func=cmd_data_check)
    p = data_sub.add_parser("prepare", help="build a dataset's layout from its official archives, then check it",
                            description="Archives and their URLs: docs/datasets.md (ucdseg.data.prepare.ARCHIVES).")
    p.add_argument("dataset", choices=("voc", "ade", "cityscapes"))
    p.add_argument("--root", required=True, help="the folder to build (what data.root will name)")
    p.add_argument("--archives", required=True, help="the folder holding the downloaded archives")
    p.add_argument("--download", action="store_true", help="download the missing archives first (not Cityscapes)")
    p.add_argument("--checksum", action="append", default=[], metavar="ARCHIVE=ALGO:HEX",
                   help="expect this checksum for an archive instead of the official one (repeatable)")
    p.add_argument("--skip-checksums", action="store_true", help="do not verify the archives (says so)")
    p.add_argument("--limit", type=int, default=None, help="the final data check reads N pairs per split")
    p.set_defaults(func=cmd_data_prepare)

    from .device_check import add_arguments as device_check_arguments  # standard library only: cheap

    p = sub.add_parser("device-check", help="check the GPU (or --device cpu) path: a tiny torchrun task, AMP, SyncBN, "
                                            "UCD, PLOP, eval, predict; one pass/fail table",
                       description="Run the device check (docs/distributed.md, \"Device check\"): one table of "
                                   "pass/fail with timings; exit code 1 if a check failed.")
    device_check_arguments(p)
    p.set_defaults(func=cmd_device_check)

    p = sub.add_parser("prepare-embedded", help="generate the embedded Fashion-MNIST benchmark")
    p.add_argument("--root", default=None)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=400)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fashion-mnist", default=None, help="directory holding the Fashion-MNIST IDX files")
    p.set_defaults(func=cmd_prepare)
    return parser


def error_line(exc: BaseException) -> str:
    """One line for an error: its message, or for an OS error what failed on which file."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror:  # raised by the OS, not with a message of ours
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit, torchrun stopping its workers), raised where the
    process is, so that it ends as Ctrl-C does: the run folder released, its log closed, the
    checkpoints kept (a ``KeyboardInterrupt``, so every handler of an interrupt handles it)."""

    def __init__(self):
        super().__init__("SIGTERM")


def _terminate(signum, frame) -> None:
    raise Terminated()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM; the previous one (None where signals cannot be set: not the
    main thread, no SIGTERM)."""
    import signal

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, AttributeError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "demo") and not getattr(args, "dry_run", False):
        from .threads import set_wait_policy

        set_wait_policy()  # PASSIVE on a busy machine, unless set: OpenMP reads it when torch loads, below
    previous = _on_sigterm(_terminate)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        if os.environ.get("UCDSEG_DEBUG"):
            raise
        print(f"ucdseg: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        print("ucdseg: terminated (SIGTERM); run the same command again to continue", file=sys.stderr)
        return 143  # 128 + SIGTERM, as the shell reports a process SIGTERM ended
    except KeyboardInterrupt:
        print("ucdseg: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            _on_sigterm(previous)


if __name__ == "__main__":
    sys.exit(main())
