"""sft_core/model_card.py: the card's sections, its metric rows with their intervals, the description limit, which
checkpoint became the model, and the command that finds the same registry again."""

from __future__ import annotations

import shlex

import pytest

from sft_core.config import load_config
from sft_core.metrics import fmt, sample_size, shown
from sft_core.model_card import (
    CARD_METRICS,
    DESCRIPTION_LIMIT,
    DISCLAIMER,
    CardFacts,
    command_args,
    kept_line,
    metric_rows,
    render_model_card,
)

FINE_TUNED = {
    "eval/loss": 1.2345678, "eval/perplexity": 3.4370, "eval/token_accuracy": 0.61234, "eval/examples": 13.0,
    "gen/format_ok_rate": 11 / 13, "gen/format_ok_rate_lo": 0.5777, "gen/format_ok_rate_hi": 0.9567,
    "gen/stop_rate": 1.0, "gen/stop_rate_lo": 0.7719, "gen/stop_rate_hi": 1.0,
    "gen/usable_rate": 10 / 13, "gen/usable_rate_lo": 0.4973, "gen/usable_rate_hi": 0.9182,
    "gen/rouge_l": 0.21234, "gen/rouge_l_lo": 0.1701, "gen/rouge_l_hi": 0.2555,
    "gen/mean_new_tokens": 87.25, "gen/num_samples": 13.0,
    "gen/score": 0.9, "harness/format_ok_rate": 0.8,  # not card metrics
}
BASE = {"eval/loss": 8.3, "gen/format_ok_rate": 0.0, "gen/format_ok_rate_lo": 0.0, "gen/format_ok_rate_hi": 0.2281,
        "gen/num_samples": 13.0}


def _facts(**changes) -> CardFacts:
    facts = {"registered_name": "card-model", "version": 3, "dataset_digest": "d" * 64, "train_rows": 234,
             "val_rows": 26, "fine_tuned": FINE_TUNED, "base": BASE, "select_rows": 13, "report_rows": 13}
    return CardFacts(**{**facts, **changes})


@pytest.fixture(scope="module")
def cfg():
    return load_config("demo")


# --- render_model_card ---------------------------------------------------------------------------------------

def test_the_card_names_the_model_its_data_and_its_config_and_carries_the_disclaimer(cfg):
    card = render_model_card(cfg, _facts())
    assert card.startswith("# card-model v3\n\nFull-parameter fine-tune of `tiny://qwen2` that answers")
    for part in ("- source: `bundled://sample`\n", f"- digest (sha256 of the canonical rows): `{'d' * 64}`",
                 "- split: 234 train / 26 validation (shuffle, seed 42, train fraction 0.9)",
                 "- validated by the Great Expectations suite `delicate_medical_r1` (policy `fail`)",
                 "Measured on 13 validation questions that never chose the checkpoint (13 others did)",
                 f"System prompt: `{cfg.data.system_prompt}`", "## Intended use",
                 f"## Medical disclaimer\n{DISCLAIMER}\n",
                 "## Resolved config\n```yaml\n" + cfg.to_yaml().rstrip() + "\n```\n"):
        assert part in card, part
    assert "(subset" not in card, "a local or bundled source has no hub subset"
    assert card.endswith("```\n") and len(card) <= DESCRIPTION_LIMIT


def test_each_card_metric_the_fine_tune_has_is_a_row_with_its_interval_in_table_order(cfg):
    card = render_model_card(cfg, _facts())
    table = [line for line in card.splitlines() if line.startswith("| ")]
    assert table[0] == "| metric | base | fine-tuned | n |"
    expected = []
    for name, _label in CARD_METRICS:
        n = sample_size(name, FINE_TUNED)
        expected.append(f"| {name} | {shown(name, BASE)} | {shown(name, FINE_TUNED)} | {fmt(n, 0)} |")
    assert table[1:] == expected
    for row in ("| eval/loss | 8.3000 | 1.2346 | 13 |", "| eval/perplexity | — | 3.44 | 13 |",
                "| gen/format_ok_rate | 0.00 [0.00, 0.23] | 0.85 [0.58, 0.96] | 13 |",
                "| gen/rouge_l | — | 0.212 [0.170, 0.256] | 13 |", "| gen/mean_new_tokens | — | 87.2 | 13 |"):
        assert row in table, row
    assert "gen/score" not in card.split("## Resolved config")[0] and "harness/" not in card.split("## Resolved")[0]


def test_the_version_or_else_the_candidate_alias_is_what_the_commands_load(cfg):
    versioned = render_model_card(cfg, _facts())
    assert "--model models:/card-model/3 " in versioned
    assert "mlflow artifacts download -u models:/card-model/3`" in versioned
    candidate = render_model_card(cfg, _facts(version=None))
    assert candidate.startswith("# card-model\n")
    assert "--model models:/card-model@candidate " in candidate and "/None" not in candidate


def test_the_kept_checkpoint_line_is_there_only_when_the_steps_are_known(cfg):
    assert "optimizer steps" not in render_model_card(cfg, _facts())
    facts = _facts(train_steps=40, selected_by="eval_loss", kept_step=30)
    assert f"\n\n{kept_line(facts)}\n" in render_model_card(cfg, facts)


def test_samples_show_three_at_most_with_their_tags_escaped(cfg):
    samples = [{"question": f"<b>问题{i}</b>", "think": "想", "answer": "答", "format_ok": i % 2 == 0}
               for i in range(5)]
    samples.append({"question": "q"})
    card = render_model_card(cfg, _facts(samples=[{"question": "发烧", "text": "<think>x</think>y"}, *samples]))
    assert "## Samples (report questions)" in card
    assert "**1. 发烧**\n\n- think: (none)\n- answer: &lt;think&gt;x&lt;/think&gt;y\n- format ok: False" in card
    assert "**2. &lt;b&gt;问题0&lt;/b&gt;**\n\n- think: 想\n- answer: 答\n- format ok: True" in card
    assert "**3. " in card and "**4. " not in card


# --- the limit -----------------------------------------------------------------------------------------------

def _long_samples() -> list[dict]:
    return [{"question": "问" * 300, "think": "很长的思考" * 200, "answer": "很长的回答" * 200, "format_ok": True}
            for _ in range(3)]


def _sample_text_lengths(card: str) -> set[int]:
    return {len(line.split(": ", 1)[1]) for line in card.splitlines() if line.startswith(("- think: ", "- answer: "))}


def test_a_long_card_shortens_its_samples_step_by_step_until_it_fits(cfg):
    """Samples are cut to 600, 300, 150, 60 characters, then left out: the first that fits is the card."""
    facts = _facts(samples=_long_samples())
    roomy = render_model_card(cfg, facts, limit=10**6)
    assert _sample_text_lengths(roomy) == {600} and f"**1. {'问' * 199}…**" in roomy, "a question: 200 at most"
    previous = roomy
    for chars in (300, 150, 60):
        card = render_model_card(cfg, facts, limit=len(previous) - 1)
        assert _sample_text_lengths(card) == {chars} and len(card) < len(previous)
        assert card.endswith("```\n") and DISCLAIMER in card, "nothing else is cut"
        previous = card
    without = render_model_card(cfg, _facts())
    assert render_model_card(cfg, facts, limit=len(previous) - 1) == without, "then the samples are left out"
    assert render_model_card(cfg, facts, limit=len(without)) == without


def test_a_card_that_does_not_fit_without_samples_is_cut_to_exactly_the_limit(cfg):
    whole = render_model_card(cfg, _facts(samples=_long_samples()), limit=10**6)
    without = render_model_card(cfg, _facts())
    for limit in (len(without) - 1, 1000, 80):
        card = render_model_card(cfg, _facts(samples=_long_samples()), limit=limit)
        assert len(card) == limit and card == without[: limit - 1] + "…", limit
    assert len(whole) > DESCRIPTION_LIMIT
    assert len(render_model_card(cfg, _facts(samples=_long_samples()))) <= DESCRIPTION_LIMIT == 5000


def test_a_cut_takes_the_resolved_config_before_the_disclaimer(cfg):
    without = render_model_card(cfg, _facts())
    limit = without.index("## Resolved config") + 10
    card = render_model_card(cfg, _facts(), limit=limit)
    assert DISCLAIMER in card and card.endswith("…") and len(card) == limit


# --- metric_rows ---------------------------------------------------------------------------------------------

def test_metric_rows_are_the_card_metrics_the_fine_tune_has_formatted_with_n():
    assert metric_rows(FINE_TUNED, BASE)[:1] == [("eval/loss", "8.3000", "1.2346", "13")]
    assert [row[0] for row in metric_rows(FINE_TUNED, BASE)] == [name for name, _ in CARD_METRICS]
    assert metric_rows({"gen/stop_rate": 0.5, "gen/stop_rate_lo": 0.2, "gen/stop_rate_hi": 0.8, "eval/loss": 2.0,
                        "gen/num_samples": 16.0}, {}) == [
        ("eval/loss", "—", "2.0000", "—"), ("gen/stop_rate", "—", "0.50 [0.20, 0.80]", "16")]
    assert metric_rows({"gen/score": 1.0, "selection/loss": 2.0}, BASE) == [], "only the card's metrics"
    assert metric_rows({}, BASE) == []


# --- kept_line -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("selected_by", "kept_step", "line"), [
    (None, None, "40 optimizer steps; the model is the last step's weights (step 40)."),
    ("eval_gen_score", 25, ("40 optimizer steps; the model is the checkpoint of step 25, the one with the most usable "
                            "answers on the selection questions.")),
    ("eval_loss", 30, ("40 optimizer steps; the model is the checkpoint of step 30, the one with the lowest validation "
                       "loss on the selection questions.")),
    ("eval_loss", None, ("40 optimizer steps; the model is the checkpoint of step 40, the one with the lowest "
                         "validation loss on the selection questions.")),
])
def test_kept_line_says_which_checkpoint_became_the_model_and_the_rule_that_chose_it(selected_by, kept_step, line):
    assert kept_line(_facts(train_steps=40, selected_by=selected_by, kept_step=kept_step)) == line


# --- command_args --------------------------------------------------------------------------------------------

def test_command_args_without_a_known_config_is_a_placeholder():
    assert command_args(_facts()) == "-c CONFIG"


def test_command_args_quote_each_override_so_the_shell_gives_it_back_unchanged():
    overrides = ["train.max_steps=24", "workdir=/srv/qwen sft/work", "data.system_prompt=it's $(rm -rf ~); `id` \"x\"",
                 "registry.name=a|b&c>d", "tracking.uri="]
    facts = _facts(config="configs/my preset.yaml", overrides=overrides)
    args = command_args(facts)
    assert shlex.split(args) == ["-c", "configs/my preset.yaml", *[x for o in overrides for x in ("--set", o)]]
    assert args.startswith("-c 'configs/my preset.yaml' --set train.max_steps=24 --set 'workdir=/srv/qwen sft/work' ")


def test_the_cards_commands_carry_the_command_args(cfg):
    facts = _facts(config="demo", overrides=["train.max_steps=24", "workdir=/tmp/a b"])
    card = render_model_card(cfg, facts)
    args = command_args(facts)
    assert f'qwen-sft predict {args} --model models:/card-model/3 "孩子发烧39度怎么办？"\n' in card
    assert f"qwen-sft serve-model {args} --alias production   # once promoted: an OpenAI API on " \
           "http://127.0.0.1:5001/v1\n" in card
