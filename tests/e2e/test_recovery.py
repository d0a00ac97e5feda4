"""Recovery of a damaged run folder never keeps a step made from a replaced one, and a run resumes
only on the data it started with, by content (issue 23, items 1 and 2).

Every case runs ``ucdseg run`` (``cli.main``) on a real tiny 3-step run, damages the folder, runs
the same command again and compares every step's checkpoint with an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import base_overrides
from ucdseg import cli

STEPS = 3  # task 8-1 on the tiny benchmark: background and 8 classes, then one, then one


def args(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["--quiet", "run", str(cli.packaged_config("embedded/mib_ucd.yaml")), *base_overrides(root, out), f"name={name}", "task.name=8-1", "method.name=mib",
            "eval.num_images=0", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_checkpoints(run_dir: Path, reference: Path) -> None:
    for step in range(STEPS):
        mine, theirs = weights(run_dir / "checkpoints" / f"step{step}.pt"), weights(reference / "checkpoints" / f"step{step}.pt")
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"step {step}: {key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def finished(tiny_benchmark, tmp_path_factory, tiny_engine):
    """An uninterrupted 3-step run (the reference) and the command line that made it."""
    out = tmp_path_factory.mktemp("recovery")
    with tiny_engine():
        assert cli.main(args(tiny_benchmark, out, "reference")) == 0
    return out / "runs" / "reference", out


def copy_of(finished, name: str) -> Path:
    reference, out = finished
    target = out / "runs" / name
    shutil.copytree(reference, target)
    (target / "config.yaml").write_text((target / "config.yaml").read_text().replace("name: reference", f"name: {name}"))
    return target


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("damaged", [0, 1])
def test_a_truncated_checkpoint_retrains_its_step_and_every_later_one(finished, tiny_benchmark, damaged, one_thread,
                                                                      capsys):
    reference, out = finished
    name = f"truncated{damaged}"
    run_dir = copy_of(finished, name)
    path = run_dir / "checkpoints" / f"step{damaged}.pt"
    path.write_bytes(path.read_bytes()[:1000])
    capsys.readouterr()
    assert cli.main(args(tiny_benchmark, out, name)) == 0
    err = capsys.readouterr().err
    assert f"step{damaged}.pt does not match the checksum" in err
    assert f"step {damaged} and every step after it are trained again" in err
    assert f"step{damaged + 1}.pt" in err and "are removed" in err  # the stale later checkpoints, named
    assert "recovered" not in err
    steps = results(run_dir)["steps"]
    assert [s["step"] for s in steps] == list(range(STEPS))
    for record in steps[damaged:]:  # trained again, not kept
        assert not record.get("recovered") and record["train_seconds"] is not None
    assert_same_checkpoints(run_dir, reference)
    assert [s["miou"] for s in steps] == [s["miou"] for s in results(reference)["steps"]]


def test_lost_results_keep_only_checkpoints_made_from_the_step_before_as_it_is(finished, tiny_benchmark, one_thread,
                                                                              capsys):
    """results.json lost, and step1.pt replaced by other weights written by the same config: step 1
    is recovered (its own parent, step 0, is there), step 2 was made from the old step 1 and is
    trained again from the new one."""
    reference, out = finished
    run_dir = copy_of(finished, "replaced")
    (run_dir / "results.json").unlink()
    step1 = run_dir / "checkpoints" / "step1.pt"
    state = torch.load(step1, map_location="cpu", weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, step1)
    capsys.readouterr()
    assert cli.main(args(tiny_benchmark, out, "replaced")) == 0
    err = capsys.readouterr().err
    assert "step 0 recovered" in err and "step 1 recovered" in err
    assert "step2.pt was trained from another" in err and "step 2 and every step after it are trained again" in err
    steps = results(run_dir)["steps"]
    assert [bool(s.get("recovered")) for s in steps] == [True, True, False]
    assert torch.load(run_dir / "checkpoints" / "step2.pt", weights_only=True)["parent_sha256"] != \
        torch.load(reference / "checkpoints" / "step2.pt", weights_only=True)["parent_sha256"]
    assert not torch.equal(weights(run_dir / "checkpoints" / "step2.pt")["classifier.2.weight"],
                           weights(reference / "checkpoints" / "step2.pt")["classifier.2.weight"])


def test_lost_results_with_intact_checkpoints_recover_every_step(finished, tiny_benchmark, one_thread, capsys):
    reference, out = finished
    run_dir = copy_of(finished, "lost")
    (run_dir / "results.json").unlink()
    capsys.readouterr()
    assert cli.main(args(tiny_benchmark, out, "lost")) == 0
    err = capsys.readouterr().err
    assert all(f"step {s} recovered" in err for s in range(STEPS)) and "trained again" not in err
    assert [s["miou"] for s in results(run_dir)["steps"]] == [s["miou"] for s in results(reference)["steps"]]
    assert_same_checkpoints(run_dir, reference)


# ---------------------------------------------------------------------------- data by content
def flipped_copy(root: Path, target: Path) -> Path:
    """The benchmark with every image and mask flipped left-right: the same file names."""
    shutil.copytree(root, target)
    for folder in ("JPEGImages", "SegmentationClass"):
        for path in sorted((target / folder).iterdir()):
            with Image.open(path) as image:
                flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                flipped.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return target


def files(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "log.txt"}


def test_resuming_on_images_with_the_same_names_but_other_content_is_refused(finished, tiny_benchmark, tmp_path,
                                                                            one_thread, capsys):
    _, out = finished
    run_dir = copy_of(finished, "flipped")
    (run_dir / "results.json").write_text(json.dumps({**results(run_dir), "steps": results(run_dir)["steps"][:1]}))
    before = files(run_dir)
    flipped = flipped_copy(tiny_benchmark, tmp_path / "flipped")
    capsys.readouterr()
    overrides = [a if not a.startswith("data.root=") else f"data.root={flipped}"
                 for a in args(tiny_benchmark, out, "flipped")]
    assert cli.main(overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on other data" in err[0]
    assert "other sizes" in err[0] or "other content" in err[0]
    assert files(run_dir) == before  # nothing changed (but the log of the command's error)
