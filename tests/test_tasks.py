import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from ucdseg.tasks import Task, TaskError, get_task, list_tasks

# classes per step (step 0 counts background), written out by hand from the task names
NAMED = {
    ("voc", "19-1"): [20, 1],
    ("voc", "15-5"): [16, 5],
    ("voc", "15-1"): [16, 1, 1, 1, 1, 1],
    ("voc", "10-1"): [11] + [1] * 10,
    ("voc", "5-3"): [6, 3, 3, 3, 3, 3],
    ("voc", "2-2"): [3] + [2] * 9,
    ("voc", "10-10"): [11, 10],
    ("ade", "100-50"): [101, 50],
    ("ade", "100-10"): [101, 10, 10, 10, 10, 10],
    ("ade", "100-5"): [101] + [5] * 10,
    ("ade", "50-50"): [51, 50, 50],
    ("cityscapes", "17-2"): [18, 2],
    ("cityscapes", "13-6"): [14, 6],
    ("cityscapes", "13-1"): [14, 1, 1, 1, 1, 1, 1],
    ("embedded", "5-5"): [6, 5],
    ("embedded", "6-2"): [7, 2, 2],
    ("embedded", "4-2"): [5, 2, 2, 2],
    ("embedded", "6-1"): [7, 1, 1, 1, 1],
    ("embedded", "9-1"): [10, 1],
    ("embedded", "4-3-3"): [5, 3, 3],
    ("embedded", "2-2"): [3, 2, 2, 2, 2],
}


def test_voc_15_1_steps_are_plain_lists():
    task = get_task("voc", "15-1")
    assert task.steps == [list(range(16)), [16], [17], [18], [19], [20]]
    assert all(type(s) is list and all(type(c) is int for c in s) for s in task.steps)
    assert task.num_classes == 21 and task.order == list(range(1, 21)) and task.num_steps == 6


def test_cli_one_liner_prints_the_documented_steps():
    out = subprocess.run([sys.executable, "-c", "from ucdseg.tasks import get_task; "
                          "print(get_task('voc','15-1').steps)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [16], [17], [18], [19], [20]]"


@pytest.mark.parametrize("dataset,name", sorted(NAMED))
def test_named_tasks(dataset, name):
    task = get_task(dataset, name)
    assert task.name == name and task.dataset == dataset
    assert task.classes_per_step == NAMED[(dataset, name)]
    assert name in list_tasks(dataset)
    # default order: consecutive ids
    assert [c for s in task.steps for c in s] == list(range(task.num_classes))


def test_list_tasks_matches_the_named_table():
    for dataset in ("voc", "ade", "cityscapes", "embedded"):
        assert sorted(list_tasks(dataset)) == sorted(n for d, n in NAMED if d == dataset)


def test_aliases_resolve_to_canonical_names():
    assert get_task("voc", "15-5s").name == "15-1"
    assert get_task("voc", "15-5s").steps == get_task("voc", "15-1").steps
    assert get_task("cityscapes", "13-6s").name == "13-1"
    assert get_task("cityscapes", "13-6s").classes_per_step == [14, 1, 1, 1, 1, 1, 1]
    with pytest.raises(TaskError, match="'15-5s' for ade"):
        get_task("ade", "15-5s")


def test_generic_names():
    assert get_task("voc", "16-2").classes_per_step == [17, 2, 2]
    assert get_task("voc", "10-5-5").steps == [list(range(11)), [11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]
    assert get_task("embedded", "4-2-2-2").classes_per_step == [5, 2, 2, 2]
    assert get_task("embedded", "1-9").classes_per_step == [2, 9]
    assert get_task("voc", "015-05").name == "15-5"


@pytest.mark.parametrize("dataset,name,reason", [
    ("voc", "15-6", "5 remaining classes are not a multiple of 6"),
    ("voc", "0-5", "positive"),
    ("voc", "5-0", "positive"),
    ("voc", "abc", "not of the form"),
    ("voc", "15", "not of the form"),
    ("voc", "20-1", "leave no class"),
    ("voc", "25-5", "leave no class"),
    ("voc", "10-5-6", "sum to 21, not 20"),
    ("voc", "10-5-4", "sum to 19, not 20"),
    ("embedded", "15-5s", "not of the form"),
])
def test_invalid_names_list_what_is_valid(dataset, name, reason):
    with pytest.raises(ValueError) as err:
        get_task(dataset, name)
    msg = str(err.value)
    assert repr(name) in msg and reason in msg and "\n" not in msg
    for valid in list_tasks(dataset):
        assert valid in msg
    assert "'N-M'" in msg and "'a-b-c...'" in msg


def test_unknown_dataset():
    """tasks knows the built-in datasets' class counts only (another dataset comes with num_classes;
    the dataset registry's wording is tests/test_registry.py's)."""
    with pytest.raises(ValueError, match="unknown dataset 'coco'.*voc, ade, cityscapes, embedded"):
        get_task("coco", "15-5")
    with pytest.raises(ValueError, match="unknown dataset"):
        list_tasks("coco")


def test_explicit_order_and_model_space():
    task = get_task("embedded", "4-3-3", order=[10, 9, 8, 7, 6, 5, 4, 3, 2, 1])
    assert task.steps == [[0, 10, 9, 8, 7], [6, 5, 4], [3, 2, 1]]
    assert task.seen(1) == [0, 10, 9, 8, 7, 6, 5, 4]
    assert task.old(0) == [] and task.old(2) == [0, 10, 9, 8, 7, 6, 5, 4]
    assert task.new(2) == [3, 2, 1]
    assert task.model_ids([0, 10, 6, 1]) == [0, 1, 5, 10]
    assert task.dataset_ids([0, 1, 5, 10]) == [0, 10, 6, 1]
    lut = task.model_lut
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[:11].tolist() == [0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert (lut[11:] == 255).all()
    with pytest.raises(ValueError, match="class id 11"):
        task.model_ids([11])
    with pytest.raises(ValueError, match="step 3 out of range.*0..2"):
        task.new(3)


def test_default_order_model_ids_are_identity():
    task = get_task("voc", "15-5")
    assert task.model_ids(range(21)) == list(range(21))
    assert task.seen(1) == list(range(21)) and task.new(1) == [16, 17, 18, 19, 20]


@pytest.mark.parametrize("order,expect", [
    ([1, 2, 3], "permutation of 1..10"),
    ([1, 1, 2, 3, 4, 5, 6, 7, 8, 9], "permutation"),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "permutation"),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "permutation"),
    ([1.5, 2, 3, 4, 5, 6, 7, 8, 9, 10], "not an int"),
    ("1,2,3", "expected None, an int seed or a list"),
    (-1, "non-negative"),
])
def test_invalid_orders(order, expect):
    with pytest.raises(ValueError, match=expect):
        get_task("embedded", "5-5", order=order)


def test_seeded_order_is_reproducible():
    a = get_task("voc", "15-1", order=0)
    # numpy's PCG64 permutation for seed 0, written down once: the same on every machine
    assert a.order == [5, 20, 7, 3, 14, 17, 4, 12, 11, 9, 1, 13, 8, 6, 19, 18, 15, 10, 2, 16]
    assert a.steps[0] == [0] + a.order[:15] and a.steps[1:] == [[18], [15], [10], [2], [16]]
    assert get_task("voc", "15-1", order=0) == a
    assert get_task("voc", "15-1", order=1).order != a.order
    assert get_task("voc", "15-1", order=np.int64(0)).order == a.order


def test_task_validation_and_replace():
    task = get_task("embedded", "5-5")
    joint = dataclasses.replace(task, name="5-5 (joint)", steps=[[c for s in task.steps for c in s]])
    assert joint.classes_per_step == [11] and joint.seen(0) == list(range(11))
    with pytest.raises(ValueError, match="every class 0..10"):
        Task("embedded", "bad", [[0, 1, 2], [3]], 11, list(range(1, 11)))
    with pytest.raises(ValueError, match="must start with background 0"):
        Task("embedded", "bad", [[1, 0]], 11, list(range(1, 11)))


def test_built_in_class_counts_equal_the_datasets_class_tables():
    """tasks.DATASETS (kept in the pure tasks module) says what the datasets' class tables say."""
    from ucdseg.data import dataset_meta
    from ucdseg.tasks import DATASETS

    assert DATASETS == {name: dataset_meta(name).num_classes - 1 for name in ("voc", "ade", "cityscapes", "embedded")}
