"""The `finetune` flow: one line per stage, top to bottom, like alignment-handbook's sft.py.

ingest -> validate -> split -> base-model -> tokenize -> train -> evaluate -> generate
(-> evaluate-base -> generate-base) -> register (-> harness)

Each stage is declared once in `sft_core.stages` and run by the one generic task of
`tasks.stage`, cached on its folder's `_DONE.json`; the tracking tasks (`tasks.track`) are
idempotent. One MLflow run per (config, data): a re-run or a resumed crash continues it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from sft_core.config import PipelineConfig
from sft_core.preflight import preflight
from sft_core.process import configure_process
from sft_core.sources import parse_data_source, parse_model_source
from sft_core.stages import generation_budget
from tasks import track, tracking
from tasks.stage import StageRunner


def run_name(cfg: PipelineConfig) -> str:
    return (f"{parse_model_source(cfg.model.source).name}--{parse_data_source(cfg.data.source).name}--"
            f"{cfg.config_hash()[:8]}")


def _flow_run_name() -> str:
    return run_name(PipelineConfig.model_validate(flow_run.parameters["config"]))


@flow(name="finetune", flow_run_name=_flow_run_name, persist_result=True)
def finetune(config: dict, refresh: bool = False) -> dict:
    """Fine-tune, evaluate, and register a candidate for one resolved config."""
    configure_process()
    log = get_run_logger()
    cfg = PipelineConfig.model_validate(config)
    uri = tracking.check_reachable(cfg)  # fails in seconds, before any data or training work
    tracking.warm_store(cfg)  # a new embedded store is created by a child process meanwhile
    preflight(cfg)
    stage = StageRunner(cfg, refresh=refresh)

    raw = stage("ingest")
    # the MLflow run starts in the background: the data stages below do not need it
    background = ThreadPoolExecutor(1, thread_name_prefix="mlflow-run")
    pending = background.submit(tracking.start_or_resume_run, cfg, f"{cfg.config_hash()}-{raw.digest[:16]}",
                                run_name(cfg), _run_tags(cfg, raw.digest))
    background.shutdown(wait=False)
    run_id = None
    try:
        valid = stage("validate", raw=raw)
        splits = stage("split", valid=valid)
        base = stage("base-model")
        tokens = stage("tokenize", splits=splits, model=base)
        budget = generation_budget(cfg, tokens)
        if budget.warning:
            log.warning(budget.warning)
        new_tokens = budget.max_new_tokens
        run_id, resumed = pending.result()
        log.info("MLflow run %s (%s) at %s", run_id, "continued" if resumed else "new", uri)
        track.track_data(cfg, run_id, raw, valid, splits, tokens)
        trained = stage("train", tokens=tokens, splits=splits, model=base, max_new_tokens=new_tokens, run_id=run_id)
        track.track_training(cfg, run_id, trained)
        evaluated = stage("evaluate", model=trained, tokens=tokens)
        generated = stage("generate", model=trained, splits=splits, max_new_tokens=new_tokens)
        base_eval = stage("evaluate-base", model=base, tokens=tokens) if cfg.eval.compare_base else None
        base_gen = (stage("generate-base", model=base, splits=splits, max_new_tokens=new_tokens)
                    if cfg.eval.compare_base else None)
        metrics = track.final_metrics(evaluated, generated, base_eval, base_gen)
        track.track_evaluation(cfg, run_id, trained, metrics, generated, base_gen)
        registered = None
        if cfg.registry.enabled and cfg.tracking.log_model:
            facts = track.card_facts(cfg, raw, splits, trained, metrics, generated)
            registered = stage.timed("register", track.register, cfg, run_id, trained, metrics, new_tokens, facts)
        if cfg.eval.harness:
            harnessed = stage("harness", model=trained, splits=splits, max_new_tokens=new_tokens)
            track.track_harness(cfg, run_id, trained, harnessed)
            metrics |= {f"harness/{k}": v for k, v in harnessed.metrics.items()}
        promoted = None
        if registered and cfg.registry.auto_promote:
            from flows.promote import promote_gate

            promoted = promote_gate(cfg, reason="auto_promote after retraining")
        tracking.set_tags(cfg, run_id, {"prefect.flow_run_id": str(flow_run.id), "qwen_sft.stages": _stage_summary(stage.rows)})
        tracking.end_run(cfg, run_id, "FINISHED")
    except BaseException:
        run_id = run_id or _started_run(pending)
        if run_id:
            tracking.end_run(cfg, run_id, "FAILED")
        raise
    retrained = any(r["stage"] == "train" and r["status"] == "ran" for r in stage.rows)
    if not retrained:
        log.info("data digest and config unchanged since the last run: training skipped (cached)")
    summary = {"run_id": run_id, "run_url": tracking.run_url(cfg, run_id), "tracking_uri": uri, "stages": stage.rows,
               "metrics": metrics, "registered": registered, "promoted": promoted, "retrained": retrained,
               "dataset_digest": raw.digest, "config_hash": cfg.config_hash(), "train_steps": trained.global_step}
    create_markdown_artifact(markdown=_markdown(cfg, summary), key="finetune-summary",
                             description="qwen-sft run summary")
    return summary


def run_in_process(config: dict, refresh: bool = False) -> dict:
    """Run the `finetune` flow in this process, as `qwen-sft run` does.

    Against Prefect's ephemeral server (no API URL configured), flow-run heartbeats are off:
    that server lives and dies with this process, so they could detect no crash, and joining
    Prefect's heartbeat thread (it sleeps in 1-second steps) added ~0.5 s to every run.
    Runs against a server keep them.
    """
    from prefect.settings import temporary_settings

    with temporary_settings(updates=in_process_settings()):
        return finetune(config=config, refresh=refresh)


def in_process_settings() -> dict:
    """Prefect setting overrides for an in-process run: none when a server is configured."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings

    if get_current_settings().api.url:
        return {}
    return {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def _started_run(pending: Future) -> str | None:
    """The run id of a background run start, or None if the start itself failed."""
    try:
        return pending.result()[0]
    except Exception:  # the stage error is the one to report; the run start's own error is secondary
        return None


def _run_tags(cfg: PipelineConfig, digest: str) -> dict[str, str]:
    from sft_core.modeling import resolve_device

    return {
        "git_commit": tracking.git_commit(),
        "dataset_digest": digest,
        "dataset_source": cfg.data.source,
        "config_hash": cfg.config_hash(),
        "prefect.flow_run_id": str(flow_run.id),
        "device": resolve_device(cfg.train.device),
        "base_model": cfg.model.source,
    }


def comparison_rows(metrics: dict[str, float]) -> list[tuple[str, str, str]]:
    """(metric, base, fine-tuned) for the run's figures, one rounding rule (`sft_core.model_card.fmt`)."""
    from sft_core.model_card import fmt

    digits = {"eval/perplexity": 2, "gen/mean_new_tokens": 1, "gen/mean_think_chars": 1, "gen/mean_answer_chars": 1,
              "gen/num_samples": 0, "harness/num_samples": 0}
    return [(k, fmt(metrics.get(f"base/{k}"), digits.get(k, 4)), fmt(v, digits.get(k, 4)))
            for k, v in metrics.items() if not k.startswith("base/")]


def _stage_summary(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['stage']}:{r['status']}" for r in rows)


def _markdown(cfg: PipelineConfig, s: dict) -> str:
    lines = [f"# qwen-sft run `{cfg.name}`", "", f"MLflow run: [{s['run_id']}]({s['run_url']})", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in s["stages"]]
    lines += ["", "| metric | base | fine-tuned |", "|---|---|---|"]
    lines += [f"| {name} | {b} | {t} |" for name, b, t in comparison_rows(s["metrics"])]
    if s["registered"]:
        r = s["registered"]
        lines += ["", f"Registered `{r['name']}` version {r['version']} as `@{r['alias']}`."]
    return "\n".join(lines)
