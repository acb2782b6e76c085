"""sft_core/report.py: a run's evaluation report (`build_report`) and what the gate reads back of it (`figures_of`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_core.config import GateConfig
from sft_core.gate import ModelFigures, compare_format
from sft_core.metrics import EVAL_LOSS, FORMAT_OK, NUM_SAMPLES, base
from sft_core.report import REPORT_VERSION, build_report, figures_of

SETS = {"rule": "by sha256(question)", "selection_fraction": 0.5,
        "counts": {"validation": 4, "selection": 2, "report": 2}, "selection": ["s1", "s2"], "report": ["r1", "r2"]}
METRICS = {EVAL_LOSS: 1.5, FORMAT_OK: 1.0, NUM_SAMPLES: 2.0, base(EVAL_LOSS): 2.5, base(FORMAT_OK): 0.0,
           base(NUM_SAMPLES): 2.0}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run_files(tmp_path: Path) -> dict[str, Path]:
    """What the stages of a run leave: the split's sets, each model's predictions and per-question losses."""
    sets = tmp_path / "validation_sets.json"
    sets.write_text(json.dumps(SETS), encoding="utf-8")
    predictions = _jsonl(tmp_path / "predictions.jsonl", [
        {"id": "r1", "question": "q1", "format_ok": True, "stopped": True, "rouge_l": 0.5, "text": "..."},
        {"id": "r2", "question": "q2", "format_ok": 1, "stopped": 0, "rouge_l": None, "text": "..."}])
    base_predictions = _jsonl(tmp_path / "base_predictions.jsonl", [
        {"id": "r1", "format_ok": False, "stopped": False},
        {"id": "r2", "format_ok": False, "stopped": True, "rouge_l": 0.1}])
    losses = tmp_path / "losses.json"
    losses.write_text(json.dumps({"ids": ["r1", "r2"], "loss_sums": [3.0, 6.0], "tokens": [2, 4]}), encoding="utf-8")
    base_losses = tmp_path / "base_losses.json"
    base_losses.write_text(json.dumps({"ids": ["r1", "r2"], "loss_sums": [5.0, 10.0], "tokens": [2, 4]}),
                           encoding="utf-8")
    return {"sets_file": sets, "predictions": predictions, "losses": losses, "base_predictions": base_predictions,
            "base_losses": base_losses}


# --- build_report --------------------------------------------------------------------------------------------

def test_the_report_holds_the_sets_the_metrics_and_each_models_per_question_outcomes(tmp_path):
    report = build_report(metrics=METRICS, **_run_files(tmp_path))
    assert report == {
        "version": REPORT_VERSION,
        "sets": SETS,
        "metrics": METRICS,
        "models": {
            "fine_tuned": {
                "generation": [{"id": "r1", "format_ok": True, "stopped": True, "rouge_l": 0.5},
                               {"id": "r2", "format_ok": True, "stopped": False, "rouge_l": None}],
                "loss": [{"id": "r1", "loss_sum": 3.0, "tokens": 2}, {"id": "r2", "loss_sum": 6.0, "tokens": 4}]},
            "base": {
                "generation": [{"id": "r1", "format_ok": False, "stopped": False, "rouge_l": None},
                               {"id": "r2", "format_ok": False, "stopped": True, "rouge_l": 0.1}],
                "loss": [{"id": "r1", "loss_sum": 5.0, "tokens": 2}, {"id": "r2", "loss_sum": 10.0, "tokens": 4}]},
        },
    }
    assert REPORT_VERSION == 1
    assert json.loads(json.dumps(report)) == report, "plain JSON: logged as an artifact as is"


def test_a_run_without_its_base_or_losses_reports_what_it_has(tmp_path):
    files = _run_files(tmp_path)
    report = build_report(sets_file=files["sets_file"], metrics={}, predictions=files["predictions"], losses=None)
    assert set(report["models"]) == {"fine_tuned"}
    assert "loss" not in report["models"]["fine_tuned"] and len(report["models"]["fine_tuned"]["generation"]) == 2
    with_base = build_report(sets_file=files["sets_file"], metrics={}, predictions=files["predictions"],
                             losses=files["losses"], base_predictions=files["base_predictions"])
    assert set(with_base["models"]["base"]) == {"generation"}, "the base's generation without its losses"


def test_an_empty_predictions_file_reports_no_outcomes(tmp_path):
    files = _run_files(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    report = build_report(sets_file=files["sets_file"], metrics={}, predictions=empty, losses=None)
    assert report["models"]["fine_tuned"] == {"generation": []}


def test_a_missing_sets_file_is_an_error_not_an_empty_report(tmp_path):
    files = _run_files(tmp_path)
    with pytest.raises(FileNotFoundError):
        build_report(sets_file=tmp_path / "nope.json", metrics={}, predictions=files["predictions"], losses=None)


# --- figures_of ----------------------------------------------------------------------------------------------

def test_the_fine_tuned_figures_are_its_metrics_and_per_question_outcomes(tmp_path):
    report = json.loads(json.dumps(build_report(metrics=METRICS, **_run_files(tmp_path))))  # as read back
    figures = figures_of(report, METRICS)
    assert figures == ModelFigures({EVAL_LOSS: 1.5, FORMAT_OK: 1.0, NUM_SAMPLES: 2.0},
                                   format_ok={"r1": True, "r2": True},
                                   losses={"r1": (3.0, 2), "r2": (6.0, 4)})


def test_the_base_figures_are_its_metrics_without_the_base_prefix(tmp_path):
    report = build_report(metrics=METRICS, **_run_files(tmp_path))
    figures = figures_of(report, METRICS, "base")
    assert figures == ModelFigures({EVAL_LOSS: 2.5, FORMAT_OK: 0.0, NUM_SAMPLES: 2.0},
                                   format_ok={"r1": False, "r2": False},
                                   losses={"r1": (5.0, 2), "r2": (10.0, 4)})


def test_without_a_report_the_figures_are_the_headline_metrics_alone():
    assert figures_of(None, METRICS) == ModelFigures({EVAL_LOSS: 1.5, FORMAT_OK: 1.0, NUM_SAMPLES: 2.0})
    assert figures_of({}, METRICS, "base") == ModelFigures({EVAL_LOSS: 2.5, FORMAT_OK: 0.0, NUM_SAMPLES: 2.0})
    no_base = {"models": {"fine_tuned": {"generation": []}}}
    assert figures_of(no_base, METRICS, "base").format_ok is None


def test_a_section_without_outcomes_gives_none_not_an_empty_mapping(tmp_path):
    files = _run_files(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    report = build_report(sets_file=files["sets_file"], metrics=METRICS, predictions=empty, losses=None)
    figures = figures_of(report, METRICS)
    assert figures.format_ok is None and figures.losses is None
    assert figures.metrics == {EVAL_LOSS: 1.5, FORMAT_OK: 1.0, NUM_SAMPLES: 2.0}


def test_the_gate_pairs_the_outcomes_a_report_carries(tmp_path):
    report = build_report(metrics=METRICS, **_run_files(tmp_path))
    check = compare_format(figures_of(report, METRICS), figures_of(report, METRICS, "base"), "base", GateConfig())
    assert check.paired and (check.n_candidate, check.n_reference) == (2, 2)
    unpaired = compare_format(figures_of(None, METRICS), figures_of(None, METRICS, "base"), "base", GateConfig())
    assert not unpaired.paired
