"""Train task: one process in-place, or `accelerate launch` for several (same code path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task

from sft_core import stages
from sft_core.config import PipelineConfig
from tasks.common import task_options

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = REPO_ROOT / "infra" / "accelerate"


def _sink(cfg: PipelineConfig, run_id: str | None):
    """Metrics to the Prefect log (progress) and to MLflow (buffered, outage-tolerant)."""
    logger = get_run_logger()
    mlflow_logger = None
    if run_id:
        from tasks.tracking import BufferedMetricLogger

        mlflow_logger = BufferedMetricLogger(cfg, run_id)

    def sink(step: int, metrics: dict[str, float]) -> None:
        logger.info("step %d  %s", step, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if mlflow_logger:
            mlflow_logger.log(step, metrics)

    return sink, mlflow_logger


@task(name="train", **task_options())
def train(cfg: PipelineConfig, tokens: dict, splits: dict, model_dir: str, folder: Path, max_new_tokens: int,
          run_id: str | None = None, refresh: bool = False) -> dict:
    """Full fine-tune; resumes from the last checkpoint in `folder` after a crash."""
    sink, mlflow_logger = _sink(cfg, run_id)
    try:
        if cfg.train.num_processes > 1:
            body = lambda f: _launch_distributed(cfg, tokens, splits, model_dir, f, max_new_tokens, sink)  # noqa: E731
        else:
            body = lambda f: stages.train(cfg, tokens, splits, model_dir, f, max_new_tokens, sink=sink)  # noqa: E731
        return stages.run_stage(folder, body, refresh=refresh, keep_partial=True)
    finally:
        if mlflow_logger:
            left = mlflow_logger.close()
            if left:
                get_run_logger().warning("%d metric points could not reach MLflow yet; they are re-sent from metrics.jsonl", left)


def accelerate_command(cfg: PipelineConfig, args: list[str]) -> list[str]:
    from sft_core.modeling import resolve_device

    config_file = ACCELERATE_CONFIGS / f"{cfg.train.accelerate_config}.yaml"
    if resolve_device(cfg.train.device) == "cpu":  # also `auto` on a machine without a GPU
        config_file = ACCELERATE_CONFIGS / "cpu_gloo.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(cfg.train.num_processes), "-m", "sft_core.launch", *args]


def _launch_distributed(cfg: PipelineConfig, tokens: dict, splits: dict, model_dir: str, folder: Path,
                        max_new_tokens: int, sink) -> dict:
    """Run `accelerate launch`, stream its output to the log and its metrics to the sink."""
    logger = get_run_logger()
    cfg_json, result_json = folder / "launch_config.json", folder / "launch_result.json"
    cfg_json.write_text(cfg.model_dump_json(), encoding="utf-8")
    result_json.unlink(missing_ok=True)  # never pick up the result of an earlier attempt
    cmd = accelerate_command(cfg, ["--config-json", str(cfg_json), "--model-dir", model_dir,
                                   "--train-data", tokens["train_ds"], "--eval-data", tokens["val_ds"],
                                   "--val-rows", splits["val"], "--max-new-tokens", str(max_new_tokens),
                                   "--output-dir", str(folder), "--result-json", str(result_json)])
    logger.info("launching: %s", " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    stop = threading.Event()
    tail = threading.Thread(target=_tail_metrics, args=(folder / "metrics.jsonl", sink, stop), daemon=True)
    tail.start()
    last_lines: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line and "it/s]" not in line and "s/it]" not in line:
                logger.info("[accelerate] %s", line[-500:])
                last_lines.append(line[-500:])
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the task was cancelled or crashed: do not leave the ranks training
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop.set()
        tail.join(timeout=10)
    if code != 0 or not result_json.exists():
        detail = "\n".join(last_lines)
        config_file = Path(cmd[cmd.index("--config_file") + 1]).name
        raise RuntimeError(f"accelerate launch ({config_file}, {cfg.train.num_processes} processes) exited with {code} "
                           f"without writing {result_json.name}; last output:\n{detail}")
    return json.loads(result_json.read_text(encoding="utf-8"))


def _tail_metrics(path: Path, sink, stop: threading.Event) -> None:
    offset = path.stat().st_size if path.exists() else 0
    while True:
        finished = stop.is_set()
        if path.exists():
            with path.open("r", encoding="utf-8") as f:
                f.seek(offset)
                for line in f:
                    if line.endswith("\n"):
                        rec = json.loads(line)
                        sink(int(rec.pop("step")), rec)
                        offset += len(line.encode("utf-8"))
        if finished:
            return
        time.sleep(1.0)
