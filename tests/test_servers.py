"""Real MLflow and Prefect servers as the deployment runs them (slow: each start takes 20-50 s)."""

from __future__ import annotations

import json
from contextlib import closing

import pytest
import requests

from tests.servers import REPO, mlflow_server, pg_connect, postgres_database, prefect_server

pytestmark = pytest.mark.slow


def _query(sql: str, params: tuple = (), dbname: str | None = None):
    with closing(pg_connect(dbname) if dbname else pg_connect()) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def _pg_count(url: str, table: str) -> int:
    return _query(f"SELECT count(*) FROM {table}", dbname=url.rsplit("/", 1)[1])[0]


def _database_exists(name: str) -> bool:
    return _query("SELECT 1 FROM pg_database WHERE datname = %s", (name,)) is not None


def test_mlflow_on_postgres_logs_run_and_registers_version(tmp_path):
    from mlflow import MlflowClient

    with mlflow_server(tmp_path, "postgres") as srv:  # on a throw-away database
        client = MlflowClient(tracking_uri=srv.url, registry_uri=srv.url)
        run = client.create_run(client.create_experiment("servers-test"))
        run_id = run.info.run_id
        client.log_param(run_id, "train.learning_rate", "0.0001")
        client.log_metric(run_id, "eval/loss", 1.25, step=3)
        weights = tmp_path / "model" / "weights.txt"
        weights.parent.mkdir()
        weights.write_text("not really weights")
        client.log_artifacts(run_id, str(weights.parent), "model")
        client.set_terminated(run_id)

        client.create_registered_model("servers-test-model")
        mv = client.create_model_version("servers-test-model", f"{run.info.artifact_uri}/model", run_id)
        client.set_registered_model_alias("servers-test-model", "candidate", mv.version)

        got = client.get_run(run_id)
        assert got.data.params == {"train.learning_rate": "0.0001"}
        assert got.data.metrics == {"eval/loss": 1.25}
        by_alias = client.get_model_version_by_alias("servers-test-model", "candidate")
        assert (by_alias.version, by_alias.run_id) == (mv.version, run_id)
        # artifacts go through the server's proxy into its local artifact folder
        downloaded = client.download_artifacts(run_id, "model/weights.txt", str(tmp_path / "dl"))
        assert open(downloaded).read() == "not really weights"
        assert list((srv.home / "artifacts").rglob("weights.txt"))
        # ...and the metadata really is in PostgreSQL
        assert _pg_count(srv.database_url, "runs") == 1
        assert _pg_count(srv.database_url, "model_versions") == 1
    assert srv.proc is None
    assert not _database_exists(srv.database_url.rsplit("/", 1)[1])


def test_mlflow_basic_auth_refuses_wrong_password_and_survives_restart(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with mlflow_server(tmp_path, "sqlite", auth=True) as srv:
        api = f"{srv.url}/api/2.0/mlflow/experiments/search"

        def status(auth) -> int:
            return requests.post(api, json={"max_results": 1}, auth=auth, timeout=30).status_code

        assert status((srv.username, srv.password)) == 200
        for auth in (None, (srv.username, srv.password + "x"), ("nobody", srv.password)):
            assert status(auth) in (401, 403), auth

        for k, v in srv.client_env().items():
            monkeypatch.setenv(k, v)
        exp_id = MlflowClient(srv.url).create_experiment("with-auth")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
        with pytest.raises(MlflowException, match="401|403|[Uu]nauthori|credentials"):
            MlflowClient(srv.url).create_experiment("refused")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", srv.password)
        # the rendered auth config points at the user store in the server's home, holds no password
        rendered = (srv.home / "basic_auth.ini").read_text()
        assert "database_uri = sqlite:///" in rendered and srv.password not in rendered

        # outage: down means connection refused; back on the same port with the same stores
        first_pid = srv.pid
        srv.stop()
        assert srv.proc is None
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{srv.url}/health", timeout=5)
        srv.start()
        assert srv.pid != first_pid
        assert MlflowClient(srv.url).get_experiment(exp_id).name == "with-auth"
        assert status((srv.username, srv.password + "x")) in (401, 403)


def test_prefect_server_on_postgres_reads_flows_and_accepts_work_pools(tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with postgres_database("prefect") as db_url, prefect_server(tmp_path, database_url=db_url) as srv:

        async def exercise() -> tuple[list[str], dict[str, dict]]:
            async with get_client() as client:
                await client.create_flow_from_name("servers-test-flow")
                names = [f.name for f in await client.read_flows()]
                pools = {}
                for kind in ("docker", "kubernetes"):
                    template = json.loads((REPO / "infra" / "work-pools" / f"{kind}.json").read_text())
                    await client.create_work_pool(WorkPoolCreate(name=f"qwen-sft-{kind}", type=kind,
                                                                 base_job_template=template))
                    pools[kind] = (await client.read_work_pool(f"qwen-sft-{kind}")).base_job_template
                return names, pools

        with temporary_settings({PREFECT_API_URL: srv.api_url}):
            names, pools = asyncio.run(exercise())
        assert "servers-test-flow" in names
        assert pools["kubernetes"]["variables"]["properties"]["gpu_count"]["default"] == 1
        assert "device_requests" in json.dumps(pools["docker"]["variables"])
        assert _pg_count(db_url, "flow") == 1  # Prefect's tables live in PostgreSQL, not SQLite
        assert not list(srv.home.rglob("*.db"))
    assert srv.proc is None and srv.log_path.exists()
    assert not _database_exists(db_url.rsplit("/", 1)[1])
