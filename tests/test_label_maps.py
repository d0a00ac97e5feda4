import numpy as np
import pytest

from ucdseg.label_maps import SETTINGS, apply_lut, eval_lut, partition_steps, select_images, train_lut
from ucdseg.tasks import get_task

# embedded has classes 1..10; "4-3-3": step 0 = {0,1,2,3,4}, step 1 = {5,6,7}, step 2 = {8,9,10}
DEFAULT = get_task("embedded", "4-3-3")
# reversed order: step 0 = {0,10,9,8,7}, step 1 = {6,5,4}, step 2 = {3,2,1}
# model ids: 0->0 10->1 9->2 8->3 7->4 6->5 5->6 4->7 3->8 2->9 1->10
REVERSED = get_task("embedded", "4-3-3", order=[10, 9, 8, 7, 6, 5, 4, 3, 2, 1])

PRESENCE = [
    [0],             # 0: background only -> never selected
    [0, 1, 2],       # 1
    [0, 1, 5],       # 2
    [0, 5, 9],       # 3
    [6, 255],        # 4
    [0, 8],          # 5
    [0, 3, 255, 10],  # 6
    [255],           # 7: void only
    [2, 12],         # 8: 12 is not a class of the dataset -> treated as void
    [],              # 9: empty
]


def test_settings_tuple():
    assert SETTINGS == ("overlapped", "disjoint", "partitioned")


def test_train_lut_default_order():
    lut = train_lut(DEFAULT, 1)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[:11].tolist() == [0, 0, 0, 0, 0, 5, 6, 7, 0, 0, 0]
    assert lut[255] == 255 and (lut[11:255] == 255).all()
    assert train_lut(DEFAULT, 0)[:11].tolist() == [0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0]
    assert train_lut(DEFAULT, 2)[:11].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 8, 9, 10]


def test_luts_reversed_order():
    assert train_lut(REVERSED, 0)[:11].tolist() == [0, 0, 0, 0, 0, 0, 0, 4, 3, 2, 1]
    assert train_lut(REVERSED, 1)[:11].tolist() == [0, 0, 0, 0, 7, 6, 5, 0, 0, 0, 0]
    assert eval_lut(REVERSED, 1)[:11].tolist() == [0, 255, 255, 255, 7, 6, 5, 4, 3, 2, 1]
    assert eval_lut(REVERSED, 2)[:11].tolist() == [0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert eval_lut(REVERSED, 1, ignore_background=True)[:11].tolist() == [255, 255, 255, 255, 7, 6, 5, 4, 3, 2, 1]
    assert eval_lut(REVERSED, 1)[255] == 255 and (eval_lut(REVERSED, 2)[11:] == 255).all()


def test_apply_lut_on_a_mask():
    mask = np.array([[0, 1, 5], [10, 255, 6], [4, 3, 12]], dtype=np.uint8)
    assert apply_lut(mask, train_lut(REVERSED, 1)).tolist() == [[0, 0, 6], [0, 255, 5], [7, 0, 255]]
    assert apply_lut(mask, eval_lut(REVERSED, 1)).tolist() == [[0, 255, 6], [1, 255, 5], [7, 255, 255]]
    assert apply_lut(mask, eval_lut(REVERSED, 0, ignore_background=True)).tolist() == \
        [[255, 255, 255], [1, 255, 255], [255, 255, 255]]
    # other integer dtypes work too
    assert apply_lut(mask.astype(np.int64), train_lut(DEFAULT, 1)).tolist() == [[0, 0, 5], [0, 255, 6], [0, 0, 255]]


def test_apply_lut_errors():
    with pytest.raises(ValueError, match="0..255.*300"):
        apply_lut(np.array([1, 300]), train_lut(DEFAULT, 0))
    with pytest.raises(ValueError, match="dtype float"):
        apply_lut(np.array([1.0]), train_lut(DEFAULT, 0))
    with pytest.raises(ValueError, match=r"shape \(256,\)"):
        apply_lut(np.zeros(3, np.uint8), np.zeros(10, np.uint8))


@pytest.mark.parametrize("task,setting,expected", [
    (DEFAULT, "overlapped", [[1, 2, 6, 8], [2, 3, 4], [3, 5, 6]]),
    (DEFAULT, "disjoint", [[1, 8], [2, 4], [3, 5, 6]]),
    (REVERSED, "overlapped", [[3, 5, 6], [2, 3, 4], [1, 2, 6, 8]]),
    (REVERSED, "disjoint", [[5], [3, 4], [1, 2, 6, 8]]),
])
def test_overlapped_and_disjoint_by_hand(task, setting, expected):
    assert [select_images(PRESENCE, task, t, setting) for t in range(3)] == expected


def test_presence_as_numpy_arrays_and_sets():
    arrays = [np.array(p, dtype=np.uint8) for p in PRESENCE]
    assert select_images(arrays, DEFAULT, 1, "overlapped") == [2, 3, 4]
    assert select_images([set(p) for p in PRESENCE], DEFAULT, 1, "disjoint") == [2, 4]


def test_partitioned_images_with_one_candidate_are_fixed():
    # candidate steps (default order): 1:{0} 2:{0,1} 3:{1,2} 4:{1} 5:{2} 6:{0,2} 8:{0}; 0,7,9: none
    candidates = {1: {0}, 2: {0, 1}, 3: {1, 2}, 4: {1}, 5: {2}, 6: {0, 2}, 8: {0}}
    for seed in range(20):
        per_step = [select_images(PRESENCE, DEFAULT, t, "partitioned", seed=seed) for t in range(3)]
        assert 1 in per_step[0] and 8 in per_step[0] and 4 in per_step[1] and 5 in per_step[2]
        flat = sorted(i for s in per_step for i in s)
        assert flat == sorted(candidates)  # each image exactly once; 0, 7, 9 nowhere
        for t, images in enumerate(per_step):
            assert all(t in candidates[i] for i in images)


def test_partitioned_follows_the_documented_draw():
    # naive reference of the documented rule: u_i from default_rng(seed).random(n), candidate floor(u_i * k)
    seed = 7
    u = np.random.default_rng(seed).random(len(PRESENCE))
    cand = {1: [0], 2: [0, 1], 3: [1, 2], 4: [1], 5: [2], 6: [0, 2], 8: [0]}
    expected = {t: [] for t in range(3)}
    for i, c in cand.items():
        expected[c[int(u[i] * len(c))]].append(i)
    assert [select_images(PRESENCE, DEFAULT, t, "partitioned", seed=seed) for t in range(3)] == \
        [sorted(expected[t]) for t in range(3)]


def test_partitioned_is_order_independent_and_seeded():
    presence = [[0, 1, 5, 9]] * 300  # every image is a candidate of all three steps
    forward = [select_images(presence, DEFAULT, t, "partitioned", seed=3) for t in range(3)]
    backward = [select_images(presence, DEFAULT, t, "partitioned", seed=3) for t in (2, 1, 0)][::-1]
    assert forward == backward
    assert sorted(i for s in forward for i in s) == list(range(300))
    other = [select_images(presence, DEFAULT, t, "partitioned", seed=4) for t in range(3)]
    assert other != forward
    assert (partition_steps(presence, DEFAULT, seed=3) >= 0).all()


def test_partitioned_is_uniform_over_candidates():
    presence = [[0, 1, 5, 9]] * 3000
    counts = [len(select_images(presence, DEFAULT, t, "partitioned", seed=0)) for t in range(3)]
    assert sum(counts) == 3000
    assert all(900 < c < 1100 for c in counts), counts  # 1000 +- ~4 standard deviations


def test_partitioned_with_reversed_order():
    # reversed: step 0 = {10,9,8,7}, step 1 = {6,5,4}, step 2 = {3,2,1}
    presence = [[0, 7], [4], [0, 1, 2], [0, 7, 3]]
    per_step = [select_images(presence, REVERSED, t, "partitioned", seed=0) for t in range(3)]
    assert 0 in per_step[0] and 1 in per_step[1] and 2 in per_step[2]
    assert (3 in per_step[0]) != (3 in per_step[2]) and 3 not in per_step[1]


def test_select_errors():
    with pytest.raises(ValueError, match="unknown setting 'overlap'.*overlapped, disjoint, partitioned"):
        select_images(PRESENCE, DEFAULT, 0, "overlap")
    with pytest.raises(ValueError, match="step 3 out of range.*0..2"):
        select_images(PRESENCE, DEFAULT, 3, "overlapped")
    with pytest.raises(ValueError, match="step -1"):
        train_lut(DEFAULT, -1)
    with pytest.raises(ValueError, match="step 5"):
        eval_lut(DEFAULT, 5)


# ---------------------------------------------------------------------------- evaluation conventions
def test_eval_lut_unseen_background_on_a_mask():
    """REVERSED after step 1: seen 0,10,9,8,7 (step 0) and 6,5,4 (step 1); unseen 3,2,1."""
    mask = np.array([[0, 1, 5], [10, 255, 6], [4, 3, 12]], dtype=np.uint8)
    # MiB: unseen classes void
    assert apply_lut(mask, eval_lut(REVERSED, 1, unseen="ignore")).tolist() == \
        [[0, 255, 6], [1, 255, 5], [7, 255, 255]]
    # PLOP / UCD: unseen classes are background; void (255) and non-class ids (12) stay void
    assert apply_lut(mask, eval_lut(REVERSED, 1, unseen="background")).tolist() == \
        [[0, 0, 6], [1, 255, 5], [7, 0, 255]]
    # background not scored (ADE20K): unseen classes take the background's label, void
    assert apply_lut(mask, eval_lut(REVERSED, 1, ignore_background=True, unseen="background")).tolist() == \
        [[255, 255, 6], [1, 255, 5], [7, 255, 255]]
    assert eval_lut(REVERSED, 1, unseen="background")[:11].tolist() == [0, 0, 0, 0, 7, 6, 5, 4, 3, 2, 1]


def test_eval_lut_conventions_agree_once_every_class_is_seen():
    for ignore_background in (False, True):
        ignored = eval_lut(REVERSED, 2, ignore_background=ignore_background, unseen="ignore")
        background = eval_lut(REVERSED, 2, ignore_background=ignore_background, unseen="background")
        assert ignored.tolist() == background.tolist()


def test_eval_images_keeps_images_with_a_seen_class():
    """DEFAULT after step 0: seen foreground {1,2,3,4}."""
    from ucdseg.label_maps import eval_images

    assert eval_images(PRESENCE, DEFAULT, 0, images="all") == list(range(10))
    # dropped: 3 ({5,9}), 4 ({6}), 5 ({8}) hold foreground classes, none of them seen;
    # kept: 0, 7, 9 (no foreground class: background, void or nothing), 8 (2 seen, 12 no class)
    assert eval_images(PRESENCE, DEFAULT, 0, images="seen") == [0, 1, 2, 6, 7, 8, 9]
    # after step 1 ({5,6,7} seen too): 3 and 4 come back, 5 ({8}) is still out
    assert eval_images(PRESENCE, DEFAULT, 1, images="seen") == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    # after the last step every image is scored, as with "all"
    assert eval_images(PRESENCE, DEFAULT, 2, images="seen") == list(range(10))


def test_eval_conventions_reject_unknown_names():
    from ucdseg.label_maps import eval_images

    with pytest.raises(ValueError, match="unseen-class convention 'void'"):
        eval_lut(DEFAULT, 0, unseen="void")
    with pytest.raises(ValueError, match="evaluation image set 'old'"):
        eval_images(PRESENCE, DEFAULT, 0, images="old")
