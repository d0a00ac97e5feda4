"""Bit-for-bit comparison of two checkouts on seeded CPU runs of every method (a refactoring's proof).

    .venv/bin/python scripts/bit_identity.py BASE_SRC [--methods ft mib ...] [--work DIR]

``BASE_SRC`` is the ``src`` folder of another checkout (``git worktree add --detach /tmp/base REV``
gives one). Each method runs the embedded benchmark's demo task (4-3-3) at a few iterations per
step (``train.iterations=3 train.iterations_next=3 model.pretrained=null``, batch 8, one torch
thread, seed 0) once with each checkout, in its own process (``PYTHONPATH`` selects the checkout).
For every step it compares a SHA-256 of the checkpoint's model tensors (names, dtypes, shapes and
bytes, in order) and the step's metrics (per-class IoU, mIoU, pixel accuracy, iterations, image
counts). It prints one line per method and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ft", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib", "mib+sdr", "mib+ucd", "plop", "plop+ucd",
           "ssul", "ssul-m", "dkd", "dkd-m", "joint")
OVERRIDES = ("train.iterations=3", "train.iterations_next=3", "model.pretrained=null", "train.batch_size=8",
             "eval.num_images=1", "seed=0", "device=cpu")
METRICS = ("step", "classes", "per_class_iou", "miou", "pixel_accuracy", "iterations", "num_train_images",
           "num_memory_images")

FINGERPRINT = """
import hashlib, json, sys, torch
from pathlib import Path
run = Path(sys.argv[1])
out = []
for step in sorted(json.loads((run / "results.json").read_text())["steps"], key=lambda s: s["step"]):
    state = torch.load(run / "checkpoints" / f"step{step['step']}.pt", map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k, v in state["model"].items():
        h.update(f"{k}{v.dtype}{tuple(v.shape)}".encode()); h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                                                                  if v.numel() else b"")
    out.append({"weights": h.hexdigest(), **{k: step.get(k) for k in %r}})
print(json.dumps(out))
""" % (METRICS,)


def run_one(src: Path, method: str, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "UCDSEG_THREADS": "1"}
    name = method.replace("+", "_")
    cmd = [sys.executable, "-m", "ucdseg.cli", "--quiet", "run", "embedded/mib.yaml", f"method.name={method}",
           f"output_dir={out}", f"name={name}", *OVERRIDES]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    printed = subprocess.run([sys.executable, "-c", FINGERPRINT, str(out / name)], env=env, check=True,
                             capture_output=True, text=True).stdout
    return json.loads(printed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_src", type=Path, help="the src folder of the checkout to compare against")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bit-identity-"))
    differ = 0
    for method in args.methods:
        mine = run_one(REPO / "src", method, work / "this")
        theirs = run_one(args.base_src.resolve(), method, work / "base")
        same = mine == theirs
        differ += not same
        final = mine[-1]["miou"]["without_background"]["all"]
        print(f"{method:9s} {'identical' if same else 'DIFFERENT'}  steps={len(mine)}  final mIoU (all)={final:.6f}",
              flush=True)
        if not same:
            for a, b in zip(mine, theirs):
                keys = [k for k in a if a[k] != b.get(k)]
                if keys:
                    print(f"          step {a['step']}: {', '.join(keys)} differ")
    print(f"{len(args.methods) - differ}/{len(args.methods)} methods identical (runs in {work})")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
