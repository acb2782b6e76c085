"""Serving the promoted model: `qwen-sft serve-model` answers a question over HTTP on loopback.

The tiny model is trained by the real flow with `registry.auto_promote=true`, so the test also
checks that a first retraining is gated into @production without a manual promote.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

from tasks.tracking.serving import check_alias, model_uri, serving_command
from sft_core.config import load_config
from sft_core.errors import PromotionError
from tests.servers import BIN, ServerProcess, child_env, free_port
from tests.test_flow import FAST


def _overrides(workdir: Path) -> list[str]:
    return [*FAST, f"workdir={workdir}", "registry.name=serve-test-model", "registry.auto_promote=true"]


def test_serving_command_targets_the_alias_in_the_configured_store(tmp_path):
    from tasks.tracking import tracking_uri

    cfg = load_config("demo", _overrides(tmp_path))
    argv, env = serving_command(cfg, alias="candidate", port=5123)
    assert argv[:5] == [sys.executable, "-m", "mlflow", "models", "serve"]
    assert argv[argv.index("-m", 3) + 1] == model_uri(cfg, "candidate") == "models:/serve-test-model@candidate"
    assert argv[argv.index("--env-manager") + 1] == "local" and argv[argv.index("--port") + 1] == "5123"
    assert env["MLFLOW_TRACKING_URI"] == env["MLFLOW_REGISTRY_URI"] == tracking_uri(cfg)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)  # where `uvicorn` is


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_promoted_model_answers_over_http(tmp_path):
    import mlflow

    from flows.finetune import finetune
    from tasks.tracking import aliases, tracking_uri

    overrides = _overrides(tmp_path / "workdir")
    cfg = load_config("demo", overrides)
    with pytest.raises(PromotionError, match="no @production version"):
        check_alias(cfg)
    summary = finetune(config="demo", overrides=overrides)
    version = summary["registered"]["version"]
    assert summary["promoted"]["production"] == version, "auto_promote moves the first candidate to production"
    assert aliases(cfg) == {"candidate": version, "production": version} and check_alias(cfg) == version
    mlflow.set_tracking_uri(tracking_uri(cfg))
    info = mlflow.models.get_model_info(model_uri(cfg))
    assert info.flavors["transformers"]["task"] == "text-generation"
    assert "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n" in info.metadata["prompt_template"]
    assert {p.name for p in info.signature.params} == {"max_new_tokens", "do_sample", "temperature", "top_p"}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "qwen-sft"), "serve-model", "-c", "demo", *[a for o in overrides for a in ("--set", o)],
            "--port", str(port)]
    server = ServerProcess(name="serve-model", argv=argv, env=child_env(HF_HUB_OFFLINE="1"), url=url,
                           health_url=f"{url}/ping", log_path=tmp_path / "serve-model.log", cwd=tmp_path, timeout=240)
    try:
        server.start()
        questions = ["头痛三天了，应该怎么办？", "发烧到39度需要去医院吗？"]
        # sampled, so even a barely trained tiny model says something other than blank lines
        resp = requests.post(f"{url}/invocations", json={"inputs": questions,
                                                         "params": {"do_sample": True, "max_new_tokens": 16}}, timeout=120)
        assert resp.status_code == 200, resp.text
        answers = resp.json()["predictions"]
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
        assert any(a.strip() for a in answers), answers
        # without params the served model decodes greedily, like evaluation: the same answer twice
        greedy = [requests.post(f"{url}/invocations", json={"inputs": questions[:1]}, timeout=120) for _ in range(2)]
        assert [r.status_code for r in greedy] == [200, 200] and greedy[0].json() == greedy[1].json()
    finally:
        server.stop()
    assert server.proc is None


@pytest.mark.slow
def test_the_local_ui_is_one_light_server(tmp_path):
    """`qwen-sft ui` serves one user: the MLflow web server and one worker, no job runner (MLflow 3's defaults
    start ~14 processes and ~2.3 GB)."""
    import psutil

    from tasks import tracking

    cfg = load_config("demo", [f"workdir={tmp_path}"])
    tracking.ensure_experiment(cfg)  # a store to show
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(name="ui", argv=[str(BIN / "qwen-sft"), "ui", "-c", "demo", "--set", f"workdir={tmp_path}",
                                            "--port", str(port)], env=child_env(), url=url, health_url=f"{url}/health",
                           log_path=tmp_path / "ui.log", cwd=tmp_path, timeout=180)
    try:
        server.start()
        assert requests.get(url, timeout=30).status_code == 200
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        rss_mb = sum(p.memory_info().rss for p in tree) / 2**20
        print(f"ui: {len(tree)} processes, {rss_mb:.0f} MB")
        assert len(tree) <= 3 and rss_mb < 1024, [p.cmdline()[:4] for p in tree]
        assert not any("huey" in " ".join(p.cmdline()) for p in tree), "no job runner for a local UI"
    finally:
        server.stop()
    assert server.proc is None
