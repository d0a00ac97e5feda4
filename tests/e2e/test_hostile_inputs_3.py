"""Hostile inputs, third pass (issue 23, items 4-6), every case through the command line.

* config keys that lost silently: ``task.order`` with ``task.order_seed``, a ``name=`` that leaves
  ``output_dir``, a changed ``eval.num_images`` on a finished run (refused: config.yaml, results.json
  and the predictions keep agreeing);
* ``ucdseg predict`` on every image mode Pillow opens (each handled one compared with the
  prediction of an 8-bit RGB file derived here by hand, each refused one a single line and no
  output), animated and multi-page files, EXIF orientation, very large images, a folder's other files;
* messages: SIGTERM mid-step (exit 143, "run the same command again", which continues), ``data
  prepare`` through a symbolic link leading outside its root, a checkpoint of another dataset named
  by its own class count, a file that is not a config never quoted, an unusable ``UCDSEG_CACHE``.

The CLI runs in the fork server of :mod:`test_hostile_inputs` (``UCDSEG_TEST_FRESH=1``: fresh
processes); the SIGTERM case runs a real ``python -m ucdseg.cli`` process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_hostile_inputs import (_env, changed, cli, make_voc, results_of, run_args, snapshot,  # noqa: F401
                                 world, write_run)

SECRET = "hunter2-secret-line"  # what a non-config file holds: never in an error


def one_error(result, *expected: str) -> str:
    """The single ``ucdseg: error:`` line of a refused command (exit 2, no traceback), holding ``expected``."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucdseg: error: "), result.stderr
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def refused_and_unchanged(cli, argv, cwd: Path, *expected: str, roots=()) -> str:
    """The command's one error line; no file under ``cwd`` and ``roots`` changed (a run folder's
    ``log.txt`` may only grow: it records the refusal)."""
    logs = {p: p.read_text() for root in (cwd, *roots) for p in root.rglob("log.txt")}
    before = snapshot(cwd, *roots)
    line = one_error(cli(argv, cwd), *expected)
    assert [p for p in changed(before, snapshot(cwd, *roots)) if Path(p) not in logs] == []
    assert all(p.read_text().startswith(text) for p, text in logs.items())
    return line


# ------------------------------------------------------------------------------------------------
# 4. config keys that lose silently
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(world, cli, tmp_path_factory) -> Path:
    """A finished 2-step run of the tiny config (eval.num_images=0): its output_dir."""
    out = tmp_path_factory.mktemp("finished")
    result = cli(run_args(world, out, "name=done"), out)
    assert result.returncode == 0, result.stderr
    return out / "runs"


def test_task_order_and_order_seed_together_are_refused(world, cli, tmp_path):
    line = refused_and_unchanged(cli, run_args(world, tmp_path, "task.order=[2,1,3,4]", "task.order_seed=3"),
                                 tmp_path, "'task.order_seed' is 3 but task.order is set too ([2, 1, 3, 4])",
                                 "expected one of them", roots=(world,))
    assert not (tmp_path / "runs").exists(), line
    # either one alone is a run
    for key in ("task.order=[2,1,3,4]", "task.order_seed=3"):
        result = cli([*run_args(world, tmp_path, key), "--dry-run"], tmp_path)
        assert result.returncode == 0, result.stderr


def test_a_saved_config_with_both_keeps_task_order_and_report_labels_it_so(cli, tmp_path):
    """Runs saved before the refusal trained with task.order (it won): report labels them by it."""
    both = results_of("mib", 0)
    both["config"]["task"].update(order=[2, 1, 3, 4, 5, 6, 7, 8, 9, 10], order_seed=5)
    seeded = results_of("mib", 0)
    seeded["config"]["task"]["order_seed"] = 5
    a, b = write_run(tmp_path / "both", both), write_run(tmp_path / "seeded", seeded)
    result = cli(["report", str(a), str(b), "--output-dir", str(tmp_path / "report")], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if "| mib (" in line]
    assert len(rows) == 2
    assert any("task.order=[2, 1, 3" in row and "task.order_seed=None" in row for row in rows), rows
    assert any("task.order=None" in row and "task.order_seed=5" in row for row in rows), rows


@pytest.mark.parametrize("name", ["/tmp/ucdseg-abs-run", "../../escaped", "a/../../b", ".", "''"])
def test_a_name_that_leaves_output_dir_is_refused(name, world, cli, tmp_path):
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    refused_and_unchanged(cli, run_args(world, work, f"name={name}"), tmp_path, "config key 'name' is",
                          "expected the name of the run folder inside output_dir", roots=(world,))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "er"]
    assert not Path("/tmp/ucdseg-abs-run").exists()


def test_a_name_with_a_sub_folder_stays_inside_output_dir(world, cli, tmp_path):
    result = cli(run_args(world, tmp_path, "name=ablation/lr", "train.steps=0"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "ablation" / "lr" / "checkpoints" / "step0.pt").is_file()


def test_a_changed_eval_num_images_on_a_finished_run_is_refused(finished_run, world, cli, tmp_path):
    out = Path(shutil.copytree(finished_run, tmp_path / "runs"))
    folder = out / "done"
    before = {p: (folder / p).read_bytes() for p in ("config.yaml", "results.json")}
    line = refused_and_unchanged(cli, run_args(world, tmp_path, "name=done", "eval.num_images=2"), tmp_path,
                                 "runs/done was started with a different config (differing keys: eval.num_images)",
                                 "it has eval.num_images=0, this command eval.num_images=2",
                                 "evaluated with the saved eval.num_images", "runs/done/config.yaml")
    assert "\n" not in line
    assert {p: (folder / p).read_bytes() for p in before} == before
    assert not (folder / "predictions").exists()  # nothing drawn with the new value
    assert json.loads(before["results.json"])["config"]["eval"]["num_images"] == 0
    # a key that changes nothing written (eval.batch_size) still continues; config.yaml and
    # results.json keep agreeing on eval.num_images
    result = cli(run_args(world, tmp_path, "name=done", "eval.batch_size=2"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "eval:\n  batch_size: 2\n  num_images: 0\n" in (folder / "config.yaml").read_text()
    assert json.loads((folder / "results.json").read_text())["config"]["eval"]["num_images"] == 0


# ------------------------------------------------------------------------------------------------
# 5. ucdseg predict
# ------------------------------------------------------------------------------------------------
H, W = 96, 128


def base_rgb() -> np.ndarray:
    """A smooth 96 x 128 picture (random colours, bilinearly enlarged): a random ResNet-18 segments
    it into several classes, so equal masks say something."""
    small = np.random.default_rng(1).integers(0, 256, (6, 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((W, H), Image.BILINEAR))


MEAN = np.array([124, 116, 104], dtype=np.uint8)  # ucdseg.predict.MEAN_COLOUR, written out


@pytest.fixture(scope="module")
def predictor(finished_run, tmp_path_factory) -> Path:
    """The finished run's step-1 checkpoint with random ResNet-18 weights (eval mode): predictions
    that vary with the image."""
    from ucdseg.models import build_model

    state = torch.load(finished_run / "done" / "checkpoints" / "step1.pt", weights_only=True)
    torch.manual_seed(0)
    state["model"] = build_model("resnet18", state["classes_per_step"], output_stride=16).state_dict()
    path = tmp_path_factory.mktemp("predictor") / "step1.pt"
    torch.save(state, path)
    return path


def _gray() -> np.ndarray:
    return base_rgb()[..., 0]


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    """A 64-colour palette image of the picture and its RGB, looked up by hand."""
    pal = Image.fromarray(base_rgb()).quantize(64)
    lut = np.array(pal.getpalette()[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    return pal, lut[np.array(pal)]


def _alpha() -> np.ndarray:
    alpha = np.full((H, W), 255, dtype=np.uint8)
    alpha[10:50, 20:90] = 0
    return alpha


def _over_mean(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(alpha[..., None] == 255, rgb, MEAN).astype(np.uint8)


def make_g16(d: Path):
    Image.fromarray(_gray().astype(np.uint16) * 257).save(d / "case.png")  # mode I;16
    return _gray(), "16-bit grey, scaled to 8 bits"


def make_i32(d: Path):
    Image.fromarray(_gray().astype(np.int32) * 257).save(d / "case.tif")  # mode I, values within 16 bits
    return _gray(), "32-bit integer (values within 16 bits) grey, scaled to 8 bits"


def make_cmyk(d: Path):
    rgb = base_rgb()
    cmyk = np.dstack([255 - rgb, np.zeros((H, W), np.uint8)])
    Image.fromarray(cmyk, mode="CMYK").save(d / "case.tif")
    return rgb, "CMYK, converted to RGB without a colour profile"


def make_palette(d: Path):
    pal, rgb = _palette_image()
    pal.save(d / "case.png")
    return rgb, None


def make_palette_transparency(d: Path):
    pal, rgb = _palette_image()
    index = int(np.array(pal)[0, 0])
    pal.save(d / "case.png", transparency=index)
    return _over_mean(rgb, np.where(np.array(pal) == index, 0, 255).astype(np.uint8)), "has transparent pixels"


def make_rgba(d: Path):
    Image.fromarray(np.dstack([base_rgb(), _alpha()]), mode="RGBA").save(d / "case.png")
    return _over_mean(base_rgb(), _alpha()), "has transparent pixels"


def make_rgba_opaque(d: Path):
    Image.fromarray(np.dstack([base_rgb(), np.full((H, W), 255, np.uint8)]), mode="RGBA").save(d / "case.png")
    return base_rgb(), None


def make_la(d: Path):
    Image.fromarray(np.dstack([_gray(), _alpha()]), mode="LA").save(d / "case.png")
    return _over_mean(np.repeat(_gray()[..., None], 3, axis=2), _alpha()), "has transparent pixels"


def make_bilevel(d: Path):
    bits = _gray() > 128
    Image.fromarray(bits).convert("1").save(d / "case.png")
    return np.where(bits, 255, 0).astype(np.uint8), None


def make_gif(d: Path):
    pal, rgb = _palette_image()
    other = Image.fromarray(255 - base_rgb()).quantize(64)
    pal.save(d / "case.gif", save_all=True, append_images=[other], duration=100, loop=0)
    return rgb, "has 2 frames (animated or multi-page), the first is segmented"


def make_tiff_pages(d: Path):
    Image.fromarray(base_rgb()).save(d / "case.tif", save_all=True,
                                     append_images=[Image.fromarray(255 - base_rgb()), Image.fromarray(base_rgb()[::-1])])
    return base_rgb(), "has 3 frames (animated or multi-page), the first is segmented"


def make_exif_rotated(d: Path):
    image = Image.fromarray(base_rgb())
    exif = image.getexif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise
    image.save(d / "case.png", exif=exif)
    return np.ascontiguousarray(np.rot90(base_rgb(), k=-1)), "turned upright as its EXIF orientation (6) says"


HANDLED = [make_g16, make_i32, make_cmyk, make_palette, make_palette_transparency, make_rgba, make_rgba_opaque,
           make_la, make_bilevel, make_gif, make_tiff_pages, make_exif_rotated]


@pytest.mark.parametrize("make", HANDLED, ids=[m.__name__[5:] for m in HANDLED])
def test_predict_handles_the_image_mode_as_its_8_bit_rgb(make, predictor, cli, tmp_path):
    """The mask of the file equals the mask of the RGB image derived from it by hand (an 8-bit
    PNG), one image per forward pass; the choice made is one note line."""
    images = tmp_path / "in"
    images.mkdir()
    expected, note = make(images)
    Image.fromarray(expected).save(images / "reference.png")
    case = next(p for p in images.iterdir() if p.stem == "case")
    result = cli(["--quiet", "predict", str(predictor), str(case), str(images / "reference.png"), "--output",
                  str(tmp_path / "out"), "--batch-size", "1", "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "2 image(s) segmented" in result.stdout
    notes = result.stderr.strip().splitlines()
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(f"ucdseg: note: {case}: ") and note in notes[0], notes
    mask = np.array(Image.open(tmp_path / "out" / "masks" / "case.png"))
    reference = np.array(Image.open(tmp_path / "out" / "masks" / "reference.png"))
    assert mask.shape == expected.shape[:2]
    assert len(np.unique(reference)) >= 2  # a prediction that depends on the image
    assert np.array_equal(mask, reference)


def png_header(width: int, height: int) -> bytes:
    """A PNG file of only a header claiming ``width`` x ``height`` (what Pillow reads on open)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _unit_floats() -> np.ndarray:
    values = _gray().astype(np.float32) / 255
    values[0, :2] = 0.0, 1.0
    return values


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(base_rgb()).save(buffer, format="JPEG")
    return buffer.getvalue()


REFUSED = [
    ("float", lambda d: Image.fromarray(_unit_floats()).save(d / "x.tif"), "x.tif",
     ("holds floating-point pixels (mode F, values 0 to 1)", "expected an 8- or 16-bit image")),
    ("int-beyond-16-bits", lambda d: Image.fromarray(_gray().astype(np.int32) * 1000).save(d / "x.tif"), "x.tif",
     ("holds 32-bit integer pixels from", "(mode I); expected 8- or 16-bit values (0..65535)")),
    ("empty", lambda d: (d / "x.png").write_bytes(b""), "x.png", ("x.png is empty (0 bytes)",)),
    ("truncated-jpeg", lambda d: (d / "x.jpg").write_bytes(_jpeg_bytes()[:600]), "x.jpg",
     ("x.jpg cannot be decoded", "truncated or corrupt")),
    ("text-named-jpg", lambda d: (d / "x.jpg").write_text("not a picture\n"), "x.jpg",
     ("x.jpg is not an image file PIL can read",)),
    ("decompression-bomb", lambda d: (d / "x.png").write_bytes(png_header(20000, 20000)), "x.png",
     ("x.png: Image size (400000000 pixels) exceeds limit", "predict opens images of at most 89478485 pixels")),
    ("above-pillow-limit", lambda d: (d / "x.png").write_bytes(png_header(10000, 10000)), "x.png",
     ("x.png: Image size (100000000 pixels) exceeds limit", "predict opens images of at most 89478485 pixels")),
    ("above-the-model-limit", lambda d: (d / "x.png").write_bytes(png_header(6000, 4000)), "x.png",
     ("x.png is 6000x4000: 24000000 pixels for the model, more than its limit of 16777216 (--max-pixels)",
      "give --size 3344")),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_predict_refuses_what_it_cannot_segment_with_one_line(case, predictor, cli, tmp_path):
    _, make, name, expected = case
    folder = tmp_path / "in"
    folder.mkdir()
    make(folder)
    Image.fromarray(base_rgb()).save(folder / "good.png")  # the good one is not segmented either
    for inputs in ([folder / name], [folder]):  # named, and found in a folder
        refused_and_unchanged(cli, ["--quiet", "predict", str(predictor), *map(str, inputs), "--output",
                                    str(tmp_path / "out"), "--device", "cpu"], tmp_path, str(folder / name), *expected)
        assert not (tmp_path / "out").exists()


def test_predict_size_and_max_pixels_choose_what_fits(predictor, cli, tmp_path):
    Image.fromarray(base_rgb()).save(tmp_path / "pic.png")  # 128 x 96 = 12288 pixels
    argv = ["--quiet", "predict", str(predictor), str(tmp_path / "pic.png"), "--output", str(tmp_path / "out"),
            "--device", "cpu"]
    line = one_error(cli([*argv, "--max-pixels", "5000"], tmp_path), "pic.png is 128x96: 12288 pixels for the model",
                     "more than its limit of 5000 (--max-pixels)")
    fits = int(line.split("give --size ")[1].split()[0])
    assert fits == 61  # 81 x 61 = 4941 <= 5000 < 83 x 62 (the longer side: round(128 * S / 96))
    result = cli([*argv, "--max-pixels", "5000", "--size", str(fits)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out" / "masks" / "pic.png").size == (128, 96)  # back at the image's size
    one_error(cli([*argv, "--max-pixels", "5000", "--size", str(fits + 1)], tmp_path),
              "pic.png is 128x96, 83x62 at --size 62: 5146 pixels")


def test_predict_folder_skips_what_is_not_an_image_by_name_in_one_note(predictor, cli, tmp_path):
    folder = tmp_path / "photos"
    (folder / "raw").mkdir(parents=True)
    Image.fromarray(base_rgb()).save(folder / "a.png")
    Image.fromarray(base_rgb()[::-1]).save(folder / "b.jpg")
    (folder / "notes.txt").write_text(SECRET)
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: not an image
    Image.fromarray(base_rgb()).save(folder / "raw" / "c.png")  # sub-folders are not searched
    result = cli(["--quiet", "predict", str(predictor), str(folder), "--output", str(tmp_path / "out"),
                  "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 image(s) segmented" in result.stdout
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1, notes
    assert notes[0].startswith(f"ucdseg: note: {folder}: 4 entries skipped, not image files by name (")
    for name in (".DS_Store", "._a.png", "notes.txt", "raw/"):
        assert name in notes[0]
    assert SECRET not in notes[0]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "b.png"]


# ------------------------------------------------------------------------------------------------
# 6. messages
# ------------------------------------------------------------------------------------------------
def test_sigterm_mid_step_says_the_same_command_continues_and_it_does(world, cli, tmp_path):
    argv = run_args(world, tmp_path, "name=term", "train.iterations=12", "train.checkpoint_every=3")
    folder = tmp_path / "runs" / "term"
    partial = folder / "checkpoints" / "step0-last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "ucdseg.cli", *argv], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not partial.exists():
            assert proc.poll() is None, f"the run ended before its mid-step checkpoint: {proc.communicate()}"
            assert time.monotonic() < deadline, "no mid-step checkpoint after 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == ["ucdseg: terminated (SIGTERM); run the same command again to continue"]
    # it ended as Ctrl-C does: the folder released, its log closed, the step's checkpoint kept
    assert not (folder / ".ucdseg.lock").exists()
    assert partial.is_file() and not (folder / "checkpoints" / "step0.pt").exists()
    done = torch.load(partial, weights_only=True)["iteration"]
    assert 3 <= done < 12
    assert (folder / "log.txt").read_text().rstrip().endswith("ERROR   run interrupted (SIGTERM)")

    again = cli(argv, tmp_path)  # the same command
    assert again.returncode == 0, again.stderr
    results = json.loads((folder / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [0, 1] and results["steps"][0]["iterations"] == 12
    assert "==== resumed" in (folder / "log.txt").read_text()
    # it continued the step from its checkpoint: the weights of a run never interrupted
    reference = cli(run_args(world, tmp_path, "name=reference", "train.iterations=12"),
                    tmp_path)
    assert reference.returncode == 0, reference.stderr
    for step in (0, 1):
        a = torch.load(folder / "checkpoints" / f"step{step}.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "runs" / "reference" / "checkpoints" / f"step{step}.pt", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


def _voc_archives(archives: Path) -> None:
    archives.mkdir()
    with tarfile.open(archives / "VOCtrainval_11-May-2012.tar", "w") as tar:
        for name, data in (("VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg", _jpeg_bytes()),
                           ("VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", b"2007_000032\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (archives / "benchmark.tgz").write_bytes(b"not read: the first archive is refused")


def test_data_prepare_through_a_link_leading_outside_its_root_is_one_line(cli, tmp_path):
    _voc_archives(tmp_path / "archives")
    root, outside = tmp_path / "VOC2012", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "mine.txt").write_text("keep\n")
    (root / "JPEGImages").symlink_to(outside)
    line = refused_and_unchanged(cli, ["--quiet", "data", "prepare", "voc", "--root", str(root), "--archives",
                                       str(tmp_path / "archives"), "--skip-checksums"], tmp_path,
                                 f"{root / 'JPEGImages'} is a symbolic link to {outside}, outside {root}",
                                 "data prepare writes only inside --root")
    assert "OutsideDestinationError" not in line
    assert sorted(p.name for p in outside.iterdir()) == ["mine.txt"]
    # a link inside the root is no reason to refuse
    (root / "JPEGImages").unlink()
    (root / "store").mkdir()
    (root / "JPEGImages").symlink_to(root / "store")
    result = cli(["--quiet", "data", "prepare", "voc", "--root", str(root), "--archives", str(tmp_path / "archives"),
                  "--skip-checksums"], tmp_path)
    assert (root / "store" / "2007_000032.jpg").is_file(), result.stderr
    assert "symbolic link" not in result.stderr  # it goes on (and fails later, on the fake SBD archive)


def test_a_checkpoint_of_another_dataset_is_named_by_its_own_class_count(finished_run, world, cli, tmp_path):
    step1 = finished_run / "done" / "checkpoints" / "step1.pt"
    voc = make_voc(tmp_path / "voc", 15)
    line = refused_and_unchanged(cli, ["--quiet", "eval", str(step1), "data.dataset=voc", f"data.root={voc}"],
                                 tmp_path, "was trained on folder with 4 classes (square, bar, dot, ...)",
                                 f"(voc at {voc}) has 20 classes (aeroplane, bicycle, bird, ...)")
    assert "voc (4 classes)" not in line
    state = torch.load(step1, weights_only=True)
    state["config"]["data"].update(dataset="voc", root=None)  # a config that belies its classes
    relabelled = tmp_path / "relabelled.pt"
    torch.save(state, relabelled)
    line = refused_and_unchanged(cli, ["--quiet", "predict", str(relabelled), str(world / "shapes" / "images"),
                                       "--output", str(tmp_path / "out")], tmp_path,
                                 "relabelled.pt carries 4 classes (square, bar, dot, frame) and background",
                                 "names the dataset voc, which has 20")
    assert "voc (4 classes)" not in line


NOT_CONFIGS = [
    ("notes.txt", f"{SECRET}\nsecond line\n"),
    ("results.csv", f"step,miou\n0,{SECRET}\n"),
    ("script.py", f"import os\nprint('{SECRET}')\n"),
    ("results.json", json.dumps({"format": 1, SECRET: 1})),
    ("log.txt", f"2026-01-01 INFO    {SECRET}\n2026-01-01 INFO    x: y: z\n"),
    ("notes.yaml", f"{SECRET} in a long line of prose that is no config\nand a second line\n"),
    ("single.yaml", f"{SECRET} {SECRET} {SECRET}\n"),
]


@pytest.mark.parametrize("name,text", NOT_CONFIGS, ids=[n for n, _ in NOT_CONFIGS])
def test_a_file_that_is_not_a_config_is_never_quoted(name, text, world, cli, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    line = refused_and_unchanged(cli, run_args(world, tmp_path, config=path), tmp_path, f"config file {path}")
    assert SECRET not in line and "second line" not in line
    if not name.endswith(".yaml"):
        assert "is not a ucdseg config" in line and "nothing of it is shown" in line


def test_a_config_named_yaml_is_still_quoted_where_it_helps(world, cli, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train: {lr: 0.1}\ntrian: {lr: 0.2}\n")
    refused_and_unchanged(cli, run_args(world, tmp_path, config=path), tmp_path,
                          f"config file {path}: invalid config key 'trian'")


def _cache_file(tmp_path: Path) -> Path:
    (tmp_path / "cache").write_text("a file\n")
    return tmp_path / "cache"


@pytest.mark.parametrize("where,shown", [
    (lambda d: _cache_file(d), "it is a file"),
    (lambda d: _cache_file(d) / "ucdseg", "cache, on its path, is a file"),
    (lambda d: (d / "dangling").symlink_to(d / "nowhere") or d / "dangling", "it is a broken symbolic link"),
], ids=["a-file", "a-file-on-its-path", "a-broken-link"])
def test_an_unusable_ucdseg_cache_says_what_the_variable_is(where, shown, world, cli, tmp_path, monkeypatch):
    cache = where(tmp_path)
    monkeypatch.setenv("UCDSEG_CACHE", str(cache))
    for argv in (run_args(world, tmp_path), ["index", "--dataset", "folder", "--root", str(world / "shapes"),
                                              "--task", "2-2"]):
        refused_and_unchanged(cli, argv, tmp_path, f"UCDSEG_CACHE={cache} (the folder of ucdseg's caches", shown,
                              "expected a folder ucdseg can create and write; point UCDSEG_CACHE at one, or unset it")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_ucdseg_cache_says_so(world, cli, tmp_path, monkeypatch):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    monkeypatch.setenv("UCDSEG_CACHE", str(cache))
    try:
        refused_and_unchanged(cli, run_args(world, tmp_path), tmp_path, f"UCDSEG_CACHE={cache}", "is not writable")
    finally:
        cache.chmod(0o755)
