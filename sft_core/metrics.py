"""Metric names and how a figure is shown, defined once for the run, the table, the card, the tags and the gate.

Two sets of validation questions, never sharing one (`sft_core.split.assign_validation`):
- `selection/…`: the learning curve on the *selection* questions, what chose the checkpoint
  (eval loss at every evaluation, the generation check at every save);
- `eval/…`, `gen/…`, `harness/…`: the model the run ships, measured once on the *report* questions
  (at the last training step); `base/eval/…`, `base/gen/…`: its base model on the same questions
  (at step 0). Rates and ROUGE-L carry a 95 % interval as `…_lo` / `…_hi` beside them.
"""

from __future__ import annotations

from typing import Any

BASE = "base/"
GEN = "gen/"
HARNESS = "harness/"
SELECTION = "selection/"

SELECTION_LOSS = "selection/loss"
EVAL_LOSS = "eval/loss"
EVAL_PERPLEXITY = "eval/perplexity"
EVAL_TOKEN_ACCURACY = "eval/token_accuracy"
EVAL_EXAMPLES = "eval/examples"
FORMAT_OK = "gen/format_ok_rate"
STOP = "gen/stop_rate"
USABLE = "gen/usable_rate"
ROUGE_L = "gen/rouge_l"
NUM_SAMPLES = "gen/num_samples"
MEAN_NEW_TOKENS = "gen/mean_new_tokens"
SCORE = "gen/score"  # what selection by generation maximises: not a figure of the model
HARNESS_NUM_SAMPLES = "harness/num_samples"
LO, HI = "_lo", "_hi"

# the generation figures (`sft_core.generate.generation_metrics` keys) that carry an interval
RATE_KEYS = ("format_ok_rate", "stop_rate", "usable_rate")
INTERVAL_KEYS = (*RATE_KEYS, "rouge_l")

# digits shown, by the metric's last part (the rest: 4): a rate over tens of questions has two honest digits
DIGITS = {"perplexity": 2, "mean_new_tokens": 1, "mean_think_chars": 1, "mean_answer_chars": 1, "num_samples": 0,
          "examples": 0, "tokens": 0, "format_ok_rate": 2, "stop_rate": 2, "usable_rate": 2, "rouge_l": 3}


def base(name: str) -> str:
    """The base model's name of a metric: `base/gen/format_ok_rate`."""
    return BASE + name


def is_base(name: str) -> bool:
    return name.startswith(BASE)


def own_and_base(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """The fine-tune's figures, and its base model's under their own names (`base/gen/x` as `gen/x`)."""
    own = {k: v for k, v in metrics.items() if not is_base(k)}
    return own, {k.removeprefix(BASE): v for k, v in metrics.items() if is_base(k)}


def bounds(name: str) -> tuple[str, str]:
    """The names of a metric's interval: (`gen/format_ok_rate_lo`, `gen/format_ok_rate_hi`)."""
    return name + LO, name + HI


def has_interval(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in INTERVAL_KEYS


def is_bound(name: str) -> bool:
    return name.endswith((LO, HI)) and has_interval(name[: -len(LO)])


def sample_size(name: str, metrics: dict[str, float]) -> float | None:
    """The n behind a metric: `gen/num_samples` for `gen/…`, `harness/num_samples` for `harness/…`,
    `eval/examples` for `eval/…` (the base's for `base/…`)."""
    prefix = name.rsplit("/", 1)[0]
    return metrics.get(f"{prefix}/examples" if prefix.endswith("eval") else f"{prefix}/num_samples")


def fmt(value: Any, digits: int = 4) -> str:
    """One rounding rule for every figure a person reads (terminal, card, summary, tags, gate messages)."""
    if value is None:
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:  # NaN
        return "—"
    return f"{number:.{digits}f}"


def digits_of(name: str) -> int:
    last = name.rsplit("/", 1)[-1]
    return DIGITS.get(last.removesuffix(LO).removesuffix(HI), 4)


def shown(name: str, metrics: dict[str, float]) -> str:
    """A metric as a person reads it: `0.85 [0.58, 0.96]` when it has an interval, else the figure alone."""
    value = metrics.get(name)
    if value is None:
        return "—"
    d = digits_of(name)
    lo, hi = (metrics.get(b) for b in bounds(name))
    if lo is None or hi is None or lo != lo or hi != hi:
        return fmt(value, d)
    return f"{fmt(value, d)} [{fmt(lo, d)}, {fmt(hi, d)}]"
