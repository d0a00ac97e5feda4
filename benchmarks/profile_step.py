"""Benchmark 2c: where the time of a MiB+UCD training step goes (``torch.profiler``).

    python benchmarks/profile_step.py [--quick] [--threads N] [--json FILE]

Same step as ``bench_train_step.py`` (full run: DeepLab-v3 ResNet-50, OS 16, random init, batch 4,
256 x 256 crops, step 1 of ``classes_per_step = [16, 1]``), plus the fetch of one training batch
of the same shape from the embedded benchmark (``StepDataset`` + ``train_transforms(crop)``,
step 1 of embedded 6-1, ``DataLoader`` with ``num_workers=0``, so the work happens in this
process; the engine's default is also 0 workers). The 64 px embedded images are upsampled by the
random resized crop, so the fetch stands for the per-batch cost of our data code, not for the
decoding of large JPEGs.

Every phase of an iteration runs under a ``torch.profiler.record_function`` label set here, in
the benchmark (the library is not instrumented):

* ours: ``data: fetch`` (inside it ``data: read``, ``data: label mapping (LUT)``,
  ``data: transforms``), ``old model forward``, ``loss <term> forward`` and
  ``loss <term> backward`` for unce, unkd and ucd;
* PyTorch's kernels on the model being trained: ``new model forward``, ``new model backward``,
  ``SGD step``.

To separate the loss terms' backward from the network's, the terms are computed on detached
copies of the new model's outputs (logits and features); each term's backward fills their
gradients, which are then back-propagated through the network. This is the same arithmetic as
``loss.backward()`` on the sum.

After one warm-up iteration, the iterations are timed without the profiler (wall clock per phase,
medians) and then run under it (``torch.profiler``, CPU activity); the top operators by self CPU
time and the phases' inclusive CPU time come from the profiled iterations, whose many small
operators the profiler slows down more than the large convolutions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import FULL, NEW_CLASS, QUICK, make_batch  # noqa: E402
from common import load_average, log, median  # noqa: E402

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
METHOD = "mib+ucd"
DATA_TASK = ("embedded", "6-1")
ITERATIONS = {"full": 3, "quick": 2}
TOP = 15
DATA_LABELS = ("data: read", "data: label mapping (LUT)", "data: transforms")


def phase_groups(terms: list[str]) -> dict[str, list[str]]:
    """The top-level phases of an iteration, grouped into our code and PyTorch's kernels."""
    return {
        "ours": ["data: fetch", "old model forward",
                 *[f"loss {t} {d}" for t in terms for d in ("forward", "backward")]],
        "pytorch": ["new model forward", "new model backward", "SGD step"],
    }


def _data_loader(tmp: Path, batch: int, crop: int, quick: bool):
    from torch.utils.data import DataLoader

    from ucdseg.data import StepDataset, build_dataset, train_transforms
    from ucdseg.embedded import prepare_embedded
    from ucdseg.label_maps import train_lut
    from ucdseg.tasks import get_task

    class LabelledStepDataset(StepDataset):
        """``StepDataset.__getitem__`` with a profiler label around each of its parts."""

        def __getitem__(self, i: int):
            j = self.indices[i]
            with record_function(DATA_LABELS[0]):
                image, raw = self.base.load_image(j), self.base.load_mask(j)
            with record_function(DATA_LABELS[1]):
                mask = self.lut[raw]
            with record_function(DATA_LABELS[2]):
                return self.transform(image, mask)

    sizes = {"num_train": 64, "num_val": 16} if quick else {"num_train": 200, "num_val": 16}
    root = prepare_embedded(tmp / "embedded", fashion_mnist_dir=FASHION_MNIST, progress=False, **sizes)
    task = get_task(*DATA_TASK)
    train = build_dataset("embedded", root, "train")
    dataset = LabelledStepDataset(train, range(len(train)), train_lut(task, 1), train_transforms(crop))
    for i in (0, 1):  # the copy above must do what StepDataset does
        torch.manual_seed(i)
        a = dataset[i]
        torch.manual_seed(i)
        b = StepDataset.__getitem__(dataset, i)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "LabelledStepDataset differs from StepDataset"
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, drop_last=True,
                        generator=torch.Generator().manual_seed(0))

    def batches():
        while True:
            yield from loader

    return batches(), sizes


def run(quick: bool = False) -> dict:
    from ucdseg.methods import LossContext, get_method
    from ucdseg.models import build_model, load_previous_step

    cfg = dict(QUICK if quick else FULL)
    cfg.pop("repeats")
    iterations = ITERATIONS["quick" if quick else "full"]
    torch.manual_seed(0)
    old_model = build_model(cfg["backbone"], [NEW_CLASS]).eval().requires_grad_(False)
    model = build_model(cfg["backbone"], [NEW_CLASS, 1])
    load_previous_step(model, old_model.state_dict())
    model.init_new_classifier("mib")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    images, labels = make_batch(cfg["batch"], cfg["crop"])
    method = get_method(METHOD)
    assert method.targets is None and method.before_step is None, "the phases below assume MiB+UCD's hooks"
    weights, options = method.weights(), get_method(METHOD).resolve_options()
    terms = [name for name in method.terms if weights[name]]
    bound = {name: method.terms[name].bind(options) for name in terms}
    groups = phase_groups(terms)

    def iteration(batches, wall: dict[str, float]) -> None:
        @contextlib.contextmanager
        def phase(name: str):
            t0 = time.perf_counter()
            with record_function(name):
                yield
            wall[name] = wall.get(name, 0.0) + time.perf_counter() - t0

        with phase("data: fetch"):
            next(batches)  # a real batch of the same shape; the step below uses the VOC-like one
        with phase("new model forward"):
            out = model(images)
        with phase("old model forward"), torch.no_grad():
            old = old_model(images)
        leaves = {k: getattr(out, k).detach().requires_grad_(True) for k in ("logits", "low_logits", "features")}
        ctx = LossContext(1, out._replace(**leaves), old, labels.clone(), NEW_CLASS, 1, options=options)
        values = {}
        for name in terms:
            with phase(f"loss {name} forward"):
                values[name] = bound[name](ctx) * weights[name]
        optimizer.zero_grad(set_to_none=True)
        for name in terms:
            with phase(f"loss {name} backward"):
                values[name].backward()
        with phase("new model backward"):
            pairs = [(getattr(out, k), leaf.grad) for k, leaf in leaves.items() if leaf.grad is not None]
            torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        with phase("SGD step"):
            optimizer.step()

    with tempfile.TemporaryDirectory(prefix="ucdseg-profile-") as tmp:
        batches, data_sizes = _data_loader(Path(tmp), cfg["batch"], cfg["crop"], quick)
        iteration(batches, {})  # warm-up
        walls = []
        for i in range(iterations):
            walls.append({})
            t0 = time.perf_counter()
            iteration(batches, walls[-1])
            walls[-1]["iteration"] = time.perf_counter() - t0
            log(f"  profile: unprofiled iteration {i + 1}/{iterations} {walls[-1]['iteration']:.2f} s")
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iterations):
                iteration(batches, {})
        profiled_s = time.perf_counter() - t0
        log(f"  profile: {iterations} profiled iterations {profiled_s:.2f} s")

    averages = prof.key_averages()
    by_key = {e.key: e for e in averages}
    self_total = sum(e.self_cpu_time_total for e in averages)  # microseconds, all events
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    phases = {name: by_key[name].cpu_time_total / 1e6 / iterations for names in groups.values() for name in names}
    data_parts = {name: by_key[name].cpu_time_total / 1e6 / iterations for name in DATA_LABELS}
    total = sum(phases.values())
    wall = {name: median([w[name] for w in walls]) for name in walls[0]}
    wall_total = sum(wall[name] for names in groups.values() for name in names)

    def fractions(times: dict[str, float], whole: float) -> dict[str, float]:
        ours = sum(times[n] for n in groups["ours"])
        step_ours = ours - times["data: fetch"]
        step = whole - times["data: fetch"]
        return {
            "ours": ours / whole,
            "pytorch_new_model": sum(times[n] for n in groups["pytorch"]) / whole,
            "data": times["data: fetch"] / whole,
            "old_model_forward": times["old model forward"] / whole,
            "loss_terms": sum(times[n] for n in groups["ours"] if n.startswith("loss ")) / whole,
            # the training step alone (without the data fetch)
            "step_ours": step_ours / step,
            "step_loss_terms": sum(times[n] for n in groups["ours"] if n.startswith("loss ")) / step,
        }

    return {
        "config": {**cfg, "method": METHOD, "classes_per_step": [NEW_CLASS, 1], "output_stride": 16,
                   "iterations": iterations, "warmup_iterations": 1,
                   "data": {"task": "/".join(DATA_TASK), "step": 1, "workers": 0, "batch": cfg["batch"],
                            "crop": cfg["crop"], "image_size": 64, **data_sizes}},
        "groups": groups,
        "profiled": {
            "seconds_per_iteration": profiled_s / iterations,
            "phases_cpu_s": phases,
            "data_parts_cpu_s": data_parts,
            "fractions": fractions(phases, total),
            "top_self_cpu": [{"name": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6 / iterations,
                              "self_cpu_pct": 100 * e.self_cpu_time_total / self_total,
                              "calls": e.count // iterations} for e in top],
        },
        "unprofiled": {
            "seconds_per_iteration": wall["iteration"],
            "phases_wall_s": {n: wall[n] for names in groups.values() for n in names},
            "fractions": fractions(wall, wall_total),
            "iterations_s": [w["iteration"] for w in walls],
        },
        "load_after": load_average(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Profile one MiB+UCD training step.")
    parser.add_argument("--quick", action="store_true", help="ResNet-18, batch 2, 64 px crops")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from report import profile_md

    result = run(quick=args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n".join(profile_md(result)))
    return result


if __name__ == "__main__":
    main()
