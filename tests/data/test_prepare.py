"""``ucdseg data prepare`` from archives with the official internal structure (issue 14, item 2).

The archives are built here, small: the VOC 2012 trainval tar (``VOCdevkit/VOC2012/...`` with
members the layout does not need), SBD's ``benchmark.tgz`` (``benchmark_RELEASE/dataset/cls/*.mat``
MATLAB structs ``GTcls.Segmentation``, ``img/``, ``inst/``, ``train.txt``, ``val.txt``), the
ADEChallengeData2016 zip and the two Cityscapes zips. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ucdseg
from ucdseg.cli import main
from ucdseg.data import build_dataset
from ucdseg.data import prepare as prep
from ucdseg.data.voc import VOCSegmentation

scipy_io = pytest.importorskip("scipy.io")

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000001"]
VOC_VAL = ["2007_000033", "2008_000002"]
SBD_TRAIN = ["2007_000032", "2008_000100", "2008_000101"]
SBD_VAL = ["2007_000033", "2008_000102"]
DETECTION_ONLY = ["2008_000500"]  # in JPEGImages, in no segmentation list
H, W = 24, 32


def png_bytes(array: np.ndarray, palette: bool = False) -> bytes:
    image = Image.fromarray(array.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        colors = np.zeros((256, 3), dtype=np.uint8)
        colors[:21] = VOCSegmentation.meta.palette
        colors[255] = (224, 224, 192)
        image.putpalette(colors.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpg_bytes(seed: int, size=(W, H)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


def mat_bytes(seg: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    scipy_io.savemat(buffer, {"GTcls": {"Segmentation": seg.astype(np.uint8),
                                        "CategoriesPresent": np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8),
                                        "Boundaries": np.zeros((20, 1), dtype=object)}})
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def mask(seed: int, border: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((H, W), dtype=np.uint8)
    m[4:20, 6:26] = rng.integers(1, 21)
    if border:
        m[3, 6:26] = m[20, 6:26] = 255  # VOC draws a void border around objects; SBD does not
    return m


def md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def voc_archives(tmp_path_factory):
    """The two VOC archives and the masks they hold: {id: mask} for VOC and for SBD."""
    folder = tmp_path_factory.mktemp("archives")
    all_ids = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL + DETECTION_ONLY))
    voc_masks = {i: mask(k, border=True) for k, i in enumerate(VOC_TRAIN + VOC_VAL)}
    sbd_masks = {i: mask(100 + k, border=False) for k, i in enumerate(SBD_TRAIN + SBD_VAL)}
    with tarfile.open(folder / "VOCtrainval_11-May-2012.tar", "w") as tar:
        base = "VOCdevkit/VOC2012/"
        for k, i in enumerate(all_ids):
            add(tar, f"{base}JPEGImages/{i}.jpg", jpg_bytes(k))
            add(tar, f"{base}Annotations/{i}.xml", b"<annotation/>")  # not needed: left out
        for i, m in voc_masks.items():
            add(tar, f"{base}SegmentationClass/{i}.png", png_bytes(m, palette=True))
            add(tar, f"{base}SegmentationObject/{i}.png", png_bytes(m, palette=True))
        for name, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", sorted(VOC_TRAIN + VOC_VAL))):
            add(tar, f"{base}ImageSets/Segmentation/{name}.txt", ("\n".join(ids) + "\n").encode())
        add(tar, f"{base}ImageSets/Main/train.txt", b"2008_000500\n")
    with tarfile.open(folder / "benchmark.tgz", "w:gz") as tar:
        base = "benchmark_RELEASE/dataset/"
        for k, (i, m) in enumerate(sbd_masks.items()):
            add(tar, f"{base}cls/{i}.mat", mat_bytes(m))
            add(tar, f"{base}inst/{i}.mat", mat_bytes(m))
            add(tar, f"{base}img/{i}.jpg", jpg_bytes(k))
        add(tar, f"{base}train.txt", ("\n".join(SBD_TRAIN) + "\n").encode())
        add(tar, f"{base}val.txt", ("\n".join(SBD_VAL) + "\n").encode())
    return folder, voc_masks, sbd_masks


def checksum_args(folder: Path) -> list[str]:
    return [arg for name in ("VOCtrainval_11-May-2012.tar", "benchmark.tgz")
            for arg in ("--checksum", f"{name}={md5(folder / name)}")]


def test_prepare_voc_from_the_command_line(voc_archives, tmp_path):
    folder, voc_masks, sbd_masks = voc_archives
    root = tmp_path / "VOC2012"
    src = str(Path(ucdseg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ucdseg.cli", "--quiet", "data", "prepare", "voc", "--root",
                           str(root), "--archives", str(folder), *checksum_args(folder)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: OK" in proc.stdout

    expected_train_aug = sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL))
    assert (root / "ImageSets/Segmentation/train_aug.txt").read_text().split() == expected_train_aug
    aug = root / "SegmentationClassAug"
    voc_only = sorted(set(VOC_TRAIN + VOC_VAL) - set(SBD_TRAIN + SBD_VAL))
    assert sorted(p.stem for p in aug.iterdir()) == sorted(set(sbd_masks) | set(voc_only))
    for i, m in sbd_masks.items():  # SBD's mask wherever SBD has the image (2007_000032 is in both)
        with Image.open(aug / f"{i}.png") as png:
            assert png.mode == "L" and np.array_equal(np.array(png), m), i
    for i in voc_only:
        assert np.array_equal(np.array(Image.open(aug / f"{i}.png")), voc_masks[i]), i
    assert not (root / "Annotations").exists() and not (root / "SegmentationObject").exists()
    assert not (root / prep.STATE_DIR / "sbd").exists()  # the .mat files are removed once converted
    train = build_dataset("voc", root, "train")
    assert len(train) == len(expected_train_aug)
    assert len(build_dataset("voc", root, "val")) == len(VOC_VAL)


def test_an_interrupted_prepare_resumes(voc_archives, tmp_path, monkeypatch):
    folder, _, sbd_masks = voc_archives
    root = tmp_path / "VOC2012"
    checksums = {n: md5(folder / n) for n in ("VOCtrainval_11-May-2012.tar", "benchmark.tgz")}
    real = prep._sbd_mask
    calls = []

    def interrupted(path):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path.stem)
        return real(path)

    monkeypatch.setattr(prep, "_sbd_mask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("voc", root, folder, checksums, progress=False)
    done = sorted(p.stem for p in (root / "SegmentationClassAug").iterdir())
    assert done == sorted(calls) and not (root / "ImageSets/Segmentation/train_aug.txt").exists()

    # again: no checksum computed twice, no archive extracted twice, no mask converted twice
    monkeypatch.setattr(prep.hashlib, "new", lambda *a: pytest.fail("checksum recomputed"))
    monkeypatch.setattr(prep, "_extract", lambda *a: pytest.fail("VOC archive extracted again"))
    again = []
    monkeypatch.setattr(prep, "_sbd_mask", lambda path: again.append(path.stem) or real(path))
    prep.prepare("voc", root, folder, checksums, progress=False)
    assert sorted(again) == sorted(set(sbd_masks) - set(calls))
    assert (root / "ImageSets/Segmentation/train_aug.txt").is_file()


def one_error_line(capsys, *argv: str) -> str:
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ucdseg: error: "), err
    return err[0]


def test_bad_checksum_missing_archive_and_explicit_skip(voc_archives, tmp_path, capsys):
    folder, _, _ = voc_archives
    root = str(tmp_path / "VOC2012")
    line = one_error_line(capsys, "data", "prepare", "voc", "--root", root, "--archives", str(folder))
    assert "VOCtrainval_11-May-2012.tar: md5 checksum" in line and "differs from the expected " \
        "6cd6e144f989b92b3379bac3b3de84fd" in line
    assert not (tmp_path / "VOC2012" / "JPEGImages").exists()  # nothing extracted

    line = one_error_line(capsys, "data", "prepare", "ade", "--root", root, "--archives", str(tmp_path))
    assert "archive not found" in line and "ADEChallengeData2016.zip" in line and "--download" in line
    line = one_error_line(capsys, "data", "prepare", "cityscapes", "--root", root, "--archives", str(tmp_path),
                          "--download")
    assert "needs a cityscapes-dataset.com account" in line

    assert main(["--quiet", "data", "prepare", "voc", "--root", root, "--archives", str(folder),
                 "--skip-checksums"]) == 0
    assert "--skip-checksums: the archives of voc are NOT verified" in capsys.readouterr().out


def test_crafted_archives_are_refused(tmp_path, capsys):
    outside = tmp_path / "evil.txt"
    for kind in ("tar", "zip"):
        archives = tmp_path / f"archives-{kind}"
        archives.mkdir()
        for bad in ("ADEChallengeData2016/images/../../../evil.txt", "/tmp/abs-evil.txt"):
            path = archives / "ADEChallengeData2016.zip"
            if kind == "tar":  # a tar under the zip's name: the archive type is read from its content
                with tarfile.open(path, "w") as tar:
                    add(tar, "ADEChallengeData2016/images/training/ADE_train_00000001.jpg", jpg_bytes(0))
                    add(tar, bad, b"owned")
            else:
                with zipfile.ZipFile(path, "w") as zf:
                    zf.writestr("ADEChallengeData2016/images/training/ADE_train_00000001.jpg", jpg_bytes(0))
                    zf.writestr(zipfile.ZipInfo(bad), b"owned")
            line = one_error_line(capsys, "data", "prepare", "ade", "--root", str(tmp_path / "ade"), "--archives",
                                  str(archives), "--skip-checksums")
            assert "refusing to extract this archive" in line and repr(bad) in line, line
            assert not outside.exists() and not Path("/tmp/abs-evil.txt").exists()
            assert not (tmp_path / "ade" / "images").exists()  # nothing at all was extracted
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("ADEChallengeData2016/images/x.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(prep.UnsafeArchiveError, match="is a link"):
        prep.safe_members(link)


def test_prepare_ade_and_cityscapes(tmp_path, capsys):
    archives = tmp_path / "archives"
    archives.mkdir()
    ade_masks = {}
    with zipfile.ZipFile(archives / "ADEChallengeData2016.zip", "w") as zf:
        zf.writestr("ADEChallengeData2016/objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n")
        zf.writestr("ADEChallengeData2016/sceneCategories.txt", "ADE_train_00000001 airport_terminal\n")
        for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
            for k in (1, 2):
                name = f"{prefix}_{k:08d}"
                m = np.full((H, W), 10 * k + (split == "validation"), dtype=np.uint8)
                ade_masks[name] = m
                zf.writestr(f"ADEChallengeData2016/images/{split}/{name}.jpg", jpg_bytes(k))
                zf.writestr(f"ADEChallengeData2016/annotations/{split}/{name}.png", png_bytes(m))
    with zipfile.ZipFile(archives / "gtFine_trainvaltest.zip", "w") as zf, \
            zipfile.ZipFile(archives / "leftImg8bit_trainvaltest.zip", "w") as zi:
        zf.writestr("README", "The Cityscapes Dataset\n")
        zf.writestr("license.txt", "license\n")
        for split, city in (("train", "aachen"), ("val", "frankfurt"), ("test", "berlin")):
            stem = f"{city}/{city}_000000_000019"
            zf.writestr(f"gtFine/{split}/{stem}_gtFine_labelIds.png", png_bytes(np.full((H, W), 7, np.uint8)))
            zf.writestr(f"gtFine/{split}/{stem}_gtFine_color.png", png_bytes(np.zeros((H, W), np.uint8)))
            zf.writestr(f"gtFine/{split}/{stem}_gtFine_polygons.json", "{}")
            zi.writestr(f"leftImg8bit/{split}/{stem}_leftImg8bit.png", png_bytes(np.zeros((H, W), np.uint8)))
    checks = [f"{n}=sha256:{hashlib.sha256((archives / n).read_bytes()).hexdigest()}"
              for n in ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")]

    ade_root = tmp_path / "ADEChallengeData2016"
    assert main(["--quiet", "data", "prepare", "ade", "--root", str(ade_root), "--archives", str(archives),
                 "--checksum", f"ADEChallengeData2016.zip={md5(archives / 'ADEChallengeData2016.zip')}"]) == 0
    assert "verdict: OK" in capsys.readouterr().out
    for name, m in ade_masks.items():
        split = "training" if "train" in name else "validation"
        assert np.array_equal(np.array(Image.open(ade_root / "annotations" / split / f"{name}.png")), m)
    assert (ade_root / "objectInfo150.txt").is_file()

    cs_root = tmp_path / "cityscapes"
    assert main(["--quiet", "data", "prepare", "cityscapes", "--root", str(cs_root), "--archives", str(archives),
                 *[a for c in checks for a in ("--checksum", c)]]) == 0
    assert "verdict: OK" in capsys.readouterr().out
    assert sorted(p.name for p in cs_root.iterdir() if not p.name.startswith(".")) == ["gtFine", "leftImg8bit"]
    assert len(build_dataset("cityscapes", cs_root, "val")) == 1


def test_an_interrupted_extraction_keeps_the_files_already_written(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    names = [f"ADE_train_{k:08d}" for k in range(1, 7)]
    with zipfile.ZipFile(archives / "ADEChallengeData2016.zip", "w") as zf:
        for k, name in enumerate(names):
            zf.writestr(f"ADEChallengeData2016/images/training/{name}.jpg", jpg_bytes(k))
    root = tmp_path / "ADEChallengeData2016"
    real = prep.shutil.copyfileobj
    written = []

    def interrupted(src, out, *args):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(src.name)
        real(src, out, *args)

    monkeypatch.setattr(prep.shutil, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("ade", root, archives, verify=False, progress=False)
    assert len(list((root / "images" / "training").glob("*.jpg"))) == 4
    assert not list(root.rglob("*.tmp"))  # no partial file left behind
    again = []
    monkeypatch.setattr(prep.shutil, "copyfileobj", lambda src, out, *a: again.append(src.name) or real(src, out, *a))
    prep.prepare("ade", root, archives, verify=False, progress=False)
    assert len(again) == 2 and sorted(p.stem for p in (root / "images" / "training").iterdir()) == names
