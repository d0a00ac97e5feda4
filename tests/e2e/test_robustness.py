"""Robustness of the engine: a real SIGKILL in the middle of a step, bfloat16 autocast on CPU, and
a non-finite loss.

(Resuming a run directory with a different config is covered by
``tests/engine/test_runner.py::test_changed_config_in_existing_run_dir_is_refused``.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import ucdseg.losses
from ucdseg import cli
from ucdseg.config import to_yaml
from ucdseg.engine import run
from ucdseg.engine.loop import NonFiniteLossError
from ucdseg.losses import contrastive_distillation
from ucdseg.losses.gathered import gathered_contrastive_distillation

METRIC_KEYS = ("step", "classes", "seen", "per_class_iou", "miou", "pixel_accuracy", "num_train_images",
               "index_checksum", "iterations")


def metrics(results: dict) -> list[dict]:
    return [{k: s[k] for k in METRIC_KEYS} for s in results["steps"]]


def stray_files(run_dir: Path) -> list[str]:
    """Temporary files of interrupted atomic writes and leftover mid-step checkpoints (the folder's
    lock file, ``.ucdseg.lock``, is left by a killed process, taken over by the next run and removed
    when a run finishes, see RunFolder.acquire and release)."""
    return sorted(p.name for p in run_dir.rglob("*") if p.name != ".ucdseg.lock" and (
        p.name.endswith(".tmp") or p.name.startswith(".") or p.name.endswith("-last.pt")))


# ----------------------------------------------------------------------------------------------
# SIGKILL in the middle of step 1, then the same command again
# ----------------------------------------------------------------------------------------------
def cli_args(root: Path, out: Path, name: str) -> list[str]:
    """A real ResNet-18 run: step 0 = 2 iterations, step 1 = 6 with a checkpoint every 2."""
    from conftest import base_overrides

    return ["--quiet", "run", str(cli.packaged_config("embedded/mib_ucd.yaml")),
            *base_overrides(root, out), "model.backbone=resnet18", f"name={name}", "train.iterations_next=6",
            "train.checkpoint_every=2"]


def test_sigkill_mid_step_then_rerun_matches_uninterrupted_run(tiny_benchmark, tmp_path, one_thread, capsys):
    from conftest import sigkill_when

    killed = tmp_path / "runs" / "killed"
    args = cli_args(tiny_benchmark, tmp_path, "killed")
    partial = killed / "checkpoints" / "step1-last.pt"
    sigkill_when(args, {**os.environ, "OMP_NUM_THREADS": "1"}, partial)
    # it died inside step 1: step 0 finished, step 1 only has its partial checkpoint
    assert not (killed / "checkpoints" / "step1.pt").exists()
    assert [s["step"] for s in json.loads((killed / "results.json").read_text())["steps"]] == [0]
    assert torch.load(partial, weights_only=True)["iteration"] in (2, 4)

    assert cli.main(args) == 0  # the same command again, to completion
    assert cli.main(cli_args(tiny_benchmark, tmp_path, "reference")) == 0  # never interrupted
    capsys.readouterr()

    reference = tmp_path / "runs" / "reference"
    resumed = json.loads((killed / "results.json").read_text())
    assert metrics(resumed) == metrics(json.loads((reference / "results.json").read_text()))
    assert [s["step"] for s in resumed["steps"]] == [0, 1] and resumed["steps"][1]["iterations"] == 6
    a = torch.load(killed / "checkpoints" / "step1.pt", weights_only=True)["model"]
    b = torch.load(reference / "checkpoints" / "step1.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert stray_files(killed) == []
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step0.pt", "step1.pt"]


# ----------------------------------------------------------------------------------------------
# bfloat16 autocast on CPU
# ----------------------------------------------------------------------------------------------
def test_bf16_autocast_run_completes_with_finite_results(make_config, tiny_model):
    # a bf16 forward of the real ResNet-18 takes seconds per iteration on a CPU without native
    # bf16 support, so this run uses the tiny model of conftest.py (same outputs and losses)
    cfg = make_config("bf16", "train.amp=bf16")
    results = run(cfg, progress=False)
    assert [s["step"] for s in results["steps"]] == [0, 1]
    for record in results["steps"]:
        assert 0 <= record["pixel_accuracy"] <= 1
        for value in record["per_class_iou"].values():
            assert value is None or (math.isfinite(value) and 0 <= value <= 1)
        for groups in record["miou"].values():
            assert all(v is None or math.isfinite(v) for v in groups.values())
    state = torch.load(cfg.run_dir / "checkpoints" / "step1.pt", weights_only=True)["model"]
    floats = [t for t in state.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)


def bf16_case():
    """Features of norm ~ 4 (so 1/tau-scaled similarities reach ~14: exp overflows float16) in bf16."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 16, 6, 6, generator=gen).to(torch.bfloat16)
    g = torch.randn(2, 16, 6, 6, generator=gen).to(torch.bfloat16)
    z = (3 * torch.randn(2, 4, 6, 6, generator=gen)).to(torch.bfloat16)
    y = torch.tensor([0, 0, 5, 6, 255])[torch.randint(0, 5, (2, 6, 6), generator=gen)]
    return f, g, z, y


@pytest.mark.parametrize("loss_fn", [contrastive_distillation, gathered_contrastive_distillation])
def test_contrastive_loss_on_bf16_inputs_under_autocast_is_float32_and_finite(loss_fn):
    f, g, z, y = bf16_case()
    # the same (bf16-representable) values in float32, outside autocast
    want = loss_fn(f.float(), g.float(), z.float(), y)
    f.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(f, g, z, y)
    got.backward()
    assert got.dtype == torch.float32 and torch.isfinite(got) and want.item() > 0
    # docs/protocol.md §3: computed in float32 even under mixed precision (a bf16 matmul is off by ~1e-3)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.isfinite(f.grad.float()).all() and f.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# non-finite loss
# ----------------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_naming_step_and_iteration(make_config, tiny_model, tmp_path, monkeypatch, capsys):
    cfg = make_config("nan", "train.iterations_next=4", "train.checkpoint_every=1")
    original, calls, poison_at = ucdseg.losses.unbiased_kd, [], [3]

    def poisoned(*args, **kwargs):  # called once per iteration of step 1: NaN at iteration 2
        calls.append(1)
        value = original(*args, **kwargs)
        return value * float("nan") if len(calls) == poison_at[0] else value

    monkeypatch.setattr(ucdseg.losses, "unbiased_kd", poisoned)
    config = tmp_path / "nan.yaml"
    config.write_text(to_yaml(cfg))
    assert cli.main(["--quiet", "run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ucdseg: error: loss is nan at step 1, iteration 2") and "\n" not in err
    assert "unkd=nan" in err and str(cfg.run_dir / "checkpoints") in err

    ckpts = cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step0.pt", "step1-last.pt"]
    step0 = torch.load(ckpts / "step0.pt", weights_only=True)
    assert step0["step"] == 0 and all(torch.isfinite(t).all() for t in step0["model"].values()
                                      if t.is_floating_point())
    last = torch.load(ckpts / "step1-last.pt", weights_only=True)
    assert last["step"] == 1 and last["iteration"] == 2  # the last good iteration, not the NaN one
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert [s["step"] for s in json.loads((cfg.run_dir / "results.json").read_text())["steps"]] == [0]
    assert [p for p in cfg.run_dir.rglob("*") if p.name.endswith(".tmp")] == []

    # running again resumes from the last good checkpoint (iteration 2) and meets the NaN again
    calls.clear()
    poison_at[0] = 1
    with pytest.raises(NonFiniteLossError, match=r"at step 1, iteration 2 "):
        run(cfg, progress=False)
