"""Methods and datasets from your own package, without forking ucdseg.

Two ways to load user code (``docs/extending.md`` walks through an example):

* **entry points** of an installed package, groups ``ucdseg.methods`` and ``ucdseg.datasets``::

      [project.entry-points."ucdseg.methods"]
      mib+cos = "ucdseg_cosine"                  # a module that registers its methods when imported
      [project.entry-points."ucdseg.datasets"]
      tiles = "my_pkg.data:TileSegmentation"     # or the object itself (a Method, a reader class)

  They are loaded the first time a config is read, or by ``ucdseg methods``. An entry point that
  names a :class:`~ucdseg.methods.Method` registers it; one that names a
  :class:`~ucdseg.data.SegmentationDataset` subclass registers it under the entry point's name
  (in :mod:`ucdseg.registry`, whose policy holds for duplicates: a name taken by another object is
  an error naming its module).
* the **config key** ``imports: [module, ...]``: modules imported when the config is read (so a
  package on ``PYTHONPATH`` needs no installation). The key is saved with the run, so
  ``ucdseg eval`` and ``ucdseg predict`` import the same modules.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType
from typing import Iterable

from .registry import DATASETS, METHODS

__all__ = ["GROUPS", "PluginError", "load_plugins", "load_entry_points", "import_modules"]

GROUPS = ("ucdseg.methods", "ucdseg.datasets")

_loaded_entry_points = False


class PluginError(RuntimeError):
    """User code named by an entry point or by ``imports`` could not be loaded."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _register(group: str, name: str, obj, module: str) -> None:
    """Register what an entry point names: a module has registered its objects when imported; a
    Method goes in under its own name, a reader class under the entry point's (the registries'
    duplicate policy: the same object again is nothing, another one under a taken name an error)."""
    if isinstance(obj, ModuleType):
        return
    try:
        if group == "ucdseg.methods":
            METHODS.register(getattr(obj, "name", name), obj, by=module)
        else:
            DATASETS.register(name, obj, by=module)
    except ValueError as exc:
        raise PluginError(f"entry point {name!r} ({group}): {exc}") from None


def load_entry_points(force: bool = False) -> None:
    """Load every ``ucdseg.methods`` / ``ucdseg.datasets`` entry point of the installed packages (once)."""
    global _loaded_entry_points
    if _loaded_entry_points and not force:
        return
    _loaded_entry_points = True
    for group in GROUPS:
        for entry in metadata.entry_points(group=group):
            try:
                obj = entry.load()
            except Exception as exc:  # user code: any error, named in one line
                dist = getattr(getattr(entry, "dist", None), "name", "?")
                raise PluginError(f"entry point {entry.name!r} = {entry.value!r} ({group}, package {dist}) failed to "
                                  f"load: {_first_line(exc)}") from exc
            _register(group, entry.name, obj, entry.value.partition(":")[0])


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules of a config's ``imports`` key (they register their methods and datasets)."""
    for name in modules:
        if not isinstance(name, str) or not name.strip():
            raise PluginError(f"imports: {name!r} is not a module name")
        try:
            importlib.import_module(name.strip())
        except ModuleNotFoundError as exc:
            if exc.name and name.strip().startswith(exc.name):
                raise PluginError(f"imports: no module named {name!r}: install its package or put its folder on "
                                  "PYTHONPATH") from None
            raise PluginError(f"imports: importing {name!r} failed: {_first_line(exc)}") from exc
        except Exception as exc:  # user code: any error, named in one line
            raise PluginError(f"imports: importing {name!r} failed: {_first_line(exc)}") from exc


def load_plugins(modules: Iterable[str] | None = ()) -> None:
    """Entry points (once per process), then the ``imports`` modules."""
    load_entry_points()
    import_modules(modules or ())
