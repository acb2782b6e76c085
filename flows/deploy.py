"""Team set-up: scheduled Prefect deployments of `finetune`, a one-box scheduler, model serving.

    qwen-sft deploy -c demo --cron "0 3 * * 1"   # register with the server in PREFECT_API_URL
    prefect worker start --pool qwen-sft-process # a worker runs what the schedule creates
    qwen-sft serve -c demo                       # one box: schedule + runs in this process
    qwen-sft serve-model --alias production      # POST /invocations {"inputs": ["question"]}

A deployment's parameters are the resolved config, so a scheduled run is exactly
`qwen-sft run` with that config: unchanged data and config skip training (cached), new
data retrains and registers a new `candidate`, `registry.auto_promote` gates it into
`production`. One retraining per deployment at a time: concurrency limit 1, later runs
wait in the queue (ENQUEUE).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sft_core.config import PipelineConfig, flatten, redact
from sft_core.errors import ConfigError, OrchestrationError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/finetune.py:finetune"  # relative to the repository root, where the worker runs it
POOL_TYPE = "process"



# --- what a deployment is made of ---------------------------------------------------------------

def deployment_name(cfg: PipelineConfig) -> str:
    return f"finetune-{cfg.name}"


def deployment_parameters(cfg: PipelineConfig) -> dict[str, Any]:
    """`finetune` parameters: the resolved config. Refuses credentials (Prefect stores parameters in clear)."""
    dump = cfg.model_dump(mode="json")
    plain, masked = flatten(dump), flatten(redact(dump))
    secret = sorted(k for k in plain if plain[k] != masked[k])
    if secret:
        raise ConfigError(f"config key(s) {', '.join(secret)} hold a credential; deployment parameters are stored in "
                          "clear text in the Prefect database: give the worker MLFLOW_TRACKING_USERNAME/"
                          "MLFLOW_TRACKING_PASSWORD in its environment instead")
    return {"config": dump, "refresh": False}


def deployment_tags(cfg: PipelineConfig) -> list[str]:
    return ["qwen-sft", f"model:{cfg.registry.name}"]


def cron_schedule(cfg: PipelineConfig, cron: str | None = None, timezone: str | None = None):
    """`schedule.cron` in `schedule.timezone` (or the given overrides), validated by Prefect."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    expr, tz = cron or cfg.schedule.cron, timezone or cfg.schedule.timezone
    try:
        CronSchedule(cron=expr, timezone=tz)
    except ValidationError as exc:
        reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"schedule.cron '{expr}' in schedule.timezone '{tz}' is not a valid schedule: {reason}") from exc
    return Cron(expr, timezone=tz)


def concurrency_limit():
    """At most one run of a deployment at a time; a run that collides waits for the slot."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


# --- Prefect API -----------------------------------------------------------------------------------

def prefect_api_url(timeout: float = 5.0) -> str:
    """The configured Prefect API, checked to answer within seconds."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise OrchestrationError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server. Start one (`prefect server start`, "
            "or `docker compose -f infra/compose.yaml up -d`) and export PREFECT_API_URL=http://127.0.0.1:4200/api; "
            "`qwen-sft serve` needs no server")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):  # noqa: S310 (configured URL)
            pass
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise OrchestrationError(f"Prefect API {url} (PREFECT_API_URL) is unhealthy: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise OrchestrationError(f"Prefect API {url} (PREFECT_API_URL) is unreachable "
                                 f"({getattr(exc, 'reason', exc)}); is the server running?") from exc
    return url


def ensure_work_pool(name: str) -> bool:
    """Create a `process` work pool with Prefect's default job template unless `name` exists; True if created.

    Docker and Kubernetes pools come from `infra/work-pools/*.json` (`prefect work-pool create
    NAME --type docker --base-job-template infra/work-pools/docker.json`) before deploying.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # created concurrently
            return False
    return True


# --- deploy / serve --------------------------------------------------------------------------------

def default_source() -> Path:
    """The repository checkout this code runs from; with a non-editable install (the Docker
    image), the current folder when it holds the flow (the image's /app)."""
    if (REPO_ROOT / "pyproject.toml").exists() or not (Path.cwd() / ENTRYPOINT.split(":")[0]).exists():
        return REPO_ROOT
    return Path.cwd()


def deploy(
    cfg: PipelineConfig,
    *,
    cron: str | None = None,
    timezone: str | None = None,
    pool: str | None = None,
    name: str | None = None,
    source: str | Path | None = None,
    paused: bool = False,
) -> dict[str, Any]:
    """Register (or update) the scheduled `finetune` deployment for `cfg` on the Prefect server.

    `source` is the repository folder as the worker sees it (default: this checkout); the
    worker starts each run there, so a relative `workdir` lands in that folder.
    """
    from prefect.runner.storage import LocalStorage

    from flows.finetune import finetune

    schedule, parameters = cron_schedule(cfg, cron, timezone), deployment_parameters(cfg)  # local checks first
    api = prefect_api_url()
    pool = pool or cfg.schedule.work_pool
    created = ensure_work_pool(pool)
    name = name or deployment_name(cfg)
    deployment = finetune.to_deployment(
        name=name,
        schedules=[schedule],
        concurrency_limit=concurrency_limit(),
        parameters=parameters,
        tags=deployment_tags(cfg),
        description=f"Scheduled retraining of {cfg.registry.name} ({cfg.name}); a run with unchanged data and "
                    "config skips training.",
        work_pool_name=pool,
        paused=paused,
    )
    deployment.entrypoint = ENTRYPOINT
    deployment.storage = LocalStorage(path=str(Path(source) if source else default_source()))
    try:
        deployment_id = deployment.apply(work_pool_name=pool)
    except Exception as exc:
        raise OrchestrationError(f"could not register deployment 'finetune/{name}' on {api}: {exc}") from exc
    return {"id": str(deployment_id), "name": f"finetune/{name}", "work_pool": pool, "pool_created": created,
            "cron": schedule.cron, "timezone": schedule.timezone, "api_url": api, "concurrency_limit": 1,
            "tags": deployment_tags(cfg)}


def serve(cfg: PipelineConfig, *, cron: str | None = None, timezone: str | None = None, name: str | None = None) -> None:
    """Run the schedule and its flow runs in this process until interrupted (Prefect's `serve`)."""
    from flows.finetune import finetune

    finetune.serve(
        name=name or deployment_name(cfg),
        schedules=[cron_schedule(cfg, cron, timezone)],
        global_limit=concurrency_limit(),
        parameters=deployment_parameters(cfg),
        tags=deployment_tags(cfg),
        description=f"Scheduled retraining of {cfg.registry.name} ({cfg.name}), served from one process.",
    )
