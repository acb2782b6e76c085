"""The promotion gate's rule, as plain functions: a candidate against its base and production, judged by noise.

Every comparison is a difference with its 95 % interval (`sft_core.stats`), measured on the report
questions only, and a verdict: *better*, *worse* or *not distinguishable*.

- Against its **base** (the model it was fine-tuned from, on the same questions: paired), the candidate's
  format rate must be *better*: a fine-tune that does not answer in the think/answer form more often than
  its base, beyond noise, has not shown that it learned anything.
- Against **production**, on format rate and eval loss (paired when both runs reported on the same
  questions, else as independent samples): no figure may be *worse*, and at least one must be *better*;
  a candidate not distinguishable on every figure is refused unless `registry.gate.allow_equal` says a
  tie within noise is enough (a weekly retrain expected to be as good), or `promote --force` is used.

The figures of a version come from its run: per-question outcomes when the run logged its evaluation
report (`sft_core.report`), else the headline rates and their n (an unpaired interval from the counts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from sft_core.config import PRODUCTION, GateConfig
from sft_core.metrics import EVAL_LOSS, FORMAT_OK, NUM_SAMPLES, fmt
from sft_core.stats import Interval, Verdict, rate_difference, ratio_difference, verdict


@dataclass
class ModelFigures:
    """What the gate knows of one model: its headline metrics and, where its run logged them, each report
    question's format outcome and loss (question id -> value)."""

    metrics: dict[str, float]
    format_ok: dict[str, bool] | None = None
    losses: dict[str, tuple[float, int]] | None = None  # question id -> (summed loss, supervised tokens)


@dataclass
class Check:
    metric: str
    against: str  # "base" or "production"
    candidate: float | None
    reference: float | None
    n_candidate: int
    n_reference: int
    difference: Interval
    paired: bool
    verdict: Verdict
    rule: str

    @property
    def passed(self) -> bool:
        if self.verdict in ("worse", "not measured"):
            return False
        return self.against != "base" or self.verdict == "better"

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def describe(self) -> str:
        """`gen/format_ok_rate: candidate 0.86 (n=7) vs base 0.00 (n=7), difference +0.86 [+0.40, +1.00]
        (paired): better`."""
        d = self.difference
        digits = 4 if self.metric == EVAL_LOSS else 2
        interval = "no interval" if math.isnan(d.lo) else f"[{_signed(d.lo, digits)}, {_signed(d.hi, digits)}]"
        how = "paired" if self.paired else "independent samples"
        return (f"{self.metric}: candidate {fmt(self.candidate, digits)} (n={self.n_candidate}) vs {self.against} "
                f"{fmt(self.reference, digits)} (n={self.n_reference}), difference {_signed(d.value, digits)} "
                f"{interval} ({how}): {self.verdict}")


@dataclass
class Decision:
    passed: bool
    reason: str
    checks: list[Check] = field(default_factory=list)


def _signed(value: float, digits: int) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def compare_format(candidate: ModelFigures, reference: ModelFigures, against: str, gate: GateConfig) -> Check:
    """The format rates' difference (candidate - reference) with Newcombe's interval, and its verdict."""
    a, b = candidate.format_ok, reference.format_ok
    if a is not None and b is not None:
        paired = set(a) == set(b)
        ids = sorted(a)
        diff = (rate_difference([a[i] for i in ids], [b[i] for i in ids], paired=True) if paired
                else rate_difference(list(a.values()), list(b.values()), paired=False))
        n_a, n_b = len(a), len(b)
    else:  # a version logged before per-question outcomes: the counts behind its rate
        paired = False
        n_a, n_b = _n(candidate), _n(reference)
        diff = rate_difference(_as_outcomes(candidate.metrics.get(FORMAT_OK), n_a),
                               _as_outcomes(reference.metrics.get(FORMAT_OK), n_b), paired=False)
    margin = gate.min_format_ok_delta if against == PRODUCTION else 0.0
    rule = "better than base beyond noise" if against == "base" else (
        f"not worse than production beyond noise; better by > {margin:g} counts as better")
    judged = verdict(diff, higher_is_better=True, better_by=margin) if n_a and n_b else "not measured"
    return Check(FORMAT_OK, against, candidate.metrics.get(FORMAT_OK), reference.metrics.get(FORMAT_OK), n_a, n_b,
                 diff, paired, judged, rule)


def compare_loss(candidate: ModelFigures, reference: ModelFigures, gate: GateConfig) -> Check:
    """The eval losses' difference (candidate - production) with a bootstrap interval over questions."""
    a, b = candidate.losses, reference.losses
    paired = a is not None and b is not None and set(a) == set(b)
    if a is not None and b is not None:
        ids_a = sorted(a)
        ids_b = ids_a if paired else sorted(b)
        diff = ratio_difference([a[i][0] for i in ids_a], [a[i][1] for i in ids_a],
                                [b[i][0] for i in ids_b], [b[i][1] for i in ids_b], paired=paired)
        n_a, n_b = len(a), len(b)
    else:  # a run from before per-question losses were logged: the point figures alone
        la, lb = candidate.metrics.get(EVAL_LOSS), reference.metrics.get(EVAL_LOSS)
        value = la - lb if la is not None and lb is not None else math.nan
        diff, n_a, n_b = Interval(value, math.nan, math.nan, 0), _n(candidate), _n(reference)
    tolerance = gate.max_eval_loss_increase
    rule = "lower is better; not worse than production beyond noise" + (
        f" (a rise up to {tolerance:g} tolerated)" if tolerance else "")
    if math.isnan(diff.value):
        judged: Verdict = "not measured"
    elif math.isnan(diff.lo):  # no interval: only a rise past the tolerance says anything
        judged = "worse" if diff.value > tolerance else "not distinguishable"
    else:
        judged = verdict(diff, higher_is_better=False, worse_by=tolerance)
    return Check(EVAL_LOSS, PRODUCTION, candidate.metrics.get(EVAL_LOSS), reference.metrics.get(EVAL_LOSS),
                 n_a, n_b, diff, paired, judged, rule)


def decide(candidate: ModelFigures, base: ModelFigures | None, production: ModelFigures | None,
           gate: GateConfig) -> Decision:
    """Every check and the gate's decision, with the reason in one sentence."""
    checks: list[Check] = []
    if base is not None and base.metrics.get(FORMAT_OK) is not None:
        checks.append(compare_format(candidate, base, "base", gate))
    against_production: list[Check] = []
    if production is not None:
        against_production = [compare_format(candidate, production, PRODUCTION, gate),
                              compare_loss(candidate, production, gate)]
        checks += against_production
    failed = [c for c in checks if not c.passed]
    if failed:
        return Decision(False, "; ".join(c.describe() for c in failed), checks)
    if against_production and not any(c.verdict == "better" for c in against_production):
        detail = "; ".join(c.describe() for c in against_production)
        if not gate.allow_equal:
            return Decision(False, f"not better than production beyond noise on any figure ({detail}); more report "
                                   "questions narrow the intervals, and registry.gate.allow_equal=true accepts a tie "
                                   "within noise", checks)
        return Decision(True, f"not distinguishable from production, accepted as a tie (registry.gate.allow_equal): "
                              f"{detail}", checks)
    if not checks:
        return Decision(True, "nothing to compare against (no base figures, no production)", checks)
    return Decision(True, "better beyond noise where it must be, worse nowhere", checks)


def _n(figures: ModelFigures) -> int:
    n = figures.metrics.get(NUM_SAMPLES)
    return int(n) if n is not None and not math.isnan(n) else 0


def _as_outcomes(rate_value: float | None, n: int) -> list[bool]:
    """`n` outcomes with `rate * n` successes (what a logged rate and its n say)."""
    if rate_value is None or math.isnan(rate_value) or n == 0:
        return []
    k = round(rate_value * n)
    return [True] * k + [False] * (n - k)
