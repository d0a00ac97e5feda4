"""The embedded benchmark's backbone pre-training (``model.pretrained=embedded``)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

import ucdseg.engine.build as build
from ucdseg.config import load_config
from ucdseg.engine.process_group import Dist
from ucdseg.models import build_model
from ucdseg.embedded import pretrain
from ucdseg.embedded.pretrain import embedded_backbone_path, pretrain_embedded_backbone


@pytest.fixture
def fmnist(tiny_benchmark):
    return tiny_benchmark.parent / "fashion-mnist"  # conftest's synthetic IDX files


def _tiny(fmnist, **kw):
    return functools.partial(pretrain_embedded_backbone, iterations=2, batch_size=4, fashion_mnist_dir=fmnist,
                             progress=False, **kw)


def test_pretraining_writes_torchvision_weights_that_a_segmentation_backbone_loads(fmnist, tmp_path, one_thread):
    path = _tiny(fmnist)("resnet18", path=tmp_path / "w.pth")
    assert path == tmp_path / "w.pth"
    state = torch.load(path, weights_only=True)
    assert state["fc.weight"].shape == (10, 512)  # torchvision's classification network, 10 classes
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["iterations"] == 2 and meta["backbone"] == "resnet18" and 0 <= meta["train_accuracy_last_20_batches"] <= 1

    model = build_model("resnet18", [5], pretrained=str(path))
    loaded = model.backbone.body.state_dict()
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])
    assert torch.equal(loaded["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    # and it is not what a fresh random initialisation gives
    assert not torch.equal(build_model("resnet18", [5]).backbone.body.state_dict()["conv1.weight"], state["conv1.weight"])


def test_pretraining_is_deterministic_and_reuses_an_existing_file(fmnist, tmp_path, one_thread):
    a = _tiny(fmnist)("resnet18", path=tmp_path / "a.pth")
    b = _tiny(fmnist)("resnet18", path=tmp_path / "b.pth")
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _tiny(fmnist, seed=1)("resnet18", path=tmp_path / "c.pth")
    assert not torch.equal(torch.load(c, weights_only=True)["conv1.weight"], sa["conv1.weight"])

    stamp = a.stat().st_mtime_ns
    assert _tiny(fmnist)("resnet18", path=a) == a and a.stat().st_mtime_ns == stamp  # found, not retrained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.pth", "b.json", "b.pth", "c.json", "c.pth"]


def test_embedded_resnet_pretraining_loads_into_the_embedded_backbone(fmnist, tmp_path, one_thread):
    path = _tiny(fmnist)("embedded_resnet", path=tmp_path / "e.pth")
    state = torch.load(path, weights_only=True)
    assert state["fc.weight"].shape == (10, 128) and state["conv1.weight"].shape == (16, 3, 3, 3)
    for output_stride in (4, 8):
        model = build_model("embedded_resnet", [5], output_stride=output_stride, pretrained=str(path))
        loaded = model.backbone.body.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_default_path_is_in_the_cache_and_names_the_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("UCDSEG_CACHE", str(tmp_path))
    monkeypatch.delenv("UCDSEG_EMBEDDED", raising=False)
    assert embedded_backbone_path("resnet50", 300, 0) == tmp_path / "backbones" / "resnet50-embedded-v2-i300-s0.pth"
    assert embedded_backbone_path("resnet50", 300, 1) != embedded_backbone_path("resnet50", 300, 0)


def test_object_images_put_one_object_on_the_centre_of_a_background():
    objects = np.zeros((2, 28, 28), dtype=np.uint8)
    objects[:, 4:24, 4:24] = 255  # a solid square: every pixel of it is opaque
    rng = np.random.default_rng(0)
    images = pretrain._object_images(rng, objects, np.array([0, 5]), 2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    for img in images:
        centre, corner = img[12:20, 12:20].reshape(-1, 3), img[:2, :2].reshape(-1, 3)
        # the square is one flat tint (full intensity) with the pixel noise only of the background absent
        assert np.ptp(centre, axis=0).max() < 1e-6
        assert np.abs(centre[0] - corner).max() > 0  # differs from the background


def test_bad_arguments_are_clear_errors(fmnist, tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        _tiny(fmnist)("resnet7", path=tmp_path / "x.pth")
    with pytest.raises(ValueError, match="iterations and batch_size must be >= 1"):
        pretrain_embedded_backbone("resnet18", path=tmp_path / "y.pth", iterations=0, fashion_mnist_dir=fmnist)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST IDX files not found"):
        pretrain_embedded_backbone("resnet18", path=tmp_path / "z.pth", fashion_mnist_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_trainer_resolves_model_pretrained_embedded_to_the_cached_file(fmnist, tiny_benchmark, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "pretrain_embedded_backbone", _tiny(fmnist))
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=r", f"data.root={tiny_benchmark}",
                             "model.pretrained=embedded", "data.embedded_train=60", "data.embedded_val=16"])
    path = build.pretrained_weights(cfg, Dist(0, 1, 0, torch.device("cpu")), progress=False)
    assert path == str(embedded_backbone_path("embedded_resnet", 2, 0)) and torch.load(path, weights_only=True)
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=s", f"data.root={tiny_benchmark}",
                             "model.pretrained=/some/file.pth", "data.embedded_train=60", "data.embedded_val=16"])
    assert build.pretrained_weights(cfg, Dist(0, 1, 0, torch.device("cpu")), progress=False) == "/some/file.pth"  # any other value is kept
