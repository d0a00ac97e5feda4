"""Benchmark: the cost of a run's data identity by content (:mod:`ucdseg.data.identity`) on VOC-sized lists.

    python benchmarks/bench_data_identity.py [--quick] [--output benchmarks/results]

A run checks its data's identity when it starts or resumes: a checksum of the file names, of every
image's and mask's size (one ``stat`` each) and of the bytes of a sample of pairs. The benchmark
writes a VOC-shaped tree of files (10,582 training and 1,449 validation pairs, the sizes of
VOC 2012 + SBD: JPEG images of 100 KiB, PNG masks of 2 KiB, random bytes: the identity never
decodes them) and times, for both splits:

* ``names``: the checksum of the list of names (what the identity was before issue 23);
* ``identity``: :func:`~ucdseg.data.identity.data_identity` (names, sizes, sample), warm page cache;
* ``identity_cold``: the same after ``echo 3 > /proc/sys/vm/drop_caches`` (when the kernel allows
  it; else null);
* ``full_checksum``: a sha256 of every byte of every file, the alternative it was chosen over.

Figures go to ``OUTPUT/data_identity.json`` (docs/performance.md quotes them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_average, log, machine_info, median  # noqa: E402

FULL = {"train": 10582, "val": 1449, "image_bytes": 100 * 1024, "mask_bytes": 2 * 1024, "repeats": 3}
QUICK = {"train": 500, "val": 100, "image_bytes": 100 * 1024, "mask_bytes": 2 * 1024, "repeats": 1}


class Split:
    """The part of a dataset the identity reads: a root and two paths per index."""

    def __init__(self, root: Path, names: list[str]):
        self.root, self.names = root, names

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, i: int) -> Path:
        return self.root / "JPEGImages" / f"{self.names[i]}.jpg"

    def mask_path(self, i: int) -> Path:
        return self.root / "SegmentationClass" / f"{self.names[i]}.png"


def write_tree(root: Path, sizes: dict) -> tuple[Split, Split]:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    rng = os.urandom
    splits = []
    for split, n in (("train", sizes["train"]), ("val", sizes["val"])):
        names = [f"{split}_{i:06d}" for i in range(n)]
        for name in names:
            (root / "JPEGImages" / f"{name}.jpg").write_bytes(rng(sizes["image_bytes"]))
            (root / "SegmentationClass" / f"{name}.png").write_bytes(rng(sizes["mask_bytes"]))
        splits.append(Split(root, names))
    return splits[0], splits[1]


def names_only(train: Split, val: Split) -> None:
    for split in (train, val):
        hashlib.sha256("\n".join(os.path.relpath(split.mask_path(i), split.root) for i in range(len(split))).encode())


def full_checksum(train: Split, val: Split) -> None:
    digest = hashlib.sha256()
    for split in (train, val):
        for i in range(len(split)):
            for path in (split.image_path(i), split.mask_path(i)):
                digest.update(path.read_bytes())


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def run(quick: bool = False) -> dict:
    from ucdseg.data.identity import SAMPLE, data_identity

    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        log(f"data identity: writing {sizes['train']} + {sizes['val']} pairs")
        train, val = write_tree(Path(tmp) / "voc", sizes)
        identity = lambda: data_identity("voc", train, val)  # noqa: E731
        result = {
            "sizes": sizes, "sample_pairs_per_split": SAMPLE,
            "names_s": timed(lambda: names_only(train, val), sizes["repeats"]),
            "identity_s": timed(identity, sizes["repeats"]),
            "full_checksum_s": timed(lambda: full_checksum(train, val), sizes["repeats"]),
        }
        cold = []
        for _ in range(sizes["repeats"]):
            if not drop_caches():
                break
            t0 = time.perf_counter()
            identity()
            cold.append(time.perf_counter() - t0)
        result["identity_cold_s"] = median(cold) if cold else None
        if drop_caches():
            t0 = time.perf_counter()
            full_checksum(train, val)
            result["full_checksum_cold_s"] = time.perf_counter() - t0
        else:
            result["full_checksum_cold_s"] = None
    result["identity_over_names"] = result["identity_s"] / result["names_s"]
    result["full_over_identity"] = result["full_checksum_s"] / result["identity_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 pairs instead of VOC's 12,031")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out = {"machine": machine_info(), "load_before": load_average(), "data_identity": run(args.quick),
           "load_after": load_average()}
    path = Path(args.output) / "data_identity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["data_identity"], indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
