"""sft_core/metrics.py: the metric names the run logs and how a figure is shown (digits, intervals, sample size)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from sft_core.generate import Generation, generation_metrics
from sft_core.metrics import (BASE, DIGITS, EVAL_EXAMPLES, EVAL_LOSS, EVAL_PERPLEXITY, EVAL_TOKEN_ACCURACY, FORMAT_OK,
                              HARNESS, HI, INTERVAL_KEYS, LO, NUM_SAMPLES, RATE_KEYS, ROUGE_L, SELECTION,
                              SELECTION_LOSS, STOP, USABLE, base, bounds, digits_of, fmt, has_interval, is_bound,
                              sample_size, shown)
from sft_core.train import GENERATION_CHECK_METRICS, make_metrics_callback

NAN = float("nan")


def _generations() -> list[Generation]:
    return [Generation(question="q1", text="t", think="t", answer="a", format_ok=True, stopped=True, new_tokens=5,
                       reference_answer="a", rouge_l=1.0),
            Generation(question="q2", text="t", think="", answer="b", format_ok=False, stopped=True, new_tokens=9,
                       reference_answer="c", rouge_l=0.0)]


# --- the names the run logs ----------------------------------------------------------------------------------

def test_the_generation_figures_are_logged_under_the_gen_names():
    logged = {f"gen/{k}" for k in generation_metrics(_generations())}  # as the flow names them (tasks.track)
    assert {FORMAT_OK, STOP, USABLE, ROUGE_L, NUM_SAMPLES} <= logged
    for key in INTERVAL_KEYS:
        assert set(bounds(f"gen/{key}")) <= logged, key
    assert set(RATE_KEYS) <= set(INTERVAL_KEYS) and {FORMAT_OK, STOP, USABLE} == {f"gen/{k}" for k in RATE_KEYS}


def test_the_selection_loss_is_the_name_the_training_curve_is_logged_under(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    callback = make_metrics_callback(metrics_file)
    state = SimpleNamespace(is_world_process_zero=True, global_step=7, max_steps=10)
    callback.on_log(None, state, None, logs={"eval_loss": 1.25, "eval_format_ok_rate": 0.5})
    assert json.loads(metrics_file.read_text(encoding="utf-8")) == {
        "step": 7, SELECTION_LOSS: 1.25, f"{SELECTION}format_ok_rate": 0.5}
    assert SELECTION_LOSS == SELECTION + "loss" and "format_ok_rate" in GENERATION_CHECK_METRICS


def test_the_evaluation_names_and_prefixes_are_the_logged_ones():
    """Runs already in the tracking store carry these names: the gate and the tables read them back."""
    assert (EVAL_LOSS, EVAL_PERPLEXITY, EVAL_TOKEN_ACCURACY, EVAL_EXAMPLES) == (
        "eval/loss", "eval/perplexity", "eval/token_accuracy", "eval/examples")
    assert (BASE, HARNESS, SELECTION, LO, HI) == ("base/", "harness/", "selection/", "_lo", "_hi")


def test_every_metric_given_its_own_digits_is_one_the_run_logs():
    generated = set(generation_metrics(_generations()))
    evaluated = {"loss", "perplexity", "token_accuracy", "tokens", "examples"}  # sft_core.evaluate's keys
    assert set(DIGITS) <= generated | evaluated


# --- names ---------------------------------------------------------------------------------------------------

def test_base_prefixes_the_base_models_name():
    assert base(FORMAT_OK) == "base/gen/format_ok_rate"
    assert base(EVAL_LOSS) == "base/eval/loss"


def test_bounds_are_the_lo_and_hi_names_beside_the_metric():
    assert bounds(FORMAT_OK) == ("gen/format_ok_rate_lo", "gen/format_ok_rate_hi")
    assert bounds(base(ROUGE_L)) == ("base/gen/rouge_l_lo", "base/gen/rouge_l_hi")


@pytest.mark.parametrize(("name", "expected"), [
    (FORMAT_OK, True), (STOP, True), (USABLE, True), (ROUGE_L, True), (base(FORMAT_OK), True),
    ("harness/format_ok_rate", True), (f"{SELECTION}usable_rate", True),
    (EVAL_LOSS, False), (NUM_SAMPLES, False), ("gen/mean_new_tokens", False), ("gen/score", False),
    ("gen/format_ok_rate_lo", False),
])
def test_has_interval_is_true_for_rates_and_rouge_l_only(name, expected):
    assert has_interval(name) is expected


@pytest.mark.parametrize(("name", "expected"), [
    ("gen/format_ok_rate_lo", True), ("gen/format_ok_rate_hi", True), ("base/gen/rouge_l_hi", True),
    ("gen/format_ok_rate", False), ("eval/loss_lo", False), ("gen/mean_new_tokens_hi", False),
])
def test_is_bound_is_true_for_the_interval_names_of_a_metric_with_one(name, expected):
    assert is_bound(name) is expected


def test_sample_size_is_the_count_behind_the_metric():
    metrics = {NUM_SAMPLES: 13.0, EVAL_EXAMPLES: 12.0, base(NUM_SAMPLES): 11.0, base(EVAL_EXAMPLES): 10.0,
               "harness/num_samples": 9.0}
    assert sample_size(FORMAT_OK, metrics) == 13.0
    assert sample_size(bounds(ROUGE_L)[0], metrics) == 13.0
    assert sample_size(EVAL_LOSS, metrics) == 12.0
    assert sample_size(base(FORMAT_OK), metrics) == 11.0
    assert sample_size(base(EVAL_PERPLEXITY), metrics) == 10.0
    assert sample_size("harness/format_ok_rate", metrics) == 9.0
    assert sample_size(FORMAT_OK, {}) is None
    assert sample_size(SELECTION_LOSS, metrics) is None, "no count is logged for the selection curve"


# --- how a figure is shown ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "digits", "text"), [
    (0.123456, 4, "0.1235"), (0.5, 2, "0.50"), (3, 0, "3"), (2.5, 0, "2"), ("0.25", 4, "0.2500"),
    (None, 4, "—"), (NAN, 2, "—"), (math.inf, 2, "inf"), ("n/a", 4, "n/a"), ([1], 4, "[1]"),
])
def test_fmt_is_one_rounding_rule_for_every_figure(value, digits, text):
    assert fmt(value, digits) == text


def test_fmt_shows_four_digits_by_default():
    assert fmt(1 / 3) == "0.3333"


@pytest.mark.parametrize(("name", "digits"), [
    (EVAL_PERPLEXITY, 2), (FORMAT_OK, 2), (bounds(FORMAT_OK)[0], 2), (bounds(ROUGE_L)[1], 3), (ROUGE_L, 3),
    (NUM_SAMPLES, 0), (EVAL_EXAMPLES, 0), (base("gen/mean_new_tokens"), 1), (EVAL_LOSS, 4),
    (EVAL_TOKEN_ACCURACY, 4), ("perplexity", 2),
])
def test_digits_of_a_metric_follow_its_last_part(name, digits):
    assert digits_of(name) == digits


def test_shown_is_the_figure_with_its_interval_when_it_has_one():
    metrics = {FORMAT_OK: 0.846, f"{FORMAT_OK}_lo": 0.578, f"{FORMAT_OK}_hi": 0.957, EVAL_LOSS: 1.234567,
               ROUGE_L: 0.41234, f"{ROUGE_L}_lo": NAN, f"{ROUGE_L}_hi": NAN, STOP: 1.0, f"{STOP}_lo": 0.77}
    assert shown(FORMAT_OK, metrics) == "0.85 [0.58, 0.96]"
    assert shown(EVAL_LOSS, metrics) == "1.2346"
    assert shown(ROUGE_L, metrics) == "0.412", "a NaN interval (no references) is not shown"
    assert shown(STOP, metrics) == "1.00", "half an interval is not shown"
    assert shown(USABLE, metrics) == "—", "not measured"
    assert shown(EVAL_PERPLEXITY, {EVAL_PERPLEXITY: NAN}) == "—"
