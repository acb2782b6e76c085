"""Data stage tasks: ingest, validate, split, tokenize. Thin wrappers over `sft_core.stages`."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from sft_core import stages
from sft_core.config import PipelineConfig
from tasks.common import task_options


@task(name="ingest", retries=2, retry_delay_seconds=[10, 60], **task_options())
def ingest(cfg: PipelineConfig, folder: Path, refresh: bool = False) -> dict:
    """Fetch the rows (ModelScope / Hugging Face / local) and fingerprint them."""
    return stages.run_stage(folder, lambda f: stages.ingest(cfg, f), refresh=refresh)


@task(name="validate", **task_options())
def validate(cfg: PipelineConfig, raw: dict, folder: Path, refresh: bool = False) -> dict:
    """Great Expectations suite; policy fail or quarantine."""
    return stages.run_stage(folder, lambda f: stages.validate(cfg, raw, f), refresh=refresh)


@task(name="split", **task_options())
def split(cfg: PipelineConfig, valid: dict, folder: Path, refresh: bool = False) -> dict:
    """Deterministic 90/10 split."""
    return stages.run_stage(folder, lambda f: stages.split(cfg, valid, f), refresh=refresh)


@task(name="tokenize", **task_options())
def tokenize(cfg: PipelineConfig, splits: dict, model_dir: str, folder: Path, refresh: bool = False) -> dict:
    """Chat-format SFT examples with prompt-masked labels ending on <|im_end|>."""
    return stages.run_stage(folder, lambda f: stages.tokenize(cfg, splits, model_dir, f), refresh=refresh)
