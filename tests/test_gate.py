"""sft_core.gate: the promotion rule as plain functions, on per-question outcomes (the registry side is in
tests/test_outcome.py and tests/test_flow.py)."""

from __future__ import annotations

from sft_core.config import GateConfig
from sft_core.gate import ModelFigures, compare_format, compare_loss, decide

IDS = [f"q{i}" for i in range(20)]


def figures(format_ok: list[bool], losses: list[float] | None = None, ids: list[str] = IDS) -> ModelFigures:
    n = len(format_ok)
    metrics = {"gen/format_ok_rate": sum(format_ok) / n, "gen/num_samples": float(n)}
    by_id = None
    if losses is not None:
        metrics["eval/loss"] = sum(losses) / (10 * n)
        by_id = {i: (loss, 10) for i, loss in zip(ids, losses)}
    return ModelFigures(metrics, format_ok=dict(zip(ids, format_ok)), losses=by_id)


def test_a_fine_tune_must_beat_its_base_beyond_noise_not_by_one_answer():
    base = figures([False] * 20)
    one_more = decide(figures([True] + [False] * 19), base, None, GateConfig())
    assert not one_more.passed, "one answer of twenty is within noise (the old '> base' rule let it pass)"
    check = one_more.checks[0]
    assert check.against == "base" and check.paired and check.verdict == "not distinguishable"
    learned = decide(figures([True] * 15 + [False] * 5), base, None, GateConfig())
    assert learned.passed and learned.checks[0].verdict == "better"


def test_the_message_names_both_figures_both_n_the_interval_and_the_verdict():
    check = compare_format(figures([True] * 15 + [False] * 5), figures([False] * 20), "base", GateConfig())
    text = check.describe()
    assert text.startswith("gen/format_ok_rate: candidate 0.75 (n=20) vs base 0.00 (n=20), difference +0.75 [+")
    assert text.endswith("(paired): better")


def test_a_candidate_as_good_as_production_is_refused_unless_ties_are_allowed():
    prod = figures([True] * 18 + [False] * 2, [20.0] * 20)
    cand = figures([True] * 18 + [False] * 2, [20.0] * 19 + [21.0])
    refused = decide(cand, None, prod, GateConfig())
    assert not refused.passed and "not better than production beyond noise" in refused.reason
    assert [c.verdict for c in refused.checks] == ["not distinguishable", "not distinguishable"]
    assert "eval/loss: candidate" in refused.reason and "n=20" in refused.reason
    tie = decide(cand, None, prod, GateConfig(allow_equal=True))
    assert tie.passed and "tie" in tie.reason


def test_better_on_one_figure_and_worse_on_none_passes_production():
    prod = figures([True] * 8 + [False] * 12, [30.0] * 20)
    cand = figures([True] * 19 + [False], [30.0] * 20)  # eleven more answers in form, same loss
    decision = decide(cand, None, prod, GateConfig())
    assert decision.passed, decision.reason
    assert [(c.metric, c.verdict) for c in decision.checks] == [("gen/format_ok_rate", "better"),
                                                                 ("eval/loss", "not distinguishable")]


def test_worse_beyond_noise_on_any_figure_is_refused_even_when_another_is_better():
    prod = figures([True] * 8 + [False] * 12, [20.0] * 20)
    cand = figures([True] * 19 + [False], [30.0] * 20)  # better format, clearly higher loss on every question
    decision = decide(cand, None, prod, GateConfig())
    assert not decision.passed and "eval/loss" in decision.reason and "worse" in decision.reason
    tolerant = decide(cand, None, prod, GateConfig(max_eval_loss_increase=1.5))
    assert tolerant.passed, "a rise within the tolerated increase is not worse"


def test_other_questions_are_compared_as_independent_samples():
    prod = figures([True] * 10 + [False] * 10, ids=[f"old{i}" for i in range(20)])
    cand = figures([True] * 19 + [False])
    check = compare_format(cand, prod, "production", GateConfig())
    assert not check.paired and check.verdict == "better"


def test_a_version_without_per_question_outcomes_is_judged_from_its_rate_and_n():
    legacy = ModelFigures({"gen/format_ok_rate": 0.5, "gen/num_samples": 16.0, "eval/loss": 3.0})
    check = compare_format(figures([True] * 20), legacy, "production", GateConfig())
    assert not check.paired and check.n_reference == 16 and check.verdict == "better"
    loss = compare_loss(figures([True] * 20, [25.0] * 20), legacy, GateConfig())
    assert loss.verdict == "not distinguishable" and "no interval" in loss.describe()
