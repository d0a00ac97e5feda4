"""contrastive_input_stats: what the UCD term sees, counted by explicit loops over anchor / contrast pairs."""

from __future__ import annotations

import torch

from ucdseg.losses import contrastive_input_stats, prepare_contrastive_inputs


def naive_stats(inputs) -> dict:
    n, k = inputs.anchors.shape[0], inputs.contrast.shape[0]
    positive = weighted = 0
    for i in range(n):
        for j in range(k):
            if j == int(inputs.self_index[i]) or inputs.anchor_labels[i] != inputs.contrast_labels[j]:
                continue
            positive += 1
            if not (inputs.anchor_is_gt[i] and inputs.contrast_is_gt[j]):  # weight is p_i . p_k, not 1
                weighted += 1
    return {"anchors": n, "contrast": k, "old_elements": k - n, "positive_pairs": positive,
            "weighted_pair_share": weighted / positive if positive else 0.0}


def random_inputs(seed: int, labels_values, b=2, h=4, w=5, c_old=5, d=3):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, d, h, w, generator=g)
    old_features = torch.randn(b, d, h, w, generator=g)
    old_logits = torch.randn(b, c_old, h, w, generator=g) * 3
    values = torch.tensor(labels_values)
    labels = values[torch.randint(len(values), (b, h, w), generator=g)]
    return prepare_contrastive_inputs(features, old_features, old_logits, labels)


def test_stats_match_pair_loops():
    for seed in range(4):
        inputs = random_inputs(seed, [0, 0, 0, 5, 6, 255])
        stats = contrastive_input_stats(inputs)
        want = naive_stats(inputs)
        assert stats.keys() == want.keys()
        for key, value in want.items():
            assert abs(stats[key] - value) < 1e-12, (seed, key, stats[key], value)
        assert isinstance(stats["weighted_pair_share"], float)
        assert stats["old_elements"] > 0 and 0 < stats["weighted_pair_share"] < 1


def test_stats_of_gt_only_and_empty_batches():
    gt_only = contrastive_input_stats(random_inputs(5, [5, 6]))  # no background: no old-model element
    assert gt_only["old_elements"] == 0 and gt_only["weighted_pair_share"] == 0.0
    assert gt_only["positive_pairs"] > 0
    empty = contrastive_input_stats(random_inputs(6, [255]))
    assert empty == {"anchors": 0.0, "contrast": 0.0, "old_elements": 0.0, "positive_pairs": 0.0,
                     "weighted_pair_share": 0.0}
