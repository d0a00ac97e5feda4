"""``train.steps`` (``ucdseg run ... --steps 0-1``): train only some steps of a task, then stop.

MiB and PLOP train one step per command (``--step 2``); ucdseg trains every step of a task in
one command and continues a run folder when run again. ``train.steps`` bridges the two: the run
trains the steps of the range that are not finished yet and stops after its last step; running
the same command again without it (or with a later range) continues from there. The steps before
the range must be finished already (each step starts from the one before): a range that skips an
unfinished step is refused before anything trains.

Accepted values: ``N`` (step N only), ``A-B`` (steps A to B), ``A-`` (from A to the end) and
``-B`` (from the start to B); steps are numbered from 0, as ``checkpoints/stepN.pt``.
"""

from __future__ import annotations

import re

__all__ = ["parse_steps"]

_FORM = re.compile(r"^\s*(\d*)\s*(-?)\s*(\d*)\s*$")


def parse_steps(value: str | int | None, num_steps: int) -> tuple[int, int]:
    """``(first, last)`` of ``train.steps=value`` for a task of ``num_steps`` steps (both
    included); ``None`` means every step. A malformed or out-of-range value is a ValueError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0, num_steps - 1
    text = str(value)
    match = _FORM.match(text)
    valid = f"the run has steps 0-{num_steps - 1}" if num_steps > 1 else "the run has one step, 0"
    if isinstance(value, bool) or match is None or not (match.group(1) or match.group(3)) or (
            not match.group(2) and match.group(3)):
        raise ValueError(f"config key 'train.steps' is {value!r}; expected a step N, a range A-B, A- or -B "
                         f"({valid})")
    first = int(match.group(1)) if match.group(1) else 0
    last = int(match.group(3)) if match.group(3) else (num_steps - 1 if match.group(2) else first)
    if first > last or last >= num_steps:
        raise ValueError(f"config key 'train.steps' is {value!r}; {valid}")
    return first, last
