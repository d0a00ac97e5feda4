"""The reports as curves: mIoU (old, new, all) per step, one curve per run or method.

:func:`plot_miou` draws runs (a run's ``miou_per_step.png``, ``ucdseg demo``'s comparison),
:func:`plot_aggregate` the pooled rows of ``ucdseg report`` (``report.png``). Paired methods stay
visible where they overlap (:func:`_curve_styles`); joint training is a horizontal line.
Matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .. import figures
from .results import GROUPS, base_method, method_name

_LINE_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def _curve_styles(labels: Sequence[str]) -> dict[str, dict]:
    """Matplotlib keywords per curve label, so that paired methods stay visible when they overlap:
    one colour per base method (``mib`` and ``mib+ucd`` share it), within it a line style and
    marker per variant (``X`` solid with circles, ``X+ucd`` dashed with crosses, other weights
    dash-dotted, ...), and a small horizontal offset per variant (``dx``, in steps) so that equal
    values are drawn side by side rather than on top of each other."""
    variants: dict[str, list[str]] = {}  # base method -> its labels, in order
    for label in labels:
        members = variants.setdefault(base_method(label), [])
        if label not in members:
            members.append(label)
    styles = {}
    for i, (base, members) in enumerate(variants.items()):
        for k, label in enumerate(members):
            ucd = base != method_name(label)
            variant = 1 if (k == 0 and ucd) else k  # X+ucd without X: still dashed
            styles[label] = {"color": f"C{i % 10}", "linestyle": _LINE_STYLES[variant % len(_LINE_STYLES)],
                             "marker": "x" if ucd else "o", "dx": 0.06 * (k - (len(members) - 1) / 2)}
    return styles


def _draw_curve(ax, label: str, curve: Sequence[float], style: dict, num_steps: int) -> None:
    """A run's curve; a one-step run among longer ones (joint training) as a horizontal line at its
    level across the steps, the upper bound the others are read against."""
    keywords = {k: v for k, v in style.items() if k != "dx"}
    if len(curve) == 1 and num_steps > 1:
        ax.axhline(curve[0], color=keywords["color"], linestyle=":", linewidth=1.6, label=f"{label} (one step)")
        return
    x = np.arange(len(curve)) + style["dx"]
    ax.plot(x, curve, label=label, markersize=6 if keywords["marker"] == "x" else 4.5, linewidth=1.6,
            **keywords)


def plot_miou(runs: Sequence[tuple[str, dict]], path: Path, convention: str = "without_background") -> None:
    """mIoU (old, new, all) per step, one curve per run (styles of :func:`_curve_styles`; joint
    training as a horizontal line), the legend right of the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    styles = _curve_styles([label for label, _ in runs])
    num_steps = max((len(results["steps"]) for _, results in runs), default=0)
    for ax, group in zip(axes, GROUPS):
        for label, results in runs:
            values = [np.nan if r["miou"][convention][group] is None else 100 * r["miou"][convention][group]
                      for r in results["steps"]]
            _draw_curve(ax, label, values, styles[label], num_steps)
        ax.set_title(f"mIoU {group}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(f"mIoU % ({convention.replace('_', ' ')})")
    if runs:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    figures.save_figure(fig, path)


def plot_aggregate(rows: Sequence[dict], path: Path) -> None:
    """Mean mIoU (old, new, all; without background) per step: one row of panels per benchmark,
    one curve per method (:func:`_curve_styles`: ``X+ucd`` dashed in the colour of ``X``, other
    weights in other line styles, side by side), joint training (one step) as a dotted horizontal
    line at its score; the legend right of each row of panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = _curve_styles([row["method"] for row in rows])
    benchmarks = sorted({(r["dataset"], r["task"], r["setting"]) for r in rows})
    fig, axes = plt.subplots(len(benchmarks), len(GROUPS), figsize=(13, 3.6 * len(benchmarks)), squeeze=False)
    for panels, bench in zip(axes, benchmarks):
        bench_rows = [row for row in rows if (row["dataset"], row["task"], row["setting"]) == bench]
        num_steps = max(len(row["curves"]["all"]) for row in bench_rows)
        for ax, group in zip(panels, GROUPS):
            for row in bench_rows:
                _draw_curve(ax, row["method"], [100 * v for v in row["curves"][group]], styles[row["method"]],
                            num_steps)
            ax.set_title(f"{' '.join(bench)}: mIoU {group}")
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        panels[0].set_ylabel("mIoU % (without background)")
        panels[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    figures.save_figure(fig, path)
