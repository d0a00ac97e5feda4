"""What the exact one-process vs two-process comparison of ``tests/e2e/test_distributed.py`` runs, importable
by the torchrun processes too (their launcher puts this folder on ``sys.path``).

Why these choices make the two runs equal (to float rounding), not merely close:

* ``train.bn=frozen``: BatchNorm normalises with its running statistics, so a sample's output does
  not depend on which other samples share its process (with batch statistics, each process would
  normalise over its 4 images instead of the global 8).
* DDP *averages* the processes' gradients: the update follows ``(1/W) sum_r L_r``. That equals the
  one-process loss ``L`` of the global batch when every ``L_r`` divides its process's sum by the
  same count, ``N/W``. Losses averaged over **all** pixels of the process's batch (void pixels
  counting 0) do so: every process has ``B/W`` crops of the same size. Losses averaged over the
  **non-void** pixels only (``F.cross_entropy``'s default reduction with ``ignore_index``) divide by
  the process's own count of labelled pixels, which differs between the processes (the embedded
  benchmark has a void ring around every object, and padded crops), so the average of the
  per-process means is not the global mean.
* Hence the method: ``plop+ucd`` (PLOP's CE is averaged over all pixels as in PLOP's release, POD
  is a mean over images, the entropy thresholds are all-reduced, and UCD with
  ``method.options.gather=true`` contrasts the global batch and scales its gradient for DDP), with the
  all-pixel cross-entropy below at step 0, so that the comparison does not depend on how the
  built-in step-0 term is normalised.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch.nn.functional as F

NAME = "plop+ucd-exact"


def all_pixel_cross_entropy(ctx):
    """Cross-entropy summed over the labelled pixels, divided by the number of all pixels."""
    return F.cross_entropy(ctx.out.logits, ctx.labels, ignore_index=255, reduction="sum") / ctx.labels.numel()


def register_method(base: str = "plop+ucd") -> str:
    """Registers ``base`` with the all-pixel cross-entropy at step 0 as ``{base}-exact``; its name."""
    from ucdseg.methods import get_method
    from ucdseg.methods.registry import register
    from ucdseg.registry import METHODS

    name = f"{base}-exact"
    if name not in METHODS:
        register(dataclasses.replace(get_method(base), name=name, description=f"{base}, all-pixel CE at step 0",
                                     first_step_terms={"ce": (all_pixel_cross_entropy, 1.0)}))
    return name


@contextmanager
def registered(*bases: str) -> Iterator[list[str]]:
    """The ``-exact`` variants of ``bases`` registered while active (the registry is left as it was)."""
    from ucdseg.methods.registry import unregister

    names = [register_method(base) for base in bases]
    try:
        yield names
    finally:
        for name in names:
            unregister(name)


def launch() -> int:
    """The torchrun processes' entry point: the method above, the tiny test model, then the CLI."""
    import conftest  # noqa: F401  (registers model.backbone=tiny)
    from ucdseg.cli import main

    register_method("plop+ucd")
    register_method("plop")
    register_method("ewc")
    return main()


if __name__ == "__main__":
    raise SystemExit(launch())
