import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from ucdseg.data.index import format_index_report, index_report, scan_presence, step_index
from ucdseg.tasks import get_task


class FakeMasks:
    """Minimal dataset: PNG masks in ``root/masks``; every load_mask call is logged to a file.

    The log (one line ``<pid>``) works across worker processes, so tests can count mask reads.
    """

    def __init__(self, root, names, log, split="train", delay=0.0):
        self.name, self.split, self.root = "embedded", split, root
        self.names, self.log, self.delay = list(names), str(log), delay

    def __len__(self):
        return len(self.names)

    def mask_path(self, i):
        return os.path.join(self.root, "masks", self.names[i] + ".png")

    def load_mask(self, i):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.delay:
            time.sleep(self.delay)
        return np.array(Image.open(self.mask_path(i)))


# per image the classes drawn in its mask (same as tests/test_label_maps.py), task embedded 4-3-3:
# step 0 = {0,1,2,3,4}, step 1 = {5,6,7}, step 2 = {8,9,10}
CLASSES = [[0], [0, 1, 2], [0, 1, 5], [0, 5, 9], [6, 255], [0, 8], [0, 3, 255, 10], [255], [2, 0], [0, 7]]
TASK = get_task("embedded", "4-3-3")


def write_mask(path, ids, size=8, salt=0):
    values = np.resize(np.array(ids, dtype=np.uint8), size * size)
    np.random.default_rng(salt).shuffle(values)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(values.reshape(size, size), mode="L").save(path)


def make_dataset(root, classes=CLASSES, **kw):
    names = [f"img{i:03d}" for i in range(len(classes))]
    for name, ids in zip(names, classes):
        write_mask(os.path.join(root, "masks", name + ".png"), ids)
    return FakeMasks(str(root), names, os.path.join(str(root), "..", f"{os.path.basename(str(root))}.log"), **kw)


def reads(ds):
    if not os.path.exists(ds.log):
        return []
    with open(ds.log) as f:
        return [int(x) for x in f.read().split()]


def clear_log(ds):
    if os.path.exists(ds.log):
        os.remove(ds.log)


def expected_presence(classes):
    return [sorted(set(c) - {255}) for c in classes]


def test_scan_presence_and_cache_reuse(tmp_path):
    ds = make_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    first = scan_presence(ds, workers=0, progress=False, cache_dir=cache)
    assert [p.tolist() for p in first] == expected_presence(CLASSES)
    assert len(reads(ds)) == len(CLASSES)
    clear_log(ds)
    (folder,) = list(cache.iterdir())
    before = [(f.name, f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())]
    second = scan_presence(ds, workers=0, progress=False, cache_dir=cache)
    assert reads(ds) == []  # nothing reread
    assert [(f.name, f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())] == before  # nor rewritten
    assert [p.tolist() for p in second] == expected_presence(CLASSES)

    assert folder.name.startswith("embedded-train-")
    manifest = json.loads((folder / "presence.json").read_text())
    assert manifest["num_images"] == len(CLASSES) and manifest["split"] == "train"
    rel, size, mtime = manifest["files"][3]
    st = os.stat(ds.mask_path(3))
    assert rel == "masks/img003.png" and size == st.st_size and mtime == st.st_mtime_ns
    assert not [p for p in folder.rglob("*.tmp")]  # atomic writes leave no temporaries


def test_rebuild_after_a_mask_changes_is_added_or_removed(tmp_path):
    ds = make_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    scan_presence(ds, workers=0, progress=False, cache_dir=cache)

    clear_log(ds)
    write_mask(ds.mask_path(3), [0, 4, 7], salt=1)
    st = os.stat(ds.mask_path(3))
    os.utime(ds.mask_path(3), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    presence = scan_presence(ds, workers=0, progress=False, cache_dir=cache)
    assert len(reads(ds)) == 1  # only the modified mask is read again
    assert presence[3].tolist() == [0, 4, 7]
    assert [p.tolist() for i, p in enumerate(presence) if i != 3] == \
        [c for i, c in enumerate(expected_presence(CLASSES)) if i != 3]

    clear_log(ds)
    write_mask(os.path.join(ds.root, "masks", "extra.png"), [0, 9])
    ds.names.append("extra")
    presence = scan_presence(ds, workers=0, progress=False, cache_dir=cache)
    assert len(reads(ds)) == 1 and presence[-1].tolist() == [0, 9] and len(presence) == len(CLASSES) + 1

    clear_log(ds)
    del ds.names[0]
    presence = scan_presence(ds, workers=0, progress=False, cache_dir=cache)
    assert reads(ds) == [] and len(presence) == len(CLASSES) and presence[0].tolist() == [0, 1, 2]


def test_workers_read_in_parallel_processes(tmp_path):
    rng = np.random.default_rng(0)
    classes = [sorted(rng.choice(11, size=rng.integers(1, 5), replace=False).tolist()) for _ in range(40)]
    ds = make_dataset(tmp_path / "data", classes, delay=0.01)
    presence = scan_presence(ds, workers=2, progress=False, cache_dir=tmp_path / "cache")
    assert [p.tolist() for p in presence] == expected_presence(classes)
    pids = reads(ds)
    assert len(pids) == 40 and os.getpid() not in pids and len(set(pids)) == 2


def test_missing_mask_is_named(tmp_path):
    ds = make_dataset(tmp_path / "data")
    os.remove(ds.mask_path(2))
    with pytest.raises(FileNotFoundError, match="img002.png"):
        scan_presence(ds, workers=0, progress=False, cache_dir=tmp_path / "cache")


def test_corrupt_mask_is_named(tmp_path):
    ds = make_dataset(tmp_path / "data")
    with open(ds.mask_path(4), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match="img004.png"):
        scan_presence(ds, workers=0, progress=False, cache_dir=tmp_path / "cache")


def sha_of(names):
    return hashlib.sha256("\n".join(sorted(f"masks/{n}.png" for n in names)).encode()).hexdigest()


def test_step_index_selection_checksum_and_manifest(tmp_path):
    ds = make_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    idx = step_index(ds, TASK, "overlapped", 1, cache_dir=cache, progress=False)
    assert idx.indices == [2, 3, 4, 9]  # images with 5, 6 or 7 (by hand)
    assert idx.checksum == sha_of(["img002", "img003", "img004", "img009"])
    m = idx.manifest
    assert (m["dataset"], m["split"], m["task"], m["setting"], m["seed"], m["step"]) == \
        ("embedded", "train", "4-3-3", "overlapped", 0, 1)
    assert m["steps"] == TASK.steps and m["order"] == TASK.order
    assert m["num_images"] == 4 and m["checksum"] == idx.checksum

    disjoint = step_index(ds, TASK, "disjoint", 1, cache_dir=cache, progress=False)
    assert disjoint.indices == [2, 4, 9]  # image 3 also holds the future class 9
    assert disjoint.checksum != idx.checksum
    assert step_index(ds, TASK, "disjoint", 0, cache_dir=cache, progress=False).indices == [1, 8]

    # stable: from the cache, from a fresh cache, and for a copy of the dataset elsewhere
    clear_log(ds)
    assert step_index(ds, TASK, "overlapped", 1, cache_dir=cache, progress=False) == idx
    assert reads(ds) == []
    assert step_index(ds, TASK, "overlapped", 1, cache_dir=tmp_path / "cache2", progress=False).checksum == idx.checksum
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    moved = FakeMasks(str(tmp_path / "moved"), ds.names, tmp_path / "moved.log")
    assert step_index(moved, TASK, "overlapped", 1, cache_dir=cache, progress=False).checksum == idx.checksum


def test_step_index_cache_file_and_rebuilds(tmp_path):
    ds = make_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    step_index(ds, TASK, "overlapped", 2, cache_dir=cache, progress=False)
    (record_path,) = list(cache.glob("*/steps/*.json"))
    record = json.loads(record_path.read_text())
    assert record["indices"] == [3, 5, 6] and record["images"] == ["masks/img003.png", "masks/img005.png",
                                                                   "masks/img006.png"]
    # a different order is another task: its own list
    reversed_task = get_task("embedded", "4-3-3", order=[10, 9, 8, 7, 6, 5, 4, 3, 2, 1])
    assert step_index(ds, reversed_task, "overlapped", 2, cache_dir=cache, progress=False).indices == [1, 2, 6, 8]
    assert len(list(cache.glob("*/steps/*.json"))) == 2
    # a mask change that alters the selection rebuilds the list
    write_mask(ds.mask_path(0), [0, 8], salt=2)
    st = os.stat(ds.mask_path(0))
    os.utime(ds.mask_path(0), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert step_index(ds, TASK, "overlapped", 2, cache_dir=cache, progress=False).indices == [0, 3, 5, 6]


def test_partitioned_steps_are_disjoint_and_seeded(tmp_path):
    ds = make_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    per_step = [step_index(ds, TASK, "partitioned", t, cache_dir=cache, seed=5, progress=False).indices
                for t in range(3)]
    # images with >= 1 foreground class: 1..6, 8, 9 (0 and 7 have none)
    assert sorted(i for s in per_step for i in s) == [1, 2, 3, 4, 5, 6, 8, 9]
    assert 1 in per_step[0] and 8 in per_step[0] and 4 in per_step[1] and 9 in per_step[1] and 5 in per_step[2]


def test_index_report_and_table(tmp_path):
    ds = make_dataset(tmp_path / "data")
    rows = index_report(ds, TASK, "overlapped", cache_dir=tmp_path / "cache", progress=False)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["num_images"] for r in rows] == [4, 4, 3]  # [1,2,6,8], [2,3,4,9], [3,5,6]
    assert rows[0]["classes"] == [0, 1, 2, 3, 4]
    assert rows[2]["checksum"] == sha_of(["img003", "img005", "img006"])
    table = format_index_report(rows).splitlines()
    assert table[0].split() == ["step", "classes", "images", "checksum"]
    assert table[2].split() == ["0", "0-4", "4", rows[0]["checksum"][:16]]
    assert table[4].split() == ["2", "8-10", "3", rows[2]["checksum"][:16]]


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "data")
    monkeypatch.setenv("UCDSEG_CACHE", str(tmp_path / "envcache"))
    step_index(ds, TASK, "overlapped", 0, progress=False)
    assert list((tmp_path / "envcache").glob("embedded-train-*/presence.json"))


def test_step_index_errors(tmp_path):
    ds = make_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="unknown setting 'mixed'"):
        step_index(ds, TASK, "mixed", 0, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="step 3 out of range"):
        step_index(ds, TASK, "overlapped", 3, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="workers must be"):
        scan_presence(ds, workers=-1, progress=False, cache_dir=tmp_path / "cache")
