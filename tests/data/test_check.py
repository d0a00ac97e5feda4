"""``ucdseg.data.check``: every kind of defect is reported with its path, on fixture trees of the
official VOC / embedded, ADE20K and Cityscapes layouts; a clean tree reports nothing."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg.data import build_dataset
from ucdseg.data.check import ERROR, WARNING, Problem, check, check_dataset, format_report, run_check

H, W = 6, 8


# ------------------------------------------------------------------------------------ fixtures
def write_image(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(path)


def write_mask(path: Path, values, h: int = H, w: int = W, palette: bool = False) -> None:
    """A mask holding exactly ``values`` (first value everywhere, the others one pixel each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.full((h, w), values[0], dtype=np.uint8)
    for i, v in enumerate(values[1:]):
        m[i // w, i % w] = v
    im = Image.fromarray(m)
    if palette:
        im.putpalette([(5 * i + 1) % 256 for i in range(768)])
    im.save(path)


@dataclass
class Tree:
    """A fixture tree: root, the (image, mask) paths of each entry and the dataset's rules."""

    name: str
    root: Path
    pairs: dict  # (split, key) -> (image path, mask path)
    folders: list  # required folders
    lists: list  # list files (VOC layout only)
    good: tuple  # valid mask values
    bad: int  # a mask value outside the dataset's ids


def voc_tree(tmp: Path, name: str = "voc") -> Tree:
    root = tmp / ("VOC2012" if name == "voc" else "embedded")
    good = (0, 20, 255) if name == "voc" else (0, 10, 255)
    pairs = {}
    for split, keys in (("train", ("a", "b", "c")), ("val", ("d",))):
        for key in keys:
            image, mask = root / "JPEGImages" / f"{key}.jpg", root / "SegmentationClassAug" / f"{key}.png"
            write_image(image)
            write_mask(mask, good, palette=True)
            if split == "val":
                mask = root / "SegmentationClass" / f"{key}.png"
                write_mask(mask, good, palette=True)
            pairs[split, key] = (image, mask)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train_aug.txt").write_text("a\nb\nc\n")
    (lists / "val.txt").write_text("d\n")
    return Tree(name, root, pairs, [root / "JPEGImages", root / "SegmentationClassAug"],
                [lists / "train_aug.txt", lists / "val.txt"], good, 21 if name == "voc" else 11)


def ade_tree(tmp: Path) -> Tree:
    root = tmp / "ADEChallengeData2016"
    pairs = {}
    for split, folder, prefix, n in (("train", "training", "ADE_train", 3), ("val", "validation", "ADE_val", 1)):
        for i in range(1, n + 1):
            key = f"{prefix}_{i:08d}"
            image, mask = root / "images" / folder / f"{key}.jpg", root / "annotations" / folder / f"{key}.png"
            write_image(image)
            write_mask(mask, (0, 1, 150))
            pairs[split, key] = (image, mask)
    folders = [root / a / b for a in ("images", "annotations") for b in ("training", "validation")]
    return Tree("ade", root, pairs, folders, [], (0, 1, 150), 151)


def cityscapes_tree(tmp: Path) -> Tree:
    root = tmp / "cityscapes"
    pairs = {}
    for split, city, n in (("train", "aachen", 3), ("val", "lindau", 1)):
        for i in range(n):
            key = f"{city}_{i:06d}_000019"
            image = root / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png"
            mask = root / "gtFine" / split / city / f"{key}_gtFine_labelIds.png"
            write_image(image)
            write_mask(mask, (7, 0, 26, 33))  # road, unlabeled, car, bicycle: official ids
            pairs[split, f"{city}/{key}"] = (image, mask)
    folders = [root / a / s for a in ("leftImg8bit", "gtFine") for s in ("train", "val")]
    return Tree("cityscapes", root, pairs, folders, [], (7, 0, 26, 33), 34)


BUILDERS = {
    "voc": lambda tmp: voc_tree(tmp, "voc"),
    "embedded": lambda tmp: voc_tree(tmp, "embedded"),
    "ade": ade_tree,
    "cityscapes": cityscapes_tree,
}


@pytest.fixture(params=sorted(BUILDERS))
def tree(request, tmp_path) -> Tree:
    return BUILDERS[request.param](tmp_path)


def kinds(problems) -> list[tuple[str, str, Path]]:
    return sorted((p.severity, p.kind, p.path) for p in problems)


def second_train(tree: Tree) -> tuple[Path, Path]:
    return tree.pairs[sorted(k for k in tree.pairs if k[0] == "train")[1]]


# ---------------------------------------------------------------------------------- clean trees
def test_clean_tree_reports_no_problem_and_is_readable(tree):
    assert check_dataset(tree.name, tree.root) == []
    for split in ("train", "val"):  # the fixture is the layout the readers expect
        ds = build_dataset(tree.name, tree.root, split)
        assert len(ds) == sum(1 for k in tree.pairs if k[0] == split)
    result = check(tree.name, tree.root)
    assert [(s.split, s.entries, s.read) for s in result.splits] == [("train", 3, 3), ("val", 1, 1)]


# ---------------------------------------------------------------------------------- each defect
def test_missing_root(tmp_path):
    problems = check_dataset("voc", tmp_path / "nowhere")
    assert kinds(problems) == [(ERROR, "missing-root", tmp_path / "nowhere")]
    assert "docs/datasets.md" in problems[0].fix


def test_missing_folder_is_reported_once_not_per_entry(tree):
    folder = tree.folders[0]
    shutil.rmtree(folder)
    assert kinds(check_dataset(tree.name, tree.root)) == [(ERROR, "missing-folder", folder)]


def test_voc_missing_list(tmp_path):
    t = voc_tree(tmp_path)
    for lst in t.lists:
        lst.unlink()
        problems = check_dataset("voc", t.root)
        assert kinds(problems) == [(ERROR, "missing-list", lst)], lst
        lst.write_text("a\n")


def test_entry_without_image(tree):
    image, _ = second_train(tree)
    image.unlink()
    assert kinds(check_dataset(tree.name, tree.root)) == [(ERROR, "missing-image", image)]


def test_entry_without_mask(tree):
    _, mask = second_train(tree)
    mask.unlink()
    assert kinds(check_dataset(tree.name, tree.root)) == [(ERROR, "missing-mask", mask)]


def test_voc_list_entry_naming_no_file(tmp_path):
    t = voc_tree(tmp_path)
    t.lists[0].write_text("a\nb\nc\nzz\n")
    assert kinds(check_dataset("voc", t.root)) == [
        (ERROR, "missing-image", t.root / "JPEGImages" / "zz.jpg"),
        (ERROR, "missing-mask", t.root / "SegmentationClassAug" / "zz.png"),
    ]


def test_mask_with_unexpected_value(tree):
    _, mask = second_train(tree)
    write_mask(mask, (tree.good[0], tree.bad), palette=tree.name in ("voc", "embedded"))
    problems = check_dataset(tree.name, tree.root)
    assert kinds(problems) == [(ERROR, "unexpected-values", mask)]
    assert f"{tree.bad} (1 px)" in problems[0].what


def test_every_class_id_and_void_are_accepted(tmp_path):
    t = voc_tree(tmp_path)
    write_mask(t.pairs["train", "a"][1], tuple(range(21)) + (255,))
    assert check_dataset("voc", t.root) == []


def test_cityscapes_train_ids_file_is_flagged(tmp_path):
    # a *_labelTrainIds.png renamed to labelIds holds 255, which is no official label id
    t = cityscapes_tree(tmp_path)
    _, mask = second_train(t)
    write_mask(mask, (0, 18, 255))
    problems = check_dataset("cityscapes", t.root)
    assert kinds(problems) == [(ERROR, "unexpected-values", mask)]
    assert "255 (1 px)" in problems[0].what and "18" not in problems[0].what.split(";")[0]
    assert "labelIds" in problems[0].fix


def test_size_mismatch(tree):
    _, mask = second_train(tree)
    write_mask(mask, tree.good, h=H + 1, w=W)
    problems = check_dataset(tree.name, tree.root)
    assert kinds(problems) == [(ERROR, "size-mismatch", mask)]
    assert f"{W}x{H + 1}" in problems[0].what and f"{W}x{H}" in problems[0].what


def test_unreadable_image(tree):
    image, _ = second_train(tree)
    image.write_bytes(b"not an image")
    assert kinds(check_dataset(tree.name, tree.root)) == [(ERROR, "unreadable-image", image)]


def test_truncated_image(tree):
    image, _ = second_train(tree)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        image, format="PNG" if image.suffix == ".png" else "JPEG")
    # (a 64x64 image would also mismatch the mask; rewrite the mask at that size)
    write_mask(tree.pairs[next(k for k, v in tree.pairs.items() if v[0] == image)][1], tree.good, h=64, w=64)
    assert check_dataset(tree.name, tree.root) == []
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    assert kinds(check_dataset(tree.name, tree.root)) == [(ERROR, "unreadable-image", image)]


def test_unreadable_mask(tree):
    _, mask = second_train(tree)
    mask.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert kinds(check_dataset(tree.name, tree.root)) == [(ERROR, "unreadable-mask", mask)]


def test_colour_mask_is_rejected(tree):
    _, mask = second_train(tree)
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(mask)
    problems = check_dataset(tree.name, tree.root)
    assert kinds(problems) == [(ERROR, "bad-mask-mode", mask)] and "'RGB'" in problems[0].what


def test_voc_bad_and_duplicate_list_lines(tmp_path):
    t = voc_tree(tmp_path)
    t.lists[0].write_text("a\nb c d\nc\na\n")
    problems = check_dataset("voc", t.root)
    assert kinds(problems) == [(ERROR, "bad-list-line", t.lists[0]), (WARNING, "duplicate-entry", t.lists[0])]
    assert "line 2" in problems[0].what and "line 4 repeats line 1" in problems[1].what


def test_voc_empty_list(tmp_path):
    t = voc_tree(tmp_path)
    t.lists[1].write_text("\n")
    assert kinds(check_dataset("voc", t.root)) == [(ERROR, "empty-list", t.lists[1])]


def test_voc_mib_style_path_lines(tmp_path):
    t = voc_tree(tmp_path)
    t.lists[0].write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\n/JPEGImages/b.jpg /Other/b.png\n")
    assert kinds(check_dataset("voc", t.root)) == [(ERROR, "missing-folder", t.root / "Other")]


def test_voc_root_given_as_vocdevkit_says_where_to_point(tmp_path):
    t = voc_tree(tmp_path / "VOCdevkit")
    problems = check_dataset("voc", tmp_path / "VOCdevkit")
    assert {p.kind for p in problems} == {"missing-folder", "missing-list"}
    assert all(str(t.root) in p.fix for p in problems)


def test_limit_reads_evenly_spaced_pairs_but_checks_every_entry(tmp_path):
    t = voc_tree(tmp_path)
    write_mask(t.pairs["train", "b"][1], (0, 99))  # the middle of train: skipped by limit=2 (reads a, c)
    write_mask(t.pairs["train", "c"][1], (0, 98))
    t.lists[0].write_text("a\nb\nc\nzz\n")  # existence is checked for every entry anyway
    zz = (t.root / "JPEGImages" / "zz.jpg", t.root / "SegmentationClassAug" / "zz.png")
    problems = check_dataset("voc", t.root, limit=2)
    assert kinds(problems) == [(ERROR, "missing-image", zz[0]), (ERROR, "missing-mask", zz[1]),
                               (ERROR, "unexpected-values", t.pairs["train", "c"][1])]
    result = check("voc", t.root, limit=2)
    assert [(s.split, s.entries, s.read) for s in result.splits] == [("train", 4, 2), ("val", 1, 1)]
    assert len(check_dataset("voc", t.root)) == 4  # without the limit the middle mask is read too


def test_single_threaded_gives_the_same_problems(tmp_path):
    t = voc_tree(tmp_path)
    write_mask(t.pairs["train", "b"][1], (0, 99))
    assert kinds(check_dataset("voc", t.root, workers=1)) == kinds(check_dataset("voc", t.root, workers=4))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        check_dataset("coco", tmp_path)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        check_dataset("voc", tmp_path, limit=0)


# ------------------------------------------------------------------------------ report and CLI
def test_format_report_groups_kinds_and_ends_with_verdict():
    errors = [Problem(ERROR, Path(f"/d/m{i}.png"), f"bad {i}", "fix it", "unexpected-values") for i in range(12)]
    warning = Problem(WARNING, Path("/d/list.txt"), "dup", "remove it", "duplicate-entry")
    text = format_report([warning] + errors, max_per_kind=10)
    lines = text.splitlines()
    assert lines[0] == "ERROR unexpected-values (12):"
    assert "/d/m9.png: bad 9" in text and "/d/m10.png" not in text and "... and 2 more" in text
    assert text.count("fix: fix it") == 1
    assert "WARNING duplicate-entry (1):" in text
    assert lines[-1] == "verdict: FAILED -- 12 error(s), 1 warning(s)"
    assert format_report([warning]).splitlines()[-1] == "verdict: OK with 1 warning(s)"
    assert format_report([]) == "verdict: OK -- no problem found"


def test_run_check_exit_codes_and_output(tmp_path, capsys):
    t = voc_tree(tmp_path)
    assert run_check("voc", t.root, progress=False) == 0
    out = capsys.readouterr().out
    assert "train: 3 entries (official release: 10582), 3 pairs read" in out
    assert out.strip().endswith("verdict: OK -- no problem found")
    (t.root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    assert run_check("voc", t.root, limit=1, progress=False) == 1
    out = capsys.readouterr().out
    assert str(t.root / "ImageSets" / "Segmentation" / "val.txt") in out and "FAILED -- 1 error(s)" in out


def test_saliency_maps_are_checked_when_asked(tiny_benchmark, tmp_path, capsys):
    """``--saliency``: SSUL's maps of every training image, one line each that is missing or of
    another size than its image; without the flag they are not looked at."""
    from ucdseg.cli import main
    from ucdseg.embedded.saliency import ensure_saliency

    root = tmp_path / "embedded"
    shutil.copytree(tiny_benchmark, root)
    ensure_saliency(root)
    ids = (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert main(["--quiet", "data", "check", "--dataset", "embedded", "--root", str(root), "--saliency"]) == 0
    assert "verdict: OK" in capsys.readouterr().out
    (root / "saliency_map" / f"{ids[3]}.png").unlink()
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(root / "saliency_map" / f"{ids[5]}.png")
    assert main(["--quiet", "data", "check", "--dataset", "embedded", "--root", str(root)]) == 0
    capsys.readouterr()
    assert main(["--quiet", "data", "check", "--dataset", "embedded", "--root", str(root), "--saliency"]) == 1
    out = capsys.readouterr().out
    assert "ERROR missing-saliency (1):" in out and f"saliency_map/{ids[3]}.png: saliency map missing" in out
    assert "ERROR bad-saliency (1):" in out and f"{ids[5]}.png" in out and "12x10" in out
    assert "verdict: FAILED -- 2 error(s)" in out
