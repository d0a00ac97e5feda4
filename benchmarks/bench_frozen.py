"""Benchmark: one SSUL training iteration at step 1 against one MiB iteration at the same shapes.

SSUL trains only three of its heads at steps >= 1 (docs/methods.md "SSUL"): every parameter
outside them is frozen, every BatchNorm in eval mode, so (1) autograd records nothing through the
frozen trunk (backbone and ASPP head), and (2) the old model's trunk *is* the new model's, so the
engine computes it once for both (``Trainee.shared_trunk``, :func:`ucdseg.engine.loop.shares_trunk`).
Each case is built as the engine builds a step 1 (``build.step_model`` with the method's model
spec, ``load_previous_step`` and the method's classifier init, ``build.optimizer_and_schedule``
with its parameter groups, its ``train_mode``) and timed through
:func:`ucdseg.engine.loop.train_one_iteration`, round-robin so that a change of machine load hits
every case alike:

* ``mib``: MiB at step 1 (new and old model forwards, UNCE + UNKD, backward through the whole model);
* ``ssul``: SSUL at step 1 as the engine runs it (shared trunk, heads only);
* ``ssul_unshared``: the same SSUL step with the trunk computed twice (the old model's forward and
  the new model's), to show what the sharing saves.

Set-up (full run): DeepLab-v3 ResNet-50, output stride 16, random init, batch 4, 256 x 256,
``classes_per_step = [16, 1]`` (VOC 15-1, step 1). Target: SSUL's iteration <= 0.4 x MiB's,
judged on the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import NEW_CLASS, make_batch  # noqa: E402
from common import load_average, log, median  # noqa: E402

FULL = {"backbone": "resnet50", "batch": 4, "crop": 256, "repeats": 5}
QUICK = {"backbone": "resnet18", "batch": 2, "crop": 64, "repeats": 2}
CASES = ("mib", "ssul", "ssul_unshared")


def _trainee(method_name: str, cfg: dict):
    """(trainee, criterion, loop options) of step 1 of ``method_name``, built as the engine does."""
    from ucdseg.config import load_config
    from ucdseg.engine import build
    from ucdseg.engine.loop import Criterion, Trainee, shares_trunk
    from ucdseg.models import load_previous_step

    run_cfg = load_config(None, [f"method.name={method_name}", f"model.backbone={cfg['backbone']}",
                                 "model.output_stride=16", f"train.batch_size={cfg['batch']}", "data.dataset=voc"])
    method = build.build_method(run_cfg)
    device = torch.device("cpu")
    torch.manual_seed(0)
    old_model = build.step_model(run_cfg, [NEW_CLASS], device).eval().requires_grad_(False)
    model = build.step_model(run_cfg, [NEW_CLASS, 1], device)
    load_previous_step(model, old_model.state_dict())
    model.init_new_classifier(method.classifier_init)
    optimizer, scheduler = build.optimizer_and_schedule(run_cfg, model, 1, total=1000)
    trainee = Trainee(model, model, old_model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    model.train()
    if method.train_mode is not None:
        method.train_mode(model, 1)
    trainee.shared_trunk = shares_trunk(model, old_model)
    options = build.method_options(run_cfg)
    criterion = Criterion(method, build.method_weights(run_cfg), options, 1, NEW_CLASS, 1)
    return trainee, criterion, build.loop_options(run_cfg, 1)


def run(quick: bool = False) -> dict:
    from ucdseg.engine.loop import train_one_iteration
    from ucdseg.engine.process_group import Dist

    cfg = QUICK if quick else FULL
    images, labels = make_batch(cfg["batch"], cfg["crop"])
    dist = Dist(0, 1, 0, torch.device("cpu"))
    cases = {"mib": _trainee("mib", cfg), "ssul": _trainee("ssul", cfg)}
    cases["ssul_unshared"] = _trainee("ssul", cfg)
    cases["ssul_unshared"][0].shared_trunk = False
    ssul_labels = torch.where(labels == 255, labels, labels + 1)  # SSUL's shifted labels (bg 1, class 17)
    trained = {name: sum(p.numel() for p in c[0].model.parameters() if p.requires_grad) for name, c in cases.items()}

    def step(name: str) -> float:
        trainee, criterion, opts = cases[name]
        y = labels if name == "mib" else ssul_labels
        t0 = time.perf_counter()
        train_one_iteration(trainee, criterion, images, y.clone(), opts, dist)
        return time.perf_counter() - t0

    for name in CASES:  # warm-up
        step(name)
    rounds = []
    for r in range(cfg["repeats"]):
        rounds.append({name: step(name) for name in CASES})
        log(f"  frozen round {r + 1}/{cfg['repeats']}: " + ", ".join(f"{n} {rounds[-1][n]:.2f} s" for n in CASES))
    ratio = median([r["ssul"] / r["mib"] for r in rounds])
    return {
        "config": {**cfg, "classes_per_step": [NEW_CLASS, 1], "output_stride": 16, "step": 1},
        "steps": {name: {"median_s": median([r[name] for r in rounds]), "runs_s": [r[name] for r in rounds],
                         "trained_parameters": trained[name], "shared_trunk": cases[name][0].shared_trunk}
                  for name in CASES},
        "ssul_over_mib_median_of_round_ratios": ratio,
        "unshared_over_mib_median_of_round_ratios": median([r["ssul_unshared"] / r["mib"] for r in rounds]),
        "target_le_0.4": ratio <= 0.4,
        "load_after": load_average(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
