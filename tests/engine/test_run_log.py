"""What a researcher reaches for daily (issue 24): a run speaks (banner, a line per step, a summary,
``log.txt`` appended across resumes), ``results.json`` names its code, ``train.steps`` stops a run
that the next command continues, the TensorBoard extras, the lock file removed on a clean finish,
``--dry-run``, ``eval --save-predictions`` and ``ucdseg.run``.

One tiny two-step run (conftest's tiny backbone, task 8-2) is shared: trained first with
``train.steps=0`` and progress on (it stops after step 0), then continued quietly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import ucdseg
from ucdseg import cli
from ucdseg.api import config_overrides
from ucdseg.config import load_config, to_yaml
from ucdseg.embedded.reader import EmbeddedSegmentation
from ucdseg.engine import run
from ucdseg.engine.runlog import RunLog
from ucdseg.engine.runner import Run
from ucdseg.reporting import write_run_reports

EMBEDDED_META = EmbeddedSegmentation.meta

NAMES = ("background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
         "bag", "ankle boot")
# mib+ucd with 2 micro-batches: the run prints its warning that UCD then contrasts within micro-batches
OVERRIDES = ("train.accumulate=2", "eval.num_images=2")


@pytest.fixture(scope="module")
def logged(config_factory, tmp_path_factory, tiny_engine):
    """``(cfg, first stderr, first results, second stderr, second results)`` of the shared run."""
    out = tmp_path_factory.mktemp("logged")
    cfg_steps = config_factory(out, "logged", *OVERRIDES, "train.steps=0")
    cfg = config_factory(out, "logged", *OVERRIDES)
    with tiny_engine():
        first_err = io.StringIO()
        with contextlib.redirect_stderr(first_err):
            first = run(cfg_steps, progress=True, reports=write_run_reports)
        second_err = io.StringIO()
        with contextlib.redirect_stderr(second_err):
            second = run(cfg, progress=False, reports=write_run_reports)
    return cfg, first_err.getvalue(), first, second_err.getvalue(), second


def log_lines(cfg) -> list[str]:
    return (cfg.run_dir / "log.txt").read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------------ train.steps
def test_train_steps_stops_after_its_last_step_and_the_next_command_continues(logged):
    cfg, _, first, _, second = logged
    assert [s["step"] for s in first["steps"]] == [0]  # train.steps=0: step 0 only
    assert [s["step"] for s in second["steps"]] == [0, 1]
    assert second["steps"][0] == first["steps"][0]  # step 0 kept, not trained again
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["step0.pt", "step1.pt"]


def test_train_steps_refuses_a_range_after_an_unfinished_step(make_config, tiny_model):
    cfg = make_config("later", "train.steps=1")
    with pytest.raises(ValueError, match=r"train\.steps=1: step 0 is not finished in .*later; train it first"):
        run(cfg, progress=False)
    assert not any((cfg.run_dir / "checkpoints").glob("*.pt"))
    with pytest.raises(ValueError, match=r"config key 'train.steps' is '0-5'; the run has steps 0-1"):
        run(make_config("later", "train.steps=0-5"), progress=False)


# ------------------------------------------------------------------------------------ the run log
def test_log_txt_holds_the_banner_the_step_lines_and_the_summary_of_both_sessions(logged):
    cfg, _, first, _, second = logged
    lines = log_lines(cfg)
    text = "\n".join(lines)
    markers = [line for line in lines if line.startswith("==== ")]
    assert len(markers) == 2 and markers[0].startswith("==== new run ") and markers[1].startswith("==== resumed ")
    first_session, second_session = text.split(markers[1])
    # the banner: task, steps with their images, method, data, device and world size, folder, new or resumed
    for session, state in ((first_session, "(new run)"), (second_session, "(resumed: 1 of 2 step(s) done (step 0))")):
        assert f"run:     {cfg.run_dir} {state}" in session
        assert "task:    embedded 8-2 (overlapped), 2 step(s), classes per step [9, 2]" in session
        assert "method:  mib+ucd [unce=1, unkd=10, ucd=0.01] options temperature=0.07" in session
        assert re.search(rf"data:    embedded at \S+: 60 train / 16 val images", session)
        assert "device:  cpu, world size 1, global batch 4 (4 per process, accumulate 2), seed 0" in session
        assert f"ucdseg {ucdseg.__version__}" in session
        for step, record in enumerate(second["steps"]):
            assert (f"  step {step}: {record['num_train_images']} images, {record['iterations']} iterations at lr "
                    f"{0.01 if step == 0 else 0.001:g}; {len(record['classes'])} classes: "
                    + ", ".join(NAMES[c] for c in record["classes"])) in session
    # one line per finished step, with its mIoU in both conventions
    for record, session in zip(second["steps"], (first_session, second_session)):
        wo, wi = record["miou"]["without_background"], record["miou"]["with_background"]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        expected = (f"step {record['step']} done ({record['step'] + 1} of 2): mIoU old/new/all "
                    f"{pct(wo['old'])}/{pct(wo['new'])}/{pct(wo['all'])} (without bg), "
                    f"{pct(wi['old'])}/{pct(wi['new'])}/{pct(wi['all'])} (with bg); {record['iterations']} "
                    f"iterations on {record['num_train_images']} images")
        assert sum(expected in line for line in lines) == 1, expected
        assert expected in session
    # the summaries: stopped by train.steps, then finished
    assert "stopped after step 0 as train.steps=0 asks: 1 of 2 steps done (" in first_session
    assert "run the same command without --steps (or with the next steps) to continue" in first_session
    assert "finished: 2 of 2 step(s) done (" in second_session and "finished" not in first_session
    avg = second["avg"]["without_background"]
    assert f"avg (mean over the steps of mIoU all): {100 * avg:.1f} (without bg)" in second_session
    # every warning the run printed: the micro-batch note of both sessions
    warned = [line for line in lines if "WARNING" in line and "train.accumulate=2: UCD contrasts" in line]
    assert len(warned) == 2


def test_the_terminal_gets_the_log_unless_the_run_is_quiet(logged):
    cfg, first_err, _, second_err, _ = logged
    assert f"run:     {cfg.run_dir} (new run)" in first_err and "step 0 done (1 of 2)" in first_err
    assert "stopped after step 0" in first_err
    # the overall bar: the run's name and its steps done, beside the step's own bar
    assert "logged: 0/1 steps" in first_err and "logged: 1/1 steps" in first_err and "step 0 train" in first_err
    # quiet: no banner, no step line, no bar; ucdseg's warnings still reach the terminal
    assert "run:" not in second_err and "step 1 done" not in second_err and "steps:" not in second_err
    assert second_err.strip().splitlines() == [
        line for line in second_err.strip().splitlines() if line.startswith("ucdseg: warning: ")] != []


def test_runlog_copies_warnings_into_the_file_and_gives_stderr_back(tmp_path):
    before = sys.stderr
    log = RunLog(echo=False)
    log.start_capture()
    print("ucdseg: warning: said before the folder is locked", file=sys.stderr)
    warnings.showwarning(UserWarning("a python warning"), UserWarning, __file__, 7)  # what warnings.warn calls
    log.attach(tmp_path)
    print("not ours: left out", file=sys.stderr)
    log.info("a line\nanother line")
    log.close()
    assert sys.stderr is before
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith("==== new run ")
    assert re.search(r"WARNING ucdseg: warning: said before the folder is locked\n", text)
    assert re.search(r"WARNING UserWarning: a python warning \(.+test_run_log\.py:7\)\n", text)
    assert "INFO    a line\n" in text and "INFO    another line\n" in text and "not ours" not in text
    again = RunLog(echo=False)
    again.attach(tmp_path)
    again.close()
    assert (tmp_path / "log.txt").read_text().count("\n==== resumed ") == 1


# ------------------------------------------------------------------------------------ code version
def test_results_record_the_code_version_from_a_checkout(logged):
    cfg, *_ = logged
    saved = json.loads((cfg.run_dir / "results.json").read_text())
    code = saved["code"]
    assert [s["code"] for s in saved["steps"]] == [code, code]  # each step names the code that made it
    package = Path(ucdseg.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True)
    assert code["version"] == ucdseg.__version__
    if head.returncode != 0:  # an installed copy: no commit to name
        assert code["git_commit"] is None
        return
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                            capture_output=True, text=True).stdout
    assert code["git_commit"] == head.stdout.strip() and code["git_dirty"] == bool(status.strip())


def test_an_installed_copy_records_its_version_and_no_commit(tmp_path):
    copy = tmp_path / "site" / "ucdseg"
    shutil.copytree(Path(ucdseg.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    proc = subprocess.run([sys.executable, "-c", "import json, ucdseg.code_version as c; print(json.dumps("
                           "c.code_version()))"], env={**os.environ, "PYTHONPATH": str(copy.parent)}, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"version": ucdseg.__version__, "git_commit": None, "git_dirty": None}


# ------------------------------------------------------------------------------------ the folder
def test_the_lock_file_is_removed_on_a_clean_finish_and_held_while_running(logged, make_config, tiny_model):
    cfg, *_ = logged
    assert not (cfg.run_dir / ".ucdseg.lock").exists()
    holder = Run(make_config("held"), progress=False)
    try:
        lock = holder.folder.path / ".ucdseg.lock"
        assert re.fullmatch(rf"process {os.getpid()} on \S+ since .+\n", lock.read_text())
        with pytest.raises(RuntimeError, match="is in use by process"):
            Run(make_config("held"), progress=False)
        assert lock.exists()  # the refused run leaves the holder's lock alone
    finally:
        holder.folder.release()
        holder.log.close()
    assert not lock.exists()
    Run(make_config("held"), progress=False).folder.release()  # free again


def test_the_run_folder_holds_the_forgetting_map(logged):
    cfg, *_ = logged
    with Image.open(cfg.run_dir / "forgetting.png") as image:
        assert image.format == "PNG" and image.height > 300


# ------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_has_the_config_per_class_iou_predictions_and_an_honest_lr(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _, _, results = logged
    scalars, texts, images = {}, [], []
    for events in sorted((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*")):  # one file per session
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
        texts += [t for t in acc.Tags()["tensors"] if t.startswith("config")]
        images += [(e.step, e.width, e.height) for e in acc.Images("predictions")] if "predictions" in \
            acc.Tags()["images"] else []
    assert texts  # the resolved config as text, each session
    for record in results["steps"]:
        for name, value in record["per_class_iou"].items():
            tag = f"per_class_iou/{name.replace('/', '_').replace(' ', '_')}"
            if value is not None:
                assert any(e.step == record["step"] and e.value == pytest.approx(value) for e in scalars[tag]), tag
    assert [step for step, *_ in images] == [0, 1]
    with Image.open(cfg.run_dir / "predictions" / "step1.png") as figure:
        assert images[1][1:] == figure.size
    # the learning rate each iteration used: step 1 trains 2 iterations at lr_next 0.001, poly 0.9
    lr = [e.value for e in sorted(scalars["step1/lr"], key=lambda e: e.step)]
    assert lr == pytest.approx([0.001, 0.001 * (1 - 1 / 2) ** 0.9])
    assert min(lr) > 0


# ------------------------------------------------------------------------------------ dry run
def test_dry_run_prints_the_plan_and_writes_nothing(logged, tmp_path, tiny_model):
    cfg, *_, results = logged
    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(cfg))
    out, cache = tmp_path / "runs", tmp_path / "cache"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["--quiet", "run", str(config), f"output_dir={out}", f"data.cache_dir={cache}",
                         "--dry-run"])
    assert code == 0
    text = stdout.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no run folder, no cache
    resolved = yaml.safe_load(text.split("# plan")[0].split("\n", 1)[1])
    assert resolved["output_dir"] == str(out) and resolved["method"]["name"] == "mib+ucd"
    assert f"run folder: {out / 'logged'} does not exist: a new run" in text
    for record in results["steps"]:  # the same images and iterations as the run itself
        row = re.search(rf"^\s+{record['step']}\s+(\S+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(.+)$", text, re.M)
        assert row and int(row.group(2)) == record["num_train_images"] and int(row.group(3)) == record["iterations"]
        assert row.group(5) == ", ".join(NAMES[c] for c in record["classes"])
    assert re.search(r"^memory estimate \(one process, largest step\): [\d.]+ (MiB|GiB) = weights", text, re.M)
    assert text.strip().splitlines()[-1] == "nothing was trained or written (--dry-run)"
    # on the finished folder: nothing left to train
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert cli.main(["--quiet", "run", str(config), "--dry-run"]) == 0
    assert f"run folder: {cfg.run_dir} holds every step: nothing would be trained" in again.getvalue()


# ------------------------------------------------------------------------------------ eval --save-predictions
def test_eval_saves_a_palette_mask_of_every_validation_image_that_scores_as_eval_says(logged, tmp_path, tiny_model):
    cfg, *_ = logged
    out = tmp_path / "pred"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["--quiet", "eval", str(cfg.run_dir / "checkpoints" / "step1.pt"),
                         "--save-predictions", str(out)]) == 0
    printed = dict(re.findall(r"^\s+(\S.*?)\s+([\d.]+|-)$", stdout.getvalue(), re.M))
    assert stdout.getvalue().strip().splitlines()[-1] == \
        f"16 predicted masks (palette PNGs of the dataset's class ids) in {out}"
    root = Path(cfg.data.root)
    val_ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert sorted(p.stem for p in out.iterdir()) == sorted(val_ids)
    # per-class IoU from the files and the ground truth, by a naive count: the same as eval printed
    inter, union = np.zeros(11), np.zeros(11)
    for image_id in val_ids:
        with Image.open(out / f"{image_id}.png") as saved:
            assert saved.mode == "P" and saved.getpalette()[3:6] == list(EMBEDDED_META.palette[1])
            pred = np.array(saved)
        gt = np.array(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
        assert pred.shape == gt.shape and set(np.unique(pred)) <= set(range(11))
        valid = gt != 255
        for c in range(11):
            inter[c] += np.sum((pred == c) & (gt == c) & valid)
            union[c] += np.sum(((pred == c) | (gt == c)) & valid)
    for c, name in enumerate(NAMES):
        expected = "-" if union[c] == 0 else f"{100 * inter[c] / union[c]:.1f}"
        assert printed[name] == expected, name


# ------------------------------------------------------------------------------------ Python API
def test_config_overrides_are_the_command_lines_syntax():
    items = config_overrides({"name": "001", "seed": 1, "train": {"iterations": 40, "steps": "0-1"},
                              "method": {"options": {"temperature": 0.1}}, "model": {"pretrained": None},
                              "task.order": [3, 1, 2]})
    assert items == ['name="001"', "seed=1", "train.iterations=40", 'train.steps="0-1"',
                     "method.options.temperature=0.1", "model.pretrained=null", "task.order=[3, 1, 2]"]
    cfg = load_config(None, items)
    assert (cfg.name, cfg.train.iterations, cfg.train.steps, cfg.method.options, cfg.model.pretrained) == \
        ("001", 40, "0-1", {"temperature": 0.1}, None)
    assert cfg.task.order == [3, 1, 2]


def test_ucdseg_run_returns_the_results_of_a_config_object_or_file(logged, tmp_path, tiny_model):
    cfg, *_ = logged
    results = ucdseg.run(cfg, progress=False, output_dir=str(tmp_path), name="api", train={"iterations": 1},
                         eval={"num_images": 0})
    saved = json.loads((tmp_path / "api" / "results.json").read_text())
    assert results == saved
    assert saved["config"]["train"]["iterations"] == 1 and saved["config"]["name"] == "api"
    assert [s["iterations"] for s in saved["steps"]] == [1, 2]  # iterations_next of the config stays
    config = tmp_path / "api.yaml"
    config.write_text(to_yaml(cfg))
    again = ucdseg.run(config, progress=False, output_dir=str(tmp_path), name="api", train={"iterations": 1},
                       eval={"num_images": 0})
    assert again == saved  # the same folder and config: nothing to train, the same results


def test_the_overall_bar_counts_the_iterations_of_every_step_up_to_the_last():
    from ucdseg.engine.plan import OverallBar

    plan = [{"step": 0, "iterations": 100}, {"step": 1, "iterations": 20}, {"step": 2, "iterations": 30}]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar = OverallBar(plan, done={0}, last=1, label="run")  # step 2 is beyond train.steps
        assert (bar.bar.total, bar.bar.n) == (120, 100) and bar.bar.desc == "run: 1/2 steps"
        bar.skip(5)  # a mid-step checkpoint at iteration 5 of step 1: counted, not timed
        bar.update(15)
        bar.step_done(1)
        assert (bar.bar.n, bar.bar.desc) == (120, "run: 2/2 steps")
        bar.close()
    assert "run: 2/2 steps: 100%" in err.getvalue()
