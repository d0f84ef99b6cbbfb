"""megatron_vlm.evaluation.statistics: bootstrap intervals against scipy.stats.bootstrap and
small cases worked by hand, paired differences, McNemar's exact test and Holm's correction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from megatron_vlm.evaluation import statistics as S


def scipy_interval(data, statistic, seed, resamples=9999, paired=False):
    result = stats.bootstrap(data, statistic, n_resamples=resamples, method="percentile",
                             rng=np.random.default_rng(seed), vectorized=True, paired=paired)
    return tuple(result.confidence_interval)


def test_interval_of_a_mean_is_scipys_percentile_bootstrap():
    scores = np.random.default_rng(5).random(60)
    mine = S.bootstrap_ci(scores, resamples=9999, rng=np.random.default_rng(3))
    theirs = scipy_interval((scores,), lambda x, axis: x.mean(axis=axis), seed=3)
    assert mine == pytest.approx(theirs, abs=1e-12)
    # the default stream is seeded by (seed, task): reproducible, and another task's differs
    assert S.bootstrap_ci(scores, task="vqav2") == S.bootstrap_ci(scores, task="vqav2")
    assert S.bootstrap_ci(scores, task="vqav2") != S.bootstrap_ci(scores, task="gqa")


def test_small_intervals_by_hand():
    # one item: every resample is that item
    assert S.bootstrap_ci([0.3], resamples=50) == (0.3, 0.3)
    # items 0 and 1: a resample's mean is 0 (1/4), 0.5 (1/2) or 1 (1/4); the central 95% spans
    # 0 to 1, the central 40% (quantiles 0.3 and 0.7) is 0.5 alone
    assert S.bootstrap_ci([0.0, 1.0], resamples=4000) == (0.0, 1.0)
    assert S.bootstrap_ci([0.0, 1.0], resamples=4000, level=0.4) == (0.5, 0.5)


def test_parts_are_resampled_within_themselves():
    """POPE's accuracy is the mean of its splits' accuracies: a split all right and one all
    wrong give 0.5 whatever their sizes, in every resample that keeps each split's size."""
    scores = [1.0] * 3 + [0.0] * 97
    groups = ["random"] * 3 + ["adversarial"] * 97
    assert S.grouped_mean(scores, groups) == 0.5
    assert S.bootstrap_ci(scores, groups, resamples=2000) == (0.5, 0.5)
    assert S.grouped_mean(scores) == pytest.approx(0.03)


def test_a_stable_score_resamples_each_task_on_its_own():
    scores = np.random.default_rng(1).random(200)
    one = S.bootstrap_ci(scores, task="a")
    # one task: the task's interval less its chance, from the same stream
    alone = S.stable_score_ci({"a": S.TaskScores(scores, chance=0.25)})
    assert alone == pytest.approx((one[0] - 0.25, one[1] - 0.25), abs=1e-12)
    # two tasks with the same scores, resampled independently: the mean of two independent
    # draws varies sqrt(2) times less than one (the same indices for both would not)
    both = S.stable_score_ci({"a": S.TaskScores(scores), "b": S.TaskScores(scores)})
    ratio = (one[1] - one[0]) / (both[1] - both[0])
    assert ratio == pytest.approx(math.sqrt(2), rel=0.08)


def test_paired_difference_resamples_both_arms_with_the_same_items():
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.6).astype(float)
    b = a.copy()
    b[rng.choice(300, 20, replace=False)] = 1.0  # B fixes a few of A's errors
    paired = S.paired_bootstrap(a, b, resamples=9999, rng=np.random.default_rng(7))
    assert paired.difference == pytest.approx(b.mean() - a.mean())
    theirs = scipy_interval((a, b), lambda x, y, axis: y.mean(axis=axis) - x.mean(axis=axis),
                            seed=7, paired=True)
    assert paired.ci == pytest.approx(theirs, abs=1e-12)
    # resampling the arms apart would spread the difference over the arms' own variation
    assert paired.ci[1] - paired.ci[0] < 0.05


def test_an_arm_against_itself_is_no_difference():
    scores = np.random.default_rng(4).random(150)
    same = S.paired_bootstrap(scores, scores, task="vqav2")
    assert same.difference == 0.0 and same.ci == (0.0, 0.0) and same.p_value == 1.0
    assert S.mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0


def test_paired_p_value_is_two_sided():
    rng = np.random.default_rng(11)
    a = rng.random(400)
    b = np.clip(a + rng.normal(0.055, 0.5, 400), 0, 1)
    forward = S.paired_bootstrap(a, b, task="t")
    backward = S.paired_bootstrap(b, a, task="t")
    assert forward.p_value == pytest.approx(backward.p_value, abs=1e-12)
    d = b - a
    z = abs(d.mean()) / (d.std(ddof=1) / math.sqrt(d.size))
    assert forward.p_value == pytest.approx(2 * stats.norm.sf(z), abs=0.012)
    assert 0.01 < forward.p_value < 0.2
    # a difference on every item, never reversed: the smallest p the resamples can show
    constant = S.paired_bootstrap(np.zeros(50), np.full(50, 0.5), resamples=999)
    assert constant.p_value == pytest.approx(1 / 1000)


def test_mcnemar_counts_the_discordant_pairs():
    # 9 items only B gets right, 1 only A: two-sided exact p = 2 * P(X <= 1), X ~ Bin(10, 1/2)
    a = [0] * 9 + [1] + [1] * 30 + [0] * 10
    b = [1] * 9 + [0] + [1] * 30 + [0] * 10
    assert S.mcnemar_exact(a, b) == pytest.approx(2 * 11 / 1024)
    assert S.mcnemar_exact(a, b) == pytest.approx(stats.binomtest(9, 10, 0.5).pvalue)
    assert S.mcnemar_exact(b, a) == S.mcnemar_exact(a, b)
    with pytest.raises(ValueError, match="0/1"):
        S.mcnemar_exact([0.5, 1], [1, 1])


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([None, 0.5, 0.4]) == [None, pytest.approx(0.8), pytest.approx(0.8)]
    assert S.holm([0.9, 0.8]) == [1.0, 1.0]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty"):
        S.bootstrap_ci([])
    with pytest.raises(ValueError, match="same items"):
        S.paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="level"):
        S.bootstrap_ci([0.5, 1.0], level=95)
