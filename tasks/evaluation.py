"""Evaluation tasks: validation metrics, sample generation (fine-tune and base), lm-evaluation-harness."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from sft_core import stages
from sft_core.config import PipelineConfig
from tasks.common import task_options


@task(name="evaluate", **task_options())
def evaluate(cfg: PipelineConfig, model_dir: str, tokens: dict, folder: Path, refresh: bool = False) -> dict:
    """Loss, perplexity and token accuracy on the whole validation split."""
    return stages.run_stage(folder, lambda f: stages.evaluate(cfg, model_dir, tokens, f), refresh=refresh)


@task(name="generate", **task_options())
def generate(cfg: PipelineConfig, model_dir: str, splits: dict, folder: Path, max_new_tokens: int, base: bool = False,
             refresh: bool = False) -> dict:
    """Batched generation on validation questions; think/answer parsing; format, ROUGE-L, stop rate."""
    return stages.run_stage(folder, lambda f: stages.generate(cfg, model_dir, splits, f, max_new_tokens, base=base),
                            refresh=refresh)


@task(name="harness", **task_options())
def harness(cfg: PipelineConfig, model_dir: str, splits: dict, folder: Path, max_new_tokens: int,
            refresh: bool = False) -> dict:
    """lm-evaluation-harness (an evaluator this project did not write) on the validation questions."""
    return stages.run_stage(folder, lambda f: stages.harness(cfg, model_dir, splits, f, max_new_tokens), refresh=refresh)
