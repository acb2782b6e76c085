"""The deployment files parse and say what they must: compose stack, accelerate configs, work pools."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
ACCELERATE = INFRA / "accelerate"


# --- docker compose -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    # No compose plugin or engine on this machine (`docker compose` is unknown): parse it as YAML.
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_has_the_stack_with_ports_volumes_healthchecks(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker"} <= set(services)
    named = set(compose["volumes"])
    for name in ("postgres", "minio", "mlflow", "prefect-server", "worker"):
        svc = services[name]
        assert svc["env_file"] == ".env", name
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            assert source in named or (INFRA / source).exists(), f"{name}: volume source {source!r}"
    published = {p.rsplit(":", 1)[-1] for s in services.values() for p in s.get("ports", [])}
    assert {"5432", "9000", "5000", "4200"} <= published
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))


def test_compose_wiring_between_services(compose):
    s = compose["services"]
    assert s["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                        "minio-init": {"condition": "service_completed_successfully"}}
    env = s["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mlflow:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://") and s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(
        "@postgres:5432/prefect")
    worker = s["worker"]
    assert worker["command"][:4] == ["qwen-sft", "worker", "--pool", "qwen-sft-process"], "stops on SIGTERM"
    assert worker["init"] is True
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name in ("mlflow", "worker"):
        assert (REPO / s[name]["build"]["dockerfile"]).exists()
    init_sql = (INFRA / "docker" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init_sql and "CREATE DATABASE prefect" in init_sql


def test_no_secret_values_committed(compose):
    # every password/secret/key in compose is an interpolation of infra/.env, never a literal
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search("PASSWORD|SECRET|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"infra/compose.yaml: {name}.{key} has a literal value"
    db_url = compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert ":${POSTGRES_PASSWORD" in db_url
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for key, value in example.items():
        if re.search("PASSWORD|SECRET|TOKEN", key):
            assert value.startswith("change-me"), f"infra/.env.example: {key} must be a placeholder"
    assert subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO).returncode == 0, \
        "infra/.env must be gitignored"


# --- mlflow/ scripts --------------------------------------------------------------------------

def test_mlflow_folder_is_scripts_only():
    assert not list((REPO / "mlflow").rglob("__init__.py")), "mlflow/ must not shadow the mlflow package"
    subprocess.run(["bash", "-n", str(REPO / "mlflow" / "server.sh")], check=True)


def test_pyproject_lists_every_package():
    """setuptools' explicit package list: a new sub-package left out of it is missing from the wheel."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapped = set(setuptools["packages"]), setuptools["package-dir"]
    found = {".".join(init.parent.relative_to(REPO).parts)
             for top in ("sft_core", "tasks", "flows") for init in (REPO / top).rglob("__init__.py")}
    assert found | set(mapped) == listed
    for package, folder in mapped.items():  # data folders at the top of the repository, shipped inside sft_core
        assert (REPO / folder / "__init__.py").is_file(), package


def test_server_sh_rejects_bad_mode_and_missing_auth_password(tmp_path):
    sh = str(REPO / "mlflow" / "server.sh")
    bad = subprocess.run(["bash", sh, "mysql"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "unknown argument 'mysql'" in bad.stderr
    no_pw = subprocess.run(["bash", sh, "sqlite", "--auth"], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "MLFLOW_HOME": str(tmp_path)})
    assert no_pw.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in no_pw.stderr


def _server_sh(tmp_path, *args: str, **env: str) -> list[str]:
    """The `mlflow server` argv that server.sh would exec (MLFLOW_BIN=echo prints it instead)."""
    base = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "MLFLOW_BIN": "echo",
            "PYTHON": sys.executable, "MLFLOW_HOME": str(tmp_path / "home")}
    out = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh"), *args], env=base | env,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_server_sh_postgres_mode_url_encodes_credentials(tmp_path):
    argv = _server_sh(tmp_path, "postgres", "--", "--workers", "3",
                      POSTGRES_PASSWORD="p@ss:w/rd%", POSTGRES_HOST="db", MLFLOW_PORT="5123")
    backend = argv[argv.index("--backend-store-uri") + 1]
    assert backend == "postgresql+psycopg2://postgres:p%40ss%3Aw%2Frd%25@db:5432/mlflow"
    from sqlalchemy.engine import make_url

    assert make_url(backend).password == "p@ss:w/rd%"
    assert argv[argv.index("--port") + 1] == "5123" and argv[-2:] == ["--workers", "3"]
    assert "--serve-artifacts" in argv and (tmp_path / "home" / "artifacts").is_dir()


def test_server_sh_sqlite_mode_uses_absolute_sqlite_uri(tmp_path):
    argv = _server_sh(tmp_path)
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/home/mlflow.db"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5000"


def test_server_sh_auth_renders_config_mlflow_can_read(tmp_path, monkeypatch):
    uri = "postgresql+psycopg2://auth:p%40x@db/auth"
    argv = _server_sh(tmp_path, "sqlite", "--auth", MLFLOW_AUTH_ADMIN_PASSWORD="a-long-enough-password",
                      MLFLOW_AUTH_DATABASE_URI=uri)
    assert argv[-2:] == ["--app-name", "basic-auth"]
    rendered = tmp_path / "home" / "basic_auth.ini"
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o600
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(rendered))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "x" * 12)
    config = read_auth_config()
    assert config.database_uri == uri  # the % survived configparser
    assert config.admin_password == "x" * 12  # from the environment, not the file


def test_basic_auth_template_holds_no_password():
    import configparser

    cp = configparser.ConfigParser(interpolation=None)
    cp.read(REPO / "mlflow" / "basic_auth.ini")
    assert cp["mlflow"]["database_uri"] == "${MLFLOW_AUTH_DATABASE_URI}"
    assert "admin_password" not in cp["mlflow"]


# --- accelerate -----------------------------------------------------------------------------

def _launch_args(config: str, *extra: str):
    """What `accelerate launch --config_file <config> <extra> train.py` resolves to."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / config), *extra, "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml", "cpu_gloo.yaml"])
def test_accelerate_configs_load_and_num_processes_overrides(config):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(ACCELERATE / config))  # raises on unknown keys
    assert cfg.num_machines == 1
    args, _ = _launch_args(config, "--num_processes", "3")
    assert args.num_processes == 3
    header = (ACCELERATE / config).read_text().splitlines()[:6]
    assert any(f"accelerate launch --config_file infra/accelerate/{config}" in line for line in header)


def test_fsdp_config_builds_full_shard_plugin_for_qwen2():
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, defaults = _launch_args("fsdp.yaml", "--num_processes", "4")
    assert args.use_fsdp and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    plugin.set_state_dict_type("FULL_STATE_DICT")  # what the final save does
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    from transformers.models.qwen2 import modeling_qwen2

    assert hasattr(modeling_qwen2, "Qwen2DecoderLayer")


def test_deepspeed_config_is_zero3_with_16bit_save():
    args, defaults = _launch_args("deepspeed_zero3.yaml")
    assert args.use_deepspeed and args.mixed_precision == "bf16"
    assert defaults.deepspeed_config == {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True,
                                         "offload_optimizer_device": "none", "offload_param_device": "none"}


@pytest.mark.slow
def test_cpu_gloo_runs_two_ranks_on_gloo(tmp_path):
    """The real launcher: 2 CPU processes that all-reduce over gloo."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from accelerate import PartialState\n"
        "s = PartialState(cpu=True)\n"
        "t = torch.tensor([s.process_index + 1.0]); dist.all_reduce(t)\n"
        "line = (f'rank={s.process_index} world={s.num_processes} type={s.distributed_type.value} '\n"
        "        f'backend={dist.get_backend()} sum={t.item()}')\n"
        "open(f'rank{s.process_index}.txt', 'w').write(line)\n"  # one file per rank: a shared stdout interleaves
        "dist.destroy_process_group()\n"  # without it, gloo's threads may abort the exit ("terminate called ...")
    )
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "cpu_gloo.yaml"),
         str(script)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert lines == [f"rank={r} world=2 type=MULTI_CPU backend=gloo sum=3.0" for r in (0, 1)]


# --- Prefect work pools ------------------------------------------------------------------------

def _render(pool: str) -> dict:
    """The job configuration a worker of this pool gets with default variables (Prefect's own templating)."""
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "work-pools" / f"{pool}.json").read_text())
    validate_base_job_template(template)  # the server's check: every placeholder is a declared variable
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(template["job_configuration"], defaults)


def test_kubernetes_pool_requests_one_gpu():
    job = _render("kubernetes")["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "qwen-sft-pipeline:latest"
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"


def test_docker_pool_requests_gpus_docker_py_accepts():
    from docker.types import HostConfig

    kwargs = _render("docker")["container_create_kwargs"]
    host = HostConfig(version="1.44", **kwargs)  # what docker-py builds for containers.create
    assert host["DeviceRequests"][0]["Driver"] == "nvidia"
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert host["DeviceRequests"][0]["Count"] == -1  # all GPUs, like `docker run --gpus all`


# --- the reproducible install -------------------------------------------------------------------

def test_the_lock_pins_every_dependency_and_every_install_uses_it():
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *[d for extra in project["optional-dependencies"].values() for d in extra]]
    lock = (REPO / "requirements" / "lock.txt").read_text()
    pinned = {m.group(1).lower().replace("_", "-"): m.group(2)
              for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)$", lock, re.MULTILINE)}
    for requirement in wanted:
        name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name == "torch":  # pinned in requirements/torch.txt: its build, and its dependencies, differ by machine
            assert "torch" not in pinned and (REPO / "requirements" / "torch.txt").read_text().strip() == "torch==2.13.0"
            continue
        assert name in pinned, f"{name} is not in requirements/lock.txt (make lock)"
    assert pinned["mlflow"] == "3.17.2", "STACK.md: 3.18.0's skinny package is missing"
    assert "requirements/lock.txt" in (REPO / "Makefile").read_text()
    assert "make install" in (REPO / ".ci" / "run").read_text()


def test_the_image_installs_the_wheel_and_no_source_tree():
    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    build, final = text.split("\nFROM ", 2)[1:]
    assert "pip wheel" in build
    assert "requirements/lock.txt" in final and "--no-deps /tmp/dist/*.whl" in final
    copied = [line.split()[1] for line in final.splitlines() if line.startswith("COPY") and "--from" not in line]
    assert all(path.startswith("requirements/") for path in copied), copied


def test_every_line_of_the_operations_table_names_a_test_that_exists():
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Operations: what happens when things go wrong", 1)[1].split("\n\n", 2)[2].split("\n\n")[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith(("| failure", "|---"))]
    assert len(rows) >= 15
    for row in rows:
        refs = re.findall(r"`(?:(test_\w+)\.py)?::(test_\w+)`", row)
        assert refs, f"no test named: {row[:80]}"
        module = None
        for file_part, name in refs:
            module = file_part or module
            source = (REPO / "tests" / f"{module}.py").read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{module}.py has no {name}"


def test_a_missing_shared_input_fails_in_ci_and_only_skips_on_a_users_clone(monkeypatch):
    """`../shared` is there in CI: a test that needs it fails there when it is missing, never skips silently."""
    from tests.conftest import require

    require(True, "anything")  # present: nothing happens
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        require(False, "the real Qwen2.5 tokenizer")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not on this machine"):
        require(False, "the real Qwen2.5 tokenizer")
