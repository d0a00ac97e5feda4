"""PLOP loss terms: Local POD, entropy thresholds, entropy pseudo-labels, adaptive CE.

Expected values are computed by hand or by naive loop references written here.
"""

import math

import pytest
import torch

from ucdseg.losses.plop import (
    EntropyThresholds,
    adaptive_cross_entropy,
    collapse_new_channels,
    entropy_pseudo_labels,
    local_pod,
    normalized_entropy,
    pod_embedding,
    pod_levels,
    pod_schedule,
)

# ------------------------------------------------------------------------------------------
# Local POD
# ------------------------------------------------------------------------------------------

# 4x4 map:  0  1  2  3 /  4  5  6  7 /  8  9 10 11 / 12 13 14 15
GRID = torch.arange(16.0).view(1, 1, 4, 4)


def test_pod_embedding_scale_1_whole_map():
    # width-pooled = mean of each row, height-pooled = mean of each column
    assert pod_embedding(GRID, (1,)).tolist() == [[1.5, 5.5, 9.5, 13.5, 6.0, 7.0, 8.0, 9.0]]


def test_pod_embedding_scale_2_four_regions():
    expected = [
        0.5, 4.5, 2.0, 3.0,  # region (0,0) = [[0,1],[4,5]]: row means, column means
        2.5, 6.5, 4.0, 5.0,  # region (0,1) = [[2,3],[6,7]]
        8.5, 12.5, 10.0, 11.0,  # region (1,0) = [[8,9],[12,13]]
        10.5, 14.5, 12.0, 13.0,  # region (1,1) = [[10,11],[14,15]]
    ]
    assert pod_embedding(GRID, (2,)).tolist() == [expected]


def test_pod_embedding_scale_4_single_pixels():
    # each region is one pixel: its row mean and its column mean are the pixel value
    expected = [v for v in range(16) for _ in range(2)]
    assert pod_embedding(GRID, (4,)).tolist() == [[float(v) for v in expected]]


def test_pod_embedding_all_scales_concatenated_and_channel_major():
    x = torch.cat([GRID, -GRID], dim=1)  # channel 1 = -channel 0
    emb = pod_embedding(x, (1, 2, 4))
    # 3 scales: 1 region x (2C*4) + 4 regions x (2C*2) + 16 regions x (2C*1), C = 2
    assert emb.shape == (1, 16 + 32 + 64)
    # scale 1, width-pooled: channel 0 rows then channel 1 rows
    assert emb[0, :8].tolist() == [1.5, 5.5, 9.5, 13.5, -1.5, -5.5, -9.5, -13.5]
    assert emb[0, 8:16].tolist() == [6.0, 7.0, 8.0, 9.0, -6.0, -7.0, -8.0, -9.0]


def test_pod_embedding_uneven_bands_on_non_square_map():
    # 3x5 map 0..14 at scale 2: row bands [0, 1] and [2]; column bands [0, 1, 2] and [3, 4]
    x = torch.arange(15.0).view(1, 1, 3, 5)
    expected = [
        1.0, 6.0, 2.5, 3.5, 4.5,  # [[0,1,2],[5,6,7]]: row means, column means
        3.5, 8.5, 5.5, 6.5,  # [[3,4],[8,9]]
        11.0, 10.0, 11.0, 12.0,  # [[10,11,12]]
        13.5, 13.0, 14.0,  # [[13,14]]
    ]
    assert pod_embedding(x, (2,)).tolist() == [expected]


def test_pod_embedding_rejects_too_small_map_and_bad_scale():
    with pytest.raises(ValueError, match="scale 4"):
        pod_embedding(torch.zeros(1, 1, 2, 2), (1, 4))
    with pytest.raises(ValueError, match="positive integers"):
        pod_embedding(GRID, (0,))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pod_embedding(torch.zeros(4, 4), (1,))


def naive_local_pod(new_levels, old_levels, num_old, num_new, scales, factor, last_factor):
    """PLOP's local POD with explicit loops (square maps, sides divisible by every scale)."""
    weight = math.sqrt((num_old + num_new) / num_new)
    total = 0.0
    for level, (new, old) in enumerate(zip(new_levels, old_levels)):
        last = level == len(new_levels) - 1
        if new.shape[1] != old.shape[1]:  # "sum": background += every new-class channel
            summed = new.clone()[:, :num_old]
            for k in range(num_old, new.shape[1]):
                summed[:, 0] += new[:, k]
            new = summed
        batch, channels, side, _ = new.shape
        per_image = []
        for b in range(batch):
            sq = 0.0
            for s in scales:
                k = side // s
                for i in range(s):
                    for j in range(s):
                        for c in range(channels):
                            for r in range(k):  # width-pooled value of row r of region (i, j)
                                row = [i * k + r] * k
                                cols = [j * k + q for q in range(k)]
                                a = sum(new[b, c, y, x].item() ** 2 for y, x in zip(row, cols)) / k
                                o = sum(old[b, c, y, x].item() ** 2 for y, x in zip(row, cols)) / k
                                sq += (a - o) ** 2
                            for q in range(k):  # height-pooled value of column q
                                rows = [i * k + r for r in range(k)]
                                col = [j * k + q] * k
                                a = sum(new[b, c, y, x].item() ** 2 for y, x in zip(rows, col)) / k
                                o = sum(old[b, c, y, x].item() ** 2 for y, x in zip(rows, col)) / k
                                sq += (a - o) ** 2
            per_image.append(math.sqrt(sq))
        total += (last_factor if last else factor) * weight * sum(per_image) / batch
    return total / len(new_levels)


def test_local_pod_matches_naive_loops_with_logit_channel_sum():
    g = torch.Generator().manual_seed(0)
    num_old, num_new = 3, 2
    shapes_new = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 4, 4)]  # last: new logits, 3 old + 2 new
    shapes_old = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 3, 4, 4)]
    new = [torch.randn(s, generator=g) for s in shapes_new]
    old = [torch.randn(s, generator=g) for s in shapes_old]
    got = local_pod(new, old, num_old, num_new, factor=0.3, last_factor=0.7)
    expected = naive_local_pod(new, old, num_old, num_new, (1, 2, 4), 0.3, 0.7)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_local_pod_hand_value_and_factors():
    # one 1-channel 2x2 level: new = [[1, 0], [0, 0]], old = 0; scale 1 embedding of new^2 is
    # rows [0.5, 0], columns [0.5, 0] -> distance sqrt(0.5); schedule sqrt((1 + 1) / 1)
    new = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    old = torch.zeros_like(new)
    one = local_pod([new], [old], 1, 1, scales=(1,), last_factor=1.0)
    assert one.item() == pytest.approx(1.0)
    # a single level is the last level: it gets last_factor (PLOP default 0.0005)
    assert local_pod([new], [old], 1, 1, scales=(1,)).item() == pytest.approx(0.0005)
    # two levels: (0.01 * d + 0.0005 * d) * sqrt(2) / 2 with d = sqrt(0.5)
    two = local_pod([new, new], [old, old], 1, 1, scales=(1,))
    assert two.item() == pytest.approx((0.01 + 0.0005) * 0.5)


def test_local_pod_adaptive_schedule():
    assert pod_schedule(16, 1) == pytest.approx(math.sqrt(17))
    assert pod_schedule(11, 10) == pytest.approx(math.sqrt(21 / 10))
    g = torch.Generator().manual_seed(1)
    new = [torch.randn(2, 3, 4, 4, generator=g)]
    old = [torch.randn(2, 3, 4, 4, generator=g)]
    plain = local_pod(new, old, 16, 1, schedule=False)
    scheduled = local_pod(new, old, 16, 1)
    assert scheduled.item() == pytest.approx(math.sqrt(17) * plain.item(), rel=1e-6)
    with pytest.raises(ValueError, match="num_new_classes >= 1"):
        pod_schedule(16, 0)


def test_local_pod_is_zero_for_equal_features_with_finite_gradient():
    g = torch.Generator().manual_seed(2)
    old = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)]
    # new logits = old logits plus a zero new-class channel: the "sum" collapse gives old back
    new = [old[0].clone().requires_grad_(), torch.cat([old[1], torch.zeros(2, 1, 4, 4)], 1)]
    new[1].requires_grad_()
    loss = local_pod(new, old, 3, 1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(new[0].grad).all() and torch.isfinite(new[1].grad).all()


def test_local_pod_gradient_reaches_new_features_only():
    g = torch.Generator().manual_seed(3)
    new = torch.randn(1, 2, 4, 4, generator=g, requires_grad=True)
    old = torch.randn(1, 2, 4, 4, generator=g, requires_grad=True)
    local_pod([new], [old], 2, 1).backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert old.grad is None


def test_collapse_new_channels_sum_and_trim():
    logits = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]).view(1, 5, 1, 1)
    assert collapse_new_channels(logits, 3, "sum").flatten().tolist() == [31.0, 2.0, 3.0]
    assert collapse_new_channels(logits, 3, "trim").flatten().tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="'sum' or 'trim'"):
        collapse_new_channels(logits, 3, "mean")


def test_pod_levels_order():
    class Out:
        stages = ["relu(s1)", "relu(s2)"]  # activated stage outputs: not what POD reads
        pod_stages = ["s1", "s2"]  # the stages' pre-activations
        features = "f"
        low_logits = "z"

    assert pod_levels(Out()) == ["s1", "s2", "f", "z"]
    assert pod_levels(Out(), logits=False) == ["s1", "s2", "f"]


def test_local_pod_errors():
    a = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="equally long"):
        local_pod([a, a], [a], 2, 1)
    with pytest.raises(ValueError, match="only the last level"):
        local_pod([torch.zeros(1, 3, 4, 4), a], [a, a], 2, 1)
    with pytest.raises(ValueError, match="same shape"):
        local_pod([torch.zeros(1, 2, 8, 8)], [a], 2, 1)
    with pytest.raises(ValueError, match="expected 2 old"):
        local_pod([torch.zeros(1, 5, 4, 4)], [torch.zeros(1, 3, 4, 4)], 2, 1)


# ------------------------------------------------------------------------------------------
# Entropy
# ------------------------------------------------------------------------------------------


def logits_with_entropy(u: float, num_classes: int, cls: int) -> list[float]:
    """Logits (t at ``cls``, 0 elsewhere) whose normalised entropy is ``u``, by bisection."""

    def norm_entropy(t: float) -> float:
        z = [t if k == cls else 0.0 for k in range(num_classes)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        p = [v / sum(e) for v in e]
        return -sum(q * math.log(q) for q in p if q > 0) / math.log(num_classes)

    lo, hi = 0.0, 60.0  # entropy decreases with t
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if norm_entropy(mid) > u else (lo, mid)
    return [hi if k == cls else 0.0 for k in range(num_classes)]


def test_normalized_entropy_hand_values():
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -inf, -inf], [50.0, 0.0, 0.0, 0.0]])
    u = normalized_entropy(logits.view(3, 4, 1, 1)).flatten()
    # uniform over 4 -> 1; uniform over 2 of 4 -> ln 2 / ln 4 = 0.5; near one-hot -> ~0
    assert u.tolist() == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)
    target = torch.tensor(logits_with_entropy(0.37, 4, 2)).view(1, 4, 1, 1)
    assert normalized_entropy(target).item() == pytest.approx(0.37, abs=1e-5)


def column(pixels):
    """(N, C) list of logits -> (1, C, N, 1) tensor."""
    return torch.tensor(pixels).t().reshape(1, len(pixels[0]), len(pixels), 1)


def test_entropy_thresholds_medians_known_by_construction():
    c_old = 4  # class 3 is never predicted
    acc = EntropyThresholds(c_old, bins=10, min_threshold=0.1, convention="normalized")
    # class 1: one pixel at the centre of bins 0..3 -> histogram median 0.2 (= exact median)
    # class 2: three pixels in bin 4 -> 0.4 + (1.5 / 3) * 0.1 = 0.45
    # class 0: two near-certain pixels in bin 0 -> (1 / 2) * 0.1 = 0.05, below the 0.1 floor
    batch1 = [(0.05, 1), (0.15, 1), (0.42, 2), (0.0005, 0)]
    batch2 = [(0.25, 1), (0.35, 1), (0.44, 2), (0.46, 2), (0.0005, 0)]
    for batch in (batch1, batch2):
        logits = column([logits_with_entropy(u, c_old, c) for u, c in batch])
        acc.update(logits, torch.zeros(1, len(batch), 1, dtype=torch.long))
    # pixels not labelled 0 are ignored, whatever their entropy and class
    noise = column([logits_with_entropy(0.95, c_old, 1), logits_with_entropy(0.9, c_old, 2)])
    acc.update(noise, torch.tensor([[[3], [255]]]))

    medians = acc.medians()
    assert medians[:3].tolist() == pytest.approx([0.05, 0.2, 0.45], abs=1e-6)
    assert math.isnan(medians[3].item())
    # floor: max(median, 0.1); never-predicted class -> the floor
    assert acc.thresholds().tolist() == pytest.approx([0.1, 0.2, 0.45, 0.1], abs=1e-6)
    assert acc.histogram.sum().item() == 9


def test_entropy_thresholds_median_across_empty_bins():
    # class 1: 1 pixel in bin 0, 3 pixels in bin 7 -> half = 2 is reached in bin 7:
    # 0.7 + (2 - 1) / 3 * 0.1
    acc = EntropyThresholds(2, bins=10, min_threshold=0.0, convention="normalized")
    us = [0.05, 0.72, 0.75, 0.78]
    acc.update(column([logits_with_entropy(u, 2, 1) for u in us]), torch.zeros(1, 4, 1).long())
    assert acc.thresholds()[1].item() == pytest.approx(0.7 + 0.1 / 3, abs=1e-6)


def plop_release_thresholds(logits, labels, c_seen, bins=100, floor=0.001):
    """Transcription of PLOP's find_median(mode="entropy") arithmetic (correct running sum)."""
    c_old = logits.shape[1]
    p = torch.softmax(logits.double(), dim=1)
    ent = -(1 / math.log(c_old)) * (p * torch.log(p)).mean(dim=1)  # release `entropy()`
    values = ent / math.log(c_seen)
    pred = p.argmax(dim=1)
    hist = [[0] * bins for _ in range(c_old)]
    for v, c in zip(values[labels == 0].tolist(), pred[labels == 0].tolist()):
        hist[c][min(int(v * bins), bins - 1)] += 1
    thresholds = []
    for c in range(c_old):
        total = sum(hist[c])
        median = 0.0
        if total:
            half, running = total / 2, 0
            for i in range(bins):
                if running <= half <= running + hist[c][i]:
                    median = i / bins + (half - running) / hist[c][i] / bins
                    break
                running += hist[c][i]
        thresholds.append(max(median, floor))
    return torch.tensor(thresholds, dtype=torch.float64), values, pred


def test_entropy_thresholds_release_convention_matches_plop_arithmetic():
    g = torch.Generator().manual_seed(4)
    c_old, c_seen = 4, 6
    logits = torch.randn(3, c_old, 8, 8, generator=g) * 2.5
    labels = torch.randint(0, 3, (3, 8, 8), generator=g)
    labels[labels == 2] = 255
    acc = EntropyThresholds(c_old, c_seen)  # release convention, 100 bins, floor 0.001
    acc.update(logits, labels)
    tau_v, values, pred = plop_release_thresholds(logits, labels, c_seen)
    scale = c_old * math.log(c_seen)  # release units -> normalised-entropy units
    assert acc.thresholds().double().tolist() == pytest.approx((tau_v * scale).tolist(), rel=1e-4)
    # the release's pseudo-label test `values < tau[pred]` selects the same pixels
    _, stats = entropy_pseudo_labels(labels, logits, acc.thresholds())
    assert torch.equal(stats.confident, (values < tau_v[pred]) & (labels == 0))


def test_entropy_thresholds_release_units_first_bin_and_floor():
    # near-certain pixels all fall in the first of 100 bins of the release's units
    # v = u / (C_old ln C_seen): a median read inside that bin is at least half a bin (0.005);
    # a never-predicted class gets the floor 0.001. Both scaled by C_old ln C_seen.
    acc = EntropyThresholds(3, 4)
    logits = column([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
    acc.update(logits, torch.zeros(1, 2, 1, dtype=torch.long))
    scale = 3 * math.log(4)
    expected = [0.005 * scale, 0.005 * scale, 0.001 * scale]
    assert acc.thresholds().tolist() == pytest.approx(expected, rel=1e-6)


def test_entropy_thresholds_errors():
    with pytest.raises(ValueError, match="num_old_classes >= 2"):
        EntropyThresholds(1, 3)
    with pytest.raises(ValueError, match="num_seen_classes"):
        EntropyThresholds(3)
    with pytest.raises(ValueError, match="'release' or 'normalized'"):
        EntropyThresholds(3, 4, convention="paper")
    acc = EntropyThresholds(3, 4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        acc.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="full-resolution"):
        acc.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# Pseudo-labels and the adaptive classification factor
# ------------------------------------------------------------------------------------------


def test_entropy_pseudo_labels_hand_made_2x3():
    sure1, sure2, sure0, flat = [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [10.0, 0.0, 0.0], [0.0] * 3
    # C_old = 3 (background, 1, 2); 3 is this step's new class. Normalised entropy: ~1e-3 for
    # the "sure" pixels, exactly 1 for the flat ones.
    labels = torch.tensor(
        [
            [[0, 0, 3], [255, 0, 0]],
            [[0, 0, 0], [3, 3, 3]],
            [[3, 3, 255], [3, 3, 3]],  # no background pixel
        ]
    )
    pixels = [
        [[sure1, flat, flat], [sure1, sure2, sure0]],
        [[sure1, flat, flat], [flat, flat, flat]],
        [[sure1, sure1, sure1], [flat, flat, flat]],
    ]
    old_logits = torch.tensor(pixels).permute(0, 3, 1, 2)  # (3, C_old, 2, 3)
    thresholds = torch.tensor([0.5, 0.5, 1e-6])  # class 2's bar is too strict for `sure2`

    pseudo, stats = entropy_pseudo_labels(labels, old_logits, thresholds)
    assert pseudo.tolist() == [
        [[1, 255, 3], [255, 255, 0]],  # sure1 -> 1; flat -> 255; 3 and 255 kept; sure2 -> 255
        [[1, 255, 255], [3, 3, 3]],
        [[3, 3, 255], [3, 3, 3]],
    ]
    assert stats.num_background.tolist() == [4, 3, 0]
    assert stats.num_confident.tolist() == [2, 1, 0]
    # per image: confident background / background; no background -> 1
    assert stats.confident_fraction.tolist() == pytest.approx([0.5, 1 / 3, 1.0])
    assert labels[0, 0, 0].item() == 0  # input untouched


def test_entropy_pseudo_labels_errors():
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"thresholds must have shape \(3,\)"):
        entropy_pseudo_labels(labels, torch.zeros(1, 3, 2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="matching old_logits"):
        entropy_pseudo_labels(labels, torch.zeros(1, 3, 4, 4), torch.zeros(3))


def test_adaptive_cross_entropy_matches_naive_mean_over_all_pixels():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 2, 3, generator=g)
    labels = torch.tensor([[[0, 1, 255], [3, 2, 0]], [[255, 255, 1], [2, 2, 3]]])
    factor = torch.tensor([0.5, 0.25])
    total = 0.0
    for b in range(2):
        for y in range(2):
            for x in range(3):
                t = labels[b, y, x].item()
                if t == 255:
                    continue  # contributes 0 but still counts in the mean
                z = logits[b, :, y, x].tolist()
                log_sum = math.log(sum(math.exp(v) for v in z))
                total += factor[b].item() * (log_sum - z[t])
    expected = total / (2 * 2 * 3)
    got = adaptive_cross_entropy(logits, labels, factor).item()
    assert got == pytest.approx(expected, rel=1e-5)
    plain = adaptive_cross_entropy(logits, labels)
    assert plain.item() > adaptive_cross_entropy(logits, labels, factor).item()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        adaptive_cross_entropy(logits, labels, torch.ones(3))


def test_entropy_pseudo_labels_threshold_is_strict():
    # a pixel whose entropy equals its class threshold is not confident (release: `<`)
    logits = torch.tensor([2.0, 0.5, 0.0]).view(1, 3, 1, 1)
    u = normalized_entropy(logits).flatten()[0]
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    at, _ = entropy_pseudo_labels(labels, logits, torch.stack([u, u, u]))
    above, _ = entropy_pseudo_labels(labels, logits, torch.stack([u, u, u]) * 1.001)
    assert at.item() == 255 and above.item() == 0


def test_local_pod_runs_in_float32_under_autocast():
    g = torch.Generator().manual_seed(6)
    new = [torch.randn(2, 8, 8, 8, generator=g) * 30]
    old = [torch.randn(2, 8, 8, 8, generator=g) * 30]
    reference = local_pod(new, old, 3, 1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = local_pod(new, old, 3, 1)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), rel=1e-6)
