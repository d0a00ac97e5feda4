"""SDR's terms (ucdseg.losses.sdr): parity with the release, a naive per-pixel reference, hand values.

``tests/parity/data/sdr.npz`` holds the release's own values (LTTM/SDR 8638296, ``utils/loss.py`` and
``train.py``), written by ``tests/parity/make_sdr.py`` in float64: ``release_compat=True`` must match
them to 1e-10, gradients included. The intended mode is compared with per-pixel loops written here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ucdseg.losses import (
    SDR_WEIGHTS,
    check_prototypes,
    downsample_labels,
    feature_clustering,
    feature_separation,
    feature_sparsification,
    old_prediction_down,
    prototype_matching,
    update_prototypes,
)

DATA = np.load(Path(__file__).resolve().parents[1] / "parity" / "data" / "sdr.npz")
SIZE = tuple(int(v) for v in DATA["feature_size"])
CASES = sorted({key.split("__")[0] for key in DATA.files if "__" in key})
TERMS = ("fc", "sep", "pm", "fs")


def case(name: str) -> dict:
    get = lambda key: torch.from_numpy(DATA[f"{name}__{key}"])  # noqa: E731
    labels = get("labels").long()
    c = {
        "labels": labels,
        "labels_down": downsample_labels(labels, SIZE),
        "features": get("features"),
        "prototypes": get("prototypes"),
        "proto_state": get("proto_state"),
        "count_state": get("count_state"),
        "old_logits": get("old_logits"),
    }
    c["old_pred_down"] = old_prediction_down(c["old_logits"], SIZE)
    c["release"] = {key: DATA[f"{name}__{key}"] for key in
                    [k.split("__")[1] for k in DATA.files if k.startswith(f"{name}__")]}
    return c


def close(actual, expected, rtol=1e-10):
    actual = actual.detach().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    expected = np.asarray(expected)
    atol = rtol * float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=max(atol, 1e-300))


def term(name: str, c: dict, features: torch.Tensor, release_compat: bool) -> torch.Tensor:
    if name == "fc":
        return feature_clustering(features, c["prototypes"], c["labels_down"], release_compat=release_compat)
    if name == "sep":
        return feature_separation(features, c["labels_down"], release_compat=release_compat)
    if name == "pm":
        return prototype_matching(features, c["prototypes"], c["labels_down"], c["old_pred_down"],
                                  release_compat=release_compat)
    return feature_sparsification(features, c["labels_down"], release_compat=release_compat)


def value_and_grad(fn, features):
    f = features.clone().requires_grad_(True)
    value = fn(f)
    (grad,) = torch.autograd.grad(value, f, allow_unused=True) if value.requires_grad else (None,)
    return value.detach(), torch.zeros_like(f) if grad is None else grad


# --------------------------------------------------------------------------------------------
# naive per-pixel references of the intended computation
# --------------------------------------------------------------------------------------------


def pixels(labels_down):
    b, h, w = labels_down.shape
    return [(i, y, x) for i in range(b) for y in range(h) for x in range(w)]


def naive_means(f, labels_down, classes):
    means = {}
    for c in classes:
        rows = [f[i, :, y, x] for (i, y, x) in pixels(labels_down) if int(labels_down[i, y, x]) == c]
        means[c] = sum(rows) / len(rows)
    return means


def clustering_classes(labels_down):
    return sorted({int(v) for v in labels_down.flatten()} - {255})


def naive_update(protos, counts, f, labels_down, drop_first):
    protos, counts = protos.clone(), counts.clone()
    classes = clustering_classes(labels_down)
    if drop_first:
        classes = [c for c in classes if c != 0]
    for c in classes:
        rows = [f[i, :, y, x] for (i, y, x) in pixels(labels_down) if int(labels_down[i, y, x]) == c]
        n, m = int(counts[c]), len(rows)
        protos[c] = (sum(rows) + n * protos[c]) / (n + m)
        counts[c] = n + m
    return protos, counts


def naive_fc(f, protos, labels_down):
    classes = clustering_classes(labels_down)
    total = 0.0
    for c in classes:
        rows = [f[i, :, y, x] for (i, y, x) in pixels(labels_down) if int(labels_down[i, y, x]) == c]
        total = total + sum(((r - protos[c]) ** 2).sum() for r in rows) / (f.shape[1] * len(rows))
    return total / len(classes)


def naive_sep(f, labels_down):
    classes = clustering_classes(labels_down)
    means = naive_means(f, labels_down, classes)
    inv = [1 / torch.sqrt(((means[a] - means[b]) ** 2).sum()) for a in classes for b in classes if a != b]
    return sum(inv) / len(inv) if inv else f.sum() * 0


def naive_pm(f, protos, labels_down, old_pred_down):
    pseudo = torch.zeros_like(labels_down)
    for (i, y, x) in pixels(labels_down):
        if int(labels_down[i, y, x]) == 0:
            pseudo[i, y, x] = old_pred_down[i, y, x]
    classes = sorted({int(v) for v in pseudo.flatten()} - {0})
    means = naive_means(f, pseudo, classes)
    terms = [((means[c] - protos[c]) ** 2).mean() for c in classes]
    return sum(terms) / len(terms) if terms else f.sum() * 0


def naive_fs(f, labels_down):
    values = sorted({int(v) for v in labels_down.flatten()})
    if values == [0]:
        return f.sum() * 0
    # the maximum is a function of the features (its pixel gets a gradient through it)
    peak = {v: torch.stack([f[i, :, y, x].max() for (i, y, x) in pixels(labels_down)
                            if int(labels_down[i, y, x]) == v]).max() for v in values}
    ratios = []
    for (i, y, x) in pixels(labels_down):
        g = f[i, :, y, x] / (peak[int(labels_down[i, y, x])] + 1e-15)
        ratios.append(torch.exp(g).sum() / (g.sum() + 1e-15))
    return sum(ratios) / len(ratios)


NAIVE = {
    "fc": lambda c, f: naive_fc(f, c["prototypes"], c["labels_down"]),
    "sep": lambda c, f: naive_sep(f, c["labels_down"]),
    "pm": lambda c, f: naive_pm(f, c["prototypes"], c["labels_down"], c["old_pred_down"]),
    "fs": lambda c, f: naive_fs(f, c["labels_down"]),
}


# --------------------------------------------------------------------------------------------
# parity with the release (release_compat=True)
# --------------------------------------------------------------------------------------------


def test_parity_data_covers_the_cases_the_brief_names():
    assert str(DATA["release_commit"]) == "8638296a6b3bd91157f1cd03b4728d91efda88e6"
    batches = {n: DATA[f"{n}__features"].shape[0] for n in CASES}
    assert {1, 3} <= set(batches.values())
    labels = {n: set(np.unique(DATA[f"{n}__labels"]).tolist()) for n in CASES}
    assert any(0 not in v and batches[n] > 1 for n, v in labels.items())  # a batch without background
    assert all(DATA[f"{n}__features"].dtype == np.float64 for n in CASES)
    assert any(255 in v for v in labels.values())


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("drop_first", [False, True])
def test_update_release_compat_matches_release(name, drop_first):
    c = case(name)
    key = f"update_drop{int(drop_first)}"
    if f"{key}_prototypes" not in c["release"]:
        pytest.skip("the release raises on this batch (background only, drop_first)")
    protos, counts = update_prototypes(c["proto_state"], c["count_state"], c["features"], c["labels_down"],
                                       drop_first=drop_first, release_compat=True)
    close(protos, c["release"][f"{key}_prototypes"])
    assert counts.dtype == torch.int64 and np.array_equal(counts.numpy(), c["release"][f"{key}_counts"])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("which", TERMS)
def test_terms_release_compat_match_release_with_gradients(name, which):
    c = case(name)
    if name == "b1_many" and which == "sep":
        pytest.skip("matrix-product cdist: its rounding depends on the BLAS (see the mm test below)")
    value, grad = value_and_grad(lambda f: term(which, c, f, True), c["features"])
    close(value, c["release"][which])
    close(grad, c["release"][f"{which}_grad"])


def test_release_separation_with_more_than_25_classes_keeps_self_pairs():
    # torch.cdist's default mode switches to |x|^2 + |y|^2 - 2 x.y beyond 25 rows; its diagonal is
    # not exactly 0, and the release's ~isinf filter keeps those self-pairs (1 / ~1e-8)
    c = case("b1_many")
    assert len(clustering_classes(c["labels_down"])) == 30
    intended = feature_separation(c["features"], c["labels_down"])
    close(intended, naive_sep(c["features"], c["labels_down"]), rtol=1e-12)
    assert c["release"]["sep"] > 1000 * float(intended)
    compat = feature_separation(c["features"], c["labels_down"], release_compat=True)
    assert float(compat) >= float(intended) * (1 - 1e-12)


@pytest.mark.parametrize("name", ["b3", "b3_nobg"])
def test_batch_order_bug_bites_for_several_images(name):
    c = case(name)
    rel = c["release"]
    protos, _ = update_prototypes(c["proto_state"], c["count_state"], c["features"], c["labels_down"],
                                  drop_first=False)
    assert not np.allclose(protos.numpy(), rel["update_drop0_prototypes"], rtol=1e-6)
    for which in ("fc", "sep"):
        assert not math.isclose(float(term(which, c, c["features"], False)), float(rel[which]), rel_tol=1e-6)


# --------------------------------------------------------------------------------------------
# intended mode: naive per-pixel loops, and the release where its bugs do not bite
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("drop_first", [False, True])
def test_update_intended_matches_naive_loop(name, drop_first):
    c = case(name)
    protos, counts = update_prototypes(c["proto_state"], c["count_state"], c["features"], c["labels_down"],
                                       drop_first=drop_first)
    ref_p, ref_n = naive_update(c["proto_state"], c["count_state"], c["features"], c["labels_down"], drop_first)
    close(protos, ref_p.numpy(), rtol=1e-12)
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_n)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("which", TERMS)
def test_terms_intended_match_naive_loop_with_gradients(name, which):
    c = case(name)
    value, grad = value_and_grad(lambda f: term(which, c, f, False), c["features"])
    ref, ref_grad = value_and_grad(lambda f: NAIVE[which](c, f), c["features"])
    close(value, ref.numpy(), rtol=1e-12)
    close(grad, ref_grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("name,drop_first", [("b1", False), ("b1", True), ("b1_nobg", False), ("b1_one", False)])
def test_update_intended_equals_release_for_one_image(name, drop_first):
    # B = 1 (no batch-order mix) and, when the first label is dropped, background present (no bug 3)
    c = case(name)
    protos, counts = update_prototypes(c["proto_state"], c["count_state"], c["features"], c["labels_down"],
                                       drop_first=drop_first)
    close(protos, c["release"][f"update_drop{int(drop_first)}_prototypes"])
    assert np.array_equal(counts.numpy(), c["release"][f"update_drop{int(drop_first)}_counts"])


@pytest.mark.parametrize("name,which", [
    ("b1_one", "fc"),  # one image, one class: neither mix nor in-loop division
    ("b1", "sep"), ("b1_nobg", "sep"), ("b1_one", "sep"),  # one image: true means
    *[(n, "fs") for n in CASES],  # no bug in sparsification
    ("b3_nobg", "pm"), ("b1_nobg", "pm"),  # no background: no pseudo-label, 0 in both
    ("b1_many", "pm"),  # one image, one pseudo-labelled pixel: the mixed rows are that pixel
])
def test_terms_intended_equal_release_where_no_bug_bites(name, which):
    c = case(name)
    value, grad = value_and_grad(lambda f: term(which, c, f, False), c["features"])
    close(value, c["release"][which])
    close(grad, c["release"][f"{which}_grad"])


def test_bugs_bite_for_one_image_in_matching_clustering_and_bg_less_update():
    c = case("b1")
    # bug 1 in prototype matching: .view(-1, D) mixes channels even for one image
    assert not math.isclose(float(term("pm", c, c["features"], False)), float(c["release"]["pm"]), rel_tol=1e-6)
    # bug 2: with several classes the in-loop division changes the attraction
    assert len(clustering_classes(c["labels_down"])) > 1
    assert not math.isclose(float(term("fc", c, c["features"], False)), float(c["release"]["fc"]), rel_tol=1e-6)
    # bug 3: without background, drop_first drops class 1 in the release, nothing in ours
    n = case("b1_nobg")
    _, counts = update_prototypes(n["proto_state"], n["count_state"], n["features"], n["labels_down"],
                                  drop_first=True)
    first = clustering_classes(n["labels_down"])[0]
    assert first != 0 and counts[first] > n["release"]["update_drop1_counts"][first]


# --------------------------------------------------------------------------------------------
# hand-derived values
# --------------------------------------------------------------------------------------------


def feats(*pixels_):
    """(1, D, 1, n) features from n per-pixel vectors."""
    return torch.tensor(pixels_, dtype=torch.float64).T[None, :, None, :].contiguous()


@pytest.mark.parametrize("release_compat", [False, True])
def test_two_class_prototype_update_by_hand(release_compat):
    f = feats([1, 2], [3, 4], [10, 0], [7, 7], [9, 9])
    labels = torch.tensor([[[1, 1, 2, 0, 255]]])
    protos = torch.tensor([[6.0, 6.0], [0.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    counts = torch.tensor([3, 2, 1])
    new_p, new_n = update_prototypes(protos, counts, f, labels, drop_first=True, release_compat=release_compat)
    # class 1: ((1,2) + (3,4) + 2 * (0,0)) / 4; class 2: ((10,0) + 1 * (5,5)) / 2; bg dropped; void skipped
    expected = torch.tensor([[6.0, 6.0], [1.0, 1.5], [7.5, 2.5]], dtype=torch.float64)
    assert torch.allclose(new_p, expected, rtol=0, atol=1e-15)
    assert new_n.tolist() == [3, 4, 2]
    assert protos[1].tolist() == [0.0, 0.0] and counts.tolist() == [3, 2, 1]  # inputs untouched
    kept_p, kept_n = update_prototypes(protos, counts, f, labels, drop_first=False, release_compat=release_compat)
    assert torch.allclose(kept_p[0], torch.tensor([(18 + 7) / 4, (18 + 7) / 4], dtype=torch.float64))
    assert kept_n.tolist() == [4, 4, 2]


def test_update_without_background_drops_a_real_class_only_in_release_compat():
    f = feats([1, 2], [3, 4], [10, 0])
    labels = torch.tensor([[[1, 1, 2]]])
    protos, counts = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    ours = update_prototypes(protos, counts, f, labels, drop_first=True)
    release = update_prototypes(protos, counts, f, labels, drop_first=True, release_compat=True)
    assert ours[1].tolist() == [0, 2, 1] and ours[0][1].tolist() == [2.0, 3.0]
    assert release[1].tolist() == [0, 0, 1] and release[0][1].tolist() == [0.0, 0.0]


def test_update_with_two_images_mixes_channels_in_release_compat():
    # two images, class 1 at one pixel each: f = (1, 2) and (3, 4). The selected values in
    # (image, channel, pixel) order are 1, 2, 3, 4; .view(D, -1) reads rows (1, 2) and (3, 4), so the
    # release's "channel" sums are 3 and 7 instead of 4 and 6.
    f = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[4.0]]]], dtype=torch.float64)
    labels = torch.ones(2, 1, 1, dtype=torch.long)
    protos, counts = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    assert update_prototypes(protos, counts, f, labels, drop_first=False)[0][1].tolist() == [2.0, 3.0]
    assert update_prototypes(protos, counts, f, labels, drop_first=False, release_compat=True)[0][1].tolist() == [1.5, 3.5]


@pytest.mark.parametrize("release_compat", [False, True])
def test_separation_of_two_class_means_at_distance_five(release_compat):
    # class 0 at the origin, class 1 pixels (2,4,0) and (4,4,0): mean (3,4,0), distance 5
    f = feats([0, 0, 0], [2, 4, 0], [4, 4, 0], [100, 100, 100]).requires_grad_(True)
    labels = torch.tensor([[[0, 1, 1, 255]]])
    loss = feature_separation(f, labels, release_compat=release_compat)
    assert math.isclose(float(loss.detach()), 0.2, rel_tol=1e-14)
    (grad,) = torch.autograd.grad(loss, f)
    # dL/dmu_1 = -(mu_1 - mu_0) / 5^3, shared by class 1's two pixels; class 0's pixel gets the opposite
    g1 = -torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64) / 125
    assert torch.allclose(grad[0, :, 0, 1], g1 / 2, atol=1e-16) and torch.allclose(grad[0, :, 0, 2], g1 / 2, atol=1e-16)
    assert torch.allclose(grad[0, :, 0, 0], -g1, atol=1e-16) and grad[0, :, 0, 3].abs().max() == 0
    one = feature_separation(f, torch.tensor([[[1, 1, 1, 255]]]), release_compat=release_compat)
    assert float(one.detach()) == 0.0 and one.requires_grad


def test_clustering_by_hand_and_in_loop_division():
    f = feats([2, 0], [1, 1], [3, 1])
    labels = torch.tensor([[[0, 1, 1]]])
    protos = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # class 0: (4 + 0) / (2 * 1) = 2; class 1: (0 + 4) / (2 * 2) = 1
    assert math.isclose(float(feature_clustering(f, protos, labels)), (2 + 1) / 2, rel_tol=1e-15)
    # release: ((0 + 2) / 2 + 1) / 2
    assert math.isclose(float(feature_clustering(f, protos, labels, release_compat=True)), 1.0, rel_tol=1e-15)


def test_prototype_matching_by_hand():
    # old prediction: class 2 on two background pixels (1,3) and (5,7), mean (3,5); p_2 = (2,2)
    f = feats([1, 3], [5, 7], [9, 9], [4, 4])
    labels = torch.tensor([[[0, 0, 1, 255]]])
    old = torch.tensor([[[2, 2, 2, 2]]])
    protos = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    assert math.isclose(float(prototype_matching(f, protos, labels, old)), (1 + 9) / 2, rel_tol=1e-15)
    # release: values 1, 5 (channel 0) then 3, 7 (channel 1), .view(-1, 2) rows (1,5), (3,7): mean (2,6)
    assert math.isclose(float(prototype_matching(f, protos, labels, old, release_compat=True)), 8.0, rel_tol=1e-15)
    nothing = prototype_matching(f, protos, labels, torch.zeros_like(old))
    assert float(nothing) == 0.0


def test_sparsification_by_hand():
    f = feats([1, 0], [2, 2])
    labels = torch.tensor([[[1, 0]]])
    # class 1: max 1, r = (e + 1) / 1; class 0: max 2, f~ = (1, 1), r = 2e / 2
    expected = ((math.e + 1) + math.e) / 2
    assert math.isclose(float(feature_sparsification(f, labels)), expected, rel_tol=1e-13)
    assert float(feature_sparsification(f, torch.zeros_like(labels))) == 0.0  # background only


def test_downsample_labels_takes_floor_index_pixels():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 256, (2, 17, 23), generator=g)
    out = downsample_labels(labels, (5, 6))
    rows, cols = [i * 17 // 5 for i in range(5)], [j * 23 // 6 for j in range(6)]
    assert out.dtype == torch.int64 and torch.equal(out, labels[:, rows][:, :, cols])
    assert torch.equal(out, F.interpolate(labels[:, None].float(), (5, 6), mode="nearest").long()[:, 0])


def test_old_prediction_down_is_argmax_then_downsample():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, 10, generator=g)
    rows, cols = [i * 9 // 4 for i in range(4)], [j * 10 // 3 for j in range(3)]
    assert torch.equal(old_prediction_down(logits, (4, 3)), logits.argmax(1)[:, rows][:, :, cols])


def test_weights_are_the_scripts():
    assert SDR_WEIGHTS == {"unce": 1.0, "unkd": 100.0, "pm": 0.01, "fc": 1e-3, "sep": 1e-3, "fs": 1e-3}


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_prototypes_of_the_wrong_size_raise_naming_both_shapes():
    f = torch.rand(1, 8, 2, 2, dtype=torch.float64)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    bad = torch.zeros(3, 4, dtype=torch.float64)
    for call in (
        lambda: feature_clustering(f, bad, labels),
        lambda: prototype_matching(f, bad, labels, labels),
        lambda: update_prototypes(bad, torch.zeros(3, dtype=torch.long), f, labels, drop_first=False),
    ):
        with pytest.raises(ValueError, match=r"prototypes of shape \(3, 4\).*features of shape \(1, 8, 2, 2\)"):
            call()
    with pytest.raises(ValueError, match=r"holds class 5, outside prototypes of shape \(3, 8\)"):
        feature_clustering(f, torch.zeros(3, 8, dtype=torch.float64), labels + 5)
    with pytest.raises(ValueError, match=r"counts must be .* \(3,\).*\(3, 8\), got \(4,\)"):
        update_prototypes(torch.zeros(3, 8), torch.zeros(4, dtype=torch.long), f, labels, drop_first=False)
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected .* = \(21, 2048\)"):
        check_prototypes(bad, 21, 2048)
    with pytest.raises(ValueError, match=r"labels_down must be .* \(1, 2, 2\)") as info:
        feature_separation(f, torch.zeros(1, 4, 4, dtype=torch.long))
    assert "\n" not in str(info.value)
