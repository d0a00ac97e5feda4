"""The files of the reports: a run's own, and those of ``ucdseg report``.

:func:`write_run_reports` writes a run folder's ``results.csv``, ``summary.md``,
``miou_per_step.png`` and ``forgetting.png`` (``ucdseg run``, ``ucdseg.run`` and ``ucdseg demo``
pass it to the engine, which calls it when the run's last step is done);
:func:`write_aggregate` writes the report over several run folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..io import write_text
from .heatmap import forgetting_matrix, plot_forgetting, write_forgetting_maps
from .plots import plot_aggregate, plot_miou
from .pooling import aggregate, check_distinct, ucd_gains
from .results import load_results
from .tables import aggregate_csv, aggregate_markdown, step_rows, summary_markdown, to_csv, ucd_gains_markdown


def write_run_reports(results: dict, run_dir: str | Path) -> None:
    """``results.csv``, ``summary.md``, ``miou_per_step.png`` and the forgetting map ``forgetting.png``."""
    run_dir = Path(run_dir)
    write_text(run_dir / "results.csv", to_csv(step_rows(results)))
    write_text(run_dir / "summary.md", summary_markdown(results))
    plot_miou([(results["method"], results)], run_dir / "miou_per_step.png")
    if results["steps"]:
        task = results["task"]
        plot_forgetting([(results["method"], forgetting_matrix(results))], run_dir / "forgetting.png",
                        title=f"{results['method']} on {task['dataset']} {task['name']} ({task['setting']}), seed "
                              f"{results['seed']}: per-class IoU (%) after each step")


def _check_output_dir(out_dir: Path) -> None:
    """The report folder, or the nearest of its parents that exists, must be a folder."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "is" if folder == out_dir else f"cannot be made: {folder} is"
                raise ValueError(f"report folder {out_dir} {where} a file, not a folder; give --output-dir a folder")
            return


def write_aggregate(run_dirs: Sequence[str | Path], out_dir: str | Path, paper: bool = False) -> str:
    """``report.md``, ``report.csv``, ``report.png`` and the forgetting map ``report_forgetting.png``
    (:func:`write_forgetting_maps`) in *out_dir*; with a ``X+ucd`` run beside its ``X``, the paired
    UCD gains too (a second table in ``report.md``, ``report_ucd.csv``).

    What is pooled: one row per benchmark, method (with its loss weights) and config, averaged over
    the seeds. Runs whose configs differ in anything but the seed and :data:`~.pooling.LOCATION_KEYS` (where a
    run or its inputs are stored and how the same computation is carried out) are not pooled: they
    land in separate rows labelled by the keys that differ (``mib (train.iterations=40)``), so a
    sweep can be reported in one table. The same run given twice (the same folder, or two folders
    holding the same method, weights, config and seed) is refused with one line naming both.
    Nothing is written unless every run is readable and distinct.
    """
    out_dir = Path(out_dir)
    _check_output_dir(out_dir)
    given: dict[Path, str] = {}
    for run_dir in run_dirs:
        resolved = Path(run_dir).resolve()
        if resolved in given:
            raise ValueError(f"run folder {run_dir} is given twice (as {given[resolved]} and {run_dir}); "
                             "give each run once")
        given[resolved] = str(run_dir)
    results_list = [load_results(d) for d in run_dirs]
    check_distinct(results_list, [str(d) for d in run_dirs])
    rows = aggregate(results_list)
    gains = ucd_gains(results_list)
    table = aggregate_markdown(rows, paper=paper)
    if gains:
        table += "\n" + ucd_gains_markdown(gains)
    try:
        if gains:
            write_text(out_dir / "report_ucd.csv", aggregate_csv(gains))
        write_text(out_dir / "report.md", table)
        write_text(out_dir / "report.csv", aggregate_csv(rows))
        plot_aggregate(rows, out_dir / "report.png")
        write_forgetting_maps(results_list, out_dir)
    except OSError as exc:
        where = exc.filename or out_dir
        raise ValueError(f"cannot write the report in {out_dir}: {where}: {exc.strerror or exc}") from None
    return table
