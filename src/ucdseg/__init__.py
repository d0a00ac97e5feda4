"""ucdseg: class-incremental semantic segmentation (UCD, MiB, PLOP and baselines)."""

__version__ = "0.1.0"
