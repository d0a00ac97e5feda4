"""Shared fixtures: an isolated cache, a tiny embedded benchmark, a tiny model and run configs.

The engine and method tests train for real, so everything here is sized for seconds on 2 CPU
cores: the benchmark (60 train / 16 val scenes of 64 x 64) is generated once per session from
a synthetic Fashion-MNIST IDX set (filled rectangles, written by hand), and run configs
use ``model.backbone=tiny``, a 4-stage, 16-channel backbone registered here through
:func:`ucdseg.models.register_backbone` (same outputs and state-dict layout as the real models).
Runs use one torch thread: on a shared 2-core machine two threads are several times slower.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from ucdseg.config import RunConfig, load_config
from ucdseg.embedded import prepare_embedded
from ucdseg.models import build_model, register_backbone
from ucdseg.models.backbones import Backbone
from ucdseg.models.deeplab import IncrementalDeepLab

#: Parameters of the session's benchmark; run configs must repeat them (``data.embedded_*``).
BENCH = {"num_train": 60, "num_val": 16, "image_size": 64}
STAGES = ("layer1", "layer2", "layer3", "layer4")
TINY = "tiny"  #: the tests' backbone (model.backbone=tiny)


# One torch thread for every run of the suite, module- and session-scoped fixtures' runs included
# (``train.threads=auto`` would follow the machine's load, and two runs a test compares bit for
# bit must not differ by it); a test of the thread choice sets or removes it with monkeypatch.
os.environ["UCDSEG_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Nothing a test runs may read or write ``~/.cache/ucdseg``; runs use one torch thread
    (``UCDSEG_THREADS=1``: ``train.threads=auto`` would follow the machine's load, and two runs a
    test compares bit for bit must not differ by it)."""
    monkeypatch.setenv("UCDSEG_CACHE", str(tmp_path_factory.mktemp("ucdseg-cache")))
    monkeypatch.setenv("UCDSEG_THREADS", "1")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion_mnist(folder: Path) -> Path:
    """Three 28 x 28 objects per class per split: rectangles whose size depends on the class."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for c in range(10):
        for k in range(3):
            img = np.zeros((28, 28), dtype=np.uint8)
            img[2 + c // 2: 26 - k, 3: 25 - c] = 230
            images.append(img)
            labels.append(c)
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(np.stack(images)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array(labels)))
    return folder


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """The embedded benchmark of :data:`BENCH`, generated once (seed 0, as the engine asks)."""
    base = tmp_path_factory.mktemp("embedded-bench")
    fmnist = _write_fashion_mnist(base / "fashion-mnist")
    return prepare_embedded(base / "embedded", seed=0, fashion_mnist_dir=fmnist, progress=False, **BENCH)


@register_backbone(TINY, output_strides=(8, 16))
def tiny_backbone(output_stride: int = 16) -> Backbone:
    """A 4-stage, 16-channel backbone (strides 4, 8, 16, 16 like a ResNet at output stride 16, whatever
    ``output_stride`` says; it only sets the head's ASPP rates):
    same outputs and state-dict layout as the real models, about 13k parameters with its head.
    Registered as ``model.backbone=tiny``; every run config of :func:`base_overrides` uses it."""

    def block(cin: int, cout: int, stride: int, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    net = nn.Sequential(OrderedDict(layer1=block(3, 8, 4), layer2=block(8, 8, 2), layer3=block(8, 16, 2),
                                    layer4=block(16, 16, 1, 2)))
    body = IntermediateLayerGetter(net, return_layers={s: s for s in STAGES})
    return Backbone(TINY, output_stride, body, list(STAGES), [8, 8, 16, 16], key_prefix="", head_channels=16)


def tiny_build_model(backbone: str, classes_per_step: Sequence[int], output_stride: int = 16,
                     pretrained=None, head_channels: int | None = None) -> IncrementalDeepLab:
    """:func:`ucdseg.models.build_model` of the tiny backbone, whatever ``backbone`` says."""
    return build_model(TINY, classes_per_step, output_stride=16, pretrained=pretrained)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: on a shared 2-core machine, two threads are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _tiny_engine() -> Iterator[None]:
    """One torch thread (the runs of :func:`base_overrides` build the tiny backbone)."""
    with _one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_engine() -> Callable[[], ContextManager[None]]:
    """The context manager :func:`_tiny_engine`, for module-scoped fixtures."""
    return _tiny_engine


@pytest.fixture
def tiny_model() -> Iterator[None]:
    """The test's runs use :func:`tiny_build_model` models (and one thread)."""
    with _tiny_engine():
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    with _one_thread():
        yield


def base_overrides(root: Path, out: Path) -> list[str]:
    return [
        f"output_dir={out / 'runs'}", "device=cpu", "seed=0",
        "data.dataset=embedded", f"data.root={root}", f"data.cache_dir={out / 'index-cache'}",
        f"data.embedded_train={BENCH['num_train']}", f"data.embedded_val={BENCH['num_val']}",
        f"data.embedded_size={BENCH['image_size']}", "data.crop_size=64",
        "task.name=8-2", f"model.backbone={TINY}", "model.output_stride=16", "model.pretrained=null",
        "train.batch_size=4", "train.iterations=2", "train.iterations_next=2", "train.log_every=1",
        "method.name=mib+ucd", "eval.batch_size=16", "eval.num_images=1",
    ]


def sigkill_when(args: Sequence[str], env: dict, path: Path, timeout: float = 240) -> None:
    """Run ``python -m ucdseg.cli *args`` and kill it with SIGKILL as soon as ``path`` exists (a
    mid-step checkpoint, written atomically); fails if the run ends first or ``timeout`` passes."""
    proc = subprocess.Popen([sys.executable, "-m", "ucdseg.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not path.exists():
            assert proc.poll() is None, f"the run ended before {path.name} was written: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"no {path.name} after {timeout:g} s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="session")
def config_factory(tiny_benchmark) -> Callable[..., RunConfig]:
    """``config_factory(out, name, *overrides)``: a run config on the tiny benchmark, outputs in ``out``."""

    def make(out: Path, name: str = "run", *overrides: str) -> RunConfig:
        return load_config(None, [*base_overrides(tiny_benchmark, out), f"name={name}", *overrides])

    return make


@pytest.fixture
def make_config(config_factory, tmp_path, one_thread) -> Callable[..., RunConfig]:
    """``make_config(name, *overrides)``: a run config on the tiny benchmark, outputs in ``tmp_path``."""
    return lambda name="run", *overrides: config_factory(tmp_path, name, *overrides)
