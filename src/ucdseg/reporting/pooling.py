"""Which runs are seeds of one experiment, and what they average to.

A row of ``ucdseg report`` pools the seeds of one benchmark, method (with its loss weights) and
config: :func:`pooled_config` is a run's config without what only says where it was stored
(:data:`LOCATION_KEYS`), the seed and its label; runs given twice are refused
(:func:`check_distinct`). :func:`aggregate` gives each row's mean and spread over its seeds,
:func:`ucd_gains` what UCD adds to its base method, paired by seed (the arithmetic is
:mod:`ucdseg.stats`).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from ..stats import mean_std, paired_gain
from .results import CONVENTIONS, GROUPS, SUMMARIES, base_method, benchmark, final, method_name, method_rank, \
    registered, run_label

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
    method = registered(method_config.get("name")) if isinstance(method_config, dict) else None
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
    from ..config import RunConfig, migrate, to_dict

    flat = _flatten(to_dict(RunConfig())) | _flatten(_with_method_options(migrate(config)))  # older keys moved
    flat = {k: v for k, v in flat.items() if k not in LOCATION_KEYS
            and not any(k == skip or k.startswith(skip + ".") for skip in _LABEL_KEYS)}
    if "model.pretrained" in flat:
        flat["model.pretrained"] = _pretrained_kind(flat["model.pretrained"])
    return flat


def _fingerprint(config: dict | None) -> str | None:
    return None if config is None else json.dumps(config, sort_keys=True, default=str)


def _pairable(ucd: dict, base: dict) -> bool:
    """Same :func:`pooled_config`, except the method options only one of the two methods has
    (UCD's temperature on ``X+ucd``): what UCD adds is measured against the same experiment."""
    mine, theirs = pooled_config(ucd), pooled_config(base)
    if mine is None or theirs is None:
        return mine is theirs
    keys = {k for k in set(mine) | set(theirs) if not (k.startswith("method.options.") and (k in mine) != (k in theirs))}
    return all(mine.get(k) == theirs.get(k) for k in keys)


def check_distinct(results_list: Sequence[dict], names: Sequence[str] | None = None) -> None:
    """Refuse the same run given twice: two runs with the same method, weights, benchmark, seed and
    :func:`pooled_config` (the same experiment, wherever it is stored) are one run repeated, not two
    seeds. ``names`` (e.g. the folders) name them in the error."""
    names = list(names) if names is not None else [f"run {i + 1}" for i in range(len(results_list))]
    seen: dict[str, str] = {}
    for name, results in zip(names, results_list):
        identity = _fingerprint({"benchmark": benchmark(results), "method": results["method"],
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
            families.setdefault((*benchmark(results), run_label(results)), []).append(i)
    tags = [""] * len(results_list)
    for members in families.values():
        keys = sorted({k for i in members for k in configs[i]})
        varying = [k for k in keys if len({_fingerprint({"v": configs[i].get(k)}) for i in members}) > 1]
        for i in members:
            tags[i] = ", ".join(f"{k}={configs[i].get(k)}" for k in varying)
    return tags


def group_runs(results_list: Sequence[dict]) -> dict[tuple, list[dict]]:
    """Runs keyed by (dataset, task, setting, row label), benchmarks sorted, methods in registry order.

    The row label is :func:`run_label`, followed, when runs of that method and weights differ in
    their config beyond the seed and :data:`LOCATION_KEYS`, by the keys that differ:
    ``mib (train.iterations=40)``; so only seeds of one experiment share a row.
    """
    check_distinct(results_list)
    groups: dict[tuple, list[dict]] = {}
    for results, tag in zip(results_list, _config_tags(results_list)):
        label = run_label(results) + (f" ({tag})" if tag else "")
        groups.setdefault((*benchmark(results), label), []).append(results)
    return dict(sorted(groups.items(), key=lambda item: (item[0][:3], method_rank(item[0][3]))))


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
    for (dataset, task, setting, method), runs in group_runs(results_list).items():
        row: dict = {"dataset": dataset, "task": task, "setting": setting, "method": method,
                     "seeds": sorted(r["seed"] for r in runs)}
        for conv in CONVENTIONS:
            for group in SUMMARIES:
                values = [v for r in runs if (v := final(r, conv, group)) is not None]
                mean, std = mean_std(values) if values else (None, None)
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
    groups = group_runs(results_list)
    rows = []
    for (dataset, task, setting, method), runs in groups.items():
        base = base_method(method)
        if base == method_name(method):
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
                gain = paired_gain([final(ucd, conv, group) for _, ucd, _ in pairs],
                                   [final(ref, conv, group) for _, _, ref in pairs])
                for key in ("mean", "std", "ci95", "wins"):
                    row[f"{conv}_{group}_{key}"] = gain[key]
        rows.append(row)
    return rows
