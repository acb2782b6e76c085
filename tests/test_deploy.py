"""Scheduled retraining: `qwen-sft deploy` and infra/prefect.yaml against a real Prefect server.

The slow test runs the team set-up end to end: Prefect server and MLflow server both on
PostgreSQL, `qwen-sft deploy` of the demo preset with a schedule, a process worker that runs
the triggered flow, and the run + registered candidate found in MLflow. Servers and the
worker are stopped by PID (process group) at the end, also when an assertion fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
import yaml

from flows.deploy import ENTRYPOINT, cron_schedule, deploy, deployment_parameters, ensure_work_pool
from sft_core.config import PipelineConfig, load_config
from sft_core.errors import ConfigError, OrchestrationError
from tests.servers import BIN, REPO, child_env, mlflow_server, pg_connect, postgres_database, prefect_server
from tests.test_flow import FAST

PREFECT_YAML = REPO / "infra" / "prefect.yaml"
PRESET_OF = {"finetune-qwen2.5-1.5b-medical": "qwen2.5-1.5b-medical", "finetune-demo-tiny-medical": "demo",
             "finetune-qwen2.5-1.5b-medical-docker": "qwen2.5-1.5b-medical",
             "finetune-qwen2.5-1.5b-medical-k8s": "qwen2.5-1.5b-medical"}


# --- fast: the pieces of a deployment --------------------------------------------------------------

def _prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def test_prefect_yaml_deploys_the_presets_by_name():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(_prefect_yaml())  # the schema `prefect deploy` reads
    assert {d.name for d in model.deployments} == set(PRESET_OF)
    for dep in model.deployments:
        preset = load_config(PRESET_OF[dep.name])
        assert dep.parameters["config"] == PRESET_OF[dep.name] and dep.parameters["refresh"] is False
        in_container = dep.name.endswith(("-docker", "-k8s"))
        assert dep.parameters["overrides"] == (["tracking.uri=http://mlflow:5000"] if in_container else [])
        assert deployment_parameters(dep.parameters["config"], dep.parameters["overrides"]) == dep.parameters
        assert dep.entrypoint == ENTRYPOINT == "flows.finetune.finetune"
        assert [(s.cron, s.timezone) for s in dep.schedules] == [(preset.schedule.cron, preset.schedule.timezone)]
        assert (dep.concurrency_limit.limit, dep.concurrency_limit.collision_strategy) == (1, "ENQUEUE")
        assert f"model:{preset.registry.name}" in dep.tags
        if in_container:
            kind = "docker" if dep.name.endswith("-docker") else "kubernetes"
            assert dep.work_pool.name == f"qwen-sft-{kind}" and (REPO / "infra" / "work-pools" / f"{kind}.json").exists()
            assert dep.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
        else:
            assert dep.work_pool.name == preset.schedule.work_pool and dep.pull is None


def test_the_entrypoint_is_the_installed_flow():
    from prefect.flows import load_flow_from_entrypoint

    from flows.finetune import finetune

    assert load_flow_from_entrypoint(ENTRYPOINT) is finetune
    from prefect.types.entrypoint import EntrypointType

    assert finetune.to_deployment(name="t", entrypoint_type=EntrypointType.MODULE_PATH).entrypoint == ENTRYPOINT


def test_parameters_are_what_a_user_types_checked_as_the_cli_checks_them():
    assert deployment_parameters("demo", ["train.max_steps=3"]) == {
        "config": "demo", "overrides": ["train.max_steps=3"], "refresh": False}
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'"):
        deployment_parameters("demo", ["train.epochz=3"])
    with pytest.raises(ConfigError, match="tracking.uri"):
        deployment_parameters("demo", ["tracking.uri=http://alice:s3cret@mlflow:5000"])


def test_the_flow_parameters_a_ui_offers_are_the_preset_the_overrides_and_refresh():
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    schema = parameter_schema(finetune).model_dump()
    assert list(schema["properties"]) == ["config", "overrides", "refresh"] and schema["required"] == ["config"]
    item = schema["definitions"].get("Override") or schema["properties"]["overrides"]["anyOf"][0]["items"]
    import re

    pattern = re.compile(item["pattern"])
    assert pattern.match("train.learning_rate=5e-5") and pattern.match("workdir=/srv/qwen")
    for bad in ("train.learning_rate", "=5e-5", "train .lr=1", "1train.lr=1"):
        assert not pattern.match(bad), bad


def test_schedule_defaults_to_the_config_and_names_a_bad_setting():
    cfg = load_config("demo", ["schedule.timezone=Asia/Shanghai"])
    sched = cron_schedule(cfg)
    assert (sched.cron, sched.timezone) == ("0 3 * * 1", "Asia/Shanghai")
    assert cron_schedule(cfg, "*/5 * * * *").cron == "*/5 * * * *"
    with pytest.raises(ConfigError, match="schedule.cron '61 \\* \\* \\* \\*'"):
        cron_schedule(cfg, "61 * * * *")
    with pytest.raises(ConfigError, match="Invalid timezone"):
        cron_schedule(cfg, timezone="Mars/Olympus")


def test_the_flow_pickles_as_serve_sends_it_to_its_run_process(tmp_path):
    """`qwen-sft serve` runs each flow run in a spawned process and cloudpickles the flow into it: a ContextVar among
    the globals pickled with it crashed every served run, and the flow it unpickled could not check its parameters
    (#27). Here a fresh interpreter unpickles it and checks parameters as Prefect's engine does."""
    import sys

    import cloudpickle

    from flows.finetune import finetune

    payload = tmp_path / "flow.pickle"
    payload.write_bytes(cloudpickle.dumps(finetune))
    code = ("import pickle, sys; f = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(f.name, f.validate_parameters({'config': 'demo', 'overrides': ['train.max_steps=3']}))")
    out = subprocess.run([sys.executable, "-c", code, str(payload)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("finetune {'config': 'demo', 'overrides': ['train.max_steps=3']"), out.stdout


def test_a_deployment_carries_where_its_runs_land(tmp_path, monkeypatch):
    """Without it a process worker starts a run in a temporary folder that it deletes afterwards, with the workdir
    and the embedded store in it (#27): the folder and this shell's tracking store go with the deployment."""
    from flows.deploy import run_location
    from sft_core import process

    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo")
    here = run_location(cfg)
    assert here["job_variables"] == {"working_dir": str(tmp_path.resolve())}
    assert here["workdir"] == str(tmp_path.resolve() / ".qwen-sft")
    assert (here["tracking"], here["tracking_from"]) == (f"sqlite:///{tmp_path.resolve() / '.qwen-sft'}/mlflow.db",
                                                         "embedded")
    assert run_location(cfg, "/app")["job_variables"] == {"working_dir": "/app"}

    monkeypatch.setattr(process, "_user_environment", {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    carried = run_location(cfg)
    assert carried["job_variables"]["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert carried["tracking_from"] == "MLFLOW_TRACKING_URI"
    named = run_location(load_config("demo", ["tracking.uri=http://other:5000"]))
    assert "env" not in named["job_variables"] and named["tracking_from"] == "tracking.uri", "tracking.uri wins"
    monkeypatch.setattr(process, "_user_environment", {"MLFLOW_TRACKING_URI": "http://alice:s3cret@mlflow:5000"})
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI holds a credential") as refused:
        run_location(cfg)
    assert "s3cret" not in str(refused.value)


def test_deploy_needs_a_reachable_prefect_api():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(OrchestrationError, match="PREFECT_API_URL is not set"):
            deploy("demo")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(OrchestrationError, match=r"http://127.0.0.1:9/api \(PREFECT_API_URL\) is unreachable"):
            deploy("demo")


# --- slow: the team set-up end to end --------------------------------------------------------------

def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _run_group(argv: list[str], env: dict[str, str], log: Path, timeout: float, cwd: Path = REPO) -> int:
    """Run a command in its own process group, output to `log`; kill the group on timeout or error."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout)
        finally:
            if proc.poll() is None:
                _stop_group(proc, grace=5)


def _tail(path: Path, chars: int = 5000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _serve_until_registered(client, argv: list[str], name: str, env: dict[str, str], log: Path,
                            timeout: float = 180) -> tuple:
    """Start `qwen-sft serve`, wait for its deployment `name` to appear, SIGTERM the process (only it, as a service
    manager would) and wait for it to exit; (the deployment while served, its exit code, seconds to stop)."""
    import time

    from prefect.exceptions import ObjectNotFound

    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                served = client.read_deployment_by_name(name)
                break
            except ObjectNotFound:
                time.sleep(1)
        else:
            raise AssertionError(f"`qwen-sft serve` did not register {name} (exit {proc.poll()}):\n{_tail(log)}")
        time.sleep(2)  # serving, not only registered
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            code = None  # did not stop: the assertion below says so
        return served, code, time.monotonic() - started
    finally:
        _stop_group(proc, grace=5)


def _stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds (serve leaves a resource_tracker)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _pg_count(database_url: str, table: str) -> int:
    with closing(pg_connect(database_url.rsplit("/", 1)[1])) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


def _start_servers(stack: ExitStack, tmp_path: Path):
    """Prefect and MLflow servers, each on its own PostgreSQL database, started side by side."""
    from concurrent.futures import ThreadPoolExecutor

    def start_prefect():
        return stack.enter_context(prefect_server(tmp_path, database_url=stack.enter_context(postgres_database("prefect"))))

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_prefect), pool.submit(lambda: stack.enter_context(mlflow_server(tmp_path, "postgres")))]
    return [f.result() for f in futures]  # raises the first start failure; the stack stops what did start


@pytest.mark.slow
def test_deploy_schedule_worker_run_lands_in_mlflow_on_postgres(tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pool, name = "qwen-sft-test-process", "finetune/finetune-demo-tiny-medical"
    overrides = [*FAST, f"workdir={tmp_path / 'workdir'}", "registry.name=deploy-test-model"]
    with ExitStack() as stack:
        prefect, mlflow = _start_servers(stack, tmp_path)
        overrides.append(f"tracking.uri={mlflow.url}")
        cfg = load_config("demo", overrides)
        env = child_env(PREFECT_API_URL=prefect.api_url, PREFECT_HOME=str(tmp_path / "prefect-client"),
                        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        stack.enter_context(temporary_settings({PREFECT_API_URL: prefect.api_url}))
        client = stack.enter_context(get_client(sync_client=True))

        # `qwen-sft deploy` registers the flow with its schedule, parameters, pool and concurrency limit
        deploy_log = tmp_path / "deploy.log"
        code = _run_group([str(BIN / "qwen-sft"), "deploy", "-c", "demo", *_sets(overrides), "--cron", "0 4 * * 2",
                           "--timezone", "Europe/Berlin", "--pool", pool, "--working-dir", str(tmp_path)], env,
                          deploy_log, timeout=300)
        assert code == 0, _tail(deploy_log)
        dep = client.read_deployment_by_name(name)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [
            ("0 4 * * 2", "Europe/Berlin", True)]
        assert dep.global_concurrency_limit.limit == 1
        assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
        assert dep.parameters == {"config": "demo", "overrides": overrides, "refresh": False}
        assert dep.work_pool_name == pool and client.read_work_pool(pool).type == "process"
        assert dep.entrypoint == ENTRYPOINT == "flows.finetune.finetune"
        assert dep.job_variables == {"working_dir": str(tmp_path.resolve())}
        assert "model:deploy-test-model" in dep.tags

        # deploying again updates the same deployment (one schedule, the new one)
        again = deploy("demo", overrides, cron="30 2 * * *", pool=pool, working_dir=tmp_path)
        assert again["id"] == str(dep.id) and not again["pool_created"]
        assert [s.schedule.cron for s in client.read_deployment(dep.id).schedules] == ["30 2 * * *"]

        # trigger a run now; a process worker picks it up and runs it to completion
        flow_run = client.create_flow_run_from_deployment(dep.id)
        worker_log = tmp_path / "worker.log"
        code = _run_group([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"], env, worker_log,
                          timeout=600, cwd=tmp_path)
        state = client.read_flow_run(flow_run.id).state
        assert code == 0 and state.type == StateType.COMPLETED, f"{state}\n{_tail(worker_log)}"

        # the run and its registered candidate are in MLflow, whose metadata is in PostgreSQL
        mlc = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)
        exp = mlc.get_experiment_by_name("sample--qwen2")
        runs = mlc.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        steps = int(next(o.split("=", 1)[1] for o in FAST if o.startswith("train.max_steps=")))
        assert sorted({m.step for m in mlc.get_metric_history(run.info.run_id, "train/loss")}) == list(range(1, steps + 1))
        candidate = mlc.get_model_version_by_alias("deploy-test-model", "candidate")
        assert candidate.run_id == run.info.run_id
        assert _pg_count(mlflow.database_url, "runs") == 1 and _pg_count(mlflow.database_url, "model_versions") == 1

        # `qwen-sft serve`: the same flow served from one foreground process (no pool, no worker), under a deployment
        # of its own; SIGTERM stops it cleanly and pauses nothing `deploy` registered
        served, code, stop_s = _serve_until_registered(
            client, [str(BIN / "qwen-sft"), "serve", "-c", "demo", *_sets(overrides)],
            "finetune/finetune-demo-tiny-medical-serve", env, tmp_path / "serve.log")
        assert served.id != dep.id and served.work_pool_name is None
        assert [s.schedule.cron for s in served.schedules] == ["0 3 * * 1"]
        assert served.global_concurrency_limit.limit == 1 and served.parameters == dep.parameters
        assert code == 0 and stop_s < 30, f"serve exited {code} {stop_s:.0f} s after SIGTERM:\n{_tail(tmp_path / 'serve.log')}"
        deployed = client.read_deployment(dep.id)
        assert deployed.work_pool_name == pool and not deployed.paused, "serve took over or paused deploy's deployment"
        assert [s.active for s in deployed.schedules] == [True]

        # infra/prefect.yaml deploys with `prefect deploy --all` once its pools exist
        assert ensure_work_pool("qwen-sft-process") is True and ensure_work_pool("qwen-sft-process") is False
        for kind in ("docker", "kubernetes"):
            template = json.loads((REPO / "infra" / "work-pools" / f"{kind}.json").read_text())
            client.create_work_pool(WorkPoolCreate(name=f"qwen-sft-{kind}", type=kind, base_job_template=template))
        yaml_log = tmp_path / "prefect-deploy.log"
        code = _run_group([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)],
                          env, yaml_log, timeout=300)
        assert code == 0, _tail(yaml_log)
        for dep_name, preset in PRESET_OF.items():
            d = client.read_deployment_by_name(f"finetune/{dep_name}")
            assert d.parameters["config"] == preset and load_config(preset).name in d.name
            assert d.global_concurrency_limit.limit == 1 and [s.schedule.cron for s in d.schedules] == ["0 3 * * 1"]
        k8s = client.read_deployment_by_name("finetune/finetune-qwen2.5-1.5b-medical-k8s")
        assert k8s.work_pool_name == "qwen-sft-kubernetes"
        assert k8s.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
        demo = client.read_deployment_by_name("finetune/finetune-demo-tiny-medical")
        assert [s.active for s in demo.schedules] == [False]
    assert prefect.proc is None and mlflow.proc is None


# --- slow: the README's team set-up, as printed (#27) -----------------------------------------------

TEAM_OVERRIDES = [o for o in FAST if not o.startswith("registry.name=")] + ["registry.name=team-setup-model"]


def _printed(log: Path, label: str) -> str:
    """The command `qwen-sft deploy` printed after `label:`."""
    import re

    found = re.search(rf"^{label}:\s+(.+)$", log.read_text(), re.MULTILINE)
    assert found, f"`qwen-sft deploy` printed no '{label}' line:\n{_tail(log)}"
    return found.group(1).strip()


def _start_in_background(command: str, env: dict[str, str], cwd: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`command &` from a script, as a user's start-up script runs a worker (SIGINT ignored in it); (the shell, the
    command's process id)."""
    import time

    pid_file = cwd / f"{log.stem}.pid"
    with open(log, "ab") as out:
        shell = subprocess.Popen(["bash", "-c", f"{command} & echo $! > {pid_file}; wait"], cwd=cwd, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return shell, int(pid_file.read_text())


def _stops_on_sigterm(shell: subprocess.Popen, pid: int, log: Path, within: float = 30) -> float:
    """SIGTERM the process `pid` alone; seconds until it (and the shell waiting on it) ended."""
    import time

    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    try:
        shell.wait(within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {within:.0f} s after SIGTERM:\n{_tail(log)}") from None
    return time.monotonic() - started


def _wait_until_logged(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, f"no '{text}' (exit {proc.poll()}):\n{_tail(log)}"
        time.sleep(1)


def _wait_for_deployment(client, name: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import time

    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.read_deployment_by_name(name)
            return
        except ObjectNotFound:
            assert proc.poll() is None and time.monotonic() < deadline, f"no {name} (exit {proc.poll()}):\n{_tail(log)}"
            time.sleep(1)


def _run_now(command: str, env: dict[str, str], cwd: Path) -> str:
    """Run the printed `prefect deployment run '...'`; the flow run's id."""
    import re
    import shlex

    out = subprocess.run(shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)


def _wait_final(client, flow_run_id: str, logs: list[Path], timeout: float = 900):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        if state and state.is_final():
            return state
        time.sleep(3)
    raise AssertionError(f"flow run {flow_run_id} not final after {timeout:.0f} s:\n" + "\n".join(map(_tail, logs)))


def _summary_link_resolves(client, flow_run_id: str, mlc) -> str:
    """The `finetune-summary` artifact of the flow run links to an MLflow run that exists; that run's id."""
    import re
    import urllib.request

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["finetune-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    url = re.search(r"MLflow run: \[\w+\]\(([^)]+)\)", artifact.data).group(1)
    exp_id, run_id = re.search(r"#/experiments/(\d+)/runs/(\w+)", url).groups()
    assert mlc.get_run(run_id).info.experiment_id == exp_id, url
    with urllib.request.urlopen(url.split("#")[0], timeout=10) as page:  # the UI that serves the page is up
        assert page.status == 200
    return run_id


@pytest.mark.slow
def test_the_readme_team_setup_runs_as_printed(tmp_path):
    """README, team set-up: `qwen-sft deploy -c <preset> --set ...` in the project folder with the team's MLflow in
    MLFLOW_TRACKING_URI, then the worker command it prints, started as a start-up script starts it (in the
    background, elsewhere, without MLFLOW_TRACKING_URI), and `qwen-sft serve`: each triggered run ends Completed,
    lands in the project folder's workdir, registers in that MLflow, and its summary links to a run that exists;
    the worker stops on SIGTERM (#27: serve crashed every run; the worker trained in a folder Prefect deleted,
    registered in a store nobody saw, and ignored SIGTERM)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    with ExitStack() as stack:
        with ThreadPoolExecutor(2) as pool:
            started = [pool.submit(lambda: stack.enter_context(prefect_server(tmp_path))),
                       pool.submit(lambda: stack.enter_context(mlflow_server(tmp_path)))]
        prefect, mlflow = (f.result() for f in started)
        base = dict(PREFECT_API_URL=prefect.api_url, PREFECT_HOME=str(tmp_path / "prefect-client"), HF_HUB_OFFLINE="1",
                    TOKENIZERS_PARALLELISM="false")
        shell_env = child_env(**base, MLFLOW_TRACKING_URI=mlflow.url)  # the deploying user's shell
        worker_env = child_env(**base)  # a worker's service: no MLFLOW_TRACKING_URI of its own
        stack.enter_context(temporary_settings({PREFECT_API_URL: prefect.api_url}))
        client = stack.enter_context(get_client(sync_client=True))
        mlc = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)

        deploy_log = tmp_path / "deploy.log"
        code = _run_group([str(BIN / "qwen-sft"), "deploy", "-c", "demo", *_sets(TEAM_OVERRIDES)], shell_env,
                          deploy_log, timeout=300, cwd=project)
        assert code == 0, _tail(deploy_log)
        worker_cmd, run_cmd = _printed(deploy_log, "start a worker"), _printed(deploy_log, "run it now")
        dep = client.read_deployment_by_name("finetune/finetune-demo-tiny-medical")
        assert dep.job_variables == {"working_dir": str(project.resolve()), "env": {"MLFLOW_TRACKING_URI": mlflow.url}}

        # (b) the worker, as printed
        worker_log = tmp_path / "worker.log"
        shell, worker_pid = _start_in_background(worker_cmd, worker_env, elsewhere, worker_log)
        try:
            _wait_until_logged(worker_log, "started!", shell)
            flow_run_id = _run_now(run_cmd, shell_env, project)
            state = _wait_final(client, flow_run_id, [worker_log])
            assert state.type == StateType.COMPLETED, f"{state}\n{_tail(worker_log)}"
            stop_s = _stops_on_sigterm(shell, worker_pid, worker_log)
        finally:
            _stop_group(shell, grace=5)
        print(f"worker flow run {flow_run_id}: {state.type.value}; worker stopped {stop_s:.1f} s after SIGTERM")
        assert (project / ".qwen-sft" / "train").is_dir(), "the run trained in the project folder's workdir"
        run_id = _summary_link_resolves(client, flow_run_id, mlc)
        run = mlc.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["prefect.flow_run_id"] == flow_run_id
        assert mlc.get_model_version_by_alias("team-setup-model", "candidate").run_id == run_id

        # (a) `qwen-sft serve`, a run triggered on its deployment
        serve_log = tmp_path / "serve.log"
        with open(serve_log, "ab") as out:
            served = subprocess.Popen([str(BIN / "qwen-sft"), "serve", "-c", "demo", *_sets(TEAM_OVERRIDES)],
                                      cwd=project, env=shell_env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for_deployment(client, "finetune/finetune-demo-tiny-medical-serve", served, serve_log)
            served_run = _run_now("prefect deployment run 'finetune/finetune-demo-tiny-medical-serve'", shell_env,
                                  project)
            state = _wait_final(client, served_run, [serve_log])
            assert state.type == StateType.COMPLETED, f"{state}\n{_tail(serve_log)}"
            served.send_signal(signal.SIGTERM)
            assert served.wait(60) == 0, _tail(serve_log)
        finally:
            _stop_group(served, grace=5)
        print(f"served flow run {served_run}: {state.type.value}")
        assert _summary_link_resolves(client, served_run, mlc) == run_id, "unchanged config and data: the same run"
        assert served_run in mlc.get_run(run_id).data.tags["prefect.flow_run_ids"]
        assert [int(v.version) for v in mlc.search_model_versions("name = 'team-setup-model'")] == [1], \
            "cached: nothing new registered"


@pytest.mark.slow
def test_the_printed_worker_command_stops_on_sigterm_started_in_the_background(tmp_path):
    """A start-up script's `cmd &` leaves SIGINT ignored in the worker; Prefect's worker turns SIGTERM into SIGINT,
    so `prefect worker start` started that way ignored SIGTERM until SIGKILL (#27)."""
    with prefect_server(tmp_path) as prefect:
        env = child_env(PREFECT_API_URL=prefect.api_url, PREFECT_HOME=str(tmp_path / "prefect-client"))
        deploy_log = tmp_path / "deploy.log"
        code = _run_group([str(BIN / "qwen-sft"), "deploy", "-c", "demo", "--paused"], env, deploy_log, timeout=300,
                          cwd=tmp_path)
        assert code == 0, _tail(deploy_log)
        log = tmp_path / "worker.log"
        shell, pid = _start_in_background(_printed(deploy_log, "start a worker"), env, tmp_path, log)
        try:
            _wait_until_logged(log, "started!", shell)
            assert _stops_on_sigterm(shell, pid, log) < 30
        finally:
            _stop_group(shell, grace=5)
