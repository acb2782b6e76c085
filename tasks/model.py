"""Base-model task: download (ModelScope / Hugging Face) or build (tiny://), with retries."""

from __future__ import annotations

from prefect import task

from sft_core.config import PipelineConfig
from sft_core.modeling import model_is_local, resolve_model_dir


@task(name="base-model", retries=2, retry_delay_seconds=[10, 60])
def base_model(cfg: PipelineConfig) -> dict:
    """A local folder with the base model's safetensors and tokenizer (downloads are cached)."""
    reused = model_is_local(cfg.model, cfg.workdir_path)
    return {"model_dir": str(resolve_model_dir(cfg.model, cfg.workdir_path)), "reused": reused}
