"""Process set-up, in one place: the entry points call `configure_process()`; importing a module changes nothing.

Entry points: the CLI (`flows.cli` callback), the flow (`flows.finetune.finetune`, for runs a
worker starts) and the distributed launcher (`sft_core.launch.main`). Every setting is a default:
a value the user exported wins.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

from sft_core.errors import SftError

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


_wakeup: list[socket.socket] = []
SIGTERM_GRACE_S = 5.0  # `docker stop` waits 10 s, Kubernetes 30 s; marking the run crashed takes well under 1 s


def exit_promptly_on_sigterm(cleanup: Callable[[], None] | None = None, grace: float = SIGTERM_GRACE_S) -> None:
    """SIGTERM (a scheduler stopping `qwen-sft run`) ends this process within `grace` seconds, children stopped.

    Prefect's flow engine catches SIGTERM itself, marks the run crashed (the flow has marked its MLflow run
    failed on the way out) and then re-sends the signal to the handler it found. That was the default action:
    the process died there and then, leaving the temporary Prefect server it had started running on its own.
    Here the handler it finds runs `cleanup` (which stops that server) and ends the process at once: the exit
    hooks would only try to flush events to the server just stopped.

    When the whole process group gets the signal, the temporary server dies at once and Prefect's client
    retried it for minutes before the process could end. A watchdog thread, woken by the signal itself
    (`signal.set_wakeup_fd`: whatever handler is installed at the time), runs `cleanup` and ends the process
    `grace` seconds after the signal if it is still there. Main thread only (signals are delivered there).
    """
    if threading.current_thread() is not threading.main_thread() or _wakeup:
        return  # signals reach the main thread only; once per process

    def on_sigterm(signum: int, _frame: object) -> None:
        print("error: stopped by SIGTERM; run the same command again to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        _end(128 + signum, cleanup)

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    _wakeup.append(writer)  # kept open for the life of the process: the signal writes to it

    def watchdog() -> None:
        while signal.SIGTERM not in reader.recv(64):
            pass
        time.sleep(grace)
        _end(128 + signal.SIGTERM, cleanup)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=watchdog, name="sigterm-watchdog", daemon=True).start()


def _end(code: int, cleanup: Callable[[], None] | None) -> None:
    """`cleanup`, flush the standard streams, and end the process now with `code` (no exit hooks)."""
    try:
        if cleanup is not None:
            cleanup()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 (a closed stream must not keep the process alive)
                pass
        os._exit(code)
