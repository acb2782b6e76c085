"""sft_core.harness: the lm-eval task stops where the model ends its turn, never at lm-eval's "\\n\\n" default
(which a reasoning model writes inside its think block)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import require


@pytest.fixture()
def lm_eval_installed():
    require(importlib.util.find_spec("lm_eval") is not None, "lm-evaluation-harness (the '.[eval]' extra)")


def _load_task(folder):
    from lm_eval.tasks import TaskManager

    from sft_core.harness import TASK

    return TaskManager(include_path=str(folder), include_defaults=False).load_task_or_group([TASK])[TASK]


def test_the_task_stops_on_the_models_end_of_turn_tokens_only(tmp_path, tiny_model_dir, lm_eval_installed):
    from sft_core.harness import stop_strings, write_task

    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"question": "q", "think": "t", "answer": "a"}) + "\n", encoding="utf-8")
    stops = stop_strings(tiny_model_dir)
    assert "<|im_end|>" in stops
    task = _load_task(write_task(tmp_path / "task", data, max_new_tokens=32, stop=stops))
    until = task.config.generation_kwargs["until"]
    assert until == stops and "\n\n" not in until
    assert task.config.generation_kwargs["max_gen_toks"] == 32


def test_without_its_stop_strings_lm_eval_would_cut_every_think_block(tmp_path, lm_eval_installed):
    """What the task's `until` guards against: left out, lm-eval stops at its few-shot delimiter."""
    from sft_core.harness import write_task

    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"question": "q", "think": "t", "answer": "a"}) + "\n", encoding="utf-8")
    folder = write_task(tmp_path / "task", data, max_new_tokens=32, stop=["<|im_end|>"])
    yaml_file = next(folder.glob("*.yaml"))
    text = yaml_file.read_text(encoding="utf-8")
    yaml_file.write_text("\n".join(line for line in text.splitlines() if "until:" not in line), encoding="utf-8")
    assert _load_task(folder).config.generation_kwargs["until"] == ["\n\n"]
    with pytest.raises(ValueError, match="stop strings"):
        write_task(tmp_path / "empty", data, max_new_tokens=32, stop=[])
