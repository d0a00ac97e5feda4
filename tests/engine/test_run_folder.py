"""The run folder keeps a run's data safe (issue 16): an exclusive lock, orphaned temporary files
removed, checksummed checkpoints repaired from what is intact, results rebuilt from intact
checkpoints, the data a run was trained on checked when it resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg.engine import run
from ucdseg.engine.runner import Run, RunFolder

METRIC_KEYS = ("per_class_iou", "miou", "pixel_accuracy", "num_train_images", "index_checksum", "iterations")


def metrics(results: dict) -> list[dict]:
    return [{k: step[k] for k in METRIC_KEYS} for step in results["steps"]]


@pytest.fixture
def finished(make_config):
    """A finished tiny two-step run (predictions off)."""
    cfg = make_config("done", "eval.num_images=0")
    return cfg, run(cfg, progress=False)


def trained_steps(monkeypatch) -> list[int]:
    steps: list[int] = []
    original = Run.train_step
    monkeypatch.setattr(Run, "train_step", lambda self, step: (steps.append(step), original(self, step))[1])
    return steps


# ------------------------------------------------------------------------------------ the lock
def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(make_config):
    first = Run(make_config("busy"), progress=False)  # holds the lock until it is released
    try:
        with pytest.raises(RuntimeError) as info:
            Run(make_config("busy"), progress=False)
        message = str(info.value)
        assert "\n" not in message and "is in use by process" in message and str(os.getpid()) in message
        assert "another name=" in message
    finally:
        first.folder.release()
    Run(make_config("busy"), progress=False).folder.release()  # released: the folder is free again


def test_a_lock_left_by_a_killed_process_is_taken_over(make_config, tmp_path):
    cfg = make_config("stale")
    cfg.run_dir.mkdir(parents=True)
    # a process that held the lock and was killed: its lock file says so, but nothing locks it
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cfg.run_dir / RunFolder.LOCK).write_text(f"process {proc.stdout.strip()} on somewhere since 2026-01-01\n")
    holder = Run(cfg, progress=False)
    try:
        assert f"process {os.getpid()} on " in (cfg.run_dir / RunFolder.LOCK).read_text()
    finally:
        holder.folder.release()


def test_orphaned_temporary_files_are_removed_and_nothing_else(make_config):
    cfg = make_config("orphans")
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    orphans = [cfg.run_dir / ".results.json.k2j_x9.tmp", cfg.run_dir / "checkpoints" / ".step0.pt.ab3dxq.tmp"]
    kept = [cfg.run_dir / "notes.tmp", cfg.run_dir / "my-notes.txt", cfg.run_dir / ".hidden"]
    for path in orphans + kept:
        path.write_text("x")
    Run(cfg, progress=False).folder.release()
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in kept)


# --------------------------------------------------------------------- damaged or missing files
def test_a_truncated_checkpoint_is_detected_and_its_step_trained_again(finished, make_config, monkeypatch, capsys):
    cfg, results = finished
    step1 = cfg.run_dir / "checkpoints" / "step1.pt"
    assert results["steps"][1]["checkpoint_sha256"] == __import__("hashlib").sha256(step1.read_bytes()).hexdigest()
    step1.write_bytes(step1.read_bytes()[:1000])
    steps = trained_steps(monkeypatch)
    again = run(cfg, progress=False)
    assert steps == [1]
    assert "step1.pt does not match the checksum recorded in results.json" in capsys.readouterr().err
    assert metrics(again) == metrics(results)  # a seeded step trains to the same result


def test_deleted_results_are_rebuilt_from_the_checkpoints_without_training(finished, monkeypatch, capsys):
    cfg, results = finished
    (cfg.run_dir / "results.json").unlink()
    steps = trained_steps(monkeypatch)
    rebuilt = run(cfg, progress=False)
    assert steps == []
    assert [s["miou"] for s in rebuilt["steps"]] == [s["miou"] for s in results["steps"]]
    assert all(s["recovered"] and s["train_seconds"] is None for s in rebuilt["steps"])
    assert "step 0 recovered from" in capsys.readouterr().err


def test_truncated_results_are_rebuilt_too(finished, monkeypatch, capsys):
    cfg, results = finished
    path = cfg.run_dir / "results.json"
    path.write_text(path.read_text()[:200])
    steps = trained_steps(monkeypatch)
    rebuilt = run(cfg, progress=False)
    assert steps == [] and [s["miou"] for s in rebuilt["steps"]] == [s["miou"] for s in results["steps"]]
    err = capsys.readouterr().err
    assert f"results file {path} is corrupt" in err and "rebuilt from the checkpoints" in err
    assert json.loads(path.read_text())["steps"][1]["recovered"] is True


def test_a_corrupt_config_yaml_is_one_line(finished):
    cfg, _ = finished
    (cfg.run_dir / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ValueError) as info:
        Run(cfg, progress=False)
    assert "config.yaml is corrupt" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- the data identity
def shapes_dataset(root: Path, n: int = 10) -> Path:
    """A folder dataset of ``n`` 32 px images, one square of class 1 or 2 each; the last 3 in val."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[4 + k: 20 + k, 6: 22] = 1 + k % 2
        Image.fromarray(np.stack([mask * 100] * 3, -1)).save(root / "images" / f"i{k}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"i{k}.png")
    (root / "classes.yaml").write_text("classes: [background, one, two]\n")
    (root / "train.txt").write_text("".join(f"i{k}\n" for k in range(n - 3)))
    (root / "val.txt").write_text("".join(f"i{k}\n" for k in range(n - 3, n)))
    return root


def test_resuming_on_other_data_is_refused_and_on_moved_data_accepted(make_config, tmp_path):
    data = shapes_dataset(tmp_path / "shapes")
    folder = ["data.dataset=folder", "task.name=1-1", "data.crop_size=32", "eval.num_images=0"]
    cfg = make_config("shapes", *folder, f"data.root={data}")
    results = run(cfg, progress=False)
    assert set(results["data"]) == {"dataset"} | {f"{split}_{part}" for split in ("train", "val")
                                                  for part in ("files", "sizes", "content")}

    other = tmp_path / "other"  # the same images, one fewer in val
    shutil.copytree(data, other)
    (other / "val.txt").write_text("i7\ni8\n")
    with pytest.raises(ValueError) as info:
        Run(make_config("shapes", *folder, f"data.root={other}"), progress=False)
    assert "was trained on other data" in str(info.value) and "\n" not in str(info.value)

    moved = tmp_path / "moved"  # the same files elsewhere: the run continues
    shutil.copytree(data, moved)
    Run(make_config("shapes", *folder, f"data.root={moved}"), progress=False).folder.release()


def test_unreadable_data_fails_before_a_step_is_trained(make_config, tiny_benchmark, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_benchmark, broken)
    last = (broken / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[-1]
    (broken / "JPEGImages" / f"{last}.jpg").write_bytes(b"not a jpeg")
    steps = trained_steps(monkeypatch)
    with pytest.raises((ValueError, OSError)) as info:
        run(make_config("broken", f"data.root={broken}"), progress=False)
    assert steps == [] and f"{last}.jpg" in str(info.value)
