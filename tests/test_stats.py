"""sft_core.stats: the intervals every reported figure and every gate decision rests on, checked against
published values and by simulated coverage."""

from __future__ import annotations

import math
import random

import pytest

from sft_core.stats import (Interval, bootstrap_mean, rate, rate_difference, ratio_difference, verdict, wilson)


def test_wilson_matches_the_textbook_figures_and_stays_inside_zero_one():
    w = wilson(11, 13)  # the issue's `0.85 [0.58, 0.96]`
    assert (w.value, w.lo, w.hi, w.n) == (pytest.approx(11 / 13), pytest.approx(0.5777, abs=1e-4),
                                          pytest.approx(0.9567, abs=1e-4), 13)
    full, none = wilson(16, 16), wilson(0, 7)
    assert full.lo == pytest.approx(0.8064, abs=1e-4) and full.hi == 1.0, "16/16 is compatible with a true 81 %"
    assert none.lo == 0.0 and none.hi == pytest.approx(0.3543, abs=1e-4)
    assert math.isnan(wilson(0, 0).value) and wilson(0, 0).n == 0
    assert rate([True, False, True, True]) == wilson(3, 4)


def test_newcombe_unpaired_matches_fagerland_lydersen_laake():
    # Perondi et al. 2004 (7/34 against 1/34): 0.1765 (0.0189 to 0.3404), Newcombe hybrid score
    d = rate_difference([True] * 7 + [False] * 27, [True] * 1 + [False] * 33, paired=False)
    assert (d.value, d.lo, d.hi) == pytest.approx((0.1765, 0.0189, 0.3404), abs=1e-4)


def test_newcombe_paired_matches_fagerland_lydersen_laake():
    # Cavo et al. 2012, paired 2x2 [[59, 6], [16, 80]]: -0.0621 (-0.1186 to -0.0046), Newcombe square-and-add
    a = [True] * 59 + [True] * 6 + [False] * 16 + [False] * 80
    b = [True] * 59 + [False] * 6 + [True] * 16 + [False] * 80
    d = rate_difference(a, b, paired=True)
    assert (d.value, d.lo, d.hi) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=1e-4)
    with pytest.raises(ValueError, match="same questions"):
        rate_difference(a, b[:-1], paired=True)


def test_pairing_narrows_the_interval_when_two_models_agree_on_most_questions():
    cand = [True] * 10 + [True] * 5 + [False] * 5
    ref = [True] * 10 + [False] * 5 + [False] * 5  # the candidate fixed five answers, broke none
    paired, unpaired = rate_difference(cand, ref, paired=True), rate_difference(cand, ref, paired=False)
    assert paired.value == unpaired.value == pytest.approx(0.25)
    assert paired.hi - paired.lo < unpaired.hi - unpaired.lo
    assert verdict(paired, higher_is_better=True) == "better"
    assert verdict(unpaired, higher_is_better=True) == "not distinguishable"


def test_the_paired_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = random.Random(7)
    covered, trials = 0, 600
    for _ in range(trials):  # 40 questions; true rates 0.7 and 0.6, correlated answers
        a, b = [], []
        for _ in range(40):
            u = rng.random()
            a.append(u < 0.7)
            b.append(u < 0.6 if rng.random() < 0.8 else rng.random() < 0.6)
        d = rate_difference(a, b, paired=True)
        covered += d.lo <= 0.1 <= d.hi
    assert 0.92 <= covered / trials <= 0.99


def test_bootstrap_mean_is_repeatable_and_brackets_the_mean():
    values = [0.1, 0.4, 0.2, 0.35, 0.15, 0.3]
    first, second = bootstrap_mean(values), bootstrap_mean(values)
    assert first == second, "a fixed seed"
    assert first.lo < first.value < first.hi and first.value == pytest.approx(0.25) and first.n == 6
    assert math.isnan(bootstrap_mean([]).value)


def test_ratio_difference_weights_tokens_and_pairs_questions():
    losses_a, tokens = [10.0, 20.0, 30.0], [10, 10, 10]
    losses_b = [12.0, 23.0, 33.0]  # every question worse by about 0.25 per token
    d = ratio_difference(losses_a, tokens, losses_b, tokens, paired=True)
    assert d.value == pytest.approx(-0.2667, abs=1e-4) and d.hi < 0, "paired: consistently lower"
    assert ratio_difference(losses_a, tokens, losses_b, tokens, paired=False).hi > 0, "unpaired: within noise"


def test_verdicts_follow_the_interval_and_the_margins():
    up = Interval(0.3, 0.1, 0.5, 20)
    assert verdict(up, higher_is_better=True) == "better"
    assert verdict(up, higher_is_better=True, better_by=0.2) == "not distinguishable"
    assert verdict(up, higher_is_better=False) == "worse", "a loss that rose"
    assert verdict(Interval(0.05, 0.01, 0.09, 20), higher_is_better=False, worse_by=0.1) == "not distinguishable"
    assert verdict(Interval(0.0, -0.2, 0.2, 20), higher_is_better=True) == "not distinguishable"
    assert verdict(Interval(0.0, math.nan, math.nan, 0), higher_is_better=True) == "not distinguishable"
