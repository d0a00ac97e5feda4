"""Hostile and careless inputs on the command line (issue 16): every case runs the CLI in its own
process and asserts exit code 2, ONE stderr line ``ucdseg: error: ...`` naming the file, key or
value, no traceback anywhere, and that no file or folder that existed before the command changed.

The cases are data (:data:`CASES`): bad config values (one per range check), malformed YAML
files, ``ucdseg report`` misuse (the same run twice, a file as output folder, corrupt
``results.json``) and bad dataset files (truncated or non-image JPEG/PNG, mask of the wrong size,
mask ids outside the classes on the folder, VOC, ADE20K and Cityscapes layouts).

Speed: importing torch costs ~3 s per process on the shared CI machine. A *fork server* (one
Python process that imports ``ucdseg.cli`` and the engine once) forks a fresh child per case; the
child runs ``ucdseg.cli.main(argv)`` with its own stdout, stderr, working directory and
environment, and exits with its code, exactly as ``python -m ucdseg.cli`` ends (an uncaught
exception prints its traceback and exits 1). ``UCDSEG_TEST_FRESH=1`` runs every case as
``sys.executable -m ucdseg.cli`` instead, and :func:`test_fork_server_agrees_with_a_fresh_process`
checks both ways agree on cases of every kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import ucdseg

SRC = str(Path(ucdseg.__file__).resolve().parents[1])  # the source tree these tests import
FRESH = os.environ.get("UCDSEG_TEST_FRESH") == "1"

# ------------------------------------------------------------------------------ running the CLI
_FORK_SERVER = textwrap.dedent("""
    import json, os, sys, traceback
    import ucdseg.cli, ucdseg.config, ucdseg.engine, ucdseg.reporting  # paid once
    print("ready", flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(case["cwd"])
                os.environ.clear(); os.environ.update(case["env"])
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                sys.argv = ["ucdseg", *case["argv"]]
                try:
                    code = ucdseg.cli.main(case["argv"])  # python -m ucdseg.cli: sys.exit(main())
                except SystemExit as exc:  # argparse
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:  # what the interpreter does with an uncaught exception
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code or 0)
        _, status = os.waitpid(pid, 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
""")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, "UCDSEG_DEBUG": ""}


def run_fresh(argv: list[str], cwd: Path) -> Result:
    proc = subprocess.run([sys.executable, "-m", "ucdseg.cli", *argv], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)
    return Result(proc.returncode, proc.stdout, proc.stderr)


class ForkServer:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], env=_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.proc.stdout.readline() != "ready\n":
            raise RuntimeError(f"the fork server did not start: {self.proc.communicate()[1]}")

    def run(self, argv: list[str], cwd: Path) -> Result:
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        case = {"argv": argv, "cwd": str(cwd), "env": _env(), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return Result(json.loads(line), out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Callable[[list[str], Path], Result]:
    if FRESH:
        yield run_fresh
        return
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    try:
        yield server.run
    finally:
        server.close()


# ------------------------------------------------------------------------------- folder snapshots
def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (content hash and mode) and folder under ``roots``."""
    state = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            if path.is_symlink():
                state[str(path)] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[str(path)] = "dir"
            else:
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() + f":{path.stat().st_mode:o}"
    return state


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What existed before and is gone or different now (new files are allowed)."""
    return sorted(p for p, v in before.items() if after.get(p) != v)


# ------------------------------------------------------------------------------ the test datasets
NAMES = ["background", "square", "bar", "dot", "frame"]
SIZE = 32


def _pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for cls in rng.choice([1, 2, 3, 4], size=2, replace=False):
        y, x = rng.integers(0, SIZE - 10, size=2)
        mask[y: y + 10, x: x + 10] = cls
    image = (np.stack([mask * 50] * 3, axis=-1) + rng.integers(0, 20, (SIZE, SIZE, 3))).astype(np.uint8)
    return image, mask


def make_folder_dataset(root: Path, n: int = 8) -> Path:
    """A folder dataset (docs/own_dataset.md): 5 classes, n JPEG images of 32 x 32, masks of ids."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        image, mask = _pair(rng)
        Image.fromarray(image).save(root / "images" / f"img{k}.jpg", quality=95)
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{k}.png")
    (root / "classes.yaml").write_text(f"classes: {json.dumps(NAMES)}\n")
    (root / "train.txt").write_text("".join(f"img{k}\n" for k in range(n - 3)))
    (root / "val.txt").write_text("".join(f"img{k}\n" for k in range(n - 3, n)))
    return root


def _save_pair(image_path: Path, mask_path: Path, mask: np.ndarray) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([mask] * 3, axis=-1)).save(image_path)
    Image.fromarray(mask, mode="L").save(mask_path)


def make_voc(root: Path, bad_id: int) -> Path:
    """A VOC layout of 3 train and 1 val image; train mask ``b`` holds ``bad_id``."""
    for name, split in (("a", "train"), ("b", "train"), ("c", "train"), ("d", "val")):
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[4:10, 4:10] = 15 if name != "b" else bad_id
        folder = "SegmentationClassAug" if split == "train" else "SegmentationClass"
        _save_pair(root / "JPEGImages" / f"{name}.jpg", root / folder / f"{name}.png", mask)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train_aug.txt").write_text("a\nb\nc\n")
    (lists / "val.txt").write_text("d\n")
    return root


def make_ade(root: Path, bad_id: int) -> Path:
    for split, names in (("training", ["ADE_train_1", "ADE_train_2"]), ("validation", ["ADE_val_1"])):
        for name in names:
            mask = np.zeros((16, 16), dtype=np.uint8)
            mask[4:10, 4:10] = bad_id if name == "ADE_train_2" else 120
            _save_pair(root / "images" / split / f"{name}.jpg", root / "annotations" / split / f"{name}.png", mask)
    return root


def make_cityscapes(root: Path, bad_id: int) -> Path:
    for split, stem in (("train", "aachen_000000_000019"), ("train", "aachen_000001_000019"),
                        ("val", "lindau_000000_000019")):
        mask = np.full((16, 16), 7, dtype=np.uint8)  # road
        mask[4:10, 4:10] = bad_id if stem == "aachen_000001_000019" else 26  # car
        _save_pair(root / "leftImg8bit" / split / stem.split("_")[0] / f"{stem}_leftImg8bit.png",
                   root / "gtFine" / split / stem.split("_")[0] / f"{stem}_gtFine_labelIds.png", mask)
    return root


TINY_RUN = """\
data: {dataset: folder, crop_size: 32, workers: 0}
task: {name: 2-2}
model: {backbone: resnet18, output_stride: 16, pretrained: null}
train: {batch_size: 2, iterations: 1, iterations_next: 1, log_every: 1}
method: {name: ft}
eval: {batch_size: 4, num_images: 0}
device: cpu
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """What every case may touch and must leave as it was: a config, a dataset, an earlier run."""
    base = tmp_path_factory.mktemp("world")
    (base / "tiny.yaml").write_text(TINY_RUN)
    make_folder_dataset(base / "shapes")
    earlier = base / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("my notes\n")
    (base / "runs" / "keep.txt").write_text("keep\n")
    return base


# ----------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    setup: Callable[[Path, Path], list[str]]  # (world, case folder) -> argv
    expect: tuple[str, ...]  # substrings of the error line


def run_args(world: Path, case_dir: Path, *overrides: str, config: Path | None = None) -> list[str]:
    return ["--quiet", "run", str(config or world / "tiny.yaml"), f"data.root={world / 'shapes'}",
            f"output_dir={case_dir / 'runs'}", *overrides]


# config keys: (override, what the message shows); each one of the range checks of ucdseg.config
CONFIG_CASES = [
    ("seed=-1", "'seed' is -1; expected an integer in [0, 4294967296)"),
    ("seed=99999999999999999999", "'seed' is 99999999999999999999; expected an integer in [0, 4294967296)"),
    ("task.order_seed=-3", "'task.order_seed' is -3; expected an integer >= 0"),
    ("train.iterations=0", "'train.iterations' is 0; expected an integer >= 1"),
    ("train.iterations=-5", "'train.iterations' is -5; expected an integer >= 1"),
    ("train.iterations_next=0", "'train.iterations_next' is 0; expected an integer >= 1"),
    ("train.epochs=0", "'train.epochs' is 0.0; expected a finite number > 0"),
    ("train.epochs=-1", "'train.epochs' is -1.0; expected a finite number > 0"),
    ("train.epochs=inf", "'train.epochs' is inf; expected a finite number > 0"),
    ("train.epochs_next=0", "'train.epochs_next' is 0.0; expected a finite number > 0"),
    ("train.log_every=0", "'train.log_every' is 0; expected an integer >= 1"),
    ("train.checkpoint_every=-1", "'train.checkpoint_every' is -1; expected an integer >= 0"),
    ("train.lr=nan", "'train.lr' is nan; expected a finite number > 0"),
    ("train.lr=0", "'train.lr' is 0.0; expected a finite number > 0"),
    ("train.lr=-0.01", "'train.lr' is -0.01; expected a finite number > 0"),
    ("train.lr=inf", "'train.lr' is inf; expected a finite number > 0"),
    ("train.lr_next=nan", "'train.lr_next' is nan; expected a finite number > 0"),
    ("train.lr_next=0", "'train.lr_next' is 0.0; expected a finite number > 0"),
    ("train.momentum=1.0", "'train.momentum' is 1.0; expected a finite number in [0, 1)"),
    ("train.momentum=-0.1", "'train.momentum' is -0.1; expected a finite number in [0, 1)"),
    ("train.momentum=nan", "'train.momentum' is nan; expected a finite number in [0, 1)"),
    ("train.weight_decay=-0.0001", "'train.weight_decay' is -0.0001; expected a finite number >= 0"),
    ("train.weight_decay=inf", "'train.weight_decay' is inf; expected a finite number >= 0"),
    ("train.poly_power=-0.9", "'train.poly_power' is -0.9; expected a finite number >= 0"),
    ("data.scale_min=0", "'data.scale_min' is 0.0; expected a finite number > 0"),
    ("data.scale_max=-2", "'data.scale_max' is -2.0; expected a finite number > 0"),
    ("data.scale_min=3", "config keys 'data.scale_min' and 'data.scale_max' are 3.0 and 2.0; expected scale_min <= scale_max"),
    ("data.workers=-1", "'data.workers' is -1; expected an integer >= 0"),
    ("data.memory.size=-2", "'data.memory.size' is -2; expected an integer >= 0"),
    ("data.crop_size=0", "'data.crop_size' is 0; expected an integer >= 1"),
    ("data.eval_crop_size=-64", "'data.eval_crop_size' is -64; expected an integer >= 1"),
    ("data.embedded_train=0", "'data.embedded_train' is 0; expected an integer >= 1"),
    ("data.embedded_val=-1", "'data.embedded_val' is -1; expected an integer >= 1"),
    ("data.embedded_size=0", "'data.embedded_size' is 0; expected an integer >= 1"),
    ("eval.num_images=-1", "'eval.num_images' is -1; expected an integer >= 0"),
    ("eval.batch_size=0", "'eval.batch_size' is 0; expected an integer >= 1"),
    ("train.batch_size=0", "'train.batch_size' is 0; expected an integer >= 1"),
    ("train.accumulate=0", "'train.accumulate' is 0; expected an integer >= 1"),
    ("method.weights.ucd=-1", "'method.weights.ucd' is -1.0; expected a finite number >= 0"),
    ("method.weights.unkd=nan", "'method.weights.unkd' is nan; expected a finite number >= 0"),
]

# YAML files: (file text, what the message shows besides the file name)
YAML_CASES = [
    ("yaml-list", "- train\n- lr\n", "holds a list at its top level; expected a mapping"),
    ("yaml-scalar", "0.01\n", "holds the single value '0.01' at its top level; expected a mapping"),
    ("yaml-string", "train\n", "holds the single value 'train' at its top level; expected a mapping"),
    ("yaml-unclosed", "train:\n  lr: 0.1\nmodel: [resnet18\n", "line 4 column 1: expected ',' or ']'"),
    ("yaml-indent", "train:\n  lr: 0.1\n lr_next: 0.01\n", "line 3 column 2: expected <block end>"),
    ("yaml-mapping-value", "train: lr: 0.1\n", "line 1 column 10: mapping values are not allowed here"),
    ("yaml-duplicate", "train: {lr: 0.1}\ntrain: {lr: 0.2}\n", "line 2 column 1: found duplicate key train"),
    ("yaml-tab", "train:\n\tlr: 0.1\n", "line 2 column 1: found character '\\t' that cannot start any token"),
    ("yaml-base-not-a-name", "_base_: 5\ntrain: {lr: 0.1}\n", "_base_ is 5; expected a file name or a list"),
    ("yaml-base-missing", "_base_: [nowhere.yaml]\n", "nowhere.yaml does not exist", False),
    ("yaml-bad-value-in-file", "train:\n  momentum: 1.5\n", "config key 'train.momentum' is 1.5", False),
]


def _config_case(override: str, shown: str) -> Case:
    expected = shown if shown.startswith("config keys") else f"config key {shown}"
    return Case(f"key-{override}", lambda w, d: run_args(w, d, override), (expected,))


def _yaml_case(case_id: str, text: str, shown: str, names_file: bool = True) -> Case:
    def setup(world: Path, case_dir: Path) -> list[str]:
        path = case_dir / "config.yaml"
        path.write_text(text)
        return run_args(world, case_dir, config=path)

    return Case(case_id, setup, ("config.yaml", shown) if names_file else (shown,))


def _not_utf8(world: Path, case_dir: Path) -> list[str]:
    path = case_dir / "config.yaml"
    path.write_bytes(b"train:\n  lr: \xff\xfe\n")
    return run_args(world, case_dir, config=path)


# ---- ucdseg report
def results_of(method: str, seed: int, iterations: int = 3, old: float = 0.5) -> dict:
    """A finished 2-step results.json, with the config `ucdseg run` records."""
    from ucdseg.config import load_config, to_dict

    config = to_dict(load_config(None, [f"method.name={method}", f"seed={seed}", "task.name=8-2",
                                        f"train.iterations={iterations}", f"name={method}-{seed}"]))
    miou = {conv: {"old": old, "new": 0.1, "all": (old + 0.1) / 2} for conv in ("without_background", "with_background")}
    return {"format": 1, "method": method, "seed": seed, "config": config, "weights": {},
            "task": {"dataset": "embedded", "name": "8-2", "setting": "overlapped", "steps": [[0, 1, 2], [3]]},
            "class_names": [], "steps": [{"step": s, "classes": [s], "miou": miou} for s in range(2)]}


def write_run(folder: Path, results: dict | str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    if isinstance(results, bytes):
        path.write_bytes(results)
    else:
        path.write_text(results if isinstance(results, str) else json.dumps(results))
    return folder


def _report(case_dir: Path, *dirs: Path | str, out: Path | None = None) -> list[str]:
    return ["report", *map(str, dirs), "--output-dir", str(out or case_dir / "report")]


def _same_folder_twice(world: Path, case_dir: Path) -> list[str]:
    run = write_run(case_dir / "runs" / "mib-0", results_of("mib", 0))
    return _report(case_dir, run, run)


def _same_folder_other_spelling(world: Path, case_dir: Path) -> list[str]:
    run = write_run(case_dir / "runs" / "mib-0", results_of("mib", 0))
    (case_dir / "alias").symlink_to(case_dir / "runs")
    return _report(case_dir, run, case_dir / "alias" / "mib-0")


def _copied_run(world: Path, case_dir: Path) -> list[str]:
    first = write_run(case_dir / "runs" / "mib-0", results_of("mib", 0))
    copy = write_run(case_dir / "backup" / "mib-0", results_of("mib", 0, old=0.4))  # re-run elsewhere
    return _report(case_dir, first, copy)


def _output_dir_is_a_file(world: Path, case_dir: Path) -> list[str]:
    run = write_run(case_dir / "runs" / "mib-0", results_of("mib", 0))
    (case_dir / "report.md").write_text("not a folder\n")
    return _report(case_dir, run, out=case_dir / "report.md")


def _output_parent_is_a_file(world: Path, case_dir: Path) -> list[str]:
    run = write_run(case_dir / "runs" / "mib-0", results_of("mib", 0))
    (case_dir / "reports").write_text("not a folder\n")
    return _report(case_dir, run, out=case_dir / "reports" / "today")


def _bad_results(text: str | bytes) -> Callable[[Path, Path], list[str]]:
    def setup(world: Path, case_dir: Path) -> list[str]:
        good = write_run(case_dir / "runs" / "mib-0", results_of("mib", 0))
        bad = write_run(case_dir / "runs" / "mib-1", text)
        return _report(case_dir, good, bad)

    return setup


_FULL = json.dumps(results_of("mib", 1))


# ---- dataset files
def _folder_copy(world: Path, case_dir: Path) -> Path:
    return Path(shutil.copytree(world / "shapes", case_dir / "shapes"))


def _folder_case(change: Callable[[Path], None], *overrides: str) -> Callable[[Path, Path], list[str]]:
    def setup(world: Path, case_dir: Path) -> list[str]:
        root = _folder_copy(world, case_dir)
        change(root)
        return run_args(world, case_dir, f"data.root={root}", *overrides)

    return setup


def _truncate_train_images(root: Path) -> None:
    for k in range(5):  # every train image: whichever the first batch draws is broken
        path = root / "images" / f"img{k}.jpg"
        path.write_bytes(path.read_bytes()[:300])


def _text_as_train_images(root: Path) -> None:
    for k in range(5):
        (root / "images" / f"img{k}.jpg").write_text("this is not a picture\n")


def _empty_train_images(root: Path) -> None:
    for k in range(5):
        (root / "images" / f"img{k}.jpg").write_bytes(b"")


def _truncated_mask(root: Path) -> None:
    path = root / "masks" / "img2.png"
    path.write_bytes(path.read_bytes()[:60])


def _text_mask(root: Path) -> None:
    (root / "masks" / "img2.png").write_text("not a png\n")


def _small_train_masks(root: Path) -> None:
    for k in range(5):
        path = root / "masks" / f"img{k}.png"
        with Image.open(path) as im:
            im.resize((24, 20), Image.NEAREST).save(path)


def _mask_ids(root: Path) -> None:
    path = root / "masks" / "img2.png"
    mask = np.array(Image.open(path))
    mask[0, :4] = [7, 9, 200, 254]
    Image.fromarray(mask, mode="L").save(path)


def _layout_case(make: Callable[[Path, int], Path], dataset: str, task: str, bad_id: int):
    def setup(world: Path, case_dir: Path) -> list[str]:
        root = make(case_dir / dataset, bad_id)
        return run_args(world, case_dir, f"data.dataset={dataset}", f"data.root={root}", f"task.name={task}")

    return setup


# ------------------------------------------------------------- run folders, checkpoints, paths
def _file_at(path: Path, text: str = "a file, not a folder\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _output_dir_file(world: Path, case_dir: Path) -> list[str]:
    return run_args(world, case_dir, f"output_dir={_file_at(case_dir / 'out')}")


def _run_folder_file(world: Path, case_dir: Path) -> list[str]:
    _file_at(case_dir / "runs" / "clash")
    return run_args(world, case_dir, "name=clash")


def _checkpoints_file(world: Path, case_dir: Path) -> list[str]:
    _file_at(case_dir / "runs" / "ck" / "checkpoints")
    return run_args(world, case_dir, "name=ck")


def _cache_dir_file(world: Path, case_dir: Path) -> list[str]:
    return run_args(world, case_dir, f"data.cache_dir={_file_at(case_dir / 'cache')}")


def _locked_folder(world: Path, case_dir: Path) -> list[str]:
    """A run folder another process holds (a job-array slip): that process keeps the lock ~60 s."""
    lock = case_dir / "runs" / "busy" / ".ucdseg.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(lock)!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("process %d on the-other-node since 2026-12-01 08:00:00\\n" % os.getpid()); f.flush()
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return run_args(world, case_dir, "name=busy")


def _corrupt_saved_config(world: Path, case_dir: Path) -> list[str]:
    folder = case_dir / "runs" / "half"
    _file_at(folder / "config.yaml", "train: {lr: [0.01\n")
    _file_at(folder / "checkpoints" / "step0-last.pt", "x")  # something was trained here
    return run_args(world, case_dir, "name=half")


def _checkpoint_file(case_dir: Path, content: bytes) -> Path:
    path = case_dir / "step0.pt"
    path.write_bytes(content)
    return path


def _step0_from(target: Callable[[Path], Path]) -> Callable[[Path, Path], list[str]]:
    return lambda world, case_dir: run_args(world, case_dir, f"train.step0_from={target(case_dir)}")


def _pickle_without_model(case_dir: Path) -> Path:
    import torch

    torch.save({"state_dict": {}}, case_dir / "other.pt")
    return case_dir / "other.pt"


RUN_CASES = [
    Case("run-output-dir-is-a-file", _output_dir_file, ("out", "a file")),
    Case("run-folder-is-a-file", _run_folder_file, ("runs/clash", "a file")),
    Case("run-checkpoints-is-a-file", _checkpoints_file, ("runs/ck/checkpoints", "a file")),
    Case("run-cache-dir-is-a-file", _cache_dir_file, ("cache",)),
    Case("run-folder-in-use", _locked_folder, ("runs/busy is in use by process", "on the-other-node", "name=")),
    Case("run-saved-config-corrupt", _corrupt_saved_config, ("runs/half/config.yaml is corrupt",)),
    Case("run-data-root-missing", lambda w, d: run_args(w, d, f"data.root={d / 'shapez'}"), ("shapez",)),
    Case("run-embedded-root-typo", lambda w, d: run_args(w, d, "data.dataset=embedded", "task.name=4-3-3",
                                                          f"data.root={d / 'embeded'}"),
         ("data.root=", "embeded does not exist", "prepare-embedded --root")),
    Case("run-step0-from-missing", _step0_from(lambda d: d / "nothing"), ("train.step0_from=", "nothing")),
    Case("run-step0-from-garbage", _step0_from(lambda d: _checkpoint_file(d, b"PK\x03\x04 not a zip")),
         ("step0.pt could not be read as a ucdseg checkpoint",)),
    Case("run-step0-from-foreign-pickle", _step0_from(_pickle_without_model), ("other.pt has no 'model' entry",)),
    Case("run-method-key-outside-options", lambda w, d: run_args(w, d, "method.ucd_temperature=0.1"),
         ("invalid config key 'method.ucd_temperature'",)),
    Case("run-unknown-method", lambda w, d: run_args(w, d, "method.name=mib-ucd"), ("unknown method 'mib-ucd'",)),
    Case("run-weight-of-no-term", lambda w, d: run_args(w, d, "method.name=mib", "method.weights.ucd=1"),
         ("method 'mib' has no loss term 'ucd'",)),
    Case("run-bad-output-stride", lambda w, d: run_args(w, d, "model.output_stride=4"),
         ("'model.output_stride' is 4", "resnet18 takes 8 or 16")),
    Case("run-batch-not-divisible", lambda w, d: run_args(w, d, "train.batch_size=3", "train.accumulate=2"),
         ("train.batch_size=3", "train.accumulate=2")),
    Case("run-unknown-dataset", lambda w, d: run_args(w, d, "data.dataset=coco"), ("unknown dataset 'coco'",)),
    Case("run-bad-task", lambda w, d: run_args(w, d, "task.name=9-9"), ("9-9",)),
    Case("run-missing-import", lambda w, d: run_args(w, d, "imports=[no_such_module_xyz]"), ("no_such_module_xyz",)),
    Case("eval-a-folder", lambda w, d: ["eval", str(w / "runs" / "earlier")], ("runs/earlier is a folder",)),
    Case("eval-missing-checkpoint", lambda w, d: ["eval", str(d / "step9.pt")], ("step9.pt does not exist",)),
    Case("eval-truncated-checkpoint", lambda w, d: ["eval", str(_checkpoint_file(d, b"PK\x03\x04"))],
         ("step0.pt could not be read as a ucdseg checkpoint",)),
    Case("predict-truncated-checkpoint", lambda w, d: ["predict", str(_checkpoint_file(d, b"\x80\x02")),
                                                       str(w / "shapes" / "images"), "--output", str(d / "p")],
         ("step0.pt could not be read",)),
    Case("prepare-embedded-root-is-a-file", lambda w, d: ["prepare-embedded", "--root", str(_file_at(d / "bench"))],
         ("bench", "not a folder")),
    Case("tasks-unknown-dataset", lambda w, d: ["tasks", "coco"], ("unknown dataset 'coco'",)),
    Case("index-unknown-dataset", lambda w, d: ["index", "--dataset", "coco", "--task", "1-1"],
         ("config key 'data.dataset': unknown dataset 'coco': expected one of", "expected one of", "voc")),
    Case("demo-unknown-method", lambda w, d: ["demo", "--methods", "ft,mibb", "--output-dir", str(d / "demo")],
         ("unknown method 'mibb'",)),
]


CASES = [
    *RUN_CASES,
    *[_config_case(o, s) for o, s in CONFIG_CASES],
    # a method's own options are checked by the method (Method.resolve_options)
    *[Case(f"option-{o}", lambda w, d, o=o: run_args(w, d, "method.name=mib+ucd", o), (shown,)) for o, shown in [
        ("method.options.temperature=0", "config key 'method.options.temperature' is 0"),
        ("method.options.temperature=nan", "config key 'method.options.temperature' is nan; expected a finite number > 0"),
        ("method.options.temprature=0.1", "'method.options.temprature': method 'mib+ucd' has no such option")]],
    *[_yaml_case(*c) for c in YAML_CASES],
    Case("yaml-not-utf8", _not_utf8, ("config.yaml", "is not UTF-8 text")),
    Case("config-is-a-folder", lambda w, d: run_args(w, d, config=w / "shapes"), ("shapes is a folder; expected a YAML",)),
    Case("report-same-folder", _same_folder_twice, ("mib-0 is given twice",)),
    Case("report-same-folder-symlink", _same_folder_other_spelling, ("is given twice", "alias/mib-0")),
    Case("report-same-run-copied", _copied_run, ("runs/mib-0 and", "backup/mib-0 are the same run", "seed 0")),
    Case("report-output-is-file", _output_dir_is_a_file, ("report folder", "report.md is a file, not a folder")),
    Case("report-output-parent-is-file", _output_parent_is_a_file, ("reports/today cannot be made:", "reports is a file, not a folder")),
    Case("results-truncated", _bad_results(_FULL[: len(_FULL) // 2]),
         ("mib-1/results.json is truncated or corrupt", "line 1 column")),
    Case("results-empty-file", _bad_results(""), ("mib-1/results.json is truncated or corrupt",)),
    Case("results-a-list", _bad_results("[1, 2]"), ("mib-1/results.json", "top level is a list")),
    Case("results-no-method", _bad_results(json.dumps({k: v for k, v in results_of("mib", 1).items()
                                                         if k != "method"})), ("mib-1/results.json", "'method'")),
    Case("results-bad-json", _bad_results('{"steps": [}'), ("mib-1/results.json is truncated or corrupt",)),
    Case("results-not-utf8", _bad_results(b'{"method": "\xff"}'), ("mib-1/results.json is not UTF-8 text",)),
    Case("image-truncated-jpeg", _folder_case(_truncate_train_images), ("shapes/images/img", ".jpg cannot be read")),
    Case("image-truncated-jpeg-in-a-worker", _folder_case(_truncate_train_images, "data.workers=1"),
         ("shapes/images/img", ".jpg cannot be read")),
    Case("image-not-an-image", _folder_case(_text_as_train_images),
         ("shapes/images/img", ".jpg cannot be read (not an image file")),
    Case("image-empty-file", _folder_case(_empty_train_images), ("shapes/images/img", ".jpg cannot be read")),
    Case("mask-truncated-png", _folder_case(_truncated_mask), ("shapes/masks/img2.png cannot be read",)),
    Case("mask-not-an-image", _folder_case(_text_mask), ("shapes/masks/img2.png cannot be read (not an image file",)),
    Case("mask-size-mismatch", _folder_case(_small_train_masks),
         ("shapes/masks/img", ".png is 24x20 but its image", "shapes/images/img", ".jpg is 32x32")),
    Case("mask-size-mismatch-in-a-worker", _folder_case(_small_train_masks, "data.workers=1"),
         ("shapes/masks/img", ".png is 24x20 but its image", "shapes/images/img", ".jpg is 32x32")),
    Case("mask-ids-folder", _folder_case(_mask_ids),
         ("shapes/masks/img2.png holds class id(s) 7, 9, 200, 254", "ids 0..4, 255 void")),
    Case("mask-ids-voc", _layout_case(make_voc, "voc", "15-5", 21),
         ("voc/SegmentationClassAug/b.png holds id(s) 21 outside the 21 ids of voc; expected 0..20 (255 void)",)),
    Case("mask-ids-ade", _layout_case(make_ade, "ade", "100-50", 200),
         ("annotations/training/ADE_train_2.png holds id(s) 200 outside the 151 ids of ade; expected 0..150",)),
    Case("mask-ids-cityscapes", _layout_case(make_cityscapes, "cityscapes", "13-6", 40),
         ("aachen_000001_000019_gtFine_labelIds.png holds id(s) 40 outside the 34 ids of cityscapes; expected 0..33",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(case, world, cli, tmp_path):
    argv = case.setup(world, tmp_path)
    before = snapshot(world, tmp_path)
    result = cli(argv, tmp_path)
    after = snapshot(world, tmp_path)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, output
    assert len(lines) == 1 and lines[0].startswith("ucdseg: error: "), result.stderr
    for expected in case.expect:
        assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert changed(before, after) == []


def test_there_are_many_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id", ["key-train.lr=nan", "yaml-list", "report-same-run-copied", "mask-ids-voc"])
def test_fork_server_agrees_with_a_fresh_process(case_id, world, cli, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    results = []
    for runner, folder in ((cli, tmp_path / "a"), (run_fresh, tmp_path / "b")):
        folder.mkdir()
        results.append(runner(case.setup(world, folder), folder))
    forked, fresh = results
    assert (forked.returncode, fresh.returncode) == (2, 2)
    assert forked.stderr.replace(str(tmp_path / "a"), "X") == fresh.stderr.replace(str(tmp_path / "b"), "X")


def test_a_good_report_still_works_and_pools_seeds_only(world, cli, tmp_path):
    """The counterpart of the report cases: distinct seeds pool into one row, another iteration
    count is its own row labelled by it, and the report is written."""
    runs = [write_run(tmp_path / f"mib-{s}", results_of("mib", s, old=0.1 * (s + 1))) for s in (0, 1)]
    runs.append(write_run(tmp_path / "mib-long", results_of("mib", 0, iterations=40)))
    result = cli(_report(tmp_path, *runs), tmp_path)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| embedded 8-2 overlapped | mib (train.iterations=3) | 0,1 | 2 | 15.0 ± 7.1 |" in table
    assert "| embedded 8-2 overlapped | mib (train.iterations=40) | 0 | 1 | 50.0 |" in table  # one seed: no spread


def test_every_range_check_names_a_key_of_the_config_and_has_a_case():
    """A key renamed or moved (e.g. into a method's options) must move in ``_RANGES`` too: a
    range whose key the config does not have would check nothing."""
    from ucdseg.config import _MISSING, _RANGES, RunConfig, _lookup

    assert [key for key in _RANGES if _lookup(RunConfig(), key) is _MISSING] == []
    covered = {override.split("=")[0] for override, _ in CONFIG_CASES}
    assert set(_RANGES) - covered == set()
