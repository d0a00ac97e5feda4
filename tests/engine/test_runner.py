"""End-to-end tests of the training engine: a two-step task on a tiny generated benchmark (seconds).

Every output file of a run, determinism, resuming at a step boundary and inside a step, the
saved-config check, reusing step 0 of another run, ``ucdseg eval`` and CLI errors. Runs use
the tiny model of ``conftest.py`` except :func:`test_two_step_run_writes_every_output`, which
trains the real ResNet-18 DeepLab.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import ucdseg
from ucdseg import cli
from ucdseg.config import to_dict, to_yaml
from ucdseg.engine import run
from ucdseg.engine.evaluation import evaluate_checkpoint
from ucdseg.engine.runner import Run
from ucdseg.methods import Method
from ucdseg.reporting import write_run_reports

NAMES = ("background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
         "bag", "ankle boot")  # the embedded benchmark's classes
STEPS = [list(range(9)), [9, 10]]  # embedded task 8-2
METRIC_KEYS = ("step", "classes", "seen", "per_class_iou", "miou", "pixel_accuracy", "num_train_images",
               "index_checksum", "iterations")
# the reference run: 2 iterations at step 0, 6 at step 1 with a mid-step checkpoint every 2
REFERENCE = ("train.iterations_next=6", "train.checkpoint_every=2")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sha256_of(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metrics(results: dict) -> list[dict]:
    """What a step's training determines (everything but its wall time)."""
    return [{k: s[k] for k in METRIC_KEYS} for s in results["steps"]]


def naive_mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def expected_miou(per_class: dict, num_base: int) -> dict:
    """mIoU groups from the per-class IoUs: old = the first ``num_base`` classes, new = the rest."""
    ious = list(per_class.values())
    out = {}
    for conv, first in (("with_background", 0), ("without_background", 1)):
        new = ious[num_base:]
        out[conv] = {"old": naive_mean(ious[first:num_base]), "new": naive_mean(new) if new else None,
                     "all": naive_mean(ious[first:])}
    return out


def assert_groups_equal(actual: dict, expected: dict) -> None:
    for conv in ("with_background", "without_background"):
        for group in ("old", "new", "all"):
            a, e = actual[conv][group], expected[conv][group]
            assert (a is None) == (e is None), (conv, group, a, e)
            if e is not None:
                assert a == pytest.approx(e, abs=1e-12), (conv, group)


class SimulatedCrash(Exception):
    """Raised inside the training loop to simulate a killed run."""


def count_loss_calls(monkeypatch, fail_at: tuple[int, int] | None = None) -> dict[int, int]:
    """Count ``Method.losses`` calls (one per training iteration) per step; optionally raise at
    ``fail_at = (step, call index)`` to simulate a crash."""
    calls: dict[int, int] = {}
    original = Method.losses

    def losses(self, ctx, weights):
        index = calls.get(ctx.step, 0)
        if fail_at == (ctx.step, index):
            raise SimulatedCrash(f"step {ctx.step}, iteration {index}")
        calls[ctx.step] = index + 1
        return original(self, ctx, weights)

    monkeypatch.setattr(Method, "losses", losses)
    return calls


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_state(a)["model"], load_state(b)["model"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def reference(config_factory, tiny_engine, tmp_path_factory):
    """One uninterrupted tiny run (read-only for the tests that use it)."""
    cfg = config_factory(tmp_path_factory.mktemp("reference"), "reference", *REFERENCE)
    with tiny_engine():
        results = run(cfg, progress=False)
    return cfg, results


# ------------------------------------------------------------------------------- the outputs
def test_two_step_run_writes_every_output(make_config):
    cfg = make_config("e2e")
    results = run(cfg, progress=False, reports=write_run_reports)  # the reports ucdseg run writes
    out = cfg.run_dir
    assert out == Path(cfg.output_dir) / "e2e"

    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert saved["config"] == to_dict(cfg) and saved["seed"] == 0 and saved["method"] == "mib+ucd"
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["versions"]["torchvision"] == torchvision.__version__
    assert saved["versions"]["ucdseg"] == ucdseg.__version__
    assert saved["versions"]["torch_threads"] == torch.get_num_threads()
    assert saved["task"]["dataset"] == "embedded" and saved["task"]["name"] == "8-2"
    assert saved["task"]["steps"] == STEPS and saved["task"]["setting"] == "overlapped"
    assert [s["step"] for s in saved["steps"]] == [0, 1]
    for record, classes in zip(saved["steps"], STEPS):
        step = record["step"]
        seen = [c for s in STEPS[: step + 1] for c in s]
        assert record["classes"] == classes
        assert list(record["per_class_iou"]) == [NAMES[c] for c in seen]
        assert all(v is None or 0 <= v <= 1 for v in record["per_class_iou"].values())
        assert 0 <= record["pixel_accuracy"] <= 1
        assert_groups_equal(record["miou"], expected_miou(record["per_class_iou"], num_base=9))
        assert record["iterations"] == 2
    first, last = saved["steps"]
    assert first["miou"]["with_background"]["new"] is None and first["miou"]["without_background"]["new"] is None
    assert last["miou"]["without_background"]["all"] is not None

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = ["step", "new_classes"] + [f"miou_{g}_{c}" for c in ("without_background", "with_background")
                                        for g in ("old", "new", "all", "avg")]
    header += ["pixel_accuracy"] + [f"iou_{n}" for n in NAMES]
    assert list(rows[0]) == header and [r["step"] for r in rows] == ["0", "1"]
    assert rows[0]["miou_new_without_background"] == "" and rows[0]["iou_bag"] == ""  # not seen yet
    assert rows[1]["new_classes"] == "bag ankle boot"
    assert float(rows[1]["miou_all_without_background"]) == last["miou"]["without_background"]["all"]
    # avg: the mean over the steps of mIoU all, so far (the CSV) and over the run (results.json)
    for conv in ("without_background", "with_background"):
        mean = (first["miou"][conv]["all"] + last["miou"][conv]["all"]) / 2
        assert saved["avg"][conv] == pytest.approx(mean, abs=1e-12)
        assert float(rows[0][f"miou_avg_{conv}"]) == first["miou"][conv]["all"]
        assert float(rows[1][f"miou_avg_{conv}"]) == pytest.approx(mean, abs=1e-12)
    # one process trained each step, on the whole batch
    assert [(s["world_size"], s["batch_per_process"]) for s in saved["steps"]] == [(1, 4), (1, 4)]
    assert [s["num_eval_images"] for s in saved["steps"]] == [16, 16]

    summary = (out / "summary.md").read_text()
    assert summary.startswith("# mib+ucd on embedded 8-2 (overlapped), seed 0")
    row = next(line for line in summary.splitlines() if line.startswith("| 1 | bag, ankle boot |"))
    assert f"| {100 * last['miou']['without_background']['all']:.1f} |" in row
    assert (f"avg (the mean over the 2 steps of mIoU all): {100 * saved['avg']['without_background']:.1f} "
            f"(without background), {100 * saved['avg']['with_background']:.1f} (with background)") in summary

    for png in (out / "miou_per_step.png", out / "predictions" / "step0.png", out / "predictions" / "step1.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        with Image.open(png) as image:
            image.verify()

    for step, classes_per_step in ((0, [9]), (1, [9, 2])):
        state = load_state(out / "checkpoints" / f"step{step}.pt")
        assert set(state) == {"model", "step", "config", "classes_per_step", "class_names", "palette", "parent_sha256"}
        # the checkpoint names the one it was trained from (recovery keeps a step only with its past)
        assert state["parent_sha256"] == (None if step == 0 else sha256_of(out / "checkpoints" / "step0.pt"))
        assert state["class_names"][:3] == ["background", "T-shirt/top", "trouser"]
        assert state["step"] == step and state["classes_per_step"] == classes_per_step
        assert state["config"] == to_dict(cfg)
        # the tiny backbone of conftest: 16-channel pre-logits features
        assert state["model"]["classifier.0.weight"].shape == (9, 16, 1, 1)
        assert ("classifier.1.weight" in state["model"]) == (step == 1)
    assert load_state(out / "checkpoints" / "step1.pt")["model"]["classifier.1.weight"].shape == (2, 16, 1, 1)

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"step0/loss", b"step0/ce", b"step1/unce", b"step1/unkd", b"step1/ucd", b"step1/lr",
                b"miou_without_background/all"):
        assert tag in data, tag

    assert (out / "config.yaml").read_text() == to_yaml(cfg)
    stray = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert stray == [] and not list(out.rglob("*-last.pt"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml", "results.json", "results.csv", "summary.md", "miou_per_step.png", "forgetting.png",
         "predictions", "checkpoints", "tensorboard", "log.txt"])  # the lock file is removed on a clean finish
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step0.pt", "step1.pt"]


# ------------------------------------------------------------------------------- determinism
def test_same_seed_same_results_other_seed_differs(reference, make_config, tiny_model):
    ref_cfg, ref = reference
    again = run(make_config("again", *REFERENCE), progress=False)
    assert metrics(again) == metrics(ref)
    for step in (0, 1):
        assert_same_weights(ref_cfg.run_dir / "checkpoints" / f"step{step}.pt",
                            make_config("again").run_dir / "checkpoints" / f"step{step}.pt")
    other = run(make_config("seed1", *REFERENCE, "seed=1"), progress=False)
    for a, b in zip(metrics(other), metrics(ref)):
        assert (a["per_class_iou"], a["pixel_accuracy"]) != (b["per_class_iou"], b["pixel_accuracy"])


# ------------------------------------------------------------------------------------ resume
def test_finished_run_is_not_retrained_and_missing_step_is(make_config, tiny_model, monkeypatch):
    cfg = make_config("resume")
    first = run(cfg, progress=False)
    ckpts = cfg.run_dir / "checkpoints"
    mtimes = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    results_bytes = (cfg.run_dir / "results.json").read_bytes()

    calls = count_loss_calls(monkeypatch)
    assert run(cfg, progress=False) == first
    assert calls == {}  # no training iteration at all
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == mtimes
    assert (cfg.run_dir / "results.json").read_bytes() == results_bytes

    (ckpts / "step1.pt").unlink()  # as if killed between step 0 and the end of step 1
    again = run(cfg, progress=False)
    assert calls == {1: 2}  # step 1 only, all of its iterations
    assert (ckpts / "step0.pt").stat().st_mtime_ns == mtimes["step0.pt"]
    assert metrics(again) == metrics(first)
    assert [s["step"] for s in json.loads((cfg.run_dir / "results.json").read_text())["steps"]] == [0, 1]


def test_mid_step_resume_matches_uninterrupted_run(reference, make_config, tiny_model, monkeypatch):
    ref_cfg, ref = reference
    cfg = make_config("crash", *REFERENCE)
    with monkeypatch.context() as mp:
        count_loss_calls(mp, fail_at=(1, 4))  # dies in iteration 4 of step 1 (0-based)
        with pytest.raises(SimulatedCrash, match="step 1, iteration 4"):
            run(cfg, progress=False)
    ckpts = cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step0.pt", "step1-last.pt"]
    partial = load_state(ckpts / "step1-last.pt")
    assert partial["iteration"] == 4 and partial["step"] == 1
    assert [s["step"] for s in json.loads((cfg.run_dir / "results.json").read_text())["steps"]] == [0]

    calls = count_loss_calls(monkeypatch)
    resumed = run(cfg, progress=False)
    assert calls == {1: 2}  # iterations 4 and 5 only
    assert metrics(resumed) == metrics(ref)
    assert_same_weights(ckpts / "step1.pt", ref_cfg.run_dir / "checkpoints" / "step1.pt")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step0.pt", "step1.pt"]


def test_changed_config_in_existing_run_dir_is_refused(make_config):
    run(make_config("cfg", "eval.num_images=0"), progress=False)  # a finished run
    # settings that cannot change the results may differ
    Run(make_config("cfg", "eval.num_images=0", "eval.batch_size=3", "train.checkpoint_every=5", "train.log_every=7"),
        progress=False).writer.close()
    with pytest.raises(ValueError, match=r"differing keys: method\.name, train\.lr_next\)") as err:
        Run(make_config("cfg", "eval.num_images=0", "train.lr_next=0.5", "method.name=mib"), progress=False)
    assert "cfg" in str(err.value) and "\n" not in str(err.value)


def test_a_failed_start_takes_the_corrected_config(make_config):
    """Nothing trained yet (the first command failed before a step finished): the corrected
    command is not refused as "a different config", and its config is the one saved."""
    first = make_config("fix", "train.lr=0.5")
    Run(first, progress=False).writer.close()  # config.yaml written, then (say) the run failed
    corrected = make_config("fix", "train.lr=0.05")
    Run(corrected, progress=False).writer.close()
    assert (corrected.run_dir / "config.yaml").read_text() == to_yaml(corrected)


# ------------------------------------------------------------------------------ step0_from
def test_step0_from_reuses_step_zero(reference, make_config, tiny_model, monkeypatch):
    ref_cfg, ref = reference
    trained: list[int] = []
    original = Run.train_step

    def spy(self, step):
        trained.append(step)
        return original(self, step)

    monkeypatch.setattr(Run, "train_step", spy)
    source = f"train.step0_from={ref_cfg.run_dir}"
    results = run(make_config("mib", *REFERENCE, "method.name=mib", source), progress=False)
    assert trained == [1]
    assert metrics(results)[0] == metrics(ref)[0]
    out = make_config("mib").run_dir
    assert (out / "checkpoints" / "step0.pt").read_bytes() == (ref_cfg.run_dir / "checkpoints" / "step0.pt").read_bytes()
    assert results["method"] == "mib" and [s["step"] for s in results["steps"]] == [0, 1]

    for change, key in (("train.lr=0.5", "train.lr"), ("seed=3", "seed"), ("task.name=5-5", "task.name"),
                        ("data.crop_size=48", "data.crop_size")):
        with pytest.raises(ValueError, match=rf"step0_from=.*reference.*\b{re.escape(key)}\b"):
            run(make_config(f"bad-{key}", *REFERENCE, source, change), progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(make_config("missing", f"train.step0_from={out.parent / 'nowhere'}"), progress=False)
    assert trained == [1]


def test_step0_from_refuses_a_step0_trained_with_another_loss(reference, make_config, tiny_model):
    """MiB's LwF-MC trains step 0 with BCE: a cross-entropy step 0 is not its step 0, nor the reverse."""
    ref_cfg, _ = reference  # the reference's method (mib+ucd by default) trains step 0 with cross-entropy
    with pytest.raises(ValueError, match=r"step0_from=.*reference.*ce loss, lwf-mc trains step 0 with bce") as err:
        run(make_config("lwf-mc", *REFERENCE, "method.name=lwf-mc", f"train.step0_from={ref_cfg.run_dir}"),
            progress=False)
    assert "\n" not in str(err.value)
    assert not (make_config("lwf-mc").run_dir / "checkpoints" / "step0.pt").exists()


def test_step0_from_shares_across_memory_and_refuses_other_step0_options(make_config, tiny_model):
    """ssul-m reuses ssul's step 0 (memory starts at step 1: data.memory.size is no step-0 setting);
    dkd refuses a dkd step 0 trained with another pos_weight_step0 (an option step 0 reads)."""
    ssul = make_config("ssul", "method.name=ssul", "train.iterations_next=1")
    run(ssul, progress=False)
    shared = run(make_config("ssul-m", "method.name=ssul-m", "data.memory.size=4", "train.iterations_next=1",
                             f"train.step0_from={ssul.run_dir}"), progress=False)
    assert [s["step"] for s in shared["steps"]] == [0, 1] and shared["steps"][1]["num_memory_images"] == 4
    dkd = make_config("dkd", "method.name=dkd", "method.options.pos_weight_step0=3.0", "train.iterations_next=1")
    run(dkd, progress=False)
    with pytest.raises(ValueError, match=r"step0_from=.*other method options \(method\.options\.pos_weight_step0=3\.0\)"):
        run(make_config("dkd-2", "method.name=dkd", f"train.step0_from={dkd.run_dir}"), progress=False)
    assert not (make_config("dkd-2").run_dir / "checkpoints" / "step0.pt").exists()


def test_step0_from_refuses_a_joint_run_either_way(reference, make_config, tiny_model):
    """Joint training has one step with every class: its step 0 is not an incremental step 0."""
    ref_cfg, _ = reference
    with pytest.raises(ValueError, match="step0_from"):
        run(make_config("joint", "method.name=joint", f"train.step0_from={ref_cfg.run_dir}"), progress=False)
    joint_cfg = make_config("joint-source", "method.name=joint")
    run(joint_cfg, progress=False)
    with pytest.raises(ValueError, match="step0_from"):
        run(make_config("from-joint", f"train.step0_from={joint_cfg.run_dir}"), progress=False)


# --------------------------------------------------------------------------------------- CLI
def test_cli_eval_reproduces_step_one(reference, tiny_model, capsys):
    ref_cfg, ref = reference
    checkpoint = ref_cfg.run_dir / "checkpoints" / "step1.pt"
    assert cli.main(["--quiet", "eval", str(checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = ref["steps"][1]
    assert lines[0].startswith("step 1: mIoU ")
    printed = dict((m[0], m[1:]) for m in re.findall(r"(\w+) ([\d.-]+)/([\d.-]+)/([\d.-]+)", lines[0]))
    for conv, groups in expected["miou"].items():
        assert printed[conv] == tuple("-" if v is None else f"{100 * v:.1f}" for v in groups.values())
    assert [line.split()[0] for line in lines[1:]] == [n.split()[0] for n in expected["per_class_iou"]]
    record = evaluate_checkpoint(checkpoint, progress=False)
    assert {k: record[k] for k in ("per_class_iou", "miou", "pixel_accuracy")} == {
        k: expected[k] for k in ("per_class_iou", "miou", "pixel_accuracy")}


def test_cli_errors_are_one_line(make_config, tmp_path, capsys):
    assert cli.main(["run", "missing.yaml"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("ucdseg: error: ") and "missing.yaml" in captured.err

    assert cli.main(["eval", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pt" in err and "does not exist" in err

    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(make_config("cli")))
    assert cli.main(["--quiet", "run", str(config), "method.name=nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'nope'" in err and "mib+ucd" in err
    assert cli.main(["--quiet", "run", str(config), "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


# ------------------------------------------------------------------------ performance options
def close_metrics(a: list[dict], b: list[dict], tol: float) -> None:
    """Same steps, images and iterations; every IoU and the pixel accuracy within ``tol`` (absolute)."""
    for sa, sb in zip(a, b, strict=True):
        for key in ("step", "classes", "seen", "num_train_images", "index_checksum", "iterations"):
            assert sa[key] == sb[key], key
        assert sa["per_class_iou"].keys() == sb["per_class_iou"].keys()
        for name, v in sa["per_class_iou"].items():
            w = sb["per_class_iou"][name]
            assert (v is None) == (w is None) and (v is None or abs(v - w) <= tol), (sa["step"], name, v, w)
        assert abs(sa["pixel_accuracy"] - sb["pixel_accuracy"]) <= tol


def test_channels_last_gives_the_same_run(reference, make_config, tiny_model):
    # NHWC runs the same convolutions with other kernels: the floats may differ in their last bits
    # (here: weights within 1e-6 after the 8 SGD iterations; BatchNorm running variances, which reach
    # the hundreds, within a relative 1e-5), which may flip the argmax of a few of
    # the 16 x 64 x 64 validation pixels; IoUs and accuracy are allowed 1e-3 (about 65 pixels)
    ref_cfg, ref = reference
    cfg = make_config("nhwc", *REFERENCE, "train.channels_last=true")
    results = run(cfg, progress=False)
    for step in (0, 1):
        ours = load_state(cfg.run_dir / "checkpoints" / f"step{step}.pt")["model"]
        theirs = load_state(ref_cfg.run_dir / "checkpoints" / f"step{step}.pt")["model"]
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=key)
        assert all(v.is_contiguous() for v in ours.values())  # saved in the default layout
    close_metrics(metrics(results), metrics(ref), tol=1e-3)


def _cxx_available() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or a torch without this helper
        return False
    return True


def test_compile_gives_the_same_run(make_config, tiny_model):
    if not _cxx_available():  # checked here, not at collection: importing inductor takes seconds
        pytest.skip("torch.compile (inductor) needs a C++ compiler")
    # one step (joint training): about 40 s on 2 shared cores with a cold inductor cache, seconds with a warm one
    plain = run(make_config("plain", "method.name=joint"), progress=False)
    cfg = make_config("compiled", "method.name=joint", "train.compile=true")
    compiled = run(cfg, progress=False)
    state = load_state(cfg.run_dir / "checkpoints" / "step0.pt")["model"]
    assert not [k for k in state if "_orig_mod" in k]  # the checkpoint is the plain model's
    ref = load_state(make_config("plain").run_dir / "checkpoints" / "step0.pt")["model"]
    assert state.keys() == ref.keys()
    for key in state:  # inductor fuses and reorders: float32 rounding only
        torch.testing.assert_close(state[key], ref[key], rtol=0, atol=1e-4, msg=key)
    close_metrics(metrics(compiled), metrics(plain), tol=1e-3)


def test_compile_without_toolchain_is_a_one_line_error(make_config, tiny_model):
    import torch._inductor.config as inductor_config

    cfg = make_config("nocxx", "method.name=joint", "train.compile=true")
    with inductor_config.patch({"cpp.cxx": (None, "no-such-g++")}), \
            pytest.raises(RuntimeError, match="train.compile=true: .* needs a working C/C.. toolchain") as err:
        run(cfg, progress=False)
    assert "\n" not in str(err.value) and "no-such-g++" in str(err.value)


def test_step0_from_accepts_a_step0_checkpoint_file(reference, make_config, tiny_model, tmp_path, monkeypatch):
    """A bare step0.pt (moved away from its run directory): the same checks as a run directory;
    step 0's record is measured here, and equals the source run's."""
    import shutil

    ref_cfg, ref = reference
    bare = tmp_path / "elsewhere" / "my-step0.pt"
    bare.parent.mkdir()
    shutil.copyfile(ref_cfg.run_dir / "checkpoints" / "step0.pt", bare)
    trained: list[int] = []
    original = Run.train_step
    monkeypatch.setattr(Run, "train_step", lambda self, step: (trained.append(step), original(self, step))[1])
    results = run(make_config("from-file", *REFERENCE, "method.name=mib", f"train.step0_from={bare}"), progress=False)
    assert trained == [1]
    first = results["steps"][0]
    assert first["step0_from"] == str(bare)
    for key in ("classes", "seen", "per_class_iou", "miou", "pixel_accuracy"):
        assert first[key] == ref["steps"][0][key], key
    out = make_config("from-file").run_dir
    assert (out / "checkpoints" / "step0.pt").read_bytes() == bare.read_bytes()

    source = f"train.step0_from={bare}"
    for change, key in (("train.lr=0.5", "train.lr"), ("seed=3", "seed"), ("task.name=5-5", "task.name"),
                        ("model.output_stride=8", "model.output_stride")):
        with pytest.raises(ValueError, match=rf"step0_from=.*my-step0\.pt.*\b{re.escape(key)}\b"):
            run(make_config(f"bad-{key}", *REFERENCE, source, change), progress=False)
    # a later step's checkpoint, a joint run's step 0, weights of another architecture, not a checkpoint
    with pytest.raises(ValueError, match=r"my-step1\.pt: not a step-0 checkpoint written by ucdseg \(it has step 1\)"):
        shutil.copyfile(ref_cfg.run_dir / "checkpoints" / "step1.pt", bare.with_name("my-step1.pt"))
        run(make_config("later", f"train.step0_from={bare.with_name('my-step1.pt')}"), progress=False)
    joint_cfg = make_config("joint-source", "method.name=joint")
    run(joint_cfg, progress=False)
    with pytest.raises(ValueError, match=r"its step 0 has classes \[0, 1, .*10\], this run's step 0 needs \[0, 1"):
        run(make_config("from-joint", f"train.step0_from={joint_cfg.run_dir / 'checkpoints' / 'step0.pt'}"),
            progress=False)
    state = torch.load(bare, weights_only=True)
    state["model"]["classifier.0.weight"] = state["model"]["classifier.0.weight"][:, :8]
    torch.save(state, bare.with_name("narrow.pt"))
    with pytest.raises(ValueError, match=r"narrow\.pt: its weights do not fit this run's step-0 model .*classifier"):
        run(make_config("narrow", f"train.step0_from={bare.with_name('narrow.pt')}"), progress=False)
    bare.with_name("junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt could not be read"):
        run(make_config("junk", f"train.step0_from={bare.with_name('junk.pt')}"), progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere: neither a checkpoint file nor a run directory"):
        run(make_config("missing", f"train.step0_from={tmp_path / 'nowhere'}"), progress=False)
    assert trained == [1, 0]  # the joint source run's own step 0; no refused run trained anything
