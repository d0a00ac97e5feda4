"""Benchmark 1: UCD contrastive distillation, streamed (ours) vs a naive dense implementation.

Each case (implementation x formulation x number of anchors) runs in a fresh Python process:
the inputs are built, both code paths are warmed up on a tiny problem, then one full-size
forward + backward runs under ``torch.profiler`` with ``profile_memory=True`` (peak memory), then
``repeats`` more run for the time.

Peak memory is the peak of the bytes held by torch's CPU allocator, from the profiler's
allocation/free events replayed in order: exactly the tensors (and autograd buffers) of the
loss, whatever else runs on the machine. As a cross-check the process's peak resident memory
above its resident memory at the start of the call is recorded too (``rss_peak_mib``: kernel
high-water mark reset through ``/proc/self/clear_refs``); it also counts library code paged in
for the first time and pages that memory reclaim (DAMON runs on this machine) had paged out, so
it is noisy by a few hundred MiB on a shared machine. The child saves its loss and the gradient on
the new-model features, and the parent compares streamed vs dense.

Inputs (deterministic, seed 0): ``B = 4`` feature maps of ``D = 256`` channels whose
``4 * h * w`` pixels are all kept, so ``|A|`` is exact. 10 % of the pixels are current-step
ground truth (class 16, as in VOC 15-1 step 1); the others are labelled 0 and the old model's
logits make one old class (1..15) the argmax, so they are anchors *and* old-model contrast
elements: ``|C| = |A| + 0.9 |A| = 1.9 |A|``. Features are class means plus noise, the old
features the new ones plus noise, so similarities look like those of a trained model.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, emit, load_average, log, median, run_case, summary  # noqa: E402

SIZES = {2048: (16, 32), 4096: (32, 32), 8192: (32, 64), 12288: (48, 64)}  # |A| -> (h, w), B = 4
BATCH, DIM, NUM_OLD, NEW_CLASS, GT_FRACTION, TAU = 4, 256, 16, 16, 0.10, 0.07
IMPLS = ("streamed", "dense")
TARGET_ANCHORS = 8192
MEMORY_METHOD = ("peak of torch's CPU allocator (torch.profiler, profile_memory=True: allocation/free events "
                 "replayed in time order) during the first full-size forward + backward in a fresh process")
# timed calls after the first (memory) call; fewer at the large sizes to keep the run < 15 min
FULL_REPEATS = {2048: 3, 4096: 3, 8192: 2, 12288: 0}  # 0: the time is that of the memory call
FORMULATIONS = ("reference", "supcon")


# ---------------------------------------------------------------------------------- inputs
def make_inputs(num_anchors: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(features, old_features, old_logits, labels)`` with exactly ``num_anchors`` kept pixels."""
    if num_anchors in SIZES:
        h, w = SIZES[num_anchors]
    else:  # small sizes for --quick / tests: a 4 x 1 x (N / 4) map
        if num_anchors % BATCH:
            raise ValueError(f"num_anchors must be a multiple of {BATCH}, got {num_anchors}")
        h, w = 1, num_anchors // BATCH
    gen = torch.Generator().manual_seed(seed)
    n = BATCH * h * w
    is_gt = torch.rand(n, generator=gen) < GT_FRACTION
    old_class = torch.randint(1, NUM_OLD, (n,), generator=gen)  # 1..15
    label = torch.where(is_gt, torch.full_like(old_class, NEW_CLASS), old_class)

    means = F.normalize(torch.randn(NUM_OLD + 1, DIM, generator=gen), dim=1)
    feats = means[label] + 0.08 * torch.randn(n, DIM, generator=gen)
    old_feats = feats + 0.05 * torch.randn(n, DIM, generator=gen)
    logits = torch.randn(n, NUM_OLD, generator=gen)
    logits[torch.arange(n), old_class] += 4.0  # the old model believes in the pixel's old class
    logits[~is_gt, 0] = -10.0  # ... and never in background, so every pixel is kept

    def to_map(x: torch.Tensor) -> torch.Tensor:  # (n, c) -> (B, c, h, w)
        return x.reshape(BATCH, h, w, -1).permute(0, 3, 1, 2).contiguous()

    labels = torch.where(is_gt, label, torch.zeros_like(label)).reshape(BATCH, h, w)
    return to_map(feats), to_map(old_feats), to_map(logits), labels


# ---------------------------------------------------------------------------------- dense reference
def dense_ucd(features, old_features, old_logits, labels, temperature=TAU, formulation="reference"):
    """SPEC §3 "UCD contrastive distillation" written densely: every term is an |A| x |C| matrix.

    This is the straightforward implementation (autograd through the full similarity matrix),
    written independently of ``ucdseg.losses.contrastive``.
    """
    b, d, h, w = features.shape
    y = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().reshape(-1)
    probs = torch.softmax(old_logits.detach().float(), dim=1).permute(0, 2, 3, 1).reshape(-1, old_logits.shape[1])
    gt = (y != 0) & (y != 255)
    lab = torch.where(y == 0, probs.argmax(dim=1), y)
    kept = (lab != 0) & (y != 255)
    from_old = kept & ~gt

    anchors = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, d)[kept], dim=1)
    old = F.normalize(old_features.detach().permute(0, 2, 3, 1).reshape(-1, d)[from_old], dim=1)
    contrast = torch.cat([anchors.detach(), old])
    a_lab, c_lab = lab[kept], torch.cat([lab[kept], lab[from_old]])
    a_p, c_p = probs[kept], torch.cat([probs[kept], probs[from_old]])
    a_gt, c_gt = gt[kept], torch.cat([gt[kept], gt[from_old]])
    n, k = anchors.shape[0], contrast.shape[0]

    sim = anchors @ contrast.T / temperature  # (N, K)
    same = a_lab[:, None] == c_lab[None, :]
    own = torch.zeros(n, k, dtype=torch.bool)
    own[torch.arange(n), torch.arange(n)] = True
    positive = same & ~own
    negative = ~same
    weight = a_p @ c_p.T
    weight = torch.where(a_gt[:, None] & c_gt[None, :], torch.ones_like(weight), weight)
    neg_sum = (torch.exp(sim) * negative).sum(dim=1, keepdim=True)
    if formulation == "reference":
        shifted = sim - sim.max(dim=1, keepdim=True).values.detach()
    else:
        shifted = sim
    log_prob = shifted - torch.log(torch.exp(shifted) + neg_sum)
    num_pos = positive.sum(dim=1)
    per_anchor = -(weight * log_prob * positive).sum(dim=1) / num_pos.clamp(min=1)
    return per_anchor[num_pos > 0].mean()


# ---------------------------------------------------------------------------------- one case (child)
def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def allocator_peak_mib(prof) -> float:
    """Peak of the bytes held by torch's CPU allocator during a profiled block.

    Replays the profiler's ``[memory]`` events (``profile_memory=True``: every allocation and
    free with its size and time) and returns the highest running total, in MiB.
    """
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def run_one(args: dict) -> dict:
    from ucdseg.losses import contrastive_distillation

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    torch.manual_seed(0)
    features, old_features, old_logits, labels = make_inputs(args["anchors"])
    features.requires_grad_(True)
    impl, formulation = args["impl"], args["formulation"]
    if impl == "streamed":
        kwargs = {"block_size": args["block_size"]} if args.get("block_size") else {}

        def loss_fn():
            return contrastive_distillation(features, old_features, old_logits, labels,
                                            formulation=formulation, **kwargs)
    else:
        def loss_fn():
            return dense_ucd(features, old_features, old_logits, labels, formulation=formulation)

    def step():
        features.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    # Warm-up on a tiny problem: the first calls fault in code pages of the torch / MKL libraries
    # (hundreds of MiB of resident file-backed memory) that must not count as the loss's memory.
    tiny = make_inputs(64, seed=1)
    tiny[0].requires_grad_(True)
    for _ in range(2):
        (contrastive_distillation(*tiny, formulation=formulation) if impl == "streamed"
         else dense_ucd(*tiny, formulation=formulation)).backward()
    del tiny
    _trim()
    with PeakRSS() as mem, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()  # first full-size call: nothing large has been freed yet
        loss = step()
        first = time.perf_counter() - t0
    torch_peak_mib = allocator_peak_mib(prof)
    grad = features.grad.detach().clone()
    times: list[float] = []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    torch.save({"loss": loss.detach().double(), "grad": grad}, args["out"])
    n = args["anchors"]
    contrast = n + int((labels.reshape(-1) == 0).sum())
    return {"peak_mib": torch_peak_mib, "rss_peak_mib": mem.peak_mib, "rss_method": mem.method,
            "first_call_s": first,
            **summary(times or [first]), "loss": float(loss.detach()), "contrast": contrast,
            "repeats": len(times), "timed_on_first_call": not times, "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- the benchmark (parent)
def compare(streamed_file: str, dense_file: str) -> dict:
    s, d = torch.load(streamed_file), torch.load(dense_file)
    value_rel = float((s["loss"] - d["loss"]).abs() / d["loss"].abs().clamp(min=1e-30))
    grad_rel = float((s["grad"] - d["grad"]).abs().max() / d["grad"].abs().max().clamp(min=1e-30))
    return {"value_rel_diff": value_rel, "grad_rel_diff": grad_rel}


def run(quick: bool = False, sizes: list[int] | None = None, repeats: int | None = None,
        threads: int | None = None) -> dict:
    """All cases; returns ``{"cases": [...], "targets": {...}}``."""
    sizes = sizes or ([256, 1024] if quick else [2048, 4096, 8192, 12288])
    cases = []
    with tempfile.TemporaryDirectory(prefix="ucdseg-bench-") as tmp:
        for n in sizes:
            for formulation in FORMULATIONS:
                row = {"anchors": n, "formulation": formulation}
                for impl in IMPLS:
                    out = os.path.join(tmp, f"{impl}-{formulation}-{n}.pt")
                    load = load_average()
                    reps = repeats or (1 if quick else FULL_REPEATS.get(n, 1))
                    res = run_case("bench_contrastive", {"impl": impl, "anchors": n, "formulation": formulation,
                                                         "repeats": reps, "out": out, "threads": threads})
                    res["load_before"] = load
                    row[impl] = res
                    log(f"  contrastive {impl:8s} {formulation:9s} |A|={n:5d} |C|={res['contrast']:5d}: "
                        f"{res['median_s']:.3f} s, peak {res['peak_mib']:.0f} MiB (RSS {res['rss_peak_mib']:.0f} MiB)")
                row["contrast"] = row["streamed"]["contrast"]
                row.update(compare(os.path.join(tmp, f"streamed-{formulation}-{n}.pt"),
                                   os.path.join(tmp, f"dense-{formulation}-{n}.pt")))
                row["memory_ratio"] = row["dense"]["peak_mib"] / max(row["streamed"]["peak_mib"], 1e-9)
                row["rss_memory_ratio"] = row["dense"]["rss_peak_mib"] / max(row["streamed"]["rss_peak_mib"], 1e-9)
                row["time_ratio"] = row["streamed"]["median_s"] / row["dense"]["median_s"]
                cases.append(row)
    at = [c for c in cases if c["anchors"] == TARGET_ANCHORS]  # none in --quick runs: targets n/a
    targets = {
        "at_anchors": TARGET_ANCHORS,
        "memory_5x_lower": all(c["memory_ratio"] >= 5 for c in at) if at else None,
        "time_no_worse": all(c["time_ratio"] <= 1.0 for c in at) if at else None,
        "values_within_1e-5": all(c["value_rel_diff"] <= 1e-5 for c in cases),
    }
    return {"dim": DIM, "batch": BATCH, "gt_fraction": GT_FRACTION, "temperature": TAU,
            "memory_method": MEMORY_METHOD,
            "rss_method": cases[0]["streamed"]["rss_method"] if cases else None,
            "cases": cases, "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="JSON arguments of one case (internal: run by run.py)")
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.case:
        emit(run_one(json.loads(opts.case)))
    else:
        print(json.dumps(run(quick=opts.quick), indent=2))


if __name__ == "__main__":
    main()
