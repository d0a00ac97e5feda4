"""``ucdseg report``: aggregation of runs over seeds (mean, sample standard deviation), the paired
UCD-over-base table, the paper column, and the files the command writes; checked on hand-made
``results.json`` whose expected figures are worked out in the tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ucdseg.reporting import aggregate, aggregate_markdown, load_results, ucd_gains, write_aggregate


def fake_results(method: str, seed: int, old: float, new: float, *, task: str = "4-3-3",
                 dataset: str = "embedded", setting: str = "overlapped", steps: int = 2) -> dict:
    """A results.json whose last step scores (old, new) without background; with background, old
    is shifted by +0.1 (as a background IoU would); 'all' is the plain mean of old and new."""
    def miou(o, n):
        return {"without_background": {"old": o, "new": n, "all": (o + n) / 2},
                "with_background": {"old": o + 0.1, "new": n, "all": (o + 0.1 + n) / 2}}

    records = [{"step": i, "classes": [i], "miou": miou(0.5, 0.5)} for i in range(steps - 1)]
    records.append({"step": steps - 1, "classes": [steps - 1], "miou": miou(old, new)})
    return {"method": method, "seed": seed, "steps": records,
            "task": {"dataset": dataset, "name": task, "setting": setting, "steps": [[0, 1]] + [[i + 1] for i in range(1, steps)]}}


def test_mean_and_sample_std_over_seeds():
    rows = aggregate([fake_results("mib", 0, 0.10, 0.02), fake_results("mib", 1, 0.20, 0.04),
                      fake_results("mib", 2, 0.30, 0.06)])
    (row,) = rows
    assert row["seeds"] == [0, 1, 2]
    assert row["without_background_old_mean"] == pytest.approx(0.20)
    assert row["without_background_old_std"] == pytest.approx(0.10)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert row["without_background_new_mean"] == pytest.approx(0.04)
    assert row["without_background_new_std"] == pytest.approx(0.02)
    assert row["with_background_old_mean"] == pytest.approx(0.30)
    # the curves: mean over seeds at each step; step 0 is 0.5 for every seed
    assert row["curves"]["old"] == pytest.approx([0.5, 0.20])
    assert row["curves"]["all"] == pytest.approx([0.5, (0.06 + 0.12 + 0.18) / 3])


def test_single_seed_has_no_spread_and_undefined_groups_stay_undefined():
    results = fake_results("ft", 0, 0.25, 0.0, steps=1)
    results["steps"][-1]["miou"]["without_background"]["new"] = None
    (row,) = aggregate([results])
    assert math.isnan(row["curves"]["new"][0])
    assert row["without_background_old_mean"] == 0.25 and row["without_background_old_std"] is None
    assert row["without_background_new_mean"] is None and row["without_background_new_std"] is None
    text = aggregate_markdown([row])
    assert "| - |" in text and "±" not in text.splitlines()[-1]
    # one seed: the value alone, and n = 1 beside the seeds
    assert text.splitlines()[-1].startswith("| embedded 4-3-3 overlapped | ft | 0 | 1 | 25.0 | - |")


@pytest.mark.parametrize("olds, cell", [
    ((0.10, 0.20), "15.0 ± 7.1"),  # sample std sqrt(2 * 0.05**2) = 0.0707
    ((0.2000, 0.2004), "20.0 ± 0.03"),  # std 0.028 points: 0.0 with one decimal, so two
    ((0.2, 0.20000001), "20.0 ± <0.01"),
    ((0.2, 0.2), "20.0 ± 0"),  # seeds that agree exactly
])
def test_a_spread_never_prints_as_plus_minus_zero_point_zero(olds, cell):
    (row,) = aggregate([fake_results("mib", seed, old, 0.05) for seed, old in enumerate(olds)])
    line = aggregate_markdown([row]).splitlines()[-1]
    assert line.startswith(f"| embedded 4-3-3 overlapped | mib | 0,1 | 2 | {cell} |"), line
    assert "± 0.0 " not in line and "± 0.0|" not in line


def test_rows_sorted_by_benchmark_then_registry_order_not_alphabetically():
    names = ["plop+ucd", "joint", "mib+ucd", "lwf-mc", "mib", "lwf", "ft", "plop", "ilt"]
    runs = [fake_results(m, 0, 0.1, 0.1, task="6-1") for m in names]
    runs += [fake_results(m, 0, 0.1, 0.1) for m in ("mib", "ft")]
    rows = aggregate(runs)
    assert [(r["task"], r["method"]) for r in rows] == [
        ("4-3-3", "ft"), ("4-3-3", "mib"),
        *[("6-1", m) for m in ("ft", "lwf", "lwf-mc", "ilt", "mib", "mib+ucd", "plop", "plop+ucd", "joint")]]


def test_ucd_gains_pair_runs_by_seed():
    runs = [
        fake_results("mib", 0, 0.10, 0.05), fake_results("mib+ucd", 0, 0.13, 0.04),
        fake_results("mib", 1, 0.20, 0.05), fake_results("mib+ucd", 1, 0.21, 0.05),
        fake_results("mib", 2, 0.90, 0.90),  # no mib+ucd with seed 2: left out of the pairing
        fake_results("plop+ucd", 0, 0.5, 0.5),  # no plop at all: no row
    ]
    (row,) = ucd_gains(runs)
    assert (row["method"], row["base"], row["seeds"]) == ("mib+ucd", "mib", [0, 1])
    # old: deltas +0.03 and +0.01 -> mean 0.02, sample std sqrt(2 * 0.01**2) = 0.01414
    assert row["without_background_old_mean"] == pytest.approx(0.02)
    assert row["without_background_old_std"] == pytest.approx(math.sqrt(2) * 0.01)
    # 95 % interval of the mean of 2 paired values: t(0.975, df=1) = 12.706 times std / sqrt(2)
    assert row["without_background_old_ci95"] == pytest.approx(12.7062 * math.sqrt(2) * 0.01 / math.sqrt(2), rel=1e-4)
    assert row["without_background_old_wins"] == 2
    # new: deltas -0.01 and 0 -> UCD higher on no seed
    assert row["without_background_new_mean"] == pytest.approx(-0.005)
    assert row["without_background_new_wins"] == 0
    # all = (old + new) / 2: deltas +0.01 and +0.005
    assert row["without_background_all_mean"] == pytest.approx(0.0075)
    assert row["without_background_all_wins"] == 2


def test_report_command_writes_tables_csv_and_plot(tmp_path):
    dirs = []
    for method, seed, old in [("mib", 0, 0.10), ("mib", 1, 0.20), ("mib+ucd", 0, 0.13), ("mib+ucd", 1, 0.21)]:
        run_dir = tmp_path / f"seed{seed}" / method
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(fake_results(method, seed, old, 0.05)))
        dirs.append(str(run_dir))
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "ucdseg.cli", "report", *dirs, "--output-dir", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "| embedded 4-3-3 overlapped | mib | 0,1 | 2 | 15.0 ± 7.1 |" in text
    # mean +2, 95 % interval 2 +- t(0.975, 1) * 1.414 / sqrt(2) = 2 +- 12.71
    assert "| embedded 4-3-3 overlapped | mib+ucd - mib | 0,1 | 2 | +2.00 [-10.71, +14.71] (2/2) |" in text
    assert (out / "report.png").stat().st_size > 0
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].startswith("embedded,4-3-3,overlapped,mib,0 1,")
    assert csv_lines[0].endswith(",curve_old,curve_new,curve_all")
    curves = [float(v) for cell in csv_lines[1].split(",")[-3:] for v in cell.split()]
    assert curves == pytest.approx([0.5, 0.15, 0.5, 0.05, 0.5, 0.10])  # old (0.10 + 0.20) / 2, new 0.05
    assert (out / "report_ucd.csv").read_text().splitlines()[1].startswith("embedded,4-3-3,overlapped,mib+ucd,mib,0 1,")


def test_no_ucd_table_without_a_pair(tmp_path):
    run_dir = tmp_path / "ft"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(fake_results("ft", 0, 0.0, 0.1)))
    text = write_aggregate([run_dir], tmp_path / "out")
    assert "UCD over its base" not in text and not (tmp_path / "out" / "report_ucd.csv").exists()


def test_paper_column_only_for_voc_cells_the_paper_has():
    rows = aggregate([fake_results("mib+ucd", 0, 0.5, 0.1, dataset="voc", task="15-1", setting="overlapped"),
                      fake_results("mib+ucd", 0, 0.5, 0.1)])
    text = aggregate_markdown(rows, paper=True)
    assert "paper old/new/all" in text
    assert "| 51.9/13.1/42.2 |" in text  # UCD Table 1, MiB+UCD, VOC 15-1 overlapped
    embedded_line = next(line for line in text.splitlines() if line.startswith("| embedded"))
    assert embedded_line.endswith("| - |")


def test_paper_column_of_the_added_rows():
    """EWC/PI/RW (MiB's Table 1, ../shared/SPEC-2.md §1) and SSUL/DKD (their READMEs, mIoU of all
    classes with background) are beside their runs."""
    rows = aggregate([fake_results("ewc", 0, 0.5, 0.1, dataset="voc", task="15-5", setting="disjoint"),
                      fake_results("rw", 0, 0.5, 0.1, dataset="voc", task="19-1", setting="overlapped"),
                      fake_results("ssul-m", 0, 0.5, 0.1, dataset="voc", task="15-1", setting="overlapped"),
                      fake_results("dkd", 0, 0.5, 0.1, dataset="voc", task="10-1", setting="overlapped")])
    text = aggregate_markdown(rows, paper=True)
    assert "| 26.7/37.7/29.4 |" in text and "| 23.3/14.2/22.9 |" in text
    assert "| -/-/71.4 (with bg) |" in text and "| -/-/60.4 (with bg) |" in text


def test_the_paper_table_has_every_row_of_ucd_table_1():
    from ucdseg.paper import UCD_TABLE1

    rows = {"ft", "pi", "ewc", "rw", "lwf", "lwf-mc", "ilt", "mib", "mib+sdr", "plop", "mib+ucd", "plop+ucd", "joint"}
    assert len(UCD_TABLE1) == 6 and all(set(column) == rows for column in UCD_TABLE1.values())
    assert UCD_TABLE1[("15-1", "overlapped")]["pi"] == (0.0, 1.8, 0.5)  # SPEC-2 §1
    assert UCD_TABLE1[("19-1", "disjoint")]["ewc"] == (23.2, 16.0, 22.9)


def test_load_results_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"results\.json does not exist"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"steps": []}))
    with pytest.raises(ValueError, match="has no finished step"):
        load_results(tmp_path)


def test_unfinished_runs_are_refused_but_joint_has_one_step(tmp_path):
    results = fake_results("mib", 0, 0.1, 0.1, steps=3)
    results["steps"] = results["steps"][:2]  # killed during step 2: its last record is step 1
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"results\.json: the run has finished 2 of its 3 steps"):
        load_results(tmp_path)
    joint = fake_results("joint", 0, 0.1, 0.1, steps=1)
    joint["task"] = results["task"]  # the task has 3 steps; joint trains them as one
    (tmp_path / "results.json").write_text(json.dumps(joint))
    assert load_results(tmp_path)["method"] == "joint"


def test_runs_with_other_weights_are_their_own_rows_and_pair_with_the_default_base():
    def weighted(method, seed, old, weights):
        results = fake_results(method, seed, old, 0.1)
        results["weights"] = weights
        return results

    runs = [weighted("mib", 0, 0.30, {"unce": 1.0, "unkd": 10.0}),
            weighted("mib+ucd", 0, 0.31, {"unce": 1.0, "unkd": 10.0, "ucd": 0.01}),  # the defaults
            weighted("mib+ucd", 0, 0.20, {"unce": 1.0, "unkd": 10.0, "ucd": 1.0}),
            weighted("mib+ucd", 1, 0.90, {"unce": 1.0, "unkd": 5.0, "ucd": 1.0})]
    rows = aggregate(runs)
    assert [(r["method"], r["seeds"]) for r in rows] == [
        ("mib", [0]), ("mib+ucd", [0]), ("mib+ucd [ucd=1, unkd=5]", [1]), ("mib+ucd [ucd=1]", [0])]
    gains = {r["method"]: r for r in ucd_gains(runs)}
    assert set(gains) == {"mib+ucd", "mib+ucd [ucd=1]"}  # seed 1 has no mib run to pair with
    assert gains["mib+ucd [ucd=1]"]["base"] == "mib"
    assert gains["mib+ucd [ucd=1]"]["without_background_old_mean"] == pytest.approx(-0.10)
    assert gains["mib+ucd"]["without_background_old_mean"] == pytest.approx(0.01)


# ------------------------------------------------------------------ avg: the mean over the steps
def test_avg_is_the_mean_over_steps_of_miou_all():
    from ucdseg.stats import average_over_steps
    from ucdseg.reporting import step_rows, summary_markdown

    def record(step, all_wo, all_wi):
        return {"step": step, "classes": [step], "pixel_accuracy": 0.9, "per_class_iou": {},
                "miou": {"without_background": {"old": 0.0, "new": None, "all": all_wo},
                         "with_background": {"old": 0.0, "new": None, "all": all_wi}}}

    results = {"method": "mib", "seed": 0, "class_names": ["bg", "a", "b", "c"],
               "task": {"dataset": "embedded", "name": "1-1-1", "setting": "overlapped", "steps": [[0, 1], [2], [3]]},
               "steps": [record(0, 0.60, 0.70), record(1, 0.30, 0.40), record(2, 0.15, 0.10)]}
    # (0.60 + 0.30 + 0.15) / 3 = 0.35; (0.70 + 0.40 + 0.10) / 3 = 0.40
    assert average_over_steps(results["steps"]) == pytest.approx({"without_background": 0.35, "with_background": 0.40})
    # a step whose "all" is undefined (no class scored) is left out: (0.60 + 0.15) / 2
    undefined = [record(0, 0.60, 0.70), record(1, None, None), record(2, 0.15, 0.10)]
    assert average_over_steps(undefined) == pytest.approx({"without_background": 0.375, "with_background": 0.40})
    assert average_over_steps([record(0, None, None)]) == {"without_background": None, "with_background": None}
    # the CSV: the average over the steps so far, the run's own at the last step
    rows = step_rows(results)
    assert [r["miou_avg_without_background"] for r in rows] == pytest.approx([0.60, 0.45, 0.35])
    assert [r["miou_avg_with_background"] for r in rows] == pytest.approx([0.70, 0.55, 0.40])
    assert "avg (the mean over the 3 steps of mIoU all): 35.0 (without background), 40.0 (with background)" \
        in summary_markdown(results)


def test_avg_aggregated_over_seeds_and_paired_for_ucd():
    # step 0 scores all = 0.5 (0.55 with background); the last step (old + new) / 2 (+0.05)
    runs = [fake_results("mib", 0, 0.10, 0.02), fake_results("mib", 1, 0.20, 0.04), fake_results("mib", 2, 0.30, 0.06)]
    (row,) = aggregate(runs)
    # per seed (0.5 + 0.06) / 2 = 0.28, (0.5 + 0.12) / 2 = 0.31, (0.5 + 0.18) / 2 = 0.34
    assert row["without_background_avg_mean"] == pytest.approx(0.31)
    assert row["without_background_avg_std"] == pytest.approx(0.03)
    # with background: all = 0.11, 0.17, 0.23 at the last step -> (0.55 + all) / 2 = 0.33, 0.36, 0.39
    assert row["with_background_avg_mean"] == pytest.approx(0.36)
    assert row["with_background_avg_std"] == pytest.approx(0.03)
    text = aggregate_markdown([row])
    assert "| old | new | all | avg | old (w/ bg) | new (w/ bg) | all (w/ bg) | avg (w/ bg) |" in text
    assert text.splitlines()[-1] == ("| embedded 4-3-3 overlapped | mib | 0,1,2 | 3 | 20.0 ± 10.0 | 4.0 ± 2.0 | 12.0 ± 6.0 "
                                     "| 31.0 ± 3.0 | 30.0 ± 10.0 | 4.0 ± 2.0 | 17.0 ± 6.0 | 36.0 ± 3.0 |")
    # UCD over its base, paired by seed: avg moves by half the last step's move in "all"
    (gain,) = ucd_gains([fake_results("mib", 0, 0.10, 0.02), fake_results("mib+ucd", 0, 0.14, 0.02)])
    assert gain["without_background_avg_mean"] == pytest.approx(0.01)  # all +0.02 at the last of 2 steps
    assert gain["without_background_avg_wins"] == 1


def test_compare_table_and_csv_carry_avg():
    from ucdseg.reporting import comparison_markdown, comparison_rows

    runs = [("mib", fake_results("mib", 0, 0.10, 0.02))]
    lines = comparison_markdown(runs).splitlines()
    assert lines[0] == "| method | old | new | all | avg | old (w/ bg) | new (w/ bg) | all (w/ bg) | avg (w/ bg) |"
    # last step: old 10, new 2, all 6 (w/ bg: 20, 2, 11); avg (50 + 6) / 2 = 28 (w/ bg: (55 + 11) / 2 = 33)
    assert lines[2] == "| mib | 10.0 | 2.0 | 6.0 | 28.0 | 20.0 | 2.0 | 11.0 | 33.0 |"
    rows = comparison_rows(runs)
    assert [r["miou_avg_without_background"] for r in rows] == pytest.approx([0.5, 0.28])
