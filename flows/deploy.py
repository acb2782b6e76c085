"""Team set-up: scheduled Prefect deployments of `finetune`, a one-box scheduler, model serving.

    qwen-sft deploy -c demo --cron "0 3 * * 1"   # register with the server in PREFECT_API_URL
    qwen-sft worker --pool qwen-sft-process      # a worker runs what the schedule creates
    qwen-sft serve -c demo                       # one box: schedule + runs in this process
    qwen-sft serve-model -c demo --alias production  # POST /invocations {"inputs": ["question"]}

A deployment's parameters are what a user types: the preset (`config`), its `--set`
`overrides` and `refresh`, so a custom run from the Prefect UI edits a list, not a JSON
config, and a scheduled run is exactly `qwen-sft run -c <config> --set ...`: unchanged data
and config skip training (cached), new data retrains and registers a new `candidate`,
`registry.auto_promote` gates it into `production`. One retraining per deployment at a
time: concurrency limit 1, later runs wait in the queue (ENQUEUE). The entrypoint is the
installed module (`flows.finetune.finetune`): a worker needs the package, not a checkout.
`serve` registers its own deployment (`<name>-serve`), so stopping it pauses nothing of
`deploy`'s.

Where a worker's run lands is decided where `deploy` runs and carried by the deployment
(`run_location`): the folder it starts in (`--working-dir`, else the current one) and, unless
`tracking.uri` says it, this shell's MLFLOW_TRACKING_URI; a run on a worker is then the
`qwen-sft run` this shell would have made, never one in a temporary folder that Prefect deletes.
"""

from __future__ import annotations

import shutil
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sft_core.config import PipelineConfig, flatten, load_config, redact, redact_uri
from sft_core.errors import ConfigError, OrchestrationError
from sft_core.process import user_environment

ENTRYPOINT = "flows.finetune.finetune"  # the installed module: a worker needs the package, not a checkout
POOL_TYPE = "process"


# --- what a deployment is made of ---------------------------------------------------------------

def deployment_name(cfg: PipelineConfig) -> str:
    return f"finetune-{cfg.name}"


def served_name(cfg: PipelineConfig) -> str:
    """`qwen-sft serve`'s own deployment: never the one `deploy` registered (stopping serve pauses only its own)."""
    return f"{deployment_name(cfg)}-serve"


def deployment_parameters(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """`finetune` parameters: the preset, its overrides, refresh off; checked as `qwen-sft run` checks them.

    Refuses credentials: Prefect stores parameters in clear text.
    """
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # a bad key or value fails here, with the CLI's message
    dump = cfg.model_dump(mode="json")
    plain, masked = flatten(dump), flatten(redact(dump))
    secret = sorted(k for k in plain if plain[k] != masked[k])
    if secret:
        raise ConfigError(f"config key(s) {', '.join(secret)} hold a credential; deployment parameters are stored in "
                          "clear text in the Prefect database: give the worker MLFLOW_TRACKING_URI (and "
                          "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD) in its environment instead")
    return {"config": config, "overrides": overrides, "refresh": False}


def deployment_tags(cfg: PipelineConfig) -> list[str]:
    return ["qwen-sft", f"model:{cfg.registry.name}"]


def cron_schedule(cfg: PipelineConfig, cron: str | None = None, timezone: str | None = None):
    """`schedule.cron` in `schedule.timezone` (or the given overrides), validated by Prefect."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron

    expr, tz = cron or cfg.schedule.cron, timezone or cfg.schedule.timezone
    try:
        CronSchedule(cron=expr, timezone=tz)
    except ValidationError as exc:
        reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"schedule.cron '{expr}' in schedule.timezone '{tz}' is not a valid schedule: {reason}") from exc
    return Cron(expr, timezone=tz)


def run_location(cfg: PipelineConfig, working_dir: str | Path | None = None) -> dict[str, Any]:
    """Where a worker's run lands, resolved here, and the job variables that carry it to the worker.

    A process worker starts a run in the deployment's `working_dir`, or else in a temporary folder that it
    deletes afterwards (with the workdir, the checkpoints and an embedded MLflow store in it). So the folder is
    always carried: `working_dir`, else the current one, absolute; a relative `workdir` lands in it. The tracking
    store: `tracking.uri` (a parameter) wins; else this shell's MLFLOW_TRACKING_URI is carried as the run's
    environment (refused when it holds a credential: job variables are stored in clear text); else the embedded
    store in the workdir, unless the worker's own environment sets MLFLOW_TRACKING_URI.
    """
    folder = (Path(working_dir).expanduser() if working_dir else Path.cwd()).resolve()
    workdir = Path(cfg.workdir).expanduser()
    workdir = workdir if workdir.is_absolute() else folder / workdir
    job: dict[str, Any] = {"working_dir": str(folder)}
    if cfg.tracking.uri:
        store, source = cfg.tracking.uri, "tracking.uri"
    elif env_uri := user_environment("MLFLOW_TRACKING_URI"):
        if redact_uri(env_uri) != env_uri:
            raise ConfigError("MLFLOW_TRACKING_URI holds a credential; the deployment would store it in clear text: "
                              "export it without one (give the worker MLFLOW_TRACKING_USERNAME / "
                              "MLFLOW_TRACKING_PASSWORD in its environment), or deploy with --set tracking.uri=URL")
        job["env"] = {"MLFLOW_TRACKING_URI": env_uri}
        store, source = env_uri, "MLFLOW_TRACKING_URI"
    else:
        store, source = f"sqlite:///{workdir / 'mlflow.db'}", "embedded"
    return {"job_variables": job, "working_dir": str(folder), "workdir": str(workdir), "tracking": store,
            "tracking_from": source}


def worker_argv(pool: str, extra: list[str] | None = None) -> list[str]:
    """`prefect worker start --pool POOL ...` with the Prefect of this environment (`qwen-sft worker` runs it)."""
    beside = Path(sys.executable).with_name("prefect")
    program = str(beside) if beside.exists() else shutil.which("prefect") or "prefect"
    return [program, "worker", "start", "--pool", pool, *(extra or [])]


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

def deploy(
    config: str,
    overrides: list[str] | None = None,
    *,
    cron: str | None = None,
    timezone: str | None = None,
    pool: str | None = None,
    name: str | None = None,
    working_dir: str | Path | None = None,
    paused: bool = False,
) -> dict[str, Any]:
    """Register (or update) the scheduled `finetune` deployment of `config` + `overrides` on the Prefect server.

    `working_dir` is where a process worker starts each run (a relative `workdir` lands there); default: the
    current folder. The tracking store goes with it (`run_location`). Container pools start in the image's /app.
    """
    from prefect.types.entrypoint import EntrypointType

    from flows.finetune import finetune

    parameters = deployment_parameters(config, overrides)  # local checks first
    cfg = load_config(config, overrides or [])
    schedule = cron_schedule(cfg, cron, timezone)
    api = prefect_api_url()
    pool = pool or cfg.schedule.work_pool
    created = ensure_work_pool(pool)
    name = name or deployment_name(cfg)
    where = run_location(cfg, working_dir)
    deployment = finetune.to_deployment(
        name=name,
        schedules=[schedule],
        concurrency_limit=concurrency_limit(),
        parameters=parameters,
        tags=deployment_tags(cfg),
        description=f"Scheduled retraining of {cfg.registry.name} ({cfg.name}); a run with unchanged data and "
                    "config skips training.",
        work_pool_name=pool,
        job_variables=where["job_variables"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        paused=paused,
    )
    try:
        deployment_id = deployment.apply(work_pool_name=pool)
    except Exception as exc:
        raise OrchestrationError(f"could not register deployment 'finetune/{name}' on {api}: {exc}") from exc
    return {"id": str(deployment_id), "name": f"finetune/{name}", "work_pool": pool, "pool_created": created,
            "cron": schedule.cron, "timezone": schedule.timezone, "api_url": api, "concurrency_limit": 1,
            "tags": deployment_tags(cfg), "entrypoint": deployment.entrypoint,
            **{k: where[k] for k in ("working_dir", "workdir", "tracking", "tracking_from")}}


def serve(config: str, overrides: list[str] | None = None, *, cron: str | None = None, timezone: str | None = None,
          name: str | None = None) -> None:
    """Run the schedule and its flow runs in this process until interrupted (Prefect's `serve`), under a
    deployment of its own; SIGTERM stops it as Ctrl-C does."""
    from flows.finetune import finetune

    parameters = deployment_parameters(config, overrides)
    cfg = load_config(config, overrides or [])

    def stop(_signum, _frame):  # Prefect's runner shuts down on KeyboardInterrupt, not on SIGTERM
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        finetune.serve(
            name=name or served_name(cfg),
            schedules=[cron_schedule(cfg, cron, timezone)],
            global_limit=concurrency_limit(),
            parameters=parameters,
            tags=deployment_tags(cfg),
            description=f"Scheduled retraining of {cfg.registry.name} ({cfg.name}), served from one process.",
        )
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
