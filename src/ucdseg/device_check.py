"""The device check: what a first GPU machine must run before a real experiment (docs/distributed.md).

``scripts/device_check.sh`` (or ``ucdseg device-check``, or ``python -m ucdseg.device_check``) runs
a list of named checks, times each, and prints one table -- check, result, seconds, detail -- then
exits 1 if any check failed (a skipped check does not fail). ``--device cuda`` (the default when
CUDA is available) checks the GPU path, in under 5 minutes on one GPU; ``--device cpu`` runs the
same checks on the CPU with smaller sizes (the CI runs it, tests/e2e/test_device_check.py), so the
script itself is tested where there is no GPU.

The checks (:data:`CHECKS`):

* ``task torchrun x1`` / ``x2``: a VOC-shaped tiny task -- a VOC2012 layout of synthetic images with
  the 21 VOC classes written to a work folder, task 15-5 (2 steps), PLOP+UCD with the gathered
  contrast set, DeepLab-v3 ResNet-50 from random weights, 256 px crops, a few iterations per step --
  under ``torchrun`` with 1 process, and with 2 (NCCL, SyncBatchNorm) when there are 2 GPUs;
* ``amp fp16 + GradScaler``, ``amp bf16``, ``channels_last``: the same task in this process with
  ``train.amp`` / ``train.channels_last``, a forward hook confirming what the convolutions really
  ran in (half-precision outputs, NHWC inputs) and, for fp16, the GradScaler's scale per update;
* ``syncbn x2``: SyncBatchNorm under DDP on 2 GPUs against one BatchNorm over the whole batch;
* ``ucd kernel``: UCD's loss and gradient on the device against the CPU float32 and float64 values
  (relative 1e-4), both formulations, a temperature on each side of the exp() range switch;
* ``ucd gathered x2``: two processes (NCCL on 2 GPUs, else gloo), each holding half a batch: the
  gathered loss equals the one-process loss of the whole batch, its gradient follows the DDP
  convention (``ucdseg.losses.gathered``);
* ``plop histogram``: PLOP's entropy histogram and thresholds on the device against the CPU, and
  their all-reduce over 2 processes against the sum of the processes' own histograms;
* ``eval`` and ``predict``: ``ucdseg eval`` and ``ucdseg predict`` of the x1 run's last step on the
  device, against the run's own evaluation and against a prediction on the CPU.

``--device cpu`` uses ResNet-18, 64 px and 2 iterations, runs one process where CUDA would run two
GPUs' worth (``x2`` rows that need 2 GPUs are skipped), and skips fp16 (ucdseg's fp16 is CUDA's:
autocast to float16 with a GradScaler); the collectives run on 2 gloo processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Check", "Context", "Skip", "CheckError", "CHECKS", "run_checks", "format_table", "main", "execute"]

#: UCD on the device against the CPU, and the gathered loss against one process: relative tolerance
UCD_TOLERANCE = 1e-4
#: ``eval`` of a checkpoint against the run's own evaluation: per-class IoU (a pixel whose argmax
#: is a near-tie may flip between two runs of the same kernels)
EVAL_TOLERANCE = 0.01
#: ``predict`` on the device against the CPU: share of pixels with the same class (TF32
#: convolutions and other kernels move logits by ~1e-3; near-ties flip)
PREDICT_AGREEMENT = 0.99
#: PLOP's thresholds on the device against the CPU (normalised entropy; a pixel whose entropy lies
#: within rounding of a bin edge may land in the next bin)
PLOP_THRESHOLD_TOLERANCE = 1e-3


class Skip(Exception):
    """The check does not apply here (its reason is the table's detail)."""


class CheckError(AssertionError):
    """The check ran and found something wrong (its message is the table's detail)."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


@dataclass(frozen=True)
class Sizes:
    """What the tiny task and the kernels are run at (the CPU mode is smaller, for the CI)."""

    backbone: str
    crop: int
    image: tuple[int, int]  # (width, height) of the synthetic images
    batch: int
    iterations: int
    ucd_side: int  # feature map side of the UCD kernel check
    ucd_dim: int


CUDA_SIZES = Sizes("resnet50", 256, (320, 256), 4, 4, 32, 256)
CPU_SIZES = Sizes("resnet18", 64, (80, 64), 2, 2, 16, 64)
TRAIN_IMAGES, VAL_IMAGES = 12, 4


@dataclass
class Context:
    """What the checks share: the device, the work folder, the sizes and the runs made so far."""

    device: str  # "cuda" or "cpu"
    work: Path
    sizes: Sizes
    gpus: int = 0
    _cache: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def once(self, key: str, make: Callable[[], object]):
        """``make()`` the first time ``key`` is asked for, its result (or its error) afterwards."""
        if key not in self._cache:
            try:
                self._cache[key] = (True, make())
            except Exception as exc:  # noqa: BLE001 - every check that needs it reports it
                self._cache[key] = (False, exc)
        ok, value = self._cache[key]
        if not ok:
            raise CheckError(f"needs {key}, which failed: {_first_line(value)}")
        return value


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], str]  # returns the detail; raises Skip, CheckError or any error


# ---------------------------------------------------------------------------------------------- helpers
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if isinstance(exc, (CheckError, Skip)) else f"{type(exc).__name__}: {line}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(ctx: Context) -> dict:
    """The environment of the torchrun processes: this ucdseg first on the path, caches in the work
    folder, one thread each on a CPU unless the caller chose, gloo on the loopback interface."""
    env = dict(os.environ)
    source = str(Path(__file__).resolve().parents[1])  # the src folder (or site-packages) holding ucdseg
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    env["UCDSEG_CACHE"] = str(ctx.work / "cache")
    if not ctx.cuda:
        env.setdefault("OMP_NUM_THREADS", "1")
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def torchrun(ctx: Context, nproc: int, args: Sequence[str], log: Path, timeout: float = 900) -> None:
    """``python -m torch.distributed.run --nproc_per_node=N -m ARGS`` on 127.0.0.1; its output in ``log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", *args]
    try:
        proc = subprocess.run(cmd, env=_child_env(ctx), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CheckError(f"torchrun did not finish in {timeout:.0f} s ({' '.join(args[:3])} ...)") from None
    from . import io

    io.write_text(log, f"$ {' '.join(cmd)}\n\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        said = next((line for line in lines if line.startswith("ucdseg: error:")), None)
        said = said or next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise CheckError(f"torchrun x{nproc} exited with {proc.returncode}: {said.strip()[:300]} (log: {log})")


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the task
def write_voc_tree(root: Path, image_size: tuple[int, int], seed: int = 0) -> Path:
    """A VOC2012 layout (JPEGImages, SegmentationClassAug, ImageSets/Segmentation/{train_aug,val}.txt)
    of synthetic images: image ``k`` holds two rectangles, of VOC classes ``1 + k % 12`` and
    ``13 + k % 8`` (every class is in the training images, and 6 of them have a class of the 15-5
    task's second step), painted in the class's VOC colour with noise, a void ring around each."""
    import numpy as np
    from PIL import Image

    from . import io
    from .data.voc import VOCSegmentation

    width, height = image_size
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    palette = np.asarray(VOCSegmentation.meta.palette, dtype=np.int64)
    ids = [f"2012_{k:06d}" for k in range(TRAIN_IMAGES + VAL_IMAGES)]
    for k, image_id in enumerate(ids):
        mask = np.zeros((height, width), dtype=np.uint8)
        for j, cls in enumerate((1 + k % 12, 13 + k % 8)):
            h, w = height // 2, width // 2
            y = int(rng.integers(0, height - h))
            x = j * (width // 2) + int(rng.integers(0, width // 2 - w // 2))
            x = min(x, width - w)
            mask[max(y - 1, 0): y + h + 1, max(x - 1, 0): x + w + 1] = 255  # void ring
            mask[y: y + h, x: x + w] = cls
        colors = palette[np.where(mask == 255, 0, mask)]
        image = np.clip(colors + rng.integers(-40, 40, colors.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    io.write_text(lists / "train_aug.txt", "\n".join(ids[:TRAIN_IMAGES]) + "\n")
    io.write_text(lists / "val.txt", "\n".join(ids[TRAIN_IMAGES:]) + "\n")
    return root


def task_overrides(ctx: Context, name: str, *extra: str) -> list[str]:
    """The tiny VOC-shaped task's config: 15-5 on the synthetic tree, PLOP+UCD (gathered contrast set),
    random weights, a few iterations per step."""
    s = ctx.sizes
    root = ctx.once("the synthetic VOC tree", lambda: write_voc_tree(ctx.work / "VOC2012", s.image))
    return [
        f"name={name}", f"output_dir={ctx.work / 'runs'}", f"device={ctx.device}", "seed=0",
        "data.dataset=voc", f"data.root={root}", f"data.cache_dir={ctx.work / 'cache' / 'index'}",
        "data.setting=overlapped", f"data.crop_size={s.crop}", "task.name=15-5",
        f"model.backbone={s.backbone}", "model.output_stride=16", "model.pretrained=null",
        f"train.batch_size={s.batch}", f"train.iterations={s.iterations}", f"train.iterations_next={s.iterations}",
        "train.log_every=1", "method.name=plop+ucd", "method.options.gather=true",
        f"eval.batch_size={s.batch}", "eval.num_images=1", *extra,
    ]


def _read_results(run_dir: Path, world_size: int) -> dict:
    path = run_dir / "results.json"
    expect(path.is_file(), f"{path} was not written")
    results = json.loads(path.read_text(encoding="utf-8"))
    steps = results.get("steps", [])
    expect([s["step"] for s in steps] == [0, 1], f"{path} records steps {[s['step'] for s in steps]}, expected [0, 1]")
    expect(all(s["world_size"] == world_size for s in steps),
           f"the steps ran on {[s['world_size'] for s in steps]} processes, expected {world_size}")
    for step in (0, 1):
        expect((run_dir / "checkpoints" / f"step{step}.pt").is_file(), f"checkpoints/step{step}.pt is missing")
    miou = steps[-1]["miou"]["with_background"]["all"]
    expect(miou is not None and 0 <= miou <= 1, f"step 1's mIoU is {miou!r}")
    return results


def _task_detail(ctx: Context, results: dict) -> str:
    s, last = ctx.sizes, results["steps"][-1]
    seconds = "+".join(f"{r['train_seconds']:.0f}" for r in results["steps"])
    return (f"{s.backbone} {s.crop} px, 15-5 plop+ucd (gathered), 2 steps x {s.iterations} it, batch {s.batch}: "
            f"mIoU {100 * last['miou']['with_background']['all']:.1f} % (random weights), train {seconds} s")


def run_task_torchrun(ctx: Context, nproc: int) -> dict:
    """The tiny task under ``torchrun --nproc_per_node=nproc``: its results."""
    name = f"torchrun-x{nproc}"
    from . import io

    config = ctx.work / "task.yaml"
    io.write_text(config, "# the device check's tiny VOC-shaped task (overrides on the command line)\n")
    torchrun(ctx, nproc, ["ucdseg.cli", "--quiet", "run", str(config), *task_overrides(ctx, name)],
             ctx.work / "logs" / f"{name}.log")
    return _read_results(ctx.work / "runs" / name, nproc)


def check_task_x1(ctx: Context) -> str:
    results = ctx.once("the torchrun x1 run", lambda: run_task_torchrun(ctx, 1))
    return _task_detail(ctx, results)


def check_task_x2(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("needs 2 GPUs (--device cpu runs 1 process; tests/e2e/test_distributed.py runs 2 on gloo)")
    if ctx.gpus < 2:
        raise Skip(f"needs 2 GPUs, found {ctx.gpus}")
    results = run_task_torchrun(ctx, 2)
    return _task_detail(ctx, results) + ", NCCL, SyncBatchNorm (train.bn=sync)"


# ---------------------------------------------------------------------------------------------- precision, layout
@contextlib.contextmanager
def _watch_convolutions(seen: dict):
    """Record, for every convolution run in training mode, its output dtype and whether its input
    was NHWC (a global forward hook, removed on exit)."""
    import torch

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.training and torch.is_tensor(output):
            x = inputs[0]
            seen.setdefault("dtypes", set()).add(output.dtype)
            if x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:  # NHWC and NCHW differ
                seen["nhwc"] = seen.get("nhwc", 0) + x.is_contiguous(memory_format=torch.channels_last)
                seen["convs"] = seen.get("convs", 0) + 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def _watch_scaler(scales: list):
    """Record the GradScaler's (enabled, scale) after each update (the engine's own scaler)."""
    import torch

    original = torch.amp.GradScaler.update

    def update(self, new_scale=None):
        original(self, new_scale)
        scales.append((self.is_enabled(), float(self.get_scale()) if self.is_enabled() else None))

    torch.amp.GradScaler.update = update
    try:
        yield scales
    finally:
        torch.amp.GradScaler.update = original


def _backbone_moved(run_dir: Path) -> float:
    """Largest change of a backbone convolution's weights from step 0 to step 1."""
    import torch

    a = torch.load(run_dir / "checkpoints" / "step0.pt", weights_only=True, map_location="cpu")["model"]
    b = torch.load(run_dir / "checkpoints" / "step1.pt", weights_only=True, map_location="cpu")["model"]
    keys = [k for k, v in a.items() if k.startswith("backbone.") and v.dim() == 4 and k in b]
    expect(bool(keys), "no backbone convolution in the checkpoints")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def _engine_run(ctx: Context, name: str, *extra: str) -> tuple[dict, dict, list]:
    """The tiny task in this process with ``extra`` overrides; (results, convolutions seen, scaler log)."""
    from .config import load_config
    from .engine import run

    cfg = load_config(None, task_overrides(ctx, name, *extra))
    seen: dict = {}
    scales: list = []
    with _watch_convolutions(seen), _watch_scaler(scales):
        run(cfg, progress=False)
    _sync(ctx)
    results = _read_results(ctx.work / "runs" / name, 1)
    return results, seen, scales


def _amp_check(ctx: Context, amp: str) -> str:
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    results, seen, scales = _engine_run(ctx, f"amp-{amp}", f"train.amp={amp}")
    expect(dtype in seen.get("dtypes", set()),
           f"no convolution ran in {dtype} under train.amp={amp} (saw {sorted(map(str, seen.get('dtypes', ())))})")
    moved = _backbone_moved(ctx.work / "runs" / f"amp-{amp}")
    expect(moved > 0, "step 1 left the backbone unchanged (every update skipped?)")
    detail = f"convolutions in {str(dtype).replace('torch.', '')}, backbone moved {moved:.1e} at step 1"
    enabled = [s for on, s in scales if on]
    if amp == "fp16":
        expect(len(enabled) == len(scales) > 0, f"GradScaler enabled in {len(enabled)} of {len(scales)} updates")
        # the scale halves at an update whose gradients overflowed (that step is skipped); it starts at 2^16
        skipped = sum(1 for a, b in zip([2.0**16, *enabled], enabled) if b < a)
        expect(skipped < len(enabled), f"every one of the {len(enabled)} updates overflowed (the scale fell at each)")
        detail += (f", GradScaler on: scale {enabled[-1]:g} after {len(enabled)} updates, {skipped} skipped "
                   "for an overflow")
    else:
        expect(not enabled, "the GradScaler is enabled under bf16 (it is for fp16 only)")
        detail += ", GradScaler off (not needed for bf16)"
    return detail + f", mIoU {100 * results['steps'][-1]['miou']['with_background']['all']:.1f} %"


def check_fp16(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("skip (cpu): train.amp=fp16 is CUDA's float16 autocast with a GradScaler")
    return _amp_check(ctx, "fp16")


def check_bf16(ctx: Context) -> str:
    import torch

    if ctx.cuda and not torch.cuda.is_bf16_supported():
        raise Skip(f"{torch.cuda.get_device_name()} has no bfloat16")
    return _amp_check(ctx, "bf16")


def check_channels_last(ctx: Context) -> str:
    results, seen, _ = _engine_run(ctx, "channels-last", "train.channels_last=true")
    convs, nhwc = seen.get("convs", 0), seen.get("nhwc", 0)
    expect(convs > 0, "no convolution ran in training mode")
    expect(nhwc == convs, f"{convs - nhwc} of {convs} training convolutions got NCHW inputs")
    return (f"{convs} training convolutions, all on NHWC inputs, "
            f"mIoU {100 * results['steps'][-1]['miou']['with_background']['all']:.1f} %")


# ---------------------------------------------------------------------------------------------- 2-process workers
def _worker_device(backend_gpus: int):
    """This worker process's device: its own GPU with 2 GPUs, the one GPU for both with 1, else the CPU."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend_gpus >= 2:
        return torch.device("cuda", local), "nccl"
    if backend_gpus == 1:
        return torch.device("cuda", 0), "gloo"  # gloo runs its collectives on CUDA tensors too
    return torch.device("cpu"), "gloo"


def _ucd_batch(ctx_sizes: Sizes, batch: int = 4, seed: int = 1):
    """UCD inputs on the CPU, float32: features, old features, old logits (16 old classes), labels at
    4x the feature side (0 = background for the old model to label, 16..20 new classes, 255 void)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    side, dim = ctx_sizes.ucd_side, ctx_sizes.ucd_dim
    f = torch.randn(batch, dim, side, side, generator=gen)
    g = torch.randn(batch, dim, side, side, generator=gen)
    z = 3 * torch.randn(batch, 16, side, side, generator=gen)
    y = torch.randint(0, 21, (batch, 4 * side, 4 * side), generator=gen)
    y = torch.where((y >= 1) & (y <= 15), torch.zeros_like(y), y)  # old classes are background at step t
    y[:, :, :3] = 255
    return f, g, z, y


def _plop_batch(batch: int = 4, side: int = 48, seed: int = 2):
    """Old-model logits (16 old classes) and step labels for PLOP's entropy histogram."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, 16, side, side, generator=gen)
    labels = torch.randint(0, 21, (batch, side, side), generator=gen)
    labels = torch.where(labels < 12, torch.zeros_like(labels), labels)
    return logits, labels


def worker_collectives(out: Path, sizes: Sizes, gpus: int) -> None:
    """Each of the 2 processes: the gathered UCD loss and gradient on its half of :func:`_ucd_batch`,
    PLOP's histogram of its half of :func:`_plop_batch` before and after the all-reduce."""
    import torch
    import torch.distributed as dist

    from . import io
    from .losses import EntropyThresholds, gathered_contrastive_distillation

    device, backend = _worker_device(gpus)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        f, g, z, y = (t.chunk(world)[rank].to(device) for t in _ucd_batch(sizes))
        result: dict = {"device": str(device), "backend": backend}
        for name, tau in (("reference", 0.07), ("supcon", 0.07), ("reference", 0.01)):
            feats = f.clone().requires_grad_(True)
            loss = gathered_contrastive_distillation(feats, g, z, y, temperature=tau, formulation=name,
                                                     block_size=256)
            loss.backward()
            result[f"ucd {name} {tau}"] = (loss.detach().cpu(), feats.grad.cpu())
        logits, labels = (t.chunk(world)[rank].to(device) for t in _plop_batch())
        acc = EntropyThresholds(16, 21, device=device)
        acc.update(logits, labels)
        result["plop local"] = acc.histogram.cpu().clone()
        acc.all_reduce()
        result["plop reduced"] = acc.histogram.cpu().clone()
        result["plop device"] = str(acc.histogram.device)
        io.save_checkpoint(out / f"collectives-rank{rank}.pt", result)
    finally:
        dist.destroy_process_group()


def worker_syncbn(out: Path, sizes: Sizes, gpus: int) -> None:
    """Each of the 2 processes (2 GPUs): a conv + SyncBatchNorm under DDP on its half of a batch."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from . import io

    device, backend = _worker_device(gpus)
    torch.cuda.set_device(device)
    torch.backends.cudnn.allow_tf32 = False  # as in check_syncbn: the convolutions to float32 rounding
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model = _syncbn_model()
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index])
        x = _syncbn_batch().chunk(world)[rank].to(device)
        y = ddp(x)
        y.square().mean().backward()
        bn = model[1]
        io.save_checkpoint(out / f"syncbn-rank{rank}.pt", {
            "type": type(bn).__name__, "output": y.detach().cpu(), "mean": bn.running_mean.cpu(),
            "var": bn.running_var.cpu(), "grad": model[0].weight.grad.cpu()})
    finally:
        dist.destroy_process_group()


def _syncbn_model():
    import torch

    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8))


def _syncbn_batch():
    import torch

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 16, 16, generator=gen)
    x[4:] = 3 * x[4:] + 1  # the two halves have different statistics: per-process BN would differ
    return x


WORKERS = {"collectives": worker_collectives, "syncbn": worker_syncbn}


def _run_worker(ctx: Context, name: str) -> list[dict]:
    """:data:`WORKERS`[name] under ``torchrun --nproc_per_node=2``; each process's saved result."""
    import torch

    out = ctx.work / "workers"
    out.mkdir(parents=True, exist_ok=True)
    torchrun(ctx, 2, ["ucdseg.device_check", "--worker", name, "--worker-out", str(out), "--device", ctx.device],
             ctx.work / "logs" / f"worker-{name}.log")
    return [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]


# ---------------------------------------------------------------------------------------------- kernels
def _relative(a, b) -> float:
    """max |a - b| / max |b| (a number for scalars)."""
    import torch

    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a.double() - b.double()).abs().max()) / max(scale, torch.finfo(torch.float32).tiny)


def _ucd_value(f, g, z, y, **kw):
    from .losses import contrastive_distillation

    feats = f.clone().requires_grad_(True)
    loss = contrastive_distillation(feats, g, z, y, block_size=256, **kw)
    loss.backward()
    return loss.detach().cpu().double(), feats.grad.cpu().double()


def check_ucd_kernel(ctx: Context) -> str:
    import torch

    f, g, z, y = _ucd_batch(ctx.sizes, batch=2)
    device = torch.device(ctx.device)
    worst = {"fp32": 0.0, "fp64": 0.0}
    for formulation, tau in (("reference", 0.07), ("supcon", 0.07), ("reference", 0.01)):
        kw = {"temperature": tau, "formulation": formulation}
        got = _ucd_value(*(t.to(device) for t in (f, g, z, y)), **kw)
        references = {"fp32": _ucd_value(f, g, z, y, **kw),
                      "fp64": _ucd_value(f.double(), g.double(), z.double(), y, **kw)}
        for label, (loss, grad) in references.items():
            for what, a, b in (("loss", got[0], loss), ("gradient", got[1], grad)):
                error = _relative(a, b)
                worst[label] = max(worst[label], error)
                expect(error <= UCD_TOLERANCE, f"{formulation} tau={tau}: {what} on {ctx.device} differs from "
                                               f"the CPU {label} value by {error:.2e} (relative; tolerance "
                                               f"{UCD_TOLERANCE:g})")
    from .losses import prepare_contrastive_inputs

    inputs = prepare_contrastive_inputs(f, g, z, y)
    return (f"loss and gradient vs CPU fp32 {worst['fp32']:.1e}, vs CPU fp64 {worst['fp64']:.1e} (relative, <= "
            f"{UCD_TOLERANCE:g}); reference, supcon, tau 0.07 and 0.01 (exact shift); {inputs.anchors.shape[0]} "
            f"anchors x {inputs.contrast.shape[0]} contrast elements, D={ctx.sizes.ucd_dim}, in blocks of 256")


def check_ucd_gathered(ctx: Context) -> str:
    outs = ctx.once("the 2-process collectives", lambda: _run_worker(ctx, "collectives"))
    f, g, z, y = _ucd_batch(ctx.sizes)
    worst = 0.0
    for key in (k for k in outs[0] if k.startswith("ucd ")):
        _, name, tau = key.split()
        loss, grad = _ucd_value(f, g, z, y, temperature=float(tau), formulation=name)
        for rank, out in enumerate(outs):
            got_loss, got_grad = out[key]
            error = _relative(got_loss, loss)
            expect(error <= UCD_TOLERANCE, f"{key}: rank {rank}'s gathered loss differs from the one-process loss "
                                           f"of the whole batch by {error:.2e} (relative)")
            # the DDP convention: W times the matching slice of the one-process gradient
            expected = 2 * grad.chunk(2)[rank]
            error_g = _relative(got_grad, expected)
            expect(error_g <= UCD_TOLERANCE, f"{key}: rank {rank}'s gradient differs from 2 x its slice of the "
                                             f"one-process gradient by {error_g:.2e} (relative)")
            worst = max(worst, error, error_g)
    return (f"2 processes ({outs[0]['backend']}, {outs[0]['device']}), half a batch each: loss = one-process loss, "
            f"gradient = 2 x its slice, within {worst:.1e} (relative, <= {UCD_TOLERANCE:g})")


def check_syncbn(ctx: Context) -> str:
    import torch

    if not ctx.cuda:
        raise Skip("needs 2 GPUs (SyncBatchNorm is CUDA's)")
    if ctx.gpus < 2:
        raise Skip(f"needs 2 GPUs, found {ctx.gpus}")
    outs = _run_worker(ctx, "syncbn")
    expect(all(o["type"] == "SyncBatchNorm" for o in outs), f"the model holds {outs[0]['type']}, not SyncBatchNorm")
    model = _syncbn_model().to("cuda")  # one process, one BatchNorm over the whole batch
    x = _syncbn_batch().to("cuda")
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # TF32 would differ by ~1e-3
    try:
        y = model(x)
        y.square().mean().backward()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    bn = model[1]
    errors = {"running mean": _relative(outs[0]["mean"], bn.running_mean.cpu()),
              "running var": _relative(outs[0]["var"], bn.running_var.cpu()),
              "output": max(_relative(o["output"], y.detach().cpu().chunk(2)[r]) for r, o in enumerate(outs))}
    # DDP averages the gradients of two half-batch means: the one-process gradient of the whole mean
    errors["weight gradient"] = _relative(outs[0]["grad"], model[0].weight.grad.cpu())
    for what, error in errors.items():
        expect(error <= UCD_TOLERANCE, f"SyncBatchNorm's {what} differs from one BatchNorm over the whole batch "
                                       f"by {error:.2e} (relative)")
    return f"2 GPUs, NCCL: statistics, outputs and gradients of the whole batch, within {max(errors.values()):.1e}"


def check_plop(ctx: Context) -> str:
    import torch

    from .losses import EntropyThresholds

    logits, labels = _plop_batch()
    histograms, thresholds = {}, {}
    for where in (ctx.device, "cpu"):
        acc = EntropyThresholds(16, 21, device=where)
        acc.update(logits.to(where), labels.to(where))
        expect(acc.histogram.device.type == torch.device(where).type,
               f"the histogram is on {acc.histogram.device}, the logits on {where}")
        histograms[where], thresholds[where] = acc.histogram.cpu(), acc.thresholds().cpu()
    background = int((labels == 0).sum())
    dev, cpu = histograms[ctx.device], histograms["cpu"]
    expect(int(dev.sum()) == int(cpu.sum()) == background,
           f"the histograms count {int(dev.sum())} and {int(cpu.sum())} pixels, the labels have {background} at 0")
    expect(torch.equal(dev.sum(1), cpu.sum(1)), "the per-class pixel counts differ between the device and the CPU")
    moved = int((dev - cpu).abs().sum()) // 2
    expect(moved <= max(2, background // 10_000), f"{moved} pixels changed bins between the device and the CPU")
    error = float((thresholds[ctx.device] - thresholds["cpu"]).abs().max())
    expect(error <= PLOP_THRESHOLD_TOLERANCE, f"the thresholds differ by {error:.2e} between the device and the CPU")
    outs = ctx.once("the 2-process collectives", lambda: _run_worker(ctx, "collectives"))
    summed = outs[0]["plop local"] + outs[1]["plop local"]
    for rank, out in enumerate(outs):
        expect(torch.equal(out["plop reduced"], summed),
               f"rank {rank}'s all-reduced histogram is not the sum of the 2 processes' histograms")
    expect(int(summed.sum()) == background, "the 2 processes' histograms do not count every background pixel")
    return (f"{background} pixels: histogram on {ctx.device} = CPU ({moved} moved a bin), thresholds within "
            f"{error:.1e}; all-reduce over 2 processes ({outs[0]['backend']}, histogram on {outs[0]['plop device']}) "
            "= the sum of theirs")


# ---------------------------------------------------------------------------------------------- eval, predict
def _last_checkpoint(ctx: Context) -> tuple[Path, dict]:
    results = ctx.once("the torchrun x1 run", lambda: run_task_torchrun(ctx, 1))
    return ctx.work / "runs" / "torchrun-x1" / "checkpoints" / "step1.pt", results


def check_eval(ctx: Context) -> str:
    from .engine.evaluation import evaluate_checkpoint

    checkpoint, results = _last_checkpoint(ctx)
    record = evaluate_checkpoint(checkpoint, overrides=[f"device={ctx.device}"], progress=False)
    _sync(ctx)
    expected = results["steps"][-1]
    expect(record["per_class_iou"].keys() == expected["per_class_iou"].keys(), "other classes than the run's")
    worst = 0.0
    for name, value in record["per_class_iou"].items():
        other = expected["per_class_iou"][name]
        expect((value is None) == (other is None), f"class {name}: IoU {value} here, {other} in the run")
        if value is not None:
            worst = max(worst, abs(value - other))
    expect(worst <= EVAL_TOLERANCE, f"per-class IoU differs from the run's evaluation by up to {worst:.3f}")
    miou = record["miou"]["with_background"]["all"]
    return (f"{record['num_eval_images']} val images of the x1 run's step 1 on {ctx.device}: per-class IoU = the "
            f"run's within {worst:.1e} (<= {EVAL_TOLERANCE:g}), mIoU {100 * miou:.1f} %")


def check_predict(ctx: Context) -> str:
    import numpy as np
    from PIL import Image

    from .predict import predict

    checkpoint, results = _last_checkpoint(ctx)
    root = ctx.work / "VOC2012"
    images = sorted((root / "JPEGImages").glob("*.jpg"))[TRAIN_IMAGES:]
    seen = set(results["task"]["steps"][0]) | set(results["task"]["steps"][1])
    masks = {}
    for where in dict.fromkeys((ctx.device, "cpu")):  # once in the CPU mode
        out = ctx.work / "predict" / where
        predict(checkpoint, [str(p) for p in images], out, device=where, overlays=where == ctx.device, progress=False)
        masks[where] = {p.stem: np.array(Image.open(out / "masks" / f"{p.stem}.png")) for p in images}
    agree, total = 0, 0
    for image in images:
        a, b = masks[ctx.device][image.stem], masks["cpu"][image.stem]
        with Image.open(image) as im:
            expect(a.shape == (im.height, im.width), f"{image.name}: mask {a.shape}, image {im.height}x{im.width}")
        expect(set(np.unique(a).tolist()) <= seen, f"{image.name}: ids {sorted(set(np.unique(a).tolist()) - seen)} "
                                                   "are not classes of the checkpoint")
        agree, total = agree + int((a == b).sum()), total + a.size
    share = agree / total
    expect(share >= PREDICT_AGREEMENT, f"the masks on {ctx.device} and on the CPU agree on {100 * share:.2f} % of the "
                                       f"pixels (expected >= {100 * PREDICT_AGREEMENT:g} %)")
    return (f"{len(images)} images on {ctx.device}: masks of their size with the checkpoint's ids, "
            f"{100 * share:.2f} % of pixels as on the CPU (>= {100 * PREDICT_AGREEMENT:g} %), overlays written")


CHECKS: list[Check] = [
    Check("task torchrun x1", check_task_x1),
    Check("task torchrun x2", check_task_x2),
    Check("amp fp16 + GradScaler", check_fp16),
    Check("amp bf16", check_bf16),
    Check("channels_last", check_channels_last),
    Check("syncbn x2", check_syncbn),
    Check("ucd kernel", check_ucd_kernel),
    Check("ucd gathered x2", check_ucd_gathered),
    Check("plop histogram", check_plop),
    Check("eval", check_eval),
    Check("predict", check_predict),
]


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class Row:
    name: str
    result: str  # pass | fail | skip
    seconds: float
    detail: str


def run_checks(checks: Sequence[Check], ctx: Context, echo: Callable[[str], None] | None = None) -> list[Row]:
    """Run every check in turn (a failure never stops the others): one :class:`Row` each."""
    rows = []
    for check in checks:
        t0 = time.perf_counter()
        try:
            detail, result = check.run(ctx), "pass"
        except Skip as exc:
            detail, result = str(exc), "skip"
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
            detail, result = _first_line(exc), "fail"
        rows.append(Row(check.name, result, time.perf_counter() - t0, " ".join(detail.split())))
        if echo is not None:
            echo(f"  {check.name}: {result} ({rows[-1].seconds:.1f} s)")
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """One table: check | result | seconds | detail (markdown, readable as text)."""
    width = max([len("check"), *(len(r.name) for r in rows)])
    lines = [f"| {'check':<{width}} | result | seconds | detail |",
             f"|{'-' * (width + 2)}|--------|--------:|--------|"]
    for r in rows:
        lines.append(f"| {r.name:<{width}} | {r.result:<6} | {r.seconds:7.1f} | {r.detail} |")
    return "\n".join(lines)


def _environment(ctx: Context) -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    if ctx.cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(ctx.gpus)})
        parts += [f"{ctx.gpus} GPU(s): {', '.join(names)}", f"CUDA {torch.version.cuda}",
                  f"cuDNN {torch.backends.cudnn.version()}",
                  f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, "
                  f"TF32 cuDNN {'on' if torch.backends.cudnn.allow_tf32 else 'off'}"]
    else:
        parts.append(f"CPU, {torch.get_num_threads()} torch thread(s)")
    return ", ".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The device check's options (on its own parser, and on ``ucdseg device-check``'s)."""
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (the default when CUDA is available) or cpu (smaller sizes, as in the CI)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated check names (see --list); the checks they need run as well")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR, a new or empty folder, and keep it (default: a temporary folder, removed "
                        "unless a check fails)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="ucdseg device-check", description=__doc__.split("\n\n")[0]))


def select(only: str | None) -> list[Check]:
    if only is None:
        return list(CHECKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {c.name: c for c in CHECKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown check {unknown[0]!r}; the checks are: {', '.join(known)}")
    return [known[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    return execute(build_parser().parse_args(argv))


def execute(args: argparse.Namespace) -> int:
    """Run the device check the parsed options ask for; the exit code (0 ok, 1 a check failed, 2 refused)."""
    if args.list:
        for check in CHECKS:
            print(check.name)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("ucdseg device-check: CUDA is not available here; run with --device cpu to check the CPU path",
              file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("ucdseg device-check: --device cuda, but CUDA is not available here (torch "
              f"{torch.__version__}); use --device cpu", file=sys.stderr)
        return 2
    sizes = CUDA_SIZES if device == "cuda" else CPU_SIZES
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if args.worker:  # one process of a 2-process check, under torchrun
        WORKERS[args.worker](Path(args.worker_out), sizes, gpus)
        return 0
    try:
        checks = select(args.only)
    except ValueError as exc:
        print(f"ucdseg device-check: {exc}", file=sys.stderr)
        return 2
    if args.keep and Path(args.keep).exists() and (not Path(args.keep).is_dir() or any(Path(args.keep).iterdir())):
        # a folder of an earlier check would hold finished runs, which the engine continues instead of training
        print(f"ucdseg device-check: --keep {args.keep}: expected a new or empty folder (it receives the check's runs)",
              file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ucdseg-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, work, sizes, gpus)
    print(f"ucdseg device check on {device}: {_environment(ctx)}", flush=True)
    t0 = time.perf_counter()
    rows = run_checks(checks, ctx, echo=lambda line: print(line, flush=True))
    failed = [r for r in rows if r.result == "fail"]
    print()
    print(format_table(rows))
    counts = {k: sum(r.result == k for r in rows) for k in ("pass", "skip", "fail")}
    if failed or args.keep:
        where = f"work folder kept: {work} (logs/ holds the torchrun output)"
    else:
        shutil.rmtree(work, ignore_errors=True)
        where = "work folder removed"
    checks_run = f"{len(rows)} check{'' if len(rows) == 1 else 's'}"
    print(f"\n{checks_run}: {counts['pass']} pass, {counts['skip']} skip, {counts['fail']} fail "
          f"in {time.perf_counter() - t0:.0f} s; {where}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
