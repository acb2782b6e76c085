"""sft_core/preflight.py: the checks before any work (`check_*`), `preflight` running them all, memoized per config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sft_core.config import load_config
from sft_core.errors import ConfigError, DataFormatError, DataSourceError
from sft_core.preflight import (CHECKS, check_output_paths, check_prompt_room, check_readable, check_sources, inside,
                                local_model_dir, preflight)
from sft_core.results import BaseModel
from sft_core.stage_engine import write_done
from sft_core.stages import STAGES
from sft_core.tiny_model import build_tiny_model

LONG_PROMPT = " ".join(["word"] * 80)  # 428 tokens of the demo's tokenizer with the chat markup


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("preflight") / "tiny", load_config("demo").model.tiny)


def _rows_file(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"question": f"q{i}?", "think": f"t{i}", "answer": f"a{i}"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def _cfg(tmp_path: Path, *overrides: str):
    return load_config("demo", [f"workdir={tmp_path / 'work'}", *overrides])


class _Reachable:
    """The caller's reachability check: counts its calls, returns what it is told to."""

    def __init__(self, answer: object = "store-ok", fail: Exception | None = None) -> None:
        self.calls, self.answer, self.fail = 0, answer, fail

    def __call__(self, cfg):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return self.answer


# --- preflight -----------------------------------------------------------------------------------------------

def test_the_checks_run_cheapest_first():
    assert CHECKS == (check_output_paths, check_sources, check_readable, check_prompt_room)


def test_preflight_runs_the_checks_then_asks_reachable_once_and_returns_its_answer(tmp_path):
    cfg = _cfg(tmp_path, f"data.source={_rows_file(tmp_path / 'rows.jsonl')}")
    reachable = _Reachable()
    assert preflight(cfg, reachable=reachable) == "store-ok"
    assert reachable.calls == 1


@pytest.mark.parametrize(("check", "error"), [(check_output_paths, ConfigError), (check_sources, ConfigError),
                                              (check_readable, DataFormatError), (check_prompt_room, ConfigError)])
def test_preflight_fails_on_what_any_check_refuses_and_never_asks_reachable(tmp_path, tiny_dir, check, error):
    """One config per check that only that check refuses: preflight runs each of them."""
    (tmp_path / "rows.txt").write_text("question,think,answer\n", encoding="utf-8")
    bad = {check_output_paths: "data.cache_dir=/outside/cache",
           check_sources: f"data.source={tmp_path / 'missing.jsonl'}",
           check_readable: f"data.source={tmp_path / 'rows.txt'}",
           check_prompt_room: f"data.system_prompt={LONG_PROMPT}"}[check]
    cfg = _cfg(tmp_path, f"model.source={tiny_dir}", "data.max_length=64", bad)
    with pytest.raises(error) as direct:
        check(cfg)
    for other in CHECKS[: CHECKS.index(check)]:
        assert other(cfg) is None, "the checks before it pass"
    reachable = _Reachable()
    with pytest.raises(error) as err:
        preflight(cfg, reachable=reachable)
    assert str(err.value) == str(direct.value) and reachable.calls == 0


def test_a_config_that_passed_is_not_checked_or_reached_again_in_this_process(tmp_path):
    rows = _rows_file(tmp_path / "rows.jsonl")
    cfg = _cfg(tmp_path, f"data.source={rows}")
    reachable = _Reachable()
    preflight(cfg, reachable=reachable)
    assert preflight(cfg, reachable=reachable) == "store-ok" and reachable.calls == 1
    same = _cfg(tmp_path, f"data.source={rows}")  # an equal config, loaded again: memoized by content
    assert same is not cfg and preflight(same, reachable=reachable) == "store-ok" and reachable.calls == 1
    other = _cfg(tmp_path, f"data.source={rows}", "train.learning_rate=1e-5")
    preflight(other, reachable=reachable)
    assert reachable.calls == 2, "another config is checked on its own"


def test_a_data_file_changed_since_it_passed_is_checked_again(tmp_path):
    rows = _rows_file(tmp_path / "rows.jsonl")
    cfg = _cfg(tmp_path, f"data.source={rows}")
    reachable = _Reachable()
    preflight(cfg, reachable=reachable)
    rows.write_text(rows.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 4: malformed JSON"):
        preflight(cfg, reachable=reachable)
    assert reachable.calls == 1


def test_reachable_is_asked_when_a_config_first_passed_without_it_and_a_none_answer_is_remembered(tmp_path):
    cfg = _cfg(tmp_path)
    assert preflight(cfg) is None
    reachable = _Reachable(answer=None)
    assert preflight(cfg, reachable=reachable) is None and reachable.calls == 1
    assert preflight(cfg, reachable=reachable) is None and reachable.calls == 1


def test_a_reachability_check_that_failed_is_asked_again(tmp_path):
    cfg = _cfg(tmp_path)
    down = _Reachable(fail=RuntimeError("tracking server down"))
    with pytest.raises(RuntimeError, match="tracking server down"):
        preflight(cfg, reachable=down)
    up = _Reachable()
    assert preflight(cfg, reachable=up) == "store-ok" and (down.calls, up.calls) == (1, 1)


# --- check_output_paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["data.cache_dir", "model.cache_dir"])
def test_a_cache_folder_outside_the_workdir_is_refused(tmp_path, key):
    cfg = _cfg(tmp_path, f"{key}=../elsewhere")
    with pytest.raises(ConfigError) as err:
        check_output_paths(cfg)
    assert str(err.value) == (f"{key}='../elsewhere' points outside the workdir {cfg.workdir_path}; use a path inside "
                              "it (or MODELSCOPE_CACHE / HF_HOME for a shared download cache)")
    with pytest.raises(ConfigError, match=f"^{key}='/elsewhere/cache' points outside the workdir "):
        check_output_paths(_cfg(tmp_path, f"{key}=/elsewhere/cache"))


def test_a_cache_folder_inside_the_workdir_passes(tmp_path):
    assert check_output_paths(_cfg(tmp_path, "data.cache_dir=cache/data", "model.cache_dir=./models")) is None
    assert check_output_paths(_cfg(tmp_path, f"data.cache_dir={tmp_path / 'work' / 'c'}")) is None
    assert check_output_paths(_cfg(tmp_path)) is None, "no cache folder named"


def test_inside_compares_resolved_paths(tmp_path):
    assert inside(tmp_path / "a" / "b", tmp_path / "a")
    assert inside(tmp_path / "a", tmp_path / "a")
    assert not inside(tmp_path / "a" / ".." / "b", tmp_path / "a")
    assert not inside(tmp_path / "ab", tmp_path / "a"), "a common prefix is not a parent"


# --- check_sources -------------------------------------------------------------------------------------------

def test_a_data_file_that_does_not_exist_is_refused(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError) as err:
        check_sources(_cfg(tmp_path, f"data.source={missing}"))
    assert str(err.value) == f"data.source='{missing}': no such file"


def test_a_data_source_that_is_a_folder_is_refused_as_not_a_file(tmp_path):
    with pytest.raises(DataSourceError) as err:
        check_sources(_cfg(tmp_path, f"data.source={tmp_path}"))
    assert str(err.value) == (f"{tmp_path}: is a directory, not a file; data.source must name a "
                              ".jsonl, .ndjson, .json, .parquet, .csv file")
    assert err.value.transient is False


def test_a_bad_hub_id_is_refused_before_any_download(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.source='hf://nothing': a hf id is owner/name"):
        check_sources(_cfg(tmp_path, "data.source=hf://nothing"))
    with pytest.raises(ConfigError, match=r"^model\.source='modelscope://Qwen': a modelscope id is owner/name"):
        check_sources(_cfg(tmp_path, "model.source=modelscope://Qwen"))


def test_a_local_model_folder_without_a_config_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError) as err:
        check_sources(_cfg(tmp_path, f"model.source={tmp_path / 'model'}"))
    assert str(err.value) == (f"model.source='{tmp_path / 'model'}': no model folder there "
                              f"(expected {tmp_path / 'model' / 'config.json'})")


def test_a_missing_gguf_file_is_refused_with_the_fetch_hint_for_the_sample(tmp_path):
    from sft_core.sample_model import SMOLLM2

    other = tmp_path / "m.gguf"
    with pytest.raises(ConfigError) as err:
        check_sources(_cfg(tmp_path, f"model.source=gguf://{other}"))
    assert str(err.value) == f"model.source='gguf://{other}': no such file {other}"
    sample = tmp_path / SMOLLM2.file_name
    with pytest.raises(ConfigError) as err:
        check_sources(_cfg(tmp_path, f"model.source={sample}"))
    assert str(err.value) == (f"model.source='{sample}': no such file {sample} "
                              "(fetch it with `qwen-sft fetch-sample-model`)")


def test_a_file_named_gguf_that_is_not_one_is_refused(tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError) as err:
        check_sources(_cfg(tmp_path, f"model.source={fake}"))
    assert str(err.value) == f"model.source='{fake}': {fake} is not a GGUF file"


def test_the_demo_sources_pass(tmp_path, tiny_dir):
    assert check_sources(_cfg(tmp_path)) is None
    assert check_sources(_cfg(tmp_path, f"model.source={tiny_dir}",
                              f"data.source={_rows_file(tmp_path / 'r.jsonl')}")) is None


# --- check_readable ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    (b"", "{path}: file is empty (0 bytes)"),
    (b'{"question": "q", "think": "t", "answer": "a"}\n{"question": "q2", \n',
     "{path}: line 2: malformed JSON: Expecting property name enclosed in double quotes at column 20"),
    (b'{"question": "q", "think": "t", "answer": "a"}\n{"question": "q2"',
     "{path}: line 2: truncated file, the last line is cut off (Expecting ',' delimiter)"),
    (b'{"question": "q", "answer": "a"}\n',
     "'think' column missing in {path} (columns found: question, answer)"),
    (b"\xff\xfe{\x00}\x00", "{path}: file is UTF-16 encoded; convert it to UTF-8"),
])
def test_an_unreadable_data_file_fails_with_its_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFormatError) as err:
        check_readable(_cfg(tmp_path, f"data.source={path}"))
    assert str(err.value) == message.format(path=path)


def test_a_readable_data_file_and_the_bundled_sample_pass(tmp_path):
    assert check_readable(_cfg(tmp_path, f"data.source={_rows_file(tmp_path / 'rows.jsonl')}")) is None
    assert check_readable(_cfg(tmp_path)) is None


def test_a_hub_dataset_is_not_read_before_the_ingest_stage(tmp_path):
    assert check_readable(_cfg(tmp_path, "data.source=hf://nobody/nothing-here")) is None, "offline: not fetched"


# --- check_prompt_room ---------------------------------------------------------------------------------------

def test_a_prompt_that_leaves_no_room_in_max_length_is_refused_when_the_model_is_at_hand(tmp_path, tiny_dir):
    cfg = _cfg(tmp_path, f"model.source={tiny_dir}", "data.max_length=64", f"data.system_prompt={LONG_PROMPT}")
    assert local_model_dir(cfg) == tiny_dir
    with pytest.raises(ConfigError) as err:
        check_prompt_room(cfg)
    assert re.fullmatch(r"data\.max_length=64 leaves no room for an answer: the system prompt and chat markup alone "
                        r"take \d+ tokens", str(err.value))
    assert int(str(err.value).split()[-2]) > 64 - 8
    assert check_prompt_room(_cfg(tmp_path, f"model.source={tiny_dir}", "data.max_length=1024",
                                  f"data.system_prompt={LONG_PROMPT}")) is None


def test_a_model_still_to_be_built_is_checked_once_its_stage_has_finished(tmp_path, tiny_dir):
    cfg = _cfg(tmp_path, "data.max_length=64", f"data.system_prompt={LONG_PROMPT}")  # model.source=tiny://qwen2
    assert local_model_dir(cfg) is None
    assert check_prompt_room(cfg) is None, "nothing to check before the base-model stage built it"
    stage = STAGES["base-model"]
    key = stage.key_of(cfg)
    folder = stage.folder_of(cfg, key)
    folder.mkdir(parents=True)
    write_done(folder, BaseModel(key=key, folder=str(folder), model_dir=str(tiny_dir)))
    assert local_model_dir(cfg) == tiny_dir
    with pytest.raises(ConfigError, match=r"^data\.max_length=64 leaves no room for an answer"):
        check_prompt_room(cfg)
