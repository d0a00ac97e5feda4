"""EWC, PI and RW (``ucdseg.losses.regularizers``): against MiB's release, by hand, and resumed.

The release values come from ``tests/parity/make_regularizers.py`` (MiB's ``utils/regularizer.py``
run unchanged; its docstring has the command); this file replays the same inputs, network and
loop with ucdseg's classes. The other expected values are computed by hand or by naive loops here.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from ucdseg.losses import (
    EWC,
    REGULARIZERS,
    PathIntegral,
    RiemannianWalk,
    normalize_importance,
)

PARITY = Path(__file__).resolve().parents[1] / "parity"
_spec = importlib.util.spec_from_file_location("make_regularizers", PARITY / "make_regularizers.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

EPS = 1e-8
f64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=f64)


def leaf(*values: float) -> torch.Tensor:
    return t(*values).requires_grad_()


def roundtrip(obj):
    """What a checkpoint does to a state: torch.save then torch.load."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


# ------------------------------------------------------------------------------------------
# Parity with MiB's release
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def release_data() -> dict[str, np.ndarray]:
    with np.load(PARITY / "data" / "regularizers.npz") as data:
        return {k: data[k] for k in data.files}


def train_two_steps(name: str, kill_at: int | None = None, kill_step: int = 1):
    """Steps 0 and 1 of the parity run with ucdseg's class; optionally "killed" before iteration
    ``kill_at`` of ``kill_step`` and resumed from a round-tripped ``state_dict``."""
    data, cls = release_data(), REGULARIZERS[name]
    kwargs = dict(alpha=gen.ALPHA, iterations=gen.ITERATIONS)
    model_old, previous, out = None, None, []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in (0, 1):
            model = gen.build_model(data, step, model_old)
            args = (
                dict(model.named_parameters()),
                None if model_old is None else dict(model_old.named_parameters()),
                previous,
            )
            holder = [cls(*args, **kwargs)]

            def get_reg(it: int):
                if step == kill_step and it == kill_at:
                    state = roundtrip(holder[0].state_dict())
                    holder[0] = cls(*args, **kwargs)  # a new process, same step inputs
                    holder[0].load_state_dict(state)
                return holder[0]

            run = gen.run_step(
                model, get_reg, data[f"images{step}"], data[f"labels{step}"],
                lambda l_reg: l_reg.requires_grad,
            )
            out.append((model, holder[0], run))
            previous = roundtrip(holder[0].carry())
            model_old = gen.frozen_copy(model)
    finally:
        torch.set_num_threads(threads)
    return out


@functools.lru_cache(maxsize=None)
def uninterrupted(name: str):
    return train_two_steps(name)


def ours(name: str, step: int, kind: str, table: str, key: str) -> torch.Tensor:
    model, reg, run = uninterrupted(name)[step]
    if kind == "penalty":
        return torch.from_numpy(run["penalty"])
    if kind == "grad":
        return run["grads"][key]
    if kind == "params":
        return dict(model.named_parameters())[key].detach()
    if table in reg.carried:
        return reg.carry()[table][key]
    return reg.state_dict()[table][key]  # PI's delta, RW's score_sum


def release_items(name: str):
    """Every recorded array of ``name``: (step, kind, table, key, array)."""
    for full, array in release_data().items():
        parts = full.split(".", 2)
        if parts[0] != name:
            continue
        head, rest = parts[1], parts[2] if len(parts) > 2 else ""
        kind, step = head.rstrip("01"), int(head[-1])
        table, key = rest.split(".", 1) if kind == "state" else ("", rest)
        yield step, kind, table, key, array


def max_deviation(got: torch.Tensor, want: np.ndarray) -> float:
    return float((got.double() - torch.from_numpy(want)).abs().max()) if want.size else 0.0


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_matches_mibs_release_over_two_steps(name):
    kinds = set()
    for step, kind, table, key, want in release_items(name):
        got = ours(name, step, kind, table, key).detach().double().numpy()
        assert got.shape == want.shape, (step, kind, table, key)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(
            got, want, rtol=1e-10, atol=1e-10 * scale,
            err_msg=f"{name} step {step} {kind} {table} {key}",
        )
        kinds.add((kind, table))
    expected_tables = {
        "ewc": {"fisher"}, "pi": {"omega", "delta"}, "rw": {"fisher", "score", "score_sum"}
    }
    assert kinds == {("penalty", ""), ("grad", ""), ("params", "")} | {
        ("state", table) for table in expected_tables[name]
    }
    data = release_data()
    # The recorded run is not degenerate: no penalty at step 0, a growing one at step 1.
    assert not data[f"{name}.penalty0"].any()
    assert data[f"{name}.penalty1"][0] == 0.0 and (data[f"{name}.penalty1"][1:] > 0).all()


def test_parity_data_covers_every_parameter_and_step():
    data = release_data()
    keys = [k for k, _ in gen.TinyNet(gen.CLASSES[1]).named_parameters()]
    for name in ("ewc", "pi", "rw"):
        assert {k for k in keys if f"{name}.params1.{k}" in data} == set(keys)
        assert data[f"{name}.grad1.conv1.weight"].shape[0] == len(gen.GRAD_ITERS)
    # RW's score was updated (calls 10 and 20) and clipped: the raw sum has negative entries.
    assert (data["rw.state0.score_sum.conv2.weight"] < 0).any()
    assert (data["rw.state0.score.conv2.weight"] >= 0).all()


# ------------------------------------------------------------------------------------------
# Resume: a kill mid-step, a new object, load_state_dict, and the run continues bit for bit
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
@pytest.mark.parametrize("kill_step,kill_at", [(0, 13), (1, 1), (1, 10), (1, 13)])
def test_resume_mid_step_is_bit_identical(name, kill_step, kill_at):
    reference, resumed = uninterrupted(name), train_two_steps(name, kill_at, kill_step)
    for (model_a, reg_a, run_a), (model_b, reg_b, run_b) in zip(reference, resumed):
        assert np.array_equal(run_a["penalty"], run_b["penalty"])
        for (key, p), q in zip(model_a.named_parameters(), model_b.parameters()):
            assert torch.equal(p, q), key
        for table, values in reg_a.carry().items():
            other = reg_b.carry()[table]
            assert values.keys() == other.keys()
            assert all(torch.equal(values[k], other[k]) for k in values), table
        state_a, state_b = reg_a.state_dict(), reg_b.state_dict()
        assert state_a["calls"] == state_b["calls"] == gen.N_ITER


def test_pi_resume_keeps_step0_starting_point():
    # MiB's PI reloads only the new keys' θ_start (regularizer.py:205-206): at step 0 a resumed
    # object would measure θ - θ_start from the resume point. Ours keeps the original one.
    w = leaf(1.0, 2.0)
    reg = PathIntegral({"w": w}, None, None)
    with torch.no_grad():
        w += 0.5
    resumed = PathIntegral({"w": w}, None, None)
    resumed.load_state_dict(roundtrip(reg.state_dict()))
    assert torch.equal(resumed.theta_start["w"], t(1.0, 2.0))


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------


def test_normalize_importance_min_max_per_tensor():
    got = normalize_importance(t(1.0, 3.0, 5.0))
    assert torch.equal(got, t(0.0, 2.0 / (4.0 + EPS), 4.0 / (4.0 + EPS)))


def test_normalize_importance_of_a_constant_tensor_is_zero():
    constant = torch.full((2, 3), 5.0, dtype=f64)
    assert torch.equal(normalize_importance(constant), torch.zeros(2, 3, dtype=f64))
    assert torch.equal(normalize_importance(t(7.0)), t(0.0))  # one element: never penalised


def test_constant_importance_gives_zero_penalty_with_a_gradient_path():
    w = leaf(1.0, 2.0)
    reg = EWC({"w": w}, {"w": t(0.0, 0.0)}, {"fisher": {"w": t(3.0, 3.0)}})
    penalty = reg.penalty()
    assert penalty.item() == 0.0 and penalty.requires_grad


# ------------------------------------------------------------------------------------------
# EWC by hand
# ------------------------------------------------------------------------------------------


def ewc_example(normalize: bool = True):
    params = {"w": leaf(1.0, 2.0, 4.0), "b": leaf(0.5), "new": leaf(3.0)}
    old = {"w": t(0.0, 1.0, 1.0), "b": t(0.0)}  # "new" is a new step's parameter
    previous = {"fisher": {"w": t(1.0, 2.0, 5.0), "b": t(7.0)}}
    return params, EWC(params, old, previous, normalize=normalize)


def test_ewc_two_parameter_penalty_by_hand():
    params, reg = ewc_example()
    penalty = reg.penalty()
    # norm(F_w) = [0, 1, 4] / (4 + 1e-8); norm(F_b) = 0; (θ - θ*)^2: w [1, 1, 9], b 0.25
    assert penalty.item() == pytest.approx(37.0 / (4.0 + EPS), rel=1e-14)
    penalty.backward()
    assert torch.allclose(params["w"].grad, t(0.0, 2.0, 24.0) / (4.0 + EPS), rtol=1e-14, atol=0)
    assert params["b"].grad.item() == 0.0
    assert params["new"].grad is None  # a new parameter is free


def test_ewc_penalty_without_normalisation():
    _, reg = ewc_example(normalize=False)
    assert reg.penalty().item() == pytest.approx(1 * 1 + 2 * 1 + 5 * 9 + 7 * 0.25, rel=1e-14)


def test_ewc_fisher_is_an_ema_from_the_unnormalised_previous_f():
    params, reg = ewc_example()
    before = reg.penalty().item()
    params["w"].grad = t(1.0, -2.0, 0.5)
    params["b"].grad = t(3.0)  # "new" has no gradient: skipped, keeps its F = 1
    reg.update()
    fisher = reg.carry()["fisher"]
    assert torch.allclose(fisher["w"], t(0.9 + 0.1, 3.6 + 0.2, 0.225 + 0.5), rtol=1e-14, atol=0)
    assert fisher["b"].item() == pytest.approx(8.1 + 0.7, rel=1e-14)
    assert torch.equal(fisher["new"], t(1.0))
    assert reg.penalty().item() == before  # the penalty uses F_{t-1}, not this step's F


def test_ewc_step0_starts_at_ones_and_has_no_penalty():
    w = leaf(1.0, -1.0)
    reg = EWC({"w": w}, None, None)
    assert not reg.active
    penalty = reg.penalty()
    assert penalty.item() == 0.0 and not penalty.requires_grad
    w.grad = t(2.0, 0.0)
    reg.update()
    assert torch.allclose(reg.carry()["fisher"]["w"], t(0.9 * 4 + 0.1, 0.1), rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------
# PI by hand: gradient descent on L = c θ^2 / 2
# ------------------------------------------------------------------------------------------


def descend(reg, w: torch.Tensor, c: float, lr: float, n: int, ascend: bool = False) -> None:
    for _ in range(n):
        w.grad = c * w.detach().clone()
        reg.update()
        with torch.no_grad():
            w += lr * w.grad if ascend else -lr * w.grad


def quadratic_delta(theta0: float, c: float, lr: float, n: int) -> float:
    """The release's δ after n calls: θ_k = θ0 r^k, δ = sum_{k=1}^{n-1} c θ_k (θ_{k-1} - θ_k)."""
    r = 1.0 - lr * c
    return lr * c * c * theta0 * theta0 * r * (1.0 - r ** (2 * (n - 1))) / (1.0 - r * r)


def test_pi_omega_on_a_quadratic_at_step0():
    c, lr, n, theta0 = 2.0, 0.1, 12, 1.5
    w = leaf(theta0)
    reg = PathIntegral({"w": w}, None, None)
    descend(reg, w, c, lr, n)
    theta_n = theta0 * (1.0 - lr * c) ** n
    expected = quadratic_delta(theta0, c, lr, n) / ((theta_n - theta0) ** 2 + 1e-20)
    assert reg.carry()["omega"]["w"].item() == pytest.approx(expected, rel=1e-12)


def test_pi_step1_starts_from_theta_star_and_sums_omega():
    c, lr, n = 2.0, 0.1, 8
    w = leaf(2.5)  # the step starts at 2.5, θ* = 2.0: θ_start is θ*
    reg = PathIntegral({"w": w}, {"w": t(2.0)}, {"omega": {"w": t(0.7)}}, normalize=False)
    assert reg.penalty().item() == pytest.approx(0.7 * 0.25, rel=1e-14)
    descend(reg, w, c, lr, n)
    theta_n = 2.5 * (1.0 - lr * c) ** n
    expected = quadratic_delta(2.5, c, lr, n) / ((theta_n - 2.0) ** 2 + 1e-20) + 0.7
    assert reg.carry()["omega"]["w"].item() == pytest.approx(expected, rel=1e-12)


def test_pi_negative_path_integral_is_clipped_to_zero():
    w = leaf(1.0)
    reg = PathIntegral({"w": w}, {"w": t(1.0)}, {"omega": {"w": t(0.3)}})
    descend(reg, w, 1.0, 0.1, 5, ascend=True)  # moving uphill: δ < 0
    assert reg.state_dict()["delta"]["w"].item() < 0
    assert reg.carry()["omega"]["w"].item() == pytest.approx(0.3, rel=1e-15)


def test_pi_first_call_only_takes_a_snapshot():
    w = leaf(1.0)
    reg = PathIntegral({"w": w}, None, None)
    w.grad = t(5.0)
    reg.update()
    assert reg.state_dict()["delta"]["w"].item() == 0.0
    assert torch.equal(reg.theta_prev["w"], t(1.0))


# ------------------------------------------------------------------------------------------
# RW by hand
# ------------------------------------------------------------------------------------------


def rw_sequence(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ and g at call k (any values: the regulariser only reads them)."""
    theta = t(0.1 * k + 0.01 * k * k, 1.0 - 0.05 * k)
    grad = t(0.3 + 0.02 * k, 0.4 - 0.01 * k)
    return theta, grad


def naive_rw(calls: int, iterations: int = 10, alpha: float = 0.9):
    fisher, score, prev = t(1.0, 1.0), t(0.0, 0.0), None
    for k in range(calls):
        theta, g = rw_sequence(k)
        if k % iterations == 0:
            if prev is not None:
                score = score + g * (prev - theta) / (0.5 * fisher * (theta - prev) ** 2 + EPS)
            prev = theta
        fisher = alpha * g * g + (1 - alpha) * fisher
    return fisher, score


def feed_rw(reg, params: list[torch.Tensor], calls: range) -> None:
    for k in calls:
        theta, g = rw_sequence(k)
        for p in params:
            with torch.no_grad():
                p.copy_(theta)
            p.grad = g.clone()
        reg.update()


def test_rw_scores_every_ten_calls_with_the_fisher_before_the_update():
    w = leaf(0.0, 0.0)
    reg = RiemannianWalk({"w": w}, None, None)
    feed_rw(reg, [w], range(10))
    assert torch.equal(reg.state_dict()["score_sum"]["w"], t(0.0, 0.0))  # calls 0-9: snapshot only
    feed_rw(reg, [w], range(10, 11))
    fisher9, _ = naive_rw(10)
    (theta0, _), (theta10, g10) = rw_sequence(0), rw_sequence(10)
    by_hand = g10 * (theta0 - theta10) / (0.5 * fisher9 * (theta10 - theta0) ** 2 + EPS)
    assert torch.allclose(reg.state_dict()["score_sum"]["w"], by_hand, rtol=1e-13, atol=0)
    fisher10, _ = naive_rw(11)  # F after call 10's update would give another value
    wrong = g10 * (theta0 - theta10) / (0.5 * fisher10 * (theta10 - theta0) ** 2 + EPS)
    assert not torch.allclose(by_hand, wrong, rtol=1e-6)
    feed_rw(reg, [w], range(11, 25))
    fisher, score = naive_rw(25)
    assert torch.allclose(reg.state_dict()["score_sum"]["w"], score, rtol=1e-13, atol=0)
    assert torch.allclose(reg.carry()["fisher"]["w"], fisher, rtol=1e-13, atol=0)
    assert (score < 0).any() and (score > 0).any()  # the example exercises the clipping
    assert torch.equal(reg.carry()["score"]["w"], score.clamp(min=0))  # step 0: max(s, 0)


def test_rw_score_halves_with_the_previous_one_and_new_keys_are_not_halved():
    w, new = leaf(0.0, 0.0), leaf(0.0, 0.0)
    previous = {"fisher": {"w": t(1.0, 3.0)}, "score": {"w": t(4.0, 2.0)}}
    reg = RiemannianWalk({"w": w, "new": new}, {"w": t(0.0, 0.0)}, previous)
    feed_rw(reg, [w, new], range(21))  # both follow the same path
    _, s_new = naive_rw(21)  # "new" has no previous F: it starts at ones, as naive_rw
    s_w = reg.state_dict()["score_sum"]["w"]
    score = reg.carry()["score"]
    assert torch.allclose(score["w"], 0.5 * (s_w.clamp(min=0) + t(4.0, 2.0)), rtol=1e-15, atol=0)
    assert torch.allclose(score["new"], s_new.clamp(min=0), rtol=1e-13, atol=0)  # not halved
    assert (score["new"] > 0).any()


def test_rw_penalty_by_hand():
    w = leaf(1.0, -2.0)
    previous = {"fisher": {"w": t(1.0, 3.0)}, "score": {"w": t(4.0, 2.0)}}
    reg = RiemannianWalk({"w": w}, {"w": t(0.0, 0.0)}, previous)
    # norm(F) + norm(S) = [0, 2/(2+1e-8)] + [2/(2+1e-8), 0]; (θ - θ*)^2 = [1, 4]
    assert reg.penalty().item() == pytest.approx(10.0 / (2.0 + EPS), rel=1e-14)
    unnormalised = RiemannianWalk({"w": w}, {"w": t(0.0, 0.0)}, previous, normalize=False)
    assert unnormalised.penalty().item() == pytest.approx(5.0 * 1 + 5.0 * 4, rel=1e-14)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_registry_names():
    assert {name: cls.name for name, cls in REGULARIZERS.items()} == {
        "ewc": "ewc", "pi": "pi", "rw": "rw"
    }


@pytest.mark.parametrize(
    "cls,previous,match",
    [
        (EWC, {"fisher": {}}, r"ewc regulariser state of the previous step has no fisher\['w'\]"),
        (
            PathIntegral,
            {"omega": {"w": t(1.0, 2.0)}},
            r"pi .*omega\['w'\] has shape \(2,\), the parameter has \(3,\)",
        ),
        (RiemannianWalk, {"fisher": {"w": t(1.0, 2.0, 3.0)}}, r"rw .* no 'score' table"),
        (
            RiemannianWalk,
            {"fisher": {"w": t(1.0, 2.0, 3.0)}, "score": {}},
            r"rw .* no score\['w'\]",
        ),
    ],
)
def test_bad_previous_state_is_a_one_line_error(cls, previous, match):
    with pytest.raises(ValueError, match=match) as info:
        cls({"w": leaf(1.0, 2.0, 3.0)}, {"w": t(0.0, 0.0, 0.0)}, previous)
    assert "\n" not in str(info.value)


def test_bad_arguments():
    w = leaf(1.0)
    with pytest.raises(ValueError, match="without the old model's parameters"):
        EWC({"w": w}, None, {"fisher": {"w": t(1.0)}})
    with pytest.raises(ValueError, match="module"):
        EWC({"module.w": w}, {"w": t(0.0)}, None)
    with pytest.raises(ValueError, match=r"old parameter 'w' has shape \(2,\)"):
        EWC({"w": w}, {"w": t(0.0, 0.0)}, None)
    with pytest.raises(ValueError, match="alpha"):
        EWC({"w": w}, None, None, alpha=1.5)
    with pytest.raises(ValueError, match="iterations"):
        RiemannianWalk({"w": w}, None, None, iterations=0)
    with pytest.raises(ValueError, match="at least one parameter"):
        PathIntegral({}, None, None)


def test_bad_state_dict():
    w = leaf(1.0, 2.0)
    with pytest.raises(ValueError, match="cannot load a 'ewc' regulariser state into pi"):
        PathIntegral({"w": w}, None, None).load_state_dict(EWC({"w": w}, None, None).state_dict())
    state = RiemannianWalk({"w": w}, None, None).state_dict()
    with pytest.raises(ValueError, match="iterations=10, this run has 5"):
        RiemannianWalk({"w": w}, None, None, iterations=5).load_state_dict(state)
    state["fisher"] = {"w": t(1.0)}
    with pytest.raises(ValueError, match=r"fisher\['w'\] has shape \(1,\), expected \(2,\)"):
        RiemannianWalk({"w": w}, None, None).load_state_dict(state)
    state["fisher"] = {}
    with pytest.raises(ValueError, match=r"fisher keys differ .*missing \['w'\]"):
        RiemannianWalk({"w": w}, None, None).load_state_dict(state)
