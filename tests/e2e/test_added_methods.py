"""The eight methods added by issues 21 and 22 (ewc, pi, rw, mib+sdr, ssul, ssul-m, dkd, dkd-m) end to
end, as their "What it must show" sections ask:

1. a tiny 3-step run of each (embedded ``8-1-1``, ``model.backbone=tiny``), killed with a real SIGKILL
   after a mid-step checkpoint of step 2, then the same command again: every step's weights, the
   method state carried in its checkpoint (EWC/PI/RW tables, SDR prototypes and counts) and the
   memory files (``memory/step1.json``, ``memory/step2.json``) are bit-identical to an uninterrupted
   run's;
2. ``ucdseg predict`` with an SSUL and a DKD checkpoint writes the masks of the method's inference rule,
   applied here by hand to logits computed here, and ``ucdseg eval`` scores that rule;
3. bad input is one line on stderr with exit code 2, and the run folder keeps what it had;
4. the embedded benchmark's saliency maps (the objects' silhouettes grown by one pixel), rewritten
   when their recipe's VERSION changes, never touching a scene file;
5. exemplar memory: the files, their checksums in the step records, SSUL's half-batch replacement
   and DKD's concatenation.

The tiny model trains an iteration in ~10 ms, faster than a test can notice a checkpoint and kill:
the killed runs (only they) sleep 0.3 s in each step-2 loss, so the kill lands inside step 2. They are
forked from one process that imported torch once (:func:`fork_server`): a fresh interpreter per run
would spend most of this file's time importing torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ucdseg
from conftest import BENCH, TINY, base_overrides
from ucdseg import cli
from ucdseg.config import load_config
from ucdseg.data import open_dataset_split
from ucdseg.embedded.reader import EmbeddedSegmentation
from ucdseg.embedded.saliency import SALIENCY_VERSION, saliency_from_mask
from ucdseg.engine.sampling import StepBatchSampler
from ucdseg.methods import StepSetup, get_method
from ucdseg.methods.regularized import regularizer_state
from ucdseg.methods.sdr import prototypes
from ucdseg.models import build_model

TESTS_DIR = Path(__file__).resolve().parents[1]
METHODS = ("ewc", "pi", "rw", "mib+sdr", "ssul", "ssul-m", "dkd", "dkd-m")
WITH_STATE = {"ewc", "pi", "rw", "mib+sdr"}  # methods whose step checkpoints carry a method_state
MEMORY_SIZE = 6  # the tiny benchmark's step 0 has 55 images
VOLATILE = {"train_seconds", "checkpoint_sha256"}  # record keys that differ between two equal runs


# ------------------------------------------------------------------------------ helpers
def run_args(root: Path, out: Path, method: str, name: str, *extra: str) -> list[str]:
    """``ucdseg run`` of ``method`` on embedded 8-1-1: step 0 = 2 iterations, steps 1 and 2 = 6 with a
    checkpoint every 2."""
    config = out / "base.yaml"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("seed: 0\n")
    memory = [f"data.memory.size={MEMORY_SIZE}"] if method.endswith("-m") else []
    options = ["method.options.iterations=3"] if method == "rw" else []  # RW scores every 3 calls: across the kill
    return ["--quiet", "run", str(config), *base_overrides(root, out), f"name={name}", f"method.name={method}",
            "task.name=8-1-1", "train.iterations_next=6", "train.checkpoint_every=2", "eval.num_images=0",
            *memory, *options, *extra]


def ucdseg_cli(*args) -> tuple[int, str, str]:
    """``ucdseg ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line_error(result: tuple[int, str, str], *parts: str) -> str:
    code, _, err = result
    assert code == 2, err
    assert err.startswith("ucdseg: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)
    return err


def same(a, b) -> bool:
    """Deep bit-for-bit equality of checkpoint contents (tensors: dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bytes(a), _bytes(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def checkpoint(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step{step}.pt", map_location="cpu", weights_only=True)


def records(run_dir: Path) -> list[dict]:
    steps = json.loads((run_dir / "results.json").read_text())["steps"]
    return [{k: v for k, v in s.items() if k not in VOLATILE} for s in steps]


def file_digests(folder: Path, copied: bool = False) -> dict[str, str]:
    """sha256 of every file of a run folder but its lock, TensorBoard logs and log.txt (a new run appends
    to both logs: its banner and its error line);
    ``copied``: and but its ``config.yaml``, which a copied folder's first run rewrites with its name."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".ucdseg.lock", "log.txt") and "tensorboard" not in p.relative_to(folder).parts
            and not (copied and p.name == "config.yaml")}


def stray_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("*") if p.name != ".ucdseg.lock" and (
        p.name.endswith(".tmp") or p.name.startswith(".") or p.name.endswith("-last.pt")))


def pending_from(run_dir: Path, step: int) -> None:
    """Turn a finished run into one whose steps ``step..`` are still to train (as after step ``step - 1``):
    their checkpoints, records and memory files removed."""
    results = json.loads((run_dir / "results.json").read_text())
    results["steps"] = [s for s in results["steps"] if s["step"] < step]
    (run_dir / "results.json").write_text(json.dumps(results))
    for later in range(step, 3):
        (run_dir / "checkpoints" / f"step{later}.pt").unlink(missing_ok=True)
        (run_dir / "memory" / f"step{later}.json").unlink(missing_ok=True)


def train_ids(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()


def val_ids(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def mask_classes(root: Path, image_id: str) -> set[int]:
    return set(np.unique(read_png(root / "SegmentationClassAug" / f"{image_id}.png")).tolist())


def naive_saliency(mask: np.ndarray) -> np.ndarray:
    """255 where the 3 x 3 neighbourhood of a pixel holds an object pixel (any id but 0), by a loop."""
    h, w = mask.shape
    out = np.zeros((h, w), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            if (mask[max(0, y - 1): y + 2, max(0, x - 1): x + 2] != 0).any():
                out[y, x] = 255
    return out


@pytest.fixture(scope="module")
def reference(tiny_benchmark, tmp_path_factory, tiny_engine):
    """``reference(method)`` -> the run folder of an uninterrupted run of ``method`` (in this process)."""
    out = tmp_path_factory.mktemp("added-methods")
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            with tiny_engine():
                code, _, err = ucdseg_cli(*run_args(tiny_benchmark, out, method, f"ref-{method}"))
            assert code == 0, err
            done[method] = out / "runs" / f"ref-{method}"
        return done[method]

    get.out = out
    return get


# ------------------------------------------------------------------------------ 1. SIGKILL
#: A process that imports the package once and forks one run per request (a line of JSON: the run's
#: arguments and a file for its stderr); it prints the run's pid, then how the run ended (its exit code,
#: or minus the signal that killed it). Every run sleeps PAUSE s in each step-2 loss.
SERVER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import conftest  # registers model.backbone=tiny
import torch.utils.tensorboard, ucdseg.engine, ucdseg.reporting  # what a run imports, once, before the forks
from ucdseg.cli import main
from ucdseg.methods import Method

losses = Method.losses

def slow(self, ctx, weights):
    if ctx.step == 2:
        time.sleep({pause})
    return losses(self, ctx, weights)

Method.losses = slow
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            code = main(request["args"])
        finally:
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""
PAUSE = 0.3


@pytest.fixture(scope="module")
def fork_server():
    """The :data:`SERVER` process: each run it forks is a real process, killed with a real SIGKILL, without
    paying torch's import again (seconds per process)."""
    src = str(Path(ucdseg.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(tests=str(TESTS_DIR), pause=PAUSE)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield server
    server.stdin.close()
    try:
        server.wait(timeout=60)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_in_step_2_then_rerun_is_bit_identical(method, reference, fork_server, tmp_path, tiny_benchmark,
                                                       one_thread):
    ref = reference(method)  # uninterrupted, in this process (while the server imports, the first time)
    args = run_args(tiny_benchmark, reference.out, method, f"killed-{method}")
    killed = reference.out / "runs" / f"killed-{method}"
    stderr = tmp_path / "stderr.txt"
    fork_server.stdin.write(json.dumps({"args": args, "stderr": str(stderr)}) + "\n")
    fork_server.stdin.flush()
    pid = int(fork_server.stdout.readline())
    partial = killed / "checkpoints" / "step2-last.pt"
    deadline = time.monotonic() + 240
    try:
        while not partial.exists():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:  # ended (and reaped by the server) before its mid-step checkpoint
                pytest.fail(f"the run ended before its mid-step checkpoint: {stderr.read_text()}")
            assert time.monotonic() < deadline, "no mid-step checkpoint of step 2 after 240 s"
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        status = int(fork_server.stdout.readline())
    assert status == -signal.SIGKILL, stderr.read_text()
    # it died inside step 2: steps 0 and 1 finished, step 2 has only its mid-step checkpoint
    assert not (killed / "checkpoints" / "step2.pt").exists()
    assert [s["step"] for s in json.loads((killed / "results.json").read_text())["steps"]] == [0, 1]
    mid = torch.load(partial, map_location="cpu", weights_only=True)
    assert mid["step"] == 2 and mid["iteration"] in (2, 4)
    assert ("method_state" in mid) == (method in WITH_STATE)
    result = ucdseg_cli(*args)  # the same command again, to completion
    assert result[0] == 0, result[2]

    assert records(killed) == records(ref)
    assert [r["iterations"] for r in records(killed)] == [2, 6, 6]
    for step in range(3):
        a, b = checkpoint(killed, step), checkpoint(ref, step)
        assert same(a["model"], b["model"]), f"step {step} weights differ"
        assert ("method_state" in a) == ("method_state" in b) == (method in WITH_STATE)
        if method in WITH_STATE:
            assert same(a["method_state"], b["method_state"]), f"step {step} method state differs"
            state = a["method_state"]
            assert tensors(state) and any(t.is_floating_point() and t.abs().sum() > 0 for t in tensors(state))
            if method == "mib+sdr":
                assert state["prototypes"].shape == (9 + step, 16) and state["counts"].shape == (9 + step,)
                assert (state["counts"][1:9] > 0).any()  # prototypes of step 0's classes were built
            else:
                assert state["regularizer"] == method
    memory = sorted(p.name for p in (killed / "memory").iterdir()) if (killed / "memory").exists() else []
    assert memory == (["step1.json", "step2.json"] if method.endswith("-m") else [])
    for name in memory:
        assert (killed / "memory" / name).read_bytes() == (ref / "memory" / name).read_bytes()
    assert stray_files(killed) == []
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step0.pt", "step1.pt", "step2.pt"]


# ------------------------------------------------------------------------------ 2. predict and eval
def hand_prediction(method: str, logits: np.ndarray) -> np.ndarray:
    """The method's inference rule on one image's (C, H, W) logits, written out here."""
    prob = torch.sigmoid(torch.from_numpy(logits)).numpy()
    if method == "ssul":  # channel 0 unknown, 1 background, k + 1 class k: p_bg += p_unknown, unknown dropped
        folded = np.concatenate([prob[1:2] + prob[0:1], prob[2:]])
        return folded.argmax(0)
    # dkd: channel 0 auxiliary, k class k (k >= 1); background where no class's sigmoid exceeds 0.5
    fg = prob[1:]
    return np.where((fg > 0.5).any(0), fg.argmax(0) + 1, 0)


def tiny_model_of(state: dict, method: str) -> torch.nn.Module:
    model = build_model(TINY, state["classes_per_step"], output_stride=16, spec=get_method(method).model)
    model.load_state_dict(state["model"])
    return model.eval()


def model_logits(model: torch.nn.Module, image: Path) -> np.ndarray:
    """(C, H, W) logits of one image, ImageNet-normalised here."""
    rgb = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255
    x = (rgb - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.array([0.229, 0.224, 0.225], dtype=np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(2, 0, 1)[None]).logits[0].numpy()


def output_biases(state: dict) -> list[tuple[str, int]]:
    """(bias key, row) of every logit channel, in channel order: the last conv of each classifier module
    (SSUL's ``classifier.i.3``, DKD's ``classifier.i``)."""
    keys = [k for k in state if re.fullmatch(r"classifier\.\d+\.(3\.)?bias", k)]
    return [(k, r) for k in sorted(keys, key=lambda k: int(k.split(".")[1])) for r in range(len(state[k]))]


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def spread(state: dict, method: str, images: list[Path]) -> dict:
    """``state`` with its output convolutions rescaled so that every case of the method's rule occurs on
    ``images`` (the trained tiny model's logits vary by ~0.005 over the pixels: it predicts one class
    nearly everywhere): each channel's logits get spread 1 over the pixels and a median chosen here.
    SSUL: unknown and background at p = 0.3 each, class 3 at the median of their sum (it wins where it
    beats background and unknown together), the other classes at p = 0.02. DKD: classes 3 and 5 at
    p = 0.5 (each above the threshold on about half the pixels), the auxiliary channel and the other
    classes at p = 0.02."""
    model = tiny_model_of(state, method)
    logits = np.stack([model_logits(model, p) for p in images]).transpose(1, 0, 2, 3).reshape(len(
        output_biases(state["model"])), -1)  # (C, pixels)
    median, std = np.median(logits, axis=1), logits.std(axis=1)
    target = np.full(len(median), logit(0.02))
    scale = 1 / np.maximum(std, 1e-6)
    if method == "ssul":
        target[0] = target[1] = logit(0.3)
        fold = sum(1 / (1 + np.exp(-(scale[c] * (logits[c] - median[c]) + target[c]))) for c in (0, 1))
        target[4] = logit(float(np.clip(np.median(fold), 0.01, 0.99)))
    else:
        target[3] = target[5] = 0.0
    moved = {**state, "model": dict(state["model"])}
    for channel, (key, row) in enumerate(output_biases(state["model"])):
        weight_key = key[: -len("bias")] + "weight"
        weight = moved["model"][weight_key] = moved["model"][weight_key].clone()
        bias = moved["model"][key] = moved["model"][key].clone()
        weight[row] *= float(scale[channel])  # z' = s (z - b) + b', median(z') = target
        bias[row] = float(target[channel] - scale[channel] * (median[channel] - bias[row].item()))
    return moved


@pytest.mark.parametrize("method", ["ssul", "dkd"])
def test_predict_and_eval_use_the_methods_inference_rule(method, reference, tiny_benchmark, tmp_path, tiny_model):
    ref = reference(method)
    assert json.loads((ref / "results.json").read_text())["task"]["order"] == list(range(1, 11))  # model id = id
    images = tmp_path / "images"
    images.mkdir()
    ids = val_ids(tiny_benchmark)
    for i in ids:
        shutil.copy(tiny_benchmark / "JPEGImages" / f"{i}.jpg", images)
    state = spread(torch.load(ref / "checkpoints" / "step2.pt", map_location="cpu", weights_only=True), method,
                    [images / f"{i}.jpg" for i in ids])
    ckpt = tmp_path / "step2.pt"
    torch.save(state, ckpt)
    out = tmp_path / "out"
    code, stdout, err = ucdseg_cli("--quiet", "predict", ckpt, images, "--output", out, "--batch-size", "1",
                                   "--device", "cpu", "--no-overlays")
    assert code == 0, err
    assert f"{len(ids)} image(s) segmented" in stdout

    model = tiny_model_of(state, method)
    confusion = np.zeros((11, 11), dtype=np.int64)
    differs = 0  # pixels where the rule is not the argmax of the class channels
    for i in ids:
        logits = model_logits(model, images / f"{i}.jpg")
        expected = hand_prediction(method, logits)
        mask = read_png(out / "masks" / f"{i}.png")
        assert mask.shape == (BENCH["image_size"],) * 2
        assert np.array_equal(mask, expected), i
        naive = logits[1:].argmax(0) + (method == "dkd")  # SSUL: background alone; DKD: no threshold
        differs += int((expected != naive).sum())
        truth = read_png(tiny_benchmark / "SegmentationClassAug" / f"{i}.png").astype(np.int64)
        keep = truth != 255
        np.add.at(confusion, (truth[keep], expected[keep]), 1)
    predicted = confusion.sum(0)
    pixels = predicted.sum()
    assert predicted[0] > 0.05 * pixels and predicted[3] > 0.05 * pixels  # background and class 3 both predicted
    assert differs > 0.05 * len(ids) * BENCH["image_size"] ** 2
    if method == "dkd":
        assert predicted[5] > 0.05 * pixels  # class 5 where it beats class 3 above 0.5

    # eval (one image per batch, as predicted above) scores the same rule: IoU = TP / (TP + FP + FN)
    code, stdout, err = ucdseg_cli("--quiet", "eval", ckpt, "eval.batch_size=1")
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("step 2: mIoU ")
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    want = [["-" if union[c] == 0 else f"{100 * tp[c] / union[c]:.1f}"] for c in range(11)]
    assert [line.split()[-1:] for line in lines[1:]] == want
    assert [" ".join(line.split()[:-1]) for line in lines[1:]] == list(EmbeddedSegmentation.meta.class_names)


# ------------------------------------------------------------------------------ 3. bad input
def test_ssul_without_saliency_maps_is_one_line_and_loses_nothing(tiny_benchmark, tmp_path, tiny_model):
    root = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, root)
    shutil.rmtree(root / "saliency_map", ignore_errors=True)
    args = run_args(root, tmp_path, "ssul", "sal")
    run_dir = tmp_path / "runs" / "sal"
    assert ucdseg_cli(*args)[0] == 0  # generates the maps, trains the three steps
    pending_from(run_dir, 2)
    before = file_digests(run_dir)
    for p in (root / "saliency_map").glob("*.png"):  # maps gone, their VERSION left
        p.unlink()

    err = one_line_error(ucdseg_cli(*args), "saliency map not found: ", "expected root/saliency_map/<id>.png")
    named = Path(err.split("saliency map not found: ")[1].split(";")[0])
    assert named.parent == root / "saliency_map" and named.stem in train_ids(root) and not named.exists()
    assert file_digests(run_dir) == before and stray_files(run_dir) == []

    # nothing lost: the maps made again (their VERSION removed), the same command trains step 2 only
    (root / "saliency_map" / "VERSION").unlink()
    assert ucdseg_cli(*args)[0] == 0
    kept = {k: v for k, v in before.items() if k.startswith("checkpoints/") or k == "config.yaml"}
    assert kept.keys() == {"checkpoints/step0.pt", "checkpoints/step1.pt", "config.yaml"}
    assert {k: v for k, v in file_digests(run_dir).items() if k in kept} == kept
    assert [s["step"] for s in json.loads((run_dir / "results.json").read_text())["steps"]] == [0, 1, 2]


def test_ssul_on_a_folder_dataset_without_saliency_is_one_line(tiny_benchmark, tmp_path, tiny_model):
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for split, ids in (("train", train_ids(tiny_benchmark)), ("val", val_ids(tiny_benchmark))):
        for i in ids:
            shutil.copy(tiny_benchmark / "JPEGImages" / f"{i}.jpg", folder / "images")
            shutil.copy(tiny_benchmark / "SegmentationClassAug" / f"{i}.png", folder / "masks")
        (folder / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (folder / "classes.yaml").write_text(yaml.safe_dump({"classes": list(EmbeddedSegmentation.meta.class_names)}))
    err = one_line_error(ucdseg_cli(*run_args(folder, tmp_path, "ssul", "folder", "data.dataset=folder")),
                         f"saliency map not found: {folder / 'saliency'}", "expected root/saliency/<image stem>.png")
    assert not Path(err.split("not found: ")[1].split(";")[0]).exists()
    assert list((tmp_path / "runs" / "folder" / "checkpoints").iterdir()) == []  # nothing trained, nothing lost
    # the unknown class from every background pixel needs no saliency
    assert ucdseg_cli(*run_args(folder, tmp_path, "ssul", "folder-bg", "data.dataset=folder",
                                "method.options.unknown=background"))[0] == 0


def test_memory_larger_than_step0_is_refused_before_training(tiny_benchmark, tmp_path, tiny_model):
    args = run_args(tiny_benchmark, tmp_path, "ssul-m", "big", "data.memory.size=1000")
    one_line_error(ucdseg_cli(*args), "data.memory.size=1000", "55", "expected at most 55")
    run_dir = tmp_path / "runs" / "big"
    assert list((run_dir / "checkpoints").iterdir()) == []  # refused before step 0 trained: nothing to lose
    # the same folder takes a size that fits (nothing was trained with the other one)
    assert ucdseg_cli(*args[:-1], f"data.memory.size={MEMORY_SIZE}")[0] == 0
    assert len(json.loads((run_dir / "memory" / "step1.json").read_text())["entries"]) == MEMORY_SIZE


def test_memory_file_of_other_data_is_refused_on_resume(reference, tiny_benchmark, tmp_path, tiny_model):
    run_dir = tmp_path / "runs" / "memory-other"
    shutil.copytree(reference("ssul-m"), run_dir)
    pending_from(run_dir, 2)  # step 2 chooses its memory from step 1's images and memory/step1.json
    path = run_dir / "memory" / "step1.json"
    original = path.read_bytes()
    saved = json.loads(original)
    saved["data"]["train_files"] = hashlib.sha256(b"another dataset").hexdigest()
    path.write_text(json.dumps(saved))
    before = file_digests(run_dir, copied=True)
    args = run_args(tiny_benchmark, tmp_path, "ssul-m", "memory-other")
    one_line_error(ucdseg_cli(*args), f"memory file {path} was chosen on other data", "point data.root")
    assert file_digests(run_dir, copied=True) == before and stray_files(run_dir) == []
    path.write_bytes(original)  # the run's own file back: it continues
    assert ucdseg_cli(*args)[0] == 0
    assert (run_dir / "memory" / "step2.json").read_bytes() == (reference("ssul-m") / "memory" /
                                                                 "step2.json").read_bytes()


def test_regularizer_state_missing_from_step0(reference, tiny_benchmark, tmp_path, tiny_model):
    # an ft run's step 0 cannot start an EWC run: it is refused by its step-0 computation
    ft = tmp_path / "runs" / "ft"
    assert ucdseg_cli(*run_args(tiny_benchmark, tmp_path, "ft", "ft"))[0] == 0
    before = file_digests(ft)
    one_line_error(ucdseg_cli(*run_args(tiny_benchmark, tmp_path, "ewc", "ewc-from-ft", f"train.step0_from={ft}")),
                   f"train.step0_from={ft}", "trained by ft", "cannot be shared")
    assert file_digests(ft) == before
    assert list((tmp_path / "runs" / "ewc-from-ft" / "checkpoints").iterdir()) == []

    # an EWC step 0 whose checkpoint lost its importance state: step 1 names the checkpoint
    run_dir = tmp_path / "runs" / "ewc-no-state"
    shutil.copytree(reference("ewc"), run_dir)
    pending_from(run_dir, 1)
    step0 = run_dir / "checkpoints" / "step0.pt"
    state = torch.load(step0, map_location="cpu", weights_only=True)
    del state["method_state"]
    torch.save(state, step0)
    results = json.loads((run_dir / "results.json").read_text())
    results["steps"][0]["checkpoint_sha256"] = hashlib.sha256(step0.read_bytes()).hexdigest()
    (run_dir / "results.json").write_text(json.dumps(results))
    before = file_digests(run_dir, copied=True)
    one_line_error(ucdseg_cli(*run_args(tiny_benchmark, tmp_path, "ewc", "ewc-no-state")),
                   f"{step0} holds no method state, not the ewc importance state step 1 needs",
                   "method.name=ewc")
    assert file_digests(run_dir, copied=True) == before and stray_files(run_dir) == []


def sdr_setup(previous, source="runs/x/checkpoints/step0.pt") -> StepSetup:
    model = build_model(TINY, [9, 1], output_stride=16, spec=get_method("mib+sdr").model)
    old = build_model(TINY, [9], output_stride=16, spec=get_method("mib+sdr").model)
    return StepSetup(step=1, model=model, old_model=old, num_old=9, num_new=1,
                     options=get_method("mib+sdr").resolve_options(), previous=previous, device=torch.device("cpu"),
                     source=source)


def test_sdr_prototypes_of_the_wrong_size_are_one_line():
    good = prototypes(sdr_setup({"prototypes": torch.ones(9, 16), "counts": torch.full((9,), 3)}))
    assert good.prototypes.shape == (10, 16) and good.counts.tolist() == [3] * 9 + [0]
    assert torch.equal(good.prototypes[:9], torch.ones(9, 16)) and not good.prototypes[9].any()
    for wrong, shapes in (({"prototypes": torch.ones(9, 15), "counts": torch.ones(9)}, "(9, 15) with counts (9,)"),
                          ({"prototypes": torch.ones(8, 16), "counts": torch.ones(8)}, "(8, 16) with counts (8,)"),
                          ({"prototypes": torch.ones(9, 16), "counts": torch.ones(10)}, "(9, 16) with counts (10,)")):
        with pytest.raises(ValueError) as info:
            prototypes(sdr_setup(wrong))
        message = str(info.value)
        assert "\n" not in message and message.startswith("runs/x/checkpoints/step0.pt: its SDR prototypes are")
        assert shapes in message and "expected (9, 16) and (9,)" in message
    with pytest.raises(ValueError, match=r"^runs/x/checkpoints/step0.pt holds no SDR prototypes .*mib\+sdr$"):
        prototypes(sdr_setup(None))
    # the regulariser's hook, likewise, on a previous step's state of another regulariser
    setup = sdr_setup({"regularizer": "pi", "tables": {}})
    with pytest.raises(ValueError, match=r"holds the state of 'pi', not the ewc importance state step 1 needs"):
        regularizer_state(dataclasses.replace(setup, options=get_method("ewc").resolve_options()), "ewc")


def test_release_compat_on_mib_is_refused_at_config_load(tiny_benchmark, tmp_path):
    result = ucdseg_cli(*run_args(tiny_benchmark, tmp_path, "mib", "mib-compat", "method.options.release_compat=true"))
    one_line_error(result, "'method.options.release_compat'", "'mib' has no such option")
    assert not (tmp_path / "runs").exists()
    # mib+sdr has the option
    assert get_method("mib+sdr").resolve_options({"release_compat": True})["release_compat"] is True


# ------------------------------------------------------------------------------ 4. saliency maps
def test_embedded_saliency_maps_are_the_grown_silhouettes(reference, tiny_benchmark):
    reference("ssul")  # a run prepared the benchmark
    folder = tiny_benchmark / "saliency_map"
    ids = train_ids(tiny_benchmark)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{i}.png" for i in ids] + ["VERSION"])
    assert (folder / "VERSION").read_text().strip() == str(SALIENCY_VERSION)
    grown = 0
    for i in ids:
        mask = read_png(tiny_benchmark / "SegmentationClassAug" / f"{i}.png")
        saliency = read_png(folder / f"{i}.png")
        assert saliency.dtype == np.uint8 and saliency.shape == mask.shape
        assert np.array_equal(saliency, naive_saliency(mask)), i
        assert np.array_equal(saliency, saliency_from_mask(mask)), i
        grown += int((saliency > 0).sum() - (mask != 0).sum())
    assert grown > 0  # imperfect as a detector's: they bleed over the objects' borders


def test_saliency_recipe_version_change_rewrites_the_maps_and_no_scene(reference, tiny_benchmark, tmp_path):
    reference("ssul")
    root = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, root)
    scenes = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
              if p.is_file() and p.parts[len(root.parts)] != "saliency_map"}
    assert any(k.endswith(".jpg") for k in scenes) and any(k.endswith(".png") for k in scenes)
    ids = train_ids(root)
    cfg_data = load_config(None, base_overrides(root, tmp_path)).data

    def stale(name: str) -> None:
        Image.fromarray(np.full((BENCH["image_size"],) * 2, 7, dtype=np.uint8)).save(root / "saliency_map" / name)

    def prepare() -> None:
        open_dataset_split(cfg_data, "train", prepare=True, progress=False)

    def maps_ok() -> bool:
        return all(np.array_equal(read_png(root / "saliency_map" / f"{i}.png"),
                                  saliency_from_mask(read_png(root / "SegmentationClassAug" / f"{i}.png")))
                   for i in ids)

    stale(f"{ids[0]}.png")  # same recipe: the maps are left as they are
    prepare()
    assert read_png(root / "saliency_map" / f"{ids[0]}.png").max() == 7

    (root / "saliency_map" / "VERSION").write_text(f"{SALIENCY_VERSION - 1}\n")  # another recipe: rewritten
    prepare()
    assert (root / "saliency_map" / "VERSION").read_text().strip() == str(SALIENCY_VERSION) and maps_ok()

    (root / "saliency_map" / "VERSION").unlink()  # no VERSION and a map missing: made again
    (root / f"saliency_map/{ids[1]}.png").unlink()
    prepare()
    assert maps_ok()
    assert {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.parts[len(root.parts)] != "saliency_map"} == scenes
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


# ------------------------------------------------------------------------------ 5. memory
def test_memory_files_and_their_checksums_in_the_records(reference, tiny_benchmark):
    ids = train_ids(tiny_benchmark)
    for method in ("ssul-m", "dkd-m"):
        run_dir = reference(method)
        results = json.loads((run_dir / "results.json").read_text())
        assert "memory_checksum" not in results["steps"][0] and "num_memory_images" not in results["steps"][0]
        chosen: dict[int, list[dict]] = {}
        for step in (1, 2):
            saved = json.loads((run_dir / "memory" / f"step{step}.json").read_text())
            assert saved["step"] == step and saved["size"] == MEMORY_SIZE and saved["data"] == results["data"]
            entries = chosen[step] = saved["entries"]
            assert len(entries) == MEMORY_SIZE and len({e["index"] for e in entries}) == MEMORY_SIZE
            for e in entries:
                assert set(e) == {"image", "index", "classes"}
                assert e["image"] == f"JPEGImages/{ids[e['index']]}.jpg"
                assert e["classes"] == sorted(set(e["classes"])) and e["classes"]
            record = results["steps"][step]
            assert record["num_memory_images"] == MEMORY_SIZE
            paths = "\n".join(e["image"] for e in entries).encode()
            assert record["memory_checksum"] == hashlib.sha256(paths).hexdigest()
        for e in chosen[1]:  # step 1's memory: images of step 0, with the step-0 classes their masks hold
            present = mask_classes(tiny_benchmark, ids[e["index"]])
            assert e["classes"] == sorted(present & set(range(1, 9)))
        for e in chosen[2]:  # step 2's: step 1's memory, or an image of step 1 (class 9 in its mask)
            present = mask_classes(tiny_benchmark, ids[e["index"]])
            assert e in chosen[1] or (9 in present and 9 in e["classes"] and set(e["classes"]) <= set(range(1, 10)))


def test_replace_half_sampler_puts_memory_in_half_of_every_batch():
    n, memory, batch, total = 11, 5, 4, 20
    sampler = StepBatchSampler(n, batch, total, seed=1001, memory=memory, mixing="replace_half")
    batches = list(sampler)
    assert len(batches) == total
    turns = []
    for b in batches:
        indices = [i for i, _ in b]
        picked = [i for i in indices if i >= n]
        assert len(b) == batch and len(picked) == batch // 2 and all(n <= i < n + memory for i in picked)
        assert len(set(i for i in indices if i < n)) == batch - batch // 2
        turns += picked
    # the exemplars come in turn: every memory epoch (5 turns) replays each exemplar once
    for k in range(0, len(turns) - memory + 1, memory):
        assert sorted(turns[k: k + memory]) == list(range(n, n + memory))
    # deterministic per (seed, iteration), and the same when resumed at an iteration
    assert list(StepBatchSampler(n, batch, total, seed=1001, memory=memory, mixing="replace_half")) == batches
    for start in (1, 7, 13):
        resumed = list(StepBatchSampler(n, batch, total, seed=1001, start=start, memory=memory, mixing="replace_half"))
        assert resumed == batches[start:]
    assert list(StepBatchSampler(n, batch, total, seed=1002, memory=memory, mixing="replace_half")) != batches
    # concat: the caller counts the exemplars in num_items; nothing is replaced
    assert all(i < n for b in StepBatchSampler(n, batch, total, seed=1001, memory=memory, mixing="concat")
               for i, _ in b)


def test_concatenated_memory_counts_in_the_iterations(tiny_benchmark, tmp_path, tiny_model):
    iterations = {}
    for method in ("ssul-m", "dkd-m", "dkd"):
        args = [a for a in run_args(tiny_benchmark, tmp_path, method, method) if not a.startswith("train.iter")]
        epochs = ["train.iterations=null", "train.iterations_next=null", "train.epochs=0.1", "train.epochs_next=1"]
        assert ucdseg_cli(*args, "task.name=8-2", *epochs)[0] == 0
        record = json.loads((tmp_path / "runs" / method / "results.json").read_text())["steps"][1]
        iterations[method] = (record["iterations"], record["num_train_images"])
    n = iterations["dkd"][1]
    assert iterations["ssul-m"][1] == iterations["dkd-m"][1] == n > 0
    # one epoch at batch 4: DKD over its images and the memory's, SSUL over its images (memory replaces)
    assert iterations["dkd-m"][0] == max(1, (n + MEMORY_SIZE) // 4) > iterations["dkd"][0] == max(1, n // 4)
    assert iterations["ssul-m"][0] == max(1, n // 4)
