"""Tracking tasks: what the stages produced, into the MLflow run and the registry.

Idempotent, never cached: each checks a marker tag on the run and skips what is already logged,
so a re-run or a resumed crash never logs twice.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from prefect import get_run_logger, task

from sft_core.config import PipelineConfig
from sft_core.metrics import (
    EVAL_EXAMPLES,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    EVAL_TOKEN_ACCURACY,
    FORMAT_OK,
    GEN,
    HARNESS,
    NUM_SAMPLES,
    ROUGE_L,
    STOP,
    USABLE,
    base,
    bounds,
    has_interval,
    is_base,
    own_and_base,
)
from sft_core.model_card import CardFacts, render_model_card
from sft_core.report import build_report
from sft_core.results import Evaluated, Generated, Harnessed, Ingested, Split, Tokenized, Trained, Validated
from tasks import tracking
from tasks.stage import can_heal


def locked(fn):
    """Run a tracking task under its MLflow run's lock: two identical runs at once log each thing once."""
    @functools.wraps(fn)
    def wrapper(cfg: PipelineConfig, run_id: str, *args, **kwargs):
        with tracking.run_lock(cfg, run_id):
            return fn(cfg, run_id, *args, **kwargs)

    return wrapper


# the figures a registered version carries as tags (with their intervals, shown as the table shows them)
HEADLINE = (EVAL_LOSS, EVAL_PERPLEXITY, FORMAT_OK, STOP, USABLE, ROUGE_L, NUM_SAMPLES, base(FORMAT_OK))


@task(name="track-data")
@locked
def track_data(cfg: PipelineConfig, run_id: str, raw: Ingested, valid: Validated, splits: Split,
               tokens: Tokenized) -> None:
    """Config, lineage, validation report + Data Docs, token statistics."""
    marker = splits.train_digest + tokens.folder
    if tracking.is_logged(cfg, run_id, "qwen_sft.logged.data", marker):
        return
    tracking.log_config(cfg, run_id)
    tracking.log_dataset_inputs(cfg, run_id, splits, raw.location)
    tracking.log_validation(cfg, run_id, valid.report, valid.docs, valid.quarantine)
    tracking.log_artifact(cfg, run_id, f"{tokens.folder}/stats.json", "data")
    tracking.log_artifact(cfg, run_id, splits.sets, "evaluation")  # which questions selected, which report
    tok = tokens.stats
    # constants of the run's data, not curves: tags (beside the lineage), so the metrics view opens on what moves
    tracking.set_tags(cfg, run_id, {
        "data.rows_raw": raw.rows, "data.rows_valid": valid.good_rows, "data.rows_quarantined": valid.bad_rows,
        "data.rows_train": splits.train_rows, "data.rows_val": splits.val_rows,
        "data.rows_selection": splits.select_rows, "data.rows_report": splits.report_rows,
        "data.truncated": tok["train"]["truncated"] + tok["val"]["truncated"],
        "data.train_supervised_tokens": tok["train"]["supervised_tokens"],
        "qwen_sft.logged.data": marker,
    })


@task(name="track-training")
@locked
def track_training(cfg: PipelineConfig, run_id: str, trained: Trained) -> None:
    """Per-step curves (re-sent if an outage lost any), loss-curve PNG, checkpoints."""
    marker = f"{trained.folder}:{Path(trained.metrics_file).stat().st_size}"
    if tracking.is_logged(cfg, run_id, "qwen_sft.logged.train", marker):
        return
    sent = tracking.sync_training_metrics(cfg, run_id, trained.metrics_file)
    if sent:
        get_run_logger().info("sent %d training metric points to MLflow that the live logger had not", sent)
    tracking.log_loss_curve(cfg, run_id, trained.metrics_file)
    tracking.log_checkpoints(cfg, run_id, trained)
    tracking.log_metrics(cfg, run_id, {"train/final_loss": trained.train_loss, "train/global_step": trained.global_step,
                                       "train/seconds": trained.seconds}, step=trained.global_step)
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.train": marker})


def final_metrics(evaluated: Evaluated, generated: Generated, base_eval: Evaluated | None = None,
                  base_gen: Generated | None = None) -> dict[str, float]:
    """The run's headline figures, all on the report questions: `eval/…` and `gen/…` of the fine-tune (rates and
    ROUGE-L with `_lo` / `_hi`), `base/eval/…`, `base/gen/…` of its base."""
    def named(ev: Evaluated, gen: Generated) -> dict[str, float]:
        m = ev.metrics
        out = {EVAL_LOSS: m["loss"], EVAL_PERPLEXITY: m["perplexity"], EVAL_TOKEN_ACCURACY: m["token_accuracy"],
               EVAL_EXAMPLES: m["examples"]}
        return out | {GEN + k: v for k, v in gen.metrics.items()}

    metrics = named(evaluated, generated)
    if base_eval and base_gen:
        metrics |= {base(k): v for k, v in named(base_eval, base_gen).items()}
    return metrics


@task(name="track-evaluation")
@locked
def track_evaluation(cfg: PipelineConfig, run_id: str, trained: Trained, metrics: dict[str, float],
                     splits: Split, evaluated: Evaluated, generated: Generated, base_eval: Evaluated | None,
                     base_gen: Generated | None) -> None:
    """Final figures at the last training step (the base's at step 0), one side-by-side predictions table, and the
    evaluation report (sets, figures with intervals, per-question outcomes: what the promotion gate pairs)."""
    marker = generated.folder + (base_gen.folder if base_gen else "")
    if tracking.is_logged(cfg, run_id, "qwen_sft.logged.eval", marker):
        return
    tracking.log_metrics(cfg, run_id, {k: v for k, v in metrics.items() if not is_base(k)}, step=trained.global_step)
    tracking.log_metrics(cfg, run_id, {k: v for k, v in metrics.items() if is_base(k)}, step=0)
    tracking.log_predictions(cfg, run_id, generated.predictions, base_gen.predictions if base_gen else None)
    report = build_report(sets_file=splits.sets, metrics=metrics, predictions=generated.predictions,
                          losses=evaluated.losses, base_predictions=base_gen.predictions if base_gen else None,
                          base_losses=base_eval.losses if base_eval else None)
    tracking.log_json(cfg, run_id, report, tracking.REPORT_ARTIFACT)
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.eval": marker})


@task(name="track-harness")
@locked
def track_harness(cfg: PipelineConfig, run_id: str, trained: Trained, harnessed: Harnessed) -> None:
    """lm-evaluation-harness figures under `harness/`, its results and samples as artifacts."""
    if tracking.is_logged(cfg, run_id, "qwen_sft.logged.harness", harnessed.folder):
        return
    tracking.log_metrics(cfg, run_id, {HARNESS + k: v for k, v in harnessed.metrics.items()},
                         step=trained.global_step)
    tracking.link_model_metrics(cfg, run_id, [HARNESS + k for k in harnessed.metrics])
    tracking.log_artifact(cfg, run_id, harnessed.results, "harness")
    tracking.log_artifact(cfg, run_id, harnessed.samples, "harness")
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.harness": harnessed.folder})


def card_facts(cfg: PipelineConfig, raw: Ingested, splits: Split, trained: Trained, metrics: dict[str, float],
               generated: Generated, *, config: str | None = None, overrides: list[str] | None = None) -> CardFacts:
    """What the model card of this run's version says; `config` and `overrides` as the run was given them."""
    lines = Path(generated.predictions).read_text(encoding="utf-8").splitlines()
    fine_tuned, base_figures = own_and_base(metrics)
    kept = Path(trained.best_checkpoint).name.rpartition("-")[2] if trained.best_checkpoint else ""
    return CardFacts(
        registered_name=cfg.registry.name, version=None, dataset_digest=raw.digest, train_rows=splits.train_rows,
        val_rows=splits.val_rows, fine_tuned=fine_tuned, base=base_figures,
        samples=[json.loads(x) for x in lines[:3] if x.strip()], train_steps=trained.global_step,
        selected_by=trained.selected_by, select_rows=splits.select_rows, report_rows=splits.report_rows,
        kept_step=int(kept) if kept.isdigit() else None, config=config, overrides=list(overrides or []),
    )


@task(name="register", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=can_heal)
@locked
def register(cfg: PipelineConfig, run_id: str, trained: Trained, metrics: dict, max_new_tokens: int,
             facts: CardFacts) -> tracking.Registration:
    """Log the model with its card, register a version, alias `candidate`, card as README.md and description."""
    model_uri = tracking.log_model(cfg, run_id, trained.final_model_dir, max_new_tokens=max_new_tokens,
                                   card=render_model_card(cfg, facts), step=trained.global_step)
    tracking.link_model_metrics(cfg, run_id, [k for k in metrics if not is_base(k)])
    headline = {k: metrics[k] for name in HEADLINE if name in metrics
                for k in ((name, *bounds(name)) if has_interval(name) else (name,)) if k in metrics}
    registered = tracking.register(cfg, run_id, model_uri, headline, trained.key)
    facts.version = registered.version
    tracking.attach_model_card(cfg, model_uri, registered.version, render_model_card(cfg, facts))
    return registered
