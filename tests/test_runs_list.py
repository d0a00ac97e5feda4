"""``ucdseg runs [DIR]`` (issue 24, item 5): every run folder under DIR with its task, method, seed,
steps done out of all, last mIoU and state, a folder held by a live process shown as running.

The folders are written here by hand (results.json, config.yaml, checkpoints, lock files), so
each state is known; the holder of a lock is a real second process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ucdseg import cli
from ucdseg.runs_list import format_runs, list_runs


def write_run(folder: Path, method: str = "mib", seed: int = 0, steps_done: int = 2, num_steps: int = 2,
              miou: float = 0.4321) -> Path:
    folder.mkdir(parents=True)
    records = [{"step": t, "classes": [t], "miou": {"without_background": {"old": 0.5, "new": None, "all": miou},
                                                    "with_background": {"old": 0.5, "new": None, "all": miou}}}
               for t in range(steps_done)]
    results = {"method": method, "seed": seed, "config": {"seed": seed, "method": {"name": method}},
               "task": {"dataset": "voc", "name": "15-5", "setting": "overlapped",
                        "steps": [[0, 1]] + [[t + 1] for t in range(1, num_steps)]}, "steps": records}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config.yaml").write_text(f"seed: {seed}\nmethod: {{name: {method}}}\n")
    (folder / "checkpoints").mkdir()
    for t in range(steps_done):
        (folder / "checkpoints" / f"step{t}.pt").write_bytes(b"x")
    return folder


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    write_run(root / "done", miou=0.4321)
    write_run(root / "stopped", steps_done=1, num_steps=3)
    killed = write_run(root / "killed", steps_done=1, num_steps=3, seed=2)
    (killed / "checkpoints" / "step1-last.pt").write_bytes(b"x")
    # a killed process's lock record: this machine, a process that no longer exists
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (killed / ".ucdseg.lock").write_text(f"process {dead.stdout.strip()} on {socket.gethostname()} since 2026\n")
    new = root / "new"
    new.mkdir()
    (new / "config.yaml").write_text("seed: 5\nmethod: {name: plop}\ndata: {dataset: ade}\ntask: {name: 100-10}\n")
    write_run(root / "demo" / "joint", method="joint", steps_done=1, num_steps=3)  # a demo's nested run
    (root / "demo" / "comparison.md").write_text("a table\n")
    return root


def rows_by_run(root: Path) -> dict[str, dict]:
    return {row["run"]: row for row in list_runs(root)}


def test_each_folder_gets_its_task_method_seed_steps_last_miou_and_state(runs):
    rows = rows_by_run(runs)
    assert set(rows) == {"done", "stopped", "killed", "new", "demo/joint"}
    assert rows["done"] == {"run": "done", "task": "voc 15-5", "method": "mib", "seed": 0, "steps": "2/2",
                            "miou": "43.2", "state": "done"}
    assert (rows["stopped"]["steps"], rows["stopped"]["state"]) == ("1/3", "stopped after step 0")
    assert (rows["killed"]["seed"], rows["killed"]["state"]) == (2, "interrupted in step 1")  # stale lock: not running
    assert rows["new"] == {"run": "new", "task": "ade 100-10", "method": "plop", "seed": 5, "steps": "0/?",
                           "miou": "-", "state": "new"}
    assert (rows["demo/joint"]["steps"], rows["demo/joint"]["state"]) == ("1/1", "done")  # joint: one step


def test_a_folder_held_by_a_live_process_is_running(runs):
    lock = runs / "stopped" / ".ucdseg.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, socket, sys, time
        f = open({str(lock)!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("process %d on %s since 2026-12-01 08:00:00\\n" % (os.getpid(), socket.gethostname())); f.flush()
        print("locked", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        state = rows_by_run(runs)["stopped"]["state"]
        assert state == f"running (process {holder.pid} on {socket.gethostname()} since 2026-12-01 08:00:00)"
        # held from another machine (a shared file system): the lock itself is tested
        lock.write_text("process 1 on another-node since 2026-12-01 08:00:00\n")
        assert rows_by_run(runs)["stopped"]["state"].startswith("running (process 1 on another-node")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert rows_by_run(runs)["stopped"]["state"] == "stopped after step 0"  # released


def test_the_command_prints_one_line_per_run_and_errors_in_one_line(runs, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["runs", str(runs)]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["run", "task", "method", "seed", "steps", "mIoU", "state"]
    assert set(lines[1]) <= {"-", " "}
    assert [line.split()[0] for line in lines[2:-1]] == ["demo/joint", "done", "killed", "new", "stopped"]
    assert lines[2 + 1].split() == ["done", "voc", "15-5", "mib", "0", "2/2", "43.2", "done"]
    assert lines[-1].startswith("mIoU: all classes without background")
    assert format_runs([], tmp_path) == f"no run folder under {tmp_path} (a run folder holds config.yaml or results.json)"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err := io.StringIO()):
        assert cli.main(["runs", str(tmp_path / "none")]) == 2
    assert err.getvalue().startswith("ucdseg: error: run folder") and err.getvalue().count("\n") == 1


def test_runs_defaults_to_the_runs_folder(runs, monkeypatch):
    monkeypatch.chdir(runs.parent)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["runs"]) == 0
    assert "demo/joint" in out.getvalue()
