"""GX validation: the suite file, the report, Data Docs, policies fail and quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_core import errors
from sft_core.data import load_rows, read_jsonl
from sft_core.validation import ValidationResult, load_suite, suites, validate_rows

BAD = Path(__file__).parent / "data" / "bad"
EXPECTED: dict[str, dict] = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))
VALIDATION_CASES = sorted(k for k, v in EXPECTED.items() if v["error"] == "DataValidationError")
ROW_CASES = [k for k in VALIDATION_CASES if "bad_rows" in EXPECTED[k]]
REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "delicate_medical_r1_sample.jsonl"


@pytest.fixture(scope="module", autouse=True)
def gx():
    """One Great Expectations import (~6 s) shared by the module."""
    import great_expectations

    return great_expectations


@pytest.fixture(scope="module")
def sample():
    return load_rows("sample")


@pytest.fixture(scope="module")
def clean(sample, tmp_path_factory) -> ValidationResult:
    """The bundled sample validated once, with the report and Data Docs on disk."""
    out = tmp_path_factory.mktemp("clean")
    return validate_rows(sample.rows, source_name=sample.location, out_dir=out, row_numbers=sample.row_numbers)


def _validate(name: str, **kwargs) -> ValidationResult:
    loaded = load_rows(str(BAD / name))
    return validate_rows(loaded.rows, source_name=loaded.location, row_numbers=loaded.row_numbers, **kwargs)


# -- the suite file ----------------------------------------------------------------------------


def test_suite_file_is_gx_suite_json_with_bound_parameters(gx):
    raw = json.loads((suites() / "delicate_medical_r1.json").read_text(encoding="utf-8"))
    suite = gx.ExpectationSuite(**raw)  # GX accepts it as stored
    assert len(suite.expectations) == len(raw["expectations"]) >= 19
    assert {e.expectation_type for e in suite.expectations} >= {
        "expect_column_to_exist", "expect_column_values_to_not_be_null", "expect_column_values_to_be_of_type",
        "expect_column_values_to_match_regex", "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_be_unique", "expect_column_values_to_not_match_regex",
        "expect_table_row_count_to_be_between",
    }
    bound = load_suite("delicate_medical_r1", min_rows=3, max_field_chars=500)
    by_key = {(e["type"], e["kwargs"].get("column")): e["kwargs"] for e in bound["expectations"]}
    assert by_key[("expect_table_row_count_to_be_between", None)]["min_value"] == 3
    assert by_key[("expect_column_value_lengths_to_be_between", "answer")]["max_value"] == 500
    assert by_key[("expect_column_value_lengths_to_be_between", "question")]["max_value"] == 500  # capped
    assert load_suite("delicate_medical_r1")["expectations"][0]["kwargs"]["min_value"] == 10


def test_unknown_suite_is_a_config_error_naming_the_setting(sample):
    with pytest.raises(errors.ConfigError, match=r"expectation suite 'nope' not found .*data\.suite"):
        validate_rows(sample.rows, source_name="x", suite="nope")


# -- clean data ----------------------------------------------------------------------------------


def test_bundled_sample_validates_clean(clean: ValidationResult, sample):
    assert clean.success and len(clean.good_rows) == len(sample.rows) >= 40
    assert clean.bad_rows == [] and clean.quarantine_path is None
    assert clean.good_rows == sample.rows


def test_report_json_structure(clean: ValidationResult, sample):
    report = json.loads(clean.report_path.read_text(encoding="utf-8"))
    assert clean.report_path.name == "validation_report.json"
    assert report == json.loads(json.dumps(clean.report, default=str))
    assert report["suite"] == "delicate_medical_r1" and report["source"] == sample.location
    assert report["success"] is True and report["rows"] == {"total": 260, "good": 260, "bad": 0}
    suite = load_suite("delicate_medical_r1")
    assert report["statistics"]["evaluated_expectations"] == len(suite["expectations"])
    assert sorted((e["type"], e["column"]) for e in report["expectations"]) == sorted(
        (e["type"], e["kwargs"].get("column")) for e in suite["expectations"]
    )
    for exp in report["expectations"]:
        assert set(exp) >= {"type", "column", "success", "unexpected_count", "unexpected_rows"}
        assert exp["success"] is True and exp["unexpected_rows"] == []
    row_count = next(e for e in report["expectations"] if e["type"] == "expect_table_row_count_to_be_between")
    assert row_count["observed_value"] == 260


def test_data_docs_are_built_next_to_the_report(clean: ValidationResult):
    assert clean.docs_path == clean.report_path.parent / "data_docs" / "index.html"
    assert clean.docs_path.exists()
    (page,) = (clean.docs_path.parent / "validations" / "delicate_medical_r1").rglob("*.html")
    html = page.read_text(encoding="utf-8")
    assert "medical_sample.jsonl" in html and "values must be unique" in html


def test_real_dataset_sample_validates_clean(real_rows):
    loaded = load_rows(str(REAL_SAMPLE))
    assert loaded.extra_columns == ["instruction", "metrics"]
    result = validate_rows(loaded.rows, source_name=loaded.location, row_numbers=loaded.row_numbers)
    assert result.success and len(result.good_rows) == len(loaded.rows) == 121


# -- bad rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALIDATION_CASES)
def test_invalid_fixture_raises_validation_error(name: str):
    spec = EXPECTED[name]
    with pytest.raises(errors.DataValidationError) as info:
        _validate(name)
    message = str(info.value)
    assert "\n" not in message and name in message
    for fragment in spec["match"]:
        assert fragment in message
    result = info.value.result
    assert not result.success and result.report["success"] is False


@pytest.mark.parametrize("name", ROW_CASES)
def test_quarantine_keeps_exactly_the_good_rows(name: str, tmp_path: Path):
    loaded = load_rows(str(BAD / name))
    bad_numbers = EXPECTED[name]["bad_rows"]
    result = validate_rows(
        loaded.rows, source_name=loaded.location, row_numbers=loaded.row_numbers, policy="quarantine",
        out_dir=tmp_path, data_docs=False, min_rows=1,
    )
    assert result.docs_path is None and result.report_path.exists()
    assert not result.success
    assert [b["row"] for b in result.bad_rows] == bad_numbers
    want_good = [r for n, r in zip(loaded.row_numbers, loaded.rows) if n not in bad_numbers]
    assert result.good_rows == want_good  # same rows, same order, same objects' content
    assert result.report["rows"] == {"total": 12, "good": 12 - len(bad_numbers), "bad": len(bad_numbers)}
    quarantined = read_jsonl(result.quarantine_path)
    assert result.quarantine_path == tmp_path / "quarantine.jsonl"
    assert [q["row"] for q in quarantined] == bad_numbers
    for q in quarantined:
        assert q["reason"] and q["column"] in ("question", "think", "answer")
        assert q["data"] == loaded.rows[loaded.row_numbers.index(q["row"])]
    # the report (GX's unexpected rows) and the attribution agree
    flagged = {(e["column"], n) for e in result.report["expectations"] for n in e["unexpected_rows"]}
    for bad in result.bad_rows:
        assert all((p["column"], bad["row"]) in flagged for p in bad["problems"])
    kept_firsts = {(c, n) for c, n in flagged if n not in bad_numbers}
    assert all(name == "duplicate_questions.jsonl" and c == "question" for c, _ in kept_firsts)


def test_duplicates_keep_the_first_occurrence(tmp_path: Path):
    result = _validate("duplicate_questions.jsonl", policy="quarantine", out_dir=tmp_path, data_docs=False)
    unique = next(e for e in result.report["expectations"] if e["type"] == "expect_column_values_to_be_unique")
    assert unique["unexpected_rows"] == [3, 9] and unique["unexpected_count"] == 2  # GX flags both copies
    assert [b["row"] for b in result.bad_rows] == [9] and result.bad_rows[0]["reason"] == "duplicates row 3"


def test_table_level_failures_raise_under_quarantine_too(sample, tmp_path: Path):
    with pytest.raises(errors.DataValidationError, match="too few rows: 1, need at least 10"):
        _validate("one_row.jsonl", policy="quarantine", out_dir=tmp_path, data_docs=False)
    rows = [{"question": r["question"], "think": r["think"]} for r in sample.rows]
    with pytest.raises(errors.DataValidationError, match="column 'answer' is missing"):
        validate_rows(rows, source_name="no_answer.jsonl", policy="quarantine")


def test_quarantine_below_min_rows_after_dropping_fails(sample):
    rows = [dict(r) for r in sample.rows[:11]]
    rows[0]["answer"] = " "
    with pytest.raises(errors.DataValidationError, match="only 10 of 11 rows pass validation, need at least 11"):
        validate_rows(rows, source_name="s.jsonl", policy="quarantine", min_rows=11)
    assert len(validate_rows(rows, source_name="s.jsonl", policy="quarantine", min_rows=10).good_rows) == 10


def test_max_field_chars_bounds_think_and_answer(sample):
    bound = sorted(len(r["think"]) for r in sample.rows)[-3]  # two thinks are longer than this
    result = validate_rows(sample.rows, source_name="s.jsonl", policy="quarantine", max_field_chars=bound)
    too_long = [n for n, r in zip(sample.row_numbers, sample.rows) if len(r["think"]) > bound]
    assert len(too_long) >= 1 and [b["row"] for b in result.bad_rows] == too_long
    assert all(b["column"] == "think" and b["reason"].endswith(f"characters (max {bound})") for b in result.bad_rows)
    assert _validate("overlong_row.jsonl", max_field_chars=30000).success


def test_failure_report_is_written_before_raising(tmp_path: Path):
    with pytest.raises(errors.DataValidationError, match="report: ") as info:
        _validate("several_problems.jsonl", out_dir=tmp_path)
    report = json.loads((tmp_path / "validation_report.json").read_text(encoding="utf-8"))
    assert report["rows"]["bad"] == 6 and not report["success"]
    assert info.value.result.docs_path.exists()
    assert not (tmp_path / "quarantine.jsonl").exists()  # policy fail quarantines nothing


# -- text is data: control tokens, invisible and hostile characters --------------------------------


def test_every_control_token_of_the_tokenizer_is_refused_not_a_fixed_list(sample, qwen_tokenizer):
    from sft_core.chat import control_tokens

    tokens = control_tokens(qwen_tokenizer)
    assert {"<|im_end|>", "<|vision_start|>", "<tool_call>", "<|fim_prefix|>"} <= set(tokens)
    rows = [dict(r) for r in sample.rows[:12]]
    rows[4]["answer"] += "<|vision_start|>"
    rows[6]["think"] += "<tool_call>"
    result = validate_rows(rows, source_name="x", policy="quarantine", control_tokens=tokens, data_docs=False)
    reasons = {b["row"]: b["reason"] for b in result.bad_rows}
    assert reasons == {5: "contains the tokenizer's control token '<|vision_start|>' as text (it would end or open a "
                          "chat turn)",
                       7: "contains the tokenizer's control token '<tool_call>' as text (it would end or open a chat "
                          "turn)"}
    # without the tokenizer, the suite's own list: the chat tokens only
    assert validate_rows(rows, source_name="x", data_docs=False).success


def test_near_duplicate_questions_are_a_warning_with_their_rows(sample):
    rows = [dict(r) for r in sample.rows[:12]]
    rows[9]["question"] = rows[2]["question"].replace("，", ",") + "  "  # the same words, other punctuation
    result = validate_rows(rows, source_name="x", data_docs=False)
    assert result.success, "a near duplicate is worth a look, not a refusal"
    assert result.warnings == ["rows 3, 10: column 'question' is nearly the same text (ignoring spaces, punctuation "
                               "and case)"]
    assert result.report["warnings"] == result.warnings


def test_invisible_means_default_ignorable_and_ordinary_invisible_characters_pass(sample):
    """The rule of `sft_core.validation`: blank and think-tag checks look through every Default_Ignorable_Code_Point
    (Unicode's property, from the `regex` package's tables, not a hand-made list); hidden text is refused; one
    joiner, selector or soft hyphen inside real text is ordinary text."""
    import re

    import regex

    from sft_core.validation import default_ignorable

    ignorable = re.compile(f"[{default_ignorable()}]")
    for code in range(0x110000):
        assert bool(ignorable.match(chr(code))) == bool(regex.match(r"\p{Default_Ignorable_Code_Point}", chr(code)))
    rows = [dict(r) for r in sample.rows[:12]]
    rows[0]["answer"] += " 👨\u200d👩\u200d👧 ❤\ufe0f"  # an emoji ZWJ sequence, one variation selector
    rows[1]["think"] += " می\u200cخواهم"  # a ZWNJ inside a Persian word
    rows[2]["question"] += " Ge\u00adsund\u00adheit 葛\U000e0100"  # soft hyphens; one ideographic variation selector
    assert validate_rows(rows, source_name="x", data_docs=False).success


# -- what a person opens: the report page and the Data Docs ----------------------------------------


def _chromium(page: Path, profile: Path) -> str:
    """`page` loaded in headless Chromium (its scripts run, events fire within 3 s of virtual time): the DOM."""
    import subprocess

    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
         "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_row_text_in_the_data_docs_and_the_report_page_never_runs_as_a_script(sample, tmp_path: Path):
    """Stored XSS: a row's `<script>` or `<img onerror>` was written raw into a <td> of the Data Docs (logged to
    MLflow for anyone to open). Each page is opened in headless Chromium; a script that ran would change the title
    or request a URL from a listener here. A control page with the raw payload proves that the check can see one."""
    import shutil
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.conftest import require

    require(shutil.which("chromium") is not None, "chromium (Debian: apt-get install -y chromium)")
    hits: list[str] = []

    class Listener(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    beacon = f"http://127.0.0.1:{server.server_port}"
    try:
        rows = [dict(r) for r in sample.rows[:12]]
        rows[2]["answer"] = f"<script>document.title='XSS';fetch('{beacon}/script')</script><think>" + rows[2]["answer"]
        rows[4]["think"] = f"<img src=x onerror=\"document.title='XSS';new Image().src='{beacon}/img'\">\x01"
        rows[6]["question"] = f"<svg onload=\"new Image().src='{beacon}/svg'\"></svg><think>"
        result = validate_rows(rows, source_name="hostile.jsonl", policy="quarantine", out_dir=tmp_path / "v",
                               min_rows=1)
        assert [b["row"] for b in result.bad_rows] == [3, 5, 7]
        (docs_page,) = (result.docs_path.parent / "validations").rglob("*.html")
        control = tmp_path / "control.html"
        control.write_text(f"<html><head><title>page</title></head><body><td>{rows[2]['answer'][:120]}</td>"
                           f"<td>{rows[4]['think']}</td></body></html>", encoding="utf-8")
        assert "<title>XSS</title>" in _chromium(control, tmp_path / "profile"), "the check sees a script run"
        assert sorted(hits) == ["/img", "/script"], hits
        hits.clear()
        for page in (docs_page, result.docs_path, result.report_path.parent / "validation_report.html"):
            dom = _chromium(page, tmp_path / "profile")
            assert "<title>XSS</title>" not in dom and not hits, (page, hits)
        assert "&lt;script&gt;document.title='XSS'" in _chromium(docs_page, tmp_path / "profile").replace("&#39;", "'"), \
            "the row's text is shown, as text"
    finally:
        server.shutdown()
