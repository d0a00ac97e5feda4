"""A run's ``results.json`` as the reports read it: loaded and checked, and named.

:func:`load_results` reads a finished run (one-line errors naming the file); :func:`run_label`
names its row (the method and the loss weights that differ from its defaults); :func:`final` is
a run's score of one group after its last step (or ``avg``). The method registry says what a
method extends (:func:`base_method`) and the order of the rows (:func:`method_rank`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..stats import average_over_steps

CONVENTIONS = ("without_background", "with_background")
GROUPS = ("old", "new", "all")
# what a run is summarised by: the last step's groups, and "avg", the mean over the steps of mIoU
# all (PLOP, SSUL, RCIL report it)
SUMMARIES = GROUPS + ("avg",)


def load_results(run_dir: str | Path) -> dict:
    """The ``results.json`` of a finished run; a missing, truncated, corrupt or unfinished file is a
    one-line error naming it."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a run directory written by `ucdseg run`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: expected the JSON file `ucdseg run` writes") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is truncated or corrupt (invalid JSON at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}); expected the JSON file `ucdseg run` writes") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if isinstance(results, dict) and results.get("steps") == []:
        raise ValueError(f"{path} has no finished step yet")
    _check_results_shape(results, path)
    done, expected = len(results["steps"]), _expected_steps(results)
    if done < expected:
        raise ValueError(f"{path}: the run has finished {done} of its {expected} steps; finish it (run the same "
                         "command again) or leave it out of the report")
    return results


def _check_results_shape(results, path: Path) -> None:
    """The keys the report reads, each present with the right kind of value (a one-line error naming
    the first that is not)."""
    def fail(what: str) -> ValueError:
        return ValueError(f"{path} is not a results file of `ucdseg run`: {what}")

    if not isinstance(results, dict):
        raise fail(f"its top level is a {type(results).__name__}, expected an object")
    for key, kind, what in (("method", str, "a string"), ("seed", int, "an integer"), ("task", dict, "an object"),
                            ("steps", list, "a list")):
        if not isinstance(results.get(key), kind) or isinstance(results.get(key), bool):
            raise fail(f"key {key!r} is missing or not {what}")
    for key in ("dataset", "name", "setting", "steps"):
        if key not in results["task"]:
            raise fail(f"key 'task.{key}' is missing")
    for i, record in enumerate(results["steps"]):
        miou = record.get("miou") if isinstance(record, dict) else None
        ok = isinstance(miou, dict) and "step" in record and all(
            isinstance(miou.get(conv), dict) and all(group in miou[conv] for group in GROUPS) for conv in CONVENTIONS)
        if not ok:
            raise fail(f"record {i} of 'steps' lacks its step number or its mIoU "
                       f"({', '.join(GROUPS)} for {' and '.join(CONVENTIONS)})")


def registered(method: str):
    """The registered :class:`~ucdseg.methods.Method` of that name, or None (a method the user's own
    code registered in the process that trained it)."""
    from ..methods import get_method

    try:
        return get_method(method)
    except KeyError:
        return None


def _expected_steps(results: dict) -> int:
    """How many steps a finished run has: 1 for joint training, else the task's number of steps."""
    method = registered(results["method"])
    return 1 if method is not None and method.joint else len(results["task"]["steps"])


def final(results: dict, conv: str, group: str) -> float | None:
    """A run's mIoU of ``group`` after its last step, or (``group="avg"``) averaged over its steps."""
    if group == "avg":
        return average_over_steps(results["steps"])[conv]
    return results["steps"][-1]["miou"][conv][group]


def run_label(results: dict) -> str:
    """The method's name, followed by the loss weights that differ from its defaults, if any:
    ``mib+ucd`` or ``mib+ucd [ucd=1]``; runs are grouped by this label, so runs with other weights
    are never averaged with the defaults."""
    method = results["method"]
    known = registered(method)
    defaults = known.default_weights if known is not None else {}
    changed = {k: v for k, v in results.get("weights", {}).items() if k in defaults and defaults[k] != v}
    return method + (" [" + ", ".join(f"{k}={v:g}" for k, v in sorted(changed.items())) + "]" if changed else "")


def method_name(label: str) -> str:
    """``mib+ucd`` for ``mib+ucd``, ``mib+ucd [ucd=1]`` and ``mib+ucd (train.iterations=40)``."""
    return label.split(" [")[0].split(" (")[0]


def base_method(label: str) -> str:
    """The method a run's method extends (:attr:`Method.base`): ``mib`` for ``mib+ucd`` and
    ``mib+ucd [ucd=1]``; the method itself when it extends none."""
    name = method_name(label)
    method = registered(name)
    return method.base if method is not None and method.base else name


def method_rank(label: str) -> tuple[int, str]:
    """Sort key: the registry's order (ft, lwf, ..., plop+ucd), then joint training (the upper bound),
    then unknown names; a method's default weights before its variants."""
    from ..methods import list_methods

    order = [m.name for m in list_methods() if not m.joint] + [m.name for m in list_methods() if m.joint]
    method = method_name(label)
    return (order.index(method) if method in order else len(order), label)


def benchmark(results: dict) -> tuple[str, str, str]:
    """A run's dataset, task and setting."""
    task = results["task"]
    return task["dataset"], task["name"], task["setting"]
