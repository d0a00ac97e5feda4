"""Tables and plots of a run's ``results.json``, and of several runs (``ucdseg report``).

The reports read results files only: nothing here imports the engine. By job:

* :mod:`.results`: a run's results read back and checked (:func:`load_results`), its row's
  label (:func:`run_label`), its score after the last step;
* :mod:`.pooling`: which runs are seeds of one experiment (:func:`pooled_config`,
  :func:`check_distinct`), their mean and spread (:func:`aggregate`) and what UCD adds to its
  base method, paired by seed (:func:`ucd_gains`; the arithmetic is :mod:`ucdseg.stats`);
* :mod:`.tables`: Markdown and CSV (``results.csv``, ``summary.md``, ``report.md``, ...);
* :mod:`.paper`: the comparison with the published numbers (``ucdseg report --paper``);
* :mod:`.plots`: mIoU per step (``miou_per_step.png``, ``report.png``);
* :mod:`.heatmap`: the forgetting map (``forgetting.png``, ``report_forgetting.png``);
* :mod:`.files`: the files of a run's reports (:func:`write_run_reports`) and of a report over
  runs (:func:`write_aggregate`).

The prediction figure a run draws after each step is :func:`ucdseg.figures.write_predictions`
(re-exported here); every figure is written through :func:`ucdseg.figures.save_figure`.
"""

from ..figures import write_predictions
from .files import write_aggregate, write_run_reports
from .heatmap import (ForgettingMatrix, forgetting_map_names, forgetting_matrix, mean_matrix, plot_forgetting,
                      write_forgetting_maps)
from .plots import plot_aggregate, plot_miou
from .pooling import LOCATION_KEYS, aggregate, check_distinct, pooled_config, ucd_gains
from .results import CONVENTIONS, GROUPS, SUMMARIES, load_results, run_label
from .tables import (aggregate_csv, aggregate_markdown, comparison_markdown, comparison_rows, step_rows,
                     summary_markdown, to_csv, ucd_gains_markdown)

__all__ = ["CONVENTIONS", "GROUPS", "SUMMARIES", "LOCATION_KEYS", "load_results", "run_label", "pooled_config",
           "check_distinct", "aggregate", "ucd_gains", "step_rows", "to_csv", "summary_markdown",
           "comparison_markdown", "comparison_rows", "aggregate_markdown", "ucd_gains_markdown", "aggregate_csv",
           "plot_miou", "plot_aggregate", "ForgettingMatrix", "forgetting_matrix", "mean_matrix", "plot_forgetting",
           "forgetting_map_names", "write_forgetting_maps", "write_run_reports", "write_aggregate",
           "write_predictions"]
