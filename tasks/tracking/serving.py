"""What serving needs from MLflow: the URI of `NAME@alias` and its version; the local UI's server command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sft_core.config import PRODUCTION, PipelineConfig
from sft_core.errors import PromotionError
from tasks.tracking.store import artifact_root, check_reachable, client, tracking_uri


def model_uri(cfg: PipelineConfig, alias: str = PRODUCTION) -> str:
    return f"models:/{cfg.registry.name}@{alias}"


def check_alias(cfg: PipelineConfig, alias: str = PRODUCTION) -> int:
    """The version behind `@alias`, or a PromotionError that says how to get one."""
    uri = check_reachable(cfg)
    try:
        return int(client(cfg).get_model_version_by_alias(cfg.registry.name, alias).version)
    except Exception as exc:
        raise PromotionError(f"registered model '{cfg.registry.name}' (registry.name) has no @{alias} version in "
                             f"{uri}; run `qwen-sft run`, then `qwen-sft promote`") from exc


def ui_command(cfg: PipelineConfig, port: int = 5000) -> tuple[list[str], dict[str, str]]:
    """`mlflow server` for one local user on 127.0.0.1: one web worker and no job runner.

    MLflow 3's defaults (4 uvicorn workers, a huey job runner with 7 consumers for GenAI scoring and
    trace archival) cost ~14 processes and ~2.3 GB for a UI one person reads.
    """
    uri = tracking_uri(cfg)
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", uri, "--workers", "1"]
    if artifact_root(cfg):
        argv += ["--default-artifact-root", artifact_root(cfg)]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return argv, env


def served_name(cfg: PipelineConfig, model: str | None = None) -> str:
    """The model id clients name (`/v1/models`): the registered model's name, for the alias or a `models:/` URI;
    a folder's name otherwise."""
    if model is None:
        return cfg.registry.name
    if model.startswith("models:/"):
        return model.removeprefix("models:/").split("@")[0].split("/")[0]
    return Path(model.rstrip("/")).name or "model"
