"""The Python entry point for notebooks and scripts: ``ucdseg.run(config, **overrides)``.

    import ucdseg
    results = ucdseg.run("embedded/mib", seed=1, train={"iterations": 40}, name="mib-40")
    results["steps"][-1]["miou"]["without_background"]["all"]

``config`` is what ``ucdseg run`` takes (a YAML file, or a packaged config's name such as
``voc/15-1-overlapped/mib_ucd``), a :class:`~ucdseg.config.RunConfig`, or None (the defaults).
``overrides`` are config keys: a keyword per top-level key, a nested dict for a section
(``train={"iterations": 40}``), or dotted keys through ``**{"train.iterations": 40}``. The run is
the same as the command line's: the run folder, its resume, ``log.txt`` and the reports; the
return value is the content of its ``results.json``. ``progress=False`` hides the progress bars
and the run's lines on the terminal (``log.txt`` is still written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["run", "config_overrides"]


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"config override key {key!r} is not a key name")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name not in ("method.weights", "method.options"):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, Mapping):  # the method's own mappings: one key per entry
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def config_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """``key=value`` strings (the command line's syntax) of keyword overrides, each value written as
    JSON, which the config loader reads as YAML: ``"001"`` stays a string, ``None`` is ``null``."""
    items = []
    for key, value in _flatten(overrides).items():
        if isinstance(value, Path):
            value = str(value)
        try:
            items.append(f"{key}={json.dumps(value)}")
        except TypeError:
            raise ValueError(f"config override {key}={value!r}: expected a string, number, boolean, None or a "
                             "list of them") from None
    return items


def run(config: str | Path | Any | None = None, progress: bool = True, **overrides: Any) -> dict:
    """Run (or continue) every step of ``config`` with ``overrides``; returns the results
    (``results.json``'s content). See the module docstring."""
    from .config import RunConfig, check_run_config, from_dict, load_config, resolve_config, to_dict

    items = config_overrides(overrides)
    if isinstance(config, RunConfig):
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.create(to_dict(config)), OmegaConf.from_dotlist(items))
        check_run_config(OmegaConf.to_container(merged))  # before from_dict, whose migrate reads saved configs
        cfg = from_dict(OmegaConf.to_container(merged))
    else:
        cfg = load_config(None if config is None else resolve_config(config), items)
    from .engine import run as run_engine
    from .reporting import write_run_reports

    return run_engine(cfg, progress=progress, reports=write_run_reports)
