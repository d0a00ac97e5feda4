"""Class-incremental tasks: which classes are learned at which step, and in which order.

A :class:`Task` splits the foreground classes of a dataset into ordered steps (docs/protocol.md §1). Step 0
holds background (id 0) plus the base classes; every later step adds new classes. Class ids come
in two spaces (see ``docs/architecture.md``): *dataset* ids (the values in the masks) and *model*
ids (the position of a class in the concatenated steps, i.e. the logit channel). With the default
class order the two coincide.

Task names:

* a named task of the dataset (``list_tasks(dataset)``), e.g. ``"15-1"`` on VOC;
* ``"N-M"``: N base classes, then steps of M classes; the remaining ``C - N`` classes must be a
  positive multiple of M;
* ``"a-b-c..."`` (three or more numbers): explicit step sizes that must sum to ``C``;
* old aliases: ``"15-5s"`` -> ``"15-1"`` (VOC), ``"13-6s"`` -> ``"13-1"`` (Cityscapes).

The built-in datasets' class counts are in :data:`DATASETS`. Any other dataset (a folder dataset,
a dataset registered by user code) is given with its number of foreground classes,
``num_classes`` (its class names but the background: the engine reads them with
:func:`ucdseg.data.dataset_meta`); it has no named task, and the ``N-M`` / ``a-b-c...`` forms
work for any count. The module knows no dataset registry: it imports numpy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np


__all__ = ["DATASETS", "NAMED_TASKS", "ALIASES", "Task", "TaskError", "get_task", "list_tasks", "parse_task_name",
           "num_foreground"]

#: Number of foreground classes of each dataset (background 0 comes on top).
#: Foreground classes of the built-in datasets, as their readers' class tables (``VOCSegmentation.meta``, ...) say;
#: a test keeps the two equal. Read here so that tasks stay a pure module (no torch import).
DATASETS: dict[str, int] = {"voc": 20, "ade": 150, "cityscapes": 19, "embedded": 10}

#: The named tasks of each dataset (docs/protocol.md §1; the embedded benchmark's tasks are ours).
NAMED_TASKS: dict[str, tuple[str, ...]] = {
    "voc": ("19-1", "15-5", "15-1", "10-1", "5-3", "2-2", "10-10"),
    "ade": ("100-50", "100-10", "100-5", "50-50"),
    "cityscapes": ("17-2", "13-6", "13-1"),
    "embedded": ("5-5", "6-2", "4-2", "6-1", "9-1", "4-3-3", "2-2"),
}

#: Old names of tasks, per dataset.
ALIASES: dict[str, dict[str, str]] = {
    "voc": {"15-5s": "15-1"},
    "cityscapes": {"13-6s": "13-1"},
}

Order = Union[None, int, Sequence[int]]

_NAME_RE = re.compile(r"^\d+(-\d+)+$")


class TaskError(ValueError):
    """An invalid dataset, task name or class order."""


@dataclass(frozen=True)
class Task:
    """An ordered split of a dataset's classes into incremental steps.

    ``steps`` holds dataset class ids; ``steps[0]`` starts with background 0. The model-space id
    of a class is its position in ``steps[0] + steps[1] + ...``.
    """

    dataset: str
    name: str
    steps: list[list[int]]
    num_classes: int
    order: list[int]

    def __post_init__(self) -> None:
        flat = [c for step in self.steps for c in step]
        if not self.steps or not self.steps[0] or self.steps[0][0] != 0:
            raise TaskError(f"task {self.name!r}: steps[0] must start with background 0, got {self.steps!r}")
        if any(not step for step in self.steps):
            raise TaskError(f"task {self.name!r}: every step needs at least one class, got {self.steps!r}")
        if sorted(flat) != list(range(self.num_classes)):
            raise TaskError(f"task {self.name!r}: steps must use every class 0..{self.num_classes - 1} "
                            f"exactly once, got {self.steps!r}")
        if sorted(self.order) != list(range(1, self.num_classes)):
            raise TaskError(f"task {self.name!r}: order must be a permutation of 1..{self.num_classes - 1}, "
                            f"got {self.order!r}")

    # ------------------------------------------------------------------ structure
    @property
    def num_steps(self) -> int:
        """Number of steps, step 0 included."""
        return len(self.steps)

    @property
    def classes_per_step(self) -> list[int]:
        """Number of classes per step (step 0 counts background): ``[16, 1, 1, 1, 1, 1]`` for VOC 15-1."""
        return [len(step) for step in self.steps]

    def _check_step(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < self.num_steps:
            raise TaskError(f"step {t!r} out of range for task {self.name!r}: expected 0..{self.num_steps - 1}")
        return int(t)

    def seen(self, t: int) -> list[int]:
        """Classes of steps ``0..t`` (dataset ids, in model order)."""
        t = self._check_step(t)
        return [c for step in self.steps[: t + 1] for c in step]

    def old(self, t: int) -> list[int]:
        """Classes of steps ``0..t-1`` (dataset ids, in model order); ``[]`` at step 0."""
        t = self._check_step(t)
        return [c for step in self.steps[:t] for c in step]

    def new(self, t: int) -> list[int]:
        """Classes added at step ``t`` (dataset ids); step 0 includes background."""
        t = self._check_step(t)
        return list(self.steps[t])

    # ------------------------------------------------------------------ id spaces
    @property
    def model_lut(self) -> np.ndarray:
        """``(256,)`` uint8 look-up table: dataset id -> model id; 255 for 255 and non-class ids."""
        lut = np.full(256, 255, dtype=np.uint8)
        for model_id, cls in enumerate(c for step in self.steps for c in step):
            lut[cls] = model_id
        return lut

    def model_ids(self, classes: Iterable[int]) -> list[int]:
        """Model-space ids of the dataset ids ``classes`` (raises on ids that are not classes)."""
        lut = self.model_lut
        out = []
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < self.num_classes:
                raise TaskError(f"class id {c!r} is not a class of task {self.name!r} "
                                f"({self.dataset}): expected 0..{self.num_classes - 1}")
            out.append(int(lut[int(c)]))
        return out

    def dataset_ids(self, model_ids: Iterable[int]) -> list[int]:
        """Inverse of :meth:`model_ids`."""
        flat = [c for step in self.steps for c in step]
        out = []
        for m in model_ids:
            if not 0 <= int(m) < len(flat):
                raise TaskError(f"model id {m!r} out of range for task {self.name!r}: expected 0..{len(flat) - 1}")
            out.append(flat[int(m)])
        return out


# ---------------------------------------------------------------------- construction
def _unknown(dataset: str) -> TaskError:
    return TaskError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}, or another dataset with "
                     "its number of foreground classes (num_classes)")


def num_foreground(dataset: str, num_classes: int | None = None) -> int:
    """Number of foreground classes of ``dataset``: ``num_classes`` when given (a dataset other than
    the built-in ones), else the built-in count."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise TaskError(f"dataset {dataset!r}: num_classes must be a positive int, got {num_classes!r}")
        return int(num_classes)
    if dataset in DATASETS:
        return DATASETS[dataset]
    raise _unknown(dataset)


def list_tasks(dataset: str) -> list[str]:
    """The named tasks of a built-in dataset (aliases not included); another dataset has none, and
    is not known here (``ucdseg tasks`` asks the dataset registry)."""
    if dataset not in DATASETS:
        raise _unknown(dataset)
    return list(NAMED_TASKS.get(dataset, ()))


def _valid_forms(dataset: str, c: int) -> str:
    aliases = ALIASES.get(dataset, {})
    alias_text = ("; aliases: " + ", ".join(f"{a} -> {b}" for a, b in aliases.items())) if aliases else ""
    named = ", ".join(NAMED_TASKS.get(dataset, ())) or "none"
    return (f"named tasks: {named}{alias_text}; accepted forms: 'N-M' "
            f"(N base classes then steps of M, {c} - N a positive multiple of M) or 'a-b-c...' "
            f"(3+ positive step sizes summing to {c})")


def parse_task_name(dataset: str, name: str, num_classes: int | None = None) -> tuple[str, list[int]]:
    """Resolve ``name`` on ``dataset`` to ``(canonical name, foreground classes per step)``.

    ``num_classes``: see :func:`num_foreground` (datasets other than the built-in ones).
    """
    num_fg = num_foreground(dataset, num_classes)
    raw = str(name).strip()
    raw = ALIASES.get(dataset, {}).get(raw, raw)

    def fail(reason: str) -> TaskError:
        return TaskError(f"invalid task {name!r} for {dataset} ({num_fg} classes): {reason}; "
                         f"{_valid_forms(dataset, num_fg)}")

    if not _NAME_RE.match(raw):
        raise fail("not of the form 'N-M' or 'a-b-c...'")
    numbers = [int(x) for x in raw.split("-")]
    if any(n <= 0 for n in numbers):
        raise fail("every number must be positive")
    if len(numbers) == 2:
        base, inc = numbers
        rest = num_fg - base
        if rest <= 0:
            raise fail(f"{base} base classes leave no class to add")
        if rest % inc:
            raise fail(f"the {rest} remaining classes are not a multiple of {inc}")
        sizes = [base] + [inc] * (rest // inc)
    else:
        if sum(numbers) != num_fg:
            raise fail(f"the step sizes sum to {sum(numbers)}, not {num_fg}")
        sizes = numbers
    return "-".join(str(n) for n in numbers), sizes


def _resolve_order(dataset: str, order: Order, num_fg: int) -> list[int]:
    if order is None:
        return list(range(1, num_fg + 1))
    if isinstance(order, bool):
        raise TaskError(f"invalid class order {order!r}: expected None, an int seed or a list of class ids")
    if isinstance(order, (int, np.integer)):
        if order < 0:
            raise TaskError(f"invalid order seed {order!r}: expected a non-negative int")
        return [int(c) + 1 for c in np.random.default_rng(int(order)).permutation(num_fg)]
    if isinstance(order, (str, bytes)):
        raise TaskError(f"invalid class order {order!r}: expected None, an int seed or a list of class ids")
    try:
        values = list(order)
    except TypeError:
        raise TaskError(f"invalid class order {order!r}: expected None, an int seed or a list of class ids") from None
    ids = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TaskError(f"invalid class order {values!r}: {v!r} is not an int class id")
        ids.append(int(v))
    if sorted(ids) != list(range(1, num_fg + 1)):
        missing = sorted(set(range(1, num_fg + 1)) - set(ids))
        extra = sorted({c for c in ids if not 1 <= c <= num_fg or ids.count(c) > 1})
        raise TaskError(f"invalid class order {ids!r} for {dataset}: expected a permutation of 1..{num_fg} "
                        f"(missing {missing}, invalid or repeated {extra})")
    return ids


def get_task(dataset: str, name: str, order: Order = None, num_classes: int | None = None) -> Task:
    """Build the task ``name`` of ``dataset``.

    ``order`` is ``None`` (dataset index order), an explicit permutation of the foreground ids
    ``1..C``, or an int seed (``numpy.random.default_rng(seed).permutation``, reproducible).
    ``num_classes`` gives the number of foreground classes of a dataset other than the built-in
    ones (:func:`num_foreground`).
    """
    num_fg = num_foreground(dataset, num_classes)
    canonical, sizes = parse_task_name(dataset, name, num_classes=num_fg)
    fg = _resolve_order(dataset, order, num_fg)
    steps: list[list[int]] = []
    start = 0
    for i, size in enumerate(sizes):
        chunk = fg[start: start + size]
        steps.append([0] + chunk if i == 0 else chunk)
        start += size
    return Task(dataset=dataset, name=canonical, steps=steps, num_classes=num_fg + 1, order=fg)
