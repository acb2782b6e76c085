"""How sure a figure is: 95 % intervals for rates, means and differences, each with its n.

- A rate (format, stop, usable) gets the Wilson score interval (scipy): unlike the normal
  approximation it stays inside [0, 1] and is honest at 0/n and n/n, where small sets live.
- A mean (ROUGE-L) gets a percentile bootstrap over questions, with a fixed seed.
- The difference of two rates gets Newcombe's hybrid score interval (method 10 of Newcombe 1998,
  "Interval estimation for the difference between independent proportions"), built from the two
  Wilson intervals; when both models answered the same questions, the paired form (method 10 of
  Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions
  based on paired data"), which corrects for the correlation between the two models' answers.
- The difference of two token-weighted mean losses gets a bootstrap over questions (paired when
  the questions are the same).

A difference is *better* or *worse* only when its whole interval lies on one side of zero (or of a
margin); otherwise the two figures are *not distinguishable* at 95 %.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

Verdict = Literal["better", "worse", "not distinguishable", "not measured"]


@dataclass(frozen=True)
class Interval:
    """A figure, its 95 % interval and the number of questions behind it (NaN when n is 0)."""

    value: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


NAN = float("nan")


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The rate `successes / n` with its Wilson score interval."""
    if n <= 0:
        return Interval(NAN, NAN, NAN, 0)
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high), int(n))


def rate(outcomes: Sequence[bool]) -> Interval:
    """The share of true outcomes with its Wilson interval."""
    return wilson(sum(bool(x) for x in outcomes), len(outcomes))


def bootstrap_mean(values: Sequence[float], *, seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES,
                   confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` with a percentile bootstrap interval (resampling the questions, fixed seed)."""
    import numpy as np

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return Interval(NAN, NAN, NAN, 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    return Interval(float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), int(x.size))


def rate_difference(a: Sequence[bool], b: Sequence[bool], *, paired: bool,
                    confidence: float = CONFIDENCE) -> Interval:
    """rate(a) - rate(b) with Newcombe's interval; `paired`: a[i] and b[i] are the same question's outcomes.

    `n` is the smaller of the two sample sizes (the same number when paired).
    """
    if paired and len(a) != len(b):
        raise ValueError(f"paired outcomes need the same questions: {len(a)} against {len(b)}")
    if not a or not b:
        return Interval(NAN, NAN, NAN, 0)
    w1, w2 = rate(a), rate(b)
    p1, p2 = w1.value, w2.value
    d = p1 - p2
    phi = _phi(a, b) if paired else 0.0
    lo = d - math.sqrt(max((p1 - w1.lo) ** 2 - 2 * phi * (p1 - w1.lo) * (w2.hi - p2) + (w2.hi - p2) ** 2, 0.0))
    hi = d + math.sqrt(max((w1.hi - p1) ** 2 - 2 * phi * (w1.hi - p1) * (p2 - w2.lo) + (p2 - w2.lo) ** 2, 0.0))
    return Interval(d, max(lo, -1.0), min(hi, 1.0), min(len(a), len(b)))


def _phi(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Newcombe's continuity-corrected estimate of the correlation of paired binary outcomes (0 when a margin
    is empty, or when the agreement is within half a question of independence)."""
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = len(a) - both - only_a - only_b
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    if margins == 0:
        return 0.0
    cross = both * neither - only_a * only_b
    if cross > len(a) / 2:
        cross -= len(a) / 2
    elif cross >= 0:
        cross = 0
    return cross / math.sqrt(margins)


def ratio_difference(a_sums: Sequence[float], a_counts: Sequence[float], b_sums: Sequence[float],
                     b_counts: Sequence[float], *, paired: bool, seed: int = BOOTSTRAP_SEED,
                     resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> Interval:
    """sum(a_sums)/sum(a_counts) - sum(b_sums)/sum(b_counts) (token-weighted mean losses) with a bootstrap
    interval over questions; `paired`: index i is the same question on both sides (resampled together)."""
    import numpy as np

    a_s, a_c, b_s, b_c = (np.asarray(v, dtype=float) for v in (a_sums, a_counts, b_sums, b_counts))
    if paired and a_s.size != b_s.size:
        raise ValueError(f"paired losses need the same questions: {a_s.size} against {b_s.size}")
    if a_s.size == 0 or b_s.size == 0 or a_c.sum() == 0 or b_c.sum() == 0:
        return Interval(NAN, NAN, NAN, 0)
    d = a_s.sum() / a_c.sum() - b_s.sum() / b_c.sum()
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a_s.size, size=(resamples, a_s.size))
    ib = ia if paired else rng.integers(0, b_s.size, size=(resamples, b_s.size))
    diffs = a_s[ia].sum(1) / np.maximum(a_c[ia].sum(1), 1e-12) - b_s[ib].sum(1) / np.maximum(b_c[ib].sum(1), 1e-12)
    tail = (1 - confidence) / 2
    return Interval(float(d), float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail)),
                    int(min(a_s.size, b_s.size)))


def verdict(difference: Interval, *, higher_is_better: bool, better_by: float = 0.0, worse_by: float = 0.0) -> Verdict:
    """`better` when the whole interval of (candidate - reference) is beyond `better_by` on the good side,
    `worse` when it is wholly beyond `worse_by` on the bad side, else `not distinguishable`.

    `better_by` asks for a margin (a rate: 0.05 asks for five points more); `worse_by` tolerates one (a
    loss: 0.1 lets the loss rise by up to 0.1 without counting as worse). Both are magnitudes, >= 0.
    """
    lo, hi = difference.lo, difference.hi
    if math.isnan(lo) or math.isnan(hi):
        return "not distinguishable"
    if not higher_is_better:  # a loss: lower is better; look at it as a gain
        lo, hi = -hi, -lo
    if lo > better_by:
        return "better"
    if hi < -worse_by:
        return "worse"
    return "not distinguishable"
