"""The configs shipped inside the package, by name: ``ucdseg run voc/15-1-overlapped/mib_ucd``.

The benchmark configs live in the package (``src/ucdseg/configs/``, the checkout's ``configs/``
is a link to it), so after ``pip install ucdseg`` they are named by their path inside that
folder, without ``.yaml``: ``embedded/mib``, ``voc/15-1-overlapped/mib_ucd``, ``demo``.

:func:`packaged` finds the packaged config of a name (with or without ``.yaml``, with or without
a leading ``configs/``; :func:`ucdseg.config.resolve_config` turns what a user typed into a file,
a path that exists winning over a packaged name). :func:`list_configs` lists the
packaged configs, files whose name starts with ``_`` (the ``_base_`` layers) left out, and
:func:`describe` reads a config's dataset, task, setting and method without importing torch
(``ucdseg configs [PATTERN]``, docs/benchmarks.md).
"""

from __future__ import annotations

import fnmatch
from importlib import resources
from pathlib import Path

__all__ = ["config_root", "list_configs", "packaged", "describe", "format_configs"]

SUFFIX = ".yaml"


def config_root() -> Path:
    """The folder of the packaged configs."""
    return Path(str(resources.files("ucdseg") / "configs"))


def list_configs(pattern: str | None = None) -> list[str]:
    """Names of the packaged configs (``voc/15-1-overlapped/mib_ucd``), sorted; ``pattern`` keeps
    the names containing it, or matching it when it holds a glob character (``voc/*/plop*``), or,
    ending in ``.yaml``, the configs of that file name (``15-1-overlapped/mib.yaml``)."""
    root = config_root()
    names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob(f"*{SUFFIX}")
                   if not p.name.startswith("_"))
    if not pattern:
        return names
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n + SUFFIX, pattern)]
    if pattern.endswith(SUFFIX):  # a file name: the configs of that file name
        return [n for n in names if f"/{n}{SUFFIX}".endswith("/" + pattern.lstrip("/"))]
    return [n for n in names if pattern in n]


def packaged(name: str) -> Path | None:
    """The packaged config named ``name`` (``embedded/mib``, ``embedded/mib.yaml`` or
    ``configs/embedded/mib.yaml``), or None."""
    stem = name.replace("\\", "/").strip("/")
    stem = stem.removeprefix("configs/").removesuffix(SUFFIX)
    if not stem or ".." in stem.split("/"):
        return None
    path = config_root() / f"{stem}{SUFFIX}"
    return path if path.is_file() else None


def _layers(path: Path, depth: int = 0) -> dict:
    """``path``'s keys over those of its ``_base_`` files (plain YAML, as the config loader merges)."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or depth > 8:
        return {}
    bases = data.pop("_base_", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _merge(merged, _layers(path.parent / base, depth + 1))
    return _merge(merged, data)


def _merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def describe(name: str) -> dict:
    """The dataset, task, setting and method of a packaged config (the defaults of
    :class:`~ucdseg.config.RunConfig` where the files leave them out)."""
    data = _layers(config_root() / f"{name}{SUFFIX}")
    section = lambda key: data.get(key) if isinstance(data.get(key), dict) else {}  # noqa: E731
    return {"name": name, "dataset": section("data").get("dataset", "embedded"),
            "task": section("task").get("name", "4-3-3"), "setting": section("data").get("setting", "overlapped"),
            "method": section("method").get("name", "mib+ucd")}


def format_configs(names: list[str]) -> str:
    """One line per config: its name, then dataset, task, setting and method."""
    rows = [describe(n) for n in names]
    width = max((len(r["name"]) for r in rows), default=0)
    return "\n".join(f"{r['name']:{width}s}  {r['dataset']} {r['task']} {r['setting']}, {r['method']}" for r in rows)
