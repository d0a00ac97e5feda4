"""The results arithmetic (ucdseg.stats): mIoU groups, avg, mean and spread over seeds, paired
gains and their intervals, against values worked out by hand (the t quantiles from tables)."""

import math

import pytest

from ucdseg.stats import ci95_half_width, mean_std, miou_summary, nanmean, paired_gain


def test_miou_summary_both_conventions():
    # 3 base classes (bg, 1, 2) and 2 new ones
    iou = [0.9, 0.5, 0.7, 0.2, 0.4]
    s = miou_summary(iou, num_base=3, num_seen=5)
    assert s["with_background"]["old"] == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    assert s["with_background"]["new"] == pytest.approx(0.3)
    assert s["with_background"]["all"] == pytest.approx(2.7 / 5)
    assert s["without_background"]["old"] == pytest.approx(0.6)
    assert s["without_background"]["new"] == pytest.approx(0.3)
    assert s["without_background"]["all"] == pytest.approx(1.8 / 4)


def test_miou_summary_step0_and_unscored_background():
    s = miou_summary([0.8, 0.4, 0.6], num_base=3, num_seen=3)
    assert s["with_background"]["new"] is None
    s = miou_summary([0.8, 0.4, 0.6, math.nan], num_base=2, num_seen=4, score_background=False)
    assert s["with_background"] == s["without_background"]
    assert s["with_background"]["old"] == pytest.approx(0.4)
    assert s["with_background"]["new"] == pytest.approx(0.6)  # NaN (absent class) is skipped


def test_nanmean_skips_nan_and_has_no_mean_of_nothing():
    assert nanmean([0.5, math.nan, 0.25]) == pytest.approx(0.375)
    assert nanmean([math.nan]) is None and nanmean([]) is None


def test_mean_and_sample_std_and_no_spread_for_one_value():
    mean, std = mean_std([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3)
    # sample std: sqrt(((0.2)^2 + (0.1)^2 + (0.3)^2) / 2) = sqrt(0.07)
    assert std == pytest.approx(math.sqrt(0.07))
    assert mean_std([0.4]) == (pytest.approx(0.4), None)


@pytest.mark.parametrize("n, t", [(2, 12.7062), (3, 4.3027), (5, 2.7764), (30, 2.0452)])
def test_ci95_is_students_t_times_std_over_root_n(n, t):
    # t(0.975, n - 1) from a printed table
    assert ci95_half_width(0.02, n) == pytest.approx(t * 0.02 / math.sqrt(n), rel=1e-4)


def test_ci95_needs_two_values_and_a_spread():
    assert ci95_half_width(None, 5) is None and ci95_half_width(0.1, 1) is None


def test_paired_gain_pairs_by_position_and_drops_undefined_pairs():
    ours, theirs = [0.13, 0.21, None, 0.50], [0.10, 0.20, 0.9, 0.52]
    gain = paired_gain(ours, theirs)
    # deltas +0.03, +0.01, -0.02 (the third pair is left out): mean 0.00667, sample std 0.02517
    assert gain["mean"] == pytest.approx(0.02 / 3)
    assert gain["std"] == pytest.approx(math.sqrt(((0.03 - 0.02 / 3) ** 2 + (0.01 - 0.02 / 3) ** 2
                                                   + (-0.02 - 0.02 / 3) ** 2) / 2))
    assert gain["ci95"] == pytest.approx(4.3027 * gain["std"] / math.sqrt(3), rel=1e-4)
    assert gain["wins"] == 2


def test_paired_gain_of_no_pair_and_of_one_pair():
    assert paired_gain([None], [0.5]) == {"mean": None, "std": None, "ci95": None, "wins": 0}
    one = paired_gain([0.4], [0.5])
    assert one["mean"] == pytest.approx(-0.1) and one["std"] is None and one["ci95"] is None and one["wins"] == 0
    with pytest.raises(ValueError):
        paired_gain([0.1, 0.2], [0.1])  # unpaired runs are a bug of the caller
