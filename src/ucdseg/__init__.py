"""ucdseg: class-incremental semantic segmentation (UCD, MiB, PLOP and baselines)."""

from .code_version import __version__

__all__ = ["__version__", "run"]


def run(config=None, progress: bool = True, **overrides) -> dict:
    """Run (or continue) every step of a config; returns its results (``results.json``'s content).

    ``config``: a YAML file, a packaged config's name (``embedded/mib``), a RunConfig or None;
    ``overrides``: config keys, e.g. ``seed=1, train={"iterations": 40}`` (:mod:`ucdseg.api`).
    """
    from .api import run as _run

    return _run(config, progress=progress, **overrides)
