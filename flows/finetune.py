"""The `finetune` flow: one line per stage, top to bottom, like alignment-handbook's sft.py.

ingest -> base-model -> validate -> split -> tokenize -> train -> evaluate -> generate
(-> evaluate-base -> generate-base) -> register (-> harness)

Each stage is declared once in `sft_core.stages` and run by the one generic task of
`tasks.stage`, cached on its folder's `_DONE.json`; the tracking tasks (`tasks.track`) are
idempotent. One MLflow run per (config, data): a re-run or a resumed crash continues it.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

from filelock import FileLock
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
from pydantic import Field

from sft_core.checkpoints import check_registrable
from sft_core.config import (
    PipelineConfig,
    load_config,
    overrides_between,
    redact_uri,
    split_secrets,
    stable_hash,
    where_it_runs,
)
from sft_core.errors import DataValidationError
from sft_core.harness import lm_eval_missing
from sft_core.metrics import (
    BASE,
    EVAL_EXAMPLES,
    HARNESS,
    HARNESS_NUM_SAMPLES,
    NUM_SAMPLES,
    SCORE,
    base,
    fmt,
    is_bound,
    sample_size,
    shown,
)
from sft_core.modeling import resolve_device
from sft_core.preflight import preflight
from sft_core.process import configure_process
from sft_core.results import Ingested
from sft_core.stages import STAGES, generation_budget, prepare
from tasks import track, tracking
from tasks.stage import StageRow, StageRunner

ConfigRef = Annotated[str, Field(description="A preset shipped with the package (demo, qwen2.5-1.5b-medical) or the "
                                             "path of a YAML file on the machine that runs the flow.")]
Override = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=",
                                description="section.key=value, as `qwen-sft run --set` takes it "
                                            "(e.g. train.learning_rate=5e-5).")]
NAME_CHARS = 200


def describe(config: str, overrides: list[str] | None) -> str:
    """`demo train.learning_rate=0.001`: the preset (or file) and the overrides that change what it computes."""
    def shown(override: str) -> str:
        key, value = override.split("=", 1)
        try:
            value = json.loads(value) if value.startswith('"') else value  # a quoted text value reads unquoted
        except ValueError:
            pass
        return f"{key}={value}"

    kept = [shown(o) for o in overrides or [] if not where_it_runs(o.split("=", 1)[0].strip())]
    name = Path(config).name.removesuffix(".yaml")
    for i, item in enumerate(kept):  # run names are at most 250 characters in MLflow's database
        if len(name) + 1 + len(item) > NAME_CHARS - 12:
            return f"{name} (+{len(kept) - i} more)"
        name = f"{name} {item}"
    return name


def _flow_run_name() -> str:
    params = flow_run.parameters
    return f"{describe(params['config'], params.get('overrides'))} · {datetime.now():%Y-%m-%d %H:%M:%S}"


@dataclass
class RunSummary:
    """What a run did and found: the MLflow run, the stage table, the figures, the registry's answer."""

    run_id: str
    run_url: str
    tracking_uri: str
    needs_local_ui: bool
    stages: list[StageRow]
    metrics: dict[str, float]
    registered: tracking.Registration | None
    promoted: tracking.Promotion | None
    retrained: bool
    dataset_digest: str
    config_hash: str
    train_steps: int


def finetune_run(config: ConfigRef, overrides: list[Override] | None = None, refresh: bool = False) -> RunSummary:
    """Fine-tune, evaluate, and register a candidate: the preset `config` with `overrides`, as `qwen-sft run`.

    A bad key or value fails the run at once with the message `qwen-sft run` prints.
    """
    configure_process()
    log = get_run_logger()
    cfg = load_config(config, [*(overrides or []), *_SECRET_OVERRIDES.get()])
    uri = preflight(cfg, reachable=tracking.check_reachable)  # what `qwen-sft run` checked (once per process)
    tracking.warm_store(cfg)  # a new embedded store is created by a child process meanwhile
    no_harness = cfg.eval.harness and lm_eval_missing()  # a plain install: the run goes on without it, and says so
    if no_harness:
        log.warning("%s: eval.harness is skipped, the rest of the run goes on", no_harness)
    code = code_fingerprint()  # every stage's code version, computed here once (the task threads reuse them)
    stage = StageRunner(cfg, refresh=refresh)
    background = ThreadPoolExecutor(1, thread_name_prefix="mlflow-run")
    pending: list[Future] = []

    def start_run(raw: Ingested) -> None:
        # the MLflow run starts in the background: the data stages do not need it. One run per (config, data,
        # code): a code change computes new results, so it is a new run, not more points in an old one
        run_key = f"{cfg.config_hash()}-{raw.digest[:16]}-{code[:8]}"
        pending.append(background.submit(tracking.start_or_resume_run, cfg, run_key, describe(config, overrides),
                                         _run_tags(cfg, raw.digest, config, overrides), str(flow_run.id)))
        background.shutdown(wait=False)

    handle = None
    try:
        data = prepare(stage, ingested=start_run)
        raw, base, valid, splits, tokens = data.raw, data.model, data.valid, data.splits, data.tokens
        for warning in valid.warnings:
            log.warning("%s: %s", raw.location, warning)
        budget = generation_budget(cfg, tokens)
        if budget.warning:
            log.warning(budget.warning)
        new_tokens = budget.max_new_tokens
        handle = pending[0].result()
        run_id = handle.run_id
        log.info("MLflow run %s (%s) at %s", run_id, "continued" if handle.resumed else "new", redact_uri(uri))
        track.track_data(cfg, run_id, raw, valid, splits, tokens)
        trained = stage("train", tokens=tokens, splits=splits, model=base, max_new_tokens=new_tokens, run_id=run_id)
        track.track_training(cfg, run_id, trained)
        evaluated = stage("evaluate", model=trained, tokens=tokens)
        generated = stage("generate", model=trained, splits=splits, max_new_tokens=new_tokens)
        base_eval = stage("evaluate-base", model=base, tokens=tokens) if cfg.eval.compare_base else None
        base_gen = (stage("generate-base", model=base, splits=splits, max_new_tokens=new_tokens)
                    if cfg.eval.compare_base else None)
        metrics = track.final_metrics(evaluated, generated, base_eval, base_gen)
        track.track_evaluation(cfg, run_id, trained, metrics, splits, evaluated, generated, base_eval, base_gen)
        registered = None
        if cfg.registry.enabled and cfg.tracking.log_model:
            check_registrable(trained.final_model_dir, metrics)  # NaN eval loss or weights: never a candidate
            facts = track.card_facts(cfg, raw, splits, trained, metrics, generated, config=config, overrides=overrides)
            registered = stage.timed("register", track.register, cfg, run_id, trained, metrics, new_tokens, facts)
        if cfg.eval.harness and not no_harness:
            harnessed = stage("harness", model=trained, splits=splits, max_new_tokens=new_tokens)
            track.track_harness(cfg, run_id, trained, harnessed)
            metrics |= {f"{HARNESS}{k}": v for k, v in harnessed.metrics.items()}
        promoted = None
        if registered and registered.reused:
            log.info("version %s was registered by an earlier run of this config and data: no alias moved (%s)",
                     registered.version, tracking.aliases_line(registered.aliases))
        elif registered and cfg.registry.auto_promote:
            promoted = tracking.promote(cfg, reason="auto_promote after retraining")
        tracking.set_tags(cfg, run_id, {"qwen_sft.stages": ", ".join(f"{r.stage}:{r.status}" for r in stage.rows)})
        tracking.end_run(cfg, handle, "FINISHED")
    except BaseException as exc:
        handle = handle or (_started_run(pending[0]) if pending else None)
        if handle:
            _attach_failure(cfg, handle.run_id, exc)
            tracking.end_run(cfg, handle, "FAILED", redact_uri(f"{type(exc).__name__}: {exc}")[:500])
        raise
    if trained.reused:
        log.info("data digest and config unchanged since the last run: training skipped (cached)")
    summary = RunSummary(run_id, tracking.run_url(cfg, run_id), redact_uri(uri), tracking.needs_local_ui(cfg),
                         stage.rows, metrics, registered, promoted, not trained.reused, raw.digest, cfg.config_hash(),
                         trained.global_step)
    create_markdown_artifact(markdown=_markdown(cfg, summary), key="finetune-summary",
                             description="qwen-sft run summary")
    return summary


# The flow, `flows.finetune.finetune` (the deployments' entrypoint). Its function keeps a module name of its own:
# `qwen-sft serve` cloudpickles the flow into each run's process, and a function that its module names is pickled by
# reference (imported there with its module). Under the Flow's name it was pickled by value, with only the globals
# its body names: the ContextVar below among them could not be pickled, and the parameters' annotations
# (`ConfigRef`, `Override`) did not resolve there.
finetune = flow(name="finetune", flow_run_name=_flow_run_name, persist_result=True)(finetune_run)
finetune.__name__ = finetune.__qualname__ = "finetune"  # a deployment's entrypoint is `<module>.<__name__>`

# `--set` overrides that hold a credential reach an in-process flow here, never as flow-run parameters (which
# Prefect stores in its database in clear text)
_SECRET_OVERRIDES: ContextVar[tuple[str, ...]] = ContextVar("qwen_sft_secret_overrides", default=())


def run_in_process(config: str, overrides: list[str] | None = None, refresh: bool = False) -> RunSummary:
    """Run the `finetune` flow in this process, as `qwen-sft run` does.

    Against Prefect's ephemeral server (no API URL configured), flow-run heartbeats are off:
    that server lives and dies with this process, so they could detect no crash, and joining
    Prefect's heartbeat thread (it sleeps in 1-second steps) added ~0.5 s to every run.
    Runs against a server keep them.
    """
    public, secret = split_secrets(list(overrides or []))
    token = _SECRET_OVERRIDES.set(tuple(secret))
    try:
        with temporary_settings(updates=in_process_settings()):
            start_ephemeral_server()
            return finetune(config=config, overrides=public, refresh=refresh)
    finally:
        _SECRET_OVERRIDES.reset(token)


def start_ephemeral_server() -> None:
    """Start Prefect's ephemeral server under a file lock in PREFECT_HOME (none when a server is configured).

    Two `qwen-sft run` processes starting at once would both migrate the same SQLite database and one of
    them crashed; the second now waits for the first's migration and starts on a migrated database.
    """
    from prefect.server.api.server import SubprocessASGIServer  # the server's machinery: only when one is started

    settings = get_current_settings()
    if settings.api.url:
        return
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".qwen-sft-server-start.lock")):
        SubprocessASGIServer().start(timeout=settings.server.ephemeral.startup_timeout_seconds)


def run_config(cfg: PipelineConfig, preset: str = "demo", refresh: bool = False) -> RunSummary:
    """Run a resolved config in this process, as `preset` plus the overrides that make it (tests, benches)."""
    return run_in_process(preset, overrides_between(load_config(preset), cfg), refresh=refresh)


def in_process_settings() -> dict:
    """Prefect setting overrides for an in-process run: none when a server is configured."""
    if get_current_settings().api.url:
        return {}
    return {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def _attach_failure(cfg: PipelineConfig, run_id: str, exc: BaseException) -> None:
    """What a person needs to see why the run failed, on the run: a failed validation's report and Data Docs."""
    result = getattr(exc, "result", None)
    if not isinstance(exc, DataValidationError) or result is None:
        return
    try:
        tracking.log_validation(cfg, run_id, str(result.report_path) if result.report_path else None,
                                str(result.docs_path) if result.docs_path else None,
                                str(result.quarantine_path) if result.quarantine_path else None)
    except Exception:  # noqa: BLE001 (the validation error is the one to report)
        pass


def _started_run(pending: Future) -> tracking.RunHandle | None:
    """The background run start's handle, or None if the start itself failed."""
    try:
        return pending.result()
    except Exception:  # the stage error is the one to report; the run start's own error is secondary
        return None


def code_fingerprint() -> str:
    """One hash of every stage's code version: what the pipeline computes with."""
    return stable_hash([s.code_version() for s in STAGES.values()])


def _run_tags(cfg: PipelineConfig, digest: str, config: str, overrides: list[str] | None) -> dict[str, str]:
    return {
        "qwen_sft.config": config,
        "qwen_sft.overrides": json.dumps(overrides or [], ensure_ascii=False),
        "git_commit": tracking.git_commit(),
        "dataset_digest": digest,
        "dataset_source": cfg.data.source,
        "config_hash": cfg.config_hash(),
        "code_fingerprint": code_fingerprint(),
        "prefect.flow_run_id": str(flow_run.id),  # the flow run that created it; all of them: prefect.flow_run_ids
        "device": resolve_device(cfg.train.device),
        "base_model": cfg.model.source,
        "mlflow.note.content": _description(cfg, config, overrides),
        **_prefect_links(),
    }


def _description(cfg: PipelineConfig, config: str, overrides: list[str] | None) -> str:
    """The run's Description in the MLflow UI: what was run, on what, and how to run it again."""
    sets = " ".join(f"--set {o}" for o in overrides or [])
    return (f"Full fine-tune of `{cfg.model.source}` on `{cfg.data.source}` ({cfg.name}). Run again with "
            f"`qwen-sft run -c {config} {sets}`.".replace("  ", " "))


def _prefect_links() -> dict[str, str]:
    """The flow run's page in the Prefect UI, when a Prefect server with a UI is configured."""
    ui = get_current_settings().ui_url
    if not ui or not get_current_settings().api.url:
        return {}
    return {tracking.FLOW_RUN_URL_TAG: f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}"}


def comparison_rows(metrics: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(metric, base, fine-tuned, n) for the run's figures: rates and ROUGE-L as `0.85 [0.58, 0.96]`, one rounding
    rule (`sft_core.metrics`), n the number of report questions behind the figure."""
    hidden = (NUM_SAMPLES, HARNESS_NUM_SAMPLES, EVAL_EXAMPLES, SCORE)  # n; the selection score
    rows = []
    for name in metrics:
        if name.startswith(BASE) or is_bound(name) or name in hidden:
            continue
        n = sample_size(name, metrics)
        rows.append((name, shown(base(name), metrics), shown(name, metrics), fmt(n, 0) if n is not None else "—"))
    return rows


def _markdown(cfg: PipelineConfig, s: RunSummary) -> str:
    ui = " (the embedded store's UI: start it with `qwen-sft ui`)" if s.needs_local_ui else ""
    lines = [f"# qwen-sft run `{cfg.name}`", "", f"MLflow run: [{s.run_id}]({s.run_url}){ui}", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r.stage} | {r.status} | {r.seconds} |" for r in s.stages]
    lines += ["", "On the report questions (never seen by checkpoint selection); 95 % intervals in brackets.", "",
              "| metric | base | fine-tuned | n |", "|---|---|---|---|"]
    lines += [f"| {name} | {b} | {t} | {n} |" for name, b, t, n in comparison_rows(s.metrics)]
    lines += ["", s.registered.line()] if s.registered else []
    return "\n".join(lines)
