"""Parity data for ``ucdseg.losses.regularizers`` (EWC, PI, RW) from MiB's release.

Release: ``fcdl94/MiB`` at commit 1c589833ce5c1a7446469d4602ceab2cdeac1b0e, file
``utils/regularizer.py`` (imported unchanged from a checkout; it needs only torch), driven as
``train.py:124-139`` drives it and carried from step to step as ``run.py:222-230`` and
``train.py:263-266`` do (the trainer's state goes through ``torch.save``/``torch.load``).

Regenerate (from the repository root)::

    mkdir -p /tmp/mib
    git -C <MiB mirror> archive 1c58983 utils/regularizer.py | tar -x -C /tmp/mib  # (*)
    OMP_NUM_THREADS=1 python tests/parity/make_regularizers.py --release /tmp/mib

(*) ``git archive`` of the MiB mirror may warn about a large file it lacks
(``ContinualAISlides.pdf``); ``utils/regularizer.py`` is extracted all the same. The command
writes ``tests/parity/data/regularizers.npz``. For each regulariser it trains a tiny seeded
float64 network (two convs, a BatchNorm, one 1x1 classifier per step) for ``N_ITER`` SGD
iterations of step 0 (3 classes), then ``N_ITER`` of step 1 (2 new classes, θ* and the previous
state from step 0), and records the unweighted penalty of every iteration, the penalty's gradient
at ``GRAD_ITERS`` of step 1, the weights at the end of each step and the regulariser's state at
the end of each step. The inputs (initial weights, images, labels) are stored too.

This module also holds the model, the inputs and the training loop that
``tests/losses/test_regularizers.py`` replays with ucdseg's classes; only :func:`main` needs
the release.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RELEASE_COMMIT = "1c589833ce5c1a7446469d4602ceab2cdeac1b0e"
OUT = Path(__file__).resolve().parent / "data" / "regularizers.npz"

N_ITER = 25  # RW scores at calls 10 and 20 of each step
GRAD_ITERS = (1, 7, 13, 19, 24)  # step-1 iterations whose penalty gradient is recorded
LR = 0.02
IMPORTANCE = 10.0  # reg_importance: MiB's 500/100 would make SGD unstable on this tiny net
ALPHA = 0.9
ITERATIONS = 10
CLASSES = ((3,), (3, 2))  # classes per classifier at step 0 and step 1
BATCH, SIZE = 2, 4
NAMES = ("ewc", "pi", "rw")


class TinyNet(nn.Module):
    """conv-BN-ReLU, conv-ReLU, one 1x1 classifier per step (MiB's ``cls`` ModuleList)."""

    def __init__(self, classes: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # a bias before BN gets no gradient
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.ModuleList([nn.Conv2d(4, n, 1) for n in classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return torch.cat([c(h) for c in self.cls], dim=1)


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Initial weights of both steps' networks, images and labels (float64 / int64)."""
    torch.manual_seed(seed)
    arrays: dict[str, np.ndarray] = {}
    net = TinyNet(CLASSES[1]).double()
    for key, p in net.named_parameters():
        arrays[f"init.{key}"] = p.detach().numpy().copy()
    for step, classes in enumerate(CLASSES):
        images = torch.randn(N_ITER, BATCH, 3, SIZE, SIZE, dtype=torch.float64)
        arrays[f"images{step}"] = images.numpy()
        ids = torch.tensor([0, 1, 2] if step == 0 else [0, 3, 4])
        labels = ids[torch.randint(0, len(ids), (N_ITER, BATCH, SIZE, SIZE))]
        labels[torch.rand(labels.shape) < 0.1] = 255
        arrays[f"labels{step}"] = labels.numpy()
    return arrays


def build_model(arrays: Any, step: int, trained: nn.Module | None = None) -> TinyNet:
    """Step 0: the initial weights. Step 1: ``trained``'s weights plus the new classifier's init
    (MiB's ``load_state_dict(strict=False)``, run.py:203)."""
    model = TinyNet(CLASSES[step]).double()
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.copy_(torch.from_numpy(arrays[f"init.{key}"]))
    if trained is not None:
        model.load_state_dict(trained.state_dict(), strict=False)
    model.train()
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """The old model: a frozen copy in eval mode (run.py:216-219)."""
    old = copy.deepcopy(model)
    for p in old.parameters():
        p.requires_grad = False
    return old.eval()


def run_step(
    model: nn.Module,
    get_reg: Callable[[int], Any],
    images: np.ndarray,
    labels: np.ndarray,
    backward_penalty: Callable[[Any], bool],
) -> dict[str, Any]:
    """MiB's iteration (train.py:98-141) with plain CE: backward, ``update()``, penalty, step.

    ``get_reg(it)`` returns the regulariser to use at iteration ``it`` (a test may swap in a
    resumed copy); ``backward_penalty(l_reg)`` says whether to back-propagate the weighted penalty.
    Returns the unweighted penalties and the penalty's gradients at ``GRAD_ITERS``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-4)
    penalties, grads = [], {k: [] for k in names}
    for it in range(len(images)):
        reg = get_reg(it)
        optim.zero_grad()
        logits = model(torch.from_numpy(images[it]))
        target = torch.from_numpy(labels[it])
        loss = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
        loss.mean().backward()
        reg.update()
        penalty = reg.penalty()
        penalties.append(float(penalty.detach()) if torch.is_tensor(penalty) else float(penalty))
        if it in GRAD_ITERS and torch.is_tensor(penalty) and penalty.requires_grad:
            got = torch.autograd.grad(penalty, params, retain_graph=True, allow_unused=True)
            for key, p, g in zip(names, params, got):
                grads[key].append(torch.zeros_like(p) if g is None else g.detach().clone())
        l_reg = IMPORTANCE * penalty
        if backward_penalty(l_reg):
            l_reg.backward()
        optim.step()
    stacked = {k: torch.stack(v) for k, v in grads.items() if v}
    return {"penalty": np.array(penalties), "grads": stacked}


def load_release(release: Path):
    """Import ``utils/regularizer.py`` of the checkout by path (not the ``utils`` package, whose
    ``__init__`` pulls in the rest of MiB)."""
    path = release / "utils" / "regularizer.py"
    if not path.is_file():
        sys.exit(f"no utils/regularizer.py under {release}")
    spec = importlib.util.spec_from_file_location("mib_regularizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def release_tables(name: str, reg: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The release's state at the end of a step, under ucdseg's table names."""
    state = reg.state_dict()
    if name == "ewc":
        return {"fisher": state["fisher"]}
    if name == "pi":
        return {"omega": state["score"], "delta": reg.delta}
    return {"fisher": state["fisher"], "score": state["score"], "score_sum": reg.score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="checkout of fcdl94/MiB")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    mib = load_release(args.release)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    arrays = make_inputs()
    out: dict[str, np.ndarray] = dict(arrays)
    release_condition = lambda l_reg: l_reg != 0.0  # noqa: E731  (train.py:135)
    for name in NAMES:
        opts = SimpleNamespace(
            regularizer=name, reg_alpha=ALPHA, reg_no_normalize=False, reg_iterations=ITERATIONS
        )
        model_old, old_state = None, None
        for step in (0, 1):
            model = build_model(arrays, step, model_old)
            reg = mib.get_regularizer(model, model_old, device, opts, old_state)
            run = run_step(model, lambda it: reg, arrays[f"images{step}"], arrays[f"labels{step}"],
                           release_condition)
            out[f"{name}.penalty{step}"] = run["penalty"]
            for key, g in run["grads"].items():
                out[f"{name}.grad{step}.{key}"] = g.numpy()
            for key, p in model.named_parameters():
                out[f"{name}.params{step}.{key}"] = p.detach().numpy().copy()
            for table, values in release_tables(name, reg).items():
                for key, v in values.items():
                    out[f"{name}.state{step}.{table}.{key}"] = v.detach().numpy().copy()
            buffer = io.BytesIO()  # the step checkpoint: trainer_state = {"regularizer": ...}
            torch.save(reg.state_dict(), buffer)
            buffer.seek(0)
            old_state = torch.load(buffer)
            model_old = frozen_copy(model)
    for array in out.values():
        assert np.isfinite(array).all() or array.dtype.kind == "i"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(out)} arrays)")


if __name__ == "__main__":
    main()
