"""The DeepLab model on ``meta`` tensors and away from a fixed device (as tests/losses/test_devices.py).

Every backbone and classifier layout is built, run forward and backward, and given its new
classifier's initialisation (1) entirely on ``meta`` (shapes without values: a tensor the model
created on a fixed device, or a host read, would fail there) and (2) on the CPU with ``meta`` as
torch's default device (a tensor created without ``device=`` would be a meta tensor and fail to
meet the CPU ones), where it must give exactly the outputs it gives without that default.
"""

from __future__ import annotations

import pytest
import torch

from ucdseg.models import BACKBONES, ModelSpec, build_model

CLASSES = [16, 5]  # VOC 15-5: background + 15, then 5
INIT = {"linear": "mib", "ssul": "ssul", "dkd": "dkd"}
OUTPUT_STRIDE = {"embedded_resnet": 8}


def _run(model, x: torch.Tensor, heads: str) -> list[torch.Tensor]:
    """Outputs of a training forward, the gradients of their sum, and the new classifier after its init."""
    model.train()
    out = model(x)
    loss = out.logits.float().mean() + out.features.mean() + sum(s.mean() for s in out.pod_stages)
    if heads == "dkd":
        loss = loss + out.pos_logits.mean() + out.neg_logits.mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        model.init_new_classifier(INIT[heads])
    new = list(model.classifier[-1].parameters())
    return [out.logits, out.low_logits, out.features, *out.stages, *out.pod_stages, *grads, *new]


@pytest.mark.parametrize("heads", list(INIT))
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_model_runs_on_meta_tensors(backbone, heads):
    with torch.device("meta"):
        model = build_model(backbone, CLASSES, output_stride=OUTPUT_STRIDE.get(backbone, 16), spec=ModelSpec(heads))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    x = torch.randn(2, 3, 64, 80, device="meta")
    tensors = _run(model, x, heads)
    assert tensors[0].shape[0] == 2 and tensors[0].shape[2:] == (64, 80)  # logits at the input size
    for t in tensors:
        assert t.device.type == "meta", t.shape


@pytest.mark.parametrize("heads", list(INIT))
def test_model_creates_no_tensor_on_a_fixed_device(heads):
    outputs = []
    for default_meta in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet18", CLASSES, spec=ModelSpec(heads))
        x = torch.randn(2, 3, 48, 48)
        if default_meta:
            with torch.device("meta"):
                outputs.append(_run(model, x, heads))
        else:
            outputs.append(_run(model, x, heads))
    assert len(outputs[0]) == len(outputs[1])
    for a, b in zip(*outputs):
        assert b.device.type == "cpu"
        torch.testing.assert_close(b, a, rtol=0, atol=0)
