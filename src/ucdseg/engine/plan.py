"""A run's plan before it trains: per step its classes, training images and iterations.

:func:`step_plan` is what ``ucdseg run --dry-run`` prints and what sizes the run's overall
progress bar. It selects each step's images exactly as the run does (the cached class presence
of the masks and :func:`ucdseg.label_maps.select_images`, ``data.setting`` and the seed), and
counts iterations with :func:`.build.step_iterations`. ``write_cache=False`` reads a valid
presence cache (or the masks) and writes nothing.
"""

from __future__ import annotations

from ..config import RunConfig
from ..data.index import scan_presence
from ..label_maps import select_images
from ..tasks import Task
from .build import step_iterations

__all__ = ["step_plan"]


def step_plan(cfg: RunConfig, task: Task, train_set, progress: bool = False, write_cache: bool = True) -> list[dict]:
    """One row per step of ``task`` (the task the run trains: the joint task for joint training):
    ``{"step", "classes" (dataset ids), "num_images", "iterations", "lr"}``."""
    presence = scan_presence(train_set, progress=progress, cache_dir=cfg.data.cache_dir, write_cache=write_cache)
    rows = []
    for step in range(task.num_steps):
        indices = select_images(presence, task, step, cfg.data.setting, seed=cfg.seed)
        rows.append({"step": step, "classes": list(task.steps[step]), "num_images": len(indices),
                     "iterations": step_iterations(cfg, step, len(indices)),
                     "lr": cfg.train.lr if step == 0 else cfg.train.lr_next})
    return rows


class OverallBar:
    """The run's outer progress bar (``tqdm.auto``: a widget in a notebook): the iterations of every
    step up to ``last``, those of the finished steps counted from the start, so its ETA is the
    run's; its label says how many steps are done (``run: 2/6 steps``). The step's own bar is
    drawn below it (:func:`.loop.train_iterations`). Evaluation time is not in its ETA."""

    def __init__(self, plan: list[dict], done: set[int], last: int, label: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.iterations = {row["step"]: row["iterations"] for row in plan if row["step"] <= last}
        self.finished = {step for step in done if step in self.iterations}
        self.label = label
        self.bar = tqdm(total=sum(self.iterations.values()), initial=self._counted(), desc=self._desc(), unit="it",
                        position=0, dynamic_ncols=True, disable=not enabled)

    def _counted(self) -> int:
        return sum(self.iterations[step] for step in self.finished)

    def _desc(self) -> str:
        return f"{self.label}: {len(self.finished)}/{len(self.iterations)} steps"

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def skip(self, n: int) -> None:
        """Iterations done by an earlier session (a mid-step checkpoint): counted, not timed."""
        self._move(self.bar.n + n)

    def _move(self, n: int) -> None:
        self.bar.n = n
        self.bar.last_print_n = n
        self.bar.refresh()

    def step_done(self, step: int) -> None:
        """Step ``step`` finished (trained, or taken from a checkpoint or another run)."""
        self.finished.add(step)
        self.bar.set_description_str(self._desc(), refresh=False)
        self._move(self._counted())

    def close(self) -> None:
        self.bar.close()
