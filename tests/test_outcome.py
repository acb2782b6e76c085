"""Proof of outcome, the fast parts: the generation budget, selection by generation, base against
fine-tuned, the model card, the gate against the base, and lm-evaluation-harness agreeing with the
pipeline's own generation. The demo learning end to end is tests/test_demo.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_core.config import load_config
from sft_core.generate import resolve_max_new_tokens

SYSTEM = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"


# --- the generation budget ----------------------------------------------------------------------

def test_auto_budget_covers_the_responses_and_is_capped():
    b = resolve_max_new_tokens("auto", {"p95": 396, "p99": 399}, 1024)
    assert b.max_new_tokens == 512 and b.max_new_tokens >= 399 * 1.25 and b.warning is None
    assert resolve_max_new_tokens("auto", {"p95": 396, "p99": 399}, 300).max_new_tokens == 300, "capped at max_length"


def test_a_budget_below_the_responses_is_warned_about_with_both_numbers():
    b = resolve_max_new_tokens(160, {"p95": 396, "p99": 399}, 1024)
    assert b.max_new_tokens == 160
    assert b.warning and "eval.max_new_tokens=160" in b.warning and "396" in b.warning and "auto" in b.warning
    assert resolve_max_new_tokens(400, {"p95": 396, "p99": 399}, 1024).warning is None


def test_both_presets_compare_with_the_base_and_size_the_budget_themselves():
    for preset in ("demo", "qwen2.5-1.5b-medical"):
        cfg = load_config(preset)
        assert cfg.eval.compare_base is True, preset
        assert cfg.eval.max_new_tokens == "auto", preset
        assert cfg.train.metric_for_best_model == "gen_score", preset


def test_tokenize_records_response_lengths(tiny_model_dir):
    from sft_core.data import BUNDLED_SAMPLE, read_jsonl
    from sft_core.modeling import load_tokenizer
    from sft_core.tokenize import tokenize_rows

    from sft_core.chat import encode_prompt

    rows = read_jsonl(BUNDLED_SAMPLE)[:8]
    tok = load_tokenizer(tiny_model_dir)
    # room for a few answer tokens after the longest prompt, whichever tokenizer (the real Qwen one, or the
    # self-built BPE of a clone without ../shared, whose prompts are longer): every row is cut short
    max_length = max(len(encode_prompt(tok, r["question"], SYSTEM)) for r in rows) + 8
    ds, stats = tokenize_rows(rows, tok, system_prompt=SYSTEM, max_length=max_length)
    per_row = sorted(len(r) - r.count(-100) for r in ds["labels"])  # what is left of each answer after the cut
    assert len(per_row) == len(rows) and per_row[0] >= 8
    p = stats.response_length_percentiles
    assert p["p100"] > per_row[-1] and p["p50"] > per_row[0], "response lengths are counted before truncation"
    assert stats.truncated == len(rows)
    assert p["p50"] <= p["p95"] <= p["p99"] <= p["p100"]


# --- selection by generation ---------------------------------------------------------------------

def test_the_checkpoint_kept_is_the_one_that_generated_best(tmp_path, tiny_model_dir):
    """With metric_for_best_model=gen_score, the final model is the saved checkpoint whose greedy answers
    scored highest, generation runs only where a checkpoint is saved, and the score is logged per step."""
    from sft_core.config import PipelineConfig
    from sft_core.data import BUNDLED_SAMPLE, read_jsonl
    from sft_core.modeling import load_tokenizer
    from sft_core.tokenize import tokenize_rows
    from sft_core.train import GenerationCheck, run_training

    rows = [{"question": r["question"][:30], "think": r["think"][:20], "answer": r["answer"][:12]}
            for r in read_jsonl(BUNDLED_SAMPLE)[:6]]
    tok = load_tokenizer(tiny_model_dir)
    for name in ("train", "val"):
        ds, _ = tokenize_rows(rows, tok, system_prompt=SYSTEM, max_length=256)
        ds.save_to_disk(str(tmp_path / name))
    cfg = PipelineConfig.model_validate({
        "data": {"system_prompt": SYSTEM, "max_length": 256},
        "model": {"source": "tiny://", "dtype": "float32"},
        "train": {"device": "cpu", "gradient_checkpointing": False, "per_device_train_batch_size": 6,
                  "gradient_accumulation_steps": 1, "max_steps": 24, "learning_rate": 3e-3, "eval_steps": 4,
                  "save_steps": 8, "save_total_limit": 5, "logging_steps": 4, "warmup_ratio": 0.0},
    })
    check = GenerationCheck(questions=[r["question"] for r in rows[:3]], references=[r["answer"] for r in rows[:3]],
                            system_prompt=SYSTEM, max_new_tokens=24)
    result = run_training(cfg, model_dir=tiny_model_dir, train_data=tmp_path / "train", eval_data=tmp_path / "val",
                          output_dir=tmp_path / "out", generation_check=check)
    records = [json.loads(x) for x in Path(result.metrics_file).read_text().splitlines()]
    scored = {r["step"]: r["selection/gen_score"] for r in records if "selection/gen_score" in r}
    assert sorted(scored) == [8, 16, 24], "generation runs at the evaluations that save a checkpoint, and only there"
    # the curve of the selection set: the base at step 0, then every evaluation, the last included (the report's
    # figures have other names)
    assert {r["step"] for r in records if "selection/loss" in r} == {0, 4, 8, 12, 16, 20, 24}
    best_step = max(sorted(scored), key=lambda s: (scored[s], -s))  # ties keep the earliest (strictly better wins)
    assert result.selected_by == "eval_gen_score"
    assert result.best_checkpoint.endswith(f"checkpoint-{best_step}") and result.best_value == scored[best_step]
    assert not (Path(result.final_model_dir) / "training_args.bin").exists(), "the shipped model holds no pickle"


def test_sharded_training_falls_back_to_eval_loss():
    from sft_core.train import best_model_metric

    tc = load_config("demo").train
    assert best_model_metric(tc, has_eval=True, can_generate=True) == "eval_gen_score"
    assert best_model_metric(tc, has_eval=True, can_generate=False) == "eval_loss"
    assert best_model_metric(tc, has_eval=False, can_generate=True) is None
    last = load_config("demo", ["train.metric_for_best_model=none"]).train
    assert best_model_metric(last, has_eval=True, can_generate=True) is None


# --- what a run shows ----------------------------------------------------------------------------

def test_side_by_side_table_shows_the_raw_text_when_it_does_not_parse():
    from sft_core.generate import PREDICTION_COLUMNS, side_by_side

    good = {"question": "q1", "text": "<think>\nt\n</think>\n\na", "think": "t", "answer": "a", "format_ok": True,
            "stopped": True, "new_tokens": 9, "reference_answer": "a", "rouge_l": 1.0}
    bad = {"question": "q2", "text": "\n\n\n", "think": "", "answer": "", "format_ok": False, "stopped": False,
           "new_tokens": 3, "reference_answer": "b", "rouge_l": 0.0}
    base = [{"question": "q2", "text": "base says"}, {"question": "q1", "text": "base one"}]
    rows = side_by_side([good, bad], base)
    assert [set(r) for r in rows] == [set(PREDICTION_COLUMNS)] * 2
    assert rows[0]["base_output"] == "base one" and rows[0]["raw_output"] is None
    assert rows[1]["base_output"] == "base says" and rows[1]["raw_output"] == "\n\n\n"


def test_comparison_rows_put_base_beside_fine_tuned_with_one_rounding_rule():
    from flows.finetune import comparison_rows

    rows = comparison_rows({"eval/loss": 7.022763252258301, "eval/examples": 7.0, "gen/format_ok_rate": 11 / 13,
                            "gen/format_ok_rate_lo": 0.5777, "gen/format_ok_rate_hi": 0.9567, "gen/num_samples": 13.0,
                            "base/eval/loss": 8.3, "base/gen/format_ok_rate": 0.0, "base/gen/format_ok_rate_lo": 0.0,
                            "base/gen/format_ok_rate_hi": 0.2281, "harness/format_ok_rate": 0.9})
    assert rows == [("eval/loss", "8.3000", "7.0228", "7"),
                    ("gen/format_ok_rate", "0.00 [0.00, 0.23]", "0.85 [0.58, 0.96]", "13"),
                    ("harness/format_ok_rate", "—", "0.90", "—")]


def test_model_card_has_every_section_and_fits_the_description_limit():
    from sft_core.model_card import DESCRIPTION_LIMIT, CardFacts, render_model_card

    cfg = load_config("qwen2.5-1.5b-medical")
    long = "很长的思考。" * 400
    facts = CardFacts(registered_name="m", version=3, dataset_digest="d" * 64, train_rows=2166, val_rows=241,
                      fine_tuned={"eval/loss": 1.2, "eval/examples": 120.0, "gen/format_ok_rate": 0.95,
                                  "gen/format_ok_rate_lo": 0.89, "gen/format_ok_rate_hi": 0.98, "gen/stop_rate": 1.0,
                                  "gen/num_samples": 120.0},
                      base={"eval/loss": 2.0, "gen/format_ok_rate": 0.0, "gen/format_ok_rate_lo": 0.0,
                            "gen/format_ok_rate_hi": 0.03, "gen/stop_rate": 0.1}, select_rows=121, report_rows=120,
                      samples=[{"question": f"问题{i}", "think": long, "answer": long, "format_ok": True} for i in range(5)],
                      train_steps=1082, selected_by="eval_gen_score")
    card = render_model_card(cfg, facts)
    assert len(card) <= DESCRIPTION_LIMIT
    for part in ("modelscope://Qwen/Qwen2.5-1.5B", "revision `master`", "modelscope://krisfu/delicate_medical_r1_data",
                 "d" * 64, "2166 train / 241 validation", "| gen/format_ok_rate | 0.00 [0.00, 0.03] | 0.95 [0.89, 0.98] | 120 |",
                 "| eval/loss | 2.0000 | 1.2000 | 120 |", "Measured on 120 validation questions that never chose the checkpoint (121 others did)", "**1. 问题0**",
                 "**3. 问题2**", "- think: ", "- answer: ", "models:/m/3", "serve-model", "## Intended use",
                 "not a medical device", "## Resolved config", "learning_rate: 0.0001"):
        assert part in card, part
    assert "**4." not in card, "three samples"


# --- the gate checks the base ------------------------------------------------------------------

def test_gate_refuses_a_candidate_that_does_not_beat_its_base_beyond_noise(tmp_path):
    from sft_core.errors import PromotionError
    from tasks import tracking

    cfg = load_config("demo", [f"workdir={tmp_path}", "registry.name=gate-base"])
    c = tracking.client(cfg)
    exp = tracking.ensure_experiment(cfg)
    c.create_registered_model("gate-base")

    def version(fmt: float, base: float) -> str:
        run = c.create_run(exp)
        c.log_metric(run.info.run_id, "gen/format_ok_rate", fmt)
        c.log_metric(run.info.run_id, "gen/num_samples", 16)
        c.log_metric(run.info.run_id, "eval/loss", 5.0)
        c.log_metric(run.info.run_id, "base/gen/format_ok_rate", base, step=0)
        c.log_metric(run.info.run_id, "base/gen/num_samples", 16, step=0)
        mv = c.create_model_version("gate-base", source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id)
        c.set_registered_model_alias("gate-base", "candidate", mv.version)
        return mv.version

    version(2 / 16, 0.0)  # two answers of sixteen more than the base: the old '> base' rule promoted this
    with pytest.raises(PromotionError) as exc:
        tracking.promote(cfg)
    assert "gen/format_ok_rate: candidate 0.12 (n=16) vs base 0.00 (n=16)" in str(exc.value)
    assert "not distinguishable" in str(exc.value)
    assert "production" not in tracking.aliases(cfg)
    v2 = version(0.9, 0.0)
    result = tracking.promote(cfg)
    assert result.production == int(v2)
    assert [(ch.against, ch.verdict, ch.passed) for ch in result.decision.checks] == [("base", "better", True)]


# --- lm-evaluation-harness agrees with the pipeline -----------------------------------------------

def test_harness_generates_what_the_pipeline_generates(tmp_path, tiny_model_dir):
    """Same rows, same chat template, greedy, same stop tokens: lm-eval's texts and format flags are ours."""
    import importlib.util

    from tests.conftest import require

    require(importlib.util.find_spec("lm_eval") is not None, "lm-evaluation-harness (the '.[eval]' extra)")
    from sft_core.data import BUNDLED_SAMPLE, read_jsonl
    from sft_core.generate import generate_answers, generation_metrics
    from sft_core.harness import run_harness
    from sft_core.modeling import load_model, load_tokenizer, prepare_for_sft

    rows = read_jsonl(BUNDLED_SAMPLE)[:5]
    model_dir = tmp_path / "model"
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir, dtype="float32")
    prepare_for_sft(model, tok)  # stops on <|im_end|>, as a fine-tune saves it
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ours = generate_answers(load_model(model_dir, dtype="float32"), load_tokenizer(model_dir), [r["question"] for r in rows],
                            system_prompt=SYSTEM, max_new_tokens=24, batch_size=16, references=[r["answer"] for r in rows])
    theirs = run_harness(model_dir, rows, tmp_path / "harness", system_prompt=SYSTEM, max_new_tokens=24, batch_size=16)
    samples = [json.loads(x) for x in Path(theirs["samples"]).read_text(encoding="utf-8").splitlines()]
    by_q = {s["question"]: s for s in samples}
    assert [by_q[g.question]["output"] for g in ours] == [g.text for g in ours]
    assert theirs["metrics"]["format_ok_rate"] == generation_metrics(ours)["format_ok_rate"]
    assert theirs["metrics"]["rouge_l"] == pytest.approx(generation_metrics(ours)["rouge_l"])
    assert theirs["metrics"]["num_samples"] == 5


def test_the_harness_prints_no_progress_bar_and_no_git_complaint(tmp_path, tiny_model_dir, capfd, monkeypatch):
    """A worker's log gets lm-eval's figures, not its tqdm bar nor git's `fatal: not a git repository` (#27)."""
    import importlib.util

    from tests.conftest import require

    require(importlib.util.find_spec("lm_eval") is not None, "lm-evaluation-harness (the '.[eval]' extra)")
    from sft_core.data import BUNDLED_SAMPLE, read_jsonl
    from sft_core.harness import run_harness

    outside = tmp_path / "not-a-repository"  # where a worker starts a run: no git repository around it
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    capfd.readouterr()
    result = run_harness(tiny_model_dir, read_jsonl(BUNDLED_SAMPLE)[:3], tmp_path / "harness", system_prompt=SYSTEM,
                         max_new_tokens=8, batch_size=4)
    out, err = capfd.readouterr()
    assert result["metrics"]["num_samples"] == 3
    assert "fatal:" not in out + err, err[-2000:]
    assert "generate_until requests" not in out + err and "it/s]" not in out + err, err[-2000:]


# --- what the registry shows (#27) -----------------------------------------------------------------

def _shown_text(markdown: str) -> str:
    """The text a Markdown viewer shows (MLflow's UI renders descriptions as Markdown, dropping unknown tags)."""
    import html
    from html.parser import HTMLParser

    from markdown_it import MarkdownIt

    class Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []

        def handle_data(self, data):
            self.parts.append(data)

    parser = Text()
    parser.feed(MarkdownIt("commonmark").render(markdown))
    return html.unescape("".join(parser.parts))


def test_the_cards_commands_find_the_model_they_came_from_and_its_text_keeps_think():
    import shlex

    from sft_core.model_card import CardFacts, render_model_card

    overrides = ["train.max_steps=24", "registry.name=card-model", "workdir=/srv/qwen sft/work"]
    cfg = load_config("demo", overrides)
    raw = "<think>发烧三天</think>\n\n多喝水"  # a sample the parser could not split: shown as generated
    facts = CardFacts(registered_name="card-model", version=2, dataset_digest="d" * 64, train_rows=113, val_rows=13,
                      fine_tuned={"eval/loss": 6.75}, samples=[{"question": "<b>发烧</b>怎么办", "text": raw}],
                      train_steps=1026, selected_by="eval_gen_score", kept_step=600, config="demo", overrides=overrides)
    card = render_model_card(cfg, facts)
    for command in ("serve-model", "predict"):
        line = next(x for x in card.splitlines() if x.startswith(f"qwen-sft {command} "))
        argv = shlex.split(line.split("#")[0])
        preset = argv[argv.index("-c") + 1]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        again = load_config(preset, sets)
        assert again.config_hash() == cfg.config_hash() and again.registry.name == "card-model", line
        assert again.workdir_path == cfg.workdir_path, "the same embedded store"
    assert "the checkpoint of step 600, the one with the most usable answers on the selection questions" in card
    shown = _shown_text(card)
    assert "<think>发烧三天</think>" in shown and "<b>发烧</b>怎么办" in shown, "free text is shown, not taken as HTML"
    assert "<think>reasoning</think>" in shown


def test_the_logged_model_carries_the_fine_tunes_figures_and_names_its_version(tmp_path, tiny_model_dir):
    """MLflow links the run's metrics at the model's step to the logged model: at step 0 they were the base model's
    (8.371 on the demo); the embedded store never said which registered version the logged model became."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    from tasks import tracking

    cfg = load_config("demo", [f"workdir={tmp_path}", "registry.name=linked-model"])
    c = tracking.client(cfg)
    run_id = c.create_run(tracking.ensure_experiment(cfg)).info.run_id
    tracking.log_metrics(cfg, run_id, {"base/eval/loss": 8.371, "base/gen/format_ok_rate": 0.0}, step=0)
    tracking.log_metrics(cfg, run_id, {"eval/loss": 7.45, "train/loss": 7.2}, step=12)  # the training curve
    tracking.log_metrics(cfg, run_id, {"eval/loss": 6.75, "gen/format_ok_rate": 1.0}, step=24)  # the final figures
    uri = tracking.log_model(cfg, run_id, str(tiny_model_dir), max_new_tokens=8, step=24)
    assert tracking.link_model_metrics(cfg, run_id, ["eval/loss", "gen/format_ok_rate"]) == 2
    registered = tracking.register(cfg, run_id, uri, {"eval/loss": 6.75}, "train-key")

    model = c.get_logged_model(uri.split("/")[-1])
    figures = {m.key: m.value for m in model.metrics}
    assert figures["eval/loss"] == 6.75 and figures["gen/format_ok_rate"] == 1.0, figures
    assert not any(k.startswith("base/") for k in figures), "the base model's figures are not the fine-tune's"
    assert json.loads(model.tags[MLFLOW_MODEL_VERSIONS]) == [{"name": "linked-model",
                                                              "version": str(registered.version)}]
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "eval/loss")] == [(12, 7.45), (24, 6.75)], \
        "linking sends the same points again: the run's history is unchanged"
    assert "<think>" in _shown_text(c.get_registered_model("linked-model").description)
