"""A step 0 shared with another run (``train.step0_from``), as papers share it between methods.

Step 0 is taken from another run's folder (its checkpoint and record are copied) or from a
step-0 checkpoint file (copied, and evaluated here), when both runs' step 0 computes the same
thing: same seed, data, task, model and step-0 training settings, a method whose step 0 is the
same (:attr:`~ucdseg.methods.Method.first_step`) with the same values of the options both methods
read, and the same step-0 classes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .. import io
from ..config import from_dict, to_dict
from ..methods import get_method
from . import build
from .evaluation import evaluate_step
from .process_group import barrier
from .run_folder import RESUMABLE_KEYS, config_differences
from .build import RunContext

# Settings a reused step 0 must share with this run (the method may differ: step 0 is plain CE).
STEP0_TRAIN_KEYS = {f"train.{k}" for k in ("batch_size", "epochs", "iterations", "lr", "momentum", "nesterov",
                                           "weight_decay", "poly_power", "amp", "bn", "accumulate")}



def _step0_classes(source: Path, config: dict) -> list[int]:
    """The classes (dataset ids, model order) of the step 0 that ``config`` trained."""
    try:
        cfg = from_dict(config)
        return build.training_task(cfg).steps[0]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"train.step0_from={source}: its config cannot be read: {exc}") from None


def reuse_step0(ctx: RunContext, source: Path) -> dict:
    """Take step 0 from another run with the same data, task and model (as papers share it):
    its run directory (step 0's checkpoint and record are copied) or a step-0 checkpoint file
    (copied, and evaluated here for step 0's record)."""
    if source.is_file():
        state = io.load_checkpoint(source)
        if "config" not in state or state.get("step") != 0 or "classes_per_step" not in state:
            raise ValueError(f"train.step0_from={source}: not a step-0 checkpoint written by ucdseg (it has "
                             f"{'step ' + str(state['step']) if 'step' in state else 'no step or config'}); "
                             "give a run directory or its checkpoints/step0.pt")
        _check_source(ctx, source, state["config"], _step0_classes(source, state["config"]), eval_keys=False)
        checkpoint, model = source, _check_weights(ctx, source, state["model"])
        record = evaluate_step(model, ctx.cfg, ctx.train_task, ctx.num_base, ctx.val_set, 0,
                               ctx.dist, ctx.progress)
        record["step0_from"] = str(source)
    elif (source / "results.json").is_file():
        results = io.read_json(source / "results.json", "results file")
        _check_source(ctx, source, results["config"], results["steps"][0]["classes"], eval_keys=True)
        checkpoint, record = source / "checkpoints" / "step0.pt", results["steps"][0]
        _check_weights(ctx, source, io.load_checkpoint(checkpoint, map_location=ctx.device)["model"])
    else:
        raise FileNotFoundError(f"train.step0_from={source}: neither a checkpoint file nor a run directory "
                                "(with results.json)")
    if ctx.dist.is_main:
        with io.atomic_path(ctx.folder.final(0)) as tmp:
            shutil.copyfile(checkpoint, tmp)
        record = {**record, "checkpoint_sha256": io.sha256(ctx.folder.final(0))}
    barrier()
    return record


def _check_source(ctx: RunContext, source: Path, theirs: dict, their_classes: list[int], eval_keys: bool) -> None:
    """Same seed, data, task, model and step-0 training settings (and, when step 0's record is
    copied rather than measured here, the same evaluation conventions); same step-0 classes."""
    keys = STEP0_TRAIN_KEYS | ({"eval.images", "eval.unseen"} if eval_keys else set())
    # exemplar memory starts at step 1: it is no setting of step 0 (ssul-m shares ssul's step 0)
    diff = [k for k in config_differences(theirs, to_dict(ctx.cfg), RESUMABLE_KEYS | {"data.memory.size"})
            if k == "seed" or k.split(".")[0] in ("data", "task", "model") or k in keys]
    if diff:
        raise ValueError(f"train.step0_from={source}: its step 0 was trained with different settings ({', '.join(diff)})")
    if their_classes != ctx.train_task.steps[0]:
        raise ValueError(f"train.step0_from={source}: its step 0 has classes {their_classes}, "
                         f"this run's step 0 needs {ctx.train_task.steps[0]}; joint runs cannot share step 0")
    their_method = get_method(theirs.get("method", {}).get("name", "ft"))
    if their_method.first_step != ctx.method.first_step:
        theirs_, mine_ = their_method.first_step, ctx.method.first_step
        if "=" in theirs_ or "=" in mine_:  # no readable name: say what differs in words
            raise ValueError(f"train.step0_from={source}: its step 0 was trained by {their_method.name}, whose "
                             f"step 0 computes other terms or hooks than {ctx.method.name}'s; it cannot be shared")
        raise ValueError(f"train.step0_from={source}: its step 0 was trained by {their_method.name} with the "
                         f"{theirs_} loss, {ctx.method.name} trains step 0 with {mine_}; it cannot be shared")
    # the options both methods have may change step 0 (DKD's pos_weight_step0, SSUL's unknown rule)
    mine = ctx.options
    their_options = their_method.resolve_options(theirs.get("method", {}).get("options") or {})
    differing = sorted(k for k in set(mine) & set(their_options) if mine[k] != their_options[k])
    if differing:
        raise ValueError(f"train.step0_from={source}: its step 0 was trained with other method options "
                         f"({', '.join(f'method.options.{k}={their_options[k]!r}' for k in differing)}); it cannot "
                         "be shared")


def _check_weights(ctx: RunContext, source: Path, weights: dict) -> torch.nn.Module:
    """This run's step-0 model holding ``weights`` (all of them, with the same shapes)."""
    model = build.step_model(ctx.cfg, ctx.train_task.classes_per_step[:1], ctx.device)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ValueError(f"train.step0_from={source}: its weights do not fit this run's step-0 model "
                         f"({ctx.cfg.model.backbone}, {ctx.train_task.classes_per_step[0]} classes): {first}") from None
    return model
