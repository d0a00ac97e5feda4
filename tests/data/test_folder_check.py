"""``ucdseg data check --dataset folder`` reports every fault in one pass, grouped by kind, up to a
limit per kind (issue 24, item 7). The faults are planted here, one of each kind, in a folder
dataset of 16 px masks; the check must name them all at once."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg.data.check import ERROR, WARNING
from ucdseg.data.folder import check_folder
from ucdseg.data.folder_check import folder_problems, run_check_folder

CLASSES = ["background", "a", "b", "c"]


def write_folder(root: Path, ids: list[str], val: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k, image_id in enumerate(ids):
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[2:8, 2:10] = 1 + k % 3
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{image_id}.png")
        Image.fromarray(np.stack([mask * 60] * 3, axis=-1)).save(root / "images" / f"{image_id}.png")
    (root / "classes.yaml").write_text(f"classes: {json.dumps(CLASSES)}\n")
    (root / "train.txt").write_text("".join(f"{i}\n" for i in ids if i not in val))
    (root / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


@pytest.fixture
def faulty(tmp_path) -> Path:
    """One fault of each kind; without the one-pass check, each would need its own run to be seen."""
    ids = [f"i{k}" for k in range(8)]
    root = write_folder(tmp_path / "own", ids, val=["i7"])
    (root / "val.txt").write_text("i7\ni3\nnope\ni7\n")  # in both lists, no such image, listed twice
    (root / "masks" / "i1.png").unlink()  # an image without its mask
    Image.fromarray(np.full((16, 16), 9, np.uint8), mode="L").save(root / "masks" / "i2.png")  # id 9: no class
    Image.fromarray(np.zeros((8, 16), np.uint8), mode="L").save(root / "masks" / "i4.png")  # another size
    (root / "images" / "i5.png").write_bytes(b"not a png")  # unreadable image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).convert("RGBA").save(root / "masks" / "i6.png")  # RGB, no palette
    (root / "masks" / "orphan.png").write_bytes((root / "masks" / "i0.png").read_bytes())  # a mask without image
    return root


def test_every_fault_is_found_in_one_pass(faulty):
    problems = folder_problems(faulty)
    kinds = sorted((p.kind, p.severity, p.path.name) for p in problems)
    assert kinds == sorted([
        ("in-both-lists", ERROR, "val.txt"), ("list-entry-without-image", ERROR, "val.txt"),
        ("repeated-list-entry", ERROR, "val.txt"), ("missing-mask", ERROR, "i1.png"),
        ("unexpected-values", ERROR, "i2.png"), ("size-mismatch", ERROR, "i4.png"),
        ("unreadable-image", ERROR, "i5.png"), ("unknown-colour", ERROR, "i6.png"),
        ("mask-without-image", WARNING, "orphan.png")])
    text = {p.kind: p.what for p in problems}
    assert text["in-both-lists"] == "'i3' is also in train.txt"
    assert text["list-entry-without-image"] == "line 3: no image 'nope' in images/"
    assert text["repeated-list-entry"] == "line 4: 'i7' is listed twice"
    assert "holds class id(s) 9" in text["unexpected-values"] and "names 4 classes" in text["unexpected-values"]
    assert text["size-mismatch"] == "mask is 16x8 but its image i4.png is 16x16"
    # the one-line form keeps naming the files
    assert any(line.startswith(str(faulty / "masks" / "i1.png")) for line in check_folder(faulty))


def test_the_report_groups_by_kind_and_ends_with_the_verdict(faulty):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_check_folder(faulty) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"folder at {faulty}: 4 classes (background, a, b, c)")
    groups = [line for line in lines if line.startswith(("ERROR ", "WARNING "))]
    assert len(groups) == 9 and all(line.endswith("(1):") for line in groups)
    assert groups[-1] == "WARNING mask-without-image (1):"  # errors first
    assert lines[-1] == "verdict: FAILED -- 8 error(s), 1 warning(s)"


def test_structural_faults_do_not_hide_each_other(tmp_path):
    root = tmp_path / "bare"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "x.jpg")
    (root / "train.txt").write_text("x\n")
    kinds = sorted(p.kind for p in folder_problems(root))
    # no classes.yaml, no masks/, two images with one id, train.txt without val.txt: all at once
    assert kinds == ["classes-yaml", "missing-folder", "missing-list", "repeated-id"]
    assert [p.kind for p in folder_problems(tmp_path / "nowhere")] == ["missing-root"]


def test_a_kind_shows_its_first_entries_and_counts_the_rest(tmp_path):
    ids = [f"m{k:02d}" for k in range(14)]
    root = write_folder(tmp_path / "many", ids, val=["m13"])
    for image_id in ids[:12]:
        (root / "masks" / f"{image_id}.png").unlink()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_check_folder(root, max_per_kind=5) == 1
    lines = out.getvalue().splitlines()
    start = lines.index("ERROR missing-mask (12):")
    assert [line.split(":")[0].strip() for line in lines[start + 1: start + 6]] == \
        [str(root / "masks" / f"{i}.png") for i in ids[:5]]
    assert lines[start + 6] == "  ... and 7 more"
    assert lines[-1] == "verdict: FAILED -- 12 error(s), 0 warning(s)"


def test_limit_reads_fewer_pairs_but_checks_every_entry(faulty):
    limited = folder_problems(faulty, limit=1)
    kinds = {p.kind for p in limited}
    assert {"missing-mask", "in-both-lists", "list-entry-without-image"} <= kinds  # structure: every entry
    read = {"unexpected-values", "size-mismatch", "unreadable-image", "unknown-colour"}
    assert len(kinds & read) < len(read)  # contents: one pair per split only
