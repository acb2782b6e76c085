"""The `promote` flow: gate the candidate against production, move the alias, keep `previous`."""

from __future__ import annotations

from prefect import flow, get_run_logger

from sft_core.config import PipelineConfig
from tasks import tracking


def promote_gate(cfg: PipelineConfig, *, version: int | None = None, alias: str = "candidate", force: bool = False,
                 reason: str = "") -> dict:
    """Plain function (the CLI and the fine-tune flow's auto_promote call it)."""
    return tracking.promote(cfg, version=version, alias=alias, force=force, reason=reason)


@flow(name="promote", log_prints=True)
def promote(config: dict, version: int | None = None, alias: str = "candidate", force: bool = False,
            reason: str = "") -> dict:
    cfg = PipelineConfig.model_validate(config)
    result = promote_gate(cfg, version=version, alias=alias, force=force, reason=reason)
    get_run_logger().info("production -> version %s (previous: %s)", result["production"], result["previous"])
    return result
