"""What ``ucdseg report`` pools (issue 16): only seeds of one experiment share a row. Runs whose
configs differ beyond the seed and the run-location keys get rows of their own, labelled by the
keys that differ; the same run given twice is refused; a corrupt results file is named. The
expected figures are worked out by hand in each test."""

from __future__ import annotations

import json

import pytest

from ucdseg.config import load_config, to_dict
from ucdseg.reporting import (aggregate, check_distinct, load_results, pooled_config, ucd_gains,
                              write_aggregate)


def results_of(method: str, seed: int, old: float, *overrides: str, weights: dict | None = None) -> dict:
    """A finished 2-step run scoring ``old`` on the old classes and 0.1 on the new ones after step 1,
    with the config ``ucdseg run`` records (``overrides`` on top of the defaults)."""
    config = to_dict(load_config(None, [f"method.name={method}", f"seed={seed}", "task.name=8-2", *overrides]))
    miou = {conv: {"old": old, "new": 0.1, "all": (old + 0.1) / 2} for conv in ("without_background", "with_background")}
    return {"method": method, "seed": seed, "config": config, "weights": weights or {},
            "task": {"dataset": "embedded", "name": "8-2", "setting": "overlapped", "steps": [[0, 1], [2]]},
            "steps": [{"step": s, "classes": [s], "miou": miou} for s in range(2)]}


def rows_by_method(runs: list[dict]) -> dict[str, dict]:
    return {row["method"]: row for row in aggregate(runs)}


def test_runs_differing_only_in_where_they_ran_and_the_seed_are_pooled():
    runs = [results_of("mib", 0, 0.2, "name=a", "output_dir=/x", "device=cpu", "data.root=/data/one",
                       "data.workers=0", "data.cache_dir=/c1", "eval.batch_size=8", "eval.num_images=0",
                       "train.log_every=1", "train.checkpoint_every=0", "model.pretrained=/w/one/r101.pth",
                       "train.step0_from=/runs/ft-0"),
            results_of("mib", 1, 0.4, "name=b", "output_dir=/y", "device=cuda", "data.root=/data/two",
                       "data.workers=4", "data.cache_dir=/c2", "eval.batch_size=64", "eval.num_images=4",
                       "train.log_every=50", "train.checkpoint_every=100", "model.pretrained=/w/two/r101.pth",
                       "train.step0_from=/runs/ft-1", "train.channels_last=true")]
    (row,) = aggregate(runs)
    assert (row["method"], row["seeds"]) == ("mib", [0, 1])
    assert row["without_background_old_mean"] == pytest.approx(0.3)  # (0.2 + 0.4) / 2


def test_runs_with_another_config_are_rows_of_their_own_labelled_by_what_differs():
    runs = [results_of("mib", 0, 0.2, "train.iterations=3"), results_of("mib", 1, 0.4, "train.iterations=3"),
            results_of("mib", 0, 0.9, "train.iterations=40"),
            results_of("mib", 2, 0.6, "train.iterations=40", "train.lr=0.02"),
            results_of("ft", 0, 0.0, "train.iterations=3"), results_of("ft", 1, 0.1, "train.iterations=40")]
    rows = rows_by_method(runs)
    assert set(rows) == {"ft (train.iterations=3)", "ft (train.iterations=40)",
                         "mib (train.iterations=3, train.lr=0.01)", "mib (train.iterations=40, train.lr=0.01)",
                         "mib (train.iterations=40, train.lr=0.02)"}
    assert rows["mib (train.iterations=3, train.lr=0.01)"]["seeds"] == [0, 1]
    assert rows["mib (train.iterations=3, train.lr=0.01)"]["without_background_old_mean"] == pytest.approx(0.3)
    assert rows["mib (train.iterations=40, train.lr=0.01)"]["without_background_old_mean"] == pytest.approx(0.9)


def test_a_config_saved_before_a_key_existed_pools_with_its_default():
    old = results_of("mib", 0, 0.2)
    del old["config"]["train"]["accumulate"]  # written by a version without train.accumulate (default 1)
    (row,) = aggregate([old, results_of("mib", 1, 0.4, "train.accumulate=1")])
    assert row["seeds"] == [0, 1]
    rows = rows_by_method([old, results_of("mib", 1, 0.4, "train.accumulate=2")])
    assert set(rows) == {"mib (train.accumulate=1)", "mib (train.accumulate=2)"}


def test_a_resnet_config_saved_before_first_block_dilation_pools_as_the_layout_it_was_trained_with():
    """docs/protocol.md §2.1: such a run is compared as ``previous`` (torchvision's layout)."""
    resnet = ("model.backbone=resnet101", "model.output_stride=16")
    old = results_of("mib", 0, 0.2, *resnet)
    del old["config"]["model"]["first_block_dilation"]
    (row,) = aggregate([old, results_of("mib", 1, 0.4, *resnet, "model.first_block_dilation=previous")])
    assert row["seeds"] == [0, 1]
    rows = rows_by_method([old, results_of("mib", 1, 0.4, *resnet)])  # today's default: release
    assert set(rows) == {"mib (model.first_block_dilation=previous)", "mib (model.first_block_dilation=release)"}


def test_a_method_key_outside_method_options_is_a_key_of_its_own():
    """0.1 does not rewrite configs older than its method options: such a key is compared as written."""
    old = results_of("mib+ucd", 0, 0.2)
    old["config"]["method"]["ucd_temperature"] = 0.07
    rows = rows_by_method([old, results_of("mib+ucd", 1, 0.4)])
    assert {m: r["seeds"] for m, r in rows.items()} == {"mib+ucd (method.ucd_temperature=0.07)": [0],
                                                        "mib+ucd (method.ucd_temperature=None)": [1]}


def test_pretrained_weights_count_but_not_where_their_file_is():
    assert pooled_config(results_of("mib", 0, 0.1, "model.pretrained=/a/r.pth")) == \
        pooled_config(results_of("mib", 3, 0.1, "model.pretrained=/b/r.pth"))
    rows = rows_by_method([results_of("mib", 0, 0.1, "model.pretrained=/a/r.pth"),
                           results_of("mib", 1, 0.1, "model.pretrained=null")])
    assert set(rows) == {"mib (model.pretrained=<a weights file>)", "mib (model.pretrained=None)"}


def test_the_same_run_twice_is_refused_naming_both():
    first, again = results_of("mib", 0, 0.2, "name=a"), results_of("mib", 0, 0.25, "name=b", "data.workers=2")
    with pytest.raises(ValueError, match=r"^runs/a and runs/b are the same run \(mib, seed 0"):
        check_distinct([first, again], ["runs/a", "runs/b"])
    with pytest.raises(ValueError, match="run 1 and run 2 are the same run"):
        aggregate([first, again])
    # another seed, another method or other weights: distinct
    check_distinct([first, results_of("mib", 1, 0.2), results_of("ft", 0, 0.2),
                    results_of("mib", 0, 0.2, weights={"unkd": 5.0})])


def test_ucd_gains_pair_only_runs_of_the_same_config():
    runs = [results_of("mib", 0, 0.20, "train.iterations=3"), results_of("mib", 1, 0.30, "train.iterations=3"),
            results_of("mib", 0, 0.90, "train.iterations=40"),
            results_of("mib+ucd", 0, 0.25, "train.iterations=3"), results_of("mib+ucd", 1, 0.31, "train.iterations=3"),
            results_of("mib+ucd", 2, 0.50, "train.lr=0.5")]  # no mib with this lr: no pair
    (gain,) = ucd_gains(runs)
    assert (gain["method"], gain["base"], gain["seeds"]) == (
        "mib+ucd (train.iterations=3, train.lr=0.01)", "mib (train.iterations=3)", [0, 1])
    assert gain["without_background_old_mean"] == pytest.approx((0.05 + 0.01) / 2)


def test_write_aggregate_refuses_before_writing_anything(tmp_path):
    for name, results in (("a", results_of("mib", 0, 0.2)), ("b", results_of("mib", 0, 0.2, "name=b"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=r"a and .*b are the same run"):
        write_aggregate([tmp_path / "a", tmp_path / "b"], out)
    with pytest.raises(ValueError, match=r"a is given twice \(as .*a and .*a/\.\./a\)"):
        write_aggregate([tmp_path / "a", tmp_path / "a" / ".." / "a"], out)
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ('{"method": "mib", "seed": 0, "ste', r"results\.json is truncated or corrupt \(invalid JSON at line 1 column 30"),
    ("[]", r"results\.json is not a results file of `ucdseg run`: its top level is a list"),
    ('{"method": "mib", "seed": "0", "task": {}, "steps": [1]}', r"key 'seed' is missing or not an integer"),
    ('{"method": "mib", "seed": 0, "task": {"name": "8-2"}, "steps": [1]}', r"key 'task.dataset' is missing"),
    ('{"method": "mib", "seed": 0, "task": {"dataset": "voc", "name": "15-5", "setting": "disjoint", "steps": []},'
     ' "steps": [{"step": 0}]}', r"record 0 of 'steps' lacks its step number or its mIoU"),
])
def test_corrupt_results_are_named(tmp_path, text, message):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_results(tmp_path)
    assert str(tmp_path / "results.json") in str(info.value) and "\n" not in str(info.value)


def test_ucd_gains_compare_the_options_both_methods_have():
    runs = [results_of("plop", 0, 0.20, "method.options.pod_factor=0.001"),
            results_of("plop+ucd", 0, 0.26, "method.options.pod_factor=0.001"),  # UCD's own options at defaults
            results_of("plop+ucd", 1, 0.50)]  # PLOP's default pod_factor: no plop run of that config
    (gain,) = ucd_gains(runs)
    assert gain["seeds"] == [0] and gain["base"].startswith("plop")
    assert gain["without_background_old_mean"] == pytest.approx(0.06)
