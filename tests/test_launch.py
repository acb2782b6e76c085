"""sft_core/launch.py: the shipped accelerate configs, the `accelerate launch` command, and `launch_training`."""

from __future__ import annotations

import json
import sys
import threading
import time
from types import SimpleNamespace
from typing import get_args

import pytest
import yaml

from sft_core.config import PipelineConfig, TrainConfig, load_config
from sft_core.errors import ModelSourceError, StorageError
from sft_core.launch import accelerate_command, accelerate_config_file, launch_training, project_error
from sft_core.modeling import resolve_device
from sft_core.results import Tokenized

SHIPPED = (*get_args(TrainConfig.model_fields["accelerate_config"].annotation), "cpu_gloo")
LAUNCH_LIMIT_S = 240  # a launch whose ranks fail ends in ~10 s on 2 CPU cores; past this it hangs


# --- the shipped configs and the command --------------------------------------------------------------------

def test_the_shipped_configs_are_the_settings_choices_and_cpu_gloo():
    assert SHIPPED == ("ddp", "fsdp", "deepspeed_zero3", "cpu_gloo")


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_accelerate_config_exists_and_parses(name):
    path = accelerate_config_file(name)
    assert path.name == f"{name}.yaml" and path.is_file()
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["compute_environment"] == "LOCAL_MACHINE" and config["num_machines"] == 1
    assert config["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert config["use_cpu"] is (name == "cpu_gloo")


def test_the_cpu_config_takes_a_free_port_so_parallel_runs_do_not_collide():
    config = yaml.safe_load(accelerate_config_file("cpu_gloo").read_text(encoding="utf-8"))
    assert config["main_process_port"] == 0 and config["distributed_type"] == "MULTI_GPU"


def test_the_command_launches_this_module_on_the_cpu_config_with_the_process_count(tmp_path):
    cfg = load_config("demo", [f"workdir={tmp_path}", "train.num_processes=2", "train.accelerate_config=fsdp"])
    assert cfg.train.device == "cpu"
    assert accelerate_command(cfg, ["--output-dir", "/x"]) == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_file("cpu_gloo")),
        "--num_processes", "2", "-m", "sft_core.launch", "--output-dir", "/x"]


def test_on_auto_the_config_follows_the_device_found(tmp_path):
    cfg = load_config("demo", [f"workdir={tmp_path}", "train.num_processes=4", "train.device=auto",
                               "train.accelerate_config=deepspeed_zero3"])
    name = "cpu_gloo" if resolve_device("auto") == "cpu" else "deepspeed_zero3"
    cmd = accelerate_command(cfg, [])
    assert cmd[cmd.index("--config_file") + 1] == str(accelerate_config_file(name))
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[-2:] == ["-m", "sft_core.launch"]


# --- launch_training ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_launch(tmp_path_factory) -> SimpleNamespace:
    """One real two-rank launch on the CPU whose ranks fail (the model folder does not exist), run in a thread with
    a time limit: what it raised, what it logged, how long it took, whether it hung."""
    out = tmp_path_factory.mktemp("launch")
    cfg = load_config("demo", [f"workdir={out / 'work'}", "train.num_processes=2"])
    (out / "launch_result.json").write_text('{"stale": "an earlier attempt"}', encoding="utf-8")
    tokens = Tokenized(key=None, folder=str(out), train_ds=str(out / "train"), select_ds=str(out / "select"),
                       report_ds=str(out / "report"), stats={}, ids=str(out / "ids.json"))
    model_dir = str(out / "no-model")
    lines: list[str] = []
    outcome: dict[str, object] = {}

    def launch() -> None:
        try:
            outcome["result"] = launch_training(cfg, model_dir=model_dir, tokens=tokens, select_rows="",
                                                max_new_tokens=0, output_dir=out, log=lines.append)
        except BaseException as exc:  # noqa: BLE001 - handed to the tests
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    thread.join(LAUNCH_LIMIT_S)
    return SimpleNamespace(cfg=cfg, out=out, model_dir=model_dir, lines=lines, hung=thread.is_alive(),
                           seconds=time.monotonic() - started, error=outcome.get("error"),
                           result=outcome.get("result"))


def test_a_launch_whose_ranks_fail_raises_and_does_not_hang(failed_launch):
    assert not failed_launch.hung, f"launch_training still running after {LAUNCH_LIMIT_S} s"
    assert failed_launch.seconds < LAUNCH_LIMIT_S
    assert failed_launch.result is None, "the stale result of an earlier attempt is never returned"
    error = failed_launch.error
    assert isinstance(error, ModelSourceError), repr(error)  # the rank's own error, as one process raises it
    assert str(error).startswith(f"cannot load a tokenizer from '{failed_launch.model_dir}'"), str(error)[:500]
    assert not (failed_launch.out / "launch_result.json").exists()


def test_a_crash_that_is_no_project_error_says_how_the_launch_ended():
    assert project_error(["Traceback (most recent call last):", "RuntimeError: CUDA error"]) is None
    found = project_error(["[rank1]: sft_core.errors.StorageError: no space left in /w", "ChildFailedError: ..."])
    assert isinstance(found, StorageError) and str(found) == "no space left in /w"


def test_the_ranks_message_reaches_the_log(failed_launch):
    assert failed_launch.lines[0].startswith("launching: " + " ".join(accelerate_command(failed_launch.cfg, [])) + " ")
    assert any(f"ModelSourceError: cannot load a tokenizer from '{failed_launch.model_dir}'" in line
               for line in failed_launch.lines if line.startswith("[accelerate] "))


def test_the_ranks_read_the_resolved_config_the_launch_wrote(failed_launch):
    written = (failed_launch.out / "launch_config.json").read_text(encoding="utf-8")
    assert PipelineConfig.model_validate(json.loads(written)) == failed_launch.cfg



