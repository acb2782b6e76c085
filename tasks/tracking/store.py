"""Where the MLflow store is and how to reach it: URI, embedded SQLite store creation, client.

Defaults are embedded (``sqlite:///<workdir>/mlflow.db`` + ``<workdir>/mlartifacts``); a
server URI comes from ``tracking.uri`` or ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from sft_core.config import PipelineConfig, credentials_problem, redact_uri
from sft_core.errors import ConfigError, TrackingError
from sft_core.process import user_environment

log = logging.getLogger(__name__)


def tracking_uri(cfg: PipelineConfig) -> str:
    """The one place the store is decided: `tracking.uri` (a preset or `--set`), else `MLFLOW_TRACKING_URI` as the
    user set it where the flow runs (a worker's; not the value `mlflow.set_tracking_uri` writes back into the
    environment), else the embedded SQLite store in the workdir."""
    uri = (cfg.tracking.uri or user_environment("MLFLOW_TRACKING_URI")
           or f"sqlite:///{cfg.workdir_path / 'mlflow.db'}")
    problem = credentials_problem(uri)
    if problem:  # a URL parser would send part of the password as the host, path or fragment (and print it)
        raise ConfigError(f"{'tracking.uri' if cfg.tracking.uri else 'MLFLOW_TRACKING_URI'} {problem}")
    return uri


def artifact_root(cfg: PipelineConfig) -> str | None:
    """Local artifact folder for the embedded store; a server decides its own."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (cfg.workdir_path / "mlartifacts").as_uri()


_store_builders: dict[str, tuple[subprocess.Popen, Any]] = {}  # sqlite URI -> (child creating it, its stderr)
_stores_ready: set[str] = set()
_STORE_LOCK = threading.Lock()
_BUILD_STORE = """
import sys
from filelock import FileLock
import mlflow
with FileLock(sys.argv[2]):
    mlflow.MlflowClient(sys.argv[1]).search_experiments(max_results=1)
"""


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def warm_store(cfg: PipelineConfig) -> bool:
    """Start creating a new embedded SQLite store in a child process; True if one was started.

    A fresh MLflow store costs seconds of schema migrations (plus the child's own `import mlflow`).
    Done by a child on the other core while ingest and validation run, they leave the critical
    path; the first `client()` for that URI waits for the child. Any other URI: nothing to do.
    """
    uri = tracking_uri(cfg)
    db = _sqlite_file(uri)
    with _STORE_LOCK:
        if db is None or db.exists() or uri in _store_builders or uri in _stores_ready:
            return False
        db.parent.mkdir(parents=True, exist_ok=True)
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-c", _BUILD_STORE, uri, f"{db}.init.lock"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        _store_builders[uri] = (proc, err)
    return True


def _ensure_store(uri: str) -> None:
    """Wait for a `warm_store` child; create a SQLite store under a file lock (other processes may too)."""
    db = _sqlite_file(uri)
    if db is None or uri in _stores_ready:
        return
    from filelock import FileLock

    import mlflow

    with _STORE_LOCK:
        if uri in _stores_ready:
            return
        builder = _store_builders.pop(uri, None)
        if builder is not None:
            proc, err = builder
            if proc.wait() != 0:  # not fatal: this process creates the store itself below
                err.seek(0)
                tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
                log.warning("background creation of the MLflow store %s failed (%s); creating it here", uri, tail)
            err.close()
        with FileLock(f"{db}.init.lock"):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        _stores_ready.add(uri)


def _credentials_to_environment(uri: str) -> str:
    """`uri` without its credentials, which move to MLflow's documented MLFLOW_TRACKING_USERNAME / _PASSWORD
    (`http://user:pass@host` wins over values set there): MLflow reads them for every request, and no URL it
    prints (a failed request's "API request to URL failed", a traceback) can carry them."""
    parts = urlsplit(uri)
    if not uri.startswith(("http://", "https://")) or "@" not in parts.netloc:
        return uri
    creds, host = parts.netloc.rsplit("@", 1)
    user, _, password = creds.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def client(cfg: PipelineConfig):
    import mlflow

    uri = _credentials_to_environment(tracking_uri(cfg))
    _ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri, registry_uri=uri)


def check_reachable(cfg: PipelineConfig, timeout: float = 5.0) -> str:
    """Fail fast (seconds, not minutes) when a tracking server cannot be reached; messages never show a password.

    Credentials in the URI (`http://user:pass@host`) or in MLFLOW_TRACKING_USERNAME / _PASSWORD are sent
    with the health check, as MLflow sends them with every call.
    """
    uri = tracking_uri(cfg)
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(_credentials_to_environment(uri))
        base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        headers = {"Content-Type": "application/json"}
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if user:
            token = base64.b64encode(f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        # /health answers without credentials; a search shows whether the server takes these ones
        probes = [urllib.request.Request(f"{base}/health", headers=headers),
                  urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search", data=b'{"max_results": 1}',
                                         headers=headers, method="POST")]
        try:
            for request in probes:
                with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (configured URI)
                    if resp.status >= 500:
                        raise TrackingError(f"MLflow tracking server {shown} is unhealthy (HTTP {resp.status})")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise TrackingError(f"MLflow tracking server {shown} refused the credentials (HTTP {exc.code}); set "
                                    "them in the URI or in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD") from None
            if exc.code >= 500:
                raise TrackingError(f"MLflow tracking server {shown} is unhealthy (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise TrackingError(
                f"MLflow tracking server {shown} is unreachable ({redact_uri(str(getattr(exc, 'reason', exc)))}); "
                "start it (mlflow/server.sh) or unset tracking.uri / MLFLOW_TRACKING_URI for the embedded store"
            ) from None
    else:
        _refuse_file_store(cfg, uri)
        cfg.workdir_path.mkdir(parents=True, exist_ok=True)
    return uri


def _refuse_file_store(cfg: PipelineConfig, uri: str) -> None:
    """MLflow 3 refuses its file store (`file:///...`, a plain path) unless MLFLOW_ALLOW_FILE_STORE=true: say so at
    once, not a minute later in a traceback from the first MLflow call inside the flow."""
    forced = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")  # as MLflow reads it
    if urlsplit(uri).scheme.lower() not in ("", "file") or forced:
        return
    setting = "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI"
    raise ConfigError(f"{setting}={redact_uri(uri)} is an MLflow file store, which MLflow 3 refuses (maintenance "
                      "mode): use a database file, e.g. sqlite:////absolute/path/mlflow.db, or unset it for the "
                      "embedded store in the workdir (MLFLOW_ALLOW_FILE_STORE=true forces the file store)")
