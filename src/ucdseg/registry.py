"""Named objects of one kind: the methods, the datasets and the backbones, one :class:`Registry` each.

One type, one policy for every kind:

* a name is held by one object. Registering that object again (or one equal to it) does nothing:
  a module imported twice, an entry point naming an object its module already registered. Another
  object under a taken name is an error naming the module that holds the name::

      dataset 'voc' is already registered by module ucdseg.data.voc

* an unknown name is one line with the registered names, sorted::

      unknown dataset 'coco': expected one of ade, cityscapes, embedded, folder, voc

  (:class:`UnknownName`, both a ``KeyError`` and a ``ValueError``).

A registry may name built-in objects it imports on first use, as ``"module:attribute"``
(``builtin``): it knows their names without importing their modules. The command line lists the
datasets without loading torch that way, and the embedded benchmark's reader (in
:mod:`ucdseg.embedded`, above the data layer) is a dataset without :mod:`ucdseg.data` importing it.
The registered objects are checked against the type a registry accepts, named the same way and
looked up only when something is registered (the module defining an object's type is loaded by
then).

This module imports nothing but the standard library: every layer may use it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Iterator, Mapping, Optional

__all__ = ["Registry", "UnknownName", "METHODS", "DATASETS", "BACKBONES"]


class UnknownName(KeyError, ValueError):
    """A name no object is registered under (one line: the name and the registered ones)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def _resolve(location: str) -> Any:
    """The object at ``"module:attribute"`` (the attribute may be dotted)."""
    module, _, attribute = location.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _location(obj: Any) -> Optional[str]:
    """``"module:qualname"`` of a class or function (None for other objects)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}:{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None


class Registry:
    """Objects of one ``kind`` by name (see the module docstring).

    ``builtin``: name -> ``"module:attribute"``, imported on the first :meth:`get` of the name.
    ``instance_of`` / ``subclass_of``: ``"module:Class"``, what a registered object must be (an
    instance, or a subclass); None accepts anything.
    """

    def __init__(self, kind: str, builtin: Optional[Mapping[str, str]] = None, *,
                 instance_of: Optional[str] = None, subclass_of: Optional[str] = None):
        self.kind = kind
        self._objects: dict[str, Any] = {}
        self._owners: dict[str, str] = {}  # name -> the module that registered it
        self._builtin: dict[str, str] = dict(builtin or {})
        self._instance_of, self._subclass_of = instance_of, subclass_of

    # ------------------------------------------------------------------------- registering
    def register(self, name: str, obj: Any, *, by: Optional[str] = None) -> Any:
        """Hold ``obj`` under ``name`` and return it. ``by``: the module registering it, for
        messages (default: the module of a class or function)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        self._check_type(name, obj)
        owner = by or getattr(obj, "__module__", None) or "?"
        if name in self._objects:
            if self._same(self._objects[name], obj):
                return obj
            raise ValueError(f"{self.kind} {name!r} is already registered by module {self._owners[name]}")
        if name in self._builtin and _location(obj) != self._builtin[name]:
            raise ValueError(f"{self.kind} {name!r} is already registered by module "
                             f"{self._builtin[name].partition(':')[0]}")
        self._objects[name] = obj
        self._owners[name] = owner
        return obj

    @staticmethod
    def _same(held: Any, obj: Any) -> bool:
        """The object held, or one equal to it (a method or backbone declared again alike)."""
        if held is obj:
            return True
        try:
            return type(held) is type(obj) and bool(held == obj)
        except Exception:  # an object whose comparison fails is another object
            return False

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a built-in name is imported again on its next :meth:`get`)."""
        self._objects.pop(name, None)
        self._owners.pop(name, None)

    def _check_type(self, name: str, obj: Any) -> None:
        if self._instance_of is not None:
            expected = _resolve(self._instance_of)
            if not isinstance(obj, expected):
                raise ValueError(f"{self.kind} {name!r}: expected a {expected.__qualname__}, got {obj!r}")
        if self._subclass_of is not None:
            expected = _resolve(self._subclass_of)
            if not (isinstance(obj, type) and issubclass(obj, expected)):
                raise ValueError(f"{self.kind} {name!r}: expected a subclass of {expected.__qualname__}, got {obj!r}")

    # ---------------------------------------------------------------------------- looking up
    def get(self, name: str) -> Any:
        """The object registered as ``name`` (a built-in one is imported now); else :class:`UnknownName`."""
        if name in self._objects:
            return self._objects[name]
        if isinstance(name, str) and name in self._builtin:
            obj = _resolve(self._builtin[name])  # its module may register it while being imported
            return self.register(name, obj, by=self._builtin[name].partition(":")[0])
        raise UnknownName(f"unknown {self.kind} {name!r}: expected one of {', '.join(sorted(self.names()))}")

    def names(self) -> tuple[str, ...]:
        """Every registered name, built-in ones first, without importing anything."""
        return tuple(dict.fromkeys([*self._builtin, *self._objects]))

    def items(self) -> list[tuple[str, Any]]:
        """``(name, object)`` of every name, in :meth:`names` order (built-in modules are imported)."""
        return [(name, self.get(name)) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._objects or name in self._builtin

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def caller_module(depth: int = 1) -> Optional[str]:
    """The ``__name__`` of the module ``depth`` frames above the caller (for :meth:`Registry.register`'s ``by``)."""
    frame = sys._getframe(depth + 1)
    return frame.f_globals.get("__name__")


#: Incremental methods (:class:`ucdseg.methods.Method` objects, registered under their own name).
METHODS = Registry("method", instance_of="ucdseg.methods.method:Method")

#: Dataset readers (:class:`ucdseg.data.SegmentationDataset` subclasses).
DATASETS = Registry("dataset", {
    "voc": "ucdseg.data.voc:VOCSegmentation",
    "ade": "ucdseg.data.ade:ADE20KSegmentation",
    "cityscapes": "ucdseg.data.cityscapes:CityscapesSegmentation",
    "embedded": "ucdseg.embedded.reader:EmbeddedSegmentation",
    "folder": "ucdseg.data.folder:FolderSegmentation",
}, subclass_of="ucdseg.data.base:SegmentationDataset")

#: Backbones (:class:`ucdseg.models.backbones.BackboneBuilder`: a builder and its output strides).
BACKBONES = Registry("backbone", instance_of="ucdseg.models.backbones:BackboneBuilder")
