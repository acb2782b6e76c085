"""The `finetune` flow: one line per stage, top to bottom, like alignment-handbook's sft.py.

ingest -> validate -> split -> base model -> tokenize -> train -> evaluate -> generate -> register

Stage tasks are cached on their folder key (input digests + config section + code version);
tracking tasks are idempotent. One MLflow run per (config, data): a re-run or a resumed
crash continues the same run.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# before torch is imported (it reads this once): CPU tensors >= 2 MB on huge pages, so that training's
# freed-memory policy (sft_core.train.return_freed_memory_to_os) does not pay a page fault per 4 KiB
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from sft_core import stages  # noqa: E402
from sft_core.config import PipelineConfig  # noqa: E402
from sft_core.preflight import preflight  # noqa: E402
from tasks import data as data_tasks  # noqa: E402
from tasks import evaluation, model, registry, tracking, training  # noqa: E402


def _run_name() -> str:
    params = flow_run.parameters
    cfg = PipelineConfig.model_validate(params["config"])
    model_name = cfg.model.source.split("://")[-1].rstrip("/").split("/")[-1]
    dataset = cfg.data.source.split("://")[-1].rstrip("/").split("/")[-1].removesuffix(".jsonl")
    return f"{model_name}--{dataset}--{cfg.config_hash()[:8]}"


class StageTimer:
    """(stage, cached or ran, seconds) rows for the result table."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __call__(self, stage: str, fn, *args, **kwargs):
        started = time.perf_counter()
        state = fn(*args, return_state=True, **kwargs)
        result = state.result()
        cached = state.name == "Cached" or (isinstance(result, dict) and result.get("reused", False))
        self.rows.append({"stage": stage, "status": "cached" if cached else "ran",
                          "seconds": round(time.perf_counter() - started, 2)})
        return result


@flow(name="finetune", flow_run_name=_run_name, persist_result=True)
def finetune(config: dict, refresh: bool = False) -> dict:
    """Fine-tune, evaluate, and register a candidate for one resolved config."""
    log = get_run_logger()
    cfg = PipelineConfig.model_validate(config)
    uri = tracking.check_reachable(cfg)  # fails in seconds, before any data or training work
    tracking.warm_store(cfg)  # a new embedded store is created by a child process meanwhile
    preflight(cfg)
    step = StageTimer()
    key = stages.ingest_key(cfg)
    raw = step("ingest", data_tasks.ingest, cfg, stages.stage_dir(cfg, "ingest", key or "latest"), refresh=refresh or key is None)
    run_key = f"{cfg.config_hash()}-{raw['digest'][:16]}"
    # the MLflow run starts in the background: the data stages below do not need it
    background = ThreadPoolExecutor(1, thread_name_prefix="mlflow-run")
    pending = background.submit(tracking.start_or_resume_run, cfg, run_key, _run_name(), _run_tags(cfg, raw))
    background.shutdown(wait=False)
    run_id = None
    try:
        valid = step("validate", data_tasks.validate, cfg, raw, stages.stage_dir(cfg, "validate", stages.validate_key(cfg, raw)), refresh=refresh)
        splits = step("split", data_tasks.split, cfg, valid, stages.stage_dir(cfg, "split", stages.split_key(cfg, valid)), refresh=refresh)
        model_dir = step("base-model", model.base_model, cfg)["model_dir"]
        tok_key = stages.tokenize_key(cfg, splits)
        tokens = step("tokenize", data_tasks.tokenize, cfg, splits, model_dir, stages.stage_dir(cfg, "tokenize", tok_key), refresh=refresh)
        budget = stages.generation_budget(cfg, tokens)
        if budget.warning:
            log.warning(budget.warning)
        new_tokens = budget.max_new_tokens
        run_id, resumed = _await_run(pending)
        log.info("MLflow run %s (%s) at %s", run_id, "continued" if resumed else "new", uri)
        registry.track_data(cfg, run_id, raw, valid, splits, tokens)
        trn_key = stages.train_key(cfg, tok_key, new_tokens)
        trained = step("train", training.train, cfg, tokens, splits, model_dir, stages.stage_dir(cfg, "train", trn_key),
                       new_tokens, run_id=run_id, refresh=refresh)
        registry.track_training(cfg, run_id, trained)
        final_dir = trained["final_model_dir"]
        evaluated = step("evaluate", evaluation.evaluate, cfg, final_dir, tokens,
                         stages.stage_dir(cfg, "evaluate", stages.evaluate_key(cfg, trn_key, tok_key)), refresh=refresh)
        generated = step("generate", evaluation.generate, cfg, final_dir, splits,
                         stages.stage_dir(cfg, "generate", stages.generate_key(cfg, trn_key, splits, new_tokens)), new_tokens,
                         refresh=refresh)
        base_eval = base_gen = None
        if cfg.eval.compare_base:
            base_eval = step("evaluate-base", evaluation.evaluate, cfg, model_dir, tokens,
                             stages.stage_dir(cfg, "evaluate", stages.evaluate_key(cfg, None, tok_key)), refresh=refresh)
            base_gen = step("generate-base", evaluation.generate, cfg, model_dir, splits,
                            stages.stage_dir(cfg, "generate", stages.generate_key(cfg, None, splits, new_tokens)), new_tokens,
                            base=True, refresh=refresh)
        metrics = registry.final_metrics(evaluated, generated, base_eval, base_gen)
        registry.track_evaluation(cfg, run_id, trained, metrics, generated, base_gen)
        registered = None
        if cfg.registry.enabled and cfg.tracking.log_model:
            facts = registry.card_facts(cfg, raw, splits, trained, metrics, generated)
            registered = step("register", registry.register, cfg, run_id, trained, metrics, trn_key, new_tokens, facts)
        if cfg.eval.harness:
            harnessed = step("harness", evaluation.harness, cfg, final_dir, splits,
                             stages.stage_dir(cfg, "harness", stages.harness_key(cfg, trn_key, splits, new_tokens)),
                             new_tokens, refresh=refresh)
            registry.track_harness(cfg, run_id, trained, harnessed)
            metrics |= {f"harness/{k}": v for k, v in harnessed["metrics"].items()}
        promoted = None
        if registered and cfg.registry.auto_promote:
            from flows.promote import promote_gate

            promoted = promote_gate(cfg, reason="auto_promote after retraining")
        tracking.set_tags(cfg, run_id, {"prefect.flow_run_id": str(flow_run.id), "qwen_sft.stages": _stage_summary(step.rows)})
        tracking.end_run(cfg, run_id, "FINISHED")
    except BaseException:
        run_id = run_id or _started_run(pending)
        if run_id:
            tracking.end_run(cfg, run_id, "FAILED")
        raise
    url = tracking.run_url(cfg, run_id)
    retrained = any(r["stage"] == "train" and r["status"] == "ran" for r in step.rows)
    if not retrained:
        log.info("data digest and config unchanged since the last run: training skipped (cached)")
    summary = {"run_id": run_id, "run_url": url, "tracking_uri": uri, "stages": step.rows, "metrics": metrics,
               "registered": registered, "promoted": promoted, "retrained": retrained,
               "dataset_digest": raw["digest"], "config_hash": cfg.config_hash(), "train_steps": trained["global_step"]}
    create_markdown_artifact(markdown=_markdown(cfg, summary), key="finetune-summary",
                             description="qwen-sft run summary")
    return summary


def run_in_process(config: dict, refresh: bool = False) -> dict:
    """Run the `finetune` flow in this process, as `qwen-sft run` does.

    Against Prefect's ephemeral server (no API URL configured), flow-run heartbeats are off:
    that server lives and dies with this process, so they could detect no crash, and joining
    Prefect's heartbeat thread (it sleeps in 1-second steps) added ~0.5 s to every run, half
    of a cached re-run (BENCHMARKS.md section 3). Runs against a server keep them.
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


def _await_run(pending: Future) -> tuple[str, bool]:
    """(run id, resumed) of the background run start; waits for it if it is still going.

    A function of its own so that bench/pipeline.py can time the wait (the critical-path part of the run start).
    """
    return pending.result()


def _started_run(pending: Future) -> str | None:
    """The run id of a background run start, or None if the start itself failed."""
    try:
        return pending.result()[0]
    except Exception:  # the stage error is the one to report; the run start's own error is secondary
        return None


def _run_tags(cfg: PipelineConfig, raw: dict) -> dict[str, str]:
    from sft_core.modeling import resolve_device

    return {
        "git_commit": tracking.git_commit(),
        "dataset_digest": raw["digest"],
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


def _stage_summary(rows: list[dict]) -> str:
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
