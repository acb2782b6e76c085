"""Reliability: bad input and config fail early and cleanly; crashes resume; outages are survived;
concurrent runs do not clobber; gc keeps what the registry needs; secrets stay out of logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from sft_core.config import load_config
from tests.servers import free_port, mlflow_server
from tests.sizes import NO_GENERATION_WHILE_TRAINING, TINY_MODEL

REPO = Path(__file__).resolve().parent.parent
BAD = REPO / "tests" / "data" / "bad"
EXPECTED: dict[str, dict] = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))
FAST = [*TINY_MODEL, *NO_GENERATION_WHILE_TRAINING, "train.logging_steps=1", "eval.num_generate=2",
        "eval.max_new_tokens=4", "eval.batch_size=4", "eval.compare_base=false", "registry.name=reliability-model"]
runner = CliRunner()


def _error_line(result) -> str:
    lines = [x for x in (result.stderr or result.output).strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


# --- 1. bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_bad_file_fails_with_one_line_naming_the_file(name: str, tmp_path: Path):
    spec = EXPECTED[name]
    result = runner.invoke(app, ["validate", str(BAD / name), "--out", str(tmp_path)])
    assert result.exit_code != 0, result.output
    line = _error_line(result)
    assert line.startswith("error:") and name in line, line
    for fragment in spec["match"] if isinstance(spec["match"], list) else [spec["match"]]:
        assert fragment in " ".join((result.stderr or result.output).split()), (fragment, line)
    assert "Traceback" not in (result.stderr or "") + result.output


def test_quarantine_policy_drops_bad_rows_and_exits_zero(tmp_path: Path):
    name = next(k for k, v in EXPECTED.items() if "bad_rows" in v)
    result = runner.invoke(app, ["validate", str(BAD / name), "--policy", "quarantine", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    quarantined = [json.loads(x) for x in (tmp_path / "validate" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in quarantined) == sorted(EXPECTED[name]["bad_rows"])
    assert all(r["reason"] for r in quarantined)


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lerning_rate=1e-4", "train.lerning_rate"),
        ("train.num_train_epochs=two", "train.num_train_epochs"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("model.source=/nonexistent/model", "model.source"),
        ("data.source=/nonexistent/data.jsonl", "data.source"),
        ("model.cache_dir=/tmp/outside", "model.cache_dir"),
        ("data.cache_dir=../../escape", "data.cache_dir"),
    ],
)
def test_bad_config_fails_before_any_work_naming_the_key(override: str, named: str, tmp_path: Path):
    result = runner.invoke(app, ["run", "--config", "demo", "--set", f"workdir={tmp_path}", "--set", override])
    assert result.exit_code != 0
    assert named in _error_line(result), _error_line(result)
    assert not any((tmp_path / stage).exists() for stage in ("ingest", "validate", "train")), "work was done"


def test_max_length_shorter_than_the_prompt_is_refused(tmp_path: Path):
    from sft_core.errors import ConfigError
    from sft_core.preflight import preflight
    from sft_core.stages import STAGES

    cfg = load_config("demo", [f"workdir={tmp_path}", "data.max_length=64",
                               f"data.system_prompt={'很长的系统提示' * 30}"])
    STAGES["base-model"].run(cfg)  # a model already there: checked before any work
    with pytest.raises(ConfigError, match=r"data\.max_length=64"):
        preflight(cfg)


def test_unreachable_tracking_server_fails_fast_before_any_work(tmp_path: Path):
    port = free_port()
    started = time.perf_counter()
    result = runner.invoke(app, ["run", "--config", "demo", "--set", f"workdir={tmp_path}",
                                 "--set", f"tracking.uri=http://127.0.0.1:{port}"])
    elapsed = time.perf_counter() - started
    assert result.exit_code != 0
    assert f"http://127.0.0.1:{port}" in _error_line(result) and "unreachable" in _error_line(result)
    assert elapsed < 15, elapsed
    assert not (tmp_path / "ingest").exists()


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_promote_and_rollback_check_the_tracking_server_as_run_does(command: str, tmp_path: Path):
    """A down server made `promote` say "has no alias @candidate" (exit 7) after MLflow's retries: it gets `run`'s
    reachability and credential check first (exit 6, in seconds)."""
    port = free_port()
    started = time.perf_counter()
    result = runner.invoke(app, [command, "--config", "demo", "--set", f"workdir={tmp_path}",
                                 "--set", f"tracking.uri=http://127.0.0.1:{port}"])
    assert result.exit_code == 6, result.output
    assert _error_line(result).startswith(f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable")
    assert time.perf_counter() - started < 15


def test_a_file_tracking_store_fails_in_seconds_with_one_line(tmp_path: Path, monkeypatch):
    """MLflow 3 refuses its file store: the run failed after ~59 s with a 200-line traceback from inside the flow."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    started = time.perf_counter()
    result = runner.invoke(app, ["run", "--config", "demo", "--set", f"workdir={tmp_path}",
                                 "--set", f"tracking.uri=file://{tmp_path / 'mlruns'}"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: tracking.uri=file://{tmp_path / 'mlruns'} is an MLflow file store, which MLflow 3 refuses "
        "(maintenance mode): use a database file, e.g. sqlite:////absolute/path/mlflow.db, or unset it for the "
        "embedded store in the workdir (MLFLOW_ALLOW_FILE_STORE=true forces the file store)"]
    assert elapsed < 15, elapsed
    assert not (tmp_path / "ingest").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_a_bad_dataset_in_the_flow_trains_and_registers_nothing(tmp_path: Path):
    from flows.finetune import finetune
    from mlflow import MlflowClient
    from sft_core.errors import DataValidationError

    bad = next(k for k, v in EXPECTED.items() if v["error"] == "DataValidationError" and "bad_rows" in v)
    overrides = [*FAST, f"workdir={tmp_path}", f"data.source={BAD / bad}", "data.min_rows=2"]
    with pytest.raises(DataValidationError):
        finetune(config="demo", overrides=overrides)
    assert not (tmp_path / "train").exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri, registry_uri=uri)  # without registry_uri it follows the global URI of an earlier test
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not c.search_registered_models()
    # the failed run holds what says why: the report (JSON and page) and the Data Docs site
    files = {f.path for f in c.list_artifacts(runs[0].info.run_id, "validation")}
    assert {"validation/validation_report.json", "validation/validation_report.html", "validation/data_docs"} <= files
    report = json.loads(Path(c.download_artifacts(runs[0].info.run_id, "validation/validation_report.json",
                                                  str(tmp_path))).read_text())
    assert report["success"] is False and report["bad_rows"]


# --- 2. crash and resume ------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_during_training_then_rerun_resumes_the_same_run(tmp_path: Path):
    from mlflow import MlflowClient

    overrides = [*FAST, f"workdir={tmp_path}", "train.max_steps=40", "train.save_steps=5", "train.eval_steps=5"]
    args = [sys.executable, "-m", "flows.cli", "run", "--config", "demo"]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        ckpt = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = sorted((tmp_path / "train").glob("*/checkpoint-*/trainer_state.json")) if (tmp_path / "train").exists() else []
            if found:
                ckpt = found[0].parent
                break
            time.sleep(0.5)
        assert ckpt is not None, "no checkpoint appeared before the deadline"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    train_dir = ckpt.parent
    assert not (train_dir / "_DONE.json").exists(), "the kill came too late to test a resume"

    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    done = json.loads((train_dir / "_DONE.json").read_text())
    assert done["resumed_from"] and "checkpoint-" in done["resumed_from"]
    assert done["global_step"] == 40
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri, registry_uri=uri)  # without registry_uri it follows the global URI of an earlier test
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "the resumed run continues the same MLflow run"
    steps = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert steps == list(range(1, 41)), "every step once: the steps trained again after the checkpoint are not doubled"
    assert len(c.search_model_versions("name = 'reliability-model'")) == 1
    assert f"resuming from {Path(done['resumed_from']).name}" in result.stdout + result.stderr
    # what MLflow keeps at every step is the resumed run's value, as in metrics.jsonl (never the killed run's)
    from sft_core.train import read_metrics

    for key in ("train/loss", "train/tokens_per_second"):
        written = {r["step"]: r[key] for r in read_metrics(train_dir / "metrics.jsonl") if key in r}
        kept = {m.step: m.value for m in c.get_metric_history(runs[0].info.run_id, key)}
        assert kept == pytest.approx(written), key


def test_registration_is_idempotent_after_a_half_done_attempt(tmp_path: Path):
    from tasks import tracking

    cfg = load_config("demo", [f"workdir={tmp_path}", "registry.name=idem-model"])
    c = tracking.client(cfg)
    exp = tracking.ensure_experiment(cfg)
    run = c.create_run(exp)
    src = tmp_path / "fake-model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    c.log_artifacts(run.info.run_id, str(src), "model")
    uri = f"runs:/{run.info.run_id}/model"
    # a crash after create_model_version but before the alias was set
    c.create_registered_model("idem-model")
    c.create_model_version("idem-model", source=uri, run_id=run.info.run_id,
                           tags={"run_id": run.info.run_id, "train_key": "k1"})
    first = tracking.register(cfg, run.info.run_id, uri, {"eval/loss": 1.0}, "k1")
    second = tracking.register(cfg, run.info.run_id, uri, {"eval/loss": 1.0}, "k1")
    assert first.version == second.version == 1
    assert not first.reused, "the cut-short registration is finished (its alias moved)"
    assert second.reused and second.alias is None, "then it is done: nothing moves again"
    assert len(c.search_model_versions("name = 'idem-model'")) == 1
    assert int(c.get_model_version_by_alias("idem-model", "candidate").version) == 1


# --- 3. tracking outage in the middle ------------------------------------------------------

@pytest.mark.slow
def test_metrics_survive_a_tracking_server_outage(tmp_path: Path):
    from mlflow import MlflowClient
    from tasks.tracking import BufferedMetricLogger

    with mlflow_server(tmp_path) as srv:
        cfg = load_config("demo", [f"workdir={tmp_path}", f"tracking.uri={srv.url}"])
        c = MlflowClient(srv.url)
        run = c.create_run(c.create_experiment("outage"))
        logger = BufferedMetricLogger(cfg, run.info.run_id, flush_every=0.5, flush_timeout=180)
        for step in range(1, 6):
            logger.log(step, {"train/loss": 10.0 - step})
        time.sleep(2)
        srv.stop()  # outage: training keeps calling log(), which must neither raise nor block
        t0 = time.perf_counter()
        for step in range(6, 16):
            logger.log(step, {"train/loss": 10.0 - step})
        assert time.perf_counter() - t0 < 1.0
        time.sleep(3)
        srv.start()
        left = logger.close()
        assert left == 0
        steps = sorted(m.step for m in MlflowClient(srv.url).get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, 16))
        assert logger.failures >= 1, "the outage was never noticed: the test did not test anything"


# --- 4. concurrency -----------------------------------------------------------------------

def test_same_stage_twice_at_once_runs_once(tmp_path: Path):
    from sft_core.results import Evaluated
    from sft_core.stage_engine import run_in_folder

    calls = []

    def body(folder: Path) -> Evaluated:
        calls.append(threading.get_ident())
        time.sleep(1.0)
        (folder / "out.txt").write_text("x")
        return Evaluated(key="k", folder=str(folder), metrics={"loss": 1.0})

    results = []
    run = lambda: results.append(run_in_folder(tmp_path / "stage" / "k", body, Evaluated))  # noqa: E731
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.reused for r in results) == [False, True]
    assert results[0].metrics == results[1].metrics == {"loss": 1.0}


def test_different_configs_get_different_folders():
    from sft_core.results import BaseModel, Split, Tokenized
    from sft_core.stages import STAGES

    splits = Split(key="s", folder="f", train="t", val="v", train_rows=1, val_rows=1, train_digest="t", val_digest="v",
                   select="s", report="r", select_rows=0, report_rows=1, sets="j", sets_digest="d")
    model = BaseModel(key="m", folder="f", model_dir="m")

    def train_key(cfg, budget=512):
        tokens = Tokenized(key=STAGES["tokenize"].key_of(cfg, splits=splits, model=model), folder="f", train_ds="t",
                           select_ds="s", report_ds="r", stats={}, ids="i")
        return STAGES["train"].key_of(cfg, tokens=tokens, splits=splits, model=model, max_new_tokens=budget)

    a, b = load_config("demo"), load_config("demo", ["train.learning_rate=1e-3"])
    assert train_key(a) != train_key(b)
    c = load_config("demo", ["eval.batch_size=3", "eval.harness=false"])
    assert train_key(c) == train_key(a), "evaluation-only settings do not change it"
    assert train_key(a, 256) != train_key(a), "the selecting generation's budget does"
    d = load_config("demo", ["train.metric_for_best_model=loss"])
    assert train_key(d, 256) == train_key(d, 512), "without selection by generation, the budget does not"


# --- 5. gc ----------------------------------------------------------------------------------

def test_gc_keeps_newest_and_registered_folders(tmp_path: Path):
    from sft_core.results import Evaluated
    from sft_core.stage_engine import OWNED, write_done
    from sft_core.workspace import gc
    from tasks import tracking

    cfg = load_config("demo", [f"workdir={tmp_path}", "registry.name=gc-model"])
    folders = []
    for i in range(4):
        f = tmp_path / "train" / f"key{i}"
        f.mkdir(parents=True)
        (f / OWNED).touch()  # as run_in_folder marks every stage folder
        (f / "weights.bin").write_bytes(b"0" * 1000)
        write_done(f, Evaluated(key=f"key{i}", folder=str(f), metrics={"i": i}))
        os.utime(f / "_DONE.json", (1000 + i, 1000 + i))
        folders.append(f)
    unfinished = tmp_path / "train" / "crashed"
    (unfinished / "checkpoint-5").mkdir(parents=True)
    (unfinished / OWNED).touch()
    # the oldest folder is where a registered version came from
    c = tracking.client(cfg)
    run = c.create_run(tracking.ensure_experiment(cfg), tags={"qwen_sft.logged.train": f"{folders[0]}:123"})
    c.create_registered_model("gc-model")
    c.log_artifacts(run.info.run_id, str(folders[0]), "model")
    c.create_model_version("gc-model", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)

    result = gc(cfg.workdir_path, keep=1, protected=tracking.registered_folders(cfg))
    assert folders[0].exists(), "a registered version's folder was deleted"
    assert folders[3].exists() and not folders[1].exists() and not folders[2].exists()
    assert unfinished.exists(), "an unfinished (resumable) folder was deleted"
    assert result.freed_bytes >= 2000


def test_gc_deletes_only_what_qwen_sft_wrote_and_refuses_a_folder_that_is_no_workdir(tmp_path: Path):
    """`gc --keep 1 --set workdir=~` deleted the user's own ~/model/..., ~/ingest/..., ~/split/... as "left by a run
    that stopped". gc deletes only folders carrying the marker run_in_folder writes, and refuses a workdir with
    none (exit 2: nothing deleted, no MLflow store created there)."""
    from sft_core.results import Evaluated
    from sft_core.stage_engine import run_in_folder

    home = tmp_path / "home"
    mine = [home / "model" / "mine", home / "ingest" / "photos", home / "split" / "taxes", home / "downloads" / "x.partial"]
    for folder in mine:
        folder.mkdir(parents=True)
        (folder / "precious.txt").write_text("the user's")
    refused = runner.invoke(app, ["gc", "--keep", "1", "-c", "demo", "--set", f"workdir={home}"])
    assert refused.exit_code == 2, refused.output
    assert refused.output.strip().splitlines()[-1] == (
        f"error: {home} is not a qwen-sft workdir: none of its folders carries the .qwen-sft-owned marker that "
        "qwen-sft writes into each folder it creates, so gc deletes nothing there (check workdir, or --set "
        "workdir=...)")
    assert all((f / "precious.txt").exists() for f in mine) and not (home / "mlflow.db").exists()

    made = []
    for i in range(2):  # two finished split folders written by the project: gc --keep 1 deletes the older
        folder = home / "split" / f"key{i}"
        run_in_folder(folder, lambda f, i=i: Evaluated(key=f"key{i}", folder=str(f), metrics={}), Evaluated)
        os.utime(folder / "_DONE.json", (1000 + i, 1000 + i))
        made.append(folder)
    done = runner.invoke(app, ["gc", "--keep", "1", "-c", "demo", "--set", f"workdir={home}"])
    assert done.exit_code == 0, done.output
    assert not made[0].exists() and made[1].exists()
    assert all((f / "precious.txt").exists() for f in mine), "only what qwen-sft wrote goes"
    assert "left 3 folders that qwen-sft did not write" in done.output


def test_checkpoints_rotate_and_the_selected_one_survives(tmp_path: Path, tiny_model_dir: Path):
    """save_total_limit bounds the disk a training run uses; the checkpoint selection picked is never rotated away."""
    from sft_core.data import BUNDLED_SAMPLE, read_jsonl
    from sft_core.modeling import load_tokenizer
    from sft_core.tokenize import tokenize_rows
    from sft_core.train import run_training

    rows = [{"question": r["question"][:20], "think": r["think"][:12], "answer": r["answer"][:8]}
            for r in read_jsonl(BUNDLED_SAMPLE)[:4]]
    ds, _ = tokenize_rows(rows, load_tokenizer(tiny_model_dir), system_prompt="s", max_length=128)
    ds.save_to_disk(str(tmp_path / "ds"))
    common = ["train.device=cpu", "train.max_steps=10", "train.save_steps=2", "train.eval_steps=2",
              "train.save_total_limit=2", "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
              "train.learning_rate=1e-2"]
    last = run_training(load_config("demo", [*common, "train.metric_for_best_model=none"]), model_dir=tiny_model_dir,
                        train_data=tmp_path / "ds", eval_data=tmp_path / "ds", output_dir=tmp_path / "last")
    assert sorted(p.name for p in (tmp_path / "last").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]
    best = run_training(load_config("demo", [*common, "train.metric_for_best_model=loss"]), model_dir=tiny_model_dir,
                        train_data=tmp_path / "ds", eval_data=tmp_path / "ds", output_dir=tmp_path / "best")
    kept = sorted((tmp_path / "best").glob("checkpoint-*"))
    assert len(kept) <= 3 and Path(best.best_checkpoint) in kept, (best.best_checkpoint, kept)


# --- 6. security --------------------------------------------------------------------------

def test_trust_remote_code_is_off_unless_asked():
    assert load_config("demo").model.trust_remote_code is False
    assert load_config("configs/qwen2.5-1.5b-medical.yaml").model.trust_remote_code is False


def test_pickle_weights_are_refused(tmp_path: Path, tiny_model_dir: Path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from sft_core.errors import ModelSourceError
    from sft_core.modeling import load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="safetensors"):
        load_model(pickled)


def test_secrets_are_redacted_from_logged_params(tmp_path: Path):
    from tasks import tracking

    cfg = load_config("demo", [f"workdir={tmp_path}", "tracking.uri=http://alice:hunter2@127.0.0.1:1"])
    assert all("hunter2" not in v for v in cfg.flat_params().values()) and "hunter2" not in cfg.to_yaml()
    # what reaches MLflow (params and config.yaml) is the redacted form
    leaky = load_config("demo", [f"workdir={tmp_path}", "data.source=https://bob:s3cr3t@data.example/x.jsonl",
                                 "tracking.experiment=redaction"])
    c = tracking.client(leaky)
    run = c.create_run(tracking.ensure_experiment(leaky))
    tracking.log_config(leaky, run.info.run_id)
    params = c.get_run(run.info.run_id).data.params
    assert params["data.source"] == "https://bob:***@data.example/x.jsonl"
    logged_yaml = Path(c.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "s3cr3t" not in logged_yaml and "bob:***@" in logged_yaml


def test_an_unreadable_file_fails_in_seconds_before_prefect_starts(tmp_path: Path):
    """`run` reads the source before orchestration: one line, exit 3, no stage folder, no Prefect server."""
    import subprocess

    from tests.servers import BIN, child_env

    home = tmp_path / "prefect-home"
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "qwen-sft"), "run", "-c", "demo", "--set", f"workdir={tmp_path / 'work'}",
                           "--set", f"data.source={BAD / 'truncated.jsonl'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=child_env(PREFECT_HOME=str(home)))
    elapsed = time.perf_counter() - started
    print(f"failed after {elapsed:.1f} s")
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "truncated" in done.stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir()), "a stage ran"
    assert not home.exists() or not any(home.rglob("*.db")), "Prefect's server started before the file was read"
    assert elapsed < 30


def test_a_fifo_as_data_source_is_refused_at_once_by_validate_and_run(tmp_path: Path):
    """A named pipe is not a file: reading it blocked `validate` until killed, and `run` called it "no such file".
    Both now refuse it before opening it, with the same line and exit 3."""
    import subprocess

    from tests.servers import BIN, child_env

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    lines = []
    for args in (["validate", str(fifo), "--out", str(tmp_path / "out")], ["run", "--set", f"data.source={fifo}"]):
        done = subprocess.run([str(BIN / "qwen-sft"), *args, "-c", "demo", "--set", f"workdir={tmp_path / 'work'}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 3, done.stderr[-2000:]
        lines.append(done.stderr.strip().splitlines()[-1])
    assert lines[0] == lines[1] == f"error: {fifo}: is a named pipe (FIFO), not a file; data.source must name a " \
                                   ".jsonl, .ndjson, .json, .parquet, .csv file", lines


@pytest.mark.slow
def test_the_demo_runs_on_an_install_without_the_eval_extra_and_says_it_skipped_lm_eval(tmp_path: Path):
    """The demo preset (eval.harness: true) failed outright on a plain install of the wheel, which has no
    lm-evaluation-harness. The run goes on, with one line that names the extra, and registers its candidate.
    lm-eval is made unimportable for this run only, as a plain install has it: a package of that name earlier on
    the path whose import fails as a missing module's does (the environment itself keeps lm-eval)."""
    import subprocess

    from tests.servers import BIN, child_env

    shadow = tmp_path / "no-eval-extra" / "lm_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'lm_eval\'", name="lm_eval")\n')
    probe = subprocess.run([str(BIN / "python"), "-c", "import lm_eval"], capture_output=True, text=True,
                           env=child_env(PYTHONPATH=str(shadow.parent)))
    assert probe.returncode == 1 and "No module named 'lm_eval'" in probe.stderr, "the run below has no lm-eval"
    sets = [x for o in [*FAST, "train.max_steps=4", f"workdir={tmp_path / 'work'}", "eval.harness=true"]
            for x in ("--set", o)]
    done = subprocess.run([str(BIN / "qwen-sft"), "run", "-c", "demo", *sets], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900,
                          env=child_env(PYTHONPATH=str(shadow.parent), PREFECT_HOME=str(tmp_path / "prefect-home")))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    said = [line for line in out.splitlines() if "lm-evaluation-harness is not installed" in line]
    assert len(said) == 1 and said[0].endswith("lm-evaluation-harness is not installed (pip install "
                                               "'qwen-sft-pipeline[eval]' adds it): eval.harness is skipped, the "
                                               "rest of the run goes on"), said
    assert "version 1 as @candidate" in done.stdout and "harness/" not in done.stdout
