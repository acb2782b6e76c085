"""sft_core/process.py: the process defaults an entry point sets (a value the user exported wins), the user's own
environment remembered, project errors logged without a traceback, and SIGTERM ending the process promptly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sft_core import process
from sft_core.errors import ConfigError
from sft_core.process import (
    PROCESS_DEFAULTS,
    QUIET_LOGGERS,
    SIGTERM_GRACE_S,
    configure_process,
    user_environment,
)

REPO = Path(__file__).resolve().parent.parent
STOPPED = "error: stopped by SIGTERM; run the same command again to resume from the last checkpoint"


@pytest.fixture
def fresh_process(monkeypatch):
    """The process as an entry point finds it: `configure_process` not called yet, no default set, the filter's
    --debug as it was."""
    monkeypatch.setattr(process, "_user_environment", None)
    monkeypatch.setattr(process._QUIET_TRACEBACKS, "debug", process._QUIET_TRACEBACKS.debug)
    for key in PROCESS_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# --- configure_process / user_environment --------------------------------------------------------------------

def test_configure_process_sets_each_default_the_user_did_not_set(fresh_process):
    fresh_process.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    fresh_process.setenv("TQDM_DISABLE", "0")
    configure_process()
    for key, value in PROCESS_DEFAULTS.items():
        expected = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "300", "TQDM_DISABLE": "0"}.get(key, value)
        assert os.environ[key] == expected, key


def test_the_documented_defaults_are_the_ones_set():
    assert PROCESS_DEFAULTS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    assert PROCESS_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert PROCESS_DEFAULTS["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true", "it prints a URI's password"
    for key in ("DO_NOT_TRACK", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        assert PROCESS_DEFAULTS[key] == "1", key
    assert all(isinstance(v, str) for v in PROCESS_DEFAULTS.values()), "environment values are strings"


def test_user_environment_is_the_users_value_not_a_default_nor_what_a_library_wrote_later(fresh_process):
    fresh_process.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    fresh_process.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    configure_process()
    fresh_process.setenv("MLFLOW_TRACKING_URI", "sqlite:///written-by-mlflow.db")  # mlflow.set_tracking_uri does this
    fresh_process.setenv("QWEN_SFT_LATER", "x")
    assert user_environment("MLFLOW_TRACKING_URI") == "http://mlflow:5000"
    assert user_environment("MLFLOW_HTTP_REQUEST_TIMEOUT") == "300"
    assert user_environment("DO_NOT_TRACK") is None, "a default the process set, not the user"
    assert user_environment("QWEN_SFT_LATER") is None
    configure_process()  # a second entry point in the same process: the first snapshot stays
    assert user_environment("MLFLOW_TRACKING_URI") == "http://mlflow:5000"


def test_user_environment_before_configure_process_is_the_environment_now(fresh_process):
    fresh_process.setenv("MLFLOW_TRACKING_URI", "http://now:5000")
    assert user_environment("MLFLOW_TRACKING_URI") == "http://now:5000"
    fresh_process.setenv("MLFLOW_TRACKING_URI", "")
    assert user_environment("MLFLOW_TRACKING_URI") is None, "an empty value is not set"
    fresh_process.delenv("MLFLOW_TRACKING_URI")
    assert user_environment("MLFLOW_TRACKING_URI") is None


def test_configure_process_quiets_the_loggers_that_repeat_on_every_run(fresh_process):
    for name in QUIET_LOGGERS:
        fresh_process.setattr(logging.getLogger(name), "level", logging.INFO)
    configure_process()
    for name, level in QUIET_LOGGERS.items():
        assert logging.getLogger(name).level == getattr(logging, level), name


def _failure(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:  # noqa: BLE001
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Finished in state %s", ("Failed",),
                                 sys.exc_info())


@pytest.mark.parametrize("name", ["prefect.flow_runs", "prefect.task_runs"])
def test_a_project_error_is_logged_by_prefects_run_loggers_as_one_line(fresh_process, name):
    configure_process()
    configure_process()
    logger = logging.getLogger(name)
    assert logger.filters.count(process._QUIET_TRACEBACKS) == 1, "added once"
    record = _failure(ConfigError("train.epochz: unknown key"))
    assert logger.filter(record)
    assert record.getMessage() == "Finished in state Failed ConfigError: train.epochz: unknown key"
    assert record.exc_info is None and record.exc_text is None
    other = _failure(RuntimeError("a bug"))
    assert logger.filter(other) and other.exc_info is not None, "any other failure keeps its traceback"


def test_debug_keeps_a_project_errors_traceback_until_an_entry_point_says_otherwise(fresh_process):
    logger = logging.getLogger("prefect.flow_runs")
    configure_process(debug=True)
    configure_process()  # an entry point that does not know leaves it as it is
    kept = _failure(ConfigError("bad"))
    assert logger.filter(kept) and kept.exc_info is not None and kept.getMessage() == "Finished in state Failed"
    configure_process(debug=False)
    quiet = _failure(ConfigError("bad"))
    assert logger.filter(quiet) and quiet.exc_info is None


# --- exit_promptly_on_sigterm --------------------------------------------------------------------------------

def _run(body: str, tmp_path: Path, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    """`body` in a fresh Python (the marker file's path as MARKER), and how long it ran."""
    script = textwrap.dedent("""
        import os, signal, sys, threading, time
        from pathlib import Path
        from sft_core.process import exit_promptly_on_sigterm
        MARKER = Path(sys.argv[1])
        def cleanup(text="cleaned"):
            with MARKER.open("a", encoding="utf-8") as f:
                f.write(text + "\\n")
    """) + textwrap.dedent(body)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "marker")], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def _marker(tmp_path: Path) -> list[str]:
    path = tmp_path / "marker"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_sigterm_runs_the_cleanup_and_exits_143_at_once_with_one_line(tmp_path):
    done, took = _run("""
        exit_promptly_on_sigterm(cleanup=cleanup)
        print("before", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
        print("not reached")
    """, tmp_path)
    assert done.returncode == 143 == 128 + signal.SIGTERM, done.stderr
    assert done.stdout == "before\n" and done.stderr == STOPPED + "\n"
    assert _marker(tmp_path) == ["cleaned"] and took < 10


def test_without_a_cleanup_sigterm_still_exits_143(tmp_path):
    done, _ = _run("""
        exit_promptly_on_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
    """, tmp_path)
    assert done.returncode == 143 and done.stderr == STOPPED + "\n" and _marker(tmp_path) == []


def test_a_failing_cleanup_still_ends_the_process_with_143(tmp_path):
    done, took = _run("""
        def broken():
            cleanup("started")
            raise RuntimeError("the server was already gone")
        exit_promptly_on_sigterm(cleanup=broken)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
    """, tmp_path)
    assert done.returncode == 143 and _marker(tmp_path) == ["started"] and took < 10
    assert "Traceback" not in done.stderr


def test_the_watchdog_ends_the_process_after_the_grace_whatever_handler_holds_sigterm(tmp_path):
    """A library that installs its own SIGTERM handler and carries on (Prefect's retrying a stopped server) does not
    keep the process alive: the signal wakes the watchdog, which runs the cleanup and exits `grace` seconds later."""
    done, took = _run("""
        exit_promptly_on_sigterm(cleanup=cleanup, grace=0.5)
        signal.signal(signal.SIGTERM, lambda signum, frame: print("handled, carrying on", flush=True))
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
            time.sleep(0.1)
        print("not reached")
    """, tmp_path)
    assert done.returncode == 143, done.stdout + done.stderr
    assert done.stdout == "handled, carrying on\n" and STOPPED not in done.stderr
    assert _marker(tmp_path) == ["cleaned"] and 0.5 <= took < 10
    assert SIGTERM_GRACE_S == 5.0, "the README's '5 s after the signal at most'"


def test_it_is_installed_once_per_process_and_the_first_cleanup_is_kept(tmp_path):
    done, _ = _run("""
        exit_promptly_on_sigterm(cleanup=lambda: cleanup("first"))
        exit_promptly_on_sigterm(cleanup=lambda: cleanup("second"))
        print(sum(t.name == "sigterm-watchdog" for t in threading.enumerate()), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
    """, tmp_path)
    assert done.returncode == 143 and done.stdout == "1\n" and _marker(tmp_path) == ["first"]


def test_outside_the_main_thread_it_installs_nothing(tmp_path):
    done, _ = _run("""
        t = threading.Thread(target=exit_promptly_on_sigterm, args=(cleanup,))
        t.start(); t.join()
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
              any(t.name == "sigterm-watchdog" for t in threading.enumerate()), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
    """, tmp_path)
    assert done.stdout == "True False\n" and done.returncode == -signal.SIGTERM, "killed by the default action"
    assert _marker(tmp_path) == []
