"""The device check (``scripts/device_check.sh``, ``ucdseg.device_check``) in its CPU mode, as the CI runs it.

The script's CPU run trains the VOC-shaped tiny task under torchrun, runs bf16 autocast and
channels_last in process, the UCD kernel, its gathered variant and PLOP's histogram all-reduce on
2 gloo processes, eval and predict; its table must hold every check, fp16 / SyncBN / the 2-GPU run
skipped, nothing failed. Then: a failing check makes the runner's exit code 1 (a skip does not),
and the command line refuses what it cannot do with one line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ucdseg import device_check
from ucdseg.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
SKIPPED_ON_CPU = {"task torchrun x2", "amp fp16 + GradScaler", "syncbn x2"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("device-check") / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--device", "cpu", "--keep", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, work


def table_rows(stdout: str) -> dict[str, tuple[str, float, str]]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^\| (.+?) +\| (pass|fail|skip) +\| +([0-9.]+) \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), float(m.group(3)), m.group(4))
    return rows


def test_script_passes_on_cpu(cpu_run):
    proc, _ = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert list(rows) == [c.name for c in device_check.CHECKS]
    assert {name for name, (result, _, _) in rows.items() if result == "skip"} == SKIPPED_ON_CPU
    assert all(result == "pass" for name, (result, _, _) in rows.items() if name not in SKIPPED_ON_CPU)
    assert "11 checks: 8 pass, 3 skip, 0 fail" in proc.stdout


def test_rows_say_what_they_checked(cpu_run):
    proc, work = cpu_run
    rows = table_rows(proc.stdout)
    assert "resnet18 64 px, 15-5 plop+ucd (gathered), 2 steps x 2 it" in rows["task torchrun x1"][2]
    assert "convolutions in bfloat16" in rows["amp bf16"][2]
    assert "all on NHWC inputs" in rows["channels_last"][2]
    assert "2 processes (gloo, cpu)" in rows["ucd gathered x2"][2]
    assert "all-reduce over 2 processes" in rows["plop histogram"][2]
    assert rows["amp fp16 + GradScaler"][2].startswith("skip (cpu)")
    assert rows["task torchrun x1"][1] > 0
    # the work folder kept with --keep: the x1 run's folder and the torchrun logs
    assert (work / "runs" / "torchrun-x1" / "checkpoints" / "step1.pt").is_file()
    assert (work / "logs" / "torchrun-x1.log").is_file()
    assert (work / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().count("\n") == 12


def test_a_failing_check_makes_the_exit_code_1(tmp_path, capsys, monkeypatch):
    def broken(ctx):
        raise ValueError("the kernel returned NaN")

    def passing(ctx):
        return "fine"

    def not_here(ctx):
        raise device_check.Skip("needs 2 GPUs")

    checks = [device_check.Check("passing", passing), device_check.Check("broken", broken),
              device_check.Check("not here", not_here)]
    monkeypatch.setattr(device_check, "CHECKS", checks)
    assert device_check.main(["--device", "cpu", "--keep", str(tmp_path / "w")]) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["passing"][0] == "pass" and rows["not here"][0] == "skip"
    assert rows["broken"] == ("fail", rows["broken"][1], "ValueError: the kernel returned NaN")
    assert "3 checks: 1 pass, 1 skip, 1 fail" in out and f"work folder kept: {tmp_path / 'w'}" in out
    # without the failure the same run passes: skips do not fail, and the temporary folder goes
    monkeypatch.setattr(device_check, "CHECKS", [checks[0], checks[2]])
    assert cli_main(["device-check", "--device", "cpu"]) == 0
    assert "work folder removed" in capsys.readouterr().out


def test_runner_keeps_going_after_a_failure_and_reports_check_errors():
    calls = []

    def first(ctx):
        calls.append("first")
        device_check.expect(1 + 1 == 3, "1 + 1 is not 3")

    def second(ctx):
        calls.append("second")
        return "ran"

    rows = device_check.run_checks([device_check.Check("a", first), device_check.Check("b", second)], ctx=None)
    assert calls == ["first", "second"]
    assert [(r.name, r.result, r.detail) for r in rows] == [("a", "fail", "1 + 1 is not 3"), ("b", "pass", "ran")]


def test_command_line_refusals(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_check.main([]) == 2
    assert capsys.readouterr().err.strip() == ("ucdseg device-check: CUDA is not available here; run with --device "
                                               "cpu to check the CPU path")
    assert device_check.main(["--device", "cuda"]) == 2
    assert "--device cuda, but CUDA is not available here" in capsys.readouterr().err
    assert device_check.main(["--device", "cpu", "--only", "ucd kernels"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ucdseg device-check: unknown check 'ucd kernels'; the checks are: task torchrun x1")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "runs").mkdir()  # an earlier check's folder: its finished runs would not train again
    assert device_check.main(["--device", "cpu", "--keep", str(tmp_path / "used")]) == 2
    assert "expected a new or empty folder" in capsys.readouterr().err
    assert device_check.main(["--list"]) == 0
    assert capsys.readouterr().out.split("\n")[:-1] == [c.name for c in device_check.CHECKS]
