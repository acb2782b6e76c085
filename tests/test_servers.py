"""Real MLflow and Prefect servers as the deployment runs them (slow: each start takes 20-50 s)."""

from __future__ import annotations

import json
import os

import psycopg2
import pytest
import requests

from tests.servers import REPO, mlflow_server, postgres_database, prefect_server

pytestmark = pytest.mark.slow


def _pg_count(url: str, table: str) -> int:
    dbname = url.rsplit("/", 1)[1]
    from tests.servers import PG_HOST, PG_PORT, PG_USER

    with psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


def _database_exists(name: str) -> bool:
    from tests.servers import _pg_admin_connection

    conn = _pg_admin_connection()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def test_mlflow_on_postgres_logs_run_and_registers_version(tmp_path):
    from mlflow import MlflowClient

    with postgres_database("mlflow") as db_url:
        with mlflow_server(tmp_path, "postgres", database_url=db_url) as srv:
            client = MlflowClient(tracking_uri=srv.url, registry_uri=srv.url)
            exp_id = client.create_experiment("servers-test")
            run = client.create_run(exp_id)
            client.log_param(run.info.run_id, "train.learning_rate", "0.0001")
            client.log_metric(run.info.run_id, "eval/loss", 1.25, step=3)
            weights = tmp_path / "model" / "weights.txt"
            weights.parent.mkdir()
            weights.write_text("not really weights")
            client.log_artifacts(run.info.run_id, str(weights.parent), "model")
            client.set_terminated(run.info.run_id)

            client.create_registered_model("servers-test-model")
            mv = client.create_model_version("servers-test-model", f"{run.info.artifact_uri}/model", run.info.run_id)
            client.set_registered_model_alias("servers-test-model", "candidate", mv.version)

            got = client.get_run(run.info.run_id)
            assert got.data.params == {"train.learning_rate": "0.0001"}
            assert got.data.metrics == {"eval/loss": 1.25}
            by_alias = client.get_model_version_by_alias("servers-test-model", "candidate")
            assert (by_alias.version, by_alias.run_id) == (mv.version, run.info.run_id)
            # artifacts go through the server's proxy into its local artifact folder
            downloaded = client.download_artifacts(run.info.run_id, "model/weights.txt", str(tmp_path / "dl"))
            assert open(downloaded).read() == "not really weights"
            assert list((tmp_path / f"mlflow-server-{srv.url.rsplit(':', 1)[1]}" / "artifacts").rglob("weights.txt"))
            # ...and the metadata really is in PostgreSQL
            assert _pg_count(db_url, "runs") == 1
            assert _pg_count(db_url, "model_versions") == 1
        assert srv.proc is None
    assert not _database_exists(db_url.rsplit("/", 1)[1])


def test_mlflow_basic_auth_accepts_right_password_refuses_wrong(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with mlflow_server(tmp_path, "sqlite", auth=True) as srv:
        api = f"{srv.url}/api/2.0/mlflow/experiments/search"
        ok = requests.post(api, json={"max_results": 1}, auth=(srv.username, srv.password), timeout=30)
        assert ok.status_code == 200, ok.text
        for auth in (None, (srv.username, srv.password + "x"), ("nobody", srv.password)):
            refused = requests.post(api, json={"max_results": 1}, auth=auth, timeout=30)
            assert refused.status_code in (401, 403), (auth, refused.status_code)

        for k, v in srv.client_env().items():
            monkeypatch.setenv(k, v)
        assert MlflowClient(srv.url).create_experiment("with-auth")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
        with pytest.raises(MlflowException, match="401|403|[Uu]nauthori|credentials"):
            MlflowClient(srv.url).create_experiment("refused")
        # the rendered auth config points at the user store in the server's home, holds no password
        rendered = (tmp_path / f"mlflow-server-{srv.url.rsplit(':', 1)[1]}" / "basic_auth.ini").read_text()
        assert "database_uri = sqlite:///" in rendered and srv.password not in rendered


def test_mlflow_restart_keeps_port_and_stores(tmp_path):
    from mlflow import MlflowClient

    with mlflow_server(tmp_path, "sqlite") as srv:
        client = MlflowClient(srv.url)
        exp_id = client.create_experiment("survives-restart")
        first_pid = srv.pid
        srv.stop()
        assert srv.proc is None
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{srv.url}/health", timeout=5)
        srv.start()
        assert srv.pid != first_pid
        assert client.get_experiment(exp_id).name == "survives-restart"


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
        assert not list((tmp_path / f"prefect-home-{srv.url.rsplit(':', 1)[1]}").rglob("*.db"))
    assert os.path.exists(srv.log_path) and srv.proc is None
