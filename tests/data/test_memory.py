"""The class-balanced exemplar memory sampler (SSUL-M, DKD-M) and its pseudo-label presence.

Parity: tests/parity/data/ssul.npz and dkd.npz hold calls of the releases' own ``memory_sampling_balanced``
(SSUL utils/memory.py, DKD utils/memory.py) with numpy's shuffles recorded; our round robin replays those
two orders and must choose the same candidates in the same order. Hand-derived cases and a naive
reference of the rule (written here from its description) beside them.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ucdseg.data.memory import class_balanced_memory, present_classes, pseudo_label_presence, round_robin_memory

PARITY = Path(__file__).resolve().parents[1] / "parity" / "data"
SSUL = np.load(PARITY / "ssul.npz")
DKD = np.load(PARITY / "dkd.npz")
CASES = [("ssul", i, c) for i, c in enumerate(json.loads(str(SSUL["memory_cases"])))] + \
        [("dkd", i, c) for i, c in enumerate(json.loads(str(DKD["memory_cases"])))]


# ------------------------------------------------------------------------------------------
# parity with the releases
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("release, i, c", CASES, ids=[f"{r}{i}" for r, i, _ in CASES])
def test_release_round_robin(release, i, c):
    class_order = [c["class_list"][k] for k in c["class_perm"]]
    got = round_robin_memory(c["candidate_classes"], class_order, c["candidate_order"], c["size"])
    assert got == c["expected_positions"]


def test_release_cases_cover_exhaustion_and_background_only_candidates():
    exhausted = [c for _, _, c in CASES
                 if c["size"] == sum(any(1 <= k <= 16 for k in cl) for cl in c["candidate_classes"])]
    assert len(exhausted) >= 2  # every eligible candidate taken, classes running out on the way
    assert any(not [k for k in cl if 1 <= k <= 16] for _, _, c in CASES for cl in c["candidate_classes"])


def release_classes(lists, drop):
    return [[k for k in cl if k not in drop] for cl in lists]


def test_release_ssul_presence_with_pseudo_labels_and_without():
    cases = json.loads(str(SSUL["memory_cases"]))
    step2 = next(c for c in cases if c["curr_step"] == 2)
    labels = torch.from_numpy(SSUL["memory_step2_labels"]).long()
    got = pseudo_label_presence(labels, torch.from_numpy(SSUL["memory_step2_old_logits"]), "ssul")
    # the release keeps 255 - 1 = 254 in its lists (unused: no class has that id)
    expected = release_classes(step2["candidate_classes"][step2["n_prev_memory"]:], {254})
    assert got == expected and got != present_classes(labels)  # pseudo-labels added classes
    step1 = next(c for c in cases if c["curr_step"] == 1)
    got1 = pseudo_label_presence(torch.from_numpy(SSUL["memory_step1_labels"]).long(), None, "ssul")
    assert got1 == release_classes(step1["candidate_classes"], {254})


def test_release_dkd_presence_with_pseudo_labels_and_without():
    cases = json.loads(str(DKD["memory_cases"]))
    step2 = next(c for c in cases if c["task_step"] == 2)
    labels = torch.from_numpy(DKD["memory_step2_labels"]).long()
    old_fg = torch.from_numpy(DKD["memory_step2_old_logits"])[:, 1:]  # channel 0 is the auxiliary classifier
    got = pseudo_label_presence(labels, old_fg, "dkd")
    assert got == release_classes(step2["candidate_classes"][step2["n_prev_memory"]:], {255})
    assert got != present_classes(labels)
    step1 = next(c for c in cases if c["task_step"] == 1)
    got1 = pseudo_label_presence(torch.from_numpy(DKD["memory_step1_labels"]).long(), None, "dkd")
    assert got1 == release_classes(step1["candidate_classes"], {255})


# ------------------------------------------------------------------------------------------
# hand-derived
# ------------------------------------------------------------------------------------------
def test_three_candidates_by_hand():
    cands = [[1], [1, 2], [2]]
    # order as given, classes 2 then 1: class 2 takes #1 ([1, 2]), class 1 takes #0
    assert round_robin_memory(cands, [2, 1], [0, 1, 2], 2) == [0, 1]
    # third pick: class 2 takes #2; saved grouped by class id: class 1 [0], class 2 [1, 2]
    assert round_robin_memory(cands, [2, 1], [0, 1, 2], 3) == [0, 1, 2]
    # reversed candidates: 2 -> #2, 1 -> #1, then 2 has none left (skipped), 1 -> #0
    assert round_robin_memory(cands, [2, 1], [2, 1, 0], 3) == [1, 0, 2]
    assert round_robin_memory(cands, [2, 1], [2, 1, 0], 0) == []


def test_memory_larger_than_the_candidates_is_one_line_error():
    with pytest.raises(ValueError, match=r"memory size 3 is larger than the 2 candidate images holding an old "
                                         r"foreground class \(3 candidates in all\)"):
        round_robin_memory([[1], [0, 255], [2]], [1, 2], [0, 1, 2], 3)
    with pytest.raises(ValueError, match="memory size 5 is larger than the 3 candidate"):
        class_balanced_memory([[1], [2], [1, 2]], [1, 2], 5, seed=0)
    with pytest.raises(ValueError, match="permutation"):
        round_robin_memory([[1], [2]], [1, 2], [0, 0], 1)
    with pytest.raises(ValueError, match="non-negative"):
        class_balanced_memory([[1]], [1], -1, seed=0)


def naive_release_rule(cands, class_order, candidate_order, size):
    """The rule as described: a shuffled list, delete what is taken, scan from the start each time."""
    pool = [(pos, set(cands[pos])) for pos in candidate_order]
    taken = {c: [] for c in class_order}
    n = 0
    while n < size:
        for c in class_order:
            for k, (pos, classes) in enumerate(pool):
                if c in classes:
                    taken[c].append(pos)
                    del pool[k]
                    n += 1
                    break
            if n >= size:
                break
    return [p for c in sorted(taken) for p in taken[c]]


def test_round_robin_matches_the_naive_rule_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 8))
        cands = [rng.choice(np.arange(0, k + 2), size=int(rng.integers(0, 4)), replace=False).tolist() for _ in range(n)]
        classes = rng.permutation(np.arange(1, k + 1)).tolist()
        order = rng.permutation(n).tolist()
        eligible = sum(bool(set(cl) & set(classes)) for cl in cands)
        size = int(rng.integers(0, eligible + 1))
        assert round_robin_memory(cands, classes, order, size) == naive_release_rule(cands, classes, order, size)


def test_class_balanced_memory_is_seeded_balanced_and_order_free():
    # 4 classes, 10 single-class candidates each: a memory of 8 holds each class twice
    cands = [[1 + i % 4] for i in range(40)]
    mem = class_balanced_memory(cands, [1, 2, 3, 4], 8, seed=7)
    assert len(set(mem)) == 8
    assert sorted(cands[p][0] for p in mem) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert mem == class_balanced_memory(cands, [4, 3, 2, 1], 8, seed=7)
    assert any(class_balanced_memory(cands, [1, 2, 3, 4], 8, seed=s) != mem for s in range(8, 12))
    # the draws: candidates first, then the sorted classes, from numpy's default_rng(seed)
    rng = np.random.default_rng(7)
    order, classes = rng.permutation(40).tolist(), [[1, 2, 3, 4][i] for i in rng.permutation(4)]
    assert mem == round_robin_memory(cands, classes, order, 8)


def test_presence_rules_by_hand():
    labels = torch.tensor([[[0, 0, 3, 255]]])
    # SSUL old channels [unknown, bg, c1, c2]: pixel 0 -> c1 at 0.9, pixel 1 argmax bg
    ssul_old = torch.full((1, 4, 1, 4), -9.0)
    ssul_old[0, 2, 0, 0] = 2.2
    ssul_old[0, 1, 0, 1] = 5.0
    ssul_old[0, 3, 0, 1] = 1.0  # sigmoid 0.73 >= 0.7, but not the argmax
    assert pseudo_label_presence(labels, ssul_old, "ssul") == [[1, 3]]
    # DKD fg channels [c1, c2]: 0.9 threshold
    dkd_old = torch.full((1, 2, 1, 4), -9.0)
    dkd_old[0, 1, 0, 0] = 2.0  # 0.88 < 0.9
    dkd_old[0, 0, 0, 1] = 2.5  # 0.92
    assert pseudo_label_presence(labels, dkd_old, "dkd") == [[1, 3]]
    assert pseudo_label_presence(labels, dkd_old, "dkd", threshold=0.85) == [[1, 2, 3]]
    assert pseudo_label_presence(labels, None, "dkd") == [[3]]
    with pytest.raises(ValueError, match="rule"):
        pseudo_label_presence(labels, None, "mib")
