"""CLI: prepare writes the split and statistics, make-tiny-model builds a model, predict shows think and answer apart."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from sft_core.data import BUNDLED_SAMPLE, read_jsonl

runner = CliRunner()


def test_prepare_writes_split_report_and_stats(tmp_path: Path):
    out = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", "--config", "demo", "--set", f"workdir={tmp_path / 'wd'}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    sample = read_jsonl(BUNDLED_SAMPLE)
    assert len(train) == int(len(sample) * 0.9) and len(train) + len(val) == len(sample)
    assert {"instruction", "question", "think", "answer", "metrics"} <= set(train[0]), "original fields are kept"
    select, report_rows = read_jsonl(out / "select.jsonl"), read_jsonl(out / "report.jsonl")
    assert sorted(r["question"] for r in select + report_rows) == sorted(r["question"] for r in val)
    assert not {r["question"] for r in select} & {r["question"] for r in report_rows}, "no question in both sets"
    sets = json.loads((out / "validation_sets.json").read_text())
    assert sets["counts"] == {"validation": len(val), "selection": len(select), "report": len(report_rows)}
    report = json.loads((out / "validation_report.json").read_text())
    assert report["success"] is True and report["rows"] == {"total": len(sample), "good": len(sample), "bad": 0}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"]["train"] == len(train) and stats["rows"]["val"] == len(val)
    assert len(stats["dataset_digest"]) == 64
    assert {"p50", "p95", "p100"} <= set(stats["tokens"]["train"]["length_percentiles"])
    lengths = {name: stats["tokens"][name]["length_percentiles"]["p100"] for name in ("train", "val")}
    assert max(lengths.values()) <= 1024 and stats["truncated"] == 0, "the demo's max_length holds every row"
    assert stats["truncated"] == sum(stats["tokens"][name]["truncated"] for name in ("train", "val"))
    # a second prepare reuses every stage and gives identical files
    again = runner.invoke(app, ["prepare", "--config", "demo", "--set", f"workdir={tmp_path / 'wd'}", "--out", str(tmp_path / "p2")])
    assert again.exit_code == 0
    assert (tmp_path / "p2" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_make_tiny_model_and_predict_show_think_and_answer_apart(tmp_path: Path):
    model = tmp_path / "tiny"
    built = runner.invoke(app, ["make-tiny-model", str(model), "--set", "model.tiny.tokenizer=bpe",
                                "--set", "model.tiny.vocab_size=800"])
    assert built.exit_code == 0, built.output
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    result = runner.invoke(app, ["predict", "--model", str(model), "--set", "train.device=cpu",
                                 "--max-new-tokens", "8", "孩子发烧怎么办？"])
    assert result.exit_code == 0, result.output
    # an untrained model's text does not parse: what it said is shown, not empty think/answer boxes
    assert "output (not one think block + answer)" in result.output and "(no reasoning)" not in result.output


def test_predict_with_a_missing_model_is_one_clear_line(tmp_path: Path):
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "nope"), "q"])
    assert result.exit_code != 0
    assert "nope" in (result.stderr or result.output) and "Traceback" not in result.output


def test_messages_keep_text_in_square_brackets(tmp_path, monkeypatch):
    """Rich read `[eval]` as a style tag and dropped it: "pip install 'qwen-sft-pipeline[eval]'" printed without
    its extra, and a path such as `rows [v2].jsonl` lost its brackets. Messages print as written."""
    import sys

    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails, as on an install without the extra
    result = CliRunner().invoke(app, ["harness", "-c", "demo", "--set", f"workdir={tmp_path}"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: lm-evaluation-harness is not installed (pip install 'qwen-sft-pipeline[eval]' adds it): it is needed "
        "here, or set eval.harness=false")
    bad = tmp_path / "rows [v2].jsonl"
    bad.write_text('{"question": "q", "think": "t", "answer": [1]}\n{oops\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 3 and f"error: {bad}: line 2: malformed JSON" in result.output, result.output
