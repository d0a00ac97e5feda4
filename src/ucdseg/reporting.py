"""Tables and plots of a run's ``results.json`` (and comparisons of several runs)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.meta import VOID_COLOR, colorize
from .io import atomic_path, write_text
from .engine.metrics import average_over_steps

CONVENTIONS = ("without_background", "with_background")
GROUPS = ("old", "new", "all")
# what a run is summarised by: the last step's groups, and "avg", the mean over the steps of mIoU
# all (PLOP, SSUL, RCIL report it)
SUMMARIES = GROUPS + ("avg",)


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


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


_LINE_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def _curve_styles(labels: Sequence[str]) -> dict[str, dict]:
    """Matplotlib keywords per curve label, so that paired methods stay visible when they overlap:
    one colour per base method (``mib`` and ``mib+ucd`` share it), within it a line style and
    marker per variant (``X`` solid with circles, ``X+ucd`` dashed with crosses, other weights
    dash-dotted, ...), and a small horizontal offset per variant (``dx``, in steps) so that equal
    values are drawn side by side rather than on top of each other."""
    variants: dict[str, list[str]] = {}  # base method -> its labels, in order
    for label in labels:
        members = variants.setdefault(_base_method(label), [])
        if label not in members:
            members.append(label)
    styles = {}
    for i, (base, members) in enumerate(variants.items()):
        for k, label in enumerate(members):
            ucd = base != _method_name(label)
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
    _save_figure(fig, path)


def write_run_reports(results: dict, run_dir: str | Path) -> None:
    """``results.csv``, ``summary.md``, ``miou_per_step.png`` and the forgetting map ``forgetting.png``."""
    run_dir = Path(run_dir)
    write_text(run_dir / "results.csv", to_csv(step_rows(results)))
    write_text(run_dir / "summary.md", summary_markdown(results))
    plot_miou([(results["method"], results)], run_dir / "miou_per_step.png")
    if results["steps"]:
        from .reporting_heatmap import forgetting_matrix, plot_forgetting

        task = results["task"]
        plot_forgetting([(results["method"], forgetting_matrix(results))], run_dir / "forgetting.png",
                        title=f"{results['method']} on {task['dataset']} {task['name']} ({task['setting']}), seed "
                              f"{results['seed']}: per-class IoU (%) after each step")


def _summary_head() -> tuple[str, str]:
    """Header cells of :data:`SUMMARIES` in both conventions, and the separator cells."""
    cells = [group + (" (w/ bg)" if conv == "with_background" else "") for conv in CONVENTIONS for group in SUMMARIES]
    return " | ".join(cells), "|".join(["---"] * len(cells))


def comparison_markdown(runs: Sequence[tuple[str, dict]]) -> str:
    """Old / new / all mIoU after the last step of each run and avg over the steps, both conventions."""
    head, sep = _summary_head()
    lines = [f"| method | {head} |", f"|---|{sep}|"]
    for label, results in runs:
        lines.append(f"| {label} | " + " | ".join(_pct(_final(results, conv, group))
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


@torch.no_grad()
def write_predictions(model, val_set, seen: Sequence[int], palette, device, path: Path, num_images: int = 4,
                      class_names: Sequence[str] | None = None, title: str = "", predict=None) -> None:
    """A picture of the first ``num_images`` validation images: image | ground truth | prediction,
    with a legend naming every class that appears in it (``class_names``: dataset space) and
    ``title`` above (the run, its method and step). ``predict``: the method's inference rule,
    logits -> model-space ids (default: argmax)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    model.eval()
    n = min(num_images, len(val_set))
    if n == 0:
        return
    # model-space ids -> dataset ids, so the dataset's palette colours them
    to_dataset = np.full(256, 255, dtype=np.uint8)
    to_dataset[: len(seen)] = seen
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + (0.6 if class_names else 0)), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10)
    shown_ids: set[int] = set()
    for row in range(n):
        image, target = val_set[row]
        with torch.no_grad():
            logits = model(image[None].to(device)).logits
            pred = (logits.argmax(1) if predict is None else predict(logits))[0].cpu().numpy().astype(np.uint8)
        masks = to_dataset[target.numpy().astype(np.uint8)], to_dataset[pred]
        shown_ids.update(int(c) for m in masks for c in np.unique(m))
        shown = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        panels = [shown, colorize(masks[0], palette), colorize(masks[1], palette)]
        for ax, panel, title in zip(axes[row], panels, ("image", "ground truth", "prediction")):
            ax.imshow(panel, interpolation="nearest")  # small scenes: show their pixels, not a blur
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    if class_names:
        handles = [Patch(facecolor=np.asarray(palette[c]) / 255, edgecolor="black", label=class_names[c])
                   for c in sorted(shown_ids - {255})]
        if 255 in shown_ids:
            handles.append(Patch(facecolor=np.asarray(VOID_COLOR) / 255, edgecolor="black", label="void"))
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7, frameon=False)
        fig.subplots_adjust(bottom=0.6 / (2 * n + 0.6) + 0.04)
    _save_figure(fig, path)


# ----------------------------------------------------------------------------- several runs
def load_results(run_dir: str | Path) -> dict:
    """The ``results.json`` of a finished run; a missing, truncated, corrupt or unfinished file is a
    one-line error naming it."""
    import json

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


def _registered(method: str):
    """The registered :class:`~ucdseg.methods.Method` of that name, or None (a method the user's own
    code registered in the process that trained it)."""
    from .methods import get_method

    try:
        return get_method(method)
    except KeyError:
        return None


def _expected_steps(results: dict) -> int:
    """How many steps a finished run has: 1 for joint training, else the task's number of steps."""
    method = _registered(results["method"])
    return 1 if method is not None and method.joint else len(results["task"]["steps"])


def _final(results: dict, conv: str, group: str) -> float | None:
    """A run's mIoU of ``group`` after its last step, or (``group="avg"``) averaged over its steps."""
    if group == "avg":
        return average_over_steps(results["steps"])[conv]
    return results["steps"][-1]["miou"][conv][group]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; one value has no spread (None, not 0)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def run_label(results: dict) -> str:
    """The method's name, followed by the loss weights that differ from its defaults, if any:
    ``mib+ucd`` or ``mib+ucd [ucd=1]``; runs are grouped by this label, so runs with other weights
    are never averaged with the defaults."""
    method = results["method"]
    registered = _registered(method)
    defaults = registered.default_weights if registered is not None else {}
    changed = {k: v for k, v in results.get("weights", {}).items() if k in defaults and defaults[k] != v}
    return method + (" [" + ", ".join(f"{k}={v:g}" for k, v in sorted(changed.items())) + "]" if changed else "")


def _method_name(label: str) -> str:
    """``mib+ucd`` for ``mib+ucd``, ``mib+ucd [ucd=1]`` and ``mib+ucd (train.iterations=40)``."""
    return label.split(" [")[0].split(" (")[0]


def _base_method(label: str) -> str:
    """The method a run's method extends (:attr:`Method.base`): ``mib`` for ``mib+ucd`` and
    ``mib+ucd [ucd=1]``; the method itself when it extends none."""
    name = _method_name(label)
    method = _registered(name)
    return method.base if method is not None and method.base else name


def _method_rank(label: str) -> tuple[int, str]:
    """Sort key: the registry's order (ft, lwf, ..., plop+ucd), then joint training (the upper bound),
    then unknown names; a method's default weights before its variants."""
    from .methods import list_methods

    order = [m.name for m in list_methods() if not m.joint] + [m.name for m in list_methods() if m.joint]
    method = _method_name(label)
    return (order.index(method) if method in order else len(order), label)


# Config keys that only say where a run was stored, where its inputs were read from, or how the same
# computation was carried out (devices, loaders, logging, memory layout, a reused step 0): runs that
# differ only in these and in the seed are seeds of one experiment, pooled into one row.
LOCATION_KEYS = frozenset({
    "name", "output_dir", "device", "data.root", "data.workers", "data.cache_dir", "eval.batch_size",
    "eval.num_images", "train.log_every", "train.checkpoint_every", "train.channels_last", "train.compile",
    "train.step0_from", "train.steps"})
# Keys the row's label already shows (run_label: the method and its loss weights), and the seed.
_LABEL_KEYS = ("seed", "method.name", "method.weights")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):  # an empty mapping (no option set) adds no key
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _with_method_options(config: dict) -> dict:
    """``config`` with every option of its method, the defaults included: an option left unset and
    one set to its default are the same run."""
    method_config = config.get("method")
    method = _registered(method_config.get("name")) if isinstance(method_config, dict) else None
    if method is None:
        return config
    try:
        options = method.resolve_options(method_config.get("options") or {})
    except ValueError:  # options this version does not know: compare them as written
        return config
    return {**config, "method": {**method_config, "options": options}}


def _pretrained_kind(value):
    """``model.pretrained`` up to where its file lives: None, ``embedded``, a weight name, or any file."""
    if isinstance(value, str) and ("/" in value or "\\" in value or value.endswith((".pth", ".pt", ".bin"))):
        return "<a weights file>"
    return value


def pooled_config(results: dict) -> dict | None:
    """The flattened config of a run without the seed, the method and weights (its label) and the
    :data:`LOCATION_KEYS`: runs with equal ones are pooled. Keys a run's config lacks (saved before
    they existed) take their default, keys that moved are read where they are now (``migrate``).
    None for a results file without a config (written by hand)."""
    config = results.get("config")
    if not isinstance(config, dict):
        return None
    from .config import RunConfig, migrate, to_dict

    flat = _flatten(to_dict(RunConfig())) | _flatten(_with_method_options(migrate(config)))  # older keys moved
    flat = {k: v for k, v in flat.items() if k not in LOCATION_KEYS
            and not any(k == skip or k.startswith(skip + ".") for skip in _LABEL_KEYS)}
    if "model.pretrained" in flat:
        flat["model.pretrained"] = _pretrained_kind(flat["model.pretrained"])
    return flat


def _fingerprint(config: dict | None) -> str | None:
    import json

    return None if config is None else json.dumps(config, sort_keys=True, default=str)


def _pairable(ucd: dict, base: dict) -> bool:
    """Same :func:`pooled_config`, except the method options only one of the two methods has
    (UCD's temperature on ``X+ucd``): what UCD adds is measured against the same experiment."""
    mine, theirs = pooled_config(ucd), pooled_config(base)
    if mine is None or theirs is None:
        return mine is theirs
    keys = {k for k in set(mine) | set(theirs) if not (k.startswith("method.options.") and (k in mine) != (k in theirs))}
    return all(mine.get(k) == theirs.get(k) for k in keys)


def _benchmark(results: dict) -> tuple[str, str, str]:
    task = results["task"]
    return task["dataset"], task["name"], task["setting"]


def check_distinct(results_list: Sequence[dict], names: Sequence[str] | None = None) -> None:
    """Refuse the same run given twice: two runs with the same method, weights, benchmark, seed and
    :func:`pooled_config` (the same experiment, wherever it is stored) are one run repeated, not two
    seeds. ``names`` (e.g. the folders) name them in the error."""
    names = list(names) if names is not None else [f"run {i + 1}" for i in range(len(results_list))]
    seen: dict[str, str] = {}
    for name, results in zip(names, results_list):
        identity = _fingerprint({"benchmark": _benchmark(results), "method": results["method"],
                                 "weights": results.get("weights"), "seed": results["seed"],
                                 "config": pooled_config(results)})
        if identity in seen:
            raise ValueError(f"{seen[identity]} and {name} are the same run ({results['method']}, seed "
                             f"{results['seed']}, same config apart from where it is stored); give each run once")
        seen[identity] = name


def _config_tags(results_list: Sequence[dict]) -> list[str]:
    """Per run, ``key=value, ...`` of the config keys in which the runs of its benchmark and label
    differ ('' when they all agree, or when its results have no config)."""
    configs = [pooled_config(r) for r in results_list]
    families: dict[tuple, list[int]] = {}
    for i, results in enumerate(results_list):
        if configs[i] is not None:
            families.setdefault((*_benchmark(results), run_label(results)), []).append(i)
    tags = [""] * len(results_list)
    for members in families.values():
        keys = sorted({k for i in members for k in configs[i]})
        varying = [k for k in keys if len({_fingerprint({"v": configs[i].get(k)}) for i in members}) > 1]
        for i in members:
            tags[i] = ", ".join(f"{k}={configs[i].get(k)}" for k in varying)
    return tags


def _group_runs(results_list: Sequence[dict]) -> dict[tuple, list[dict]]:
    """Runs keyed by (dataset, task, setting, row label), benchmarks sorted, methods in registry order.

    The row label is :func:`run_label`, followed, when runs of that method and weights differ in
    their config beyond the seed and :data:`LOCATION_KEYS`, by the keys that differ:
    ``mib (train.iterations=40)``; so only seeds of one experiment share a row.
    """
    check_distinct(results_list)
    groups: dict[tuple, list[dict]] = {}
    for results, tag in zip(results_list, _config_tags(results_list)):
        label = run_label(results) + (f" ({tag})" if tag else "")
        groups.setdefault((*_benchmark(results), label), []).append(results)
    return dict(sorted(groups.items(), key=lambda item: (item[0][:3], _method_rank(item[0][3]))))


def aggregate(results_list: Sequence[dict]) -> list[dict]:
    """Group runs by benchmark and method; mean and standard deviation over seeds of the last step.

    Only seeds of one experiment are pooled: runs whose configs differ in more than the seed and
    where the run is stored (:data:`LOCATION_KEYS`) land in separate rows, labelled by the keys
    that differ (``mib (train.iterations=3)``, ``mib (train.iterations=40)``); the same run given
    twice is refused (:func:`check_distinct`).

    Each row: dataset, task, setting, method, seeds, and for every convention and group (and
    ``avg``, the mean over a run's steps of mIoU all) ``{conv}_{group}_mean`` / ``_std`` (fractions;
    ``None`` where undefined; the std is ``None`` for a single seed: no spread), plus the mean curves
    of mIoU per step (``curves[group]``, without background; ``nan`` where undefined, as "new" at
    step 0). Rows are sorted by benchmark, then by method in the registry's order.
    """
    rows = []
    for (dataset, task, setting, method), runs in _group_runs(results_list).items():
        row: dict = {"dataset": dataset, "task": task, "setting": setting, "method": method,
                     "seeds": sorted(r["seed"] for r in runs)}
        for conv in CONVENTIONS:
            for group in SUMMARIES:
                values = [v for r in runs if (v := _final(r, conv, group)) is not None]
                mean, std = _mean_std(values) if values else (None, None)
                row[f"{conv}_{group}_mean"], row[f"{conv}_{group}_std"] = mean, std
        length = min(len(r["steps"]) for r in runs)
        row["curves"] = {group: [float(np.mean([np.nan if (v := r["steps"][i]["miou"]["without_background"][group])
                                                is None else v for r in runs])) for i in range(length)]
                         for group in GROUPS}
        rows.append(row)
    return rows


def ucd_gains(results_list: Sequence[dict]) -> list[dict]:
    """What UCD adds to its base method, paired by seed: for every ``X+ucd`` (with any weights) whose
    ``X`` ran on the same benchmark with its default weights and the same config (apart from the
    seed, the method and :data:`LOCATION_KEYS`), the per-seed difference
    ``(X+ucd) - X`` of the last step's mIoU.

    Pairing by seed removes what both runs share (step 0, the data order), so the spread left is
    the spread of UCD's effect. Each row: dataset, task, setting, method (``X+ucd``), base, seeds
    (those both ran), and per convention and group (and ``avg``) ``{conv}_{group}_mean`` / ``_std`` (fractions),
    ``{conv}_{group}_ci95`` (the half-width of the 95 % confidence interval of the mean paired
    difference, Student's t with n - 1 degrees of freedom: ``t * std / sqrt(n)``; ``None`` for one
    seed) and ``{conv}_{group}_wins`` (seeds where UCD is strictly higher).
    """
    groups = _group_runs(results_list)
    rows = []
    for (dataset, task, setting, method), runs in groups.items():
        base = _base_method(method)
        if base == _method_name(method):
            continue
        # the base method with its default weights and the same config (pooled_config) as these runs
        base_key = next((key for key, members in groups.items() if key[:3] == (dataset, task, setting)
                         and run_label(members[0]) == base and _pairable(runs[0], members[0])), None)
        if base_key is None:
            continue
        base_by_seed = {r["seed"]: r for r in groups[base_key]}
        pairs = sorted(((r["seed"], r, base_by_seed[r["seed"]]) for r in runs if r["seed"] in base_by_seed),
                       key=lambda pair: pair[0])
        if not pairs:
            continue
        row: dict = {"dataset": dataset, "task": task, "setting": setting, "method": method, "base": base_key[3],
                     "seeds": [seed for seed, _, _ in pairs]}
        for conv in CONVENTIONS:
            for group in SUMMARIES:
                deltas = [_final(ucd, conv, group) - _final(ref, conv, group) for _, ucd, ref in pairs
                          if _final(ucd, conv, group) is not None and _final(ref, conv, group) is not None]
                mean, std = _mean_std(deltas) if deltas else (None, None)
                row[f"{conv}_{group}_mean"], row[f"{conv}_{group}_std"] = mean, std
                row[f"{conv}_{group}_ci95"] = _ci95_half_width(std, len(deltas))
                row[f"{conv}_{group}_wins"] = sum(d > 0 for d in deltas)
        rows.append(row)
    return rows


def _ci95_half_width(std: float | None, n: int) -> float | None:
    """Half-width of the two-sided 95 % interval of a mean of ``n`` values with sample std ``std``."""
    if std is None or n < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * std / np.sqrt(n))


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
    from .paper import paper_cell

    head, sep = _TABLE_HEAD, _TABLE_SEP
    if paper:
        head, sep = head + " paper old/new/all |", sep + "---|"
    lines = ["mIoU (%) after the last step, and avg (the mean over the steps of mIoU all): mean ± sample standard "
             "deviation over the n seeds (the value alone when n = 1).", "", head, sep]
    for row in rows:
        cells = _table_cells(row, row["method"], lambda conv, g: _pm(row[f"{conv}_{g}_mean"], row[f"{conv}_{g}_std"]))
        if paper:
            value = paper_cell(row["dataset"], row["task"], row["setting"], row["method"])  # defaults only
            cells.append(value.text() if value else "-")
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
    _save_figure(fig, path)


def forgetting_map_names(results_list: Sequence[dict]) -> dict[tuple[str, str, str], str]:
    """The file of each benchmark's forgetting map in a report: ``report_forgetting.png`` for one
    benchmark, ``report_forgetting_<dataset>-<task>-<setting>.png`` for several."""
    benchmarks = sorted({_benchmark(r) for r in results_list})
    if len(benchmarks) == 1:
        return {benchmarks[0]: "report_forgetting.png"}
    return {b: f"report_forgetting_{'-'.join(b)}.png" for b in benchmarks}


def write_forgetting_maps(results_list: Sequence[dict], out_dir: Path) -> list[Path]:
    """Per benchmark, the forgetting map (:mod:`.reporting_heatmap`) with one panel per row of the
    report (method, weights and config), averaged over its seeds; one-step runs (joint training)
    are left out of a benchmark of several steps: they forget nothing."""
    from .reporting_heatmap import forgetting_matrix, mean_matrix, plot_forgetting

    panels: dict[tuple, list] = {}
    for (dataset, task, setting, label), runs in _group_runs(results_list).items():
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
    the seeds. Runs whose configs differ in anything but the seed and :data:`LOCATION_KEYS` (where a
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
