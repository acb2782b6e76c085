"""Real servers for tests: throw-away PostgreSQL databases, MLflow and Prefect servers.

Each helper is a context manager that cleans up at exit, also when the test fails:

    with postgres_database("mlflow") as db_url, mlflow_server(tmp_path, "postgres", database_url=db_url) as srv:
        client = MlflowClient(srv.url)

Servers run as subprocesses in their own process group; `stop()` sends SIGTERM to the group,
then SIGKILL after a grace period. `start()` after `stop()` restarts on the same port with the
same stores (for outage tests). Logs go to `<tmp_path>/<name>.log` and their tail is in the
error raised when a server does not become healthy.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv running the tests
SERVER_SH = REPO / "mlflow" / "server.sh"

PG_HOST = os.environ.get("TEST_POSTGRES_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_POSTGRES_PORT", "5432"))
PG_USER = os.environ.get("TEST_POSTGRES_USER", "postgres")
PG_ADMIN_DB = os.environ.get("TEST_POSTGRES_ADMIN_DB", "test")  # existing db to run CREATE DATABASE from

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
# Client-side settings of the test process that must not leak into a server.
_SCRUB = ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
          "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH", "PREFECT_API_DATABASE_CONNECTION_URL")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a server subprocess: this one, quiet, venv first on PATH, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(QUIET_ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def with_driver(url: str, driver: str) -> str:
    """`postgresql[+x]://...` with the SQLAlchemy driver replaced, e.g. `asyncpg` or `psycopg2`."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgresql"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql+{driver}://{rest}"


def pg_connect(dbname: str = PG_ADMIN_DB):
    """An autocommit psycopg2 connection to `dbname` on the test server; close it yourself."""
    import psycopg2

    try:
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=10)
    except psycopg2.OperationalError as e:
        raise RuntimeError(
            f"PostgreSQL not reachable as {PG_USER}@{PG_HOST}:{PG_PORT}/{dbname} ({e}). "
            "Start it, or set TEST_POSTGRES_HOST/PORT/USER/ADMIN_DB."
        ) from e
    conn.autocommit = True
    return conn


def postgres_available() -> bool:
    """Whether the test PostgreSQL server accepts connections (for `skipif`)."""
    try:
        pg_connect().close()
        return True
    except RuntimeError:
        return False


@contextmanager
def postgres_database(prefix: str = "test") -> Iterator[str]:
    """Create a uniquely named database; yield its `postgresql+psycopg2://` URL; drop it at exit."""
    name = re.sub(r"[^a-z0-9_]", "_", f"{prefix}_{uuid.uuid4().hex[:12]}".lower())
    conn = pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


def _http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class ServerProcess:
    """A server subprocess with a health URL; start/stop/restart on a fixed port."""

    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    health_url: str
    log_path: Path
    cwd: Path
    timeout: float = 120.0
    stop_grace: float = 20.0
    home: Path | None = None  # the server's state folder (stores, rendered config)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> None:
        """Spawn the server and wait until its health URL answers 200."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"{self.name} exited with code {code} before it was healthy; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if _http_status(self.health_url) == 200:
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy at {self.health_url} after {self.timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after `stop_grace` seconds; no-op when stopped."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(pgid, signal.SIGKILL)  # the leader may be gone while workers linger
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class MlflowServer(ServerProcess):
    username: str | None = None
    password: str | None = None
    database_url: str | None = None  # PostgreSQL backend, when there is one

    def client_env(self) -> dict[str, str]:
        """Environment a client needs to reach this server (tracking URI, credentials)."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if self.username:
            env |= {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password or ""}
        return env


@dataclass
class PrefectServer(ServerProcess):
    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


@contextmanager
def _running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def mlflow_server(
    tmp_path: Path,
    backend: Literal["sqlite", "postgres"] = "sqlite",
    auth: bool = False,
    port: int | None = None,
    *,
    database_url: str | None = None,
    timeout: float = 120.0,
) -> Iterator[MlflowServer]:
    """Run `mlflow/server.sh` with one worker; yield a started `MlflowServer`.

    `postgres` without `database_url` creates a throw-away database, dropped at exit.
    With `auth`, the admin user is `admin` with a random password (`.username`, `.password`).
    """
    if backend == "postgres" and database_url is None:
        with postgres_database("mlflow") as url:
            with mlflow_server(tmp_path, backend, auth, port, database_url=url, timeout=timeout) as srv:
                yield srv
        return
    port = port or free_port()
    home = Path(tmp_path) / f"mlflow-server-{port}"
    env = child_env(MLFLOW_HOME=str(home), MLFLOW_PORT=str(port), MLFLOW_HOST="127.0.0.1", MLFLOW_WORKERS="1",
                    PYTHON=sys.executable, MLFLOW_BIN=str(BIN / "mlflow"))
    argv = ["bash", str(SERVER_SH), backend]
    if backend == "postgres":
        env["MLFLOW_BACKEND_STORE_URI"] = with_driver(database_url, "psycopg2")
    username = password = None
    if auth:
        username, password = "admin", secrets.token_urlsafe(18)
        env |= {"MLFLOW_AUTH_ADMIN_USERNAME": username, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
        argv.append("--auth")
    url = f"http://127.0.0.1:{port}"
    server = MlflowServer(name="mlflow", argv=argv, env=env, url=url, health_url=f"{url}/health",
                          log_path=Path(tmp_path) / f"mlflow-{port}.log", cwd=Path(tmp_path), timeout=timeout,
                          home=home, username=username, password=password, database_url=database_url)
    with _running(server):
        yield server


@contextmanager
def prefect_server(
    tmp_path: Path,
    database_url: str | None = None,
    port: int | None = None,
    *,
    timeout: float = 120.0,
) -> Iterator[PrefectServer]:
    """Run `prefect server start`; SQLite in a tmp PREFECT_HOME unless `database_url` (PostgreSQL) is given."""
    port = port or free_port()
    home = Path(tmp_path) / f"prefect-home-{port}"
    env = child_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false",
                    PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = with_driver(database_url, "asyncpg")
    url = f"http://127.0.0.1:{port}"
    server = PrefectServer(name="prefect", argv=[str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                 "--port", str(port)],
                           env=env, url=url, health_url=f"{url}/api/health",
                           log_path=Path(tmp_path) / f"prefect-{port}.log", cwd=Path(tmp_path), timeout=timeout,
                           home=home)
    with _running(server):
        yield server
