"""A run folder's config against this command's: which keys differ, with their values, in one line.

:class:`~ucdseg.engine.run_folder.RunFolder` refuses to continue a folder with another config, but for
the keys that cannot change what is computed (``run_folder.RESUMABLE_KEYS``). Among those,
:data:`EVALUATED_KEYS` shaped what a finished step wrote besides its weights: ``eval.num_images``
is the number of validation images drawn in ``predictions/stepN.png`` and recorded in
``results.json``'s config. They may change while no step is finished; after one, a changed value
would make ``config.yaml`` disagree with ``results.json`` and the predictions, so it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import _MISSING, RunConfig, _lookup, migrate

#: Resumable keys that a finished step's outputs depend on (results.json's config, predictions/).
EVALUATED_KEYS = frozenset({"eval.num_images"})


def has_finished_step(checkpoints: Path) -> bool:
    """Whether a step finished in the run folder whose ``checkpoints`` folder this is (a
    ``stepN.pt``; a mid-step ``stepN-last.pt`` was not evaluated yet)."""
    return checkpoints.is_dir() and any(not p.name.endswith("-last.pt") for p in checkpoints.glob("step*.pt"))


def _value(config: dict, key: str):
    """The value of dotted ``key`` in a saved ``config`` (its default when the key is missing)."""
    value = _lookup(migrate(config), key)
    return _lookup(RunConfig(), key) if value is _MISSING else value


def _shown(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:36] + " ..."


def changed_config_error(folder: Path, saved: dict, new: dict, keys: list[str]) -> ValueError:
    """The one-line refusal to continue ``folder`` (its config ``saved``) with ``new``: the
    differing ``keys``, their values there and now, and how to go on."""
    listed = keys[:6] + (["..."] if len(keys) > 6 else [])
    there = ", ".join(k if k == "..." else f"{k}={_shown(_value(saved, k))}" for k in listed)
    now = ", ".join(k if k == "..." else f"{k}={_shown(_value(new, k))}" for k in listed)
    evaluated = sorted(set(keys) & EVALUATED_KEYS)
    hint = ""
    if evaluated:
        hint = (f"; its finished steps were evaluated with the saved {', '.join(evaluated)} (results.json, "
                "predictions/), so it cannot change now (`ucdseg eval CHECKPOINT --save-predictions DIR` predicts "
                "every validation image of a step)")
    return ValueError(f"run directory {folder} was started with a different config (differing keys: "
                      f"{', '.join(keys)}); it has {there}, this command {now}{hint}; use another name=, or run "
                      f"its saved config {folder / 'config.yaml'}")
