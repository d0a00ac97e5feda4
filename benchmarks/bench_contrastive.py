"""Benchmark 1: UCD contrastive distillation, ours vs the UCD release's dense formulation.

Three parts, all on the same deterministic inputs:

1. **Time, round-robin** (one fresh process per size): after a warm-up of every code path on
   tiny inputs, each round times, in turn, a bare ``|A| x |C| x D`` matrix product (the floor: UCD needs at least
   one such product) through ``torch.mm`` and through oneDNN (the backend ours uses for its large
   float32 products on a CPU), ours and the release's copy in both formulations (forward + backward).
   The figures are the medians over rounds, and the ratios are taken round by round (so a change
   of the machine's load hits both sides of a ratio alike).
2. **Memory and numerics** (one fresh process per implementation x formulation x size): the
   first full-size forward + backward runs under ``torch.profiler`` with ``profile_memory=True``;
   the added peak is the peak of the bytes held by torch's CPU allocator (allocation / free events
   replayed in order), i.e. exactly the loss's tensors and autograd buffers. The process's peak
   resident memory above its resident memory at the call's start is recorded as a cross-check
   (``rss_peak_mib``; it also counts library pages faulted in). Each process saves its loss and
   the gradient on the new-model features; ours and the release are then compared.
3. **Global batch** (``method.options.gather``): the local anchors fixed, the contrast set made ``W``
   times larger (``W`` = 1, 2, 4, 8 simulated processes on one process), time and memory of ours;
   and, if ``torch.distributed`` (gloo) works, two real processes calling
   ``gathered_contrastive_distillation`` vs the same processes' local loss.

The release's formulation (``utils/loss.py`` of github:ygjwd12345/UCD: ``pre_contrastive_pixel``
version ``v2`` and ``PixelConLossV2``) is copied below, dense as the release computes it (the
label-mask, positive-mask, identity, negative-mask, similarity, exp, log and weight matrices, all
``|A| x |C|``, autograd through them). Only its label resize is left out: the labels are given at
the feature resolution here, where its bilinear resize, int8 cast and ``label > 20`` cut change
nothing. The ``supcon`` column removes its max shift (the release has only the shifted form).

Inputs (seed 0): ``B = 8`` feature maps of ``D = 256`` channels whose pixels are all kept, so
``|A|`` is exact: one third current-step ground truth (class 16, as in VOC 15-1 step 1), two
thirds labelled 0 that the old model assigns to one of 15 old classes (anchors *and* old-model
contrast elements): ``|C| = 5/3 |A|``. At ``|A| = 8192`` (batch 8 of 32 x 32 maps) ``|C| ~ 13.6k``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, emit, load_average, log, run_case, summary  # noqa: E402

SIZES = {2048: (16, 16), 4096: (16, 32), 8192: (32, 32), 12288: (32, 48)}  # |A| -> (h, w), B = 8
QUICK_SIZES = [256, 1024]
BATCH, DIM, NUM_OLD, NEW_CLASS, GT_FRACTION, TAU = 8, 256, 16, 16, 1 / 3, 0.07
IMPLS = ("ours", "release")
FORMULATIONS = ("reference", "supcon")
TARGET_ANCHORS = 8192
TARGETS = {"time_ratio_min": 5.0, "memory_ratio_min": 10.0, "value_rel_max": 1e-5, "grad_rel_max": 1e-4}
RELEASE_MEMORY_MAX = 8192  # the release's peak at 12288 anchors (about 12 GB) is not measured (see run())
ROUNDS = {2048: 3, 4096: 3, 8192: 3, 12288: 1}  # timed rounds (after a warm-up of every path on tiny inputs)
GATHER_ANCHORS, GATHER_WORLDS, GATHER_ROUNDS = 2048, (1, 2, 4, 8), 3
MEMORY_METHOD = ("peak of torch's CPU allocator (torch.profiler, profile_memory=True: allocation/free events "
                 "replayed in time order) during the first full-size forward + backward in a fresh process")


# ---------------------------------------------------------------------------------- inputs
def make_inputs(num_anchors: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(features, old_features, old_logits, labels)`` with exactly ``num_anchors`` kept pixels."""
    if num_anchors in SIZES:
        h, w = SIZES[num_anchors]
    else:  # small sizes for --quick / tests: a B x 1 x (N / B) map
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


# ---------------------------------------------------------------------------------- the release, copied
def release_pixels(f_n, f_o, l_po, label_n):
    """``pre_contrastive_pixel(f_n, l_n, l_po, f_o)`` of the UCD release, version ``v2``.

    ``label_n`` ``(B, h, w)`` is already at the feature resolution (see the module docstring).
    Returns anchors, contrast set, their labels and the weight matrix ``JM_p`` (``|A| x |C|``).
    """
    b, d, h, w = f_n.size()
    f_n = f_n.permute(0, 2, 3, 1).reshape(b, h * w, d)
    mask_new_classes = label_n.reshape(b * h * w) > 0
    min_new_classes = label_n.reshape(b * h * w)[mask_new_classes].min()
    label_mix = label_n.clone()
    _, label_po = l_po.max(dim=1)
    label_mix[label_mix == 0] = label_po.to(label_mix.dtype)[label_mix == 0]
    label_ = label_mix.reshape(b * h * w)
    lable_anchor = label_[label_ > 0].clone()
    lable_contrast = torch.cat((lable_anchor, label_[(label_ > 0) & ~mask_new_classes]))
    f_o = f_o.detach().permute(0, 2, 3, 1).reshape(b, h * w, d)
    output_anchor = F.normalize(f_n.reshape(b * h * w, d)[label_ > 0], dim=1)
    output_contrast = torch.cat((output_anchor, F.normalize(
        f_o.reshape(b * h * w, d)[(label_ > 0) & ~mask_new_classes], dim=1)), dim=0).detach()
    # joint probability mask
    c_old = l_po.shape[1]
    l_po_ = torch.softmax(l_po.permute(0, 2, 3, 1), dim=-1).reshape(b * h * w, c_old)
    l_po_anchor = l_po_[label_ > 0]
    l_po_contrast = torch.cat((l_po_[label_ > 0], l_po_[(label_ > 0) & ~mask_new_classes]))
    jm_p = torch.mm(l_po_anchor, l_po_contrast.T)
    mask_anchor_jp = (lable_anchor >= min_new_classes).float()
    mask_contrast_jp = (lable_contrast >= min_new_classes).float()
    m_gt = torch.mm(mask_anchor_jp.unsqueeze(dim=1), mask_contrast_jp.unsqueeze(dim=1).T)
    jm_p[m_gt == 1] = 1
    return output_anchor, output_contrast, lable_anchor, lable_contrast, jm_p.detach()


def release_pixel_con_loss(anchor_features, contrast_feature, anchor_labels, contrast_labels, P,
                           temperature=TAU, shift=True):
    """``PixelConLossV2.forward`` of the UCD release (``shift=False``: without its max shift)."""
    anchor_labels = anchor_labels.view(-1, 1)
    contrast_labels = contrast_labels.view(-1, 1)
    batch_size = anchor_features.shape[0]
    R = torch.eq(anchor_labels, contrast_labels.T).float().requires_grad_(False)
    mask_p = R.clone().requires_grad_(False)
    mask_p[:, :batch_size] -= torch.eye(batch_size)
    mask_p = mask_p.detach()
    mask_n = 1 - R
    mask_n = mask_n.detach()
    anchor_dot_contrast = torch.div(torch.mm(anchor_features, contrast_feature.T), temperature)
    neg_contrast = (torch.exp(anchor_dot_contrast) * mask_n).sum(dim=1, keepdim=True)
    if shift:
        logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
        anchor_dot_contrast = anchor_dot_contrast - logits_max.detach()
    pos_contrast = torch.log(torch.exp(anchor_dot_contrast)) * mask_p * P - torch.log(
        torch.exp(anchor_dot_contrast) + neg_contrast) * mask_p * P
    num = mask_p.sum(dim=1)
    loss = -torch.div(pos_contrast.sum(dim=1)[num != 0], num[num != 0])
    return loss.mean()


def release_ucd(features, old_features, old_logits, labels, formulation="reference"):
    anchors, contrast, a_lab, c_lab, weight = release_pixels(features, old_features, old_logits, labels)
    return release_pixel_con_loss(anchors, contrast, a_lab, c_lab, weight, TAU, shift=formulation == "reference")


def ours_ucd(features, old_features, old_logits, labels, formulation="reference"):
    from ucdseg.losses import contrastive_distillation

    return contrastive_distillation(features, old_features, old_logits, labels, temperature=TAU,
                                    formulation=formulation)


LOSSES = {"ours": ours_ucd, "release": release_ucd}


# ---------------------------------------------------------------------------------- child helpers
def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def allocator_peak_mib(prof) -> float:
    """Peak of the bytes held by torch's CPU allocator during a profiled block (MiB).

    Replays the profiler's ``[memory]`` events (``profile_memory=True``: every allocation and
    free with its size and time) and returns the highest running total.
    """
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def _set_threads(args: dict) -> None:
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))


def _fwd_bwd(loss_fn, features, *rest, formulation):
    features.grad = None
    loss = loss_fn(features, *rest, formulation=formulation)
    loss.backward()
    return loss


def _warm_up(impls=IMPLS) -> None:
    """First calls fault in library code (hundreds of MiB): never count them as the loss's memory."""
    tiny = make_inputs(64, seed=1)
    tiny[0].requires_grad_(True)
    for impl in impls:
        for formulation in FORMULATIONS:
            _fwd_bwd(LOSSES[impl], *tiny, formulation=formulation)
    torch.mm(torch.randn(64, DIM), torch.randn(DIM, 128))


def contrast_size(labels: torch.Tensor) -> int:
    return int(labels.numel() + (labels == 0).sum())


# ---------------------------------------------------------------------------------- case: memory + numerics
def memory_case(args: dict) -> dict:
    _set_threads(args)
    torch.manual_seed(0)
    features, old_features, old_logits, labels = make_inputs(args["anchors"])
    features.requires_grad_(True)
    _warm_up((args["impl"],))
    _trim()
    with PeakRSS() as mem, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        loss = _fwd_bwd(LOSSES[args["impl"]], features, old_features, old_logits, labels,
                        formulation=args["formulation"])
        first = time.perf_counter() - t0
    torch.save({"loss": loss.detach().double(), "grad": features.grad.detach().clone()}, args["out"])
    return {"peak_mib": allocator_peak_mib(prof), "rss_peak_mib": mem.peak_mib, "rss_method": mem.method,
            "profiled_call_s": first, "loss": float(loss.detach()), "contrast": contrast_size(labels),
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- case: round-robin timing
def timing_case(args: dict) -> dict:
    """One size: ``rounds`` rounds of [matmuls, ours/release x formulations] after a tiny warm-up."""
    _set_threads(args)
    n = args["anchors"]
    features, old_features, old_logits, labels = make_inputs(n)
    features.requires_grad_(True)
    k = contrast_size(labels)
    gen = torch.Generator().manual_seed(1)
    a, c = torch.randn(n, DIM, generator=gen), torch.randn(k, DIM, generator=gen)
    items = {"matmul": lambda: torch.mm(a, c.T)}
    if torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_linear"):  # the backend ours uses
        a_m, c_m = a.to_mkldnn(), c.to_mkldnn()
        items["matmul_onednn"] = lambda: torch._C._nn.mkldnn_linear(a_m, c_m, None).to_dense()
    for formulation in FORMULATIONS:
        for impl in IMPLS:
            items[f"{impl}/{formulation}"] = (lambda fn=LOSSES[impl], fm=formulation:
                                              _fwd_bwd(fn, features, old_features, old_logits, labels, formulation=fm))
    _warm_up()
    times: dict[str, list[float]] = {name: [] for name in items}
    for _ in range(args["rounds"]):
        for name, fn in items.items():
            _trim()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"contrast": k, "times": times, "load_after": load_average(), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- case: global batch
def _gathered_flat_inputs(world: int, n: int):
    """Local inputs (seed 0) and the contrast set of ``world`` simulated processes (seeds 0..W-1)."""
    from ucdseg.losses import prepare_contrastive_inputs

    local = make_inputs(n, seed=0)
    others = [prepare_contrastive_inputs(*make_inputs(n, seed=r)) for r in range(1, world)]
    return local, others


def gather_case(args: dict) -> dict:
    """Ours on local anchors against a contrast set ``world`` times larger (one process)."""
    from ucdseg.losses import contrastive_distillation_flat, prepare_contrastive_inputs

    _set_threads(args)
    (features, old_features, old_logits, labels), others = _gathered_flat_inputs(args["world"], args["anchors"])
    features.requires_grad_(True)

    def step():
        features.grad = None
        local = prepare_contrastive_inputs(features, old_features, old_logits, labels)
        parts = [local[4:8]] + [o[4:8] for o in others]
        contrast, c_labels, c_probs, c_gt = (torch.cat(t) for t in zip(*parts))
        loss = contrastive_distillation_flat(*local[:4], contrast, c_labels, c_probs, c_gt, local.self_index,
                                             temperature=TAU, reduction="sum")
        loss.backward()
        return contrast.shape[0]

    _warm_up(("ours",))
    _trim()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        k = step()
    a, c = torch.randn(args["anchors"], DIM), torch.randn(k, DIM)
    times, floor = [], []
    for _ in range(args["rounds"]):
        t0 = time.perf_counter()
        torch.mm(a, c.T)
        floor.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"world": args["world"], "anchors": args["anchors"], "contrast": k, "peak_mib": allocator_peak_mib(prof),
            **summary(times), "matmul_median_s": statistics.median(floor),
            "ratio_to_matmul": statistics.median(t / f for t, f in zip(times, floor))}


def _gloo_worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    from ucdseg.losses import contrastive_distillation
    from ucdseg.losses.gathered import gathered_contrastive_distillation

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        features, old_features, old_logits, labels = make_inputs(args["anchors"], seed=rank)
        features.requires_grad_(True)
        items = {
            "gathered": lambda: gathered_contrastive_distillation(features, old_features, old_logits, labels,
                                                                  temperature=TAU),
            "local": lambda: contrastive_distillation(features, old_features, old_logits, labels, temperature=TAU),
        }
        times: dict[str, list[float]] = {name: [] for name in items}
        for r in range(args["rounds"] + 1):
            for name, fn in items.items():
                dist.barrier()
                t0 = time.perf_counter()
                features.grad = None
                fn().backward()
                if r:
                    times[name].append(time.perf_counter() - t0)
        torch.save(times, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def gloo_case(args: dict) -> dict:
    """Two gloo processes (one thread each): the gathered loss vs the local loss, round-robin."""
    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    mp.spawn(_gloo_worker, args=(world, port, args, args["out"]), nprocs=world, join=True)
    per_rank = [torch.load(f"{args['out']}.{r}") for r in range(world)]
    gathered = [statistics.median(t["gathered"]) for t in per_rank]
    local = [statistics.median(t["local"]) for t in per_rank]
    return {"world": world, "anchors_per_process": args["anchors"], "gathered_median_s": gathered,
            "local_median_s": local, "ratio": [g / lo for g, lo in zip(gathered, local)], "rounds": args["rounds"]}


CASES = {"memory": memory_case, "timing": timing_case, "gather": gather_case, "gloo": gloo_case}


# ---------------------------------------------------------------------------------- the benchmark (parent)
def compare(ours_file: str, release_file: str) -> dict:
    s, d = torch.load(ours_file), torch.load(release_file)
    value_rel = float((s["loss"] - d["loss"]).abs() / d["loss"].abs().clamp(min=1e-30))
    grad_rel = float((s["grad"] - d["grad"]).abs().max() / d["grad"].abs().max().clamp(min=1e-30))
    return {"value_rel_diff": value_rel, "grad_rel_diff": grad_rel}


def _timing_rows(n: int, res: dict) -> list[dict]:
    t = res["times"]
    rows = []
    for formulation in FORMULATIONS:
        ours, rel = t[f"ours/{formulation}"], t[f"release/{formulation}"]
        rows.append({
            "anchors": n, "contrast": res["contrast"], "formulation": formulation, "rounds": len(ours),
            "ours_s": summary(ours), "release_s": summary(rel), "matmul_s": summary(t["matmul"]),
            # ratios per round (same load on both sides), then the median over rounds
            "speedup": statistics.median(r / o for r, o in zip(rel, ours)),
            "ours_over_matmul": statistics.median(o / m for o, m in zip(ours, t["matmul"])),
            "release_over_matmul": statistics.median(r / m for r, m in zip(rel, t["matmul"])),
        })
        if "matmul_onednn" in t:
            rows[-1]["matmul_onednn_s"] = summary(t["matmul_onednn"])
            rows[-1]["ours_over_matmul_onednn"] = statistics.median(o / m for o, m in zip(ours, t["matmul_onednn"]))
    return rows


def _chains(jobs: list[list], workers: int) -> None:
    """Run each chain (a list of callables) in order; chains run concurrently on ``workers`` threads."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(lambda chain=chain: [job() for job in chain]) for chain in jobs]:
            future.result()


def run(quick: bool = False, sizes: list[int] | None = None, threads: int | None = None,
        gather: bool = True, concurrent: int = 1) -> dict:
    """All parts. ``concurrent > 1`` runs the timing, memory and global-batch cases as that many
    concurrent chains of fresh processes (times are ratios within one process, so this only adds
    load). The release's peak memory is measured up to ``RELEASE_MEMORY_MAX`` anchors only: at 12288
    its 12 GB would not fit beside the timing process on the 23 GB development machine."""
    sizes = sizes or (QUICK_SIZES if quick else list(SIZES))
    big = threading.Lock()  # held by any process running the release at >= 12288 anchors (about 12 GB)
    rows: dict[int, list[dict]] = {}
    memory: dict[tuple, dict] = {}
    global_batch: dict = {}
    tmp = tempfile.mkdtemp(prefix="ucdseg-bench-")

    def guarded(n: int, release: bool, fn):
        if release and n >= 12288:
            with big:
                return fn()
        return fn()

    def timing(n: int) -> None:
        rounds = 1 if quick else ROUNDS.get(n, 3)
        res = guarded(n, True, lambda: run_case("bench_contrastive", {"kind": "timing", "anchors": n, "rounds": rounds,
                                                                       "threads": threads}))
        rows[n] = _timing_rows(n, res)
        for row in rows[n]:
            log(f"  contrastive |A|={n:5d} |C|={row['contrast']:5d} {row['formulation']:9s}: ours "
                f"{row['ours_s']['median_s']:.3f} s, release {row['release_s']['median_s']:.3f} s, matmul "
                f"{row['matmul_s']['median_s']:.3f} s, speed-up {row['speedup']:.1f}x")

    def memory_case_job(impl: str, n: int, formulation: str) -> None:
        out = os.path.join(tmp, f"{impl}-{formulation}-{n}.pt")
        res = guarded(n, impl == "release", lambda: run_case(
            "bench_contrastive", {"kind": "memory", "impl": impl, "anchors": n, "formulation": formulation,
                                  "out": out, "threads": threads}))
        memory[(impl, n, formulation)] = {**res, "file": out}
        log(f"  contrastive memory {impl:7s} |A|={n:5d} {formulation:9s}: peak {res['peak_mib']:.0f} MiB")

    def gather_jobs() -> list:
        n = 256 if quick else GATHER_ANCHORS
        rounds = 1 if quick else GATHER_ROUNDS
        global_batch.update(anchors_per_process=n, simulated=[])

        def simulated(world: int) -> None:
            res = run_case("bench_contrastive", {"kind": "gather", "world": world, "anchors": n, "rounds": rounds,
                                                 "threads": threads})
            log(f"  contrastive gather W={world}: |C|={res['contrast']} {res['median_s']:.3f} s, "
                f"peak {res['peak_mib']:.0f} MiB, {res['ratio_to_matmul']:.2f} x matmul")
            global_batch["simulated"].append(res)

        def gloo() -> None:
            try:
                res = run_case("bench_contrastive", {"kind": "gloo", "anchors": n, "rounds": rounds,
                                                     "out": os.path.join(tmp, "gloo")})
                log(f"  contrastive gloo x2: gathered / local {res['ratio']}")
            except RuntimeError as err:  # no working gloo on this machine: say so in the results
                res = {"unavailable": str(err).splitlines()[-1]}
            global_batch["gloo"] = res

        return [lambda w=w: simulated(w) for w in GATHER_WORLDS] + [gloo]

    chains = [[lambda n=n: timing(n) for n in sizes]]
    for impl in IMPLS:
        chains.append([lambda n=n, f=f, impl=impl: memory_case_job(impl, n, f) for n in sizes for f in FORMULATIONS
                       if impl == "ours" or n <= RELEASE_MEMORY_MAX])
    if gather:
        chains.append(gather_jobs())
    if concurrent <= 1:
        chains = [[job for chain in chains for job in chain]]
    _chains(chains, max(1, concurrent))

    cases = []
    for n in sizes:
        for row in rows[n]:
            f = row["formulation"]
            for impl in IMPLS:
                got = memory.get((impl, n, f))
                row[f"{impl}_memory"] = {k: v for k, v in got.items() if k != "file"} if got else None
            if row["release_memory"] is None:  # not measured: no value / gradient comparison either
                row.update(value_rel_diff=None, grad_rel_diff=None, memory_ratio=None)
            else:
                row.update(compare(memory[("ours", n, f)]["file"], memory[("release", n, f)]["file"]))
                row["memory_ratio"] = row["release_memory"]["peak_mib"] / max(row["ours_memory"]["peak_mib"], 1e-9)
                log(f"  contrastive |A|={n:5d} {f:9s}: peak ours {row['ours_memory']['peak_mib']:.0f} MiB, release "
                    f"{row['release_memory']['peak_mib']:.0f} MiB ({row['memory_ratio']:.1f}x); value rel "
                    f"{row['value_rel_diff']:.1e}, grad rel {row['grad_rel_diff']:.1e}")
            cases.append(row)
    compared = [c for c in cases if c["value_rel_diff"] is not None]
    shutil.rmtree(tmp, ignore_errors=True)
    if global_batch:
        global_batch["simulated"].sort(key=lambda r: r["world"])
    at = [c for c in cases if c["anchors"] == TARGET_ANCHORS]  # none in --quick runs: targets n/a
    targets = {
        "at_anchors": TARGET_ANCHORS, **TARGETS,
        "time_met": all(c["speedup"] >= TARGETS["time_ratio_min"] for c in at) if at else None,
        "memory_met": all(c["memory_ratio"] >= TARGETS["memory_ratio_min"] for c in at) if at else None,
        "values_met": all(c["value_rel_diff"] <= TARGETS["value_rel_max"] for c in compared),
        "grads_met": all(c["grad_rel_diff"] <= TARGETS["grad_rel_max"] for c in compared),
    }
    return {"dim": DIM, "batch": BATCH, "gt_fraction": GT_FRACTION, "temperature": TAU, "memory_method": MEMORY_METHOD,
            "rss_method": cases[0]["ours_memory"]["rss_method"] if cases else None, "threads": threads,
            "concurrent_chains": concurrent, "cases": cases, "global_batch": global_batch or None,
            "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="JSON arguments of one case (internal: run by run.py)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"anchor counts (default {list(SIZES)})")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-gather", action="store_true", help="skip the global-batch part")
    parser.add_argument("--concurrent", type=int, default=1, help="run the cases as N concurrent chains")
    opts = parser.parse_args()
    if opts.case:
        args = json.loads(opts.case)
        emit(CASES[args["kind"]](args))
    else:
        print(json.dumps(run(quick=opts.quick, sizes=opts.sizes, threads=opts.threads, gather=not opts.no_gather,
                             concurrent=opts.concurrent), indent=2))


if __name__ == "__main__":
    main()
