"""Ingestion: every bad fixture fails with its recorded error; good inputs load to the same rows."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from sft_core import errors
from sft_core.data import (
    BUNDLED_SAMPLE,
    REQUIRED_COLUMNS,
    dataset_digest,
    load_rows,
    read_jsonl,
    write_jsonl,
)

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
GOOD = DATA / "good"
EXPECTED: dict[str, dict] = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))
NOT_FIXTURES = {"EXPECTED.json", "README.md"}
FORMAT_CASES = sorted(k for k, v in EXPECTED.items() if v["error"] == "DataFormatError")
VALIDATION_CASES = sorted(k for k, v in EXPECTED.items() if v["error"] == "DataValidationError")


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return load_rows("sample").rows


# -- bad fixtures ----------------------------------------------------------------------


def test_every_bad_fixture_has_an_expected_error():
    files = {p.name for p in BAD.iterdir()} - NOT_FIXTURES
    assert files == set(EXPECTED), "add new fixtures to tests/data/bad/EXPECTED.json (and remove stale entries)"
    assert len(files) >= 22
    assert {v["error"] for v in EXPECTED.values()} == {"DataFormatError", "DataValidationError"}


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_unreadable_fixture_raises_format_error(name: str):
    spec = EXPECTED[name]
    with pytest.raises(errors.DataFormatError) as info:
        load_rows(str(BAD / name))
    message = str(info.value)
    assert "\n" not in message
    assert name in message
    for fragment in spec["match"]:
        assert fragment in message


@pytest.mark.parametrize("name", VALIDATION_CASES)
def test_validation_fixtures_are_readable(name: str):
    """Files whose *values* are wrong parse fine: they fail in validation, not ingestion."""
    loaded = load_rows(str(BAD / name))
    assert loaded.rows and all(set(REQUIRED_COLUMNS) <= set(r) for r in loaded.rows)
    assert len(loaded.row_numbers) == len(loaded.rows)


def test_format_error_uses_file_uri_path_too():
    with pytest.raises(errors.DataFormatError, match="line 3: malformed JSON"):
        load_rows(f"file://{(BAD / 'malformed_line.jsonl').resolve()}")


def test_missing_file_is_a_source_error_naming_the_path(tmp_path: Path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(errors.DataSourceError, match="nope.jsonl: file not found"):
        load_rows(str(missing))
    with pytest.raises(errors.DataSourceError, match="modelscope://krisfu/x"):
        load_rows("krisfu/x")  # looks like a hub id without its scheme


def test_two_columns_mapping_to_one_name_is_rejected(tmp_path: Path, sample):
    rows = [dict(r, Question=r["question"]) for r in sample[:3]]
    with pytest.raises(errors.DataFormatError, match=r"line 1: two columns map to 'question'"):
        load_rows(str(_write_rows(tmp_path / "dup_cols.jsonl", rows)))


# -- bundled sample ----------------------------------------------------------------------


def test_bundled_sample_is_well_formed(sample):
    raw = BUNDLED_SAMPLE.read_bytes().decode("utf-8")
    assert "嗯，用户问的是" in raw  # written with ensure_ascii=False
    assert len(sample) == 260, "90/10 gives the demo 26 validation questions: 13 choose the checkpoint, 13 report"
    assert len({r["question"] for r in sample}) == len(sample)
    for r in sample:
        assert set(r) == {"instruction", "question", "think", "answer", "metrics"}
        assert isinstance(r["metrics"]["quality_f1"], float)
        assert 150 <= len(r["think"]) <= 600 and 80 <= len(r["answer"]) <= 300
        assert r["think"].startswith(("嗯，用户", "好的，用户"))
        assert not any(tag in r[c] for c in REQUIRED_COLUMNS for tag in ("<think>", "</think>"))


def test_sample_aliases_load_the_same_file():
    a, b = load_rows("sample"), load_rows("bundled://sample")
    assert a.location == b.location == str(BUNDLED_SAMPLE)
    assert a.extra_columns == ["instruction", "metrics"]
    assert a.row_numbers == list(range(1, 261))
    assert dataset_digest(a.rows) == dataset_digest(b.rows)


# -- formats, normalisation, digests ----------------------------------------------------------


def test_good_fixtures_load_to_the_same_digest(sample):
    digests = {p.name: dataset_digest(load_rows(str(p)).rows) for p in GOOD.iterdir()}
    assert {Path(name).suffix for name in digests} == {".jsonl", ".json", ".csv", ".parquet"}
    assert len(set(digests.values())) == 1, digests
    assert digests["sample12.jsonl"] == dataset_digest(sample[:12])


def test_a_csv_saved_by_excel_reads_as_the_same_rows_and_validates():
    """Excel's CSV: a UTF-8 BOM, CRLF row ends, and CRLF inside the quoted multi-line fields; a CRLF there is a line
    break, not a control character (every row was refused for U+000D)."""
    from sft_core.validation import validate_rows

    raw = (GOOD / "sample12_excel.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and raw.count(b"\r\n") > raw.count(b"\r\n\"") + 12, "an Excel file"
    loaded = load_rows(str(GOOD / "sample12_excel.csv"))
    want = load_rows(str(GOOD / "sample12.jsonl")).rows
    assert [{c: r[c] for c in REQUIRED_COLUMNS} for r in loaded.rows] == [{c: r[c] for c in REQUIRED_COLUMNS} for r in want]
    assert validate_rows(loaded.rows, source_name=loaded.location, data_docs=False, min_rows=1).success


def test_csv_header_variants_and_row_numbers():
    loaded = load_rows(str(GOOD / "sample12.csv"))  # header: Instruction, " Question ", Think, ANSWER
    assert loaded.extra_columns == ["Instruction"]
    assert set(loaded.rows[0]) == {"Instruction", "question", "think", "answer"}
    # thinks hold newlines, so records span several physical lines: numbers are where each record starts
    assert loaded.row_numbers[0] == 2
    for here, nxt, row in zip(loaded.row_numbers, loaded.row_numbers[1:], loaded.rows):
        assert nxt - here == 1 + sum(str(v).count("\n") for v in row.values())


def test_column_names_are_normalised_and_extras_kept_aside(tmp_path: Path, sample):
    rows = [
        {"Instruction": r["instruction"], " Question ": r["question"], "THINK": r["think"], "answer ": r["answer"],
         "metrics": r["metrics"]}
        for r in sample[:4]
    ]
    loaded = load_rows(str(_write_rows(tmp_path / "variants.jsonl", rows)))
    assert loaded.extra_columns == ["Instruction", "metrics"]
    for got, want in zip(loaded.rows, sample[:4]):
        assert {k: got[k] for k in REQUIRED_COLUMNS} == {k: want[k] for k in REQUIRED_COLUMNS}
        assert got["Instruction"] == want["instruction"] and got["metrics"] == want["metrics"]
    assert dataset_digest(loaded.rows) == dataset_digest(sample[:4])


def test_row_missing_a_key_gets_none_and_row_numbers_skip_blank_lines(tmp_path: Path, sample):
    path = tmp_path / "gaps.jsonl"
    rows = [sample[0], {k: v for k, v in sample[1].items() if k != "think"}, sample[2]]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    text = lines[0] + "\n\n" + "\n".join(lines[1:])
    path.write_text(text, encoding="utf-8")  # no trailing newline: a complete last line is not "truncated"
    loaded = load_rows(str(path))
    assert loaded.row_numbers == [1, 3, 4]
    assert loaded.rows[1]["think"] is None


def test_json_lines_named_json_and_utf8_bom_are_accepted(tmp_path: Path, sample):
    lines_as_json = _write_rows(tmp_path / "rows.json", sample[:3])
    assert dataset_digest(load_rows(str(lines_as_json)).rows) == dataset_digest(sample[:3])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + lines_as_json.read_bytes())
    assert load_rows(str(bom)).rows[0]["question"] == sample[0]["question"]


def test_digest_depends_on_required_columns_only_and_every_character(sample):
    rows = [dict(r) for r in sample[:5]]
    base = dataset_digest(rows)
    assert len(base) == 64 and base == dataset_digest([dict(r) for r in rows])
    assert dataset_digest([dict(r, instruction="x", metrics=None) for r in rows]) == base
    changed = [dict(r) for r in rows]
    changed[3]["answer"] = "X" + changed[3]["answer"][1:]  # one character
    assert dataset_digest(changed) != base
    assert dataset_digest(list(reversed(rows))) != base


def test_write_then_read_jsonl_round_trips(tmp_path: Path, sample):
    rows = [dict(r) for r in sample[:3]]
    rows[0]["answer"] += "\u2028行分隔符"  # must not split a JSON line
    path = write_jsonl(rows, tmp_path / "sub" / "rows.jsonl")
    assert read_jsonl(path) == rows
    assert "用户" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temp file left behind
    write_jsonl(rows[:1], path)  # replaces atomically
    assert read_jsonl(path) == rows[:1]


def test_read_jsonl_rejects_malformed_lines():
    with pytest.raises(errors.DataFormatError, match="line 3"):
        read_jsonl(BAD / "malformed_line.jsonl")


def test_csv_written_by_the_csv_module_round_trips(tmp_path: Path, sample):
    path = tmp_path / "commas.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(REQUIRED_COLUMNS))
        w.writeheader()
        w.writerows({"question": 'a, "quoted"', "think": "line1\r\nline2", "answer": "x,y"} for _ in range(1))
    row = load_rows(str(path)).rows[0]
    assert row == {"question": 'a, "quoted"', "think": "line1\nline2", "answer": "x,y"}  # a CRLF in a field: a newline


@pytest.mark.slow
def test_modelscope_source_offline_fails_fast_with_one_clear_error(tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(errors.DataSourceError) as info:
        load_rows("modelscope://qwen-sft-tests/no-such-dataset", subset="default", cache_dir=str(tmp_path))
    message = str(info.value)
    assert time.monotonic() - start < 90
    assert "modelscope://qwen-sft-tests/no-such-dataset" in message and "local" in message
    assert "\n" not in message
