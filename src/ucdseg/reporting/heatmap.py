"""The forgetting map: per-class IoU after every step, the picture papers of this field draw.

Rows are the classes in the order the run learned them (step 0's first, the benchmark's *old*
classes, above a thick line; the classes of each later step below, a thin line between steps),
columns the steps; each cell is the class's IoU (%) after that step, blank (light grey) before
the class is learned. The cell where a class was learned (step 0 for the old classes) is boxed:
it is the value forgetting is measured from. A last column gives ``last - learned``, the change
since then (red: forgotten), so the map reads at 151 classes as well as at 21, where the cells
also carry their values.

:func:`forgetting_matrix` reads one run's ``results.json`` content; :func:`mean_matrix` averages
seeds of one experiment; :func:`plot_forgetting` draws one panel per run or method
(``forgetting.png`` of a run); :func:`write_forgetting_maps` writes ``ucdseg report``'s, one per
benchmark (``report_forgetting.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import figures
from .pooling import group_runs
from .results import benchmark

__all__ = ["ForgettingMatrix", "forgetting_matrix", "mean_matrix", "plot_forgetting", "ANNOTATE_MAX_CLASSES",
           "forgetting_map_names", "write_forgetting_maps"]

ANNOTATE_MAX_CLASSES = 40  # cells carry their value up to this many classes


@dataclass
class ForgettingMatrix:
    """IoU (%) of each class (rows, learning order) after each step (columns); nan before it is learned."""

    names: list[str]
    values: np.ndarray  # (classes, steps), percent, nan where unseen or undefined
    learned: np.ndarray  # (classes,) the step at which each class was learned
    num_old: int  # rows of step 0's classes (the benchmark's old classes)

    @property
    def change(self) -> np.ndarray:
        """``last - learned`` per class (nan when either is undefined, or the class was learned at the
        last step)."""
        rows = np.arange(len(self.names))
        change = self.values[:, -1] - self.values[rows, self.learned]
        return np.where(self.learned == self.values.shape[1] - 1, np.nan, change)


def forgetting_matrix(results: dict) -> ForgettingMatrix:
    """The matrix of one run (its finished steps); a class never scored (ADE20K's and Cityscapes'
    background) is left out."""
    steps = results["steps"]
    if not steps:
        raise ValueError("the run has no finished step: nothing to draw")
    names_all = results["class_names"]
    order = [c for record in steps for c in record["classes"]]  # learning order, dataset ids
    values = np.full((len(order), len(steps)), np.nan)
    learned = np.zeros(len(order), dtype=int)
    row = 0
    for t, record in enumerate(steps):
        for c in record["classes"]:
            learned[row] = t
            row += 1
        for i, c in enumerate(order):
            value = record["per_class_iou"].get(names_all[c])
            if value is not None and learned[i] <= t and i < row:
                values[i, t] = 100 * value
    keep = ~np.all(np.isnan(values), axis=1)
    num_old = int(keep[: len(steps[0]["classes"])].sum())
    return ForgettingMatrix([names_all[c] for c, k in zip(order, keep) if k], values[keep], learned[keep], num_old)


def mean_matrix(matrices: Sequence[ForgettingMatrix]) -> ForgettingMatrix:
    """The cell-wise mean of the matrices of several seeds (same classes and steps)."""
    first = matrices[0]
    for other in matrices[1:]:
        if other.names != first.names or other.values.shape != first.values.shape:
            raise ValueError("seeds of one experiment with different classes or steps cannot be averaged")
    stack = np.stack([m.values for m in matrices])
    with np.errstate(all="ignore"):
        counts = np.sum(~np.isnan(stack), axis=0)
        mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
    return ForgettingMatrix(list(first.names), mean, first.learned.copy(), first.num_old)


def _step_bounds(learned: np.ndarray) -> list[int]:
    """Row indices where a new step's classes begin (after the first)."""
    return [i for i in range(1, len(learned)) if learned[i] != learned[i - 1]]


def plot_forgetting(panels: Sequence[tuple[str, ForgettingMatrix]], path: str | Path, title: str = "") -> None:
    """One heatmap panel per ``(label, matrix)``, class names on the left, and per panel a
    ``last - learned`` column; written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle


    if not panels:
        raise ValueError("no run to draw")
    n_classes = len(panels[0][1].names)
    many = n_classes > ANNOTATE_MAX_CLASSES
    row_h = 0.14 if many else 0.3  # inches per class
    name_pt = 6 if many else 8.5
    widest = max(len(n) for n in panels[0][1].names)
    name_w = 0.4 + widest * name_pt / 72 * 0.6
    col_w = 0.42 if many else 0.6
    panel_w = [col_w * (m.values.shape[1] + 1) + 0.35 for _, m in panels]
    width = name_w + sum(panel_w) + 1.7
    height = 1.6 + row_h * n_classes
    fig = plt.figure(figsize=(width, height))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    diverging = plt.get_cmap("RdBu").with_extremes(bad="#eeeeee")
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-100.0, vmax=100.0)
    top, bottom = 1 - 0.75 / height, 0.85 / height
    x0 = name_w / width
    image = None
    for k, (label, m) in enumerate(panels):
        steps = m.values.shape[1]
        w = panel_w[k] / width
        ax = fig.add_axes((x0, bottom, w * steps / (steps + 1) * 0.94, top - bottom))
        dx = fig.add_axes((x0 + w * steps / (steps + 1) * 0.97, bottom, w / (steps + 1) * 0.9, top - bottom),
                          sharey=ax)
        x0 += w
        image = ax.imshow(np.ma.masked_invalid(m.values), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                          interpolation="nearest")
        change = m.change[:, None]
        dx.imshow(np.ma.masked_invalid(change), cmap=diverging, norm=norm, aspect="auto", interpolation="nearest")
        for i, t in enumerate(m.learned):  # the value forgetting is measured from
            ax.add_patch(Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=0.8 if many else 1.4))
        for bound in _step_bounds(m.learned):
            thick = bound == m.num_old
            for a in (ax, dx):
                a.axhline(bound - 0.5, color="black" if thick else "white", linewidth=2.2 if thick else 0.8)
        if not many:
            for i in range(n_classes):
                for t in range(steps):
                    v = m.values[i, t]
                    if not np.isnan(v):
                        ax.text(t, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                                color="black" if v > 60 else "white")
                c = change[i, 0]
                if not np.isnan(c):
                    dx.text(0, i, f"{c:+.0f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(c) > 60 else "black")
        ax.set_xticks(range(steps))
        ax.set_xticklabels([str(t) for t in range(steps)], fontsize=8)
        ax.set_xlabel("after step", fontsize=8)
        ax.set_title(label, fontsize=9)
        dx.set_xticks([0])
        dx.set_xticklabels(["last -\nlearned"], fontsize=7)
        dx.tick_params(axis="y", left=False, labelleft=False)
        ax.set_yticks(range(n_classes))
        if k == 0:
            ax.set_yticklabels(m.names, fontsize=name_pt)
        else:
            ax.tick_params(axis="y", left=False, labelleft=False)
        for a in (ax, dx):
            a.tick_params(length=0)
        if k == len(panels) - 1:  # name the two groups right of the last panel, beside the line
            groups = [("old: step 0", 0, m.num_old)] + ([("new", m.num_old, n_classes)] if m.num_old < n_classes else [])
            for text, start, end in groups:
                dx.annotate(text, xy=(1.02, 1 - (start + end) / 2 / n_classes), xycoords="axes fraction",
                            rotation=90, ha="left", va="center", fontsize=8, fontweight="bold")
    bar_h = min(top - bottom, 4.0 / height)
    cax = fig.add_axes((x0 + 0.45 / width, top - bar_h, 0.12 / width, bar_h))
    fig.colorbar(image, cax=cax).set_label("IoU (%)", fontsize=8)
    cax.tick_params(labelsize=7)
    note = ("boxed: the IoU when the class was learned; grey: not learned yet; "
            "last - learned: red = forgotten")
    fig.text(0.01, 0.12 / height, note, fontsize=7, ha="left", va="bottom", color="#444444")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.2 / height, va="top")
    figures.save_figure(fig, Path(path))


def forgetting_map_names(results_list: Sequence[dict]) -> dict[tuple[str, str, str], str]:
    """The file of each benchmark's forgetting map in a report: ``report_forgetting.png`` for one
    benchmark, ``report_forgetting_<dataset>-<task>-<setting>.png`` for several."""
    benchmarks = sorted({benchmark(r) for r in results_list})
    if len(benchmarks) == 1:
        return {benchmarks[0]: "report_forgetting.png"}
    return {b: f"report_forgetting_{'-'.join(b)}.png" for b in benchmarks}


def write_forgetting_maps(results_list: Sequence[dict], out_dir: Path) -> list[Path]:
    """Per benchmark, the forgetting map (:func:`plot_forgetting`) with one panel per row of the
    report (method, weights and config), averaged over its seeds; one-step runs (joint training)
    are left out of a benchmark of several steps: they forget nothing."""
    panels: dict[tuple, list] = {}
    for (dataset, task, setting, label), runs in group_runs(results_list).items():
        panels.setdefault((dataset, task, setting), []).append((label, runs))
    written = []
    for bench, name in forgetting_map_names(results_list).items():
        steps = max(len(r["steps"]) for _, runs in panels[bench] for r in runs)
        drawn = []
        for label, runs in panels[bench]:
            if steps > 1 and len(runs[0]["steps"]) == 1:
                continue
            try:
                drawn.append((f"{label} (n={len(runs)})", mean_matrix([forgetting_matrix(r) for r in runs])))
            except (KeyError, TypeError, ValueError):  # results without per-class IoU (written by hand)
                continue
        if drawn:
            plot_forgetting(drawn, out_dir / name, title=f"{' '.join(bench)}: per-class IoU (%) after each step, "
                                                          "mean over the seeds")
            written.append(out_dir / name)
    return written
