"""The methods of issues 21-22 at the method level: each composes the right terms, with the right
inputs, weights, hooks and model surgery (SPEC-2.md, docs/methods.md).

The pure loss functions have parity tests against the releases (tests/losses/); here every
expected value is derived in the test (naive loops over pixels, the releases' rules restated by
hand) and compared with what the method, its hooks and the training loop compute.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import conftest  # noqa: F401  (registers model.backbone=tiny)
from ucdseg.config import ConfigError, load_config
from ucdseg.engine.build import LoopOptions, optimizer_and_schedule
from ucdseg.engine.loop import Criterion, Trainee, shares_trunk, train_one_iteration
from ucdseg.engine.process_group import Dist
from ucdseg.methods import LossContext, StepSetup, get_method
from ucdseg.methods import builtin
from ucdseg.models import ModelSpec, build_model, load_previous_step

TINY = conftest.TINY
Out = namedtuple("Out", "logits low_logits features stages pod_stages pos_logits neg_logits",
                 defaults=(None, None))
OPTS = LoopOptions(batch_size=2, accumulate=1, amp_dtype=None, log_every=1, checkpoint_every=0, compile=False,
                   channels_last=False, bn="batch", sampler_seed=0)
SOURCE = "runs/x/checkpoints/step0.pt"
#: MiB's --method EWC / PI / RW presets: reg_importance 500 / 500 / 100, reg_alpha 0.9 (MiB argparser.py:25-33)
IMPORTANCE = {"ewc": 500.0, "pi": 500.0, "rw": 100.0}
ALPHA = 0.9


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    torch.manual_seed(0)


def tiny(classes, method: str | None = None) -> nn.Module:
    spec = get_method(method).model if method else ModelSpec()
    return build_model(TINY, classes, 16, spec=spec)


def tiny_config(method: str):
    return load_config(None, [f"method.name={method}", f"model.backbone={TINY}", "model.output_stride=16",
                              "model.pretrained=null"])


def randomize_batchnorm(model: nn.Module) -> None:
    """Running statistics and affine parameters other than PyTorch's defaults, so copies are visible."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


def bce(z, t, pos_weight=1.0):
    """BCE with logits by hand: -(w t log s(z) + (1 - t) log(1 - s(z)))."""
    return -(pos_weight * t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps, at each step, the gradients it was handed (by parameter name)."""

    def __init__(self, named, **kwargs):
        named = [(n, p) for n, p in named if p.requires_grad]
        super().__init__([p for _, p in named], **kwargs)
        self.names = {id(p): n for n, p in named}
        self.seen: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append({self.names[id(p)]: p.grad.detach().clone() for g in self.param_groups
                          for p in g["params"] if p.grad is not None})
        return super().step(closure)


def trainee_of(model, old_model, optimizer, state=None) -> Trainee:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Trainee(model, model, old_model, optimizer, scheduler, scaler, step_state=state)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# =============================================================================== 1. EWC, PI, RW
def ce_gradient(model, images, labels) -> dict[str, torch.Tensor]:
    """d CE / d theta on a copy of ``model`` (CE summed over non-void pixels / all pixels, as MiB)."""
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    logits = twin(images).logits
    logp = torch.log_softmax(logits, 1)
    valid = labels != 255
    picked = logp.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    (-(picked * valid).sum() / labels.numel()).backward()
    return {n: p.grad.detach().clone() for n, p in twin.named_parameters() if p.grad is not None}


def hand_norm(m: torch.Tensor) -> torch.Tensor:
    """MiB regularizer.py:37-38: per-tensor min-max, + 1e-8 in the denominator."""
    return (m - m.min()) / (m.max() - m.min() + 1e-8)


def hand_tables(name: str, old_model) -> dict:
    """A previous step's carried tables, positive and random, for every old parameter."""
    g = torch.Generator().manual_seed(7)

    def table():
        return {n: torch.rand(p.shape, generator=g) * 2 + 0.1 for n, p in old_model.named_parameters()}

    tables = {"ewc": lambda: {"fisher": table()}, "pi": lambda: {"omega": table()},
              "rw": lambda: {"fisher": table(), "score": table()}}[name]()
    return {"regularizer": name, "tables": tables}


def penalty_weights(name: str, previous: dict) -> dict[str, torch.Tensor]:
    """W_n of the penalty: norm(F) (EWC), norm(omega) (PI), norm(F) + norm(S) (RW)."""
    t = previous["tables"]
    if name == "ewc":
        return {k: hand_norm(v) for k, v in t["fisher"].items()}
    if name == "pi":
        return {k: hand_norm(v) for k, v in t["omega"].items()}
    return {k: hand_norm(t["fisher"][k]) + hand_norm(t["score"][k]) for k in t["fisher"]}


def regularizer_step1(name: str):
    """A step-1 model (old weights, then moved away from them: theta != theta*), its old model, its
    previous tables and the method's state built from them."""
    old = tiny([3])
    model = tiny([3, 2])
    load_previous_step(model, old.state_dict())
    old.eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    previous = hand_tables(name, old)
    method = get_method(name)
    setup = StepSetup(step=1, model=model, old_model=old, num_old=3, num_new=2, options=method.resolve_options(),
                      previous=previous, device=torch.device("cpu"), source=SOURCE)
    return model, old, previous, method.step_state(setup)


def step1_batch(size: int = 32):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, size, size, generator=g)
    labels = torch.tensor([0, 0, 3, 4, 255])[torch.randint(0, 5, (2, size, size), generator=g)]
    return images, labels


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_regularizer_gradient_is_ce_plus_importance_times_penalty_and_state_reads_ce(name):
    model, old, previous, state = regularizer_step1(name)
    assert state.penalty_weight == IMPORTANCE[name]
    method = get_method(name)
    criterion = Criterion(method, method.weights(), method.resolve_options(), 1, 3, 2, state=state)
    optimizer = RecordingSGD(model.named_parameters(), lr=0.01, momentum=0.9)
    trainee = trainee_of(model, old, optimizer, state)
    model.train()
    images, labels = step1_batch()
    theta_star = dict(old.named_parameters())
    weights = penalty_weights(name, previous)

    thetas, ce_grads, logs = [], [], []
    for _ in range(2):
        thetas.append(params_of(model))
        ce_grads.append(ce_gradient(model, images, labels))
        logs.append(train_one_iteration(trainee, criterion, images, labels, OPTS, Dist()))
    for it in range(2):
        theta, g, seen = thetas[it], ce_grads[it], optimizer.seen[it]
        assert set(seen) == set(theta)
        pen = sum((weights[k] * (theta[k] - theta_star[k]) ** 2).sum() for k in theta_star)
        assert logs[it]["penalty"].item() == pytest.approx(pen.item(), rel=1e-5)
        assert logs[it]["ce"].item() == pytest.approx(logs[it]["loss"].item(), rel=1e-7)  # penalty not in the loss
        for k in theta:
            expected = g[k].clone()
            if k in theta_star:  # the new classifier has no theta*: no penalty
                expected += IMPORTANCE[name] * 2 * weights[k] * (theta[k] - theta_star[k])
            torch.testing.assert_close(seen[k], expected, rtol=1e-5, atol=2e-6, msg=f"{name}: {k}")
        # the case is not degenerate: both parts of the gradient matter
        assert max(g[k].abs().max() for k in g) > 1e-3
        assert max((seen[k] - g[k]).abs().max() for k in theta_star) > 1e-2
    assert not any(k in theta_star for k in ("classifier.1.weight", "classifier.1.bias"))

    reg = state.regularizer
    g0, g1 = ce_grads
    if name in ("ewc", "rw"):  # F <- a g^2 + (1 - a) F from the previous step's F (new keys: ones)
        for k, p in model.named_parameters():
            f_prev = previous["tables"]["fisher"].get(k, torch.ones_like(p))
            f1 = ALPHA * g0[k] ** 2 + (1 - ALPHA) * f_prev
            torch.testing.assert_close(reg.fisher[k], ALPHA * g1[k] ** 2 + (1 - ALPHA) * f1, rtol=1e-5, atol=1e-12)
    if name == "pi":  # delta += g (theta_prev - theta) from the second update on, g the CE gradient
        for k in thetas[0]:
            torch.testing.assert_close(reg.delta[k], g1[k] * (thetas[0][k] - thetas[1][k]), rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(reg.theta_prev[k], thetas[1][k], rtol=0, atol=0)
    if name == "rw":  # scores every 10 calls: call 0 only took the snapshot
        for k in thetas[0]:
            torch.testing.assert_close(reg.theta_prev[k], thetas[0][k], rtol=0, atol=0)
            assert not reg.score_sum[k].any()
    assert state.carry()["regularizer"] == name


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_regularizer_step0_is_plain_ce(name):
    model = tiny([3])
    method = get_method(name)
    setup = StepSetup(step=0, model=model, old_model=None, num_old=0, num_new=3, options=method.resolve_options(),
                      previous=None, device=torch.device("cpu"))
    state = method.step_state(setup)
    criterion = Criterion(method, method.weights(), method.resolve_options(), 0, 0, 3, state=state)
    optimizer = RecordingSGD(model.named_parameters(), lr=0.01)
    model.train()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 2, 255])[torch.randint(0, 4, (2, 32, 32), generator=g)]
    grad = ce_gradient(model, images, labels)
    logged = train_one_iteration(trainee_of(model, None, optimizer, state), criterion, images, labels, OPTS, Dist())
    assert set(logged) == {"loss", "ce", "penalty"} and logged["penalty"].item() == 0
    for k, v in optimizer.seen[0].items():
        torch.testing.assert_close(v, grad[k], rtol=1e-5, atol=1e-7)
    if name != "pi":
        for k, p in model.named_parameters():  # F from ones
            torch.testing.assert_close(state.regularizer.fisher[k], ALPHA * grad[k] ** 2 + (1 - ALPHA), rtol=1e-5,
                                       atol=1e-12)


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_regularizer_step1_refuses_a_state_of_another_method(name):
    old = tiny([3])
    model = tiny([3, 2])
    method = get_method(name)
    other = "pi" if name != "pi" else "rw"
    sdr_state = {"prototypes": torch.zeros(3, 16), "counts": torch.zeros(3, dtype=torch.long)}
    for previous, held in ((None, "no method state"), (hand_tables(other, old), f"the state of {other!r}"),
                           (sdr_state, "a method state without a regulariser")):
        setup = StepSetup(step=1, model=model, old_model=old, num_old=3, num_new=2, options=method.resolve_options(),
                          previous=previous, device=torch.device("cpu"), source=SOURCE)
        with pytest.raises(ValueError) as exc:
            method.step_state(setup)
        text = one_line(exc)
        assert text.startswith(f"{SOURCE} holds {held}") and f"method.name={name}" in text, text


# =============================================================================== 2. MiB + SDR
def down(labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """SDR's nearest down-sampling: output index i takes source floor(i * H / h)."""
    H, W = labels.shape[-2:]
    return labels[:, [i * H // h for i in range(h)]][:, :, [j * W // w for j in range(w)]]


def sdr_batch():
    """B=2, 3 old classes + 2 new, 6 x 6 labels and logits, 16-channel 4 x 4 encoder features that
    differ from the head's ``features`` (so the terms must read ``stages[-1]``)."""
    g = torch.Generator().manual_seed(11)

    def out(classes: int) -> Out:
        stages = [torch.rand(2, 8, 8, 8, generator=g), torch.rand(2, 8, 4, 4, generator=g),
                  torch.rand(2, 16, 4, 4, generator=g), torch.rand(2, 16, 4, 4, generator=g) + 0.05]
        return Out(torch.randn(2, classes, 6, 6, generator=g) * 2, torch.randn(2, classes, 4, 4, generator=g),
                   torch.randn(2, 16, 4, 4, generator=g), stages, stages)

    new, old = out(5), out(3)
    labels = torch.tensor([0, 0, 0, 3, 4, 255])[torch.randint(0, 6, (2, 6, 6), generator=g)]
    for t in (new.logits, new.features, new.stages[-1]):
        t.requires_grad_(True)
    return new, old, labels


def naive_unce(logits, labels, num_old):
    p = torch.softmax(logits, 1)
    total = 0.0
    for b, i, j in np.ndindex(*labels.shape):
        y = int(labels[b, i, j])
        if y == 255:
            continue
        total = total - torch.log(p[b, :num_old, i, j].sum() if y < num_old else p[b, y, i, j])
    return total / labels.numel()


def naive_unkd(logits, old_logits):
    c_old = old_logits.shape[1]
    p, q = torch.softmax(logits, 1), torch.softmax(old_logits, 1)
    total = 0.0
    for b, i, j in np.ndindex(logits.shape[0], *logits.shape[2:]):
        bg = p[b, 0, i, j] + p[b, c_old:, i, j].sum()  # background: 0 or a new class
        pix = q[b, 0, i, j] * torch.log(bg) + sum(q[b, c, i, j] * torch.log(p[b, c, i, j]) for c in range(1, c_old))
        total = total - pix / c_old
    return total / (logits.shape[0] * logits.shape[2] * logits.shape[3])


def pixels_of(f, mask):
    """Feature rows (n, D) of the pixels where ``mask`` (B, h, w)."""
    return torch.stack([f[b, :, i, j] for b, i, j in np.ndindex(*mask.shape) if mask[b, i, j]])


def naive_prototypes(protos, counts, f, y, drop_background):
    protos, counts = protos.clone(), counts.clone()
    for c in sorted(set(y.flatten().tolist()) - {255} - ({0} if drop_background else set())):
        rows = pixels_of(f, y == c)
        protos[c] = (rows.sum(0) + counts[c] * protos[c]) / (counts[c] + rows.shape[0])
        counts[c] += rows.shape[0]
    return protos, counts


def naive_sdr_terms(f, protos, y, old_pred):
    d = f.shape[1]
    pseudo = torch.where(y == 0, old_pred, 0)
    old_present = sorted(set(pseudo.flatten().tolist()) - {0})
    pm = sum(((pixels_of(f, pseudo == c).mean(0) - protos[c]) ** 2).mean() for c in old_present) / len(old_present)
    present = sorted(set(y.flatten().tolist()) - {255})
    fc = sum(((pixels_of(f, y == c) - protos[c]) ** 2).sum() / (d * int((y == c).sum())) for c in present) / len(present)
    means = {c: pixels_of(f, y == c).mean(0) for c in present}
    inv = [1 / torch.sqrt(((means[a] - means[b]) ** 2).sum()) for a in present for b in present if a != b]
    sep = sum(inv) / len(inv)
    peaks = {v: pixels_of(f, y == v).max() for v in set(y.flatten().tolist())}
    ratios = []
    for b, i, j in np.ndindex(*y.shape):
        fn = f[b, :, i, j] / (peaks[int(y[b, i, j])] + 1e-15)
        ratios.append(torch.exp(fn).sum() / (fn.sum() + 1e-15))
    fs = sum(ratios) / len(ratios)
    return {"pm": pm, "fc": fc, "sep": sep, "fs": fs}, old_present, present


def sdr_setup(step, previous=None, setting="overlapped", num_old=3, num_new=2, options=None):
    method = get_method("mib+sdr")
    return StepSetup(step=step, model=tiny([3, 2]), old_model=None, num_old=num_old, num_new=num_new,
                     options=options or method.resolve_options(), previous=previous, device=torch.device("cpu"),
                     source=SOURCE, setting=setting)


def test_mib_sdr_total_at_step1_is_the_preset_sum_on_encoder_features():
    method = get_method("mib+sdr")
    assert method.classifier_init == "none" and method.base == "mib"
    new, old, labels = sdr_batch()
    g = torch.Generator().manual_seed(2)
    p0, n0 = torch.rand(3, 16, generator=g), torch.tensor([5, 7, 9])
    state = method.step_state(sdr_setup(1, {"prototypes": p0.clone(), "counts": n0.clone()}))
    torch.testing.assert_close(state.prototypes, torch.cat([p0, torch.zeros(2, 16)]), rtol=0, atol=0)
    assert state.counts.tolist() == [5, 7, 9, 0, 0]
    options = method.resolve_options()
    assert options["release_compat"] is False
    ctx = LossContext(1, new, old, labels.clone(), num_old=3, num_new=2, options=options, state=state)
    terms = method.losses(ctx, method.weights())
    assert set(terms) == {"unce", "unkd", "pm", "fc", "sep", "fs"}

    f = new.stages[-1].detach()
    y = down(labels, 4, 4)
    old_pred = down(old.logits.argmax(1), 4, 4)
    protos, counts = naive_prototypes(torch.cat([p0, torch.zeros(2, 16)]), torch.tensor([5, 7, 9, 0, 0]), f, y,
                                      drop_background=True)
    # the batch's update ran before the terms, from the detached features
    torch.testing.assert_close(state.prototypes, protos, rtol=1e-6, atol=1e-7)
    assert state.counts.tolist() == counts.tolist() and not state.prototypes.requires_grad
    naive, old_present, present = naive_sdr_terms(f, protos, y, old_pred)
    assert old_present == [1, 2] and present == [0, 3, 4]  # the case exercises every term
    expected = {"unce": naive_unce(new.logits, labels, 3), "unkd": 100 * naive_unkd(new.logits, old.logits),
                "pm": 0.01 * naive["pm"], "fc": 1e-3 * naive["fc"], "sep": 1e-3 * naive["sep"],
                "fs": 1e-3 * naive["fs"]}
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-5), k
    total = sum(terms.values())
    assert total.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)
    total.backward()
    assert new.features.grad is None and new.stages[-1].grad.abs().sum() > 0  # SDR reads the encoder output

    # release_compat reaches the terms (bug 1 mixes channels when B > 1)
    state2 = method.step_state(sdr_setup(1, {"prototypes": p0.clone(), "counts": n0.clone()},
                                         options=method.resolve_options({"release_compat": True})))
    ctx2 = LossContext(1, new, old, labels.clone(), 3, 2, options=method.resolve_options({"release_compat": True}),
                       state=state2)
    compat = method.losses(ctx2, method.weights())
    assert compat["pm"].item() != pytest.approx(terms["pm"].item(), rel=1e-3)
    assert compat["unce"].item() == terms["unce"].item()


@pytest.mark.parametrize("setting,drop_background", [("overlapped", True), ("disjoint", False)])
def test_mib_sdr_step0_is_ce_and_builds_the_prototypes(setting, drop_background):
    method = get_method("mib+sdr")
    new, _, labels = sdr_batch()
    state = method.step_state(sdr_setup(0, None, setting=setting, num_old=0, num_new=5))
    assert not state.prototypes.any() and state.prototypes.shape == (5, 16) and state.counts.tolist() == [0] * 5
    ctx = LossContext(0, new, None, labels.clone(), 0, 5, options=method.resolve_options(), state=state)
    terms = method.losses(ctx, method.weights())
    assert list(terms) == ["ce"]
    logp = torch.log_softmax(new.logits, 1)
    ce = sum(-logp[b, labels[b, i, j], i, j] for b, i, j in np.ndindex(*labels.shape) if labels[b, i, j] != 255)
    assert terms["ce"].item() == pytest.approx((ce / labels.numel()).item(), rel=1e-6)
    protos, counts = naive_prototypes(torch.zeros(5, 16), torch.zeros(5, dtype=torch.long), new.stages[-1].detach(),
                                      down(labels, 4, 4), drop_background)
    torch.testing.assert_close(state.prototypes, protos, rtol=1e-6, atol=1e-7)
    assert state.counts.tolist() == counts.tolist() and (state.counts[0] > 0) == (not drop_background)
    assert state.carry()["prototypes"] is state.prototypes


def test_mib_sdr_step1_refuses_missing_or_misshapen_prototypes():
    method = get_method("mib+sdr")
    for previous in (None, {"regularizer": "ewc", "tables": {}}):
        with pytest.raises(ValueError) as exc:
            method.step_state(sdr_setup(1, previous))
        text = one_line(exc)
        assert text.startswith(f"{SOURCE} holds no SDR prototypes") and "method.name=mib+sdr" in text
    bad = [{"prototypes": torch.zeros(4, 16), "counts": torch.zeros(4, dtype=torch.long)},  # a class too many
           {"prototypes": torch.zeros(3, 8), "counts": torch.zeros(3, dtype=torch.long)},  # other feature width
           {"prototypes": torch.zeros(3, 16), "counts": torch.zeros(2, dtype=torch.long)}]
    for previous in bad:
        with pytest.raises(ValueError) as exc:
            method.step_state(sdr_setup(1, previous))
        text = one_line(exc)
        assert text.startswith(SOURCE) and "expected (3, 16) and (3,)" in text, text


def test_release_compat_is_an_option_of_mib_sdr_only():
    assert get_method("mib+sdr").resolve_options({"release_compat": True})["release_compat"] is True
    with pytest.raises(ValueError) as exc:
        get_method("mib").resolve_options({"release_compat": True})
    assert "'method.options.release_compat'" in one_line(exc) and "'mib'" in one_line(exc)
    assert tiny_config("mib+sdr").method.name == "mib+sdr"
    load_config(None, ["method.name=mib+sdr", "method.options.release_compat=true"])
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["method.name=mib", "method.options.release_compat=true"])
    assert "method.options.release_compat" in one_line(exc)


# =============================================================================== 3. SSUL
def test_ssul_label_transform_shifts_and_marks_unknown_from_saliency():
    ssul = get_method("ssul")
    labels = np.array([[0, 0, 3, 255], [0, 1, 2, 0]], dtype=np.uint8)
    saliency = np.array([[0, 5, 0, 9], [1, 0, 0, 0]], dtype=np.uint8)
    options = ssul.resolve_options()
    assert options["unknown"] == "saliency" and ssul.inputs(options) == ("saliency",)
    out = ssul.label_transform(labels, options, saliency=saliency)
    assert out.tolist() == [[1, 0, 4, 255], [0, 2, 3, 1]]  # +1; background under saliency > 0 -> 0 (unknown)
    background = ssul.resolve_options({"unknown": "background"})
    assert ssul.inputs(background) == ()
    assert ssul.label_transform(labels, background).tolist() == [[0, 0, 4, 255], [0, 2, 3, 0]]
    assert labels.tolist() == [[0, 0, 3, 255], [0, 1, 2, 0]]


def naive_ssul_bce(logits, targets):
    total, count = 0.0, 0
    for b, i, j in np.ndindex(*targets.shape):
        y = int(targets[b, i, j])
        if y == 255:
            continue
        count += 1
        total = total + sum(bce(logits[b, c, i, j], float(c == y)) for c in range(logits.shape[1]))
    return total / count


def naive_ssul_pseudo(labels, old_logits, threshold):
    out = labels.clone()
    p = torch.sigmoid(old_logits)
    for b, i, j in np.ndindex(*labels.shape):
        score, pred = p[b, :, i, j].max(0)
        if labels[b, i, j] <= 1 and pred > 1 and score >= threshold:
            out[b, i, j] = pred
    return out


@pytest.mark.parametrize("threshold", [None, 0.9])
def test_ssul_total_is_bce_over_all_channels_after_pseudo_labels(threshold):
    ssul = get_method("ssul")
    g = torch.Generator().manual_seed(4)
    new = Out(torch.randn(2, 6, 5, 5, generator=g) * 2, None, None, None, None)  # [unk, bg, 1, 2, 3, 4]
    old = Out(torch.randn(2, 4, 5, 5, generator=g) * 3, None, None, None, None)  # [unk, bg, 1, 2]
    labels = torch.tensor([0, 1, 1, 4, 5, 255])[torch.randint(0, 6, (2, 5, 5), generator=g)]  # shifted labels
    options = ssul.resolve_options({} if threshold is None else {"pseudo_threshold": threshold})
    ctx = LossContext(1, new, old, labels.clone(), 3, 2, options=options)
    terms = ssul.losses(ctx, ssul.weights())
    pseudo = naive_ssul_pseudo(labels, old.logits, threshold or 0.7)
    assert torch.equal(ctx.labels, pseudo) and (pseudo != labels).any()
    assert ((labels <= 1) & (pseudo == labels) & (torch.sigmoid(old.logits).argmax(1) > 1)).any()  # below threshold
    assert list(terms) == ["bce"]
    assert terms["bce"].item() == pytest.approx(naive_ssul_bce(new.logits, pseudo).item(), rel=1e-6)
    # step 0: no old model, no pseudo-labels
    first = ssul.losses(LossContext(0, new, None, labels.clone(), 0, 6, options=options), ssul.weights())
    assert list(first) == ["bce"]
    assert first["bce"].item() == pytest.approx(naive_ssul_bce(new.logits, labels).item(), rel=1e-6)


def test_ssul_predict_folds_unknown_into_background():
    # sigmoids per pixel: [unknown, background, class 1, class 2]
    probs = torch.tensor([[0.5, 0.4, 0.8, 0.1],  # bg + unknown = 0.9 > 0.8 -> background
                          [0.1, 0.2, 0.6, 0.3],  # class 1
                          [0.99, 0.01, 0.5, 0.7],  # unknown alone wins the argmax, folded -> background
                          [0.3, 0.3, 0.2, 0.65]])  # 0.65 > 0.6 -> class 2
    logits = torch.logit(probs).T.reshape(1, 4, 1, 4)
    assert get_method("ssul").predict(logits).tolist() == [[[0, 1, 0, 2]]]
    assert get_method("ssul-m").predict is get_method("ssul").predict


def groups_by_name(model, optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in found, names[id(p)]
            found[names[id(p)]] = (group["lr"], group["weight_decay"])
    return found


def bn_names(model) -> set[str]:
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
            for pn, _ in m.named_parameters()}


def test_ssul_param_groups_step0_and_step1():
    cfg = tiny_config("ssul")
    lr, lr_next, wd = cfg.train.lr, cfg.train.lr_next, cfg.train.weight_decay
    model = tiny([3], "ssul")
    optimizer, _ = optimizer_and_schedule(cfg, model, 0, 10)
    found = groups_by_name(model, optimizer)
    assert set(found) == {n for n, _ in model.named_parameters()}
    for n, (group_lr, group_wd) in found.items():
        assert group_lr == pytest.approx(lr / 10 if n.startswith("backbone.") else lr) and group_wd == wd, n
    assert all(p.requires_grad for p in model.parameters())

    model = tiny([3, 2], "ssul")  # heads: 0 unknown, 1 background, 2 base classes, 3 the step's classes
    optimizer, _ = optimizer_and_schedule(cfg, model, 1, 10)
    found = groups_by_name(model, optimizer)
    bn = bn_names(model)
    rates = {"classifier.3.": lr_next, "classifier.0.": lr_next, "classifier.1.": lr_next * 1e-4}
    expected = {n: rate for n, _ in model.named_parameters() for prefix, rate in rates.items()
                if n.startswith(prefix) and n not in bn}
    assert sorted(expected) == sorted(f"classifier.{h}.{k}" for h in (0, 1, 3)
                                      for k in ("0.weight", "3.weight", "3.bias"))
    assert set(found) == set(expected)
    for n, (group_lr, group_wd) in found.items():
        assert group_lr == pytest.approx(expected[n]) and group_wd == wd, n
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in expected), n


def test_freeze_all_batchnorm_puts_every_bn_in_eval():
    for name in ("ssul", "dkd"):
        model = tiny([3, 2], name)
        model.train()
        get_method(name).train_mode(model, 1)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) > 5 and not any(m.training for m in bns)
        assert model.training and all(m.training for m in model.modules() if not isinstance(m, nn.BatchNorm2d))
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        model(torch.randn(2, 3, 32, 32))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_ssul_init_copies_the_unknown_head_into_the_new_one():
    model = tiny([3, 2], "ssul")
    randomize_batchnorm(model)
    with torch.no_grad():
        model.classifier[0][3].bias.normal_()
    untouched = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.3.")}
    model.init_new_classifier(get_method("ssul").classifier_init)
    unknown, new = model.classifier[0], model.classifier[3]
    assert torch.equal(new[0].weight, unknown[0].weight)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new[1], name), getattr(unknown[1], name)), name
    for k in range(2):
        assert torch.equal(new[3].weight[k], unknown[3].weight[0]) and new[3].bias[k] == unknown[3].bias[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in untouched.items())


def test_ssul_and_dkd_model_layouts():
    for classes, groups in (([3, 2], [1, 1, 2, 2]), ([4, 2, 1], [1, 1, 3, 2, 1])):
        model = tiny(classes, "ssul")
        assert [head[3].out_channels for head in model.classifier] == groups
        assert all(isinstance(head[1], nn.BatchNorm2d) and head[0].kernel_size == (3, 3) and head[0].bias is None
                   for head in model.classifier)
        assert model(torch.randn(2, 3, 32, 32)).logits.shape[1] == sum(classes) + 1  # unknown + C
    for classes, groups in (([3, 2], [1, 2, 2]), ([4, 2, 1], [1, 3, 2, 1])):
        model = tiny(classes, "dkd")
        assert [conv.out_channels for conv in model.classifier] == groups
        assert model(torch.randn(2, 3, 32, 32)).logits.shape[1] == sum(classes)  # aux + foreground
    for name, momentum in (("ssul", 0.01), ("dkd", 0.01), ("mib", 0.1)):
        model = tiny([3, 2], name)
        assert {m.momentum for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)} == {momentum}


# =============================================================================== 4. DKD
def test_dkd_aux_channel_sees_detached_features_and_decomposed_logits():
    model = tiny([3, 2], "dkd")
    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    f = out.features.detach()
    convs = model.classifier
    # channel 0: the aux conv; then classes 1, 2 (step 0) and 3, 4 (step 1)
    for channels, conv in ((slice(0, 1), convs[0]), (slice(1, 3), convs[1]), (slice(3, 5), convs[2])):
        ref = torch.einsum("bdhw,cd->bchw", f, conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]
        torch.testing.assert_close(out.low_logits[:, channels], ref, rtol=1e-5, atol=1e-6)
    weight = torch.cat([convs[1].weight, convs[2].weight])[:, :, 0, 0].detach()
    pos, neg = torch.zeros(2, 4, *f.shape[2:]), torch.zeros(2, 4, *f.shape[2:])
    for c in range(4):
        for d in range(f.shape[1]):
            w = float(weight[c, d])
            (pos if w > 0 else neg)[:, c] += f[:, d] * w
    torch.testing.assert_close(out.pos_logits, pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.neg_logits, neg, rtol=1e-5, atol=1e-6)

    def zero(p):
        return p.grad is None or not p.grad.any()

    trunk = [p for m in (model.backbone, model.head) for p in m.parameters()]
    out.logits[:, 0].sum().backward()  # the aux channel's gradient stops at the features
    assert all(zero(p) for p in trunk) and not zero(convs[0].weight) and zero(convs[1].weight)
    model.zero_grad(set_to_none=True)
    model(x).logits[:, 3].sum().backward()  # a foreground channel's reaches the trunk
    assert not all(zero(p) for p in model.backbone.parameters()) and not all(zero(p) for p in model.head.parameters())
    assert zero(convs[0].weight) and not zero(convs[2].weight)


def dkd_batch():
    g = torch.Generator().manual_seed(9)

    def out(fg: int) -> Out:
        return Out(torch.randn(2, 1 + fg, 6, 6, generator=g) * 2, None, None, None, None,
                   torch.randn(2, fg, 3, 3, generator=g) * 2, torch.randn(2, fg, 3, 3, generator=g) * 2)

    new, old = out(4), out(2)
    labels = torch.tensor([0, 0, 3, 4, 255])[torch.randint(0, 5, (2, 6, 6), generator=g)]
    return new, old, labels


def per_class_mean(losses_by_class):
    return sum(v.mean() for v in losses_by_class)


def test_dkd_total_at_step1_and_step0():
    dkd = get_method("dkd")
    new, old, labels = dkd_batch()
    options = dkd.resolve_options()
    terms = dkd.losses(LossContext(1, new, old, labels.clone(), 3, 2, options=options), dkd.weights())
    assert set(terms) == {"mbce", "kd", "dkd_pos", "dkd_neg", "ac"}
    z, zo = new.logits, old.logits  # channel k >= 1 is class k, channel 0 the auxiliary classifier
    mbce = per_class_mean(bce(z[:, c], (labels == c).float()) for c in (3, 4))  # void: a negative
    kd = per_class_mean(bce(z[:, c], torch.sigmoid(zo[:, c])) for c in (1, 2))
    pos = per_class_mean(bce(new.pos_logits[:, c], torch.sigmoid(old.pos_logits[:, c])) for c in (0, 1))
    neg = per_class_mean(bce(new.neg_logits[:, c], torch.sigmoid(old.neg_logits[:, c])) for c in (0, 1))
    ac = bce(z[:, 0], 0.0).mean()
    expected = {"mbce": mbce, "kd": 5 * kd, "dkd_pos": 5 * pos, "dkd_neg": 5 * neg, "ac": ac}
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-6), k
    # ignore_void: each new class averages over the non-void pixels
    kept = labels != 255
    ignored = dkd.losses(LossContext(1, new, old, labels.clone(), 3, 2, options=dkd.resolve_options(
        {"ignore_void": True})), dkd.weights())
    mbce_kept = sum(bce(z[:, c], (labels == c).float())[kept].mean() for c in (3, 4))
    assert ignored["mbce"].item() == pytest.approx(mbce_kept.item(), rel=1e-6)

    # step 0: mbce of every foreground class with pos_weight 2, + ac
    labels0 = torch.tensor([0, 1, 2, 3, 4, 255])[torch.randint(0, 6, (2, 6, 6), generator=torch.Generator().manual_seed(1))]
    first = dkd.losses(LossContext(0, new, None, labels0, 0, 5, options=options), dkd.weights())
    assert set(first) == {"mbce", "ac"}
    mbce0 = per_class_mean(bce(z[:, c], (labels0 == c).float(), pos_weight=2.0) for c in (1, 2, 3, 4))
    assert first["mbce"].item() == pytest.approx(mbce0.item(), rel=1e-6)
    assert first["ac"].item() == pytest.approx(ac.item(), rel=1e-6)


def test_dkd_predict_ignores_the_aux_channel():
    # sigmoids per pixel: [aux, class 1, class 2]
    probs = torch.tensor([[0.99, 0.4, 0.3],  # no foreground above 0.5 -> background, whatever aux says
                          [0.01, 0.6, 0.7],  # class 2
                          [0.9, 0.8, 0.55],  # class 1
                          [0.5, 0.5, 0.2]])  # 0.5 is not above 0.5 -> background
    logits = torch.logit(probs.double()).T.reshape(1, 3, 1, 4)
    assert get_method("dkd").predict(logits).tolist() == [[[0, 2, 1, 0]]]


def test_dkd_param_groups_step0_and_step1():
    cfg = tiny_config("dkd")
    lr, lr_next, wd = cfg.train.lr, cfg.train.lr_next, cfg.train.weight_decay
    model = tiny([3], "dkd")
    optimizer, _ = optimizer_and_schedule(cfg, model, 0, 10)
    found = groups_by_name(model, optimizer)
    assert set(found) == {n for n, _ in model.named_parameters()}
    for n, (group_lr, group_wd) in found.items():
        assert group_lr == pytest.approx(lr if n.startswith("backbone.") else 10 * lr) and group_wd == wd, n

    model = tiny([3, 2], "dkd")  # classifiers: 0 aux, 1 step 0, 2 the step's
    optimizer, _ = optimizer_and_schedule(cfg, model, 1, 10)
    found = groups_by_name(model, optimizer)
    bn = bn_names(model)
    assert bn and all(n.startswith(("backbone.", "head.")) for n in bn)
    expected = {}
    for n, _ in model.named_parameters():
        if n in bn:
            continue
        if n.startswith("backbone."):
            expected[n] = (lr_next, 0.0)
        elif n.startswith("classifier.2."):
            expected[n] = (10 * lr_next, wd)
        else:  # head, aux and old classifiers
            expected[n] = (10 * lr_next, 0.0)
    assert set(found) == set(expected)
    for n, (group_lr, group_wd) in found.items():
        assert group_lr == pytest.approx(expected[n][0]) and group_wd == expected[n][1], n
    for n, p in model.named_parameters():
        assert p.requires_grad == (n not in bn), n


def test_dkd_init_copies_the_aux_classifier():
    model = tiny([3, 2], "dkd")
    with torch.no_grad():
        model.classifier[0].bias.fill_(-0.7)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.2.")}
    model.init_new_classifier(get_method("dkd").classifier_init)
    aux, new = model.classifier[0], model.classifier[2]
    for k in range(2):
        assert torch.equal(new.weight[k], aux.weight[0]) and new.bias[k].item() == pytest.approx(-0.7)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# =============================================================================== 5. shared trunk
def step1_models(name: str):
    """Step 1 as the runner builds it: the old model, the step's model loaded from it and initialised,
    the optimizer's frozen parameters, then train mode and the method's train_mode."""
    method = get_method(name)
    torch.manual_seed(1)
    old = tiny([3], name)
    randomize_batchnorm(old)
    model = tiny([3, 2], name)
    load_previous_step(model, old.state_dict())
    model.init_new_classifier(method.classifier_init)
    old.eval().requires_grad_(False)
    optimizer, scheduler = optimizer_and_schedule(tiny_config(name), model, 1, 10)
    model.train()
    return method, model, old, optimizer, scheduler


def test_shares_trunk_only_for_a_frozen_equal_trunk():
    method, model, old, _, _ = step1_models("ssul")
    assert not shares_trunk(model, old)  # BN still in training mode
    method.train_mode(model, 1)
    assert shares_trunk(model, old)
    with torch.no_grad():
        old.backbone.body.layer2[0].weight[0, 0, 0, 0] += 1e-3
    assert not shares_trunk(model, old)
    assert not shares_trunk(model, None)
    for name in ("mib", "dkd"):
        method, model, old, _, _ = step1_models(name)
        if method.train_mode is not None:
            method.train_mode(model, 1)
        assert not shares_trunk(model, old), name


def test_shared_trunk_iteration_is_bit_identical_to_two_forwards():
    runs = []
    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 1, 4, 5, 255])[torch.randint(0, 6, (2, 32, 32), generator=g)]
    for shared in (True, False):
        method, model, old, optimizer, scheduler = step1_models("ssul")
        method.train_mode(model, 1)
        assert shares_trunk(model, old)
        trainee = Trainee(model, model, old, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                          shared_trunk=shared)
        criterion = Criterion(method, method.weights(), method.resolve_options(), 1, 3, 2)
        before = params_of(model)
        logged = train_one_iteration(trainee, criterion, images, labels, OPTS, Dist())
        runs.append((logged, before, {k: v.clone() for k, v in model.state_dict().items()}))
    (log_a, before_a, after_a), (log_b, before_b, after_b) = runs
    assert all(torch.equal(before_a[k], before_b[k]) for k in before_a)
    assert set(log_a) == set(log_b) == {"loss", "bce"}
    assert all(torch.equal(log_a[k], log_b[k]) for k in log_a)
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)
    moved = [k for k in before_a if not torch.equal(before_a[k], after_a[k])]
    assert moved and all(k.startswith(("classifier.0.", "classifier.1.", "classifier.3.")) for k in moved)


# =============================================================================== 6. derivation
def test_variants_derive_from_their_base():
    mib, mib_ucd = get_method("mib"), get_method("mib+ucd")
    assert mib_ucd.base == "mib" and set(mib_ucd.terms) == {"unce", "unkd", "ucd"}
    for k in ("unce", "unkd"):
        assert mib_ucd.terms[k].fn is mib.terms[k].fn and mib_ucd.terms[k].weight == mib.terms[k].weight
    assert mib_ucd.terms["ucd"].fn is builtin.ucd and mib_ucd.terms["ucd"].weight == 0.01
    assert mib_ucd.classifier_init == mib.classifier_init == "mib"
    sdr = get_method("mib+sdr")
    assert sdr.terms["unce"].fn is mib.terms["unce"].fn and sdr.terms["unkd"].fn is mib.terms["unkd"].fn
    assert sdr.terms["unkd"].weight == 100.0 and mib.terms["unkd"].weight == 10.0

    for base, variant in (("ssul", "ssul-m"), ("dkd", "dkd-m")):
        a, b = get_method(base), get_method(variant)
        assert (a.memory_size, b.memory_size) == (0, 100) and (a.base, b.base) == (None, base)
        for f in dataclasses.fields(a):
            if f.name not in ("name", "description", "base", "memory_size"):
                assert getattr(a, f.name) == getattr(b, f.name), (variant, f.name)
        assert a.first_step == b.first_step
    firsts = {n: get_method(n).first_step for n in ("ssul", "dkd", "ewc", "pi", "rw", "mib+sdr", "mib")}
    assert firsts["mib"] == "ce"
    assert len(set(firsts.values())) == len(firsts)  # ssul != dkd != ewc != pi != rw != mib+sdr != "ce"
    assert get_method("ssul").memory.mixing == "replace_half" and get_method("dkd").memory.mixing == "concat"


def test_as_joint_trains_the_first_step_terms():
    dkd = get_method("dkd")
    joint = dkd.as_joint("dkd-joint", "DKD on every class at once")
    assert joint.joint and joint.base is None and joint.name == "dkd-joint"
    assert joint.terms == dkd.first_step_terms and joint.first_step_terms == dkd.first_step_terms
    assert joint.model == dkd.model and joint.param_groups is dkd.param_groups and joint.predict is dkd.predict
    bound = joint.bind(1, joint.weights(), joint.resolve_options())
    assert [name for name, _, _ in bound.terms] == ["mbce", "ac"]
    new, _, labels = dkd_batch()
    terms = joint.losses(LossContext(0, new, None, labels, 0, 5, options=joint.resolve_options()), joint.weights())
    z = new.logits
    mbce0 = per_class_mean(bce(z[:, c], (labels == c).float(), pos_weight=2.0) for c in (1, 2, 3, 4))
    assert terms["mbce"].item() == pytest.approx(mbce0.item(), rel=1e-6)
    ft = get_method("ft").as_joint("j", "joint")
    # a joint run's only step trains every class at once: its step 0 is its own, shared with no other method
    assert ft.terms == get_method("joint").terms and ft.first_step == get_method("joint").first_step
    assert ft.first_step != get_method("ft").first_step
