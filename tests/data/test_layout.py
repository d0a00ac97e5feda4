"""One declaration per dataset (issue 25, item 3): the layout a dataset class declares is what its
reader reads and what ``ucdseg data check`` checks; change it, and both follow."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg.data import DatasetMeta, PairedFolders, SegmentationDataset, build_dataset, register_dataset
from ucdseg.data.check import ERROR, check, check_dataset
from ucdseg.data.voc import VOCSegmentation
from ucdseg.registry import DATASETS


def write_pair(image: Path, mask: Path, value: int = 1) -> None:
    for path in (image, mask):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 6, 3), 80, np.uint8)).save(image)
    m = np.zeros((4, 6), np.uint8)
    m[1:3, 2:5] = value
    Image.fromarray(m, mode="L").save(mask)


def voc_tree(root: Path, lists: str = "ImageSets/Segmentation") -> Path:
    for key in ("a", "b", "c"):
        write_pair(root / "JPEGImages" / f"{key}.jpg", root / "SegmentationClassAug" / f"{key}.png")
    (root / lists).mkdir(parents=True, exist_ok=True)
    (root / lists / "train_aug.txt").write_text("a\nb\n")
    (root / lists / "val.txt").write_text("c\n")
    return root


def test_a_changed_voc_layout_is_read_and_checked_alike(tmp_path, monkeypatch):
    root = voc_tree(tmp_path / "VOC2012")
    assert [p.name for p in build_dataset("voc", root, "train")._images] == ["a.jpg", "b.jpg"]
    assert check_dataset("voc", root) == []
    # the lists move: one change to the class's layout, and both the reader and the check look there
    moved = dataclasses.replace(VOCSegmentation.layout, lists={"train": "lists/train.txt", "val": "lists/val.txt"})
    monkeypatch.setattr(VOCSegmentation, "layout", moved)
    with pytest.raises(FileNotFoundError, match=str(root / "lists" / "train.txt")):
        build_dataset("voc", root, "train")
    assert sorted((p.kind, p.path) for p in check_dataset("voc", root)) == [
        ("missing-list", root / "lists" / "train.txt"), ("missing-list", root / "lists" / "val.txt")]
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("c\nb\na\n")
    (root / "lists" / "val.txt").write_text("a\n")
    assert [p.name for p in build_dataset("voc", root, "train")._images] == ["c.jpg", "b.jpg", "a.jpg"]
    assert check_dataset("voc", root) == []
    assert [(s.split, s.entries) for s in check("voc", root).splits] == [("train", 3), ("val", 1)]


class Tiles(SegmentationDataset):
    """A dataset of one class declaration: names, palette and layout."""

    meta = DatasetMeta("tiles", ("background", "tile"), ((0, 0, 0), (255, 0, 0)))
    layout = PairedFolders(images="{split}/img", masks="{split}/ann", image_suffix=".jpg", mask_suffix=".png")


@pytest.fixture
def tiles(tmp_path):
    register_dataset("tiles")(Tiles)
    root = tmp_path / "tiles"
    for split, keys in (("train", ("t1", "t2")), ("val", ("v1",))):
        for key in keys:
            write_pair(root / split / "img" / f"{key}.jpg", root / split / "ann" / f"{key}.png")
    yield root
    DATASETS.unregister("tiles")


def test_a_dataset_of_its_own_is_one_class_read_and_checked(tiles, monkeypatch):
    train = build_dataset("tiles", tiles, "train")
    assert train.name == "tiles" and [p.stem for p in train._images] == ["t1", "t2"]
    assert train.load_mask(0).max() == 1
    assert check_dataset("tiles", tiles) == []
    (tiles / "train" / "ann" / "t2.png").unlink()
    missing = tiles / "train" / "ann" / "t2.png"
    with pytest.raises(FileNotFoundError, match=f"^tiles: image t2.jpg has no mask: {missing}; expected layout"):
        build_dataset("tiles", tiles, "train")
    assert [(p.severity, p.kind, p.path) for p in check_dataset("tiles", tiles)] == [
        (ERROR, "missing-mask", tiles / "train" / "ann" / "t2.png")]
    # masks stored as .tif: the layout says so once, the reader and the check agree
    monkeypatch.setattr(Tiles, "layout", dataclasses.replace(Tiles.layout, mask_suffix=".tif"))
    with pytest.raises(ValueError, match=r"no \*\.tif mask in the folder"):
        build_dataset("tiles", tiles, "train")
    assert {p.kind for p in check_dataset("tiles", tiles)} == {"no-masks"}


def test_the_reader_names_its_first_fault_and_counts_the_others(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\nx y z\nb c d e\n")
    shutil.rmtree(root / "SegmentationClassAug")
    with pytest.raises(ValueError) as info:
        build_dataset("voc", root, "train")
    message = str(info.value)
    list_file = root / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert message.startswith(f"voc: line 2 'x y z' is not an image id: {list_file} (2 more problem(s): "
                              f"`ucdseg data check --dataset voc --root {root}` lists them); expected layout: "
                              "root = the VOC2012 folder holding JPEGImages/")
    assert "\n" not in message
    found = sorted((p.kind, p.path.name) for p in check_dataset("voc", root))  # the check lists them all
    assert found == [("bad-list-line", "train_aug.txt"), ("bad-list-line", "train_aug.txt"),
                     ("missing-folder", "SegmentationClass"),  # val's masks (SegmentationClassAug is gone too)
                     ("missing-folder", "SegmentationClassAug")]
