"""The demo preset end to end, as `make demo` runs it: the fine-tune learns the job and the base does not.

If learning breaks (a label off by one, the stop token unlabelled, a broken chat template, selection by
the wrong metric), the thresholds below fail. The same run backs the checks of what it leaves in MLflow
(comparison, model card, lm-eval figures) and the tutorial's own way of loading the exported candidate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_core.config import load_config

pytestmark = pytest.mark.usefixtures("prefect_harness")  # ~3 min: in the default suite, it is the product's proof



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from flows.finetune import run_in_process

    workdir = tmp_path_factory.mktemp("demo")
    cfg = load_config("demo", [f"workdir={workdir}"])
    return cfg, run_in_process("demo", [f"workdir={workdir}"])  # as `qwen-sft run -c demo` runs it


def test_the_demo_learns_the_format_and_to_stop_where_its_base_cannot(demo):
    """On the report questions (never seen by checkpoint selection), beyond noise: the lower end of the
    fine-tune's 95 % interval is above the upper end of its base's, for the format and for stopping."""
    _, summary = demo
    m = summary.metrics
    print({k: round(v, 4) for k, v in m.items()})
    assert m["gen/num_samples"] == m["base/gen/num_samples"] == m["eval/examples"], "every report question, both models"
    for rate in ("gen/format_ok_rate", "gen/stop_rate"):
        assert m[f"{rate}_lo"] > m[f"base/{rate}_hi"], (rate, m[rate], m[f"{rate}_lo"], m[f"base/{rate}_hi"])
    assert m["eval/loss"] < m["base/eval/loss"]
    assert summary.registered.alias == "candidate"


def test_the_run_holds_the_comparison_the_model_card_and_the_harness_figures(demo):
    from mlflow import MlflowClient

    from tasks import tracking

    cfg, summary = demo
    c = MlflowClient(tracking.tracking_uri(cfg))
    run = c.get_run(summary.run_id)
    for key in ("gen/format_ok_rate", "base/gen/format_ok_rate", "base/eval/loss", "harness/format_ok_rate",
                "harness/rouge_l"):
        assert key in run.data.metrics, key
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "eval/loss")]
    assert steps == [summary.train_steps], "the shipped model's eval loss, once, at the last training step"
    assert {m.step for m in c.get_metric_history(run.info.run_id, "base/eval/loss")} == {0}
    table = json.loads(Path(c.download_artifacts(run.info.run_id, "predictions.json")).read_text(encoding="utf-8"))
    for column in ("question", "reference_answer", "base_output", "think", "answer", "format_ok", "stopped", "rouge_l"):
        assert column in table["columns"], column
    version = c.get_model_version(cfg.registry.name, str(summary.registered.version))
    assert "| gen/format_ok_rate |" in version.description and "Medical disclaimer" in version.description
    from sft_core.metrics import shown

    m = summary.metrics
    assert f"| {shown('gen/format_ok_rate', m)} | {int(m['gen/num_samples'])} |" in version.description, \
        "the card shows the interval and n"
    folder = tracking.download_model(f"models:/{cfg.registry.name}@candidate", cfg)  # <logged model>/model
    assert (folder.parent / "README.md").read_text(encoding="utf-8") == version.description


def test_the_harness_scores_the_demo_model_as_the_pipeline_does(demo):
    from mlflow import MlflowClient

    from tasks import tracking

    cfg, summary = demo
    m = summary.metrics
    assert m["harness/format_ok_rate"] == m["gen/format_ok_rate"] and m["harness/num_samples"] == m["gen/num_samples"]
    assert m["harness/rouge_l"] == pytest.approx(m["gen/rouge_l"])
    c = MlflowClient(tracking.tracking_uri(cfg))
    table = json.loads(Path(c.download_artifacts(summary.run_id, "predictions.json")).read_text(encoding="utf-8"))
    ours = {row[table["columns"].index("question")]: row[table["columns"].index("format_ok")] for row in table["data"]}
    theirs = [json.loads(x) for x in Path(c.download_artifacts(summary.run_id, "harness/samples.jsonl"))
              .read_text(encoding="utf-8").splitlines()]
    assert {s["question"]: bool(s["format_ok"]) for s in theirs} == ours, "question by question, not only on average"


def test_the_tutorials_own_infer_script_works_on_the_exported_candidate(demo):
    """What the tutorial's infer.py does, with its calls and no more, on `models:/NAME@candidate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_core.generate import parse_response
    from tasks import tracking

    cfg, _ = demo
    folder = tracking.download_model(f"models:/{cfg.registry.name}@candidate", cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    messages = [{"role": "system", "content": cfg.data.system_prompt},
                {"role": "user", "content": "医生，我最近被诊断为糖尿病，听说碳水化合物的选择很重要，我应该选择什么样的碳水化合物呢？"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    model_inputs = tokenizer([text], return_tensors="pt")
    max_new_tokens = 1024
    generated_ids = model.generate(model_inputs.input_ids, max_new_tokens=max_new_tokens)
    generated_ids = [out[len(inp):] for inp, out in zip(model_inputs.input_ids, generated_ids)]
    response = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
    print(response[:300])
    assert len(generated_ids[0]) < max_new_tokens, "it stops on its own, before the token limit"
    parsed = parse_response(response)
    assert "<think>" in response and "</think>" in response and parsed.think and parsed.answer.strip()


def test_the_harness_command_scores_the_registered_candidate(demo):
    """`qwen-sft harness` resolves `models:/NAME@candidate` to its local folder, runs lm-eval offline on the
    validation split and logs to the run that produced the version: the same format rate as the pipeline's."""
    import re

    from typer.testing import CliRunner

    from flows.cli import app

    cfg, summary = demo
    done = CliRunner().invoke(app, ["harness", "-c", "demo", "--set", f"workdir={cfg.workdir_path}"],
                              env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert f"logged under harness/ in MLflow run {summary.run_id}" in done.output
    rate = re.search(r"harness/format_ok_rate\W+([0-9.]+) \[", done.output)
    assert rate and float(rate.group(1)) == pytest.approx(summary.metrics["gen/format_ok_rate"], abs=0.005), \
        done.output
