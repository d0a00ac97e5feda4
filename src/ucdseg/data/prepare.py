"""``ucdseg data prepare voc|ade|cityscapes``: the readers' layouts from the official archives.

From the archives a user has downloaded (:data:`ARCHIVES`, with their official checksums and
URLs), :func:`prepare` builds the folder ``data.root`` points to, then runs ``data check``:

* ``voc``: ``VOCtrainval_11-May-2012.tar`` and SBD's ``benchmark.tgz`` -> the ``VOC2012`` folder
  with ``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation`` and the two things the
  forum threads are about: ``SegmentationClassAug`` (SBD's ``cls/<id>.mat`` masks written as PNGs
  of class ids, plus the VOC 2012 masks of the trainval ids SBD does not have, as in the
  ``SegmentationClassAug.zip`` MiB, PLOP and UCD use) and ``train_aug.txt`` (VOC train + SBD train
  + SBD val, minus VOC val: 10,582 ids);
* ``ade``: ``ADEChallengeData2016.zip`` -> the ``ADEChallengeData2016`` folder;
* ``cityscapes``: ``gtFine_trainvaltest.zip`` and ``leftImg8bit_trainvaltest.zip`` -> a folder
  with ``gtFine/`` and ``leftImg8bit/``.

Safety and resumption:

* every archive's checksum is verified first (``md5``/``sha1``/``sha256`` as its publisher or
  the libraries that mirror it record it); ``checksums={name: "algo:hex"}`` replaces one (e.g. for
  another release), ``verify=False`` skips them, and says so;
* every member of an archive is checked before anything is extracted: absolute names, ``..``
  components and links are refused (the whole archive); tar members are then extracted with
  tarfile's ``data`` filter, zip members are written by us to checked paths;
* each finished stage leaves a marker in ``root/.ucdseg-prepare/`` (checksum verified for this
  size and modification time, archive extracted, masks converted); inside a stage, files already
  extracted (same size) and masks already converted (written atomically) are not redone, so
  running the same command after an interruption continues where it stopped.

``download=True`` fetches the missing archives from :data:`ARCHIVES`'s URLs first (Cityscapes
needs a login: it says so). Nothing is downloaded otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..io import atomic_path, write_bytes

__all__ = ["Archive", "ARCHIVES", "UnsafeArchiveError", "prepare", "verify_archive", "safe_members", "run_prepare"]

STATE_DIR = ".ucdseg-prepare"


@dataclass(frozen=True)
class Archive:
    """An official archive: file name, checksum (``algo:hex``), where to get it and who records the checksum."""

    name: str
    checksum: str
    url: str
    source: str
    login: bool = False  # the URL needs an account (no --download)


#: The archives of each dataset. The checksums are those recorded by the libraries named in
#: ``source`` for the files their URLs serve (we could not re-download them offline).
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "voc": (
        Archive("VOCtrainval_11-May-2012.tar", "md5:6cd6e144f989b92b3379bac3b3de84fd",
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                "torchvision.datasets.VOCSegmentation"),
        Archive("benchmark.tgz", "md5:82b4d87ceb2ed10f6038a1cba92111cb",
                "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                "torchvision.datasets.SBDataset"),
    ),
    "ade": (
        Archive("ADEChallengeData2016.zip", "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
                "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", "GluonCV ade20k script"),
    ),
    "cityscapes": (
        Archive("gtFine_trainvaltest.zip", "sha256:40461a50097844f400fef147ecaf58b18fd99e14e4917fb7c3bf9c0d87d95884",
                "https://www.cityscapes-dataset.com/file-handling/?packageID=1", "torchvision prototype Cityscapes",
                login=True),
        Archive("leftImg8bit_trainvaltest.zip",
                "sha256:3ccff9ac1fa1d80a6a064407e589d747ed0657aac7dc495a4403ae1235a37525",
                "https://www.cityscapes-dataset.com/file-handling/?packageID=3", "torchvision prototype Cityscapes",
                login=True),
    ),
}

VOC_PREFIX = "VOCdevkit/VOC2012/"
VOC_KEEP = ("JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/")
SBD_PREFIX = "benchmark_RELEASE/dataset/"
SBD_KEEP = ("cls/", "train.txt", "val.txt")
ADE_PREFIX = "ADEChallengeData2016/"
ADE_KEEP = ("images/", "annotations/", "objectInfo150.txt", "sceneCategories.txt")


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target folder (or is a link)."""


# ------------------------------------------------------------------------------ small helpers
class _State:
    """Markers of finished stages in ``root/.ucdseg-prepare``."""

    def __init__(self, root: Path):
        self.dir = root / STATE_DIR

    def path(self, name: str) -> Path:
        return self.dir / name

    def get(self, name: str) -> Optional[dict]:
        try:
            return json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None

    def set(self, name: str, value: dict) -> None:
        write_bytes(self.path(name), json.dumps(value).encode())


def _save_png(array: np.ndarray, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------------------------- checksums
def _parse_checksum(text: str, what: str) -> tuple[str, str]:
    algo, _, digest = str(text).partition(":")
    if algo not in ("md5", "sha1", "sha256") or not digest or any(c not in "0123456789abcdef" for c in digest.lower()):
        raise ValueError(f"{what}: checksum {text!r} is not of the form md5:<hex>, sha1:<hex> or sha256:<hex>")
    return algo, digest.lower()


def verify_archive(path: Path, checksum: str, state: Optional[_State] = None, progress: bool = True) -> None:
    """Raise a one-line ValueError unless ``path`` has ``checksum`` (``algo:hex``); remembered per size/mtime."""
    algo, expected = _parse_checksum(checksum, path.name)
    stamp = {**_file_stamp(path), "checksum": f"{algo}:{expected}"}
    marker = f"verified-{path.name}.json"
    if state is not None and state.get(marker) == stamp:
        return
    digest = hashlib.new(algo)
    with open(path, "rb") as f, tqdm(total=stamp["size"], unit="B", unit_scale=True, desc=f"{algo} {path.name}",
                                      disable=not progress) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    if digest.hexdigest() != expected:
        raise ValueError(f"{path}: {algo} checksum {digest.hexdigest()} differs from the expected {expected}: the file "
                         "is incomplete or corrupt; download it again (or give --checksum NAME=ALGO:HEX for another "
                         "release of it)")
    if state is not None:
        state.set(marker, stamp)


# ----------------------------------------------------------------------------- safe extraction
def _check_name(archive: Path, name: str) -> PurePosixPath:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or (posix.parts and posix.parts[0].endswith(":")):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract this archive")
    if ".." in posix.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the target folder (..); refusing to "
                                 "extract this archive")
    return posix


def safe_members(archive: Path) -> list[str]:
    """The member names of a tar or zip archive, after refusing absolute names, ``..`` and links."""
    names: list[str] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_name(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; refusing to "
                                             "extract this archive")
                names.append(info.filename)
        return names
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                _check_name(archive, member.name)
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a link; refusing to extract this "
                                             "archive")
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} is not a file or a folder; refusing "
                                             "to extract this archive")
                names.append(member.name)
    except tarfile.TarError as exc:
        raise ValueError(f"{archive}: not a tar or zip archive ({exc})") from None
    return names


def _check_links(dest: Path, rels: Iterable[str]) -> None:
    """Refuse, before anything is written, to extract through a symbolic link in ``dest`` (a folder or
    file of the layout, e.g. ``JPEGImages``) that leads outside ``dest``: tarfile's ``data`` filter
    refuses such a path mid-extraction, and a zip member would be written through it."""
    real = dest.resolve()
    seen: set[tuple[str, ...]] = set()
    for rel in rels:
        parts = PurePosixPath(rel).parts
        for k in range(1, len(parts) + 1):
            if parts[:k] in seen:
                continue
            seen.add(parts[:k])
            path = dest.joinpath(*parts[:k])
            if not path.is_symlink():
                continue
            target = path.resolve()
            if target != real and real not in target.parents:
                raise ValueError(f"{path} is a symbolic link to {target}, outside {dest}; data prepare writes only "
                                 f"inside --root: remove the link (or move what it points to into {dest}), or give "
                                 "--root the folder the data should be in")


Selector = Callable[[str], Optional[str]]


def _selector(prefix: str, keep: Iterable[str]) -> Selector:
    """Member name -> path relative to the target (``prefix`` removed), or None to leave it out."""
    keep = tuple(keep)

    def select(name: str) -> Optional[str]:
        name = name.replace("\\", "/")
        while name.startswith("./"):  # some tar tools store ./member
            name = name[2:]
        if not name.startswith(prefix):
            return None
        rel = name[len(prefix):]
        return rel if rel and rel.startswith(keep) else None

    return select


def _extract(archive: Path, dest: Path, select: Selector, expect: str, progress: bool, resume: bool = False) -> int:
    """Extract the selected members of ``archive`` into ``dest``; returns the number of files written.

    ``resume``: an extraction of this same archive was interrupted; files already there with the
    member's size are kept.
    """
    names = safe_members(archive)  # refuse the whole archive before writing anything
    chosen = {n: select(n) for n in names}
    chosen = {n: rel for n, rel in chosen.items() if rel is not None}
    if not any(not n.endswith("/") for n in chosen):
        raise ValueError(f"{archive}: no member under {expect}: expected the official archive "
                         f"(its members start with {expect})")
    _check_links(dest, chosen.values())
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    bar = tqdm(total=len(chosen), desc=f"extracting {archive.name}", unit="file", disable=not progress)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = chosen.get(info.filename)
                if rel is None:
                    continue
                target = dest / rel
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                elif resume and target.is_file() and target.stat().st_size == info.file_size:
                    pass  # written (atomically) by an earlier, interrupted prepare
                else:
                    with atomic_path(target) as tmp, open(tmp, "wb") as out, zf.open(info) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    count += 1
                bar.update(1)
    else:
        with tarfile.open(archive) as tar:
            for member in tar:
                rel = chosen.get(member.name)
                if rel is None:
                    continue
                renamed = copy.copy(member)
                renamed.name = rel
                target = dest / rel
                if resume and member.isfile() and target.is_file() and target.stat().st_size == member.size:
                    bar.update(1)  # extracted by an earlier, interrupted prepare
                    continue
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                    try:
                        tar.extract(renamed, dest, filter="data")
                    except tarfile.FilterError as exc:  # what _check_links did not foresee (a link made meanwhile)
                        raise ValueError(f"{archive}: member {member.name!r} refused by tarfile's data filter when "
                                         f"extracting into {dest}: {exc}") from None
                else:  # every member was checked by safe_members above
                    tar.extract(renamed, dest)
                count += member.isfile()
                bar.update(1)
    bar.close()
    return count


def _extract_once(archive: Path, dest: Path, select: Selector, expect: str, state: _State, progress: bool) -> None:
    marker = f"extracted-{archive.name}.json"
    stamp = _file_stamp(archive)
    if state.get(marker) == stamp:
        return
    started = f"extracting-{archive.name}.json"
    resume = state.get(started) == stamp  # an interrupted extraction of this very archive
    state.set(started, stamp)
    _extract(archive, dest, select, expect, progress, resume=resume)
    state.set(marker, stamp)


# ---------------------------------------------------------------------------------- archives
def _archive_paths(dataset: str, archives: Path, checksums: Mapping[str, str], verify: bool, download: bool,
                   state: _State, progress: bool) -> dict[str, Path]:
    specs = ARCHIVES[dataset]
    unknown = sorted(set(checksums) - {a.name for a in specs})
    if unknown:
        raise ValueError(f"--checksum names {', '.join(unknown)}, not an archive of {dataset} "
                         f"({', '.join(a.name for a in specs)})")
    paths = {}
    for spec in specs:
        path = archives / spec.name
        if not path.is_file():
            if download:
                _download(spec, path, progress)
            else:
                how = ("log in at cityscapes-dataset.com and download it from " if spec.login else "download it from ")
                raise FileNotFoundError(f"archive not found: {path}; {how}{spec.url} into {archives}"
                                        + ("" if spec.login else " (or add --download)"))
        paths[spec.name] = path
    for spec in specs:
        if verify:
            verify_archive(paths[spec.name], checksums.get(spec.name, spec.checksum), state, progress)
    return paths


def _download(spec: Archive, path: Path, progress: bool) -> None:
    if spec.login:
        raise FileNotFoundError(f"archive not found: {path}; {spec.name} needs a cityscapes-dataset.com account: log "
                                f"in there, download it from {spec.url} and put it in {path.parent}")
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with urllib.request.urlopen(spec.url) as response, open(part, "wb") as out, \
            tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                 desc=f"downloading {spec.name}", disable=not progress) as bar:
        for block in iter(lambda: response.read(1 << 20), b""):
            out.write(block)
            bar.update(len(block))
    os.replace(part, path)


# --------------------------------------------------------------------------------------- VOC
def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected it from the official archive")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _sbd_mask(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        seg = np.asarray(gt.Segmentation)
    except Exception as exc:  # scipy raises many types for a broken .mat
        raise ValueError(f"{path}: not an SBD class mask (GTcls.Segmentation): {exc}") from None
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or (seg.max() > 20 and seg.max() != 255):
        raise ValueError(f"{path}: GTcls.Segmentation is not a 2-D mask of VOC class ids 0..20")
    return seg.astype(np.uint8)


def _prepare_voc(root: Path, paths: dict[str, Path], state: _State, progress: bool) -> None:
    voc_tar, sbd_tgz = paths["VOCtrainval_11-May-2012.tar"], paths["benchmark.tgz"]
    _extract_once(voc_tar, root, _selector(VOC_PREFIX, VOC_KEEP), VOC_PREFIX, state, progress)
    sbd_dir = state.dir / "sbd"
    if state.get("voc-aug.json") is None:
        _extract_once(sbd_tgz, sbd_dir, _selector(SBD_PREFIX, SBD_KEEP), SBD_PREFIX, state, progress)
    lists = root / "ImageSets" / "Segmentation"
    voc_train, voc_val = _read_ids(lists / "train.txt"), _read_ids(lists / "val.txt")
    voc_trainval = _read_ids(lists / "trainval.txt") if (lists / "trainval.txt").is_file() else voc_train + voc_val
    aug = root / "SegmentationClassAug"
    if state.get("voc-aug.json") is None:
        sbd_ids = sorted(set(_read_ids(sbd_dir / "train.txt")) | set(_read_ids(sbd_dir / "val.txt")))
        voc_only = sorted(set(voc_trainval) - set(sbd_ids))
        todo = [(i, "sbd") for i in sbd_ids] + [(i, "voc") for i in voc_only]
        for image_id, source in tqdm(todo, desc="writing SegmentationClassAug", unit="mask", disable=not progress):
            target = aug / f"{image_id}.png"
            if target.is_file():  # written atomically by an earlier, interrupted prepare
                continue
            if source == "sbd":
                mask = _sbd_mask(sbd_dir / "cls" / f"{image_id}.mat")
            else:
                with Image.open(root / "SegmentationClass" / f"{image_id}.png") as im:
                    mask = np.array(im)
            _save_png(mask, target)
        train_aug = sorted((set(voc_train) | set(sbd_ids)) - set(voc_val))
        write_bytes(lists / "train_aug.txt", ("\n".join(train_aug) + "\n").encode())
        state.set("voc-aug.json", {"masks": len(todo), "train_aug": len(train_aug)})
        shutil.rmtree(sbd_dir, ignore_errors=True)  # the .mat files are no longer needed


# ------------------------------------------------------------------------------------- driver
def prepare(dataset: str, root: str | Path, archives: str | Path, checksums: Optional[Mapping[str, str]] = None,
            verify: bool = True, download: bool = False, progress: bool = True) -> Path:
    """Build ``root`` (the folder ``data.root`` names) for ``dataset`` from the archives in ``archives``."""
    if dataset not in ARCHIVES:
        raise ValueError(f"unknown dataset {dataset!r} for data prepare: expected one of {', '.join(ARCHIVES)}")
    root, archives = Path(root).expanduser(), Path(archives).expanduser()
    if not archives.is_dir() and not download:
        raise FileNotFoundError(f"archive folder not found: {archives}")
    for name, value in (checksums or {}).items():
        _parse_checksum(value, name)
    state = _State(root)
    paths = _archive_paths(dataset, archives, dict(checksums or {}), verify, download, state, progress)
    if dataset == "voc":
        _prepare_voc(root, paths, state, progress)
    elif dataset == "ade":
        _extract_once(paths["ADEChallengeData2016.zip"], root, _selector(ADE_PREFIX, ADE_KEEP), ADE_PREFIX, state,
                      progress)
    else:
        _extract_once(paths["gtFine_trainvaltest.zip"], root, _selector("", ("gtFine/",)), "gtFine/", state, progress)
        _extract_once(paths["leftImg8bit_trainvaltest.zip"], root, _selector("", ("leftImg8bit/",)), "leftImg8bit/",
                      state, progress)
    return root


def run_prepare(dataset: str, root: str | Path, archives: str | Path, checksums: Iterable[str] = (),
                verify: bool = True, download: bool = False, progress: bool = True, limit: Optional[int] = None) -> int:
    """``ucdseg data prepare``: prepare, then ``data check``; the check's exit code."""
    from .check import run_check

    overrides = {}
    for item in checksums:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--checksum {item!r} is not of the form ARCHIVE_NAME=ALGO:HEX")
        overrides[name] = value
    if not verify:
        print(f"ucdseg: warning: --skip-checksums: the archives of {dataset} are NOT verified", flush=True)
    root = prepare(dataset, root, archives, overrides, verify=verify, download=download, progress=progress)
    print(f"{dataset} prepared in {root}; checking it:", flush=True)
    return run_check(dataset, root, limit=limit, progress=progress)
