"""Joint image + mask transforms: shapes, nearest masks, flip consistency, centre crop, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ucdseg.data import eval_transforms, train_transforms

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def denormalize(x: torch.Tensor) -> np.ndarray:
    """float C x H x W normalised -> H x W x C in 0..255."""
    return (x.numpy().transpose(1, 2, 0) * STD + MEAN) * 255


def random_scene(h: int, w: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), rng.choice(
        np.array([0, 4, 9, 255], dtype=np.uint8), (h, w))


def test_train_shapes_dtypes_and_values():
    image, mask = random_scene(50, 70)
    t = train_transforms(32)
    for seed in range(10):
        torch.manual_seed(seed)
        x, y = t(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
        assert y.shape == (32, 32) and y.dtype == torch.int64 and type(y) is torch.Tensor
        assert set(y.unique().tolist()) <= {0, 4, 9, 255}  # only the LUT's values and void
    x, y = train_transforms((24, 40))(image, mask)
    assert x.shape == (3, 24, 40) and y.shape == (24, 40)


def test_train_mask_resampling_is_nearest():
    # two classes 0 and 10 in vertical stripes: any interpolation would create ids between them
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[:, ::2] = 10
    image = Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8))
    t = train_transforms(57)  # upsampling and downsampling happen for different crops
    values = set()
    for seed in range(10):
        torch.manual_seed(seed)
        values |= set(t(image, mask)[1].unique().tolist())
    assert values == {0, 10}


def test_flip_and_crop_keep_image_and_mask_aligned():
    # the image encodes its own mask: red = 40 * class, classes in vertical bands of width 16
    w, h = 96, 64
    classes = (np.arange(w) // 16).astype(np.uint8)  # 0..5 left to right
    mask = np.tile(classes, (h, 1))
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[..., 0] = mask * 40
    t = train_transforms(48)
    orientations = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = t(Image.fromarray(rgb), mask)
        red = denormalize(x)[..., 0]
        y = y.numpy()
        # interior pixels (same class on both sides) must show that class's red value
        inner = np.zeros_like(y, dtype=bool)
        inner[:, 2:-2] = (y[:, 2:-2] == y[:, :-4]) & (y[:, 2:-2] == y[:, 4:])
        assert inner.mean() > 0.3
        assert np.abs(red[inner] - 40 * y[inner]).max() < 3
        row = y[0]
        orientations.add("left-to-right" if row[0] <= row[-1] else "flipped")
    assert orientations == {"left-to-right", "flipped"}  # the flip really happened, to both


def test_train_is_deterministic_given_torch_seed():
    image, mask = random_scene(50, 70, seed=3)
    t = train_transforms(32)
    torch.manual_seed(123)
    a = t(image, mask)
    torch.manual_seed(123)
    b = t(image, mask)
    torch.manual_seed(124)
    c = t(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_train_without_flip_never_flips():
    w, h = 64, 64
    mask = np.tile((np.arange(w) // 8).astype(np.uint8), (h, 1))
    t = train_transforms(32, hflip=False)
    for seed in range(8):
        torch.manual_seed(seed)
        row = t(Image.fromarray(np.zeros((h, w, 3), np.uint8)), mask)[1][0].numpy()
        assert np.all(np.diff(row) >= 0)


def test_eval_centre_crop_on_hand_made_image():
    # 4 x 8 image, pixel value = 10 * column; mask = column. crop 4: no resize, columns 2..5 kept
    cols = np.arange(8, dtype=np.uint8)
    rgb = np.repeat(np.tile(cols * 10, (4, 1))[..., None], 3, axis=2).astype(np.uint8)
    mask = np.tile(cols, (4, 1))
    x, y = eval_transforms(4)(Image.fromarray(rgb), mask)
    assert x.shape == (3, 4, 4) and y.shape == (4, 4)
    assert y.tolist() == [[2, 3, 4, 5]] * 4
    np.testing.assert_allclose(denormalize(x)[..., 1], [[20, 30, 40, 50]] * 4, atol=1e-3)
    # normalisation by hand: (v / 255 - mean) / std
    assert x[0, 0, 0].item() == pytest.approx((20 / 255 - 0.485) / 0.229, abs=1e-5)


def test_eval_resizes_shorter_side_then_crops():
    # 8 x 16 mask in blocks of 2 columns (block id = column // 2): resizing to 4 x 8 keeps one
    # column per block, the centre crop then keeps blocks 2..5
    mask = np.tile((np.arange(16) // 2).astype(np.uint8), (8, 1))
    image = Image.fromarray(np.zeros((8, 16, 3), dtype=np.uint8))
    x, y = eval_transforms(4)(image, mask)
    assert x.shape == (3, 4, 4)
    assert y.tolist() == [[2, 3, 4, 5]] * 4


def test_eval_pads_masks_with_void():
    # 4 x 4 image, crop (4, 8): the shorter side is already 4, two columns of padding each side
    mask = np.full((4, 4), 3, dtype=np.uint8)
    rgb = np.full((4, 4, 3), 200, dtype=np.uint8)
    x, y = eval_transforms((4, 8))(Image.fromarray(rgb), mask)
    assert y.tolist() == [[255, 255, 3, 3, 3, 3, 255, 255]] * 4
    img = denormalize(x)
    np.testing.assert_allclose(img[:, :2], 0, atol=1e-3)  # images are padded with black
    np.testing.assert_allclose(img[:, 2:6], 200, atol=1e-3)


def test_eval_none_keeps_native_size_and_values():
    image, mask = random_scene(13, 17, seed=5)
    x, y = eval_transforms(None)(image, mask)
    assert x.shape == (3, 13, 17)
    np.testing.assert_array_equal(y.numpy(), mask)
    np.testing.assert_allclose(denormalize(x), np.asarray(image, dtype=np.float64), atol=1e-3)


def test_transform_errors():
    image, mask = random_scene(10, 10)
    with pytest.raises(ValueError, match="crop_size.*'a'"):
        train_transforms("a")
    with pytest.raises(ValueError, match="positive"):
        eval_transforms(0)
    with pytest.raises(ValueError, match="scale"):
        train_transforms(8, scale=(2.0, 0.5))
    with pytest.raises(ValueError, match=r"mask size \(9, 10\)"):
        eval_transforms(None)(image, mask[:9])
    with pytest.raises(ValueError, match="uint8"):
        eval_transforms(None)(image, mask.astype(np.int64))
