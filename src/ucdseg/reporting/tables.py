"""The reports as tables: Markdown for reading, CSV for a spreadsheet.

A run's own (:func:`step_rows`, ``results.csv``; :func:`summary_markdown`, ``summary.md``), a
comparison of runs (:func:`comparison_markdown`, ``ucdseg demo``) and the pooled rows of
``ucdseg report`` (:func:`aggregate_markdown` with mean ± std, :func:`ucd_gains_markdown` with the
paired gains, :func:`aggregate_csv`).
"""

from __future__ import annotations

import csv
import io
from typing import Sequence

from ..stats import average_over_steps
from . import paper as _paper
from .results import CONVENTIONS, GROUPS, SUMMARIES, final


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def step_rows(results: dict) -> list[dict]:
    """One flat row per step: mIoU groups in both conventions, pixel accuracy, per-class IoU."""
    names = results["class_names"]
    rows = []
    for i, record in enumerate(results["steps"]):
        row = {"step": record["step"], "new_classes": " ".join(names[c] for c in record["classes"])}
        avg = average_over_steps(results["steps"][: i + 1])  # over the steps so far: the run's at the last one
        for conv in CONVENTIONS:
            for group in GROUPS:
                row[f"miou_{group}_{conv}"] = record["miou"][conv][group]
            row[f"miou_avg_{conv}"] = avg[conv]
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
        avg = average_over_steps(results["steps"])
        lines += ["", f"avg (the mean over the {len(results['steps'])} steps of mIoU all): "
                      f"{_pct(avg['without_background'])} (without background), "
                      f"{_pct(avg['with_background'])} (with background)"]
        last = results["steps"][-1]
        lines += ["", f"Per-class IoU (%) after step {last['step']}:", "",
                  "| class | IoU |", "|---|---|"]
        lines += [f"| {name} | {_pct(v)} |" for name, v in last["per_class_iou"].items()]
    return "\n".join(lines) + "\n"


def _summary_head() -> tuple[str, str]:
    """Header cells of :data:`SUMMARIES` in both conventions, and the separator cells."""
    cells = [group + (" (w/ bg)" if conv == "with_background" else "") for conv in CONVENTIONS for group in SUMMARIES]
    return " | ".join(cells), "|".join(["---"] * len(cells))


def comparison_markdown(runs: Sequence[tuple[str, dict]]) -> str:
    """Old / new / all mIoU after the last step of each run and avg over the steps, both conventions."""
    head, sep = _summary_head()
    lines = [f"| method | {head} |", f"|---|{sep}|"]
    for label, results in runs:
        lines.append(f"| {label} | " + " | ".join(_pct(final(results, conv, group))
                                                 for conv in CONVENTIONS for group in SUMMARIES) + " |")
    return "\n".join(lines) + "\n"


def comparison_rows(runs: Sequence[tuple[str, dict]]) -> list[dict]:
    rows = []
    for label, results in runs:
        for i, record in enumerate(results["steps"]):
            row = {"method": label, "step": record["step"]}
            avg = average_over_steps(results["steps"][: i + 1])
            for conv in CONVENTIONS:
                for group in GROUPS:
                    row[f"miou_{group}_{conv}"] = record["miou"][conv][group]
                row[f"miou_avg_{conv}"] = avg[conv]
            rows.append(row)
    return rows


def _pm(mean: float | None, std: float | None) -> str:
    """``57.3 ± 1.2``; the mean alone for one seed (``std`` None); a spread that rounds to 0.0 with
    two decimals (``± 0.03``, ``± <0.01``), and ``± 0`` only for seeds that agree exactly."""
    if mean is None:
        return "-"
    if std is None:
        return f"{100 * mean:.1f}"
    spread = 100 * std
    if spread >= 0.05:
        text = f"{spread:.1f}"
    elif spread >= 0.005:
        text = f"{spread:.2f}"
    else:
        text = "0" if spread == 0 else "<0.01"
    return f"{100 * mean:.1f} ± {text}"


_TABLE_HEAD = "| benchmark | method | seeds | n | " + _summary_head()[0] + " |"
_TABLE_SEP = "|---|---|---|---:|" + _summary_head()[1] + "|"


def _table_cells(row: dict, method: str, cell) -> list[str]:
    """A table line's cells: benchmark, *method*, seeds, n, then ``cell(conv, group)`` per column."""
    return ([f"{row['dataset']} {row['task']} {row['setting']}", method, ",".join(map(str, row["seeds"])),
             str(len(row["seeds"]))] + [cell(conv, group) for conv in CONVENTIONS for group in SUMMARIES])


def aggregate_markdown(rows: Sequence[dict], paper: bool = False) -> str:
    """The pooled rows (:func:`~.pooling.aggregate`) as mean ± std per column; ``paper``: a last
    column with the published numbers (:mod:`.paper`)."""
    head, sep = _TABLE_HEAD, _TABLE_SEP
    if paper:
        head, sep = head + _paper.HEAD, sep + _paper.SEP
    lines = ["mIoU (%) after the last step, and avg (the mean over the steps of mIoU all): mean ± sample standard "
             "deviation over the n seeds (the value alone when n = 1).", "", head, sep]
    for row in rows:
        cells = _table_cells(row, row["method"], lambda conv, g: _pm(row[f"{conv}_{g}_mean"], row[f"{conv}_{g}_std"]))
        if paper:
            cells.append(_paper.cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _signed(mean: float | None, ci95: float | None, wins: int, n: int) -> str:
    if mean is None:
        return "-"
    interval = "" if ci95 is None else f" [{100 * (mean - ci95):+.2f}, {100 * (mean + ci95):+.2f}]"
    return f"{100 * mean:+.2f}{interval} ({wins}/{n})"


def ucd_gains_markdown(rows: Sequence[dict]) -> str:
    lines = ["UCD over its base method, paired by seed: the mean of (X+ucd) - X in mIoU points after the "
             "last step, its 95 % confidence interval in square brackets (Student's t over the seeds), and "
             "in brackets the seeds where UCD is higher.", "", _TABLE_HEAD, _TABLE_SEP]
    for row in rows:
        n = len(row["seeds"])
        cells = _table_cells(row, f"{row['method']} - {row['base']}", lambda conv, g: _signed(
            row[f"{conv}_{g}_mean"], row[f"{conv}_{g}_ci95"], row[f"{conv}_{g}_wins"], n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate_csv(rows: Sequence[dict]) -> str:
    """One line per row; lists joined by spaces, the curves as ``curve_old`` / ``_new`` / ``_all``."""
    def flat(row: dict) -> dict:
        row = {k: v for k, v in row.items() if k != "curves"} | {
            f"curve_{group}": curve for group, curve in row.get("curves", {}).items()}
        return {k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()}

    return to_csv([flat(row) for row in rows])
