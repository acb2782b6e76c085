"""The multi-process path of the train task: `accelerate launch` with two CPU ranks on gloo.

The same train stage as a one-process run (`sft_core.stages.STAGES["train"]`, run by the generic
`tasks.stage` task), here with `train.num_processes=2`: it launches `sft_core.launch` through
the shipped `cpu_gloo.yaml`, streams metrics.jsonl into the MLflow run while the ranks train,
and returns the result rank 0 wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sft_core.config import load_config
from tests.test_flow import FAST

STEPS = 4


def _cfg(workdir: Path, *extra: str):
    return load_config("demo", [*FAST, f"workdir={workdir}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
                                f"train.max_steps={STEPS}", "train.eval_steps=2", "train.save_steps=2", *extra])


def test_several_processes_on_cpu_launch_through_the_gloo_config(tmp_path):
    from sft_core.launch import accelerate_command, accelerate_config_file

    cmd = accelerate_command(_cfg(tmp_path, "train.num_processes=3", "train.device=cpu"), ["--x", "1"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(accelerate_config_file("cpu_gloo"))
    assert Path(cmd[cmd.index("--config_file") + 1]).is_file()
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    assert cmd[-4:] == ["-m", "sft_core.launch", "--x", "1"]
    import torch

    auto = accelerate_command(_cfg(tmp_path, "train.device=auto", "train.accelerate_config=fsdp"), [])
    expected = "fsdp.yaml" if torch.cuda.is_available() else "cpu_gloo.yaml"  # `auto` without a GPU is the CPU
    assert auto[auto.index("--config_file") + 1] == str(accelerate_config_file(expected.removesuffix(".yaml")))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_train_task_trains_on_two_gloo_ranks_into_the_same_mlflow_run(tmp_path):
    from mlflow import MlflowClient
    from prefect import flow

    from sft_core import stages
    from sft_core.results import Trained
    from tasks import tracking
    from tasks.stage import StageRunner

    cfg = _cfg(tmp_path, "train.num_processes=2", "train.device=cpu")
    prepared = stages.prepare_data(cfg, log=lambda _: None)
    run_id = tracking.start_or_resume_run(cfg, "distributed-test", "distributed-test", {}).run_id

    @flow(name="distributed-train-test")
    def train_only() -> Trained:
        return StageRunner(cfg)("train", tokens=prepared.tokens, splits=prepared.splits, model=prepared.model,
                                max_new_tokens=8, run_id=run_id)

    trained = train_only()
    folder = Path(trained.folder)
    result = trained.to_json()

    assert result["global_step"] == STEPS
    assert json.loads((folder / "launch_result.json").read_text())["global_step"] == STEPS  # written by rank 0
    # each rank sees half the rows, so an epoch has half the optimizer steps of one process
    rows_per_rank = math.ceil(prepared.splits.train_rows / 2)
    steps_per_epoch = math.ceil(rows_per_rank / cfg.train.per_device_train_batch_size)  # no accumulation in FAST
    assert result["epochs"] == pytest.approx(STEPS / steps_per_epoch)
    assert (Path(result["final_model_dir"]) / "model.safetensors").exists()
    assert (Path(result["final_model_dir"]) / "tokenizer_config.json").exists()

    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in lines if "selection/loss" in r] == [0, 2, 4], "the learning curve on the selection questions"
    # a random tiny model starts near ln(vocab): the loss is not divided by the number of ranks
    vocab = json.loads((Path(prepared.model.model_dir) / "config.json").read_text())["vocab_size"]
    first_step = next(r for r in lines if "train/loss" in r)  # the step-0 line holds the base's eval loss only
    assert first_step["train/loss"] == pytest.approx(math.log(vocab), abs=0.3)

    # the task streamed the ranks' metrics into the MLflow run while they trained
    client = MlflowClient(tracking.tracking_uri(cfg))
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, STEPS + 1))
    assert sorted(m.step for m in client.get_metric_history(run_id, "selection/loss")) == [0, 2, 4]
