"""The figures a reader looks at (issue 24, items 6 and 9): the forgetting map at 21 and 151 classes,
the comparison figure (joint as a line, paired methods side by side, the legend outside the
curves) and the titled prediction figures.

Results are synthetic (per-class IoU made here, a known value per class and step), so what each
cell must show is known. Figures are checked twice: as drawn (the matplotlib figure, taken just
before it is saved) and as files (size, and that every class has a row of pixels of its own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg import figures, reporting
from ucdseg.data.ade import ADE20KSegmentation
from ucdseg.data.voc import VOCSegmentation
from ucdseg.reporting.heatmap import forgetting_matrix, mean_matrix, plot_forgetting
from ucdseg.tasks import get_task

ADE_META, VOC_META = ADE20KSegmentation.meta, VOCSegmentation.meta

DPI = 110  # figures.save_figure


def synthetic(dataset: str, task_name: str, names, score_background: bool = True, seed: int = 0,
              method: str = "mib+ucd") -> dict:
    """IoU of class c after step t: (c % 50 + 40 - 5 * (t - learned)) / 100, None before it is learned."""
    task = get_task(dataset, task_name)
    steps = []
    for t, classes in enumerate(task.steps):
        per = {}
        for c in task.seen(t):
            learned = next(s for s, cl in enumerate(task.steps) if c in cl)
            per[names[c]] = None if (c == 0 and not score_background) else (c % 50 + 40 - 5 * (t - learned) + seed) / 100
        for c in [c for s in task.steps[t + 1:] for c in s]:
            per[names[c]] = None
        miou = {"old": 0.5, "new": 0.3, "all": 0.4}
        steps.append({"step": t, "classes": classes, "seen": task.seen(t), "per_class_iou": per, "pixel_accuracy": 0.9,
                      "miou": {"with_background": miou, "without_background": miou}})
    return {"method": method, "seed": seed, "weights": {}, "class_names": list(names), "steps": steps,
            "task": {"dataset": dataset, "name": task_name, "setting": "overlapped", "steps": task.steps}}


@pytest.fixture
def drawn(monkeypatch):
    """The figures as drawn: figures.save_figure (which every figure goes through) records each
    before writing it."""
    drawn = []
    original = figures.save_figure

    def keep(fig, path):
        drawn.append(fig)
        original(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return drawn


# ------------------------------------------------------------------------------------ forgetting map
def test_the_matrix_holds_each_class_in_learning_order_and_nothing_before_it_is_learned():
    results = synthetic("voc", "15-1", VOC_META.class_names)
    m = forgetting_matrix(results)
    assert m.names == list(VOC_META.class_names) and m.num_old == 16  # background + 15, then 1 per step
    assert m.values.shape == (21, 6)
    assert list(m.learned) == [0] * 16 + [1, 2, 3, 4, 5]
    for c in range(21):
        for t in range(6):
            learned = m.learned[c]
            expected = np.nan if t < learned else c % 50 + 40 - 5 * (t - learned)
            np.testing.assert_allclose(m.values[c, t], expected)
    np.testing.assert_allclose(m.change[:16], -25.0)  # 5 steps of -5
    assert np.isnan(m.change[20])  # learned at the last step: no change to show
    # ADE20K: background is never scored, so it has no row
    ade = forgetting_matrix(synthetic("ade", "100-10", ADE_META.class_names, score_background=False))
    assert ade.names == list(ADE_META.class_names[1:]) and ade.num_old == 100 and ade.values.shape == (150, 6)
    # seeds of one experiment: the cell-wise mean
    mean = mean_matrix([forgetting_matrix(synthetic("voc", "15-1", VOC_META.class_names, seed=s)) for s in (0, 2)])
    np.testing.assert_allclose(mean.values[:16, 0], [c + 40 + 1 for c in range(16)])


@pytest.mark.parametrize("dataset, task, meta, classes, min_row_px", [
    ("voc", "15-1", VOC_META, 21, 30), ("ade", "100-10", ADE_META, 151, 14)])
def test_the_map_is_drawn_per_class_and_legible(dataset, task, meta, classes, min_row_px, tmp_path, drawn):
    results = synthetic(dataset, task, meta.class_names)
    path = tmp_path / "forgetting.png"
    plot_forgetting([("mib+ucd", forgetting_matrix(results))], path, title="a title")
    (fig,) = drawn
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.shape == (classes, 6)  # one row per class, one column per step
    assert [t.get_text() for t in ax.get_yticklabels()] == list(meta.class_names)  # every class named
    np.testing.assert_allclose(np.ma.filled(image, np.nan), forgetting_matrix(results).values)
    # the value forgetting is measured from is boxed, once per class (step 0 for the old classes)
    boxes = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches]
    assert sorted(boxes) == sorted((float(t), float(c)) for c, t in enumerate(forgetting_matrix(results).learned))
    # old classes above a thick line
    num_old = len(get_task(dataset, task).steps[0])
    thick = [line for line in ax.lines if line.get_linewidth() > 2]
    assert [line.get_ydata()[0] for line in thick] == [num_old - 0.5]
    # values written in the cells only when they stay legible
    assert (len(ax.texts) > 0) == (classes <= 40)
    # the file: a PNG whose height gives each class a row of min_row_px pixels or more
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert height / classes >= min_row_px and 500 <= width <= 1500
    assert path.stat().st_size > 20_000
    # the rows are drawn: down the first column of cells, the colour changes from class to class
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    box = ax.get_window_extent()  # in display pixels at the figure's dpi, before bbox_inches="tight" cropping
    x = int(box.x0 + box.width / 12)  # the middle of step 0's column
    column = pixels[:, min(max(x, 0), width - 1)]
    changes = np.count_nonzero(np.abs(np.diff(column, axis=0)).sum(axis=1) > 30)
    assert changes >= num_old  # every old class's cell differs from the one above


def test_report_and_run_write_the_forgetting_maps(tmp_path):
    runs = []
    for method in ("mib", "mib+ucd"):
        for seed in (0, 1):
            run_dir = tmp_path / f"{method}-{seed}"
            results = synthetic("voc", "15-1", VOC_META.class_names, seed=seed, method=method)
            results["config"] = {"seed": seed, "method": {"name": method}}
            run_dir.mkdir()
            (run_dir / "results.json").write_text(__import__("json").dumps(results))
            runs.append(run_dir)
    reporting.write_aggregate(runs, tmp_path / "report")
    with Image.open(tmp_path / "report" / "report_forgetting.png") as png:
        assert png.height / 21 >= 30
    reporting.write_run_reports(synthetic("voc", "15-1", VOC_META.class_names), tmp_path / "one")
    assert (tmp_path / "one" / "forgetting.png").stat().st_size > 20_000


# ------------------------------------------------------------------------------------ comparison figure
def curve_run(method: str, values: list[tuple]) -> tuple[str, dict]:
    steps = [{"step": t, "classes": [t], "miou": {conv: {"old": o / 100, "new": None if n is None else n / 100,
                                                         "all": a / 100} for conv in reporting.CONVENTIONS}}
             for t, (o, n, a) in enumerate(values)]
    return method, {"method": method, "steps": steps}


def test_comparison_figure_draws_joint_as_a_line_and_both_methods_of_a_pair(tmp_path, drawn):
    same = [(64.9, None, 64.9), (60.0, 25.0, 40.0), (56.3, 22.3, 35.9)]
    runs = [curve_run("ft", [(64.9, None, 64.9), (10, 30, 20), (0, 11.5, 6.9)]), curve_run("mib", same),
            curve_run("mib+ucd", same), curve_run("joint", [(70, 50, 61.2)])]
    reporting.plot_miou(runs, tmp_path / "comparison.png")
    (fig,) = drawn
    ax_all = fig.axes[2]
    lines = {line.get_label(): line for line in ax_all.lines}
    # joint: a horizontal line across the panel at its level, not a point at step 0
    joint = lines["joint (one step)"]
    np.testing.assert_allclose(joint.get_ydata(), [61.2, 61.2])
    ends = joint.get_transform().transform(np.column_stack([joint.get_xdata(), joint.get_ydata()]))
    box = ax_all.get_window_extent()
    np.testing.assert_allclose(ends[:, 0], [box.x0, box.x1])  # from the left edge of the panel to the right
    # the pair: same colour, another line style and marker, drawn side by side
    mib, ucd = lines["mib"], lines["mib+ucd"]
    assert mib.get_color() == ucd.get_color() and mib.get_linestyle() != ucd.get_linestyle()
    assert mib.get_marker() != ucd.get_marker()
    assert np.all(ucd.get_xdata() - mib.get_xdata() > 0.05) and list(mib.get_ydata()) == list(ucd.get_ydata())
    # the legend right of the last panel, outside every curve
    fig.canvas.draw()
    legend = ax_all.get_legend().get_window_extent()
    assert legend.x0 >= ax_all.get_window_extent().x1
    assert [t.get_text() for t in ax_all.get_legend().get_texts()] == ["ft", "mib", "mib+ucd", "joint (one step)"]


def test_prediction_figures_carry_the_run_method_and_step(tmp_path, drawn, tiny_benchmark, tiny_model):
    import torch

    from ucdseg.data import eval_transforms
    from ucdseg.data.base import StepDataset, build_dataset
    from ucdseg.label_maps import eval_lut
    from ucdseg.models import build_model

    val = build_dataset("embedded", tiny_benchmark, "val")
    task = get_task("embedded", "8-2")
    data = StepDataset(val, range(2), eval_lut(task, 1, ignore_background=False, unseen="ignore"),
                       eval_transforms(None))
    model = build_model("tiny", task.classes_per_step, output_stride=16)
    reporting.write_predictions(model, data, task.seen(1), val.meta.palette, torch.device("cpu"), tmp_path / "p.png",
                                num_images=2, class_names=val.meta.class_names, title="run-a: mib+ucd, after step 1")
    (fig,) = drawn
    assert fig._suptitle.get_text() == "run-a: mib+ucd, after step 1"
