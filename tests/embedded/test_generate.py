"""The embedded Fashion-MNIST benchmark generator (on a tiny synthetic IDX set, and on the real files if present)."""

from __future__ import annotations

import colorsys

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg.data import build_dataset
from ucdseg.embedded import generate as E
from ucdseg.embedded import prepare_embedded

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
TRAIN_INTENSITY, TEST_INTENSITY = 255, 60  # tells scenes made from each split apart by brightness


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding written by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_objects(per_class: int, intensity: int) -> tuple[np.ndarray, np.ndarray]:
    """28 x 28 objects: a filled rectangle whose size depends on the class, of the given intensity."""
    images, labels = [], []
    for c in range(10):
        for k in range(per_class):
            img = np.zeros((28, 28), dtype=np.uint8)
            img[3 + c // 2: 25 - k, 4: 24 - c] = intensity
            images.append(img)
            labels.append(c)
    return np.stack(images), np.array(labels, dtype=np.uint8)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fmnist")
    for prefix, intensity, gz in (("train", TRAIN_INTENSITY, True), ("t10k", TEST_INTENSITY, False)):
        images, labels = synthetic_objects(3 if prefix == "train" else 2, intensity)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(idx_bytes(array))
            else:
                (folder / name).write_bytes(idx_bytes(array))
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory, fmnist_dir) -> Path:
    root = tmp_path_factory.mktemp("bench") / "embedded"
    return prepare_embedded(root, num_train=16, num_val=8, image_size=48, seed=3, fashion_mnist_dir=fmnist_dir,
                            progress=False)


def read_all(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- IDX
def test_read_idx_gz_and_raw(tmp_path, fmnist_dir):
    images = E.read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    labels = E.read_idx(fmnist_dir / "t10k-labels-idx1-ubyte")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8 and images.max() == TRAIN_INTENSITY
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="bad-idx.*not an unsigned-byte IDX"):
        E.read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(idx_bytes(np.zeros((4, 2), np.uint8))[:-1])
    with pytest.raises(ValueError, match="short-idx holds 7 bytes.*expected 8"):
        E.read_idx(short)


def test_missing_fashion_mnist_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        prepare_embedded(tmp_path / "out", fashion_mnist_dir=tmp_path, progress=False)
    message = str(err.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message
    assert "dataset-fashion-mnist" in message and "zalandoresearch/fashion-mnist" in message
    assert "UCDSEG_FASHION_MNIST" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written
    monkeypatch.setenv("UCDSEG_FASHION_MNIST", str(tmp_path / "env-dir"))
    with pytest.raises(FileNotFoundError, match="env-dir.*UCDSEG_FASHION_MNIST"):
        E.find_fashion_mnist()


def test_environment_variable_is_used(monkeypatch, fmnist_dir):
    monkeypatch.setenv("UCDSEG_FASHION_MNIST", str(fmnist_dir))
    assert E.find_fashion_mnist() == fmnist_dir
    images, labels = E.load_fashion_mnist("test")
    assert images.shape == (20, 28, 28) and images.max() == TEST_INTENSITY


# ----------------------------------------------------------------------------------- the scenes
def test_scene_masks_values_classes_and_void(fmnist_dir):
    objects, labels = E.load_fashion_mnist("train", fmnist_dir)
    images, masks = E.make_scenes([E.scene_rng(0, 0, i) for i in range(60)], objects, labels, 64)
    assert images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    assert masks.shape == (60, 64, 64) and masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) <= set(range(11)) | {255}
    per_image = [set(np.unique(m).tolist()) - {0, 255} for m in masks]
    assert all(1 <= len(s) <= 3 for s in per_image)  # 1-3 objects, at least one visible
    counts = [sum(c in s for s in per_image) for c in range(1, 11)]
    assert min(counts) >= 5, counts  # every class in plenty of images
    # void everywhere two different labels would touch: no 4-adjacent non-void pair differs
    for m in masks:
        assert (m == 255).any()
        for a, b in ((m[1:], m[:-1]), (m[:, 1:], m[:, :-1])):
            touching = (a != 255) & (b != 255)
            assert np.all(a[touching] == b[touching])
    # and the ring is thin
    assert 0.01 < np.mean(masks == 255) < 0.2


def test_scene_depends_only_on_its_own_generator(fmnist_dir):
    objects, labels = E.load_fashion_mnist("train", fmnist_dir)
    whole = E.make_scenes([E.scene_rng(7, 0, i) for i in range(6)], objects, labels, 32)
    parts = [E.make_scenes([E.scene_rng(7, 0, i) for i in idx], objects, labels, 32) for idx in ([0, 1], [2, 3, 4, 5])]
    for k in range(2):
        np.testing.assert_array_equal(whole[k], np.concatenate([parts[0][k], parts[1][k]]))
    other = E.make_scenes([E.scene_rng(7, 1, 0)], objects, labels, 32)  # another stream differs
    assert not np.array_equal(other[0][0], whole[0][0])


def test_void_ring_on_hand_made_depth():
    labels = np.zeros((6, 6), dtype=np.uint8)
    depth = np.zeros((6, 6), dtype=np.uint8)
    labels[2:4, 2:4], depth[2:4, 2:4] = 5, 1  # a 2 x 2 object
    labels[3, 3:5], depth[3, 3:5] = 7, 2  # a second object on top of it
    expected = np.array([[0, 0, 0, 0, 0, 0],
                         [0, 0, 255, 255, 0, 0],
                         [0, 255, 5, 255, 255, 0],
                         [0, 255, 255, 7, 7, 255],
                         [0, 0, 255, 255, 255, 0],
                         [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(E._void_ring(labels, depth), expected)


def test_objects_are_tinted_around_their_class_hue_and_scaled(fmnist_dir):
    objects, labels = E.load_fashion_mnist("train", fmnist_dir)
    images, masks = E.make_scenes([E.scene_rng(1, 0, i) for i in range(60)], objects, labels, 64)
    areas, hue_offsets = [], []
    for image, mask in zip(images, masks):
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            pixels = image[mask == c].astype(float) / 255
            areas.append(len(pixels))
            # the brightest pixels are the object's colour at full intensity (the tint, plus noise)
            top = pixels[np.argsort(pixels.sum(1))[-max(1, len(pixels) // 4):]].mean(0)
            hue = colorsys.rgb_to_hsv(*top)[0]
            hue_offsets.append((hue - (c - 1) / 10 + 0.5) % 1.0 - 0.5)  # signed distance to the class hue
    assert max(areas) > 3 * min(areas)  # several sizes
    offsets = np.abs(hue_offsets)
    # every class's objects sit within HUE_JITTER of its hue (a little more for the noise and JPEG-free
    # rounding), and the jitter is used: neighbours overlap
    assert np.quantile(offsets, 0.9) <= E.HUE_JITTER + 0.03, np.quantile(offsets, 0.9)
    assert offsets.max() > E.HUE_JITTER / 2


def test_tint_hue_is_the_class_hue_within_the_jitter():
    rng = np.random.default_rng(0)
    for label in range(10):
        for _ in range(50):
            hue, saturation, value = colorsys.rgb_to_hsv(*E._tint(rng, label))
            assert abs((hue - label / 10 + 0.5) % 1.0 - 0.5) <= E.HUE_JITTER + 1e-6
            assert 0.45 - 1e-6 <= saturation <= 1 and 0.7 - 1e-6 <= value <= 1


# --------------------------------------------------------------------------- prepare_embedded
def test_small_benchmark_is_readable(small):
    train = build_dataset("embedded", small, "train")
    val = build_dataset("embedded", small, "val")
    assert len(train) == 16 and len(val) == 8 and train.num_classes == 11
    image, mask = train[0]
    assert image.size == (48, 48) and mask.shape == (48, 48)
    assert (small / "SegmentationClass" / "val_000000.png").is_file()
    with Image.open(small / "SegmentationClassAug" / "train_000000.png") as png:
        assert png.mode == "P"
    info = json.loads((small / E.PARAMS_FILE).read_text())
    assert info["params"] == {"generator_version": E.GENERATOR_VERSION, "num_train": 16, "num_val": 8,
                              "image_size": 48, "seed": 3}
    for ds in (train, val):
        for i in range(len(ds)):
            assert set(np.unique(ds.load_mask(i)).tolist()) <= set(range(11)) | {255}
    assert not [p for p in small.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_train_and_val_come_from_different_splits(small):
    def object_brightness(ds) -> float:
        values = []
        for i in range(len(ds)):
            image, mask = np.asarray(ds.load_image(i)).astype(float), ds.load_mask(i)
            obj = (mask > 0) & (mask < 255)
            values.append(np.median(image[obj].max(axis=1)))
        return float(np.median(values))

    # train objects have intensity 255 -> colour = tint (V >= 0.7): max channel >= ~178;
    # test objects have intensity 60 -> colour = tint * (0.25 + 0.75 * 60/255): max channel <= ~110
    assert object_brightness(build_dataset("embedded", small, "train")) > 160
    assert object_brightness(build_dataset("embedded", small, "val")) < 125


def test_same_seed_same_bytes_other_seed_differs(tmp_path, fmnist_dir, small):
    again = prepare_embedded(tmp_path / "again", num_train=16, num_val=8, image_size=48, seed=3,
                             fashion_mnist_dir=fmnist_dir, progress=False)
    assert read_all(again) == read_all(small)
    other = prepare_embedded(tmp_path / "other", num_train=16, num_val=8, image_size=48, seed=4,
                             fashion_mnist_dir=fmnist_dir, progress=False)
    a, b = read_all(other), read_all(small)
    assert a.keys() == b.keys() and a["JPEGImages/train_000000.jpg"] != b["JPEGImages/train_000000.jpg"]


def test_existing_benchmark_reuse_mismatch_and_overwrite(tmp_path, fmnist_dir, monkeypatch):
    root = tmp_path / "bench"
    kwargs = dict(num_train=4, num_val=2, image_size=32, fashion_mnist_dir=fmnist_dir, progress=False)
    prepare_embedded(root, **kwargs)
    before = read_all(root)

    def boom(*args, **kw):
        raise AssertionError("regenerated")

    monkeypatch.setattr(E, "_generate", boom)
    assert prepare_embedded(root, **kwargs) == root.absolute()  # same parameters: no work
    with pytest.raises(FileExistsError, match=r"num_train=4 \(asked 5\).*choose another folder"):
        prepare_embedded(root, **{**kwargs, "num_train": 5})
    monkeypatch.undo()
    prepare_embedded(root, **{**kwargs, "num_train": 5}, overwrite=True)
    assert len(build_dataset("embedded", root, "train")) == 5
    assert json.loads((root / E.PARAMS_FILE).read_text())["params"]["num_train"] == 5
    # an incomplete benchmark of ours is regenerated
    (root / "JPEGImages" / "val_000001.jpg").unlink()
    prepare_embedded(root, **{**kwargs, "num_train": 5})
    assert (root / "JPEGImages" / "val_000001.jpg").is_file()
    assert read_all(root)["JPEGImages/train_000003.jpg"] == before["JPEGImages/train_000003.jpg"]


def test_an_incomplete_benchmark_holding_a_users_files_is_never_replaced(tmp_path, fmnist_dir):
    """Issue 16: a missing scene makes the copy incomplete, but the folder also holds the user's own
    notes and a sub-folder: nothing is deleted, the error names them."""
    root = tmp_path / "bench"
    kwargs = dict(num_train=4, num_val=2, image_size=32, fashion_mnist_dir=fmnist_dir, progress=False)
    prepare_embedded(root, **kwargs)
    (root / "JPEGImages" / "train_000002.jpg").unlink()
    (root / "notes.md").write_text("my notes")
    (root / "experiments").mkdir()
    (root / "experiments" / "a.txt").write_text("mine")
    before = read_all(root)
    with pytest.raises(FileExistsError) as info:
        prepare_embedded(root, **kwargs)
    assert "experiments" in str(info.value) and "notes.md" in str(info.value) and "nothing was changed" in str(info.value)
    assert read_all(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]  # no temporary folder left behind


def test_an_explicit_data_root_that_does_not_exist_is_an_error_not_a_new_benchmark(tmp_path):
    from ucdseg.config import load_config
    from ucdseg.engine.build import open_dataset

    typo = tmp_path / "embeded"
    cfg = load_config(None, [f"data.root={typo}"])
    with pytest.raises(FileNotFoundError) as info:
        open_dataset(cfg, "train", progress=False)
    assert f"data.root={typo} does not exist" in str(info.value) and "prepare-embedded --root" in str(info.value)
    assert not typo.exists()


def test_refuses_foreign_folder_and_bad_arguments(tmp_path, fmnist_dir):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine.*not empty"):
        prepare_embedded(foreign, num_train=2, num_val=1, fashion_mnist_dir=fmnist_dir, progress=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="num_train must be an int >= 1, got 0"):
        prepare_embedded(tmp_path / "x", num_train=0, fashion_mnist_dir=fmnist_dir)
    with pytest.raises(ValueError, match="image_size must be an int >= 16, got 8"):
        prepare_embedded(tmp_path / "x", image_size=8, fashion_mnist_dir=fmnist_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_embedded(empty, num_train=2, num_val=1, fashion_mnist_dir=fmnist_dir, progress=False)
    assert len(build_dataset("embedded", empty, "val")) == 1


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("UCDSEG_EMBEDDED", str(tmp_path / "e"))
    assert E.default_root() == tmp_path / "e"
    monkeypatch.delenv("UCDSEG_EMBEDDED")
    monkeypatch.setenv("UCDSEG_CACHE", str(tmp_path / "cache"))
    assert E.default_root() == tmp_path / "cache" / "embedded"


# ------------------------------------------------------------------------ the real Fashion-MNIST
@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("UCDSEG_FASHION_MNIST", raising=False)
    images, labels = E.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    root = prepare_embedded(tmp_path / "real", num_train=6, num_val=3, progress=False)
    ds = build_dataset("embedded", root, "train")
    masks = [ds.load_mask(i) for i in range(len(ds))]
    assert all(((m > 0) & (m < 255)).any() for m in masks)
    assert set(np.unique(np.stack(masks)).tolist()) <= set(range(11)) | {255}
