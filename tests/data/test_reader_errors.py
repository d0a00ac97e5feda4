"""Bad dataset files (issue 16): every fault is one :class:`DataFileError` (a ``ValueError``)
naming the file: an image or mask that is truncated, empty or not an image; a mask whose size is
not its image's (naming both); a mask with ids outside the dataset's classes (naming the ids and
the expected range; 255 stays void)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg.data import StepDataset, build_dataset
from ucdseg.data.base import DataFileError, check_mask_ids, read_image, read_mask


def save_image(path: Path, h: int = 8, w: int = 10) -> Path:
    """Noise, so that the compressed file is long enough to be cut anywhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def save_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(path)
    return path


def voc(root: Path, mask: np.ndarray, image_size: tuple[int, int] = (8, 10)) -> Path:
    save_image(root / "JPEGImages" / "a.jpg", *image_size)
    save_mask(root / "SegmentationClassAug" / "a.png", mask)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\n")
    return root


# ------------------------------------------------------------------------- unreadable files
def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda p: _truncate(save_image(p.with_suffix(".jpg"), 64, 64), 300), "Truncated File Read"),
    (lambda p: _truncate(save_image(p.with_suffix(".jpg"), 64, 64), 2000), "image file is truncated"),
    (lambda p: _truncate(save_image(p.with_suffix(".png"), 64, 64), 80), "cannot be read"),
    (lambda p: (p.write_text("hello\n"), p)[1], "not an image file PIL can identify"),
    (lambda p: (p.write_bytes(b""), p)[1], "not an image file PIL can identify"),
    (lambda p: (p.mkdir(), p)[1], "a folder, not a file"),
])
def test_unreadable_image_is_named(tmp_path, make, reason):
    path = make(tmp_path / "broken")
    with pytest.raises(DataFileError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"image {path} cannot be read (") and reason in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_unreadable_mask_is_named_and_a_missing_one_stays_not_found(tmp_path):
    path = _truncate(save_mask(tmp_path / "m.png", np.zeros((64, 64))), 60)
    with pytest.raises(DataFileError, match=f"^mask {path} cannot be read"):
        read_mask(path)
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        read_mask(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        read_image(tmp_path / "missing.jpg")


# ------------------------------------------------------------------------------- class ids
def test_mask_ids_outside_the_classes_are_an_error_not_void(tmp_path):
    mask = np.zeros((8, 10), dtype=np.uint8)
    mask[0, :3] = [20, 255, 255]  # the last VOC class and void: fine
    ds = build_dataset("voc", voc(tmp_path / "ok", mask), "train")
    assert set(np.unique(ds.load_mask(0))) == {0, 20, 255}
    mask[1, :3] = [21, 37, 254]
    root = voc(tmp_path / "bad", mask)
    with pytest.raises(DataFileError) as info:
        build_dataset("voc", root, "train").load_mask(0)
    assert str(info.value) == (f"mask {root / 'SegmentationClassAug' / 'a.png'} holds id(s) 21, 37, 254 outside "
                               "the 21 ids of voc; expected 0..20 (255 void)")


def test_many_bad_ids_are_listed_with_a_count():
    mask = np.arange(100, 120, dtype=np.uint8).reshape(4, 5)
    with pytest.raises(DataFileError, match=r"holds id\(s\) 100, 101, 102, 103, 104, 105, 106, 107 and 12 more "
                                            r"outside the 21 ids of voc"):
        check_mask_ids(mask, Path("m.png"), 21, "voc")
    assert check_mask_ids(np.array([[0, 20, 255]], dtype=np.uint8), Path("m.png"), 21, "voc") is not None


def test_ade_and_cityscapes_ranges(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    save_image(ade / "images" / "training" / "ADE_train_1.jpg")
    save_mask(ade / "annotations" / "training" / "ADE_train_1.png", np.full((8, 10), 150))
    assert build_dataset("ade", ade, "train").load_mask(0).max() == 150
    save_mask(ade / "annotations" / "training" / "ADE_train_1.png", np.full((8, 10), 151))
    with pytest.raises(DataFileError, match=r"ADE_train_1\.png holds id\(s\) 151 outside the 151 ids of ade; "
                                            r"expected 0\.\.150"):
        build_dataset("ade", ade, "train").load_mask(0)

    city = tmp_path / "cityscapes"
    save_image(city / "leftImg8bit" / "train" / "ulm" / "ulm_1_leftImg8bit.png")
    labels = city / "gtFine" / "train" / "ulm" / "ulm_1_gtFine_labelIds.png"
    save_mask(labels, np.array([[33, 255, 7, 0, 0, 0, 0, 0, 0, 0]] * 8))  # bicycle, void, road
    assert sorted(np.unique(build_dataset("cityscapes", city, "train").load_mask(0))) == [0, 1, 19]
    save_mask(labels, np.array([[34] * 10] * 8))
    with pytest.raises(DataFileError, match=r"holds id\(s\) 34 outside the 34 ids of cityscapes; expected 0\.\.33"):
        build_dataset("cityscapes", city, "train").load_mask(0)


# ------------------------------------------------------------------------------ size mismatch
def test_size_mismatch_names_both_files(tmp_path):
    root = voc(tmp_path / "voc", np.zeros((6, 7)), image_size=(8, 10))
    ds = build_dataset("voc", root, "train")
    expected = (f"mask {root / 'SegmentationClassAug' / 'a.png'} is 7x6 but its image "
                f"{root / 'JPEGImages' / 'a.jpg'} is 10x8; expected a mask of the image's size")
    for read in (lambda: ds[0], lambda: ds.check_pair(0),
                 lambda: StepDataset(ds, [0], np.arange(256, dtype=np.uint8))[0]):
        with pytest.raises(DataFileError) as info:
            read()
        assert str(info.value) == expected


def test_check_pair_passes_a_good_pair_and_names_a_broken_image(tmp_path):
    root = voc(tmp_path / "voc", np.zeros((8, 10)))
    ds = build_dataset("voc", root, "train")
    ds.check_pair(0)
    _truncate(root / "JPEGImages" / "a.jpg", 100)
    with pytest.raises(DataFileError, match=f"^image {root / 'JPEGImages' / 'a.jpg'} cannot be read"):
        ds.check_pair(0)


def test_folder_dataset_mask_faults_are_data_file_errors(tmp_path):
    root = tmp_path / "own"
    save_image(root / "images" / "x.jpg")
    save_image(root / "images" / "y.jpg")
    save_image(root / "images" / "z.jpg")
    save_mask(root / "masks" / "z.png", np.zeros((8, 10)))
    save_mask(root / "masks" / "x.png", np.zeros((8, 10)))
    _truncate(save_mask(root / "masks" / "y.png", np.zeros((64, 64))), 60)
    (root / "classes.yaml").write_text("classes: [background, thing]\n")
    (root / "train.txt").write_text("x\ny\n")
    (root / "val.txt").write_text("z\n")
    ds = build_dataset("folder", root, "train")
    assert ds.load_mask(0).shape == (8, 10)
    with pytest.raises(DataFileError, match=f"^mask {root / 'masks' / 'y.png'} cannot be read"):
        ds.load_mask(1)
    save_mask(root / "masks" / "y.png", np.full((8, 10), 2))
    with pytest.raises(DataFileError, match=r"y\.png holds class id\(s\) 2 but .*classes\.yaml names 2 classes"):
        ds.load_mask(1)


def test_an_error_from_a_dataloader_worker_keeps_its_one_line(tmp_path):
    import torch

    root = voc(tmp_path / "voc", np.zeros((8, 10)))
    _truncate(root / "JPEGImages" / "a.jpg", 100)
    ds = StepDataset(build_dataset("voc", root, "train"), [0], np.arange(256, dtype=np.uint8))
    with pytest.raises(DataFileError) as info:
        next(iter(torch.utils.data.DataLoader(ds, num_workers=1)))
    assert str(info.value).startswith(f"image {root / 'JPEGImages' / 'a.jpg'} cannot be read (")
    assert "\n" not in str(info.value)
    assert str(DataFileError("Caught nothing")) == "Caught nothing"  # other messages are kept as they are
