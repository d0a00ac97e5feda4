"""Methods and datasets from a separate package: entry points and ``imports:`` (issue 14, item 5).

The example extension ``examples/cosine_distillation`` (a distillation term of its own, method
``mib+cos``) is copied to a folder of its own and trained from there by ``ucdseg run`` with
``imports: [ucdseg_cosine]``; entry points are read from a ``.dist-info`` folder, which is what
``pip install`` writes. Everything registered in this process is unregistered afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ucdseg
from ucdseg import plugins
from ucdseg.cli import main
from ucdseg.data import dataset_meta, dataset_names
from ucdseg.methods import LossContext, Method, get_method
from ucdseg.config import load_config
from ucdseg.engine.build import build_task
from ucdseg.registry import DATASETS, METHODS

from conftest import BENCH

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cosine_distillation"

TILES = '''
from ucdseg.data import DatasetMeta, PairedFolders, SegmentationDataset


class TileSegmentation(SegmentationDataset):
    meta = DatasetMeta("tiles", ("background", "red", "green", "blue"),
                       ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))
    layout = PairedFolders(images="{split}", masks="{split}", image_suffix=".jpg", mask_suffix=".png")
'''


@pytest.fixture
def clean_registries():
    """Undo every method, dataset and module user code registers during the test."""
    before = {registry: set(registry) for registry in (METHODS, DATASETS)}
    yield
    for registry, names in before.items():
        for name in set(registry) - names:
            registry.unregister(name)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ucdseg_cosine", "my_tiles")]:
        del sys.modules[name]
    plugins._loaded_entry_points = False


def package_dir(tmp_path: Path, entry_points: str = "") -> Path:
    """The example copied to a folder of its own, plus a dataset module and, optionally, installed metadata."""
    pkg = tmp_path / "my-extension"
    shutil.copytree(EXAMPLE, pkg)
    (pkg / "my_tiles.py").write_text(TILES)
    if entry_points:
        info = pkg / "ucdseg_example-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ucdseg-example\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(entry_points)
    return pkg


def test_cosine_term_of_the_example(tmp_path, monkeypatch, clean_registries):
    monkeypatch.syspath_prepend(str(package_dir(tmp_path)))
    plugins.import_modules(["ucdseg_cosine"])
    method = get_method("mib+cos")
    assert method.default_weights == {"unce": 1.0, "unkd": 10.0, "cos": 0.1}

    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    out = SimpleNamespace(features=new)  # the term reads only the features of the model outputs
    ctx = LossContext(step=1, out=out, old=SimpleNamespace(features=old), labels=None, num_old=3, num_new=1)
    expected = []
    for b in range(2):
        for y in range(3):
            for x in range(5):
                u, v = new[b, :, y, x].numpy(), old[b, :, y, x].numpy()
                expected.append(1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    assert method.terms["cos"].fn(ctx).item() == pytest.approx(np.mean(expected), rel=1e-5)
    same = LossContext(step=1, out=out, old=out, labels=None, num_old=3, num_new=1)
    assert method.terms["cos"].fn(same).item() == pytest.approx(0.0, abs=1e-6)


def test_the_example_is_mib_plus_its_term(tmp_path, monkeypatch, clean_registries):
    """It derives from MiB: MiB's terms (same functions, so the same normalisation over void),
    MiB's step 0 (shared with MiB's runs) and base, so reports pair it with MiB."""
    monkeypatch.syspath_prepend(str(package_dir(tmp_path)))
    plugins.import_modules(["ucdseg_cosine"])
    method, mib = get_method("mib+cos"), get_method("mib")
    assert method.base == "mib" and method.classifier_init == "mib"
    assert {k: t.fn for k, t in method.terms.items() if k != "cos"} == {k: t.fn for k, t in mib.terms.items()}
    assert method.first_step == mib.first_step == "ce"
    # a step 0 that averages over labelled pixels only (ignore_index, mean) is not MiB's: not shared
    other = Method("mib+cos-other", "CE over labelled pixels at step 0", method.terms,
                   {"ce": (lambda c: F.cross_entropy(c.out.logits, c.labels, ignore_index=255), 1.0)})
    assert other.first_step != mib.first_step


def test_entry_points_register_methods_and_datasets(tmp_path, monkeypatch, capsys, clean_registries):
    pkg = package_dir(tmp_path, "[ucdseg.methods]\nmib+cos = ucdseg_cosine:METHOD\n\n"
                                "[ucdseg.datasets]\ntiles = my_tiles:TileSegmentation\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert "tiles" not in dataset_names()
    assert main(["methods"]) == 0  # the command loads the entry points
    assert "mib+cos    MiB + cosine distillation" in capsys.readouterr().out
    assert "tiles" in dataset_names()
    assert dataset_meta("tiles").class_names == ("background", "red", "green", "blue")
    # its classes give the task (the engine reads them from the registered reader)
    assert build_task(load_config(None, ["data.dataset=tiles", "task.name=1-1"])).steps == [[0, 1], [2], [3]]


def test_a_broken_extension_fails_with_one_line(tmp_path, monkeypatch, capsys, clean_registries):
    pkg = package_dir(tmp_path, "[ucdseg.methods]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert main(["methods"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "entry point 'broken' = 'no_such_module_xyz'" in err[0]
    assert "ModuleNotFoundError" in err[0]

    plugins._loaded_entry_points = True  # the broken entry point is not the subject below
    config = tmp_path / "c.yaml"
    config.write_text("imports: [ucdseg_cosin]\n")
    assert main(["--quiet", "run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ucdseg: error: imports: no module named 'ucdseg_cosin': install its package or put its folder "
                   "on PYTHONPATH"]


def test_the_example_trains_from_its_own_package_directory(tiny_benchmark, tmp_path, monkeypatch, capsys,
                                                           clean_registries):
    pkg = package_dir(tmp_path)
    (pkg / "run.yaml").write_text(
        "imports: [ucdseg_cosine]\nname: cos\noutput_dir: runs\ndevice: cpu\n"
        f"data: {{dataset: embedded, root: {tiny_benchmark}, embedded_train: {BENCH['num_train']}, "
        f"embedded_val: {BENCH['num_val']}, embedded_size: {BENCH['image_size']}, crop_size: 64, cache_dir: cache}}\n"
        "task: {name: 8-2}\nmodel: {backbone: resnet18, output_stride: 16}\nmethod: {name: mib+cos}\n"
        "train: {batch_size: 4, iterations: 2, iterations_next: 2, log_every: 1}\n"
        "eval: {batch_size: 16, num_images: 1}\n")
    src = str(Path(ucdseg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(pkg)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ucdseg.cli", "--quiet", "run", "run.yaml"], cwd=pkg, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run_dir = pkg / "runs" / "cos"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mib+cos" and results["weights"] == {"unce": 1.0, "unkd": 10.0, "cos": 0.1}
    assert results["config"]["imports"] == ["ucdseg_cosine"] and len(results["steps"]) == 2
    events = next((run_dir / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
    assert b"step1/cos" in events and b"step1/unkd" in events  # the user's term was computed and logged

    # the run's saved config imports the extension again for `ucdseg eval`
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.chdir(pkg)
    assert main(["--quiet", "eval", str(run_dir / "checkpoints" / "step1.pt")]) == 0
    assert capsys.readouterr().out.startswith("step 1: mIoU")
