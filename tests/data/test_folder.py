"""Your own dataset: the folder dataset (issue 14, item 3).

A small dataset is written here by hand: 4 classes on 64 x 64 images, masks stored three ways
(grayscale ids, palette PNG, RGB painted with the palette). Every method trains a 2-step task on
it (one setting each, rotating), ``ucdseg run`` trains it from the command line and
``ucdseg predict`` names the classes of the YAML; a YAML that disagrees with the masks fails
with one line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucdseg.cli import main
from ucdseg.config import load_config
from ucdseg.data import build_dataset, dataset_meta
from ucdseg.engine import run
from ucdseg.methods import list_methods
from ucdseg.tasks import get_task

NAMES = ["background", "red square", "green bar", "blue dot", "white frame"]
PALETTE = [[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200], [250, 250, 250]]
SIZE = 64


def write_pair(root: Path, image_id: str, rng: np.random.Generator, style: str) -> np.ndarray:
    """One image with one or two coloured shapes and its mask (ids), stored as ``style``."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for cls in rng.choice([1, 2, 3, 4], size=int(rng.integers(1, 3)), replace=False):
        y, x = rng.integers(0, SIZE - 20, size=2)
        mask[y: y + 20, x: x + 20] = cls
    mask[0, :3] = 255  # a few void pixels
    image = np.asarray(PALETTE, dtype=np.uint8)[np.where(mask == 255, 0, mask)]
    image = np.clip(image.astype(int) + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"{image_id}.jpg", quality=95)
    target = root / "masks" / f"{image_id}.png"
    if style == "L":
        Image.fromarray(mask, mode="L").save(target)
    elif style == "P":
        png = Image.fromarray(mask, mode="P")
        colors = np.zeros((256, 3), dtype=np.uint8)  # a full 256-colour palette, as VOC's PNGs have
        colors[: len(PALETTE)] = PALETTE
        png.putpalette(colors.ravel().tolist())
        png.save(target)
    else:  # RGB painted with the palette, void in VOC's void colour
        colors = np.zeros((256, 3), dtype=np.uint8)
        colors[: len(PALETTE)] = PALETTE
        colors[255] = (224, 224, 192)
        Image.fromarray(colors[mask]).save(target)
    return mask


def make_folder(root: Path, n: int = 16, lists: bool = True, palette: bool = True) -> dict[str, np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    styles = ["L", "P", "RGB"] if palette else ["L", "P"]
    masks = {f"img{k:02d}": write_pair(root, f"img{k:02d}", rng, styles[k % len(styles)]) for k in range(n)}
    text = f"classes: {json.dumps(NAMES)}\n"
    if palette:
        text += f"palette: {json.dumps(PALETTE)}\n"
    (root / "classes.yaml").write_text(text)
    if lists:
        ids = sorted(masks)
        (root / "train.txt").write_text("\n".join(ids[: n - 4]) + "\n")
        (root / "val.txt").write_text("\n".join(f"{i}.jpg" for i in ids[n - 4:]) + "\n")  # names work as well
    return masks


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("own") / "shapes"
    return root, make_folder(root)


def test_reader_gives_the_ids_of_every_mask_style(folder):
    root, masks = folder
    train, val = build_dataset("folder", root, "train"), build_dataset("folder", root, "val")
    assert len(train) == 12 and len(val) == 4
    assert [p.stem for p in val._images] == ["img12", "img13", "img14", "img15"]
    for dataset in (train, val):
        for i in range(len(dataset)):
            image_id = dataset.image_path(i).stem
            assert np.array_equal(dataset.load_mask(i), masks[image_id]), image_id
    meta = dataset_meta("folder", root)
    assert list(meta.class_names) == NAMES and [list(c) for c in meta.palette] == PALETTE
    task = get_task("folder", "2-1", num_classes=len(meta.class_names) - 1)  # what build.build_task passes
    assert task.steps == [[0, 1, 2], [3], [4]] and task.num_classes == 5


def test_without_lists_the_split_follows_the_ids_hash(tmp_path):
    root = tmp_path / "nolists"
    masks = make_folder(root, n=20, lists=False, palette=False)
    (root / "classes.yaml").write_text((root / "classes.yaml").read_text() + "val_fraction: 0.3\n")
    expected_val = sorted(i for i in masks if int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) < 0.3 * 2**32)
    val = build_dataset("folder", root, "val")
    train = build_dataset("folder", root, "train")
    assert sorted(p.stem for p in val._images) == expected_val
    assert sorted(p.stem for p in train._images) == sorted(set(masks) - set(expected_val))
    # no palette: the VOC colour map, extended
    assert dataset_meta("folder", root).palette[1] == (128, 0, 0)


@pytest.fixture(scope="module")
def every_method(folder, tmp_path_factory, tiny_engine):
    """Every registered method on task 3-1 (two steps), the three settings in turn."""
    root, _ = folder
    out = tmp_path_factory.mktemp("own-runs")
    settings = ["overlapped", "disjoint", "partitioned"]
    results = {}
    with tiny_engine():
        for k, method in enumerate(m.name for m in list_methods()):
            # a folder without saliency/: SSUL's ADE rule (every background pixel unknown); a small memory
            extra = (["method.options.unknown=background"] if method.startswith("ssul") else []) + (
                ["data.memory.size=2"] if method.endswith("-m") else [])
            cfg = load_config(None, [*extra,
                f"output_dir={out}", f"name={method}", "device=cpu", "data.dataset=folder", f"data.root={root}",
                f"data.cache_dir={out / 'cache'}", f"data.setting={settings[k % 3]}", "data.crop_size=64",
                "task.name=3-1", f"method.name={method}", "train.batch_size=4", "train.iterations=1",
                "train.iterations_next=1", "eval.batch_size=4", "eval.num_images=1"])
            results[method] = run(cfg, progress=False)
    return results


def test_every_method_and_setting_trains_on_a_folder_dataset(every_method):
    assert len(every_method) == len(list_methods())
    for method, results in every_method.items():
        assert results["class_names"] == NAMES
        assert results["task"]["dataset"] == "folder" and results["task"]["steps"] == [[0, 1, 2, 3], [4]]
        last = results["steps"][-1]
        assert list(last["per_class_iou"]) == NAMES, method
        assert last["miou"]["with_background"]["all"] is not None


def test_check_run_and_predict_from_the_command_line(folder, tmp_path, capsys, tiny_model, monkeypatch):
    """``ucdseg data check``, ``run`` and ``predict`` through the command line's entry point, in-process
    (tiny models; ``ucdseg run`` and ``predict`` in subprocesses are tested by test_plugins and test_predict)."""
    root, _ = folder
    assert main(["--quiet", "data", "check", "--dataset", "folder", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "5 classes" in out and "train 12 images, val 4 images" in out and "verdict: OK" in out

    config = tmp_path / "own.yaml"
    config.write_text(f"name: shapes\noutput_dir: {tmp_path / 'runs'}\ndevice: cpu\n"
                      f"data: {{dataset: folder, root: {root}, crop_size: 64, cache_dir: {tmp_path / 'cache'}}}\n"
                      "task: {name: 3-1}\nmodel: {backbone: tiny, output_stride: 16}\nmethod: {name: mib}\n"
                      "train: {batch_size: 4, iterations: 1, iterations_next: 1}\neval: {num_images: 1}\n")
    assert main(["--quiet", "run", str(config)]) == 0
    results = json.loads((tmp_path / "runs" / "shapes" / "results.json").read_text())
    assert results["class_names"] == NAMES and len(results["steps"]) == 2

    # predict needs only the checkpoint: the class names come from the dataset's classes.yaml
    checkpoint = tmp_path / "runs" / "shapes" / "checkpoints" / "step1.pt"
    assert main(["--quiet", "predict", str(checkpoint), str(root / "images" / "img00.jpg"), "--output",
                 str(tmp_path / "pred"), "--no-overlays", "--device", "cpu"]) == 0
    with open(tmp_path / "pred" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["class_name"] == NAMES[int(r["class_id"])] for r in rows)


def one_error_line(capsys, *argv: str) -> str:
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ucdseg: error: "), err
    return err[0]


def test_classes_yaml_that_disagrees_with_the_masks(tmp_path, capsys, tiny_model):
    root = tmp_path / "bad"
    make_folder(root, n=8, palette=False)
    (root / "classes.yaml").write_text("classes: [background, red square, green bar]\n")  # ids 3, 4 unnamed
    assert main(["--quiet", "data", "check", "--dataset", "folder", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "verdict: FAILED" in out and "but " + str(root / "classes.yaml") + " names 3 classes" in out

    overrides = [f"output_dir={tmp_path / 'runs'}", "device=cpu", "data.dataset=folder", f"data.root={root}",
                 f"data.cache_dir={tmp_path / 'cache'}", "task.name=1-1", "train.iterations=1"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    line = one_error_line(capsys, "run", str(cfg), *overrides)
    assert "holds class id(s)" in line and "names 3 classes (ids 0..2, 255 void)" in line

    (root / "classes.yaml").write_text("classes: [background, a, b, c, d]\ncolors: [[0, 0, 0]]\n")
    line = one_error_line(capsys, "run", str(cfg), *overrides)
    assert "classes.yaml: unknown key(s) colors" in line

    (root / "classes.yaml").unlink()
    line = one_error_line(capsys, "run", str(cfg), *overrides)
    assert "class file not found" in line and "classes.yaml" in line


def test_rgb_mask_with_a_colour_outside_the_palette(tmp_path):
    root = tmp_path / "rgb"
    make_folder(root, n=8)
    Image.fromarray(np.full((SIZE, SIZE, 3), 77, dtype=np.uint8)).save(root / "masks" / "img02.png")
    dataset = build_dataset("folder", root, "train")
    i = [p.stem for p in dataset._images].index("img02")
    with pytest.raises(ValueError, match=r"img02.png holds colour\(s\) \(77, 77, 77\) that are not in the palette"):
        dataset.load_mask(i)


@pytest.mark.parametrize("text, message", [
    ("classes: [background, a, a]\n", "'classes' repeats a"),
    ("classes: [background]\n", "'classes' has 1 names: expected 2..255"),
    ("classes: [background, a]\npalette: [[0, 0, 0]]\n", "'palette' has 1 colours for 2 classes"),
    ("classes: [background, a]\npalette: [[0, 0, 0], [0, 0, 300]]\n", "values 0..255"),
    ("classes: [background, a]\nignore_background_in_eval: 1\n", "must be true or false"),
    ("- background\n- a\n", "expected a mapping"),
])
def test_classes_yaml_mistakes_are_named(tmp_path, text, message):
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        dataset_meta("folder", tmp_path)
    assert str(tmp_path / "classes.yaml") in str(info.value) and "\n" not in str(info.value)


def test_background_not_scored_when_the_yaml_says_so(tmp_path):
    (tmp_path / "classes.yaml").write_text("classes: [void, a, b]\nignore_background_in_eval: true\n")
    meta = dataset_meta("folder", tmp_path)
    assert meta.ignore_background_in_eval and meta.class_names == ("void", "a", "b")
