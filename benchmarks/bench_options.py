"""Benchmark 2b: the training-step options ``train.channels_last`` and ``train.compile``.

Same set-up as ``bench_train_step.py`` (full run: DeepLab-v3 ResNet-50, OS 16, random init,
batch 4, 256 x 256 crops, step 1 of ``classes_per_step = [16, 1]``) and the same step as the
engine's ``Trainer.train_step`` for MiB+UCD: new-model forward, old-model forward (no grad), the
method's losses, backward, SGD step. Three variants, each with its own copy of the same weights:

* ``default``: NCHW tensors, eager PyTorch;
* ``channels_last``: model, old model and images in NHWC (``train.channels_last=true``);
* ``compile``: the training forward through ``torch.compile`` (``train.compile=true``; the old
  model stays eager, as in the engine). Skipped, with the reason, if torch.compile fails here
  (inductor needs a C++ compiler).

Each variant runs two untimed warm-up steps (the first call of ``compile`` is its compilation,
reported as ``first_call_s``), then the variants are timed round-robin (one step of each per
round) and each variant's ratio to ``default`` is the median over rounds of
``step(variant) / step(default)``. The first steps of the variants start from identical weights
on the same batch, so their loss values are compared too (they may differ in the last bits).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import FULL, NEW_CLASS, QUICK, make_batch  # noqa: E402
from common import load_average, log, median  # noqa: E402

METHOD = "mib+ucd"
VARIANTS = ("default", "channels_last", "compile")
WARMUP = 2
REPEATS = {"full": 5, "quick": 3}  # quick steps take well under a second


def _first_line(exc: BaseException) -> str:
    text = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}"[:300]


def run(quick: bool = False) -> dict:
    from ucdseg.methods import LossContext, get_method
    from ucdseg.models import build_model, load_previous_step

    cfg = dict(QUICK if quick else FULL)
    cfg["repeats"] = REPEATS["quick" if quick else "full"]
    torch.manual_seed(0)
    base_old = build_model(cfg["backbone"], [NEW_CLASS]).eval().requires_grad_(False)
    base = build_model(cfg["backbone"], [NEW_CLASS, 1])
    load_previous_step(base, base_old.state_dict())
    base.init_new_classifier("mib")
    images, labels = make_batch(cfg["batch"], cfg["crop"])
    method = get_method(METHOD)
    weights = method.weights()
    options = get_method(METHOD).resolve_options()

    setups: dict[str, dict] = {}
    for name in VARIANTS:
        model, old_model = copy.deepcopy(base).train(), copy.deepcopy(base_old)
        fmt = torch.channels_last if name == "channels_last" else torch.preserve_format
        if name == "channels_last":
            model.to(memory_format=fmt)
            old_model.to(memory_format=fmt)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
        forward = torch.compile(model) if name == "compile" else model
        setups[name] = {"model": model, "old": old_model, "forward": forward, "optimizer": optimizer,
                        "images": images.to(memory_format=fmt)}

    def step(name: str) -> tuple[float, float]:
        s = setups[name]
        t0 = time.perf_counter()
        out = s["forward"](s["images"])
        with torch.no_grad():
            old = s["old"](s["images"])
        ctx = LossContext(1, out, old, labels.clone(), NEW_CLASS, 1, options=options)
        loss = sum(method.losses(ctx, weights).values())
        s["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        s["optimizer"].step()
        return time.perf_counter() - t0, loss.item()

    import torch._inductor.config as inductor_config

    result: dict = {"config": {**cfg, "method": METHOD, "classes_per_step": [NEW_CLASS, 1], "output_stride": 16,
                               "warmup_steps": WARMUP, "old_model_forward_included": True,
                               # the first call of "compile" is short when this on-disk cache holds its graphs
                               "inductor_fx_graph_cache": bool(inductor_config.fx_graph_cache)},
                    "variants": {}, "unavailable": {}}
    active = []
    for name in VARIANTS:  # warm-up; the first call of "compile" compiles
        try:
            first, loss = step(name)
            for _ in range(WARMUP - 1):
                step(name)
        except Exception as exc:  # noqa: BLE001 -- reported in the JSON and the table, not hidden
            if name != "compile":
                raise
            result["unavailable"][name] = _first_line(exc)
            log(f"  options: {name} unavailable: {result['unavailable'][name]}")
            continue
        active.append(name)
        result["variants"][name] = {"first_call_s": first, "first_loss": loss}
        log(f"  options: {name} first call {first:.2f} s, loss {loss:.6f}")

    rounds: list[dict[str, float]] = []
    for r in range(cfg["repeats"]):
        rounds.append({name: step(name)[0] for name in active})
        log(f"  options round {r + 1}/{cfg['repeats']}: " + ", ".join(f"{n} {rounds[-1][n]:.2f} s" for n in active))

    ref_loss = result["variants"]["default"]["first_loss"]
    for name in active:
        runs = [r[name] for r in rounds]
        v = result["variants"][name]
        v.update(median_s=median(runs), runs_s=runs,
                 ratio_to_default=median([r[name] / r["default"] for r in rounds]),
                 first_loss_rel_diff=abs(v["first_loss"] - ref_loss) / abs(ref_loss))
    result["load_after"] = load_average()
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
