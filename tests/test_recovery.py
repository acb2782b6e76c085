"""Never stuck, never leaking: each crash or corruption recovers by re-running the same command, and no
secret reaches a message, a log line, a param, a tag or a Prefect parameter.

Each test reproduces the original failure (a truncated checkpoint, a 0-byte config from a killed build, a full
disk on a tiny tmpfs, an orphan PENDING logged model, a basic-auth MLflow server, two runs at once) and fails if
it comes back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from sft_core.config import load_config
from tests.servers import BIN, REPO, child_env, mlflow_server
from tests.test_reliability import FAST

runner = CliRunner()


def _cli(args: list[str], tmp_path: Path, *, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "qwen-sft"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=env or child_env(PREFECT_HOME=str(tmp_path / "prefect-home")))


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _mlflow(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _one_of_each(c, registry: str) -> str:
    """One run, one registered version, one logged model, no duplicate metric step; the run id."""
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info.status for r in runs]
    run_id = runs[0].info.run_id
    assert len(c.search_model_versions(f"name = '{registry}'")) == 1
    models = c.search_logged_models(experiment_ids=[runs[0].info.experiment_id])
    assert len(models) == 1 and str(models[0].status).endswith("READY"), [m.status for m in models]
    for key in ("train/loss", "selection/loss", "eval/loss"):
        steps = [m.step for m in c.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at some step: {sorted(steps)}"
    return run_id


# --- 1. a damaged checkpoint -------------------------------------------------------------------

def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_resumes(tmp_path):
    from sft_core.checkpoints import checkpoint_problem, last_checkpoint, write_manifest

    out = tmp_path / "train"
    for step in (4, 8):
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
        (ckpt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
        write_manifest(ckpt)
    newest = out / "checkpoint-8" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])  # a crash while saving, or a bad disk
    assert "truncated" in checkpoint_problem(out / "checkpoint-8")
    warnings = []
    assert last_checkpoint(out, warn=warnings.append) == str(out / "checkpoint-4")
    assert (out / "damaged-checkpoint-8").is_dir() and not (out / "checkpoint-8").exists()
    assert "damaged" in warnings[0] and "checkpoint-8" in warnings[0]
    (out / "checkpoint-4" / "trainer_state.json").write_text("{")  # a 0-byte or cut state file
    assert last_checkpoint(out, warn=warnings.append) is None, "nothing whole: training starts over"


@pytest.fixture(scope="module")
def stopped_training(tmp_path_factory, tiny_model_dir):
    """A training of 6 steps stopped after checkpoint-4 (checkpoints 2 and 4 on disk, each with its manifest)."""
    from transformers import TrainerCallback

    from sft_core.train import run_training
    from tests.test_train import _cfg, _datasets, _short_rows

    root = tmp_path_factory.mktemp("stopped")
    data = _datasets(tiny_model_dir, _short_rows(8), root / "ds")
    cfg = _cfg(per_device_train_batch_size=2, max_steps=6, save_steps=2, save_total_limit=5, learning_rate=1e-3)

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt  # as a kill would: the run stops after checkpoint-4

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=root / "train",
                     extra_callbacks=[Stop()])
    assert sorted(p.name for p in (root / "train").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return cfg, data, root / "train"


def _overwrite_in_place(path: Path) -> None:
    """Bytes of the tensor data changed, the size unchanged (a bad disk, a stray write): it reads as NaN."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 64)


@pytest.mark.parametrize("damage, named", [
    (lambda c: (c / "scheduler.pt").write_bytes((c / "scheduler.pt").read_bytes()[:300]), "scheduler.pt"),
    (lambda c: (c / "rng_state.pth").write_bytes((c / "rng_state.pth").read_bytes()[:-200]), "rng_state.pth"),
    (lambda c: _overwrite_in_place(c / "model.safetensors"), "model.safetensors: its"),
    (lambda c: (c / "checksums.sha256").unlink(), "no checksums.sha256"),
], ids=["truncated-scheduler", "truncated-rng-state", "weights-overwritten-in-place", "save-cut-before-manifest"])
def test_any_damaged_file_of_the_newest_checkpoint_is_caught_and_training_resumes_before_it(
        stopped_training, tiny_model_dir, tmp_path, damage, named):
    """A truncated scheduler.pt or rng_state.pth failed every re-run with a traceback; weights overwritten in place
    (same size) resumed silently into NaN. Every file is in the checksum manifest written at save: the damaged
    checkpoint is set aside with its file named, and training resumes from the one before it."""
    from sft_core.train import run_training

    cfg, data, trained = stopped_training
    out = tmp_path / "train"
    shutil.copytree(trained, out)
    damage(out / "checkpoint-4")
    said: list[str] = []
    result = run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=out,
                          progress=said.append)
    assert result.resumed_from == str(out / "checkpoint-2") and result.global_step == 6
    warning = next(line for line in said if line.startswith("warning:"))
    assert f"{out / 'checkpoint-4'} is damaged ({named}" in warning, warning
    assert (out / "damaged-checkpoint-4").is_dir()
    assert "resuming from checkpoint-2: the steps after 2 are trained again" in said


def test_a_model_with_a_nan_eval_loss_or_nan_weights_is_never_registered(tiny_model_dir, tmp_path):
    """The flow calls this before registering: a NaN model was registered @candidate."""
    from safetensors.torch import load_file, save_file

    from sft_core.checkpoints import check_registrable
    from sft_core.errors import NonFiniteError

    check_registrable(tiny_model_dir, {"eval/loss": 7.4})  # a model that computes numbers passes
    with pytest.raises(NonFiniteError, match=r"^not registered: the fine-tuned model's eval/loss is nan"):
        check_registrable(tiny_model_dir, {"eval/loss": float("nan")})
    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=rf"^not registered: 1 weight tensors of .* hold NaN or infinity \({name}\)"):
        check_registrable(broken, {"eval/loss": 7.4})


def test_mlflow_gets_a_step_once_a_checkpoint_holds_it_so_a_resumed_run_never_keeps_the_killed_runs_values(tmp_path):
    """MLflow keeps the first value of a step and cannot delete one: the killed run's values after its last checkpoint
    stayed at the steps the resumed run trained again. Now only steps a whole checkpoint holds are sent while training
    runs, a stopped training's later steps are dropped, and the resumed run's values are the ones kept."""
    from sft_core.checkpoints import write_manifest
    from tasks import tracking
    from tasks.tracking import BufferedMetricLogger

    cfg = load_config("demo", [f"workdir={tmp_path}"])
    c = tracking.client(cfg)
    run_id = c.create_run(tracking.ensure_experiment(cfg)).info.run_id
    folder = tmp_path / "train"

    def history() -> dict[int, float]:
        return {m.step: m.value for m in c.get_metric_history(run_id, "train/loss")}

    killed = BufferedMetricLogger(cfg, run_id, flush_every=0.2, folder=folder)
    for step in range(1, 7):
        killed.log(step, {"train/loss": 100.0 + step})
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    write_manifest(folder / "checkpoint-4")
    deadline = time.monotonic() + 30
    while len(history()) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert killed.close(finished=False) == 0
    assert history() == {1: 101.0, 2: 102.0, 3: 103.0, 4: 104.0}, "steps 5 and 6 waited for a checkpoint"
    resumed = BufferedMetricLogger(cfg, run_id, flush_every=0.2, folder=folder)
    for step in range(5, 9):
        resumed.log(step, {"train/loss": 200.0 + step})
    assert resumed.close() == 0
    assert history() == {1: 101.0, 2: 102.0, 3: 103.0, 4: 104.0, 5: 205.0, 6: 206.0, 7: 207.0, 8: 208.0}


@pytest.mark.slow
def test_a_base_model_with_nan_weights_stops_at_the_first_step_and_registers_nothing(tmp_path, tiny_model_dir):
    """The user's view: one line naming the step and what to do, exit 5, the MLflow run FAILED, no version."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights[next(k for k in weights if k.endswith("mlp.down_proj.weight"))].view(-1)[0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    overrides = [*FAST, f"workdir={tmp_path / 'work'}", f"model.source={broken}", "train.max_steps=6"]
    done = _cli(["run", "-c", "demo", *_sets(overrides)], tmp_path)
    assert done.returncode == 5, done.stdout[-2000:] + done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]  # Prefect logs its server's stop
    assert len(said) == 1 and said[0].startswith("error: training loss is nan at step 1 in ") and "--refresh" in said[0]
    assert "Traceback" not in done.stderr
    c = _mlflow(tmp_path)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"] and not c.search_registered_models()


@pytest.mark.slow
def test_kill_9_then_a_truncated_newest_checkpoint_still_recovers_by_rerunning(tmp_path):
    """The newest checkpoint's weights cut in half after a kill -9: the re-run resumes from the one before and
    finishes with one run, one version, one logged model and every step once."""
    overrides = [*FAST, f"workdir={tmp_path / 'work'}", "train.max_steps=40", "train.save_steps=5", "train.eval_steps=5",
                 "train.save_total_limit=3"]
    args = [sys.executable, "-m", "flows.cli", "run", "--config", "demo", *_sets(overrides)]
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((tmp_path / "work").glob("train/*/checkpoint-*/trainer_state.json"))) >= 2:
                break
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpts = sorted((tmp_path / "work").glob("train/*/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) >= 2 and not (ckpts[0].parent / "_DONE.json").exists(), "the kill came too late"
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    done = json.loads((ckpts[-1].parent / "_DONE.json").read_text())
    assert done["global_step"] == 40 and done["resumed_from"] == str(ckpts[-2])
    assert (ckpts[-1].parent / f"damaged-{ckpts[-1].name}").is_dir(), "kept aside, not rotated away"
    run_id = _one_of_each(_mlflow(tmp_path), "reliability-model")
    steps = sorted(m.step for m in _mlflow(tmp_path).get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 41))


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [False, True], ids=["sigterm-to-the-process", "sigterm-to-its-group"])
def test_sigterm_during_training_ends_the_run_within_10_s_and_leaves_no_process(tmp_path, to_group):
    """A scheduler stops `qwen-sft run` with SIGTERM, then SIGKILL after its grace period (often 30 s). The process
    lingered for over 55 s (Prefect's clients retrying the temporary server the signal had stopped), or died at
    once leaving that server running on its own. Now: out within 10 s, the run marked crashed, no process left."""
    overrides = [*FAST, f"workdir={tmp_path / 'work'}", "train.max_steps=5000"]
    proc = subprocess.Popen([str(BIN / "qwen-sft"), "run", "-c", "demo", *_sets(overrides)], cwd=tmp_path,
                            env=child_env(PREFECT_HOME=str(tmp_path / "prefect-home")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if any((tmp_path / "work").glob("train/*/metrics.jsonl")):
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended before training"
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM) if to_group else proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"exited {took:.1f} s after SIGTERM with {proc.returncode}")
    assert took < 10 and proc.returncode == 143, out[-3000:]
    assert out.rstrip().endswith("error: stopped by SIGTERM; run the same command again to resume from the last "
                                 "checkpoint") or to_group, out[-2000:]
    time.sleep(1)
    left = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    assert not left.strip(), f"left running: {left}"  # the temporary Prefect server too
    if not to_group:  # the temporary server was there to hear it: the flow run is marked crashed, MLflow's failed
        assert "Finished in state Crashed('Execution was aborted by a termination signal.')" in out
        c = _mlflow(tmp_path)
        assert [r.info.status for r in c.search_runs([e.experiment_id for e in c.search_experiments()])] == ["FAILED"]


# --- 2. a half-built model, a half-done download -----------------------------------------------

def test_a_killed_tiny_model_build_is_rebuilt_not_trusted(tmp_path):
    """kill -9 during the build left a 0-byte config.json: the folder has no _DONE.json, so it is redone."""
    from sft_core.modeling import load_model
    from sft_core.stages import STAGES

    cfg = load_config("demo", [f"workdir={tmp_path}", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"])
    stage = STAGES["base-model"]
    folder = stage.folder_of(cfg, stage.key_of(cfg))
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(b"")
    built = stage.run(cfg)
    assert not built.reused and json.loads((folder / "config.json").read_text())["hidden_size"] == 32
    assert load_model(built.model_dir, dtype="float32") is not None
    assert stage.run(cfg).reused


def test_a_tiny_model_build_that_dies_leaves_no_folder_to_trust(tmp_path, monkeypatch):
    """`make-tiny-model` and the base-model stage write the model under a hidden name and rename it when
    complete: a build that dies while saving leaves neither the target folder nor the partial one."""
    from transformers import PreTrainedTokenizerBase

    from sft_core.config import TinyModelConfig
    from sft_core.errors import ConfigError
    from sft_core.tiny_model import build_tiny_model

    def killed(*_, **__):
        raise KeyboardInterrupt("killed while saving the tokenizer")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model(tmp_path / "tiny", TinyModelConfig(hidden_size=32, intermediate_size=64))
    assert list(tmp_path.iterdir()) == [], "nothing half-written is left"
    monkeypatch.undo()
    built = build_tiny_model(tmp_path / "tiny", TinyModelConfig(hidden_size=32, intermediate_size=64))
    assert json.loads((built / "config.json").read_text())["hidden_size"] == 32
    with pytest.raises(ConfigError, match="not an empty folder"):
        build_tiny_model(built)


def test_an_orphan_pending_logged_model_is_removed_when_the_model_is_logged(tmp_path, tiny_model_dir):
    """kill -9 during model logging left a PENDING logged model: the re-run logs one READY model, no orphan."""
    from tasks import tracking

    cfg = load_config("demo", [f"workdir={tmp_path}", "registry.name=orphan-model"])
    c = tracking.client(cfg)
    exp = tracking.ensure_experiment(cfg)
    run = c.create_run(exp)
    orphan = c.create_logged_model(exp, name="model", source_run_id=run.info.run_id)
    assert str(orphan.status).endswith("PENDING")
    uri = tracking.log_model(cfg, run.info.run_id, str(tiny_model_dir), max_new_tokens=8)
    models = c.search_logged_models(experiment_ids=[exp])
    assert [str(m.status).split(".")[-1] for m in models] == ["READY"] and uri.endswith(models[0].model_id)
    assert tracking.log_model(cfg, run.info.run_id, str(tiny_model_dir), max_new_tokens=8) == uri


# --- 3. a full disk ------------------------------------------------------------------------------

def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def make(size: str) -> Path:
        path = tmp_path / f"disk-{size}"
        if not _tmpfs(path, size):
            from tests.conftest import require

            require(os.environ.get("CI", "").lower() != "true", "mounting a tmpfs (CI runs as root)")
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_names_the_folder_and_what_is_free(tmp_path, small_disk):
    disk = small_disk("1m")
    done = _cli(["run", "-c", "demo", *_sets([f"workdir={disk}", "eval.harness=false"])], tmp_path, timeout=600)
    assert done.returncode == 9, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: no space left on the device of ") and str(disk) in line and "free" in line, line
    assert "Traceback" not in done.stderr


def test_training_that_cannot_fit_is_refused_before_it_starts(tmp_path, small_disk):
    from sft_core.errors import StorageError
    from sft_core.stages import STAGES

    disk = small_disk("24m")  # the data, the model (~4 MB) and its tokenized rows fit; 3 checkpoints do not
    cfg = load_config("demo", [f"workdir={disk}"])
    from sft_core.stages import prepare_data

    prepared = prepare_data(cfg, log=lambda _m: None)
    with pytest.raises(StorageError) as exc:
        STAGES["train"].run(cfg, tokens=prepared.tokens, splits=prepared.splits, model=prepared.model,
                            max_new_tokens=64)
    message = str(exc.value)
    assert message.startswith("training needs about ") and str(disk) in message and "free" in message, message
    assert not list((disk / "train").glob("*/checkpoint-*")), "it refused before any step"


def test_gc_frees_finished_checkpoints_and_orphans_but_not_a_resumable_training(tmp_path):
    from sft_core.results import Evaluated
    from sft_core.stage_engine import OWNED, write_done
    from sft_core.workspace import gc

    finished = tmp_path / "train" / "done"
    (finished / "checkpoint-4").mkdir(parents=True)
    (finished / "checkpoint-4" / "optimizer.pt").write_bytes(b"0" * 5000)
    (finished / "final").mkdir()
    (finished / "final" / "model.safetensors").write_bytes(b"0" * 1000)
    write_done(finished, Evaluated(key="done", folder=str(finished), metrics={}))
    crashed = tmp_path / "train" / "crashed"
    (crashed / "checkpoint-2").mkdir(parents=True)
    (crashed / "damaged-checkpoint-4").mkdir()
    orphan = tmp_path / "validate" / "half"
    orphan.mkdir(parents=True)
    (orphan / "valid.jsonl").write_bytes(b"0" * 3000)
    partial_download = tmp_path / "downloads" / "m-v1.partial"
    partial_download.mkdir(parents=True)
    for folder in (finished, crashed, orphan, partial_download):  # as the project marks the folders it writes
        (folder / OWNED).touch()

    result = gc(tmp_path, keep=1, protected={finished})  # `gc --keep 1` freed nothing before
    assert not (finished / "checkpoint-4").exists() and (finished / "final" / "model.safetensors").exists()
    assert not orphan.exists() and not partial_download.exists() and not (crashed / "damaged-checkpoint-4").exists()
    assert (crashed / "checkpoint-2").exists(), "a crashed training resumes from it"
    assert result.freed_bytes >= 8000
    gc(tmp_path, keep=1, protected=set(), partial=True)
    assert not crashed.exists()


# --- 4. credentials --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_tracking_uri_with_credentials_works_and_its_password_never_shows(tmp_path):
    """`http://user:pass@host`: the reachability check uses the credentials (it refused them before), the run
    logs to the basic-auth server, and the password is in no output, param, tag, artifact or Prefect parameter."""
    from urllib.parse import quote

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.servers import prefect_server

    with mlflow_server(tmp_path / "mlflow", "sqlite", auth=True) as srv, prefect_server(tmp_path / "prefect") as pf:
        secret_uri = srv.url.replace("http://", f"http://{srv.username}:{quote(srv.password, safe='')}@")
        overrides = [*FAST, f"workdir={tmp_path / 'work'}", "train.max_steps=24", f"tracking.uri={secret_uri}",
                     "registry.name=auth-model"]
        env = child_env(PREFECT_API_URL=pf.api_url, PREFECT_HOME=str(tmp_path / "prefect-client"))
        done = _cli(["run", "-c", "demo", *_sets(overrides)], tmp_path, env=env)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert srv.password not in out and quote(srv.password, safe="") not in out
        c = MlflowClient(srv.url)
        os.environ.update(srv.client_env())
        try:
            runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
            assert len(runs) == 1
            run = runs[0]
            seen = json.dumps({**run.data.params, **run.data.tags})
            assert srv.password not in seen and quote(srv.password, safe="") not in seen
            config_yaml = Path(c.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
            assert srv.password not in config_yaml
        finally:
            for k in srv.client_env():
                os.environ.pop(k, None)
        with temporary_settings({PREFECT_API_URL: pf.api_url}), get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs()
            params = json.dumps(flow_run.parameters)
            assert "tracking.uri" not in params and srv.password not in params, params

        wrong = secret_uri.replace(quote(srv.password, safe=""), "wrong-password")
        refused = _cli(["run", "-c", "demo", *_sets([*overrides[:-2], f"tracking.uri={wrong}"])], tmp_path, env=env)
        assert refused.returncode == 6 and "refused the credentials" in refused.stderr
        assert "wrong-password" not in refused.stderr and f"{srv.username}:***@" in refused.stderr
        for command in ("promote", "rollback"):  # they said "has no alias @candidate" (exit 7)
            refused = _cli([command, "-c", "demo", "--set", f"tracking.uri={wrong}", "--set", "registry.name=auth-model"],
                           tmp_path, env=env, timeout=120)
            assert refused.returncode == 6 and "refused the credentials" in refused.stderr, refused.stderr[-2000:]
            assert "wrong-password" not in refused.stderr and "Traceback" not in refused.stderr


def test_messages_redact_every_uri_password():
    result = runner.invoke(app, ["run", "-c", "demo", "--set", "tracking.uri=http://bob:p@ss@127.0.0.1:9"])
    assert result.exit_code == 6
    text = (result.stderr or "") + result.output
    assert "p@ss" not in text and "bob:***@127.0.0.1:9" in text


# --- 5. sources never touch the filesystem by accident ------------------------------------------------

@pytest.mark.parametrize("setting", ["data.source=modelscope://../../etc", "data.source=hf://../../x",
                                     "model.source=hf://", "model.source=modelscope://Qwen/../../x",
                                     "data.source=hf://owner/name@bad rev"])
def test_hub_ids_are_owner_slash_name_and_never_a_local_path(setting, tmp_path):
    result = runner.invoke(app, ["run", "-c", "demo", "--set", f"workdir={tmp_path}", "--set", setting])
    assert result.exit_code == 2, result.output
    line = ((result.stderr or "") + result.output).strip().splitlines()[-1]
    assert line.startswith("error: ") and setting.split("=")[0] in line and "Traceback" not in result.output
    assert not any(tmp_path.iterdir()), "nothing was read or written"


def test_a_pinned_hub_revision_parses():
    from sft_core.sources import parse_model_source

    src = parse_model_source("hf://Qwen/Qwen2.5-1.5B@8faed76")
    assert (src.repo_id, src.revision, src.name) == ("Qwen/Qwen2.5-1.5B", "8faed76", "Qwen2.5-1.5B")


# --- 6. no retry of what cannot heal -----------------------------------------------------------------

@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("name, says", [("malformed_line.jsonl", "line 3: malformed JSON"),
                                        ("binary_column.parquet", "column 'answer' has the Parquet type binary")])
def test_an_unreadable_file_in_the_flow_is_not_retried(tmp_path, name, says):
    """Retries are for the network: a file that cannot be read fails at once, one attempt (it was retried after
    10 s and 60 s: ~70 s and three tracebacks; a binary Parquet column was a TypeError, retried the same way)."""
    from flows.finetune import finetune
    from sft_core.errors import DataFormatError

    bad = REPO / "tests" / "data" / "bad" / name
    started = time.perf_counter()
    with pytest.raises(DataFormatError, match=says):
        finetune(config="demo", overrides=[*FAST, f"workdir={tmp_path / 'w'}", f"data.source={bad}"])
    assert time.perf_counter() - started < 9, "an unreadable file was retried"


def test_retries_are_only_for_what_can_heal():
    from prefect.states import Failed

    from sft_core.errors import (ConfigError, DataFormatError, DataSourceError, DataValidationError, ModelSourceError,
                                 TrackingError)
    from tasks.stage import can_heal

    def state(exc):
        return Failed(data=exc)

    assert can_heal(None, None, state(DataSourceError("network: timed out")))
    assert can_heal(None, None, state(ModelSourceError("download failed", transient=True)))
    assert can_heal(None, None, state(ConnectionError("reset by peer")))
    for exc in (DataSourceError("x.jsonl: file not found", transient=False), DataFormatError("bad"),
                DataValidationError("bad rows"), ConfigError("bad key"),
                ModelSourceError("no model folder there"), ModelSourceError("no Qwen2.5 tokenizer files"),
                TrackingError("refused the credentials")):
        assert not can_heal(None, None, state(exc)), exc


def test_a_hub_download_is_retried_only_when_the_network_failed(monkeypatch):
    """A wrong model id (the hub's not-found error) fails at once; a dropped connection may pass on a retry."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from sft_core.errors import ModelSourceError
    from sft_core.modeling import _download_hf

    def not_found(*_, **__):
        exc = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the hub raises it, without an HTTP reply
        Exception.__init__(exc, "404 Client Error: Repository Not Found for url: https://hub/api/models/owner/name")
        raise exc

    def dropped(*_, **__):
        raise ConnectionError("connection reset by peer")

    for download, transient in ((not_found, False), (dropped, True)):
        monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
        with pytest.raises(ModelSourceError) as failed:
            _download_hf("owner/name", None, "/nonexistent-cache")
        assert failed.value.transient is transient and "download failed" in str(failed.value)
    from tasks.track import register
    assert register.retry_condition_fn is not None, "registration retries only what can heal"


# --- 7. two identical runs at once -------------------------------------------------------------------

@pytest.mark.slow
def test_two_identical_runs_at_once_make_one_of_everything(tmp_path):
    overrides = [*FAST, f"workdir={tmp_path / 'work'}", "train.max_steps=24", "train.eval_steps=12",
                 "train.save_steps=12"]
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect-home"))  # one PREFECT_HOME: its database migrated once
    argv = [str(BIN / "qwen-sft"), "run", "-c", "demo", *_sets(overrides)]
    # each run writes to a file: a pipe that nobody reads while the other run is waited for fills up and
    # blocks the run that holds the stage lock (both then wait forever)
    logs = [tmp_path / f"run-{i}.log" for i in range(2)]
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for log in logs]
    for p in procs:
        p.wait(timeout=900)
    outs = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    c = _mlflow(tmp_path)
    run_id = _one_of_each(c, "reliability-model")
    assert len([m for m in c.get_metric_history(run_id, "eval/loss") if m.step == 24]) == 1, "the final eval loss, once"


# --- 8. --set values are what was written ------------------------------------------------------------

def test_set_keeps_a_path_with_a_hash_and_a_colon_space(tmp_path):
    source = tmp_path / "rows #2: final.jsonl"
    shutil.copy(REPO / "tests" / "data" / "good" / "sample12.jsonl", source)
    cfg = load_config("demo", [f"data.source={source}", "data.system_prompt=你是医生: 请先思考 # 再回答"])
    assert cfg.data.source == str(source) and cfg.data.system_prompt == "你是医生: 请先思考 # 再回答"
    result = runner.invoke(app, ["validate", str(source), "--out", str(tmp_path / "v"), "-c", "demo",
                                 "--set", "data.min_rows=2"])
    assert result.exit_code == 0, result.output
