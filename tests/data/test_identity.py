"""The data identity of a run (:mod:`ucdseg.data.identity`) on hand-made file trees."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from ucdseg.data.identity import data_identity, identity_difference, sample_indices, split_identity


class Split:
    def __init__(self, root: Path, names: list[str]):
        self.root, self.names = root, names

    def __len__(self):
        return len(self.names)

    def image_path(self, i):
        return self.root / "img" / f"{self.names[i]}.jpg"

    def mask_path(self, i):
        return self.root / "mask" / f"{self.names[i]}.png"


def tree(root: Path, n: int = 50) -> Split:
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    for i in range(n):
        (root / "img" / f"a{i}.jpg").write_bytes(bytes([i]) * (100 + i))
        (root / "mask" / f"a{i}.png").write_bytes(bytes([i]) * 10)
    return Split(root, [f"a{i}" for i in range(n)])


def test_sample_spreads_over_the_list_with_both_ends():
    assert sample_indices(5, 32) == [0, 1, 2, 3, 4]
    picked = sample_indices(1000, 5)
    assert picked == [0, 250, 500, 749, 999] or picked == [0, 250, 500, 750, 999]
    assert len(sample_indices(10582, 32)) == 32


def test_names_part_is_the_checksum_of_the_relative_mask_paths(tmp_path):
    split = tree(tmp_path / "d", 3)
    expected = hashlib.sha256("mask/a0.png\nmask/a1.png\nmask/a2.png".encode()).hexdigest()
    assert split_identity(split)["files"] == expected  # the identity results files recorded before sizes and content


def test_a_moved_copy_has_the_same_identity(tmp_path):
    split = tree(tmp_path / "d")
    shutil.copytree(tmp_path / "d", tmp_path / "e")  # new modification times, new root
    assert split_identity(Split(tmp_path / "e", split.names)) == split_identity(split)


def test_other_sizes_and_other_sampled_bytes_are_seen(tmp_path):
    split = tree(tmp_path / "d")
    base = data_identity("x", split, split)
    (tmp_path / "d" / "img" / "a10.jpg").write_bytes(b"\1" * 7)  # another size
    changed = data_identity("x", split, split)
    assert "files of other sizes" in identity_difference(base, changed)

    split = tree(tmp_path / "f")
    base = data_identity("x", split, split)
    first = tmp_path / "f" / "img" / "a0.jpg"  # sampled (the first pair): same size, other bytes
    first.write_bytes(b"\7" * first.stat().st_size)
    assert "other content" in identity_difference(base, data_identity("x", split, split))


def test_a_record_without_the_new_parts_compares_what_it_has(tmp_path):
    split = tree(tmp_path / "d")
    now = data_identity("x", split, split)
    old = {"dataset": "x", "train_files": now["train_files"], "val_files": now["val_files"]}
    assert identity_difference(old, now) is None
    assert identity_difference({**old, "train_files": "0" * 64}, now).startswith("the train split has other file names")
    assert identity_difference({"dataset": "y"}, now) == "dataset 'y', now 'x'"


@pytest.mark.parametrize("missing", ["img/a3.jpg", "mask/a3.png"])
def test_a_missing_file_changes_the_sizes(tmp_path, missing):
    split = tree(tmp_path / "d")
    base = split_identity(split)
    (tmp_path / "d" / missing).unlink()
    assert split_identity(split)["sizes"] != base["sizes"]
