"""Evaluation tasks: validation metrics and sample generation (fine-tune, optionally base)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from sft_core import stages
from sft_core.config import PipelineConfig
from tasks.common import task_options


@task(name="evaluate", **task_options())
def evaluate(cfg: PipelineConfig, trained: dict, tokens: dict, folder: Path, refresh: bool = False) -> dict:
    """Loss, perplexity and token accuracy on the whole validation split."""
    return stages.run_stage(folder, lambda f: stages.evaluate(cfg, trained, tokens, f), refresh=refresh)


@task(name="generate", **task_options())
def generate(cfg: PipelineConfig, model_dir: str, splits: dict, folder: Path, name: str = "predictions",
             refresh: bool = False) -> dict:
    """Batched generation on validation questions; think/answer parsing; format, ROUGE-L, stop rate."""
    return stages.run_stage(folder, lambda f: stages.generate(cfg, model_dir, splits, f, name=name), refresh=refresh)
