"""Tracking and registry tasks: idempotent, never cached (they check what the run already has)."""

from __future__ import annotations

from prefect import get_run_logger, task

from sft_core.config import PipelineConfig
from tasks import tracking


@task(name="track-data")
def track_data(cfg: PipelineConfig, run_id: str, raw: dict, valid: dict, splits: dict, tokens: dict) -> None:
    """Config, lineage, validation report + Data Docs, token statistics."""
    if tracking.is_logged(cfg, run_id, "qwen_sft.logged.data", splits["train_digest"] + tokens["folder"]):
        return
    tracking.log_config(cfg, run_id)
    tracking.log_dataset_inputs(cfg, run_id, splits, raw["location"])
    tracking.log_artifact(cfg, run_id, valid["report"], "validation") if valid.get("report") else None
    tracking.log_artifact(cfg, run_id, valid["docs"], "validation/data_docs") if valid.get("docs") else None
    tracking.log_artifact(cfg, run_id, valid["quarantine"], "validation") if valid.get("quarantine") else None
    tracking.log_artifact(cfg, run_id, f"{tokens['folder']}/stats.json", "data")
    tok = tokens["stats"]
    tracking.log_metrics(cfg, run_id, {
        "data/rows_raw": raw["rows"], "data/rows_valid": valid["good_rows"], "data/rows_quarantined": valid["bad_rows"],
        "data/rows_train": splits["train_rows"], "data/rows_val": splits["val_rows"],
        "data/truncated": tok["train"]["truncated"] + tok["val"]["truncated"],
        "data/train_supervised_tokens": tok["train"]["supervised_tokens"],
    })
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.data": splits["train_digest"] + tokens["folder"]})


@task(name="track-training")
def track_training(cfg: PipelineConfig, run_id: str, trained: dict) -> None:
    """Per-step curves (re-sent if an outage lost any), loss-curve PNG, checkpoints."""
    from pathlib import Path

    marker = f"{trained['folder']}:{Path(trained['metrics_file']).stat().st_size}"
    if tracking.is_logged(cfg, run_id, "qwen_sft.logged.train", marker):
        return
    sent = tracking.sync_training_metrics(cfg, run_id, trained["metrics_file"])
    if sent:
        get_run_logger().info("sent %d training metric points to MLflow that the live logger had not", sent)
    tracking.log_loss_curve(cfg, run_id, trained["metrics_file"])
    tracking.log_checkpoints(cfg, run_id, trained)
    tracking.log_metrics(cfg, run_id, {"train/final_loss": trained["train_loss"], "train/global_step": trained["global_step"],
                                       "train/seconds": trained["seconds"]})
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.train": marker})


@task(name="track-evaluation")
def track_evaluation(cfg: PipelineConfig, run_id: str, evaluated: dict, generated: dict, base: dict | None) -> dict:
    """Final eval/gen metrics and the predictions table (think and answer in their own columns)."""
    m = evaluated["metrics"]
    g = generated["metrics"]
    metrics = {"eval/loss": m["loss"], "eval/perplexity": m["perplexity"], "eval/token_accuracy": m["token_accuracy"],
               **{f"gen/{k}": v for k, v in g.items()}}
    if base:
        metrics.update({f"base/gen/{k}": v for k, v in base["metrics"].items()})
    marker = generated["folder"] + (base["folder"] if base else "")
    if tracking.is_logged(cfg, run_id, "qwen_sft.logged.eval", marker):
        return metrics
    tracking.log_metrics(cfg, run_id, metrics, step=0)
    tracking.log_predictions(cfg, run_id, generated["predictions"])
    if base:
        tracking.log_predictions(cfg, run_id, base["predictions"], artifact_file="base_predictions.json")
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.eval": marker})
    return metrics


@task(name="register", retries=2, retry_delay_seconds=[5, 30])
def register(cfg: PipelineConfig, run_id: str, trained: dict, metrics: dict, train_key: str) -> dict:
    """Log the model from its folder (transformers flavor), register a version, alias `candidate`."""
    model_uri = tracking.log_model(cfg, run_id, trained["final_model_dir"])
    headline = {k: metrics[k] for k in ("eval/loss", "eval/perplexity", "gen/format_ok_rate", "gen/rouge_l") if k in metrics}
    return {**tracking.register(cfg, run_id, model_uri, headline, train_key), "model_uri": model_uri}
