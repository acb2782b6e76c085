"""sft_core/results.py: every stage result round-trips through its JSON record, `own_fields` is what a stage body
returns, a record missing a field is refused, and the properties the next stages read."""

from __future__ import annotations

import dataclasses
import json

import pytest

import sft_core.results as results_module
from sft_core.results import (
    BaseModel,
    Evaluated,
    Generated,
    Harnessed,
    Ingested,
    Result,
    Split,
    Tokenized,
    Trained,
    Validated,
)

COMMON = {"key": "0123456789abcdef", "folder": "/w/stage/0123456789abcdef", "seconds": 12.5}

OWN: dict[type[Result], dict] = {
    Ingested: {"raw": "/w/ingest/k/raw.jsonl", "row_numbers": "/w/ingest/k/rows.json", "digest": "a" * 64, "rows": 260,
               "source": "bundled://sample", "location": "/pkg/sample.jsonl", "extra_columns": ["id", "source"]},
    Validated: {"valid": "/w/validate/k/valid.jsonl", "digest": "b" * 64, "good_rows": 258, "bad_rows": 2,
                "report": "/w/validate/k/report.json", "docs": "/w/validate/k/docs/index.html",
                "quarantine": "/w/validate/k/bad.jsonl", "warnings": ["2 rows quarantined"]},
    Split: {"train": "/w/split/k/train.jsonl", "val": "/w/split/k/val.jsonl", "train_rows": 234, "val_rows": 26,
            "train_digest": "c" * 64, "val_digest": "d" * 64, "select": "/w/split/k/select.jsonl",
            "report": "/w/split/k/report.jsonl", "select_rows": 13, "report_rows": 13,
            "sets": "/w/split/k/validation_sets.json", "sets_digest": "e" * 16},
    BaseModel: {"model_dir": "/w/model/k/model"},
    Tokenized: {"train_ds": "/w/tokenize/k/train", "select_ds": "/w/tokenize/k/select",
                "report_ds": "/w/tokenize/k/report",
                "stats": {"train": {"rows_out": 234, "length_percentiles": {"p50": 300}},
                          "val": {"rows_out": 26, "response_length_percentiles": {"p50": 180, "p99": 410}}},
                "ids": "/w/tokenize/k/ids.json"},
    Trained: {"output_dir": "/w/train/k", "final_model_dir": "/w/train/k/final", "global_step": 40, "epochs": 9.0,
              "train_loss": 3.25, "best_checkpoint": "/w/train/k/checkpoint-30", "selected_by": "eval_gen_score",
              "best_value": 0.75, "resumed_from": None, "metrics_file": "/w/train/k/metrics.jsonl"},
    Evaluated: {"metrics": {"loss": 1.5, "perplexity": 4.48, "examples": 13.0}, "losses": "/w/evaluate/k/losses.json"},
    Generated: {"predictions": "/w/generate/k/predictions.jsonl",
                "metrics": {"format_ok_rate": 0.85, "num_samples": 13.0}},
    Harnessed: {"metrics": {"format_ok_rate": 0.9}, "samples": "/w/harness/k/samples.jsonl",
                "results": "/w/harness/k/results.json"},
}
KINDS = list(OWN)


def _result(kind: type[Result], **changes) -> Result:
    return kind(**{**COMMON, **OWN[kind], **changes})


def test_every_result_type_of_the_module_is_covered_here():
    defined = {v for v in vars(results_module).values()
               if isinstance(v, type) and issubclass(v, Result) and v is not Result}
    assert defined == set(KINDS)


# --- to_json / from_json -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_a_result_round_trips_through_its_json_record(kind):
    result = _result(kind)
    record = json.loads(json.dumps(result.to_json()))
    assert record == {**COMMON, **OWN[kind]}, "every field but `reused`, as JSON"
    again = kind.from_json(record)
    assert again == result and type(again) is kind and again.reused is False


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_a_record_lacking_a_field_is_refused_naming_what_it_lacks(kind):
    required = sorted(f.name for f in dataclasses.fields(kind)
                      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    record = _result(kind).to_json()
    for name in required:
        partial = {k: v for k, v in record.items() if k != name}
        with pytest.raises(ValueError) as err:
            kind.from_json(partial)
        assert str(err.value) == f"{kind.__name__} record lacks ['{name}']"
    with pytest.raises(ValueError) as err:
        kind.from_json({})
    assert str(err.value) == f"{kind.__name__} record lacks {required}"


def test_a_record_of_another_kind_is_refused_as_lacking_this_kinds_fields():
    """What `_DONE.json` holds when a stage's result type changed (written by older code): read as not done."""
    record = _result(Evaluated).to_json()
    with pytest.raises(ValueError) as err:
        Generated.from_json(record)
    assert str(err.value) == "Generated record lacks ['predictions']"
    with pytest.raises(ValueError, match=r"^Trained record lacks \['best_checkpoint', 'best_value', 'epochs', "):
        Trained.from_json(record)


def test_fields_with_defaults_may_be_missing_from_a_record():
    minimal = {"key": None, "folder": "/w/evaluate/latest", "metrics": {"loss": 1.0}}
    assert Evaluated.from_json(minimal) == Evaluated(key=None, folder="/w/evaluate/latest", seconds=0.0,
                                                     metrics={"loss": 1.0}, losses=None)
    validated = Validated.from_json({**COMMON, "valid": "v", "digest": "d", "good_rows": 1, "bad_rows": 0})
    assert (validated.report, validated.docs, validated.quarantine, validated.warnings) == (None, None, None, [])


def test_fields_this_code_does_not_know_and_reused_are_left_out_of_the_result():
    """A record written by newer code is read with the fields this code has; `reused` is never stored."""
    record = {**_result(BaseModel).to_json(), "added_later": 1, "reused": True}
    again = BaseModel.from_json(record)
    assert again == _result(BaseModel) and again.reused is False and not hasattr(again, "added_later")


def test_the_json_record_is_a_copy_and_reused_is_not_part_of_equality():
    result = _result(Evaluated)
    record = result.to_json()
    record["metrics"]["loss"] = 99.0
    assert result.metrics["loss"] == 1.5
    found = _result(Evaluated)
    found.reused = True
    assert found == result and "reused" not in found.to_json()


def test_results_are_keyword_only():
    with pytest.raises(TypeError):
        BaseModel("k", "/w/model/k", 0.0, False, "/w/model/k/model")  # type: ignore[misc]


# --- own_fields ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_own_fields_are_what_a_stage_body_returns_and_rebuild_the_result_with_key_and_folder(kind):
    result = _result(kind)
    own = result.own_fields()
    assert own == OWN[kind]
    assert kind(key=COMMON["key"], folder=COMMON["folder"], seconds=COMMON["seconds"], **own) == result
    assert json.loads(json.dumps(own)) == own, "sent as JSON by a launched training (launch_result.json)"


def test_the_base_result_has_only_the_common_fields():
    result = Result(key=None, folder="/w/x")
    assert result.to_json() == {"key": None, "folder": "/w/x", "seconds": 0.0} and result.own_fields() == {}
    assert Result.from_json({"key": "k", "folder": "f", "seconds": 1.0}) == Result(key="k", folder="f", seconds=1.0)


# --- properties ----------------------------------------------------------------------------------------------

def test_tokenized_val_response_lengths_are_the_whole_validation_splits_percentiles():
    assert _result(Tokenized).val_response_lengths == {"p50": 180, "p99": 410}
    assert _result(Tokenized, stats={"val": {"rows_out": 26}}).val_response_lengths == {}, "older stats: none"


def test_trained_model_dir_is_the_final_model_folder():
    trained = _result(Trained)
    assert trained.model_dir == "/w/train/k/final" == trained.final_model_dir
    assert "model_dir" not in trained.to_json(), "a property, not a stored field"
