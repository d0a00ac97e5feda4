"""Every loss on ``meta`` tensors and away from a fixed device; UCD under CPU bf16 autocast.

1. **Meta tensors** (shapes without values, on no real device): every public function and class of
   ``ucdseg.losses`` runs on meta inputs and returns meta tensors (gradients too). A tensor created
   without ``device=`` lands on the CPU and meets the meta inputs in an error; so does a host read
   (``.item()``, ``bool(t)``) outside the value checks, which skip meta tensors
   (``ucdseg.losses.device_generic.any_true``). The functions whose *shapes* depend on the values
   (UCD keeps the pixels it selects and sorts them by class into groups it reads on the host; SDR
   and the contrast statistics count the classes present) cannot run there: they are strict xfails
   with that reason, and test 2 covers them.
2. **No fixed device**: CPU inputs with ``meta`` as torch's default device. A tensor created without
   ``device=`` is then a meta tensor, and the first operation mixing it with the inputs fails; every
   loss (data-dependent ones included) must give the CPU result it gives without the default.
3. **UCD under CPU bf16 autocast** against float32, with the tolerances derived in its docstring.

``ucdseg.device_check`` runs the same losses on the GPU (docs/distributed.md, "Device check").
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import ucdseg.losses as L
from ucdseg.losses import plop, sdr

B, C_OLD, C_NEW, H, W, D = 2, 4, 2, 8, 8, 6
C_ALL = C_OLD + C_NEW


_LEAVES: list[torch.Tensor] = []  # the inputs with a gradient that the running case made


def _rand(dev, *shape, grad=False):
    x = torch.randn(*shape, device=dev)
    if grad:
        _LEAVES.append(x.requires_grad_(True))
    return x


def _labels(dev, high=C_ALL, shape=(B, H, W)):
    return torch.randint(0, high, shape, device=dev)


class _Out:
    """``pod_levels`` reads a model output's stages, features and low-resolution logits."""

    def __init__(self, dev, grad):
        self.pod_stages = [_rand(dev, B, 3, H, W, grad=grad), _rand(dev, B, 5, 4, 4, grad=grad)]
        self.features = _rand(dev, B, D, 4, 4, grad=grad)
        self.low_logits = _rand(dev, B, C_OLD + (C_NEW if grad else 0), 4, 4, grad=grad)


def _regularizer(cls):
    def run(dev):
        params = {"w": _rand(dev, 3, 4, grad=True), "b": _rand(dev, 4, grad=True)}
        step0 = cls(params, None, None)
        (params["w"].sum() * 2 + params["b"].pow(2).sum()).backward()
        step0.update()
        old = {k: v.detach().clone() for k, v in params.items()}
        reg = cls(params, old, step0.carry())
        for p in params.values():
            p.grad = None
        (params["w"].pow(2).sum() + params["b"].sum()).backward()
        reg.update()
        reg.update()
        for p in params.values():
            p.grad = None  # the penalty's own gradient: run_case's backward
        penalty = reg.penalty()
        return penalty, list(reg.carry().values())
    return run


def _entropy_thresholds(dev):
    acc = plop.EntropyThresholds(C_OLD, C_ALL, device=dev)
    acc.update(_rand(dev, B, C_OLD, H, W), _labels(dev))
    acc.all_reduce()  # no process group: nothing to sum
    return acc.histogram, acc.medians(), acc.thresholds()


def _prototypes(dev):
    protos, counts = _rand(dev, C_ALL, D), torch.zeros(C_ALL, dtype=torch.long, device=dev)
    return sdr.update_prototypes(protos, counts, _rand(dev, B, D, 4, 4), _labels(dev, shape=(B, 4, 4)),
                                 drop_first=True)


def _flat(dev):
    """The flat loss on inputs of the shapes prepare_contrastive_inputs gives (N anchors, K elements)."""
    n, k = 20, 30
    anchors = torch.nn.functional.normalize(_rand(dev, n, D, grad=True), dim=1)
    contrast = torch.nn.functional.normalize(torch.randn(k, D, device=dev), dim=1)
    probs = torch.softmax(torch.randn(k, C_OLD, device=dev), dim=1)
    labels = torch.randint(1, C_ALL, (k,), device=dev)
    is_gt = labels >= C_OLD
    return L.contrastive_distillation_flat(anchors, labels[:n], probs[:n], is_gt[:n], contrast, labels, probs, is_gt,
                                           torch.arange(n, device=dev))


#: name -> what it runs on device ``dev`` (its result: tensors, or lists / tuples / dataclasses of them)
CASES: dict[str, Callable] = {
    "unbiased_cross_entropy": lambda d: L.unbiased_cross_entropy(_rand(d, B, C_ALL, H, W, grad=True), _labels(d),
                                                                 C_OLD),
    "unbiased_kd": lambda d: L.unbiased_kd(_rand(d, B, C_ALL, H, W, grad=True), _rand(d, B, C_OLD, H, W)),
    "knowledge_distillation": lambda d: L.knowledge_distillation(_rand(d, B, C_ALL, H, W, grad=True),
                                                                 _rand(d, B, C_OLD, H, W)),
    "label_bce": lambda d: L.label_bce(_rand(d, B, C_ALL, H, W, grad=True), _labels(d)),
    "old_sigmoid_bce": lambda d: L.old_sigmoid_bce(_rand(d, B, C_ALL, H, W, grad=True), _rand(d, B, C_OLD, H, W)),
    "multiclass_bce_distillation": lambda d: L.multiclass_bce_distillation(
        _rand(d, B, C_ALL, H, W, grad=True), _rand(d, B, C_OLD, H, W), _labels(d)),
    "feature_distillation": lambda d: L.feature_distillation(_rand(d, B, D, 4, 4, grad=True), _rand(d, B, D, 4, 4)),
    "contrastive_distillation": lambda d: L.contrastive_distillation(
        _rand(d, B, D, 4, 4, grad=True), _rand(d, B, D, 4, 4), _rand(d, B, C_OLD, 4, 4), _labels(d)),
    "contrastive_distillation_flat": _flat,
    "gathered_contrastive_distillation": lambda d: L.gathered_contrastive_distillation(
        _rand(d, B, D, 4, 4, grad=True), _rand(d, B, D, 4, 4), _rand(d, B, C_OLD, 4, 4), _labels(d)),
    "prepare_contrastive_inputs": lambda d: tuple(L.prepare_contrastive_inputs(
        _rand(d, B, D, 4, 4, grad=True), _rand(d, B, D, 4, 4), _rand(d, B, C_OLD, 4, 4), _labels(d))),
    "contrastive_input_stats": lambda d: L.contrastive_input_stats(L.prepare_contrastive_inputs(
        _rand(d, B, D, 4, 4), _rand(d, B, D, 4, 4), _rand(d, B, C_OLD, 4, 4), _labels(d))),
    "resize_labels_nearest": lambda d: L.resize_labels_nearest(_labels(d), (3, 5)),
    "local_pod": lambda d: L.local_pod(plop.pod_levels(_Out(d, True)), plop.pod_levels(_Out(d, False)), C_OLD, C_NEW),
    "entropy_pseudo_labels": lambda d: L.entropy_pseudo_labels(_labels(d), _rand(d, B, C_OLD, H, W),
                                                               torch.full((C_OLD,), 0.5, device=d)),
    "EntropyThresholds": _entropy_thresholds,
    "EWC": _regularizer(L.EWC),
    "PathIntegral": _regularizer(L.PathIntegral),
    "RiemannianWalk": _regularizer(L.RiemannianWalk),
    "normalize_importance": lambda d: L.normalize_importance(_rand(d, 3, 4)),
    "check_prototypes": lambda d: L.check_prototypes(_rand(d, C_ALL, D), C_ALL, D),
    "downsample_labels": lambda d: L.downsample_labels(_labels(d), (4, 4)),
    "old_prediction_down": lambda d: L.old_prediction_down(_rand(d, B, C_OLD, H, W), (4, 4)),
    "update_prototypes": _prototypes,
    "prototype_matching": lambda d: L.prototype_matching(_rand(d, B, D, 4, 4, grad=True), _rand(d, C_ALL, D),
                                                         _labels(d, shape=(B, 4, 4)), _labels(d, C_OLD, (B, 4, 4))),
    "feature_clustering": lambda d: L.feature_clustering(_rand(d, B, D, 4, 4, grad=True), _rand(d, C_ALL, D),
                                                         _labels(d, shape=(B, 4, 4))),
    "feature_separation": lambda d: L.feature_separation(_rand(d, B, D, 4, 4, grad=True), _labels(d, shape=(B, 4, 4))),
    "feature_sparsification": lambda d: L.feature_sparsification(_rand(d, B, D, 4, 4, grad=True),
                                                                 _labels(d, shape=(B, 4, 4))),
    "ssul_train_labels": lambda d: L.ssul_train_labels(_labels(d), _rand(d, B, H, W)),
    "ssul_pseudo_labels": lambda d: L.ssul_pseudo_labels(_labels(d, 2), _rand(d, B, C_OLD, H, W)),
    "ssul_bce": lambda d: L.ssul_bce(_rand(d, B, C_ALL, H, W, grad=True), _labels(d)),
    "ssul_predict": lambda d: L.ssul_predict(_rand(d, B, C_ALL, H, W)),
    "dkd_mbce": lambda d: L.dkd_mbce(_rand(d, B, C_ALL, H, W, grad=True), _labels(d, C_ALL + 1), [4, 5]),
    "dkd_kd": lambda d: L.dkd_kd(_rand(d, B, C_ALL, H, W, grad=True), _rand(d, B, C_OLD, H, W), C_OLD),
    "decomposed_logits": lambda d: L.decomposed_logits(_rand(d, B, D, 4, 4, grad=True), _rand(d, C_ALL, D, 1, 1)),
    "dkd_decomposed_kd": lambda d: L.dkd_decomposed_kd(_rand(d, B, C_ALL, 4, 4, grad=True), _rand(d, B, C_OLD, 4, 4)),
    "dkd_aux_loss": lambda d: L.dkd_aux_loss(_rand(d, B, 1, H, W, grad=True)),
    "dkd_pseudo_labels": lambda d: L.dkd_pseudo_labels(_labels(d), _rand(d, B, C_OLD, H, W)),
    "dkd_predict": lambda d: L.dkd_predict(_rand(d, B, C_ALL, H, W)),
}

#: exports that compute nothing on tensors themselves
NOT_LOSSES = {
    "ContrastiveInputs": "the NamedTuple prepare_contrastive_inputs returns (covered there)",
    "ParameterRegularizer": "the base class of EWC, PathIntegral and RiemannianWalk (each a case)",
    "REGULARIZERS": "the dict of those three classes",
    "SDR_WEIGHTS": "a dict of loss weights", "DKD_WEIGHTS": "a dict of loss weights",
    "DKD_POS_WEIGHT": "a number", "DKD_POS_WEIGHT_STEP0": "a number", "DKD_POS_WEIGHT_ADE": "a number",
}

#: the functions whose output shapes (or host-side control flow) depend on the values: why each
#: cannot run on meta tensors. Test 2 checks they create nothing on a fixed device.
DATA_DEPENDENT = {
    "contrastive_distillation": "UCD keeps the pixels its labels select (boolean indexing: nonzero)",
    "contrastive_distillation_flat": "the positives' count per class (bincount) is sized by the largest label, "
                                     "read on the host; the class groups' bounds too",
    "gathered_contrastive_distillation": "UCD's pixel selection (as contrastive_distillation)",
    "prepare_contrastive_inputs": "the kept pixels (boolean indexing): their number is the output's shape",
    "contrastive_input_stats": "its inputs come from prepare_contrastive_inputs; it counts pairs on the host",
    "update_prototypes": "the pixels of the seen classes (boolean indexing)",
    "prototype_matching": "the old classes present (torch.unique)",
    "feature_clustering": "the classes present (torch.unique)",
    "feature_separation": "the classes present (torch.unique)",
    "feature_sparsification": "the labels present (torch.unique)",
}
#: what the data-dependent step raises on meta: no meta kernel (NotImplementedError), or a host read
#: of a value (RuntimeError "Tensor.item() cannot be called on meta tensors")
META_ERROR = {"contrastive_distillation_flat": RuntimeError}


def test_cases_cover_every_export():
    exported = set(L.__all__)
    assert set(CASES) | set(NOT_LOSSES) == exported, sorted(exported ^ (set(CASES) | set(NOT_LOSSES)))
    assert set(DATA_DEPENDENT) <= set(CASES)


def _tensors(result) -> list[torch.Tensor]:
    """Every tensor of a result (nested lists, tuples, dicts and dataclasses)."""
    if torch.is_tensor(result):
        return [result]
    if dataclasses.is_dataclass(result):
        result = [getattr(result, f.name) for f in dataclasses.fields(result)]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in _tensors(item)]
    return []


def run_case(name: str, device: str) -> list[torch.Tensor]:
    """The tensors of case ``name`` run on ``device`` and, when it returns a scalar with a graph,
    the gradients its backward gives the inputs."""
    _LEAVES.clear()
    tensors = _tensors(CASES[name](device))
    scalars = [t for t in tensors if t.requires_grad and t.dim() == 0]
    if not scalars:
        return tensors
    leaves = [t for t in _LEAVES if t.grad is None]
    scalars[0].backward()
    grads = [t.grad for t in leaves if t.grad is not None]
    assert grads, name
    return tensors + grads


def _xfail_if_data_dependent(name: str) -> list:
    if name not in DATA_DEPENDENT:
        return []
    error = META_ERROR.get(name, NotImplementedError)
    return [pytest.mark.xfail(strict=True, raises=error, reason=DATA_DEPENDENT[name])]


META_PARAMS = [pytest.param(name, id=name, marks=_xfail_if_data_dependent(name)) for name in CASES]


@pytest.mark.parametrize("name", META_PARAMS)
def test_runs_on_meta_tensors(name):
    tensors = run_case(name, "meta")
    assert tensors or name == "check_prototypes"  # a check returns nothing
    for t in tensors:
        assert t.device.type == "meta", (t.device, t.shape)


@pytest.mark.parametrize("name", list(CASES))
def test_creates_no_tensor_on_a_fixed_device(name):
    """CPU inputs, ``meta`` as the default device: the values (and gradients) it gives without it."""
    torch.manual_seed(0)
    expected = run_case(name, "cpu")
    torch.manual_seed(0)
    with torch.device("meta"):  # torch.set_default_device("meta") while inside
        got = run_case(name, "cpu")
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)


def test_meta_default_device_catches_a_tensor_made_without_device():
    """The check above can fail: a loss that makes a tensor without ``device=`` breaks under it."""

    def careless_loss(logits):
        return (logits * torch.ones(logits.shape[1])[None, :, None, None]).mean()

    logits = torch.randn(B, C_ALL, H, W)
    assert careless_loss(logits).device.type == "cpu"
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):
        careless_loss(logits)


# ----------------------------------------------------------------------------------------------
# UCD under CPU bf16 autocast
# ----------------------------------------------------------------------------------------------
# bfloat16 keeps 8 significant bits: its machine epsilon is 2^-7 = 7.8e-3 and its unit roundoff
# (the largest relative error of one rounding to nearest) u = 2^-8 = 3.9e-3.
#  * float32 inputs: UCD runs its products in float32 whatever autocast says, so under autocast it
#    computes the very same numbers: equal to the last bit.
#  * bfloat16 features (the forward ran under autocast): the loss reads them in float32, so it is the
#    float32 loss of the rounded features, exactly; their gradient is that float32 gradient rounded
#    once to bfloat16: within u of it, element by element (relative), i.e. exactly its bf16 rounding.
#  * Against the float32 pipeline (features never rounded): each feature moved by at most u
#    relative. Stated tolerance: loss within u relative, the gradient of the layer below within
#    4u = 2^-6 (max abs difference / max abs value). Observed over 6 seeds: loss 1.3e-6..4.1e-5,
#    gradient 3.8e-3..5.6e-3.
BF16_U = 2.0**-8
TAU = 0.07


def _ucd_inputs(seed: int, dim: int = 32, size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(dim, dim, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / dim**0.5)
        conv.bias.zero_()
    x = torch.randn(2, dim, size, size, generator=gen)
    old_features = torch.randn(2, dim, size, size, generator=gen)
    old_logits = 2 * torch.randn(2, 6, size, size, generator=gen)
    labels = torch.randint(0, 9, (2, 4 * size, 4 * size), generator=gen)
    labels[labels > 6] = 0  # background, for the old model to label
    labels[:, :4] = 255
    return conv, x, old_features, old_logits, labels


@pytest.mark.parametrize("fn", ["contrastive_distillation", "contrastive_distillation_flat",
                                "gathered_contrastive_distillation"])
def test_ucd_float32_inputs_are_unchanged_by_bf16_autocast(fn):
    _, x, g, z, y = _ucd_inputs(0)
    f = x.clone().requires_grad_(True)

    def loss():
        if fn == "contrastive_distillation_flat":
            return L.contrastive_distillation_flat(*L.prepare_contrastive_inputs(f, g, z, y), temperature=TAU)
        return getattr(L, fn)(f, g, z, y, temperature=TAU)

    plain = loss()
    (grad_plain,) = torch.autograd.grad(plain, f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss()
    (grad_mixed,) = torch.autograd.grad(mixed, f)
    assert mixed.dtype == torch.float32
    assert mixed.item() == plain.item()
    assert torch.equal(grad_mixed, grad_plain)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ucd_on_bf16_features_is_the_float32_loss_of_the_rounded_features(seed):
    conv, x, g, z, y = _ucd_inputs(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = conv(x)
        f.retain_grad()
        loss = L.contrastive_distillation(f, g, z, y, temperature=TAU)
    assert f.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    rounded = f.detach().float().requires_grad_(True)
    reference = L.contrastive_distillation(rounded, g, z, y, temperature=TAU)
    reference.backward()
    assert loss.item() == reference.item()
    assert f.grad.dtype == torch.bfloat16
    assert torch.equal(f.grad, rounded.grad.to(torch.bfloat16))  # one rounding of the float32 gradient
    assert float((f.grad.float() - rounded.grad).abs().max()) <= BF16_U * float(rounded.grad.abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ucd_under_bf16_autocast_is_within_the_stated_tolerance_of_float32(seed):
    conv, x, g, z, y = _ucd_inputs(seed)
    loss32 = L.contrastive_distillation(conv(x), g, z, y, temperature=TAU)
    (grad32,) = torch.autograd.grad(loss32, conv.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = L.contrastive_distillation(conv(x), g, z, y, temperature=TAU)
    (grad16,) = torch.autograd.grad(loss16, conv.weight)
    assert loss16.item() != loss32.item()  # the features were rounded: the comparison is not trivial
    assert abs(loss16.item() - loss32.item()) <= BF16_U * abs(loss32.item())
    assert float((grad16 - grad32).abs().max()) <= 4 * BF16_U * float(grad32.abs().max())
