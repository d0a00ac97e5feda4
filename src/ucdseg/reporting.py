"""Tables and plots of a run's ``results.json`` (and comparisons of several runs)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.meta import colorize
from .engine.checkpoint import atomic_path, write_text

CONVENTIONS = ("without_background", "with_background")
GROUPS = ("old", "new", "all")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def step_rows(results: dict) -> list[dict]:
    """One flat row per step: mIoU groups in both conventions, pixel accuracy, per-class IoU."""
    names = results["class_names"]
    rows = []
    for record in results["steps"]:
        row = {"step": record["step"], "new_classes": " ".join(names[c] for c in record["classes"])}
        for conv in CONVENTIONS:
            for group in GROUPS:
                row[f"miou_{group}_{conv}"] = record["miou"][conv][group]
        row["pixel_accuracy"] = record["pixel_accuracy"]
        for name in names:
            row[f"iou_{name}"] = record["per_class_iou"].get(name)
        rows.append(row)
    return rows


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def summary_markdown(results: dict) -> str:
    task = results["task"]
    lines = [
        f"# {results['method']} on {task['dataset']} {task['name']} ({task['setting']}), seed {results['seed']}",
        "",
        "mIoU (%) after each step. *old* = step-0 classes, *new* = classes added later. "
        "MiB/UCD convention: without background; PLOP convention: with background.",
        "",
        "| step | new classes | old | new | all | old (w/ bg) | new (w/ bg) | all (w/ bg) | pixel acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = results["class_names"]
    for record in results["steps"]:
        wo, wi = record["miou"]["without_background"], record["miou"]["with_background"]
        new = ", ".join(names[c] for c in record["classes"])
        lines.append(
            f"| {record['step']} | {new} | {_pct(wo['old'])} | {_pct(wo['new'])} | {_pct(wo['all'])} | "
            f"{_pct(wi['old'])} | {_pct(wi['new'])} | {_pct(wi['all'])} | {_pct(record['pixel_accuracy'])} |"
        )
    if results["steps"]:
        last = results["steps"][-1]
        lines += ["", f"Per-class IoU (%) after step {last['step']}:", "",
                  "| class | IoU |", "|---|---|"]
        lines += [f"| {name} | {_pct(v)} |" for name, v in last["per_class_iou"].items()]
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_miou(runs: Sequence[tuple[str, dict]], path: Path, convention: str = "without_background") -> None:
    """mIoU (old, new, all) per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, group in zip(axes, GROUPS):
        for label, results in runs:
            steps = [r["step"] for r in results["steps"]]
            values = [np.nan if r["miou"][convention][group] is None else 100 * r["miou"][convention][group]
                      for r in results["steps"]]
            ax.plot(steps, values, marker="o", label=label)
        ax.set_title(f"mIoU {group}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if runs:
            ax.set_xticks([r["step"] for r in runs[0][1]["steps"]])
    axes[0].set_ylabel(f"mIoU % ({convention.replace('_', ' ')})")
    axes[-1].legend(loc="best", fontsize=8)
    _save_figure(fig, path)


def write_run_reports(results: dict, run_dir: str | Path) -> None:
    run_dir = Path(run_dir)
    write_text(run_dir / "results.csv", to_csv(step_rows(results)))
    write_text(run_dir / "summary.md", summary_markdown(results))
    plot_miou([(results["method"], results)], run_dir / "miou_per_step.png")


def comparison_markdown(runs: Sequence[tuple[str, dict]]) -> str:
    """Old / new / all mIoU after the last step of each run, both conventions."""
    lines = [
        "| method | old | new | all | old (w/ bg) | new (w/ bg) | all (w/ bg) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, results in runs:
        last = results["steps"][-1]["miou"]
        wo, wi = last["without_background"], last["with_background"]
        lines.append(f"| {label} | {_pct(wo['old'])} | {_pct(wo['new'])} | {_pct(wo['all'])} | "
                     f"{_pct(wi['old'])} | {_pct(wi['new'])} | {_pct(wi['all'])} |")
    return "\n".join(lines) + "\n"


def comparison_rows(runs: Sequence[tuple[str, dict]]) -> list[dict]:
    rows = []
    for label, results in runs:
        for record in results["steps"]:
            row = {"method": label, "step": record["step"]}
            for conv in CONVENTIONS:
                for group in GROUPS:
                    row[f"miou_{group}_{conv}"] = record["miou"][conv][group]
            rows.append(row)
    return rows


@torch.no_grad()
def write_predictions(model, val_set, seen: Sequence[int], palette, device, path: Path, num_images: int = 4) -> None:
    """A picture of the first ``num_images`` validation images: image | ground truth | prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    n = min(num_images, len(val_set))
    if n == 0:
        return
    # model-space ids -> dataset ids, so the dataset's palette colours them
    to_dataset = np.full(256, 255, dtype=np.uint8)
    to_dataset[: len(seen)] = seen
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for row in range(n):
        image, target = val_set[row]
        pred = model(image[None].to(device)).logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        shown = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        panels = [shown, colorize(to_dataset[target.numpy().astype(np.uint8)], palette),
                  colorize(to_dataset[pred], palette)]
        for ax, panel, title in zip(axes[row], panels, ("image", "ground truth", "prediction")):
            ax.imshow(panel)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    _save_figure(fig, path)


# ----------------------------------------------------------------------------- several runs
def load_results(run_dir: str | Path) -> dict:
    import json

    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a run directory written by `ucdseg run`")
    results = json.loads(path.read_text())
    if not results.get("steps"):
        raise ValueError(f"{path} has no finished step yet")
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(results_list: Sequence[dict]) -> list[dict]:
    """Group runs by benchmark and method; mean and standard deviation over seeds of the last step.

    Each row: dataset, task, setting, method, seeds, and for every convention and group
    ``{conv}_{group}_mean`` / ``_std`` (fractions; ``None`` where undefined), plus the mean curve
    of mIoU per step (``curve``, all classes, without background).
    """
    groups: dict[tuple, list[dict]] = {}
    for results in results_list:
        task = results["task"]
        key = (task["dataset"], task["name"], task["setting"], results["method"])
        groups.setdefault(key, []).append(results)
    rows = []
    for (dataset, task, setting, method), runs in groups.items():
        row: dict = {"dataset": dataset, "task": task, "setting": setting, "method": method,
                     "seeds": sorted(r["seed"] for r in runs)}
        for conv in CONVENTIONS:
            for group in GROUPS:
                values = [r["steps"][-1]["miou"][conv][group] for r in runs]
                values = [v for v in values if v is not None]
                mean, std = _mean_std(values) if values else (None, None)
                row[f"{conv}_{group}_mean"], row[f"{conv}_{group}_std"] = mean, std
        length = min(len(r["steps"]) for r in runs)
        row["curve"] = [float(np.mean([r["steps"][i]["miou"]["without_background"]["all"] or 0.0 for r in runs]))
                        for i in range(length)]
        rows.append(row)
    return rows


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def aggregate_markdown(rows: Sequence[dict], paper: bool = False) -> str:
    from .paper import paper_value

    head = "| benchmark | method | seeds | old | new | all | old (w/ bg) | new (w/ bg) | all (w/ bg) |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    if paper:
        head, sep = head + " paper old/new/all |", sep + "---|"
    lines = ["mIoU (%) after the last step, mean ± standard deviation over seeds.", "", head, sep]
    for row in rows:
        cells = [f"{row['dataset']} {row['task']} {row['setting']}", row["method"],
                 ",".join(map(str, row["seeds"]))]
        for conv in CONVENTIONS:
            cells += [_pm(row[f"{conv}_{g}_mean"], row[f"{conv}_{g}_std"]) for g in GROUPS]
        if paper:
            value = paper_value(row["dataset"], row["task"], row["setting"], row["method"])
            cells.append("/".join(f"{v:.1f}" for v in value) if value else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate_csv(rows: Sequence[dict]) -> str:
    flat = [{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()} for row in rows]
    return to_csv(flat)


def plot_aggregate(rows: Sequence[dict], path: Path) -> None:
    """mIoU (all classes, without background) per step, one line per method, one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = sorted({(r["dataset"], r["task"], r["setting"]) for r in rows})
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5 * len(benchmarks), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks):
        for row in rows:
            if (row["dataset"], row["task"], row["setting"]) == bench:
                ax.plot(range(len(row["curve"])), [100 * v for v in row["curve"]], marker="o", label=row["method"])
        ax.set_title(" ".join(bench))
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU all (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_figure(fig, path)


def write_aggregate(run_dirs: Sequence[str | Path], out_dir: str | Path, paper: bool = False) -> str:
    rows = aggregate([load_results(d) for d in run_dirs])
    out_dir = Path(out_dir)
    table = aggregate_markdown(rows, paper=paper)
    write_text(out_dir / "report.md", table)
    write_text(out_dir / "report.csv", aggregate_csv(rows))
    plot_aggregate(rows, out_dir / "report.png")
    return table
