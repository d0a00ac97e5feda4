"""Tests of ucdseg.models: shapes, dilation, head, classifier init, weight loading and errors."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ucdseg.models import (
    IncrementalDeepLab,
    SegOutput,
    build_backbone,
    build_model,
    load_previous_step,
)
from ucdseg.models.backbones import dilate_resnet_stage

STAGE_CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnet101": [256, 512, 1024, 2048],
    "mobilenet_v3_large": [24, 40, 112, 960],
}
STAGE_STRIDES = {16: [4, 8, 16, 16], 8: [4, 8, 8, 8]}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message.strip()
    return message


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running stats and affine params (eval outputs differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnet101", "mobilenet_v3_large"])
def test_output_shapes(backbone: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, [3, 2], output_stride=output_stride)
    assert model.classes_per_step == [3, 2] and model.num_classes == 5
    assert model.backbone.stage_channels == STAGE_CHANNELS[backbone]
    model.eval()
    height, width = 64, 96  # not square, to catch swapped axes
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert isinstance(out, SegOutput)
    h, w = height // output_stride, width // output_stride
    assert out.logits.shape == (2, 5, height, width)
    assert out.low_logits.shape == (2, 5, h, w)
    assert out.features.shape == (2, 256, h, w)
    assert len(out.stages) == 4
    for stage, channels, stride in zip(out.stages, STAGE_CHANNELS[backbone], STAGE_STRIDES[output_stride]):
        assert stage.shape == (2, channels, height // stride, width // stride)
    assert (out.features >= 0).all()  # the head ends with ReLU


def test_logits_are_bilinear_upsampling_of_low_logits() -> None:
    """Naive align_corners=False bilinear interpolation, written as two interpolation matrices."""
    torch.manual_seed(0)
    model = build_model("resnet18", [2, 1]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 48))

    def interp_matrix(out_size: int, in_size: int) -> np.ndarray:
        m = np.zeros((out_size, in_size))
        scale = in_size / out_size
        for i in range(out_size):
            src = max((i + 0.5) * scale - 0.5, 0.0)
            lo = min(int(math.floor(src)), in_size - 1)
            hi = min(lo + 1, in_size - 1)
            frac = src - lo
            m[i, lo] += 1 - frac
            m[i, hi] += frac
        return m

    low = out.low_logits[0].double().numpy()  # (3, 4, 3)
    rows, cols = interp_matrix(64, low.shape[1]), interp_matrix(48, low.shape[2])
    expected = np.einsum("ij,cjk,lk->cil", rows, low, cols)
    np.testing.assert_allclose(out.logits[0].double().numpy(), expected, atol=1e-5)


def test_classifier_outputs_are_concatenated_in_step_order() -> None:
    model = build_model("resnet18", [3, 1, 2]).eval()
    assert isinstance(model.classifier, nn.ModuleList) and len(model.classifier) == 3
    assert [c.out_channels for c in model.classifier] == [3, 1, 2]
    assert all(c.kernel_size == (1, 1) and c.bias is not None for c in model.classifier)
    with torch.no_grad():
        value = 0.0
        for conv in model.classifier:
            conv.weight.zero_()
            for k in range(conv.out_channels):
                conv.bias[k] = value
                value += 1
        out = model(torch.randn(1, 3, 32, 32))
    for k in range(6):
        assert torch.all(out.low_logits[0, k] == k)


def test_head_structure_and_rates() -> None:
    for output_stride, rates in ((16, (6, 12, 18)), (8, (12, 24, 36))):
        head = build_model("resnet18", [2], output_stride=output_stride).head
        convs = list(head.map_convs)
        assert convs[0].kernel_size == (1, 1)
        assert [c.dilation[0] for c in convs[1:]] == list(rates)
        assert [c.padding[0] for c in convs[1:]] == list(rates)
        assert all(c.kernel_size == (3, 3) and c.in_channels == 512 for c in convs[1:])
        assert head.red_conv.in_channels == 4 * 256 and head.red_conv.out_channels == 256
        assert isinstance(head.red_bn, nn.BatchNorm2d) and head.red_bn.num_features == 256


def test_head_image_pooling_branch_sees_the_whole_image() -> None:
    """A change in one corner of the backbone output reaches the far corner only via pooling."""
    torch.manual_seed(0)
    head = build_model("resnet18", [2]).head.eval()
    x = torch.randn(1, 512, 12, 12)
    y = x.clone()
    y[..., 0, 0] += 5.0
    with torch.no_grad():
        a, b = head(x), head(y)
        # taps of the 3x3 convs at (11, 11): rate 6 -> rows/cols 5, 11, 17; rate 12 -> -1, 11, 23;
        # rate 18 -> -7, 11, 29. None reaches (0, 0): only the image pooling links the corners.
        far = (slice(None), slice(None), 11, 11)
        assert not torch.allclose(a[far], b[far])
        head.pool_red_conv.weight.zero_()
        a, b = head(x), head(y)
        torch.testing.assert_close(a[far], b[far])


# ----------------------------------------------------------------------------- dilation


def conv_geometry(module: nn.Module) -> list[tuple]:
    return [(m.stride, m.dilation, m.padding) for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_dilate_resnet_stage_matches_torchvision_replace_stride_with_dilation() -> None:
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    plain = torchvision.models.resnet50(weights=None)
    dilate_resnet_stage(plain.layer3, 1, 2)
    dilate_resnet_stage(plain.layer4, 2, 4)
    assert conv_geometry(plain) == conv_geometry(reference)
    assert conv_geometry(plain) != conv_geometry(torchvision.models.resnet50(weights=None))


def test_resnet18_dilation_by_hand() -> None:
    body = build_backbone("resnet18", 8, first_block_dilation="previous").body
    # layer3: first block keeps dilation 1 (stride removed), second block dilation 2
    assert body.layer3[0].conv1.stride == (1, 1) and body.layer3[0].conv1.dilation == (1, 1)
    assert body.layer3[0].downsample[0].stride == (1, 1)
    assert body.layer3[1].conv1.dilation == (2, 2) and body.layer3[1].conv2.padding == (2, 2)
    assert body.layer4[0].conv2.dilation == (2, 2) and body.layer4[1].conv1.dilation == (4, 4)
    body16 = build_backbone("resnet18", 16, first_block_dilation="previous").body
    assert body16.layer3[0].conv1.stride == (2, 2) and body16.layer3[1].conv1.dilation == (1, 1)
    assert body16.layer4[0].conv1.stride == (1, 1) and body16.layer4[1].conv2.dilation == (2, 2)
    assert body16.layer4[0].conv1.dilation == (1, 1)
    # the releases' layout (the default): the first block at the stage's dilation too
    body = build_backbone("resnet18", 8).body
    assert body.layer3[0].conv1.stride == (1, 1) and body.layer3[0].conv1.dilation == (2, 2)
    assert body.layer3[0].conv2.padding == (2, 2) and body.layer3[0].downsample[0].stride == (1, 1)
    assert body.layer4[0].conv1.dilation == (4, 4) and body.layer4[0].conv2.dilation == (4, 4)
    body16 = build_backbone("resnet18", 16).body
    assert body16.layer3[0].conv1.stride == (2, 2) and body16.layer3[0].conv1.dilation == (1, 1)
    assert body16.layer4[0].conv1.dilation == (2, 2) and body16.layer4[0].conv2.padding == (2, 2)


# The dilation of every 3x3 conv of layer3 / layer4, block by block, written from the releases'
# models/resnet.py (one dilation per stage, for all its blocks: MiB models/resnet.py:48-51, 100-104)
# and from torchvision's replace_stride_with_dilation (the first block keeps the previous dilation).
BLOCKS = {"resnet18": (2, 2), "resnet50": (6, 3), "resnet101": (23, 3)}  # blocks of layer3, layer4
LAYOUTS = {
    ("release", 16): (lambda b: 1, lambda b: 2),
    ("release", 8): (lambda b: 2, lambda b: 4),
    ("previous", 16): (lambda b: 1, lambda b: 1 if b == 0 else 2),
    ("previous", 8): (lambda b: 1 if b == 0 else 2, lambda b: 2 if b == 0 else 4),
}


def three_by_three(block: nn.Module) -> list[nn.Conv2d]:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("layout", ["release", "previous"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnet101"])
def test_first_block_dilation_layouts(backbone: str, layout: str, output_stride: int) -> None:
    with torch.device("meta"):  # the geometry only: no weight is allocated
        body = build_backbone(backbone, output_stride, first_block_dilation=layout).body
    for stage, count, rate_of in zip((body.layer3, body.layer4), BLOCKS[backbone], LAYOUTS[layout, output_stride]):
        assert len(stage) == count
        for index, block in enumerate(stage):
            for conv in three_by_three(block):
                assert conv.dilation == conv.padding == (rate_of(index),) * 2, (backbone, index)
    # the first block of layer4 (conv2: the 3x3 of a Bottleneck, the second 3x3 of a BasicBlock)
    first = body.layer4[0].conv2
    expected = {("release", 16): 2, ("previous", 16): 1, ("release", 8): 4, ("previous", 8): 2}[layout, output_stride]
    assert first.dilation == first.padding == (expected, expected) and first.stride == (1, 1)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_previous_layout_is_torchvision_replace_stride_with_dilation(backbone: str) -> None:
    for output_stride, dilate in ((16, [False, False, True]), (8, [False, True, True])):
        with torch.device("meta"):
            ours = build_backbone(backbone, output_stride, first_block_dilation="previous").body
            reference = getattr(torchvision.models, backbone)(weights=None, replace_stride_with_dilation=dilate)
            release = build_backbone(backbone, output_stride).body
        assert conv_geometry(ours) == conv_geometry(reference)
        assert conv_geometry(release) != conv_geometry(reference)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_layouts_differ_in_layer4_only_and_share_weights(backbone: str, tmp_path) -> None:
    models = {}
    for layout in ("release", "previous"):
        torch.manual_seed(0)
        models[layout] = build_model(backbone, [3], output_stride=16, first_block_dilation=layout).eval()
        randomize_bn(models[layout], seed=1)
    release, previous = models["release"].state_dict(), models["previous"].state_dict()
    # same keys, shapes and (seeded) values: the layout is in the convs' dilation, not in parameters
    assert list(release) == list(previous)
    assert all(release[k].shape == previous[k].shape and torch.equal(release[k], previous[k]) for k in release)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out_r, out_p = models["release"](x), models["previous"](x)
    for stage in range(3):  # layer1 .. layer3 are the same network
        assert torch.equal(out_r.stages[stage], out_p.stages[stage])
    assert out_r.stages[3].shape == out_p.stages[3].shape == (2, STAGE_CHANNELS[backbone][3], 4, 4)
    assert (out_r.stages[3] - out_p.stages[3]).abs().max() > 1e-3
    assert out_r.logits.shape == out_p.logits.shape == (2, 3, 64, 64)
    # ImageNet-format weights load unchanged into either layout
    state = torchvision_state(backbone, seed=5)
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    for layout in ("release", "previous"):
        body = build_model(backbone, [2], pretrained=path, first_block_dilation=layout).backbone.body.state_dict()
        assert set(body) == {k for k in state if not k.startswith("fc.")}
        assert all(torch.equal(value, state[key]) for key, value in body.items())


@pytest.mark.parametrize("output_stride", [4, 8])
def test_first_block_dilation_leaves_the_embedded_and_mobilenet_backbones_unchanged(output_stride: int) -> None:
    # embedded_resnet: its single layer4 block keeps dilation 1 (stride removed at output stride 4),
    # as before the option existed: the embedded benchmark and its pre-trained weights are unchanged
    outputs = []
    for layout in ("release", "previous"):
        torch.manual_seed(0)
        model = build_model("embedded_resnet", [5, 1], output_stride=output_stride,
                            first_block_dilation=layout).eval()
        block = model.backbone.body["layer4"][0]
        stride = (1, 1) if output_stride == 4 else (2, 2)
        assert (block.conv1.stride, block.conv1.dilation, block.conv1.padding) == (stride, (1, 1), (1, 1))
        assert (block.conv2.stride, block.conv2.dilation, block.conv2.padding) == ((1, 1), (1, 1), (1, 1))
        assert block.downsample[0].stride == stride
        with torch.no_grad():
            outputs.append(model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))))
    assert all(torch.equal(a, b) for a, b in zip([outputs[0].logits, *outputs[0].stages],
                                                  [outputs[1].logits, *outputs[1].stages]))
    with torch.device("meta"):
        mobile = [conv_geometry(build_backbone("mobilenet_v3_large", 16, first_block_dilation=layout).body)
                  for layout in ("release", "previous")]
    assert mobile[0] == mobile[1]


def test_first_block_dilation_bad_value() -> None:
    with pytest.raises(ValueError, match=r"first_block_dilation must be one of release, previous, got 'torchvision'"):
        build_model("resnet18", [2], first_block_dilation="torchvision")
    with pytest.raises(ValueError, match="first_block_dilation") as exc:
        build_backbone("embedded_resnet", 4, first_block_dilation="")
    one_line(exc)


def test_mobilenet_os16_is_torchvision_dilated_mobilenet() -> None:
    ours = build_backbone("mobilenet_v3_large", 16)
    reference = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features
    assert conv_geometry(ours.body) == conv_geometry(reference)
    assert ours.stage_names == ["3", "6", "12", "16"]
    os8 = build_backbone("mobilenet_v3_large", 8).body
    # C3 (features.7) loses its stride; C3 blocks get dilation 2, C4 blocks dilation 4
    depthwise = [m for m in os8["7"].modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
    assert depthwise.stride == (1, 1) and depthwise.dilation == (2, 2)
    depthwise = [m for m in os8["14"].modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
    assert depthwise.dilation == (4, 4) and depthwise.padding == (8, 8)  # 5x5 kernel


# ----------------------------------------------------------------------------- training


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", [2, 2]).train()
    out = model(torch.randn(2, 3, 64, 64))
    loss = out.logits.square().mean() + sum(s.mean() for s in out.stages)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_state_dict_layout() -> None:
    keys = build_model("resnet18", [2, 1]).state_dict().keys()
    assert "backbone.body.conv1.weight" in keys and "backbone.body.layer4.1.bn2.running_var" in keys
    assert {"classifier.0.weight", "classifier.0.bias", "classifier.1.weight", "classifier.1.bias"} <= set(keys)
    assert not any(k.startswith("backbone.body.fc") for k in keys)


# ----------------------------------------------------------------------------- classifier init


def test_mib_init_values_by_hand() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", [3, 1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bg_weight = before["classifier.0.weight"][0]
    bg_bias = before["classifier.0.bias"][0].item()
    model.init_new_classifier("mib")
    expected_bias = bg_bias - math.log(2 + 1)  # n_new = 2
    new = model.classifier[2]
    for k in range(2):
        torch.testing.assert_close(new.weight[k], bg_weight)
        assert new.bias[k].item() == pytest.approx(expected_bias, abs=1e-6)
    assert model.classifier[0].bias[0].item() == pytest.approx(expected_bias, abs=1e-6)
    # everything else untouched
    torch.testing.assert_close(model.classifier[0].weight, before["classifier.0.weight"])
    torch.testing.assert_close(model.classifier[0].bias[1:], before["classifier.0.bias"][1:])
    torch.testing.assert_close(model.classifier[1].weight, before["classifier.1.weight"])
    torch.testing.assert_close(model.classifier[1].bias, before["classifier.1.bias"])


def test_none_init_keeps_random_and_unknown_modes_are_refused() -> None:
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="unknown classifier init mode 'plop'"):
        build_model("resnet18", [4, 3]).init_new_classifier("plop")
    model = build_model("resnet18", [4, 3])
    before = [p.clone() for p in model.classifier.parameters()]
    model.init_new_classifier("none")
    for p, q in zip(model.classifier.parameters(), before):
        assert torch.equal(p, q)


def test_mib_init_preserves_old_background_probability() -> None:
    """After MiB init, P_new(bg) + sum P_new(new) == P_old(bg), and old classes keep P_old."""
    torch.manual_seed(0)
    old = build_model("resnet18", [3])
    randomize_bn(old)
    with torch.no_grad():
        old.classifier[0].bias.copy_(torch.tensor([0.5, -0.3, 0.2]))
    new = build_model("resnet18", [3, 2])
    load_previous_step(new, old.state_dict())
    new.init_new_classifier("mib")
    old.eval(), new.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        p_old = old(x).logits.softmax(dim=1)
        p_new = new(x).logits.softmax(dim=1)
    torch.testing.assert_close(p_new[:, 0] + p_new[:, 3] + p_new[:, 4], p_old[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_new[:, 1:3], p_old[:, 1:3], atol=1e-5, rtol=1e-5)
    # and the split is even: background and each new class get a third of the old background
    torch.testing.assert_close(p_new[:, 3], p_old[:, 0] / 3, atol=1e-5, rtol=1e-5)


def test_init_errors() -> None:
    model = build_model("resnet18", [3, 2])
    with pytest.raises(ValueError, match="'bogus'"):
        model.init_new_classifier("bogus")
    with pytest.raises(ValueError, match="at least 2 steps"):
        build_model("resnet18", [3]).init_new_classifier("mib")
    build_model("resnet18", [3]).init_new_classifier("none")  # no-op is fine


# ----------------------------------------------------------------------------- previous step


def test_load_previous_step_loads_everything_but_the_new_classifier() -> None:
    torch.manual_seed(0)
    old = build_model("resnet18", [3, 1])
    randomize_bn(old, seed=3)
    torch.manual_seed(1)
    new = build_model("resnet18", [3, 1, 2])
    new_cls = [p.clone() for p in new.classifier[2].parameters()]
    returned = load_previous_step(new, {"module." + k: v for k, v in old.state_dict().items()})
    assert returned is new
    state = new.state_dict()
    for key, value in old.state_dict().items():
        assert torch.equal(state[key], value), key
    for p, q in zip(new.classifier[2].parameters(), new_cls):
        assert torch.equal(p, q)


def test_load_previous_step_errors() -> None:
    model = build_model("resnet18", [3, 2])
    same_size = build_model("resnet18", [3, 2]).state_dict()
    with pytest.raises(ValueError, match="unexpected keys .*classifier.1"):
        load_previous_step(model, same_size)
    with pytest.raises(ValueError, match="shape mismatches.*classifier.0.weight"):
        load_previous_step(model, build_model("resnet18", [4]).state_dict())
    with pytest.raises(ValueError, match="missing keys") as exc:
        load_previous_step(model, build_model("mobilenet_v3_large", [3]).state_dict())
    one_line(exc)
    with pytest.raises(ValueError, match="at least 2 steps"):
        load_previous_step(build_model("resnet18", [3]), same_size)


# ----------------------------------------------------------------------------- pretrained weights


def torchvision_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    randomize_bn(net, seed)
    return net.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_load_torchvision_resnet18_checkpoint(tmp_path, wrap: str) -> None:
    state = torchvision_state("resnet18", seed=123)
    path = tmp_path / "resnet18.pth"
    if wrap == "plain":
        torch.save(state, path)
    elif wrap == "ddp":  # saved from a DistributedDataParallel wrapper
        torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)
    else:
        torch.save({wrap: state, "epoch": 3}, path)
    model = build_model("resnet18", [2], output_stride=8, pretrained=path)
    body = model.backbone.body.state_dict()
    assert set(body) == {k for k in state if not k.startswith("fc.")}
    for key, value in body.items():
        assert torch.equal(value, state[key]), key


def test_loaded_resnet18_computes_torchvision_stage_outputs(tmp_path) -> None:
    torch.manual_seed(7)
    net = torchvision.models.resnet18(weights=None)
    randomize_bn(net, 7)
    net.eval()
    path = tmp_path / "r18.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    model = build_model("resnet18", [2], pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer1 = net.layer1(stem)
        layer2 = net.layer2(layer1)
        stages = model(x).stages
    torch.testing.assert_close(stages[0], layer1)
    torch.testing.assert_close(stages[1], layer2)


def test_load_torchvision_mobilenet_checkpoint(tmp_path) -> None:
    state = torchvision_state("mobilenet_v3_large", seed=5)
    path = tmp_path / "mnv3.pth"
    torch.save(state, path)
    model = build_model("mobilenet_v3_large", [2], pretrained=path)
    body = model.backbone.body.state_dict()
    for key, value in state.items():
        if key.startswith("features."):
            assert torch.equal(body[key[len("features."):]], value), key


def test_pretrained_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth") as exc:
        build_model("resnet18", [2], pretrained=path)
    one_line(exc)


def test_pretrained_not_a_checkpoint(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.txt.*not a readable PyTorch checkpoint") as exc:
        build_model("resnet18", [2], pretrained=text)
    one_line(exc)
    evil = tmp_path / "object.pkl"  # a pickle of an arbitrary object: refused by weights_only
    evil.write_bytes(pickle.dumps(torch.nn.ReLU(), protocol=2))
    with pytest.raises(ValueError, match="object.pkl") as exc:
        build_model("resnet18", [2], pretrained=evil)
    one_line(exc)
    for name, obj in (("list.pth", [1, 2]), ("tensor.pth", torch.zeros(3)), ("strings.pth", {"a": "b"})):
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(ValueError, match=f"{name}.*no state dict") as exc:
            build_model("resnet18", [2], pretrained=path)
        one_line(exc)


def test_pretrained_mismatched_architecture(tmp_path) -> None:
    r50 = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    with pytest.raises(ValueError, match=r"resnet50.pth.*resnet101.*missing keys \(layer3\.6\.") as exc:
        build_model("resnet101", [2], pretrained=r50)
    one_line(exc)
    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(ValueError, match=r"resnet18.pth.*resnet50.*shape mismatches.*layer1\.0\.conv1\.weight") as exc:
        build_model("resnet50", [2], pretrained=r18)
    one_line(exc)
    with pytest.raises(ValueError, match=r"mobilenet_v3_large.*unexpected keys") as exc:
        build_model("mobilenet_v3_large", [2], pretrained=r18)
    one_line(exc)


def test_pretrained_unknown_torchvision_weight_name() -> None:
    with pytest.raises(ValueError, match="IMAGENET9K_V7.*IMAGENET1K_V1") as exc:
        build_model("resnet18", [2], pretrained="IMAGENET9K_V7")
    one_line(exc)


def test_build_errors() -> None:
    with pytest.raises(ValueError, match="'resnet34'.*resnet18"):
        build_model("resnet34", [2])
    with pytest.raises(ValueError, match="output_stride.*32"):
        build_model("resnet18", [2], output_stride=32)
    for bad in ([], [2, 0], [2.5]):
        with pytest.raises(ValueError, match="classes_per_step"):
            build_model("resnet18", bad)
    assert isinstance(build_model("resnet18", (2, 1)), IncrementalDeepLab)


# ------------------------------------------------------------- pre-activations (PLOP's POD)
def naive_bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    scale = bn.weight.view(shape) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def naive_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)


def hand_preactivation(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv-BN(-ReLU) chain of a BasicBlock / Bottleneck plus its (projected) identity, no final ReLU."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        pairs.append((block.conv3, block.bn3))
    out = x
    for i, (conv, bn) in enumerate(pairs):
        out = naive_bn(naive_conv(out, conv), bn)
        if i < len(pairs) - 1:
            out = out.clamp(min=0)
    identity = x
    if block.downsample is not None:
        identity = naive_bn(naive_conv(x, block.downsample[0]), block.downsample[1])
    return out + identity


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_block_preactivation_matches_a_hand_written_block(kind: str) -> None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from ucdseg.models.backbones import block_preactivation, stage_with_preactivation

    torch.manual_seed(0)
    if kind == "basic":
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        stage = nn.Sequential(BasicBlock(8, 16, stride=2, downsample=downsample), BasicBlock(16, 16))
    else:
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        stage = nn.Sequential(Bottleneck(8, 4, downsample=downsample), Bottleneck(16, 4))
    randomize_bn(stage, 1)
    stage.eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected = hand_preactivation(stage[0], x)
        torch.testing.assert_close(block_preactivation(stage[0], x), expected)
        out, pre = stage_with_preactivation(stage, x)
        torch.testing.assert_close(pre, hand_preactivation(stage[1], stage[0](x)))
        torch.testing.assert_close(out, stage(x), rtol=0, atol=0)  # the stage's own output, bit for bit
    assert (pre < 0).any()  # the pre-activation keeps what the final ReLU removes
    with pytest.raises(ValueError, match="needs an nn.Sequential ending with a torchvision BasicBlock"):
        stage_with_preactivation(nn.Sequential(nn.ReLU()), x)


def test_has_preactivation_only_for_torchvision_residual_forwards() -> None:
    from torchvision.models.resnet import BasicBlock

    from ucdseg.models.backbones import has_preactivation

    class Renamed(BasicBlock):  # same forward: still a torchvision block
        pass

    class Other(BasicBlock):  # its own forward: block_preactivation would not reproduce it
        def forward(self, x):
            return super().forward(x) * 2

    assert has_preactivation(nn.Sequential(BasicBlock(4, 4), Renamed(4, 4)))
    assert not has_preactivation(nn.Sequential(BasicBlock(4, 4), Other(4, 4)))
    assert not has_preactivation(nn.Sequential()) and not has_preactivation(BasicBlock(4, 4))


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v3_large"])
def test_model_exposes_stage_preactivations(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, [3, 2])
    randomize_bn(model, 2)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert len(out.pod_stages) == 4
    assert model.backbone.preactivation_stages == [backbone != "mobilenet_v3_large"] * 4
    for stage, pre in zip(out.stages, out.pod_stages):
        assert pre.shape == stage.shape
    if backbone == "mobilenet_v3_large":  # inverted residuals end linearly: the output is the pre-activation
        assert all(p is s for p, s in zip(out.pod_stages, out.stages))
        return
    for stage, pre in zip(out.stages, out.pod_stages):
        torch.testing.assert_close(stage, pre.clamp(min=0), rtol=0, atol=0)
        assert (pre < 0).any()
    # the last stage's pre-activation by hand, from the third stage's output
    body = model.backbone.body
    with torch.no_grad():
        x4 = out.stages[2]
        for block in list(body["layer4"])[:-1]:
            x4 = block(x4)
        expected = hand_preactivation(body["layer4"][-1], x4)
    # the stage's convolutions may take another kernel than the hand-run ones (thread count): relative to its scale
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.pod_stages[3], expected, rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------------ the embedded backbone
@pytest.mark.parametrize("output_stride", [4, 8])
def test_embedded_resnet_gives_a_fine_feature_map_of_a_small_scene(output_stride: int) -> None:
    """No stem stride and no max-pool: a 64 px scene gives 64 / output_stride cells a side."""
    torch.manual_seed(0)
    model = build_model("embedded_resnet", [5, 1], output_stride=output_stride).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    side = 64 // output_stride
    assert [tuple(s.shape[1:]) for s in out.stages] == [
        (16, 64, 64), (32, 32, 32), (64, 16, 16), (128, side, side)]
    assert out.features.shape == (2, 256, side, side)  # the 256-channel pre-logits features UCD reads
    assert out.low_logits.shape == (2, 6, side, side) and out.logits.shape == (2, 6, 64, 64)
    assert model.backbone.preactivation_stages == [True] * 4  # POD reads pre-activations here too
    head = model.head
    assert [conv.dilation[0] for conv in head.map_convs[1:]] == [2, 4, 6] and head.map_convs[0].out_channels == 128
    # layer4 is dilated, not strided, at output stride 4
    conv = model.backbone.body["layer4"][0].conv1
    assert conv.stride == ((1, 1) if output_stride == 4 else (2, 2))


def test_embedded_resnet_classifier_keeps_torchvision_names() -> None:
    from ucdseg.models.backbones import EmbeddedResNet

    net = EmbeddedResNet(num_classes=10)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    names = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer4.0.bn2.bias", "fc.weight"} <= names
    assert not any(k.startswith("maxpool") for k in names)


def test_output_stride_is_checked_per_backbone() -> None:
    with pytest.raises(ValueError, match="embedded_resnet takes output_stride 4 or 8, got 16") as exc:
        build_model("embedded_resnet", [5], output_stride=16)
    assert "\n" not in one_line(exc)
    with pytest.raises(ValueError, match="resnet18 takes output_stride 8 or 16, got 4"):
        build_model("resnet18", [5], output_stride=4)
