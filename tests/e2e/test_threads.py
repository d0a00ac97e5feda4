"""torch's threads (issue 23): ``train.threads=auto|N`` and ``UCDSEG_THREADS`` (config key > environment
> auto), the banner's threads line, and ``results.json``'s record of every segment of a run, across a real
SIGKILL and a resume under another count (a resume is bit-identical only with the same count: it says so,
and ``auto`` keeps the previous segment's count)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ucdseg
from ucdseg import cli, threads
from ucdseg.config import load_config

SRC = str(Path(ucdseg.__file__).resolve().parents[1])
EXPECTED = "expected auto or an integer >= 1"


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def segments(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["segments"]


def banner_threads(run_dir: Path) -> list[str]:
    """The threads line of each session's banner in ``log.txt``."""
    return re.findall(r"^\S+ \S+ INFO +threads: (.*)$", (run_dir / "log.txt").read_text(), re.MULTILINE)


# ------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("value,shown", [("0", "'0'"), ("-2", "'-2'"), ("two", "'two'"), ("1.5", "'1.5'"),
                                         ("Auto", "'Auto'"), ("", "None"), ("null", "None")])
def test_a_bad_train_threads_is_one_line_naming_the_key(value, shown, tmp_path, capsys):
    assert cli.main(["--quiet", "run", "embedded/mib", f"output_dir={tmp_path}", f"train.threads={value}"]) == 2
    assert stderr_lines(capsys) == [f"ucdseg: error: config key 'train.threads' is {shown}; {EXPECTED}"]
    assert list(tmp_path.iterdir()) == []


def test_a_bad_train_threads_in_a_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  threads: 0\n")
    assert cli.main(["--quiet", "run", str(config), f"output_dir={tmp_path / 'runs'}"]) == 2
    assert stderr_lines(capsys) == [f"ucdseg: error: config file {config}: config key 'train.threads' is '0'; "
                                    f"{EXPECTED}"]


def test_good_train_threads_values_load():
    assert load_config(None, []).train.threads == "auto"
    assert load_config(None, ["train.threads=3"]).train.threads == "3"
    assert load_config(None, ["train.threads=auto"]).train.threads == "auto"


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_a_bad_ucdseg_threads_is_one_line_before_the_run_folder_is_touched(value, make_config, monkeypatch, capsys):
    cfg = make_config("bad-env")
    monkeypatch.setenv("UCDSEG_THREADS", value)
    assert cli.main(["--quiet", "run", "embedded/mib", f"output_dir={cfg.output_dir}", f"data.root={cfg.data.root}",
                     f"data.cache_dir={cfg.data.cache_dir}", "device=cpu"]) == 2
    assert stderr_lines(capsys) == [f"ucdseg: error: environment variable UCDSEG_THREADS is {value!r}; {EXPECTED}"]
    assert not Path(cfg.output_dir).exists()


# ------------------------------------------------------------------------------- precedence
def test_config_key_beats_environment_beats_auto():
    env = {"UCDSEG_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert (threads.choose("2", None, env).threads, threads.choose("2", None, env).source) == (2, "train.threads")
    assert (threads.choose("auto", None, env).threads, threads.choose("auto", None, env).source) == (3, "UCDSEG_THREADS")
    auto = threads.choose("auto", None, {"OMP_NUM_THREADS": "5"})
    assert (auto.threads, auto.source, auto.why) == (5, "auto", "OMP_NUM_THREADS=5")
    for empty in ("", " ", "auto"):  # unset in all but name
        assert threads.choose("auto", None, {"UCDSEG_THREADS": empty, "OMP_NUM_THREADS": "4"}).threads == 4


def test_auto_gives_the_cores_other_processes_leave_free(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert threads.auto_threads({}, load=0.0)[0] == 4  # a quiet machine: one thread per core, as torch's default
    assert threads.auto_threads({}, load=0.4)[0] == 4  # a shell or an editor now and then: still all of them
    assert threads.auto_threads({}, load=1.0)[0] == 3
    assert threads.auto_threads({}, load=2.6)[0] == 1
    assert threads.auto_threads({}, load=9.0)[0] == 1  # never fewer than one
    assert threads.auto_threads({"LOCAL_WORLD_SIZE": "2"}, load=0.0)[0] == 2  # two torchrun processes share the cores
    count, why = threads.auto_threads({}, load=2.0)
    assert (count, why) == (2, "4 core(s), 2.0 other runnable thread(s) on 4")


def test_the_load_is_what_other_processes_run(monkeypatch):
    """Two busy processes of the test's own: at least ~2 other runnable threads (what else the machine runs adds)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert threads.other_load() >= 1.5
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def test_environment_through_the_cli_and_the_banner_and_results_say_so(tiny_benchmark, tmp_path, one_thread,
                                                                        monkeypatch, capsys):
    from conftest import base_overrides

    args = ["--quiet", "run", "embedded/mib", *base_overrides(tiny_benchmark, tmp_path), "name=env2"]
    monkeypatch.setenv("UCDSEG_THREADS", "2")
    assert cli.main([*args, "train.steps=0"]) == 0
    assert cli.main([*args, "train.threads=1"]) == 0  # the config key wins over the environment
    run_dir = tmp_path / "runs" / "env2"
    assert [(s["step"], s["iteration"], s["threads"], s["chosen_by"]) for s in segments(run_dir)] == [
        (0, 0, 2, "UCDSEG_THREADS"), (1, 0, 1, "train.threads")]
    policy = threads.describe_wait_policy()  # torch was loaded before cli.main: the policy stays as it was
    assert banner_threads(run_dir) == [f"2 torch threads (UCDSEG_THREADS=2), {policy}",
                                       f"1 torch thread (train.threads=1), {policy}"]
    err = capsys.readouterr().err
    assert ("ucdseg: warning: train.threads=1: this run's previous segment trained with 2 torch thread(s); a resume "
            "is bit-identical to an uninterrupted run only with the same count (train.threads=2)") in err
    assert torch.get_num_threads() == 1  # the caller's count is given back (conftest's one thread)


# ------------------------------------------------------------------------------- the wait policy
def test_the_wait_policy_is_passive_on_a_busy_machine_and_openmps_default_on_a_quiet_one(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads.choose_wait_policy({}, load=2.0) == (
        "PASSIVE", "the machine was busy when the command started (2.0 other runnable thread(s))")
    assert threads.choose_wait_policy({}, load=0.6)[0] == "PASSIVE"  # one core of two taken
    assert threads.choose_wait_policy({}, load=0.3) == (None, "the machine was quiet when the command started")
    for given in ("ACTIVE", "PASSIVE"):  # the user's setting stands, busy or quiet
        assert threads.choose_wait_policy({"OMP_WAIT_POLICY": given}, load=2.0) == (
            given, "OMP_WAIT_POLICY set before ucdseg started")
        assert threads.choose_wait_policy({"OMP_WAIT_POLICY": given}, load=0.0)[0] == given


CLI_POLICY = """
import os, sys
from ucdseg import cli, threads
threads.other_load = lambda *a, **k: float(os.cpu_count())  # every core busy
code = cli.main(sys.argv[1:])
print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv,policy", [(["configs", "embedded/mib"], "None"), (["run", "no-such.yaml"], "PASSIVE"),
                                         (["run", "--dry-run", "no-such.yaml"], "None")])
def test_the_commands_that_train_set_the_wait_policy_before_torch_loads(argv, policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", CLI_POLICY, *argv], env={**env, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1].split() == [policy, "False"], proc.stderr


# ------------------------------------------------------------------------------- resume
def test_auto_resumes_with_the_previous_segments_count_and_says_so(make_config, monkeypatch, capsys):
    from ucdseg.engine import run

    monkeypatch.setenv("UCDSEG_THREADS", "2")
    run(make_config("auto", "train.steps=0"), progress=False)
    monkeypatch.delenv("UCDSEG_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what auto would choose for a new run
    capsys.readouterr()
    results = run(make_config("auto"), progress=False)
    assert [(s["step"], s["threads"]) for s in results["segments"]] == [(0, 2), (1, 2)]
    assert results["segments"][1]["chosen_by"].startswith("auto: as the run's previous segment")
    assert results["versions"]["torch_threads"] == 2  # the count the run started with
    assert ("ucdseg: note: train.threads=auto: 2 torch thread(s), as this run's previous segment, so that the resume "
            "is bit-identical; 1 would suit this machine now: set train.threads=1 (or UCDSEG_THREADS=1) to trade "
            "bit-identity for speed") in capsys.readouterr().err
    # a finished run trains nothing: no segment, no line
    again = run(make_config("auto"), progress=False)
    assert len(again["segments"]) == 2 and "ucdseg: note: train.threads" not in capsys.readouterr().err


def test_a_run_recorded_before_segments_resumes_with_the_count_it_started_with():
    old = {"versions": {"torch_threads": 3}, "steps": [{"step": 0}]}
    assert threads.choose("auto", old, {"OMP_NUM_THREADS": "1"}).threads == 3
    assert threads.choose("auto", {"versions": {"torch_threads": 3}, "steps": []}, {"OMP_NUM_THREADS": "1"}).threads == 1


def test_segments_are_recorded_across_a_sigkill_and_a_resume_under_another_count(tiny_benchmark, tmp_path, capsys):
    """A real run (the demo's small embedded ResNet) killed in the middle of step 1, then the same
    command under another UCDSEG_THREADS: each process is a segment of results.json, from the step
    and iteration where it started, and the resume says that bit-identity needs the first count."""
    from conftest import base_overrides, sigkill_when

    args = ["--quiet", "run", "embedded/mib", *base_overrides(tiny_benchmark, tmp_path), "name=killed",
            "model.backbone=embedded_resnet", "model.output_stride=4", "train.iterations_next=40",
            "train.checkpoint_every=2", "eval.num_images=0"]
    run_dir = tmp_path / "runs" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UCDSEG_THREADS": "1", "PYTHONPATH": SRC}
    partial = run_dir / "checkpoints" / "step1-last.pt"
    sigkill_when(args, env, partial)
    killed = segments(run_dir)
    assert [(s["step"], s["iteration"], s["threads"], s["chosen_by"]) for s in killed] == [
        (0, 0, 1, "UCDSEG_THREADS")]
    iteration = torch.load(partial, weights_only=True)["iteration"]
    assert iteration >= 2

    resumed = subprocess.run([sys.executable, "-m", "ucdseg.cli", *args], capture_output=True, text=True,
                             env={**env, "UCDSEG_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert [(s["step"], s["iteration"], s["threads"], s["chosen_by"]) for s in segments(run_dir)] == [
        (0, 0, 1, "UCDSEG_THREADS"), (1, iteration, 2, "UCDSEG_THREADS")]
    assert segments(run_dir)[0] == killed[0]
    first, second = segments(run_dir)
    assert first["pid"] != second["pid"] and second["omp_wait_policy"] == "PASSIVE"
    notes = [line for line in resumed.stderr.splitlines() if "bit-identical" in line]
    assert notes == ["ucdseg: warning: UCDSEG_THREADS=2: this run's previous segment trained with 1 torch thread(s); "
                     "a resume is bit-identical to an uninterrupted run only with the same count (train.threads=1)"]
    assert banner_threads(run_dir)[-1] == ("2 torch threads (UCDSEG_THREADS=2), OpenMP wait policy PASSIVE "
                                           "(OMP_WAIT_POLICY set before ucdseg started)")
