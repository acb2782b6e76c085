"""Evaluation you can trust, end to end through the real flow: checkpoint selection never sees a report
question; every reported figure comes from the report questions, all of them, with its interval; the
run logs which question went where."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sft_core.config import load_config
from tests.sizes import TINY_MODEL

pytestmark = pytest.mark.usefixtures("prefect_harness")

FAST_GEN = [
    *TINY_MODEL, "train.max_steps=12", "train.eval_steps=6", "train.save_steps=6", "train.logging_steps=3",
    "eval.max_new_tokens=6", "eval.batch_size=4", "eval.harness=false", "registry.enabled=false",
    "train.metric_for_best_model=gen_score", "eval.compare_base=true",
]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A demo-shaped run with selection by generation, every call to generation and training recorded."""
    from _pytest.monkeypatch import MonkeyPatch

    import sft_core.stages as stages
    import sft_core.train as train
    from flows.finetune import run_in_process

    calls: list[tuple[str, list[str]]] = []
    trainings: list[str] = []
    real_generate, real_train = stages.generate_answers, stages.run_training

    def spy_generate(model, tokenizer, questions, **kwargs):
        calls.append((sys._getframe(1).f_code.co_qualname, list(questions)))
        return real_generate(model, tokenizer, questions, **kwargs)

    def spy_train(cfg, **kwargs):
        trainings.append(str(kwargs["eval_data"]))
        return real_train(cfg, **kwargs)

    patch = MonkeyPatch()
    patch.setattr(stages, "generate_answers", spy_generate)  # the generate stages
    patch.setattr(train, "generate_answers", spy_generate)  # the generation check inside training
    patch.setattr(stages, "run_training", spy_train)
    workdir = tmp_path_factory.mktemp("evaluation")
    try:
        summary = run_in_process("demo", [*FAST_GEN, f"workdir={workdir}"])
    finally:
        patch.undo()
    sets_file = next(Path(workdir, "split").glob("*/validation_sets.json"))
    return summary, json.loads(sets_file.read_text(encoding="utf-8")), calls, trainings, workdir


def test_no_report_question_is_ever_generated_during_selection(watched):
    from sft_core.split import question_id

    summary, sets, calls, trainings, workdir = watched
    selection, report = set(sets["selection"]), set(sets["report"])
    assert selection and report and not selection & report
    assert sets["counts"] == {"validation": 26, "selection": 13, "report": 13}
    during_training = [q for where, qs in calls if where == "GenerationCheck.run" for q in qs]
    assert during_training, "selection by generation ran"
    assert {question_id(q) for q in during_training} <= selection, "selection generates on selection questions only"
    reported = [qs for where, qs in calls if where == "generate_body"]
    assert len(reported) == 2, "the fine-tune and its base"
    for questions in reported:
        assert sorted(question_id(q) for q in questions) == sorted(report), "every report question, and only those"
    # eval loss during training is computed on the selection set's rows, and only those
    assert len(trainings) == 1 and Path(trainings[0]).name == "select"
    ids = json.loads(Path(trainings[0]).with_name("ids.json").read_text(encoding="utf-8"))
    assert set(ids["select"]) == selection and set(ids["report"]) == report


def test_every_reported_figure_is_on_the_report_set_with_its_interval(watched):
    summary, sets, *_ = watched
    m = summary.metrics
    n = len(sets["report"])
    assert m["gen/num_samples"] == m["base/gen/num_samples"] == n and m["eval/examples"] == n
    for name in ("gen/format_ok_rate", "gen/stop_rate", "gen/usable_rate", "base/gen/format_ok_rate"):
        assert m[f"{name}_lo"] <= m[name] <= m[f"{name}_hi"], name
    from flows.finetune import comparison_rows

    rows = {r[0]: r for r in comparison_rows(m)}
    fine = rows["gen/format_ok_rate"]
    assert fine[2].count("[") == 1 and fine[3] == str(n), "`0.14 [0.03, 0.51]` and n beside it"


def test_the_run_logs_the_sets_and_a_report_the_gate_can_pair(watched):
    from mlflow import MlflowClient
    from tasks import tracking

    summary, sets, _, _, workdir = watched
    cfg = load_config("demo", [*FAST_GEN, f"workdir={workdir}"])
    c = MlflowClient(tracking.tracking_uri(cfg))
    run_id = summary.run_id
    logged_sets = json.loads(Path(c.download_artifacts(run_id, "evaluation/validation_sets.json")).read_text())
    assert logged_sets == sets and "sha256(question)" in logged_sets["rule"]
    report = json.loads(Path(c.download_artifacts(run_id, tracking.REPORT_ARTIFACT)).read_text())
    for model in ("fine_tuned", "base"):
        assert sorted(g["id"] for g in report["models"][model]["generation"]) == sorted(sets["report"]), model
        assert sorted(x["id"] for x in report["models"][model]["loss"]) == sorted(sets["report"]), model
    run = c.get_run(run_id)
    assert run.data.tags["data.rows_selection"] == "13" and run.data.tags["data.rows_report"] == "13"
    curve = c.get_metric_history(run_id, "selection/loss")
    assert sorted(m.step for m in curve) == [0, 6, 12], "the learning curve is on the selection set: the base at 0, "\
        "then every evaluation"
    assert [m.step for m in c.get_metric_history(run_id, "eval/loss")] == [12], \
        "the shipped model's figure, once, at the last step: it is not a point of the curve"
