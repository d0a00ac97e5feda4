"""scripts/study.sh, the one command that regenerates docs/results/: what it runs (dry run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV_KEYS = ("SEEDS", "BASELINE_SEEDS", "SWEEP_SEEDS", "TASKS", "WEIGHTS", "OUT", "JOBS", "REPORT")


def study(**env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    full_env.update(PYTHON=sys.executable, DRY_RUN="1", **env)
    return subprocess.run(["bash", str(REPO / "scripts" / "study.sh")], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_study_runs_the_ucd_pairs_first_then_the_baselines_then_the_sweep_then_reports():
    proc = study(SEEDS="0 1 2", BASELINE_SEEDS="0 1", SWEEP_SEEDS="1", WEIGHTS="0.1 1", OUT="runs/s")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith(f"+ {sys.executable} -m ucdseg.cli ") for line in lines)
    prefix = f"+ {sys.executable} -m ucdseg.cli --quiet "
    demos = [line[len(prefix):] for line in lines if line.startswith(prefix + "demo ")]
    compared = "mib,mib+ucd,plop,plop+ucd"
    everything = compared + ",ft,lwf,lwf-mc,ilt,joint"
    assert demos == (
        [f"demo --methods {compared} --seed {seed} --output-dir runs/s/{task}/seed{seed} task.name={task}"
         for seed in (0, 1, 2) for task in ("4-3-3", "6-1")]
        + [f"demo --methods {everything} --seed {seed} --output-dir runs/s/{task}/seed{seed} task.name={task}"
           for seed in (0, 1) for task in ("4-3-3", "6-1")])
    # the sweep: 4-3-3 only, both UCD methods at both weights, on the study's step 0 of the seed
    sweep = [line for line in lines if line.startswith(prefix + "run ")]
    assert len(sweep) == 2 * 2 and lines.index(sweep[0]) > lines.index(prefix + demos[-1])
    for weight in ("0.1", "1"):
        for method in ("mib+ucd", "plop+ucd"):
            line = next(a for a in sweep if f" name={method}-w{weight} " in a)
            assert line.split()[6].endswith("configs/demo.yaml")
            assert (f" task.name=4-3-3 seed=1 method.name={method} method.weights.ucd={weight} ") in line
            assert line.endswith(f"output_dir=runs/s-ucd-weight/4-3-3/seed1 train.step0_from=runs/s/4-3-3/seed1/mib")
    reports = [line for line in lines if " report " in line]
    assert reports[0].endswith(f"report runs/s/4-3-3/seed*/*/ --output-dir {REPO}/docs/results/4-3-3")
    assert reports[1].endswith(f"report runs/s/6-1/seed*/*/ --output-dir {REPO}/docs/results/6-1")
    assert reports[2].endswith(
        "report runs/s/4-3-3/seed*/mib/ runs/s/4-3-3/seed*/mib+ucd/ runs/s/4-3-3/seed*/plop/ "
        f"runs/s/4-3-3/seed*/plop+ucd/ runs/s-ucd-weight/4-3-3/seed*/*/ --output-dir {REPO}/docs/results/ucd-weight")
    assert len(reports) == 3
    assert not (REPO / "runs" / "s").exists()  # a dry run creates nothing


def test_study_defaults_five_seeds_for_the_ucd_pairs_three_for_the_baselines_and_no_sweep():
    proc = study(REPORT="0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert not any(" run " in line for line in lines)  # the sweep runs only when WEIGHTS is given
    assert sum(" --methods mib,mib+ucd,plop,plop+ucd --seed " in line for line in lines) == 5 * 2
    assert sum(",ft,lwf,lwf-mc,ilt,joint --seed " in line for line in lines) == 3 * 2


def test_study_subsets_and_bad_task():
    proc = study(SEEDS="2", BASELINE_SEEDS="", TASKS="6-1", WEIGHTS="", REPORT="0")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and " --seed 2 " in proc.stdout and "task.name=6-1" in proc.stdout
    proc = study(TASKS="5-5")
    assert proc.returncode == 2 and "TASKS names 5-5; the study's tasks are" in proc.stderr and not proc.stdout
