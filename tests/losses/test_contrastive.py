"""UCD contrastive distillation vs a naive loop implementation written from docs/protocol.md §3."""

import math

import pytest
import torch
import torch.nn.functional as F

from ucdseg.losses import (
    contrastive_distillation,
    contrastive_distillation_flat,
    gathered_contrastive_distillation,
    prepare_contrastive_inputs,
    resize_labels_nearest,
)
from ucdseg.losses import contrastive, gathered

TAU = 0.07


# ----------------------------------------------------------------------------------------------
# naive reference: explicit loops over pixels, anchors and positives (docs/protocol.md §3, steps 1-6)
# ----------------------------------------------------------------------------------------------
def naive_ucd(f, g, z_old, y, tau=TAU, formulation="reference", void="ignore"):
    """Returns (loss, number of anchors with >= 1 positive). ``y`` is at the feature size.
    ``void="background"``: a void pixel is read as a pixel labelled 0 (the UCD releases)."""
    f, g, z_old = f.double(), g.double(), z_old.double()
    batch, _, h, w = f.shape
    p = torch.softmax(z_old, dim=1)
    anchors, a_lab, a_prob, a_gt = [], [], [], []
    olds, o_lab, o_prob = [], [], []
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                lab = int(y[b, i, j])
                if lab == 255:
                    if void == "ignore":
                        continue
                    lab = 0
                gt = lab != 0
                if not gt:
                    lab = int(p[b, :, i, j].argmax())
                    if lab == 0:
                        continue
                v = f[b, :, i, j]
                anchors.append(v / v.norm())
                a_lab.append(lab)
                a_prob.append(p[b, :, i, j])
                a_gt.append(gt)
                if not gt:
                    u = g[b, :, i, j].detach()
                    olds.append(u / u.norm())
                    o_lab.append(lab)
                    o_prob.append(p[b, :, i, j])
    contrast = [a.detach() for a in anchors] + olds
    c_lab, c_prob, c_gt = a_lab + o_lab, a_prob + o_prob, a_gt + [False] * len(olds)

    losses = []
    for i, a in enumerate(anchors):
        s = [torch.dot(a, c) / tau for c in contrast]
        pos = [k for k in range(len(contrast)) if c_lab[k] == a_lab[i] and k != i]
        if not pos:
            continue
        neg_sum = torch.zeros((), dtype=torch.float64)
        for n in range(len(contrast)):
            if c_lab[n] != a_lab[i]:
                neg_sum = neg_sum + torch.exp(s[n])
        m = torch.stack(s).max().detach() if formulation == "reference" else 0.0
        total = 0.0
        for k in pos:
            w_ik = 1.0 if (a_gt[i] and c_gt[k]) else torch.dot(a_prob[i], c_prob[k])
            l_ik = (s[k] - m) - torch.log(torch.exp(s[k] - m) + neg_sum)
            total = total + w_ik * l_ik
        losses.append(-total / len(pos))
    if not losses:
        return f.sum() * 0, 0
    return torch.stack(losses).mean(), len(losses)


def make_case(seed, batch=2, dim=5, h=3, w=4, old=4, new=(4, 5), dtype=torch.float64):
    """Random maps; labels mix background, ignore, new classes and a PLOP-style old-class label."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(batch, dim, h, w, generator=gen, dtype=torch.float64)
    g = f + 0.5 * torch.randn(batch, dim, h, w, generator=gen, dtype=torch.float64)
    z = 2.0 * torch.randn(batch, old, h, w, generator=gen, dtype=torch.float64)
    choices = torch.tensor([0, 0, 0, 255, *new, 2])
    y = choices[torch.randint(len(choices), (batch, h, w), generator=gen)]
    return f.to(dtype), g.to(dtype), z.to(dtype), y


def grad_of(fn, f):
    f = f.clone().requires_grad_(True)
    loss = fn(f)
    loss.backward()
    return loss.detach(), f.grad


# ----------------------------------------------------------------------------------------------
# hand-made case (value computed by reasoning)
# ----------------------------------------------------------------------------------------------
def hand_case():
    # 1 image, 1 x 5 pixels, D = 2, C_old = 2 (bg, class 1), new class 2.
    # pixel 0, 1: GT class 2, features along e1 (norms 2 and 3)
    # pixel 2: label 0, old model says class 1 with p = (1/4, 3/4); f and g along e2
    # pixel 3: ignore; pixel 4: label 0, old model says background -> dropped
    f = torch.tensor([[[[2.0, 3.0, 0.0, 7.0, -1.0]], [[0.0, 0.0, 0.5, 7.0, 5.0]]]])
    g = torch.tensor([[[[9.0, 9.0, 0.0, 1.0, 2.0]], [[1.0, 1.0, 4.0, 3.0, 4.0]]]])
    z = torch.tensor([[[[0.0, 0.0, 0.0, 0.0, 5.0]], [[0.0, 0.0, math.log(3.0), 0.0, 0.0]]]])
    y = torch.tensor([[[2, 2, 0, 255, 0]]])
    return f, g, z, y


def test_hand_made_case_literal_values():
    # anchors a0=a1=e1 (label 2, GT), a2=e2 (label 1); contrast = [a0, a1, a2, g2=e2], tau = 1.
    # anchor 0: positive a1 (s=1, w=1), negatives a2, g2 (s=0, 0) -> N = 2, m = 1.
    #   reference: -l = log(e^0 + 2) = log 3;  supcon: -l = log(e + 2) - 1.  Anchor 1 is the same.
    # anchor 2: positive g2 (s=1), negatives a0, a1 (N = 2), w = 1/16 + 9/16 = 0.625.
    # mean over 3 anchors: (1 + 1 + 0.625) / 3 = 0.875 times the per-pair value.
    f, g, z, y = hand_case()
    ref = contrastive_distillation(f, g, z, y, temperature=1.0, formulation="reference")
    sup = contrastive_distillation(f, g, z, y, temperature=1.0, formulation="supcon")
    assert ref.item() == pytest.approx(0.961285753, abs=1e-6)  # 0.875 * log 3
    assert sup.item() == pytest.approx(0.482514125, abs=1e-6)  # 0.875 * (log(e + 2) - 1)
    assert ref.dtype == torch.float32 and ref.dim() == 0


def test_hand_case_selection():
    f, g, z, y = hand_case()
    inp = prepare_contrastive_inputs(f, g, z, y)
    assert inp.anchor_labels.tolist() == [2, 2, 1]
    assert inp.anchor_is_gt.tolist() == [True, True, False]
    assert inp.contrast_labels.tolist() == [2, 2, 1, 1]
    assert inp.contrast_is_gt.tolist() == [True, True, False, False]
    assert inp.self_index.tolist() == [0, 1, 2]
    torch.testing.assert_close(inp.anchors, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(inp.contrast[3], torch.tensor([0.0, 1.0]))
    assert not inp.contrast.requires_grad


# ----------------------------------------------------------------------------------------------
# agreement with the naive reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("formulation", ["reference", "supcon"])
@pytest.mark.parametrize("block_size", [1, 3, 7, 1000])
def test_streamed_matches_naive_value_and_gradient(formulation, block_size):
    f, g, z, y = make_case(seed=0)
    want, want_grad = grad_of(lambda x: naive_ucd(x, g, z, y, formulation=formulation)[0], f)
    got, got_grad = grad_of(
        lambda x: contrastive_distillation(
            x, g, z, y, formulation=formulation, block_size=block_size
        ),
        f,
    )
    assert naive_ucd(f, g, z, y)[1] > 5  # the case has a fair number of anchors
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert want_grad.abs().sum() > 0


def test_formulations_differ_and_other_seeds_match():
    for seed in (1, 2):
        f, g, z, y = make_case(seed=seed)
        for form in ("reference", "supcon"):
            want = naive_ucd(f, g, z, y, formulation=form)[0]
            got = contrastive_distillation(f, g, z, y, formulation=form, block_size=4)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    f, g, z, y = make_case(seed=0)
    ref = contrastive_distillation(f, g, z, y, formulation="reference")
    sup = contrastive_distillation(f, g, z, y, formulation="supcon")
    assert abs(ref.item() - sup.item()) > 1e-3


def test_many_classes_are_kept():
    # ADE-like ids: 101 old channels, GT labels 120 and 149 (the release cut labels > 20 to 0)
    f, g, z, y = make_case(seed=3, old=101, new=(120, 149))
    inp = prepare_contrastive_inputs(f, g, z, y)
    assert {120, 149} <= set(inp.anchor_labels.tolist())
    want, want_grad = grad_of(lambda x: naive_ucd(x, g, z, y)[0], f)
    got, got_grad = grad_of(lambda x: contrastive_distillation(x, g, z, y, block_size=5), f)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_gradient_flows_only_into_new_features():
    f, g, z, y = make_case(seed=4, dtype=torch.float32)
    f.requires_grad_(True)
    g.requires_grad_(True)
    z.requires_grad_(True)
    contrastive_distillation(f, g, z, y).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert g.grad is None and z.grad is None


# ----------------------------------------------------------------------------------------------
# void cells: "ignore" (default) drops them, "background" reads them as 0 (both UCD releases)
# ----------------------------------------------------------------------------------------------
def void_as_background(y):
    return torch.where(y == 255, torch.zeros_like(y), y)


def test_hand_case_void_as_background_enters_as_an_old_model_pixel():
    # the hand case, but the old model says class 1 at the void pixel 3 (p = (1/4, 3/4))
    f, g, z, y = hand_case()
    z[0, 1, 0, 3] = math.log(3.0)
    ignored = prepare_contrastive_inputs(f, g, z, y, void="ignore")
    assert ignored.anchor_labels.tolist() == [2, 2, 1] and ignored.contrast_labels.tolist() == [2, 2, 1, 1]
    inp = prepare_contrastive_inputs(f, g, z, y, void="background")
    assert inp.anchor_labels.tolist() == [2, 2, 1, 1]
    assert inp.anchor_is_gt.tolist() == [True, True, False, False]
    assert inp.contrast_labels.tolist() == [2, 2, 1, 1, 1, 1]
    assert inp.contrast_is_gt.tolist() == [True, True, False, False, False, False]
    s = 1 / math.sqrt(2)  # f = (7, 7) and g = (1, 3) at pixel 3, normalised
    torch.testing.assert_close(inp.anchors[3], torch.tensor([s, s]))
    torch.testing.assert_close(inp.contrast[5], torch.tensor([1.0, 3.0]) / math.sqrt(10))
    torch.testing.assert_close(inp.anchor_probs[3], torch.tensor([0.25, 0.75]))


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
@pytest.mark.parametrize("formulation", ["reference", "supcon"])
def test_void_as_background_is_exactly_void_labelled_zero(seed, formulation):
    f, g, z, y = make_case(seed=seed)
    old_pred = torch.softmax(z, dim=1).argmax(dim=1)
    assert bool(((y == 255) & (old_pred != 0)).any())  # some void cells enter under "background"
    got, got_grad = grad_of(lambda x: contrastive_distillation(x, g, z, y, formulation=formulation,
                                                               block_size=3, void="background"), f)
    # the same call with the 255s written as 0: the same computation, bit for bit
    same, same_grad = grad_of(lambda x: contrastive_distillation(x, g, z, void_as_background(y),
                                                                 formulation=formulation, block_size=3), f)
    assert torch.equal(got, same) and torch.equal(got_grad, same_grad)
    # the naive loop reading void as 0
    want, want_grad = grad_of(lambda x: naive_ucd(x, g, z, y, formulation=formulation, void="background")[0], f)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    # "ignore" is the naive loop that skips void, and differs
    ignored, ignored_grad = grad_of(lambda x: contrastive_distillation(x, g, z, y, formulation=formulation,
                                                                       block_size=3, void="ignore"), f)
    want, want_grad = grad_of(lambda x: naive_ucd(x, g, z, y, formulation=formulation)[0], f)
    torch.testing.assert_close(ignored, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ignored_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert abs(ignored.item() - got.item()) > 1e-6
    # under "ignore" a void cell gets no gradient; under "background" those the old model calls old do
    void_cells = (y == 255) & (old_pred != 0)
    assert ignored_grad.permute(0, 2, 3, 1)[y == 255].abs().max() == 0
    assert got_grad.permute(0, 2, 3, 1)[void_cells].abs().sum(dim=1).min() > 0


def test_void_cells_enter_only_under_background():
    f, g, z, y = make_case(seed=3)
    old_pred = torch.softmax(z, dim=1).argmax(dim=1)
    ignored = prepare_contrastive_inputs(f, g, z, y)  # the default
    background = prepare_contrastive_inputs(f, g, z, y, void="background")
    entering = int(((y == 255) & (old_pred != 0)).sum())
    assert entering > 0
    assert background.anchors.shape[0] == ignored.anchors.shape[0] + entering
    assert background.contrast.shape[0] == ignored.contrast.shape[0] + 2 * entering  # anchor copy + old element
    assert int(background.anchor_is_gt.sum()) == int(ignored.anchor_is_gt.sum())  # void is never GT
    for name, value in prepare_contrastive_inputs(f, g, z, void_as_background(y))._asdict().items():
        assert torch.equal(getattr(background, name), value), name


def test_gathered_loss_passes_void_on(monkeypatch):
    f, g, z, y = make_case(seed=8)
    for void in ("ignore", "background"):
        want = contrastive_distillation(f, g, z, y, void=void)
        torch.testing.assert_close(gathered_contrastive_distillation(f, g, z, y, void=void), want,
                                   rtol=0, atol=0)
    # its distributed branch, on a one-process gloo group taken for a distributed run
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(gathered, "is_distributed", lambda: True)
        for void in ("ignore", "background"):
            want, want_grad = grad_of(lambda x: contrastive_distillation(x, g, z, y, void=void), f)
            got, got_grad = grad_of(lambda x: gathered_contrastive_distillation(x, g, z, y, void=void), f)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)
        assert abs(gathered_contrastive_distillation(f, g, z, y, void="background").item()
                   - gathered_contrastive_distillation(f, g, z, y, void="ignore").item()) > 1e-6
    finally:
        dist.destroy_process_group()


def test_bad_void_value_is_a_one_line_error():
    f, g, z, y = make_case(seed=9, dtype=torch.float32)
    message = r"^void must be one of \('ignore', 'background'\), got 'zero'$"
    for fn in (contrastive_distillation, prepare_contrastive_inputs, gathered_contrastive_distillation):
        with pytest.raises(ValueError, match=message):
            fn(f, g, z, y, void="zero")
    with pytest.raises(ValueError, match="void must be one of"):
        contrastive_distillation(f, g, z, y, void=None)


# ----------------------------------------------------------------------------------------------
# labels at a higher resolution, precision
# ----------------------------------------------------------------------------------------------
def test_labels_at_higher_resolution_read_the_cell_centre():
    f, g, z, _ = make_case(seed=5)
    gen = torch.Generator().manual_seed(6)
    choices = torch.tensor([0, 0, 255, 4, 5])
    # integer factor 2: the centre of cell i is pixel 2i + 1 (docs/protocol.md §3: s*i + s/2)
    y_hi = choices[torch.randint(len(choices), (2, 6, 8), generator=gen)]
    y_lo = y_hi[:, 1::2, 1::2]
    want = naive_ucd(f, g, z, y_lo)[0]
    torch.testing.assert_close(contrastive_distillation(f, g, z, y_hi), want, rtol=1e-10, atol=0)
    # non-integer factor 7x9 -> 3x4: pixel (floor((i + 1/2) * 7/3), floor((j + 1/2) * 9/4))
    y_odd = choices[torch.randint(len(choices), (2, 7, 9), generator=gen)]
    rows, cols = [1, 3, 5], [1, 3, 5, 7]  # 7/6, 21/6, 35/6 and 9/8, 27/8, 45/8, 63/8 floored
    y_lo = y_odd[:, rows][:, :, cols]
    want = naive_ucd(f, g, z, y_lo)[0]
    torch.testing.assert_close(contrastive_distillation(f, g, z, y_odd), want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("stride", [2, 4, 16])
def test_impulse_at_a_cell_centre_lands_in_that_cell_and_at_its_corner_does_not(stride):
    # one labelled pixel (class 7) in a void image; the feature map is 3 x 4 cells of stride s
    h, w = 3, 4
    for ci, cj in [(0, 0), (1, 2), (2, 3)]:
        centre = torch.full((1, h * stride, w * stride), 255)
        centre[0, stride * ci + stride // 2, stride * cj + stride // 2] = 7
        got = resize_labels_nearest(centre, (h, w))
        want = torch.full((1, h, w), 255)
        want[0, ci, cj] = 7
        assert torch.equal(got, want)
        corner = torch.full((1, h * stride, w * stride), 255)
        corner[0, stride * ci, stride * cj] = 7  # the pixel mode="nearest" used to read
        assert torch.equal(resize_labels_nearest(corner, (h, w)), torch.full((1, h, w), 255))


def test_label_resize_equals_nearest_exact_and_keeps_ids():
    gen = torch.Generator().manual_seed(15)
    y = torch.tensor([0, 3, 200, 255])[torch.randint(4, (2, 64, 48), generator=gen)]
    for size in [(4, 3), (8, 6), (5, 7), (64, 48)]:
        got = resize_labels_nearest(y, size)
        ref = torch.nn.functional.interpolate(y[:, None].float(), size=size, mode="nearest-exact")
        assert torch.equal(got, ref[:, 0].long())
        assert set(got.unique().tolist()) <= {0, 3, 200, 255}


def test_nearest_never_invents_class_ids():
    # a 4 | 5 boundary: bilinear downsampling would create other ids; nearest keeps {4, 5}
    f, g, z, _ = make_case(seed=7, batch=1, h=2, w=2)
    y = torch.tensor([[[4, 4, 5, 5], [4, 4, 5, 5], [4, 4, 5, 5], [4, 4, 5, 5]]])
    labels = prepare_contrastive_inputs(f, g, z, y).anchor_labels
    assert labels.tolist() == [4, 5, 4, 5]


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(half):
    f, g, z, y = make_case(seed=8)
    f, g, z = (3 * f).to(half), (3 * g).to(half), z.to(half)
    # exp(1/0.07) ~ 1.6e6 overflows float16 (max 65504): a half-precision computation breaks
    assert torch.isinf(torch.exp(torch.tensor(1 / TAU, dtype=torch.float16)))
    f.requires_grad_(True)
    got = contrastive_distillation(f, g, z, y)
    got.backward()
    want = naive_ucd(f.detach().double(), g.double(), z.double(), y)[0]
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=2e-5)
    assert f.grad.dtype == half and torch.isfinite(f.grad.float()).all()


# ----------------------------------------------------------------------------------------------
# degenerate cases
# ----------------------------------------------------------------------------------------------
def _assert_zero_with_zero_grad(fn, f):
    f = f.clone().requires_grad_(True)
    loss = fn(f)
    assert loss.dim() == 0 and loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert f.grad is not None and torch.equal(f.grad, torch.zeros_like(f))


def test_no_anchor_gives_zero_with_grad_path():
    f, g, z, _ = make_case(seed=9, dtype=torch.float32)
    all_void = torch.full((2, 3, 4), 255)
    _assert_zero_with_zero_grad(lambda x: contrastive_distillation(x, g, z, all_void), f)
    # every pixel labelled 0 and the old model predicts background everywhere
    z_bg = torch.zeros_like(z)
    z_bg[:, 0] = 10.0
    all_bg = torch.zeros((2, 3, 4), dtype=torch.long)
    _assert_zero_with_zero_grad(lambda x: contrastive_distillation(x, g, z_bg, all_bg), f)


def test_no_positive_gives_zero_with_grad_path():
    # two GT pixels of different new classes, no old-model element: nothing shares a label
    f, g, z, _ = make_case(seed=10, batch=1, h=1, w=3, dtype=torch.float32)
    y = torch.tensor([[[4, 5, 255]]])
    _assert_zero_with_zero_grad(lambda x: contrastive_distillation(x, g, z, y), f)


def test_anchor_without_negatives_costs_zero():
    # two GT pixels of the same class, nothing else: N_i = 0 so l = s - log(exp(s)) = 0 exactly
    f, g, z, _ = make_case(seed=11, batch=1, h=1, w=2)
    y = torch.tensor([[[4, 4]]])
    for form in ("reference", "supcon"):
        loss, grad = grad_of(lambda x: contrastive_distillation(x, g, z, y, formulation=form), f)
        want = naive_ucd(f, g, z, y, formulation=form)[0]
        assert loss.item() == pytest.approx(want.item(), abs=1e-12)
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
        assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------
# the flat, gather-friendly core
# ----------------------------------------------------------------------------------------------
def test_flat_core_supports_a_gathered_contrast_set():
    """Two 'processes' each own one image's anchors but share the gathered contrast set."""
    f, g, z, y = make_case(seed=12)
    f_ref = f.clone().requires_grad_(True)
    want, count = naive_ucd(f_ref, g, z, y)
    want.backward()

    f_dist = f.clone().requires_grad_(True)
    parts = [
        prepare_contrastive_inputs(f_dist[r : r + 1], g[r : r + 1], z[r : r + 1], y[r : r + 1])
        for r in (0, 1)
    ]
    contrast = torch.cat([p.contrast for p in parts])
    c_labels = torch.cat([p.contrast_labels for p in parts])
    c_probs = torch.cat([p.contrast_probs for p in parts])
    c_gt = torch.cat([p.contrast_is_gt for p in parts])
    offsets = [0, parts[0].contrast.shape[0]]
    total = 0.0
    for part, offset in zip(parts, offsets):
        total = total + contrastive_distillation_flat(
            part.anchors, part.anchor_labels, part.anchor_probs, part.anchor_is_gt,
            contrast, c_labels, c_probs, c_gt, self_index=part.self_index + offset,
            block_size=3, reduction="sum",
        )  # fmt: skip
    loss = total / count
    loss.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_dist.grad, f_ref.grad, rtol=1e-9, atol=1e-12)


def test_flat_reduction_none_and_no_self_copy():
    inp = prepare_contrastive_inputs(*hand_case())
    per = contrastive_distillation_flat(*inp, temperature=1.0, reduction="none")
    log3 = math.log(3.0)
    torch.testing.assert_close(per, torch.tensor([log3, log3, 0.625 * log3]))
    # without own copies (self_index=None) each anchor's copy becomes a positive with s = 1/tau
    # anchor 0: positives a0, a1 (s = 1, w = 1), N = 2, m = 1 -> -l = log 3 each -> log 3
    per = contrastive_distillation_flat(*inp[:8], self_index=None, temperature=1.0, reduction="none")
    torch.testing.assert_close(per, torch.tensor([log3, log3, 0.625 * log3]))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    f, g, z, y = make_case(seed=13, dtype=torch.float32)
    with pytest.raises(ValueError, match="formulation"):
        contrastive_distillation(f, g, z, y, formulation="simclr")
    with pytest.raises(ValueError, match="temperature"):
        contrastive_distillation(f, g, z, y, temperature=0.0)
    with pytest.raises(ValueError, match="block_size"):
        contrastive_distillation(f, g, z, y, block_size=0)
    with pytest.raises(ValueError, match="old_features"):
        contrastive_distillation(f, g[:, :3], z, y)
    with pytest.raises(ValueError, match="old_logits"):
        contrastive_distillation(f, g, z[:, :, :2], y)
    with pytest.raises(ValueError, match="labels"):
        contrastive_distillation(f, g, z, y.float())
    with pytest.raises(ValueError, match="labels"):
        contrastive_distillation(f, g, z, y.unsqueeze(1))
    with pytest.raises(ValueError, match="batch size"):
        contrastive_distillation(f, g, z, y[:1])
    with pytest.raises(ValueError, match="-1"):
        contrastive_distillation(f, g, z, y - 1)
    inp = prepare_contrastive_inputs(f, g, z, y)
    with pytest.raises(ValueError, match="reduction"):
        contrastive_distillation_flat(*inp, reduction="max")
    with pytest.raises(ValueError, match="self_index"):
        contrastive_distillation_flat(*inp[:8], self_index=inp.self_index + 10_000)
    with pytest.raises(ValueError, match="contrast_labels"):
        contrastive_distillation_flat(*inp[:5], inp.contrast_labels[:-1], *inp[6:])


def test_backward_keeps_no_anchor_by_contrast_matrix():
    """The autograd node saves only per-anchor / per-element tensors, never an |A| x |C| matrix."""
    f, g, z, y = make_case(seed=14)
    f.requires_grad_(True)
    inp = prepare_contrastive_inputs(f, g, z, y)
    n, k = inp.anchors.shape[0], inp.contrast.shape[0]
    per_anchor = contrastive_distillation_flat(*inp, reduction="none")
    saved = per_anchor.grad_fn.saved_tensors
    assert saved and all(t.numel() <= max(n, k) * max(f.shape[1], z.shape[1]) for t in saved)
    assert all(t.numel() < n * k for t in saved)


# ----------------------------------------------------------------------------------------------
# the class-sorted, fused core (issue 15): a dense float64 reference on flat inputs
# ----------------------------------------------------------------------------------------------
def dense_flat_reference(a, a_lab, a_p, a_gt, c, c_lab, c_p, c_gt, self_index, tau, formulation):
    """Per-anchor losses and |P(i)| from docs/protocol.md §3 steps 3-6, as full |A| x |C| masks (float64)."""
    a, c, a_p, c_p = a.double(), c.double(), a_p.double(), c_p.double()
    s = a @ c.T / tau
    same = a_lab[:, None] == c_lab[None, :]
    own = torch.zeros_like(same)
    rows = (self_index >= 0).nonzero()[:, 0]
    own[rows, self_index[rows]] = True
    pos, neg = same & ~own, ~same
    w = torch.where(a_gt[:, None] & c_gt[None, :], torch.ones_like(s), a_p @ c_p.T)
    log_n = torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
    m = s.max(dim=1, keepdim=True).values.detach() if formulation == "reference" else 0.0
    log_prob = (s - m) - torch.logaddexp(s - m, log_n)
    num_pos = pos.sum(dim=1)
    per = -(torch.where(pos, w * log_prob, torch.zeros_like(s))).sum(dim=1) / num_pos.clamp(min=1)
    return per, num_pos


def random_flat(seed, n=40, extra=30, dim=8, old=5, classes=(1, 2, 3, 7, 9), dtype=torch.float64,
                gt_classes=(7, 9), gt_mixed=False):
    """Flat inputs in unsorted order: anchors (own copies first in the contrast set) + other elements."""
    gen = torch.Generator().manual_seed(seed)
    lab = torch.tensor(classes)[torch.randint(len(classes), (n + extra,), generator=gen)]
    gt = torch.isin(lab, torch.tensor(gt_classes))
    if gt_mixed:  # PLOP-like: GT and non-GT elements within one class
        gt = gt | (torch.rand(n + extra, generator=gen) < 0.3)
    feats = F.normalize(torch.randn(n + extra, dim, generator=gen, dtype=torch.float64), dim=1)
    probs = torch.softmax(2 * torch.randn(n + extra, old, generator=gen, dtype=torch.float64), dim=1)
    a = feats[:n].to(dtype)
    c = torch.cat([a, feats[n:].to(dtype)])
    return (a, lab[:n], probs[:n].to(dtype), gt[:n], c, lab, probs.to(dtype), torch.cat([gt[:n], gt[n:]]),
            torch.arange(n))


def flat_loss_and_grad(inputs, reduction="none", upstream=None, **kwargs):
    a = inputs[0].clone().requires_grad_(True)
    out = contrastive_distillation_flat(a, *inputs[1:8], self_index=inputs[8], reduction=reduction, **kwargs)
    (out * upstream).sum().backward() if upstream is not None else out.sum().backward()
    return out.detach(), a.grad


def reference_loss_and_grad(inputs, tau, formulation, reduction="none", upstream=None):
    a = inputs[0].detach().double().requires_grad_(True)
    per, num_pos = dense_flat_reference(a, *inputs[1:], tau=tau, formulation=formulation)
    out = {"none": per, "sum": per.sum(), "mean": per.sum() / (num_pos > 0).sum()}[reduction]
    (out * upstream).sum().backward() if upstream is not None else out.sum().backward()
    return out.detach(), a.grad, num_pos


@pytest.mark.parametrize("formulation", ["reference", "supcon"])
@pytest.mark.parametrize("gt_mixed", [False, True])
@pytest.mark.parametrize("block_size", [1, 5, 1024])
def test_sorted_core_matches_dense_reference_per_anchor(formulation, gt_mixed, block_size):
    inputs = random_flat(seed=20, gt_mixed=gt_mixed)
    upstream = torch.linspace(-1.0, 2.0, inputs[0].shape[0], dtype=torch.float64)  # any dL/dl_i
    got, got_grad = flat_loss_and_grad(inputs, upstream=upstream, temperature=0.1, formulation=formulation,
                                       block_size=block_size)
    want, want_grad, _ = reference_loss_and_grad(inputs, 0.1, formulation, upstream=upstream)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sorted_core_reductions(reduction):
    inputs = random_flat(seed=21)
    got, got_grad = flat_loss_and_grad(inputs, reduction=reduction, block_size=3)
    want, want_grad, _ = reference_loss_and_grad(inputs, TAU, "reference", reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_class_without_positives_costs_nothing_and_gets_no_gradient():
    # class 5 has a single anchor and nothing else: no positive; class 6 has one anchor and one
    # other element: one positive
    a, a_lab, a_p, a_gt, c, c_lab, c_p, c_gt, own = random_flat(seed=22, n=12, extra=6)
    a_lab = a_lab.clone()
    a_lab[0], a_lab[1] = 5, 6
    c_lab = torch.cat([a_lab, c_lab[12:]])
    c_lab[12] = 6
    inputs = (a, a_lab, a_p, a_gt, c, c_lab, c_p, c_gt, own)
    got, got_grad = flat_loss_and_grad(inputs, block_size=2)
    want, want_grad, num_pos = reference_loss_and_grad(inputs, TAU, "reference")
    assert num_pos[0] == 0 and num_pos[1] == 1
    assert got[0] == 0 and torch.equal(got_grad[0], torch.zeros_like(got_grad[0]))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("formulation", ["reference", "supcon"])
def test_gathered_contrast_with_anchors_lacking_an_own_copy(formulation):
    # another "process's" elements after ours; some anchors have no own copy (their row maximum is
    # then the exact maximum over the row, which here is not the similarity with the anchor itself)
    inputs = list(random_flat(seed=23, n=20, extra=25))
    own = inputs[8].clone()
    own[::3] = -1
    c = torch.cat([inputs[4][20:], inputs[4][:20]])  # the local block is not first
    perm = torch.cat([torch.arange(25, 45), torch.arange(0, 25)])  # new position of old index
    inputs[4] = c
    for j in (5, 6, 7):
        inputs[j] = torch.cat([inputs[j][20:], inputs[j][:20]])
    inputs[8] = torch.where(own >= 0, perm[own.clamp(min=0)], own)
    got, got_grad = flat_loss_and_grad(tuple(inputs), formulation=formulation, block_size=4)
    want, want_grad, _ = reference_loss_and_grad(tuple(inputs), TAU, formulation)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_all_gt_batch():
    # every pixel is current-step ground truth: the contrast set is the anchors, every weight 1
    f, g, z, _ = make_case(seed=24)
    gen = torch.Generator().manual_seed(24)
    y = torch.tensor([4, 5])[torch.randint(2, (2, 3, 4), generator=gen)]
    inp = prepare_contrastive_inputs(f, g, z, y)
    assert inp.anchor_is_gt.all() and inp.contrast.shape[0] == inp.anchors.shape[0]
    for form in ("reference", "supcon"):
        want, want_grad = grad_of(lambda x: naive_ucd(x, g, z, y, formulation=form)[0], f)
        got, got_grad = grad_of(lambda x: contrastive_distillation(x, g, z, y, formulation=form, block_size=2), f)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_inputs(reduction):
    inputs = random_flat(seed=25, n=6, extra=4, dtype=torch.float32)
    no_anchor = (inputs[0][:0], inputs[1][:0], inputs[2][:0], inputs[3][:0], *inputs[4:8])
    no_contrast = (*inputs[:4], inputs[4][:0], inputs[5][:0], inputs[6][:0], inputs[7][:0])
    for args in (no_anchor, no_contrast):
        a = args[0].clone().requires_grad_(True)
        out = contrastive_distillation_flat(a, *args[1:], reduction=reduction)
        assert out.shape == ((a.shape[0],) if reduction == "none" else ())
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert a.grad is not None and torch.equal(a.grad, torch.zeros_like(a))


def test_float64_gradcheck_supcon():
    # "reference" shifts by m_i, the row maximum, which depends on the anchor but is a constant for
    # the gradient (as in the release): finite differences see it, so only supcon is gradchecked;
    # "reference" gradients are checked against autograd through the dense reference above.
    inputs = random_flat(seed=26, n=7, extra=5, dim=4, classes=(1, 2, 7))

    def fn(a):
        return contrastive_distillation_flat(a, *inputs[1:8], self_index=inputs[8], temperature=0.5,
                                             formulation="supcon", block_size=2, reduction="none")

    assert torch.autograd.gradcheck(fn, (inputs[0].clone().requires_grad_(True),))


@pytest.mark.parametrize("dtype, tau", [(torch.float32, 0.02), (torch.float64, 0.001)])
def test_small_temperature_takes_the_exact_shift(dtype, tau):
    # 2 / tau beyond exp()'s safe range: every row is shifted by its negatives' maximum instead
    inputs = random_flat(seed=27, dtype=dtype)
    got, got_grad = flat_loss_and_grad(inputs, temperature=tau, block_size=4)
    want, want_grad, _ = reference_loss_and_grad(inputs, tau, "reference")
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    rtol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max())
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=10 * rtol, atol=10 * rtol * want_grad.abs().max())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built into this torch")
@pytest.mark.parametrize("use_onednn", [True, False])
def test_float32_products_match_the_float64_reference(monkeypatch, use_onednn):
    monkeypatch.setattr(contrastive, "USE_ONEDNN", use_onednn)
    monkeypatch.setattr(contrastive, "ONEDNN_MIN_ELEMENTS", 0)  # even this small case goes through oneDNN
    inputs = random_flat(seed=28, n=300, extra=200, dim=64, dtype=torch.float32, gt_mixed=True)
    for form in ("reference", "supcon"):
        got, got_grad = flat_loss_and_grad(inputs, reduction="mean", formulation=form, block_size=64)
        want, want_grad, _ = reference_loss_and_grad(inputs, TAU, form, reduction="mean")
        assert got.dtype == torch.float32
        assert abs(got.item() / want.item() - 1) < 1e-5
        assert (got_grad.double() - want_grad).abs().max() / want_grad.abs().max() < 1e-4


def test_no_gradient_needed_gives_the_same_value():
    inputs = random_flat(seed=29)
    with_grad, _ = flat_loss_and_grad(inputs, block_size=3)
    with torch.no_grad():
        without = contrastive_distillation_flat(*inputs[:8], self_index=inputs[8], reduction="none", block_size=3)
    torch.testing.assert_close(without, with_grad, rtol=1e-12, atol=0)  # N_i: product vs sum, same terms


def test_double_backward_is_refused():
    inputs = random_flat(seed=30, n=6, extra=4)
    a = inputs[0].clone().requires_grad_(True)
    loss = contrastive_distillation_flat(a, *inputs[1:8], self_index=inputs[8])
    (grad,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
