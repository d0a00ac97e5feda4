"""Per-GPU training memory of DeepLab-v3 ResNet-101 at 512 x 512, estimated from activation sizes.

    python benchmarks/estimate_memory.py [--output benchmarks/results] [--crop 512]

Runs one training forward of a batch of one image on the CPU and adds up the bytes of every tensor
autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``, each storage
counted once): that is the activation memory one image costs during training. With the weights
(model fp32 parameters, their gradients and SGD's momentum, plus the frozen old model's parameters
at steps >= 1) it gives the memory a GPU needs for ``b`` images per micro-batch:

    weights + b * activations_per_image

It is an estimate: it leaves out the CUDA context (~0.3-0.5 GB), cuDNN workspaces, the allocator's
fragmentation and the transient buffers of the backward pass, and mixed precision (``train.amp``)
roughly halves the activations. Writes ``memory_estimate.json`` and ``memory_estimate.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info  # noqa: E402

GIB = 1024 ** 3


def saved_bytes_per_image(model: torch.nn.Module, crop: int) -> int:
    """Bytes of the tensors autograd keeps for backward after a training forward of one image."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    x = torch.randn(2, 3, crop, crop)  # BatchNorm needs 2 images; per image = half
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = out.logits.float().mean()
    del loss, out
    return sum(storages.values()) // 2


def main(argv: list[str] | None = None) -> int:
    from ucdseg.models import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[16, 5], help="classes per step (VOC 15-5)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_model("resnet101", args.classes, output_stride=16)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = saved_bytes_per_image(model, args.crop)
    weights_step0 = 3 * params  # parameters, gradients, SGD momentum
    weights_later = 4 * params  # + the frozen old model
    rows = []
    for global_batch, gpus in ((24, 2), (24, 4), (24, 8), (12, 1), (24, 1)):
        per_gpu = global_batch // gpus
        for accumulate in (1, 2, 4, 6, 12):
            if per_gpu % accumulate:
                continue
            micro = per_gpu // accumulate
            rows.append({"global_batch": global_batch, "gpus": gpus, "accumulate": accumulate, "micro_batch": micro,
                         "estimate_gib": round((weights_later + micro * activations) / GIB, 1)})
    result = {"model": "DeepLab-v3 ResNet-101, output stride 16", "crop": args.crop,
              "parameters_mib": round(params / 2 ** 20, 1), "activations_per_image_gib": round(activations / GIB, 2),
              "weights_step0_gib": round(weights_step0 / GIB, 2), "weights_later_gib": round(weights_later / GIB, 2),
              "rows": rows, "machine": machine_info()}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Training memory per GPU, {result['model']}, {args.crop} x {args.crop} crops (estimate)", "",
             f"Activations kept for backward: {result['activations_per_image_gib']} GiB per image; weights "
             f"(parameters, gradients, momentum, old model): {result['weights_later_gib']} GiB at steps >= 1.", "",
             "| global batch | GPUs | train.accumulate | images per micro-batch | estimate (GiB) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['global_batch']} | {r['gpus']} | {r['accumulate']} | {r['micro_batch']} | {r['estimate_gib']} |"
              for r in rows]
    (out / "memory_estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
