"""Process set-up, in one place: the entry points call `configure_process()`; importing a module changes nothing.

Entry points: the CLI (`flows.cli` callback), the flow (`flows.finetune.finetune`, for runs a
worker starts) and the distributed launcher (`sft_core.launch.main`). Every setting is a default:
a value the user exported wins.
"""

from __future__ import annotations

import logging
import os

# name -> default; why each one is here
PROCESS_DEFAULTS = {
    # Prefect's ephemeral server (no PREFECT_API_URL): 20 s is borderline on 2 cores; quiet and offline
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # MLflow: no telemetry; fail in seconds instead of minutes of HTTP retries (the buffered logger retries itself)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # its "View run at" line shows the URI as given, password too
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # one line per logged training step (the run's progress) instead of bars for every load, save and map
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    # read once when torch loads: CPU tensors >= 2 MB on huge pages, so that training's freed-memory policy
    # (sft_core.train.return_freed_memory_to_os) does not pay a page fault per 4 KiB
    "THP_MEM_ALLOC_ENABLE": "1",
}

# logger -> level: INFO lines that repeat on every run and say nothing the run's own output does not
QUIET_LOGGERS = {
    "mlflow.transformers": "WARNING",  # "pipelines saved with prompt templates have return_full_text False"
    "mlflow.models.model": "WARNING",
}

_user_environment: dict[str, str] | None = None


class _ProjectErrorsWithoutTraceback(logging.Filter):
    """A project error (`SftError`) already says what is wrong and where: Prefect's run loggers log it as one
    line, without the traceback they add to every failure (`--debug` keeps it)."""

    debug = False

    def filter(self, record: logging.LogRecord) -> bool:
        from sft_core.errors import SftError

        if not self.debug and record.exc_info and isinstance(record.exc_info[1], SftError):
            record.msg = f"{record.msg} {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            record.exc_info, record.exc_text = None, None
        return True


_QUIET_TRACEBACKS = _ProjectErrorsWithoutTraceback()


def configure_process(debug: bool | None = None) -> None:
    """Set the process defaults (before prefect, mlflow or torch are imported) and remember the user's
    own environment: libraries write some variables (`mlflow.set_tracking_uri` sets MLFLOW_TRACKING_URI)."""
    global _user_environment
    if _user_environment is None:
        _user_environment = dict(os.environ)
    if debug is not None:  # the CLI's --debug; an entry point that does not know leaves it as it is
        _QUIET_TRACEBACKS.debug = debug
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if _QUIET_TRACEBACKS not in logger.filters:
            logger.addFilter(_QUIET_TRACEBACKS)
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name, level in QUIET_LOGGERS.items():  # expected, and said once in the docs instead of on every run
        logging.getLogger(name).setLevel(level)


def user_environment(name: str) -> str | None:
    """A variable as the user set it when the process started (as now, if `configure_process` never ran)."""
    env = _user_environment if _user_environment is not None else os.environ
    return env.get(name) or None
