"""DKD's loss terms, decomposed logits, pseudo-labels and inference rule.

Parity: tests/parity/data/dkd.npz, made by tests/parity/make_dkd.py running cvlab-yonsei/DKD's own code
(trainer/trainer_voc.py's loss blocks and prediction lines, models/loss.py, models/model.py's decomposed
logits). Prefixes: ``inc``: step t > 0 (3 old + 2 new foreground classes), ``base``: step 0 (5 classes,
pos_weight 2); ``64``/``32``: float64/float32. Hand-derived cases and naive loops beside them.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ucdseg.losses.dkd import (
    DKD_POS_WEIGHT,
    DKD_POS_WEIGHT_STEP0,
    DKD_WEIGHTS,
    decomposed_logits,
    dkd_aux_loss,
    dkd_decomposed_kd,
    dkd_kd,
    dkd_mbce,
    dkd_predict,
    dkd_pseudo_labels,
)

DATA = np.load(Path(__file__).resolve().parents[1] / "parity" / "data" / "dkd.npz")
N_OLD = 3


def close(ours: torch.Tensor, release, rel: float) -> None:
    """``rel`` relative to the release's largest magnitude (1e-10 for float64, 1e-6 for float32)."""
    ref = torch.from_numpy(np.asarray(release)).to(ours.dtype)
    scale = float(ref.abs().max()) or 1.0
    torch.testing.assert_close(ours.detach(), ref, rtol=rel, atol=rel * scale)


def case(prefix: str):
    """Our inputs as leaves (the release's), and the old model's decomposed logits from our function."""
    get = lambda k: torch.from_numpy(DATA[prefix + k])  # noqa: E731
    leaves = {k: get(k).requires_grad_(True) for k in ("logits", "aux", "features", "weight0")}
    if prefix + "weight1" in DATA:
        leaves["weight1"] = get("weight1").requires_grad_(True)
    return leaves, get


def grads(value: torch.Tensor, leaves: dict) -> dict:
    got = torch.autograd.grad(value, list(leaves.values()), retain_graph=True, allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), got)}


def check_term(prefix: str, term: str, value: torch.Tensor, leaves: dict, rel: float) -> None:
    close(value, DATA[f"{prefix}{term}"], rel)
    for name, g in grads(value, leaves).items():
        close(g, DATA[f"{prefix}{term}_grad_{name}"], rel)


# ------------------------------------------------------------------------------------------
# parity with the release
# ------------------------------------------------------------------------------------------
def test_constants_match_the_release_config():
    assert DKD_WEIGHTS == json.loads(str(DATA["weights"]))
    assert (DKD_POS_WEIGHT_STEP0, DKD_POS_WEIGHT) == (2.0, 1.0)


@pytest.mark.parametrize("prefix, rel", [("inc64_", 1e-10), ("inc32_", 1e-6)])
def test_release_step_t_terms_and_total(prefix, rel):
    leaves, get = case(prefix)
    weight = torch.cat([leaves["weight0"], leaves["weight1"]])
    s_pos, s_neg = decomposed_logits(leaves["features"], weight)
    close(s_pos, DATA[prefix + "pos_reg"], rel)
    close(s_neg, DATA[prefix + "neg_reg"], rel)
    old_pos, old_neg = decomposed_logits(get("old_features"), get("old_weight")[:, :, None, None])
    terms = {
        "loss_kd": dkd_kd(leaves["logits"], get("old_logits"), N_OLD),
        "loss_ac": dkd_aux_loss(leaves["aux"]),
        "loss_dkd_pos": dkd_decomposed_kd(s_pos, old_pos),
        "loss_dkd_neg": dkd_decomposed_kd(s_neg, old_neg),
    }
    for term, value in terms.items():
        check_term(prefix, term, value, leaves, rel)
    # L_mbce: the release computes it in float32 whatever the logits' dtype (its targets are .float())
    mbce = dkd_mbce(leaves["logits"], get("labels"), slice(N_OLD, None), pos_weight=DKD_POS_WEIGHT)
    if prefix == "inc32_":
        check_term(prefix, "loss_mbce", mbce, leaves, rel)
    total = sum(DKD_WEIGHTS[k] * v for k, v in
                {"mbce": mbce, "kd": terms["loss_kd"], "dkd_pos": terms["loss_dkd_pos"],
                 "dkd_neg": terms["loss_dkd_neg"], "ac": terms["loss_ac"]}.items())
    check_term(prefix, "loss", total, leaves, 1e-6)


def test_release_step_t_mbce_float64_within_the_releases_float32():
    leaves, get = case("inc64_")
    mbce = dkd_mbce(leaves["logits"], get("labels"), [3, 4], pos_weight=torch.ones(2, dtype=torch.float64))
    check_term("inc64_", "loss_mbce", mbce, leaves, 1e-6)


@pytest.mark.parametrize("prefix, rel", [("base64_", 1e-6), ("base32_", 1e-6)])
def test_release_step_0_mbce_pos_weight_2_and_aux(prefix, rel):
    leaves, get = case(prefix)
    labels = get("labels")
    assert (labels == 255).any()  # void pixels: negatives, as the release
    mbce = dkd_mbce(leaves["logits"], labels, slice(None), pos_weight=DKD_POS_WEIGHT_STEP0)
    check_term(prefix, "loss_mbce", mbce, leaves, rel)
    ac = dkd_aux_loss(leaves["aux"])
    check_term(prefix, "loss_ac", ac, leaves, 1e-10 if prefix == "base64_" else rel)
    check_term(prefix, "loss", mbce + ac, leaves, rel)


def test_release_predict():
    out = dkd_predict(torch.from_numpy(DATA["predict_logits"]))
    np.testing.assert_array_equal(out.numpy(), DATA["predict_out"])
    assert out[0, 0, 0] == 0 and out[0, 0, 1] == 0 and out[1, 1, 1] == 2


# ------------------------------------------------------------------------------------------
# hand-derived
# ------------------------------------------------------------------------------------------
def bce(z: float, t: float, pw: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(pw * t * math.log(p) + (1 - t) * math.log(1 - p))


def test_mbce_by_hand_void_as_negative_or_ignored():
    # fg channels [c1 (old), c2 (new), c3 (new)]; pixels: bg, c2, c3, void, c1 (old: negative)
    z = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.3, -0.7], [-2.0, 0.1, 1.5], [0.0, 1.2, -0.4], [3.0, -0.2, 0.9]],
                     dtype=torch.float64).T.reshape(1, 3, 1, 5)
    labels = torch.tensor([[[0, 2, 3, 255, 1]]])
    pw = 3.0
    t = {1: [0, 1, 0, 0, 0], 2: [0, 0, 1, 0, 0]}
    zz = z[0, :, 0].tolist()
    per_class = {c: [bce(zz[c][i], t[c][i], pw) for i in range(5)] for c in (1, 2)}
    release_like = sum(sum(v) / 5 for v in per_class.values())
    ignore = sum((sum(v) - v[3]) / 4 for v in per_class.values())
    assert math.isclose(float(dkd_mbce(z, labels, [1, 2], pw)), release_like, rel_tol=1e-12)
    assert math.isclose(float(dkd_mbce(z, labels, slice(1, 3), pw, ignore_void=True)), ignore, rel_tol=1e-12)
    # all void with ignore_void: an exact 0
    assert float(dkd_mbce(z, torch.full((1, 1, 5), 255), [1, 2], ignore_void=True)) == 0.0


def test_mbce_bad_input():
    z = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="new_classes"):
        dkd_mbce(z, torch.zeros(1, 2, 2, dtype=torch.long), [3])
    with pytest.raises(ValueError, match=r"labels contain 4, expected model-space ids in \[0, 3\]"):
        dkd_mbce(z, torch.full((1, 2, 2), 4), [2])
    with pytest.raises(ValueError, match="pos_weight"):
        dkd_mbce(z, torch.zeros(1, 2, 2, dtype=torch.long), [1, 2], pos_weight=torch.ones(3))


def test_kd_and_aux_match_naive_loops():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    z_old = torch.randn(2, 2, 2, 3, generator=g, dtype=torch.float64)
    n = 2 * 2 * 3
    kd = sum(bce(float(z[b, c, i, j]), 1 / (1 + math.exp(-float(z_old[b, c, i, j]))))
             for c in range(2) for b in range(2) for i in range(2) for j in range(3)) / n
    assert math.isclose(float(dkd_kd(z, z_old, 2)), kd, rel_tol=1e-12)
    aux = z[:, :1]
    ac = sum(math.log1p(math.exp(float(v))) for v in aux.flatten()) / n  # BCE(z, 0) = softplus(z)
    assert math.isclose(float(dkd_aux_loss(aux)), ac, rel_tol=1e-12)
    with pytest.raises(ValueError, match="num_old_fg=3"):
        dkd_kd(z, z_old, 3)


def test_decomposed_logits_by_hand():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    weight = torch.tensor([[1.0, -1.0], [-2.0, 3.0], [0.0, 0.5]], dtype=torch.float64)
    s_pos, s_neg = decomposed_logits(x, weight)
    assert s_pos.flatten().tolist() == [1.0, 6.0, 1.0]
    assert s_neg.flatten().tolist() == [-2.0, -2.0, 0.0]
    torch.testing.assert_close(s_pos + s_neg, (weight @ x.flatten()).view(1, 3, 1, 1))  # no bias
    s4, _ = decomposed_logits(x, weight[:, :, None, None])
    assert s4.flatten().tolist() == [1.0, 6.0, 1.0]
    with pytest.raises(ValueError, match="D=2"):
        decomposed_logits(x, torch.zeros(3, 4))


def test_decomposed_kd_distils_only_the_old_channels():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    s_old = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    loss = dkd_decomposed_kd(s, s_old)
    expected = sum(bce(float(s.detach()[0, c, i, j]), 1 / (1 + math.exp(-float(s_old[0, c, i, j]))))
                   for c in range(2) for i in range(2) for j in range(2)) / 4
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-12)
    loss.backward()
    assert not s.grad[:, 2].any() and s.grad[:, :2].abs().sum() > 0


def test_predict_background_where_no_foreground_sigmoid_exceeds_half():
    logits = torch.tensor([[-1.0, -0.2], [0.0, 0.0], [-3.0, 0.4], [2.0, 1.0]]).T.reshape(1, 2, 1, 4)
    # all below 0.5 -> bg; exactly 0.5 -> bg (strict); one above -> its class; both above -> argmax
    assert dkd_predict(logits).tolist() == [[[0, 0, 2, 1]]]


def test_pseudo_labels_by_hand():
    old = torch.tensor([[2.5, -3.0], [1.0, 1.5], [3.0, 0.0], [-4.0, 4.0]], dtype=torch.float64).T.reshape(1, 2, 1, 4)
    labels = torch.tensor([[[0, 0, 255, 0]]])
    # sigmoid(2.5)=0.924 -> class 1; max sigmoid(1.5)=0.82 < 0.9 kept; void kept; sigmoid(4)=0.982 -> class 2
    assert dkd_pseudo_labels(labels, old).tolist() == [[[1, 0, 255, 2]]]
    assert dkd_pseudo_labels(labels, old, 0.8).tolist() == [[[1, 2, 255, 2]]]
