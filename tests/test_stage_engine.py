"""sft_core/stage_engine.py: `_DONE.json` as the one record of done, `run_in_folder`, and a stage's key and folder."""

from __future__ import annotations

import errno
import json
import re
import threading
import time
from pathlib import Path

import pytest

from sft_core.config import load_config
from sft_core.errors import StorageError
from sft_core.results import Evaluated, Generated, Trained
from sft_core.stage_engine import DONE, OWNED, Stage, read_done, run_in_folder, write_done

CALLS: list[tuple[str, int]] = []


def toy_key(cfg, n: int) -> dict:
    return {"max_length": cfg.data.max_length, "n": n}


def toy_body(cfg, folder: Path, n: int, log=None) -> dict:
    CALLS.append(("toy", n))
    (folder / "out.txt").write_text(str(n), encoding="utf-8")
    if log is not None:
        log(f"wrote {n}")
    return {"metrics": {"n": float(n)}}


def other_body(cfg, folder: Path, n: int, log=None) -> dict:
    CALLS.append(("other", n))
    return {"metrics": {"n": float(-n)}}


def uncached_key(cfg, n: int) -> None:
    return None


TOY = Stage("toy", "toy", Evaluated, toy_key, toy_body, takes=("log",))


@pytest.fixture(autouse=True)
def _no_calls():
    CALLS.clear()
    yield
    CALLS.clear()


def _cfg(tmp_path: Path, *overrides: str):
    return load_config("demo", [f"workdir={tmp_path / 'work'}", *overrides])


class _Body:
    """A stage body that counts its calls and returns an `Evaluated` for the folder it is given."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self, folder: Path) -> Evaluated:
        self.calls += 1
        (folder / "work.txt").write_text(f"call {self.calls}", encoding="utf-8")
        if self.fail is not None:
            raise self.fail
        return Evaluated(key="k", folder=str(folder), metrics={"calls": float(self.calls)})


# --- _DONE.json ----------------------------------------------------------------------------------------------

def test_write_done_then_read_done_gives_the_same_result(tmp_path):
    result = Evaluated(key="abc", folder=str(tmp_path), seconds=1.5, metrics={"loss": 1.25}, losses="l.json")
    assert write_done(tmp_path, result) is result
    assert read_done(tmp_path, Evaluated) == result
    assert json.loads((tmp_path / DONE).read_text(encoding="utf-8")) == {
        "key": "abc", "folder": str(tmp_path), "seconds": 1.5, "metrics": {"loss": 1.25}, "losses": "l.json"}
    assert [p.name for p in tmp_path.iterdir()] == [DONE], "written through a temporary file, renamed into place"


def test_read_done_is_none_for_a_folder_not_done_or_a_record_it_cannot_trust(tmp_path):
    assert read_done(tmp_path / "nowhere", Evaluated) is None
    assert read_done(tmp_path, Evaluated) is None
    (tmp_path / DONE).write_text("{truncated", encoding="utf-8")
    assert read_done(tmp_path, Evaluated) is None
    (tmp_path / DONE).write_text(json.dumps({"key": "k", "folder": "f"}), encoding="utf-8")
    assert read_done(tmp_path, Evaluated) is None, "written by older code: lacks `metrics`"
    write_done(tmp_path, Evaluated(key="k", folder=str(tmp_path), metrics={}))
    assert read_done(tmp_path, Trained) is None, "another stage's record"
    (tmp_path / DONE).write_text("[1, 2]", encoding="utf-8")
    assert read_done(tmp_path, Evaluated) is None


def test_a_record_with_extra_fields_is_read_with_the_ones_the_result_has(tmp_path):
    record = {"key": "k", "folder": "f", "seconds": 2.0, "predictions": "p.jsonl", "metrics": {}, "from_the_future": 1}
    (tmp_path / DONE).write_text(json.dumps(record), encoding="utf-8")
    assert read_done(tmp_path, Generated) == Generated(key="k", folder="f", seconds=2.0, predictions="p.jsonl",
                                                       metrics={})


# --- run_in_folder -------------------------------------------------------------------------------------------

def test_run_in_folder_runs_the_body_once_then_serves_its_record(tmp_path):
    folder = tmp_path / "stage" / "key"
    body = _Body()
    first = run_in_folder(folder, body, Evaluated)
    assert body.calls == 1 and first.reused is False and first.seconds >= 0
    assert read_done(folder, Evaluated) == first
    again = run_in_folder(folder, body, Evaluated)
    assert body.calls == 1, "the body is not called again"
    assert again == first and again.reused is True
    assert (folder / "work.txt").read_text(encoding="utf-8") == "call 1"


def test_every_folder_it_creates_carries_the_owned_marker(tmp_path):
    folder = tmp_path / "stage" / "key"
    run_in_folder(folder, _Body(), Evaluated)
    assert OWNED == ".qwen-sft-owned"
    assert (folder / OWNED).read_text(encoding="utf-8") == \
        "written by qwen-sft: `qwen-sft gc` may delete this folder\n"


def test_refresh_runs_the_body_again_in_a_fresh_folder(tmp_path):
    folder = tmp_path / "stage" / "key"
    body = _Body()
    run_in_folder(folder, body, Evaluated)
    (folder / "left-over.txt").write_text("x", encoding="utf-8")
    fresh = run_in_folder(folder, body, Evaluated, refresh=True)
    assert body.calls == 2 and fresh.reused is False and fresh.metrics == {"calls": 2.0}
    assert not (folder / "left-over.txt").exists()
    assert read_done(folder, Evaluated) == fresh


def test_a_body_that_raises_leaves_no_record_and_the_next_run_starts_clean(tmp_path):
    folder = tmp_path / "stage" / "key"
    with pytest.raises(ValueError, match="^broken$"):
        run_in_folder(folder, _Body(fail=ValueError("broken")), Evaluated)
    assert not (folder / DONE).exists() and (folder / "work.txt").exists()
    assert read_done(folder, Evaluated) is None
    (folder / "crash-debris.txt").write_text("x", encoding="utf-8")
    body = _Body()
    run_in_folder(folder, body, Evaluated)
    assert body.calls == 1 and not (folder / "crash-debris.txt").exists(), "a crash's leftovers are wiped first"


def test_keep_partial_keeps_a_crashed_runs_files_to_resume_from(tmp_path):
    folder = tmp_path / "train" / "key"
    with pytest.raises(RuntimeError):
        run_in_folder(folder, _Body(fail=RuntimeError("killed")), Evaluated, keep_partial=True)
    (folder / "checkpoint-2").mkdir()
    run_in_folder(folder, _Body(), Evaluated, keep_partial=True)
    assert (folder / "checkpoint-2").is_dir() and (folder / DONE).exists()


def test_a_full_disk_inside_the_body_is_one_storage_error_naming_the_folder(tmp_path):
    folder = tmp_path / "stage" / "key"
    with pytest.raises(StorageError) as err:
        run_in_folder(folder, _Body(fail=OSError(errno.ENOSPC, "No space left on device")), Evaluated)
    assert re.fullmatch(rf"no space left on the device of {re.escape(str(folder))} \(\d+(\.\d)? [KMGT]?B free\): "
                        r"OSError: \[Errno 28\] No space left on device; free some with `qwen-sft gc`, or set workdir "
                        r"on a larger disk", str(err.value)), str(err.value)
    assert not (folder / DONE).exists()


def test_two_runs_of_one_folder_at_once_run_the_body_once(tmp_path):
    folder = tmp_path / "stage" / "key"
    calls: list[int] = []

    def slow(f: Path) -> Evaluated:
        calls.append(1)
        time.sleep(0.3)
        return Evaluated(key="k", folder=str(f), metrics={})

    results: list[Evaluated] = []
    threads = [threading.Thread(target=lambda: results.append(run_in_folder(folder, slow, Evaluated)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(results) == 2
    assert sorted(r.reused for r in results) == [False, True] and results[0] == results[1]


# --- Stage: key, folder, run ---------------------------------------------------------------------------------

def test_a_stages_key_is_stable_and_changes_with_its_inputs_and_what_it_reads_of_the_config(tmp_path):
    cfg = _cfg(tmp_path)
    key = TOY.key_of(cfg, n=1)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert TOY.key_of(cfg, n=1) == key == TOY.key_of(_cfg(tmp_path), n=1)
    assert TOY.key_of(cfg, n=2) != key, "another input"
    assert TOY.key_of(_cfg(tmp_path, "data.max_length=512"), n=1) != key, "a setting the key reads"
    assert TOY.key_of(_cfg(tmp_path, "train.learning_rate=1e-5"), n=1) == key, "a setting it does not read"


def test_a_stages_key_changes_with_its_name_and_its_code(tmp_path):
    cfg = _cfg(tmp_path)
    key = TOY.key_of(cfg, n=1)
    renamed = Stage("toy-2", "toy", Evaluated, toy_key, toy_body)
    recoded = Stage("toy", "toy", Evaluated, toy_key, other_body)
    assert renamed.key_of(cfg, n=1) != key
    assert recoded.key_of(cfg, n=1) != key and recoded.code_version() != TOY.code_version()
    assert TOY.code_version() == TOY.code_version() and re.fullmatch(r"[0-9a-f]{16}", TOY.code_version())


def test_a_stages_folder_is_its_key_under_its_folder_of_the_workdir(tmp_path):
    cfg = _cfg(tmp_path)
    key = TOY.key_of(cfg, n=1)
    assert TOY.folder_of(cfg, key) == cfg.workdir_path / "toy" / key
    assert TOY.folder_of(cfg, None) == cfg.workdir_path / "toy" / "latest"
    uncached = Stage("once", "once", Evaluated, uncached_key, toy_body)
    assert uncached.key_of(cfg, n=1) is None


def test_stage_run_runs_into_its_keyed_folder_once_and_reuses_it(tmp_path):
    cfg = _cfg(tmp_path)
    lines: list[str] = []
    first = TOY.run(cfg, n=3, extras={"log": lines.append})
    key = TOY.key_of(cfg, n=3)
    assert first == Evaluated(key=key, folder=str(TOY.folder_of(cfg, key)), seconds=first.seconds,
                              metrics={"n": 3.0})
    assert CALLS == [("toy", 3)] and lines == ["wrote 3"]
    assert (Path(first.folder) / "out.txt").read_text(encoding="utf-8") == "3"
    again = TOY.run(cfg, n=3, extras={"log": lines.append})
    assert again.reused and again == first and CALLS == [("toy", 3)]
    TOY.run(cfg, n=3, refresh=True)
    assert CALLS == [("toy", 3), ("toy", 3)]
    TOY.run(cfg, n=4)
    assert CALLS[-1] == ("toy", 4) and len(list((cfg.workdir_path / "toy").glob("*/" + DONE))) == 2


def test_a_stage_without_a_key_runs_every_time_into_latest(tmp_path):
    cfg = _cfg(tmp_path)
    stage = Stage("once", "once", Evaluated, uncached_key, toy_body)
    first = stage.run(cfg, n=1)
    second = stage.run(cfg, n=1)
    assert CALLS == [("toy", 1), ("toy", 1)] and not second.reused
    assert first.folder == second.folder == str(cfg.workdir_path / "once" / "latest") and first.key is None


def test_run_into_uses_the_given_folder_with_the_same_rules(tmp_path):
    cfg = _cfg(tmp_path)
    folder = tmp_path / "command-output"
    result = TOY.run_into(cfg, folder, key="mine", n=5)
    assert result.folder == str(folder) and result.key == "mine" and (folder / OWNED).is_file()
    assert TOY.run_into(cfg, folder, key="mine", n=5).reused and CALLS == [("toy", 5)]
