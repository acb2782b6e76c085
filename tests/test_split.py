"""Split: `shuffle` is the tutorial's exact order; `hash` keeps old rows on their side as data grows."""

from __future__ import annotations

import json
import random

from sft_core.data import BUNDLED_SAMPLE
from sft_core.split import split_rows


def _bundled() -> list[dict]:
    return [json.loads(x) for x in BUNDLED_SAMPLE.read_text(encoding="utf-8").splitlines() if x.strip()]


def _tutorial_split(rows):
    data_list = list(rows)
    random.seed(42)
    random.shuffle(data_list)
    split_idx = int(len(data_list) * 0.9)
    return data_list[:split_idx], data_list[split_idx:]


def test_shuffle_reproduces_the_tutorial_on_real_rows(real_rows):
    train, val = split_rows(real_rows, method="shuffle", train_fraction=0.9, seed=42)
    exp_train, exp_val = _tutorial_split(real_rows)
    assert train == exp_train and val == exp_val
    assert len(train) == int(len(real_rows) * 0.9)


def test_shuffle_reproduces_the_tutorial_on_the_bundled_sample():
    rows = _bundled()
    assert split_rows(rows) == _tutorial_split(rows)
    assert rows == _bundled(), "input must not be mutated"


def test_hash_split_is_stable_when_rows_are_appended():
    rows = _bundled()
    old_train, old_val = split_rows(rows[:30], method="hash")
    new_train, new_val = split_rows(rows, method="hash")
    q = lambda rs: {r["question"] for r in rs}  # noqa: E731
    assert q(old_train) <= q(new_train) and q(old_val) <= q(new_val)
    assert 0.6 < len(new_train) / len(rows) < 1.0


def test_hash_split_on_real_rows_keeps_sides(real_rows):
    half = len(real_rows) // 2
    a_train, a_val = split_rows(real_rows[:half], method="hash")
    b_train, b_val = split_rows(real_rows, method="hash")
    ids = lambda rs: [r["question"] for r in rs]  # noqa: E731
    assert set(ids(a_train)) <= set(ids(b_train)) and set(ids(a_val)) <= set(ids(b_val))


def test_validation_is_cut_into_selection_and_report_sets_that_share_no_question():
    from sft_core.split import assign_validation, question_id

    _, val = split_rows(_bundled())
    select, report = assign_validation(val, 0.5)
    assert len(select) == len(val) // 2 and len(select) + len(report) == len(val)
    assert not {r["question"] for r in select} & {r["question"] for r in report}
    shuffled = list(reversed(val))
    again = assign_validation(shuffled, 0.5)
    assert {r["question"] for r in again[0]} == {r["question"] for r in select}, "the file's order does not matter"
    ranked = sorted(val, key=lambda r: question_id(r["question"]))
    assert {r["question"] for r in select} == {r["question"] for r in ranked[: len(val) // 2]}, "the documented rule"


def test_each_set_keeps_a_question_when_there_are_two_and_none_without_selection():
    from sft_core.split import assign_validation

    rows = [{"question": f"问题{i}"} for i in range(3)]
    assert [len(s) for s in assign_validation(rows[:2], 0.1)] == [1, 1]
    assert [len(s) for s in assign_validation(rows, 0.9)] == [2, 1]
    assert [len(s) for s in assign_validation(rows, 0.0)] == [0, 3], "no selection: every question reports"


def test_an_empty_split_says_so_and_what_to_do(tmp_path):
    """Every row hashed into train, or one row with data.min_rows=1, failed later on "val.jsonl: file is empty
    (0 bytes)" (exit 3). The split stage says which side is empty, the counts and what to do: exit 4."""
    from typer.testing import CliRunner

    from flows.cli import app
    from sft_core.split import hash_bucket

    rows = [r for r in _bundled() if hash_bucket(r["question"]) < 0.9][:3]  # all three on the training side
    source = tmp_path / "three.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    said = {}
    for name, data, method in (("hash", source, "hash"), ("one", one, "shuffle")):
        result = CliRunner().invoke(app, ["prepare", "--out", str(tmp_path / name), "-c", "demo",
                                          "--set", f"workdir={tmp_path / 'work'}", "--set", f"data.source={data}",
                                          "--set", "data.min_rows=1", "--set", f"data.split_method={method}"])
        assert result.exit_code == 4, result.output
        said[name] = result.output.strip().splitlines()[-1]
    assert said["hash"] == (
        "error: the validation split is empty: the hash split of 3 rows (data.train_fraction=0.9) put 3 in training "
        "and 0 in validation, and a run needs both; add rows (or set data.split_method=shuffle, which keeps a share "
        "of every dataset for validation)")
    assert said["one"] == (
        "error: the training split is empty: the shuffle split of 1 row (data.train_fraction=0.9) put 0 in training "
        "and 1 in validation, and a run needs both; add rows (at least 2 rows with data.train_fraction=0.9, or raise "
        "it)")
