"""``ucdseg run CONFIG --dry-run``: what a run would do, without training or writing anything.

It prints the resolved config (what ``config.yaml`` would hold), the state of the run folder (new,
or which steps are finished and where the run would continue), per step the classes (ids and
names), the training images selected by ``data.setting``, the iterations and the learning rate,
the validation images, and a training-memory estimate (:mod:`.memory`). The data are only read:
the embedded benchmark is not generated, the image-index cache is read when valid and never
written (:func:`ucdseg.data.index.scan_presence` with ``write_cache=False``), the run folder is
not created.
"""

from __future__ import annotations

import json

from ..config import RunConfig, to_yaml
from ..data.base import DataFileError, dataset_meta
from ..data.index import _compact
from ..step_range import parse_steps
from . import build
from .plan import step_plan
from .runlog import _steps_text

__all__ = ["dry_run"]


def _folder_state(cfg: RunConfig, num_steps: int) -> tuple[str, set[int]]:
    """A sentence on the run folder, and its finished steps (read from results.json, if any)."""
    folder = cfg.run_dir
    if not folder.exists():
        return f"{folder} does not exist: a new run", set()
    try:
        steps = json.loads((folder / "results.json").read_text(encoding="utf-8"))["steps"]
        done = {int(s["step"]) for s in steps}
    except (OSError, ValueError, KeyError, TypeError):
        done = set()
    if not done:
        return f"{folder} exists, no step finished: the run would start at step 0", set()
    if len(done) >= num_steps:
        return f"{folder} holds every step: nothing would be trained", done
    following = min(set(range(num_steps)) - done)
    return (f"{folder} holds {_steps_text(sorted(done))}: the run would continue at step {following}"
            + (" (from its mid-step checkpoint)" if (folder / "checkpoints" / f"step{following}-last.pt").exists()
               else ""), done)


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB" if gib * 1024 >= 1 else f"{gib * 1024:.2f} MiB"


def dry_run(cfg: RunConfig, progress: bool = True) -> str:
    """The text of ``--dry-run`` for ``cfg``."""
    task = build.build_task(cfg)
    trained = build.training_task(cfg, task)
    method = build.build_method(cfg)
    first, last = parse_steps(cfg.train.steps, trained.num_steps)
    state, done = _folder_state(cfg, trained.num_steps)
    lines = ["# resolved config (config.yaml of the run)", to_yaml(cfg).rstrip(), "", "# plan",
             f"run folder: {state}",
             f"task: {task.dataset} {task.name} ({cfg.data.setting}), {trained.num_steps} step(s)"
             + (" (joint training: every class in one step)" if trained is not task and trained.num_steps < task.num_steps else ""),
             f"method: {method.name} [{', '.join(f'{k}={v:g}' for k, v in build.method_weights(cfg).items())}]"]
    if cfg.train.steps is not None:
        lines.append(f"train.steps={cfg.train.steps}: this command trains up to step {last}, then stops")
    names, plan, val_images = None, None, None
    try:
        names = dataset_meta(cfg.data.dataset, cfg.data.root).class_names
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # a folder dataset without its classes.yaml
        pass
    try:
        train_set = build.open_dataset(cfg, "train", prepare=False)
        val_set = build.open_dataset(cfg, "val", prepare=False)
        names = train_set.meta.class_names
        plan = step_plan(cfg, trained, train_set, progress=progress, write_cache=False)
        val_images = len(val_set)
        lines.append(f"data: {cfg.data.dataset} at {train_set.root}: {len(train_set)} train / {val_images} val images")
    except (FileNotFoundError, DataFileError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        generated = " (`ucdseg run` generates the embedded benchmark first)" if cfg.data.dataset == "embedded" else ""
        lines.append(f"data: not readable, so no image or iteration counts{generated}: {reason}")
    lines += ["", f"{'step':>4}  {'classes':<12} {'train images':>12} {'iterations':>10} {'lr':>8}  class names"]
    for step, classes in enumerate(trained.steps):
        row = plan[step] if plan else None
        shown = ", ".join(names[c] for c in classes) if names else ""
        mark = " (done)" if step in done else (" (not in train.steps)" if step > last or step < first else "")
        lines.append(f"{step:>4}  {_compact(classes):<12} {row['num_images'] if row else '?':>12} "
                     f"{row['iterations'] if row else '?':>10} {cfg.train.lr if step == 0 else cfg.train.lr_next:>8g}  "
                     f"{shown[:100] + (' ...' if len(shown) > 100 else '')}{mark}")
    if plan:
        todo = [r for r in plan if r["step"] not in done and first <= r["step"] <= last]
        lines.append(f"iterations to train: {sum(r['iterations'] for r in todo)} (global batch {cfg.train.batch_size});"
                     f" validation after each step on {val_images} images (eval.images={cfg.eval.images})")
    try:
        from .memory_estimate import estimate_memory

        est = estimate_memory(cfg, trained.classes_per_step, world_size=1)
        lines.append(f"memory estimate (one process, largest step): {_size(est['gib'])} = weights "
                     f"{_size(est['weights_gib'])} + micro-batch {est['micro_batch']} x {_size(est['activations_gib'])} "
                     f"of activations per {est['crop']} px image (measured at {est['probe_crop']} px, scaled by "
                     f"area, in fp32: train.amp roughly halves the activations; without the CUDA context; under "
                     f"torchrun the micro-batch is split across the processes)")
    except Exception as exc:  # an estimate must never stop the plan
        lines.append(f"memory estimate: none ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    lines.append("nothing was trained or written (--dry-run)")
    return "\n".join(lines)
