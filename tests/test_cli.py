"""``ucdseg`` as a user types it: every command of ``ucdseg --help``, its exit code, the key lines
it prints and the files it writes, its ``--help``, and one-line errors for bad input.

Only the command line is used (``ucdseg.cli.main`` in-process, and ``python -m ucdseg.cli`` in a
subprocess for one success and one failure), so the package's internals can move freely. Inputs
are made here: four Fashion-MNIST IDX files written by hand (rectangles), from which
``ucdseg prepare-embedded`` generates a 24 + 8 scene, 32 px benchmark; a folder dataset of six
16 px masks whose classes are known; a few images for ``predict``. One tiny 2-step run
(``embedded_resnet`` without pre-training, 2 iterations per step) and one 2-method demo are
shared by the module. Expected values (task step sizes, per-setting image counts, the mean and
standard deviation of a report) are derived in this file from the inputs, not from ucdseg.

Output is captured with ``contextlib.redirect_stdout/stderr`` rather than ``capsys``, because the
module-scoped fixtures (which cannot use ``capsys``) check their command's output too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import statistics
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ucdseg import cli

#: Every command of ``ucdseg --help`` and of ``ucdseg data --help``; each has a test below.
COMMANDS = ("run", "demo", "eval", "predict", "report", "methods", "configs", "runs", "tasks", "index", "data",
            "device-check", "prepare-embedded")
DATA_COMMANDS = ("check", "prepare")

#: The embedded benchmark's classes: background, then Fashion-MNIST's ten labels in their order.
EMBEDDED_CLASSES = ["background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                    "sneaker", "bag", "ankle boot"]
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 24, 8, 32
TASK = "5-5"
TASK_STEPS = [list(range(0, 6)), list(range(6, 11))]  # background + 5 base classes, then 5 new

#: Foreground classes (of ``a``, ``b``, ``c``) in each training mask of the folder dataset.
FOLDER_CLASSES = ["background", "a", "b", "c"]
FOLDER_MASKS = {"i0": (1,), "i1": (2,), "i2": (3,), "i3": (1, 2), "i4": (2, 3), "i5": (1, 3)}
FOLDER_TASK, FOLDER_STEPS = "1-1", [[0, 1], [2], [3]]

#: Foreground classes per dataset and the named tasks of the papers (MiB, PLOP, UCD) each must offer.
NUM_CLASSES = {"voc": 20, "ade": 150, "cityscapes": 19, "embedded": 10}
NAMED_TASKS = {"voc": {"19-1", "15-5", "15-1", "10-1", "5-3", "2-2", "10-10"},
               "ade": {"100-50", "100-10", "100-5", "50-50"}, "cityscapes": {"17-2", "13-6", "13-1"},
               "embedded": {"5-5", "4-3-3"}}


# ------------------------------------------------------------------------------ running ucdseg
@dataclass
class Result:
    code: int
    out: str
    err: str


def ucdseg(*args: str) -> Result:
    """``ucdseg ARGS`` in this process: the exit code ``sys.exit(main())`` gives, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def ucdseg_process(*args: str) -> subprocess.CompletedProcess:
    """``python -m ucdseg.cli ARGS`` as a user runs it, with this checkout's package first on the path."""
    src = str(Path(cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("UCDSEG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ucdseg.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 2, nothing on stdout, one ``ucdseg: error: ...`` line on stderr naming ``fragments``."""
    code = result.code if isinstance(result, Result) else result.returncode
    out, err = (result.out, result.err) if isinstance(result, Result) else (result.stdout, result.stderr)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucdseg: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def pct(value) -> str:
    """A fraction as the CLI prints it: a percentage with one decimal, ``-`` when undefined."""
    return "-" if value is None else f"{100 * value:.1f}"


# ------------------------------------------------------------------------------ inputs
def write_fashion_mnist(folder: Path) -> Path:
    """Two 28 x 28 filled rectangles per class in both splits, as raw IDX files (magic 0x0803/0x0801)."""

    def idx(array: np.ndarray) -> bytes:
        return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()

    folder.mkdir(parents=True)
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    for c in range(10):
        for k in range(2):
            images[2 * c + k, 2 + c // 2: 26 - k, 3: 25 - c] = 230
    labels = np.repeat(np.arange(10, dtype=np.uint8), 2)
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(labels))
    return folder


def write_folder_dataset(root: Path) -> Path:
    """:data:`FOLDER_MASKS` as 16 x 16 grayscale id masks (one 4 x 8 bar per class), one val image."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = {**FOLDER_MASKS, "v0": (1, 2, 3)}
    for image_id, classes in masks.items():
        mask = np.zeros((16, 16), dtype=np.uint8)
        for row, c in enumerate(classes):
            mask[1 + 5 * row: 5 + 5 * row, 2:10] = c
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{image_id}.png")
        Image.fromarray(np.stack([mask * 70] * 3, axis=-1)).save(root / "images" / f"{image_id}.png")
    (root / "classes.yaml").write_text(f"classes: {json.dumps(FOLDER_CLASSES)}\n")
    (root / "train.txt").write_text("".join(f"{i}\n" for i in FOLDER_MASKS))
    (root / "val.txt").write_text("v0\n")
    return root


# ------------------------------------------------------------------------------ shared runs
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The module's folder; its own ucdseg cache while the module's fixtures run."""
    folder = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UCDSEG_CACHE", str(folder / "cache"))
        mp.delenv("UCDSEG_DEBUG", raising=False)
        yield folder


@pytest.fixture(scope="module")
def bench(base) -> tuple[Path, subprocess.CompletedProcess]:
    """``ucdseg prepare-embedded`` in a subprocess: the benchmark's root and the finished process."""
    fashion = write_fashion_mnist(base / "fashion-mnist")
    root = base / "embedded"
    proc = ucdseg_process("--quiet", "prepare-embedded", "--root", root, "--num-train", NUM_TRAIN, "--num-val",
                          NUM_VAL, "--image-size", IMAGE_SIZE, "--fashion-mnist", fashion)
    assert proc.returncode == 0, proc.stderr
    return root, proc


def data_overrides(root: Path, base: Path) -> list[str]:
    """What points a run at the tiny benchmark and makes it tiny (also given to ``demo``)."""
    return [f"data.root={root}", f"data.embedded_train={NUM_TRAIN}", f"data.embedded_val={NUM_VAL}",
            f"data.embedded_size={IMAGE_SIZE}", f"data.crop_size={IMAGE_SIZE}", f"data.cache_dir={base / 'index'}",
            f"task.name={TASK}", "model.pretrained=null", "train.batch_size=4", "train.iterations=2",
            "train.iterations_next=2", "eval.num_images=0", "device=cpu"]


@pytest.fixture(scope="module")
def config_file(base) -> Path:
    """A YAML config of a 2-step MiB run on the embedded benchmark (the data come as overrides)."""
    path = base / "tiny.yaml"
    path.write_text("name: tiny\nseed: 0\nmethod:\n  name: mib\nmodel:\n  backbone: embedded_resnet\n"
                    "  output_stride: 8\n")
    return path


@pytest.fixture(scope="module")
def tiny_run(base, bench, config_file, tiny_engine) -> tuple[Path, Result]:
    """``ucdseg run tiny.yaml ...``: the run directory and what the command printed."""
    with tiny_engine():
        result = ucdseg("--quiet", "run", config_file, f"output_dir={base / 'runs'}", *data_overrides(bench[0], base))
    assert result.code == 0, result.err
    return base / "runs" / "tiny", result


@pytest.fixture(scope="module")
def demo(base, bench, tiny_engine) -> tuple[Path, Result]:
    """``ucdseg demo --methods ft,mib --seed 1`` with the tiny overrides."""
    out = base / "demo"
    with tiny_engine():
        result = ucdseg("--quiet", "demo", "--methods", "ft,mib", "--output-dir", out, "--seed", "1",
                        *data_overrides(bench[0], base))
    assert result.code == 0, result.err
    return out, result


# ------------------------------------------------------------------------------ help
def subcommands(help_text: str) -> set[str]:
    """The ``{a,b,...}`` choices of a usage line."""
    return set(re.search(r"\{([a-z,-]+)\}", help_text).group(1).split(","))


def test_help_lists_exactly_the_commands_tested_here():
    result = ucdseg("--help")
    assert result.code == 0 and result.out.startswith("usage: ucdseg")
    assert subcommands(result.out) == set(COMMANDS)
    data = ucdseg("data", "--help")
    assert data.code == 0 and subcommands(data.out) == set(DATA_COMMANDS)


@pytest.mark.parametrize("command", [*COMMANDS, *(f"data {c}" for c in DATA_COMMANDS)])
def test_every_command_has_help(command):
    result = ucdseg(*command.split(), "--help")
    assert result.code == 0 and result.err == ""
    assert result.out.startswith(f"usage: ucdseg {command}")


@pytest.mark.parametrize("command", ["", *COMMANDS, *(f"data {c}" for c in DATA_COMMANDS)])
def test_help_is_plain_text_without_rest_markup(command):
    result = ucdseg(*command.split(), "--help")
    assert result.code == 0 and "``" not in result.out and ":func:" not in result.out and ":mod:" not in result.out


def test_unknown_command_is_a_usage_error():
    result = ucdseg("trian")
    assert result.code == 2 and result.out == ""
    assert "ucdseg: error: argument command: invalid choice: 'trian'" in result.err and "Traceback" not in result.err


# ------------------------------------------------------------------------------ prepare-embedded, data
def test_prepare_embedded_writes_the_voc_layout(bench, base):
    root, proc = bench
    assert proc.stdout.strip() == f"embedded benchmark ready in {root}" and proc.stderr == ""
    info = json.loads((root / "ucdseg_embedded.json").read_text())
    assert {k: info["params"][k] for k in ("num_train", "num_val", "image_size", "seed")} == \
        {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "image_size": IMAGE_SIZE, "seed": 0}
    lists = root / "ImageSets" / "Segmentation"
    train = lists.joinpath("train_aug.txt").read_text().split()
    val = lists.joinpath("val.txt").read_text().split()
    assert len(train) == NUM_TRAIN and len(val) == NUM_VAL and not set(train) & set(val)
    assert sorted(p.stem for p in (root / "JPEGImages").iterdir()) == sorted(train + val)
    assert sorted(p.stem for p in (root / "SegmentationClassAug").iterdir()) == sorted(train + val)
    assert sorted(p.stem for p in (root / "SegmentationClass").iterdir()) == sorted(val)
    seen = set()
    for image_id in train + val:
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        mask = np.array(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
        seen |= set(np.unique(mask).tolist())
    assert seen <= set(range(len(EMBEDDED_CLASSES))) | {255} and 0 in seen and 255 in seen and len(seen) > 3

    # the same command again finds the benchmark complete and leaves it alone
    stamp = (root / "JPEGImages" / f"{train[0]}.jpg").stat().st_mtime_ns
    again = ucdseg("--quiet", "prepare-embedded", "--root", root, "--num-train", NUM_TRAIN, "--num-val", NUM_VAL,
                   "--image-size", IMAGE_SIZE, "--fashion-mnist", base / "fashion-mnist")
    assert again.code == 0 and again.out.strip() == f"embedded benchmark ready in {root}"
    assert (root / "JPEGImages" / f"{train[0]}.jpg").stat().st_mtime_ns == stamp


def test_prepare_embedded_errors_are_one_line(bench, base, tmp_path):
    root, _ = bench
    other = ucdseg("--quiet", "prepare-embedded", "--root", root, "--num-train", NUM_TRAIN + 1, "--num-val", NUM_VAL,
                   "--image-size", IMAGE_SIZE, "--fashion-mnist", base / "fashion-mnist")
    assert_one_line_error(other, str(root), f"num_train={NUM_TRAIN} (asked {NUM_TRAIN + 1})")
    missing = ucdseg("--quiet", "prepare-embedded", "--root", tmp_path / "new", "--fashion-mnist", tmp_path / "none")
    assert_one_line_error(missing, "Fashion-MNIST IDX files not found", str(tmp_path / "none"))
    assert not (tmp_path / "new").exists()


def test_data_check_embedded(bench, tmp_path):
    root, _ = bench
    result = ucdseg("--quiet", "data", "check", "--dataset", "embedded", "--root", root)
    assert result.code == 0, result.out
    assert f"train: {NUM_TRAIN} entries, {NUM_TRAIN} pairs read" in result.out
    assert f"val: {NUM_VAL} entries, {NUM_VAL} pairs read" in result.out
    assert result.out.strip().splitlines()[-1] == "verdict: OK -- no problem found"

    missing = ucdseg("--quiet", "data", "check", "--dataset", "embedded", "--root", tmp_path / "nowhere")
    assert missing.code == 1
    assert f"{tmp_path / 'nowhere'}: root folder not found" in missing.out
    assert missing.out.strip().splitlines()[-1].startswith("verdict: FAILED")


def test_data_check_folder(tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    result = ucdseg("--quiet", "data", "check", "--dataset", "folder", "--root", root)
    assert result.code == 0, result.out
    assert result.out.splitlines() == [
        f"folder at {root}: 4 classes (background, a, b, c), train {len(FOLDER_MASKS)} images, val 1 images",
        "verdict: OK -- no problem found"]

    (root / "val.txt").write_text("v0\ni3\n")  # an id in both lists
    bad = ucdseg("--quiet", "data", "check", "--dataset", "folder", "--root", root)
    assert bad.code == 1
    assert bad.out.splitlines()[1:] == ["ERROR in-both-lists (1):", f"  {root / 'val.txt'}: 'i3' is also in train.txt",
                                        "  fix: keep each id in one of the two lists",
                                        "verdict: FAILED -- 1 error(s), 0 warning(s)"]


def test_data_prepare_without_the_archives_folder_is_one_line(tmp_path):
    result = ucdseg("--quiet", "data", "prepare", "voc", "--root", tmp_path / "voc", "--archives",
                    tmp_path / "downloads")
    assert_one_line_error(result, "archive folder not found", str(tmp_path / "downloads"))
    assert not (tmp_path / "voc").exists()


# ------------------------------------------------------------------------------ run, eval
def test_run_prints_the_summary_and_writes_its_files(tiny_run, bench, config_file):
    run_dir, result = tiny_run
    lines = result.out.splitlines()
    assert lines[0] == f"# mib on embedded {TASK} (overlapped), seed 0"
    assert lines[-1] == f"results in {run_dir}"
    assert result.err == ""
    assert {p.name for p in run_dir.iterdir()} >= {"results.json", "results.csv", "summary.md", "config.yaml",
                                                    "miou_per_step.png", "checkpoints"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step0.pt", "step1.pt"]
    assert (run_dir / "summary.md").read_text().strip() in result.out

    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"]["steps"] == TASK_STEPS and results["class_names"] == EMBEDDED_CLASSES
    assert [s["step"] for s in results["steps"]] == [0, 1]
    for step, record in enumerate(results["steps"]):
        assert record["iterations"] == 2 and record["num_eval_images"] == NUM_VAL
        assert record["seen"] == [c for s in TASK_STEPS[: step + 1] for c in s]
        names = ", ".join(EMBEDDED_CLASSES[c] for c in TASK_STEPS[step])
        miou = record["miou"]["without_background"]
        row = f"| {step} | {names} | {pct(miou['old'])} | {pct(miou['new'])} | {pct(miou['all'])} |"
        assert any(line.startswith(row) for line in lines), row

    # config.yaml holds the YAML file's values and the command line's overrides
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"]["name"] == "mib" and saved["model"]["output_stride"] == 8
    assert saved["data"]["root"] == str(bench[0]) and saved["train"]["iterations"] == 2
    assert saved["model"]["pretrained"] is None

    state = torch.load(run_dir / "checkpoints" / "step1.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 1 and state["classes_per_step"] == [len(s) for s in TASK_STEPS]


def test_run_again_continues_without_retraining(tiny_run, bench, base, config_file, tiny_engine):
    run_dir, first = tiny_run
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    with tiny_engine():
        again = ucdseg("--quiet", "run", config_file, f"output_dir={base / 'runs'}", *data_overrides(bench[0], base))
    assert again.code == 0 and again.out == first.out
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == stamps


def test_run_steps_stops_and_the_same_command_continues(base, bench, config_file, tmp_path, tiny_engine):
    args = ["--quiet", "run", config_file, f"output_dir={tmp_path}", "name=steps", *data_overrides(bench[0], base)]
    with tiny_engine():
        first = ucdseg(*args, "--steps", "0")
        assert first.code == 0, first.err
        assert [s["step"] for s in json.loads((tmp_path / "steps" / "results.json").read_text())["steps"]] == [0]
        assert "| 0 |" in first.out and "| 1 |" not in first.out
        again = ucdseg(*args)
    assert again.code == 0, again.err
    assert [s["step"] for s in json.loads((tmp_path / "steps" / "results.json").read_text())["steps"]] == [0, 1]
    assert_one_line_error(ucdseg(*args, "--steps", "0-7"), "config key 'train.steps' is '0-7'; the run has steps 0-1")


def test_eval_reproduces_the_runs_last_step(tiny_run, tiny_engine):
    run_dir, _ = tiny_run
    with tiny_engine():
        result = ucdseg("--quiet", "eval", run_dir / "checkpoints" / "step1.pt")
    assert result.code == 0, result.err
    last = json.loads((run_dir / "results.json").read_text())["steps"][-1]
    lines = result.out.splitlines()
    assert lines[0] == "step 1: mIoU " + ", ".join(
        f"{conv} " + "/".join(pct(last["miou"][conv][g]) for g in ("old", "new", "all"))
        for conv in ("with_background", "without_background")) + " (old/new/all)"
    assert [line.split() for line in lines[1:]] == [
        [*name.split(), pct(last["per_class_iou"][name])] for name in EMBEDDED_CLASSES]


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(ucdseg("eval", tmp_path / "step1.pt"), str(tmp_path / "step1.pt"), "does not exist")


# ------------------------------------------------------------------------------ predict
def test_predict_segments_files_and_folders(tiny_run, bench, tmp_path, tiny_engine):
    run_dir, _ = tiny_run
    root, _ = bench
    folder = tmp_path / "photos"
    folder.mkdir()
    val_ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:2]
    for image_id in val_ids:  # two scenes of the same size: one batch
        Image.open(root / "JPEGImages" / f"{image_id}.jpg").save(folder / f"{image_id}.png")
    (folder / "readme.txt").write_text("not an image\n")
    odd = tmp_path / "odd.jpg"  # another size, named explicitly
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(odd)
    out = tmp_path / "out"
    with tiny_engine():
        result = ucdseg("--quiet", "predict", run_dir / "checkpoints" / "step1.pt", folder, odd, "--output", out,
                        "--batch-size", "2", "--device", "cpu")
    assert result.code == 0, result.err
    assert result.out.strip() == (f"3 image(s) segmented: masks in {out / 'masks'}, overlays in {out / 'overlays'}, "
                                  f"summary in {out / 'summary.csv'}")
    stems = sorted([*val_ids, "odd"])
    assert sorted(p.stem for p in (out / "masks").iterdir()) == stems
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == stems

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sources = {"odd": odd, **{i: folder / f"{i}.png" for i in val_ids}}
    for stem, source in sources.items():
        width, height = Image.open(source).size
        mask = np.array(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (height, width) and mask.max() < len(EMBEDDED_CLASSES)
        counts = np.bincount(mask.ravel(), minlength=len(EMBEDDED_CLASSES))
        mine = [r for r in rows if r["image"] == str(source)]
        assert [int(r["class_id"]) for r in mine] == [c for c in np.argsort(-counts, kind="stable") if counts[c]]
        for r in mine:
            assert r["class_name"] == EMBEDDED_CLASSES[int(r["class_id"])]
            assert int(r["pixels"]) == counts[int(r["class_id"])]
            assert (int(r["width"]), int(r["height"])) == (width, height)
        assert sum(int(r["pixels"]) for r in mine) == width * height

    bare = tmp_path / "bare"
    with tiny_engine():
        result = ucdseg("--quiet", "predict", run_dir / "checkpoints" / "step1.pt", odd, "--output", bare,
                        "--no-overlays", "--device", "cpu")
    assert result.code == 0 and "overlays" not in result.out
    assert sorted(p.name for p in bare.iterdir()) == ["masks", "summary.csv"]

    assert_one_line_error(ucdseg("--quiet", "predict", run_dir / "checkpoints" / "step1.pt", tmp_path / "no.png",
                                 "--output", tmp_path / "x"), str(tmp_path / "no.png"))


# ------------------------------------------------------------------------------ demo, report
def test_demo_compares_two_methods(demo):
    out, result = demo
    assert result.out.startswith("== ft: fine-tuning") and "\n== mib: MiB" in result.out
    assert f"# Demo: embedded {TASK} (overlapped), seed 1" in result.out
    assert re.search(r"^wall time: ft \d+s, mib \d+s$", result.out, re.M)
    assert f"comparison written to {out / 'comparison.md'} and {out / 'comparison.png'}" in result.out
    assert {p.name for p in out.iterdir()} == {"ft", "mib", "comparison.md", "comparison.csv", "comparison.png"}
    table = (out / "comparison.md").read_text()
    assert table in result.out
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["step"]) for r in rows] == [("ft", "0"), ("ft", "1"), ("mib", "0"), ("mib", "1")]
    for name in ("ft", "mib"):
        results = json.loads((out / name / "results.json").read_text())
        assert results["seed"] == 1 and results["config"]["method"]["name"] == name
        miou = results["steps"][-1]["miou"]["without_background"]
        assert f"| {name} | {pct(miou['old'])} | {pct(miou['new'])} | {pct(miou['all'])} |" in table
        for record, row in zip(results["steps"], [r for r in rows if r["method"] == name]):
            assert float(row["miou_all_with_background"]) == record["miou"]["with_background"]["all"]
        assert (out / name / "checkpoints" / "step1.pt").is_file()
    # both train step 0 with cross-entropy: MiB reuses fine-tuning's step 0, so scores the same after it
    assert json.loads((out / "mib" / "results.json").read_text())["config"]["train"]["step0_from"] == str(out / "ft")
    assert {k: v for k, v in rows[0].items() if k != "method"} == {k: v for k, v in rows[2].items() if k != "method"}


def test_report_gives_mean_and_std_over_seeds(tiny_run, demo, base, bench, config_file, tmp_path, tiny_engine):
    run_dir, _ = tiny_run  # mib, seed 0
    demo_dir, _ = demo  # ft and mib, seed 1, with the demo's config (another learning rate, output stride...)
    with tiny_engine():  # the tiny run's config with seed 1: pooled with seed 0 (issue 16: only seeds pool)
        again = ucdseg("--quiet", "run", config_file, f"output_dir={tmp_path / 'runs'}", "name=tiny-seed1", "seed=1",
                       *data_overrides(bench[0], base))
    assert again.code == 0, again.err
    seed1 = tmp_path / "runs" / "tiny-seed1"
    out = tmp_path / "report"
    result = ucdseg("--quiet", "report", run_dir, seed1, demo_dir / "ft", demo_dir / "mib", "--output-dir", out)
    assert result.code == 0, result.err
    assert result.out.strip().splitlines()[-1] == (f"written to {out / 'report.md'}, report.csv, report.png and the "
                                                   "forgetting map report_forgetting*.png")
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "report.png", "report_forgetting.png"}
    assert (out / "report.md").read_text().strip() in result.out

    with open(out / "report.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    # the two configs of mib are two rows, labelled by the keys in which they differ
    tiny = next(m for m in rows if m.startswith("mib (") and "model.output_stride=8" in m)
    other = next(m for m in rows if m.startswith("mib (") and "model.output_stride=4" in m)
    assert set(rows) == {"ft", tiny, other}
    assert rows[tiny]["seeds"].split() == ["0", "1"] and rows[other]["seeds"] == "1" and rows["ft"]["seeds"] == "1"
    finals = [json.loads((d / "results.json").read_text())["steps"][-1]["miou"] for d in (run_dir, seed1)]
    for conv in ("without_background", "with_background"):
        for group in ("old", "all"):
            values = [f[conv][group] for f in finals]
            assert float(rows[tiny][f"{conv}_{group}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(rows[tiny][f"{conv}_{group}_std"]) == pytest.approx(statistics.stdev(values))
    cell = f"{pct(statistics.mean(f['without_background']['all'] for f in finals))} ± "
    assert any(line.startswith(f"| embedded {TASK} overlapped | {tiny} | 0,1 | 2 |") and cell in line
               for line in result.out.splitlines())
    # the same run twice is refused, naming both folders
    assert_one_line_error(ucdseg("report", run_dir, run_dir, "--output-dir", tmp_path / "r"), "is given twice")

    assert_one_line_error(ucdseg("report", tmp_path / "nothing", "--output-dir", tmp_path / "r"),
                          str(tmp_path / "nothing" / "results.json"))


# ------------------------------------------------------------------------------ methods, tasks
def test_methods_lists_every_method_with_its_weights():
    result = ucdseg("methods")
    assert result.code == 0
    listed, options, name = {}, {}, None
    for line in result.out.strip().splitlines():
        if line.startswith(" "):  # an option of the method above: "option NAME=DEFAULT: help"
            option = re.fullmatch(r"\s+option (\w+)=(\S+): .+", line)
            assert option, line
            options.setdefault(name, {})[option.group(1)] = option.group(2)
            continue
        match = re.fullmatch(r"(\S+)\s+(.+)  \[(.+)\]", line)
        assert match, line
        name = match.group(1)
        listed[name] = dict(w.split("=") for w in match.group(3).split(", "))
    # UCD's options (tau 0.07 from the paper) and PLOP's POD factors (its VOC preset)
    assert options["mib+ucd"] == {"temperature": "0.07", "formulation": "reference", "gather": "False",
                                  "void": "background"}
    assert options["plop"] == {"pod_factor": "0.01", "pod_last_factor": "0.0005"}
    assert options["plop+ucd"] == {**options["plop"], **options["mib+ucd"]} and "mib" not in options
    assert set(listed) >= {"ft", "lwf", "lwf-mc", "ilt", "mib", "mib+ucd", "joint", "plop", "plop+ucd"}
    # MiB (its release's --loss_kd 10): UNCE + 10 UNKD; UCD's paper adds 0.01 L_UCD; fine-tuning: CE alone
    assert listed["mib"] == {"unce": "1", "unkd": "10"}
    assert listed["mib+ucd"] == {"unce": "1", "unkd": "10", "ucd": "0.01"}
    assert listed["ft"] == {"ce": "1"}
    # the rows of issues 21-22: MiB's regularisers (importance 500 / 500 / 100), SDR's preset, DKD's config
    for name, importance in (("ewc", "500.0"), ("pi", "500.0"), ("rw", "100.0")):
        assert listed[name] == {"ce": "1"} and options[name]["importance"] == importance
        assert (options[name]["alpha"], options[name]["iterations"], options[name]["normalize"]) == ("0.9", "10", "True")
    assert listed["mib+sdr"] == {"unce": "1", "unkd": "100", "pm": "0.01", "fc": "0.001", "sep": "0.001", "fs": "0.001"}
    assert options["mib+sdr"] == {"release_compat": "False"}
    assert listed["ssul"] == listed["ssul-m"] == {"bce": "1"}
    assert options["ssul"] == {"unknown": "saliency", "pseudo_threshold": "0.7"}
    assert listed["dkd"] == listed["dkd-m"] == {"mbce": "1", "kd": "5", "dkd_pos": "5", "dkd_neg": "5", "ac": "1"}
    assert options["dkd"] == {"pos_weight": "1.0", "pos_weight_step0": "2.0", "ignore_void": "False"}


def steps_of(name: str, num_classes: int) -> list[int]:
    """Classes per step of a task name, as the papers name them: ``N-M`` is N base classes then steps of M; three or
    more numbers are explicit sizes; step 0 also holds the background."""
    sizes = [int(p) for p in name.split("-")]
    if len(sizes) == 2:
        base, size = sizes
        assert (num_classes - base) % size == 0, name
        sizes = [base] + [size] * ((num_classes - base) // size)
    assert sum(sizes) == num_classes, name
    return [sizes[0] + 1] + sizes[1:]


@pytest.mark.parametrize("dataset", sorted(NUM_CLASSES))
def test_tasks_lists_the_named_tasks_with_their_steps(dataset):
    result = ucdseg("tasks", dataset)
    assert result.code == 0
    listed = {}
    for line in result.out.strip().splitlines():
        match = re.fullmatch(r"(\S+)\s+(\d+) steps: \[([\d, ]+)\]", line)
        assert match, line
        sizes = [int(v) for v in match.group(3).split(", ")]
        assert int(match.group(2)) == len(sizes)
        listed[match.group(1)] = sizes
    assert set(listed) >= NAMED_TASKS[dataset]
    for name, sizes in listed.items():
        assert sizes == steps_of(name, NUM_CLASSES[dataset]), name


def test_tasks_of_an_unknown_dataset_is_one_error_line_naming_the_registered_ones():
    result = ucdseg("tasks", "coco")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.startswith("ucdseg: error: unknown dataset 'coco'") and result.err.count("\n") <= 1
    assert all(name in result.err for name in ("voc", "ade", "cityscapes", "embedded", "folder"))


# ------------------------------------------------------------------------------ configs, runs
def test_configs_lists_the_packaged_configs_by_name():
    result = ucdseg("configs", "embedded")
    assert result.code == 0 and result.err == ""
    names = [line.split()[0] for line in result.out.strip().splitlines()[:-1]]
    assert "embedded/mib" in names and "embedded/mib_ucd" in names and all("embedded" in n for n in names)


def test_runs_lists_the_runs_with_their_state(tiny_run, demo, base):
    run_dir, _ = tiny_run
    result = ucdseg("runs", base)
    assert result.code == 0, result.err
    rows = {line.split()[0]: line.split() for line in result.out.strip().splitlines()[2:-1]}
    assert set(rows) >= {"runs/tiny", "demo/ft", "demo/mib"}
    last = json.loads((run_dir / "results.json").read_text())["steps"][-1]["miou"]["without_background"]["all"]
    assert rows["runs/tiny"] == ["runs/tiny", "embedded", TASK, "mib", "0", "2/2", pct(last), "done"]
    assert rows["demo/mib"][3:6] == ["mib", "1", "2/2"]


# ------------------------------------------------------------------------------ device-check
def test_device_check_runs_the_checks_it_is_given(tmp_path):
    """One quick check through the command line (the whole CPU mode: tests/e2e/test_device_check.py)."""
    listed = ucdseg("device-check", "--list")
    assert listed.code == 0 and "ucd kernel" in listed.out.splitlines()
    result = ucdseg("device-check", "--device", "cpu", "--only", "ucd kernel", "--keep", tmp_path / "work")
    assert result.code == 0, result.out + result.err
    row = next(line for line in result.out.splitlines() if line.startswith("| ucd kernel"))
    assert "| pass   |" in row and "vs CPU fp64" in row
    assert "1 check: 1 pass, 0 skip, 0 fail" in result.out
    bad = ucdseg("device-check", "--device", "cpu", "--only", "nothing")
    assert bad.code == 2 and bad.err.startswith("ucdseg device-check: unknown check 'nothing'")


# ------------------------------------------------------------------------------ index
def index_rows(text: str) -> list[list[str]]:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["step", "classes", "images", "checksum"] and set(lines[1]) <= {"-", " "}
    return [line.split() for line in lines[2:]]


def expected_counts(setting: str) -> list[int]:
    """Training images per step of :data:`FOLDER_MASKS`: *overlapped* keeps every image holding a class of
    the step; *disjoint* only those whose other classes are all old (no future class)."""
    counts = []
    for t, step in enumerate(FOLDER_STEPS):
        seen = {c for s in FOLDER_STEPS[: t + 1] for c in s}
        has_new = [cs for cs in FOLDER_MASKS.values() if set(cs) & set(step)]
        counts.append(len(has_new) if setting == "overlapped" else len([cs for cs in has_new if set(cs) <= seen]))
    return counts


@pytest.mark.parametrize("setting", ["overlapped", "disjoint", "partitioned"])
def test_index_counts_each_steps_images(setting, tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    args = ["--quiet", "index", "--dataset", "folder", "--root", root, "--task", FOLDER_TASK, "--setting", setting]
    result = ucdseg(*args, "--cache-dir", tmp_path / "cache-a")
    assert result.code == 0, result.err
    rows = index_rows(result.out)
    assert [r[:2] for r in rows] == [["0", "0-1"], ["1", "2"], ["2", "3"]]
    assert all(re.fullmatch(r"[0-9a-f]{16}", r[3]) for r in rows)
    counts = [int(r[2]) for r in rows]
    if setting == "partitioned":  # each image in exactly one of the steps whose classes it holds
        alone = [sum(1 for cs in FOLDER_MASKS.values() if set(cs) <= set(step) | {0}) for step in FOLDER_STEPS]
        assert sum(counts) == len(FOLDER_MASKS)
        assert all(a <= n <= m for a, n, m in zip(alone, counts, expected_counts("overlapped")))
    else:
        assert counts == expected_counts(setting)
    # built again from the masks (another cache): the same lists, the same checksums
    assert index_rows(ucdseg(*args, "--cache-dir", tmp_path / "cache-b").out) == rows


def test_index_of_the_embedded_benchmark(bench, tmp_path):
    root, _ = bench
    result = ucdseg("--quiet", "index", "--dataset", "embedded", "--root", root, "--task", TASK,
                    "--cache-dir", tmp_path / "cache")
    assert result.code == 0, result.err
    assert [r[:2] for r in index_rows(result.out)] == [["0", "0-5"], ["1", "6-10"]]


# ------------------------------------------------------------------------------ errors
def test_unknown_method_is_one_line_and_trains_nothing(bench, base, config_file, tmp_path):
    overrides = data_overrides(bench[0], base)
    run = ucdseg("--quiet", "run", config_file, f"output_dir={tmp_path}", "method.name=mib+ucb", *overrides)
    assert_one_line_error(run, "unknown method 'mib+ucb'", "mib+ucd")
    demo = ucdseg("--quiet", "demo", "--methods", "ft,mbi", "--output-dir", tmp_path / "demo", *overrides)
    assert_one_line_error(demo, "unknown method 'mbi'")
    assert list(tmp_path.iterdir()) == []  # neither wrote anything


def test_exit_code_of_a_failing_command_in_a_subprocess(bench, base, config_file, tmp_path):
    proc = ucdseg_process("--quiet", "run", config_file, f"output_dir={tmp_path}", "method.name=nope",
                          *data_overrides(bench[0], base))
    assert_one_line_error(proc, "unknown method 'nope'")
