"""Everything that talks to MLflow lives here: runs, params, metrics, artifacts, registry.

Defaults are embedded (``sqlite:///<workdir>/mlflow.db`` + ``<workdir>/mlartifacts``); a
server URI comes from ``tracking.uri`` or ``MLFLOW_TRACKING_URI``. Metric logging during
training is buffered and retried, so a tracking outage never stops training.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sft_core.config import PipelineConfig
from sft_core.errors import PromotionError, TrackingError

log = logging.getLogger(__name__)
RUN_KEY_TAG = "qwen_sft.run_key"
ALIASES = ("candidate", "production", "previous")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# fail fast instead of MLflow's default minutes of HTTP retries; the buffered logger retries itself
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


# read once at import: `mlflow.set_tracking_uri` writes this variable, so a later read would see our own last URI
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(cfg: PipelineConfig) -> str:
    """`tracking.uri`, else `MLFLOW_TRACKING_URI` where the flow runs (a worker's), else SQLite in the workdir."""
    return cfg.tracking.uri or _ENV_TRACKING_URI or f"sqlite:///{cfg.workdir_path / 'mlflow.db'}"


def artifact_root(cfg: PipelineConfig) -> str | None:
    """Local artifact folder for the embedded store; a server decides its own."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (cfg.workdir_path / "mlartifacts").as_uri()


_store_builders: dict[str, tuple[subprocess.Popen, Any]] = {}  # sqlite URI -> (child creating it, its stderr)
_stores_ready: set[str] = set()
_resumed_tags: dict[str, dict[str, str]] = {}  # run id -> its tags when this process resumed it
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


def client(cfg: PipelineConfig):
    import mlflow

    uri = tracking_uri(cfg)
    _ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri, registry_uri=uri)


def check_reachable(cfg: PipelineConfig, timeout: float = 5.0) -> str:
    """Fail fast (seconds, not minutes) when a tracking server cannot be reached."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (configured URI)
                if resp.status >= 500:
                    raise TrackingError(f"MLflow tracking server {uri} is unhealthy (HTTP {resp.status})")
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise TrackingError(f"MLflow tracking server {uri} is unhealthy (HTTP {exc.code})") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}); "
                "start it (mlflow/server.sh) or unset tracking.uri / MLFLOW_TRACKING_URI for the embedded store"
            ) from exc
    else:
        cfg.workdir_path.mkdir(parents=True, exist_ok=True)
    return uri


def experiment_name(cfg: PipelineConfig) -> str:
    if cfg.tracking.experiment:
        return cfg.tracking.experiment
    dataset = cfg.data.source.split("://")[-1].rstrip("/").split("/")[-1].removesuffix(".jsonl")
    model = cfg.model.source.split("://")[-1].rstrip("/").split("/")[-1]
    return f"{dataset}--{model}"


def ensure_experiment(cfg: PipelineConfig) -> str:
    c = client(cfg)
    name = experiment_name(cfg)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(cfg))
    except Exception:  # created concurrently by another run
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_or_resume_run(cfg: PipelineConfig, run_key: str, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """One MLflow run per (config, data): a re-run or a resumed crash continues the same run."""
    from filelock import FileLock

    lock_dir = cfg.workdir_path / "runs"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{run_key}.lock")):  # two identical runs at once share one MLflow run
        return _start_or_resume_run(cfg, run_key, run_name, tags)


def _start_or_resume_run(cfg: PipelineConfig, run_key: str, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
    c = client(cfg)
    exp_id = ensure_experiment(cfg)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1,
                          order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        _resumed_tags[run_id] = dict(found[0].data.tags)
        c.update_run(run_id, status="RUNNING")
        set_tags(cfg, run_id, tags)
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    return run.info.run_id, False


def end_run(cfg: PipelineConfig, run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(run_id, status=status)


def run_url(cfg: PipelineConfig, run_id: str) -> str:
    uri = tracking_uri(cfg)
    c = client(cfg)
    exp_id = c.get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"(qwen-sft ui, then) http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}"


# --- params, inputs, artifacts -------------------------------------------------------------

def log_config(cfg: PipelineConfig, run_id: str) -> None:
    from mlflow.entities import Param

    c = client(cfg)
    existing = c.get_run(run_id).data.params
    params = [Param(k, v[:6000]) for k, v in sorted(cfg.flat_params().items()) if k not in existing]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cfg.to_yaml(), encoding="utf-8")
        c.log_artifact(run_id, str(path))


def log_dataset_inputs(cfg: PipelineConfig, run_id: str, splits: dict, source_location: str) -> None:
    """Lineage: train and val as MLflow dataset inputs (digest, source, row counts)."""
    import mlflow
    import pandas as pd
    from mlflow.entities import InputTag

    from sft_core.data import read_jsonl

    c = client(cfg)
    already = {d.dataset.digest for d in c.get_run(run_id).inputs.dataset_inputs}
    for context in ("train", "val"):
        digest = splits[f"{context}_digest"][:36]
        if digest in already:
            continue
        df = pd.DataFrame(read_jsonl(splits[context]))[["question", "think", "answer"]]
        ds = mlflow.data.from_pandas(df, source=source_location, name=f"{experiment_name(cfg)}-{context}", digest=digest)
        c.log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(ds._to_mlflow_entity(),
                                                                    tags=[InputTag("mlflow.data.context", context)])])


def log_artifact(cfg: PipelineConfig, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    p = Path(path)
    if not p.exists():
        return
    c = client(cfg)
    if p.is_dir():
        c.log_artifacts(run_id, str(p), artifact_path)
    else:
        c.log_artifact(run_id, str(p), artifact_path)


def log_metrics(cfg: PipelineConfig, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
    if items:
        client(cfg).log_batch(run_id, metrics=items)


def set_tags(cfg: PipelineConfig, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(cfg).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class BufferedMetricLogger:
    """Per-step training metrics: queued, flushed in batches, retried while the server is down.

    `log()` never raises and never blocks training; `close()` flushes what is left (with
    retries up to `flush_timeout` seconds) and reports how many points could not be sent.
    """

    def __init__(self, cfg: PipelineConfig, run_id: str, flush_every: float = 2.0, flush_timeout: float = 120.0):
        self.cfg, self.run_id = cfg, run_id
        self.flush_every, self.flush_timeout = flush_every, flush_timeout
        self._queue: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures = 0
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            self._queue.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())

    def _flush(self) -> bool:
        with self._lock:
            batch, self._queue = self._queue, []
        if not batch:
            return True
        try:
            c = client(self.cfg)
            for i in range(0, len(batch), 500):
                c.log_batch(self.run_id, metrics=batch[i : i + 500])
            return True
        except Exception:
            self.failures += 1
            with self._lock:  # put them back, oldest first
                self._queue = batch + self._queue
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_every):
            self._flush()

    def close(self) -> int:
        self._stop.set()
        self._thread.join(timeout=30)
        deadline = time.monotonic() + self.flush_timeout
        while not self._flush() and time.monotonic() < deadline:
            time.sleep(2.0)
        with self._lock:
            return len(self._queue)


def sync_training_metrics(cfg: PipelineConfig, run_id: str, metrics_file: str | Path) -> int:
    """Make sure every point of the training metrics file is in the run (after an outage or a cached train)."""
    from mlflow.entities import Metric

    path = Path(metrics_file)
    if not path.exists():
        return 0
    c = client(cfg)
    points: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        step = int(rec.pop("step"))
        for k, v in rec.items():
            points.setdefault(k, {})[step] = float(v)  # the last value of a step wins (resumes re-log)
    missing = []
    ts = int(time.time() * 1000)
    for key, by_step in points.items():
        have = {m.step for m in c.get_metric_history(run_id, key)}
        missing.extend(Metric(key, v, ts, s) for s, v in sorted(by_step.items()) if s not in have)
    for i in range(0, len(missing), 500):
        c.log_batch(run_id, metrics=missing[i : i + 500])
    return len(missing)


def log_loss_curve(cfg: PipelineConfig, run_id: str, metrics_file: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(metrics_file).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            train.append((rec["step"], rec["train/loss"]))
        if "eval/loss" in rec:
            evals.append((rec["step"], rec["eval/loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*sorted(dict(train).items())), label="train/loss")
    if evals:
        ax.plot(*zip(*sorted(dict(evals).items())), marker="o", label="eval/loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(experiment_name(cfg))
    ax.grid(alpha=0.3)
    ax.legend()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "loss_curve.png"
        fig.savefig(out, dpi=110, bbox_inches="tight")
        plt.close(fig)
        client(cfg).log_artifact(run_id, str(out), "plots")


def log_predictions(cfg: PipelineConfig, run_id: str, predictions_file: str | Path, artifact_file: str = "predictions.json") -> None:
    import mlflow
    import pandas as pd

    rows = [json.loads(x) for x in Path(predictions_file).read_text(encoding="utf-8").splitlines() if x.strip()]
    columns = ["question", "think", "answer", "reference_answer", "format_ok", "rouge_l", "stopped", "new_tokens"]
    df = pd.DataFrame(rows).reindex(columns=columns)
    client(cfg)
    mlflow.log_table(data=df, artifact_file=artifact_file, run_id=run_id)


def log_checkpoints(cfg: PipelineConfig, run_id: str, trained: dict) -> list[str]:
    mode = cfg.tracking.log_checkpoints
    if mode == "none":
        return []
    out = Path(trained["output_dir"])
    chosen = sorted(out.glob("checkpoint-*")) if mode == "all" else ([Path(trained["best_checkpoint"])] if trained.get("best_checkpoint") else [])
    logged = []
    for ckpt in chosen:
        if ckpt.exists():
            log_artifact(cfg, run_id, ckpt, f"checkpoints/{ckpt.name}")
            logged.append(ckpt.name)
    return logged


# --- model + registry ----------------------------------------------------------------------

PIP_REQUIREMENTS = ["torch", "transformers>=5,<6", "accelerate", "safetensors", "tokenizers"]


def serving_prompt_template(cfg: PipelineConfig, model_dir: str) -> str:
    """The chat prompt around `{prompt}`, so a served model gets what it was trained on."""
    from sft_core.modeling import load_tokenizer
    from sft_core.tokenize import render_prompt

    return render_prompt(load_tokenizer(model_dir), "{prompt}", cfg.data.system_prompt)


@contextlib.contextmanager
def _transformers5_task_impl_compat():
    """MLflow 3.17 logs a local checkpoint by reading `check_task(task)[1]["impl"].__name__`;
    transformers 5 stores that impl as a dotted string. Resolve it to the class for the call."""
    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task):
        normalized, targeted, options = original(task)
        impl = targeted.get("impl")
        if isinstance(impl, str):
            module, _, name = impl.rpartition(".")
            targeted = {**targeted, "impl": getattr(importlib.import_module(module), name)}
        return normalized, targeted, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def log_model(cfg: PipelineConfig, run_id: str, model_dir: str) -> str:
    """Log the final model from its folder with the transformers flavor; returns the model URI."""
    import mlflow
    from mlflow.models import infer_signature

    client(cfg)
    existing = [m for m in mlflow.search_logged_models(experiment_ids=[client(cfg).get_run(run_id).info.experiment_id],
                                                         filter_string=f"source_run_id = '{run_id}'", output_format="list")
                if m.name == "model" and str(m.status).endswith("READY")]
    if existing:
        return existing[0].model_uri
    # request-time generation settings a served model accepts in `"params"` (defaults: greedy, like evaluation)
    params = {"max_new_tokens": cfg.eval.max_new_tokens, "do_sample": False, "temperature": cfg.eval.temperature,
              "top_p": cfg.eval.top_p}
    signature = infer_signature(["问题"], ["<think>…</think>\n\n回答"], params=params)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), _transformers5_task_impl_compat():
        info = mlflow.transformers.log_model(
            transformers_model=str(model_dir),
            name="model",
            task="text-generation",
            signature=signature,
            pip_requirements=PIP_REQUIREMENTS,
            prompt_template=serving_prompt_template(cfg, model_dir),
            model_config={"max_new_tokens": cfg.eval.max_new_tokens, "do_sample": False},
            metadata={"system_prompt": cfg.data.system_prompt},
        )
    return info.model_uri


def register(cfg: PipelineConfig, run_id: str, model_uri: str, metrics: dict[str, float], train_key: str) -> dict:
    """Register a version (idempotent per run + train key) and point `candidate` at it."""
    c = client(cfg)
    name = cfg.registry.name
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, description="Qwen2.5 medical <think> assistant (qwen-sft-pipeline)")
        except Exception:
            c.get_registered_model(name)  # created concurrently
    found = c.search_model_versions(f"name = '{name}' and tag.train_key = '{train_key}' and run_id = '{run_id}'")
    if found:
        version = found[0]
    else:
        tags = {"run_id": run_id, "train_key": train_key, **{k.replace("/", "_"): f"{v:.6g}" for k, v in metrics.items()}}
        model_id = model_uri.split("/")[-1] if model_uri.startswith("models:/m-") else None
        version = c.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
        _wait_ready(c, name, version.version)
    c.set_registered_model_alias(name, "candidate", version.version)
    return {"name": name, "version": int(version.version), "alias": "candidate", "reused": bool(found)}


def _wait_ready(c, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)


def _version_metrics(c, name: str, version: str) -> dict[str, float]:
    mv = c.get_model_version(name, version)
    run = c.get_run(mv.run_id)
    return dict(run.data.metrics)


def promote(cfg: PipelineConfig, *, version: int | None = None, alias: str = "candidate", force: bool = False,
            reason: str = "") -> dict:
    """Gate the candidate against production; on pass move `production`, keep the old as `previous`."""
    c = client(cfg)
    name = cfg.registry.name
    try:
        cand = c.get_model_version(name, str(version)) if version is not None else c.get_model_version_by_alias(name, alias)
    except Exception as exc:
        raise PromotionError(f"registered model '{name}' has no {'version ' + str(version) if version else 'alias @' + alias}") from exc
    try:
        prod = c.get_model_version_by_alias(name, "production")
    except Exception:
        prod = None
    checks = []
    if prod is not None and prod.version == cand.version:
        raise PromotionError(f"version {cand.version} of '{name}' is already @production")
    if prod is not None:
        cm, pm = _version_metrics(c, name, cand.version), _version_metrics(c, name, prod.version)
        g = cfg.registry.gate
        for metric, ok_fn, rule in (
            ("eval/loss", lambda a, b: a <= b + g.max_eval_loss_increase, f"<= production + {g.max_eval_loss_increase}"),
            ("gen/format_ok_rate", lambda a, b: a >= b + g.min_format_ok_delta, f">= production + {g.min_format_ok_delta}"),
        ):
            a, b = cm.get(metric), pm.get(metric)
            passed = a is not None and b is not None and ok_fn(a, b)
            checks.append({"metric": metric, "candidate": a, "production": b, "rule": rule, "passed": passed})
    failed = [ch for ch in checks if not ch["passed"]]
    if failed and not force:
        detail = "; ".join(f"{ch['metric']} {ch['candidate']} vs production {ch['production']} (needs {ch['rule']})" for ch in failed)
        raise PromotionError(f"version {cand.version} of '{name}' failed the gate: {detail} (use --force to override)")
    if prod is not None:
        c.set_registered_model_alias(name, "previous", prod.version)
    c.set_registered_model_alias(name, "production", cand.version)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for k, v in {"promoted_at": stamp, "promoted_by": _user(), "promotion_reason": reason or ("forced" if failed else "gate passed")}.items():
        c.set_model_version_tag(name, cand.version, k, v)
    return {"name": name, "production": int(cand.version), "previous": int(prod.version) if prod else None,
            "checks": checks, "forced": bool(failed)}


def rollback(cfg: PipelineConfig) -> dict:
    """`production` <- `previous` (and the demoted version becomes `previous`)."""
    c = client(cfg)
    name = cfg.registry.name
    try:
        prev = c.get_model_version_by_alias(name, "previous")
    except Exception as exc:
        raise PromotionError(f"registered model '{name}' has no @previous version to roll back to") from exc
    try:
        prod = c.get_model_version_by_alias(name, "production")
    except Exception:
        prod = None
    c.set_registered_model_alias(name, "production", prev.version)
    if prod is not None:
        c.set_registered_model_alias(name, "previous", prod.version)
        c.set_model_version_tag(name, prod.version, "rolled_back_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return {"name": name, "production": int(prev.version), "previous": int(prod.version) if prod else None}


def aliases(cfg: PipelineConfig) -> dict[str, int]:
    c = client(cfg)
    out = {}
    for a in ALIASES:
        try:
            out[a] = int(c.get_model_version_by_alias(cfg.registry.name, a).version)
        except Exception:
            pass
    return out


def download_model(uri: str, cfg: PipelineConfig) -> Path:
    """A local folder with config + weights + tokenizer for an MLflow model URI."""
    import mlflow

    client(cfg)
    dest = cfg.workdir_path / "downloads" / uri.replace(":", "_").replace("/", "_").replace("@", "_at_")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as exc:
        raise TrackingError(f"cannot download '{uri}' from {tracking_uri(cfg)}: {exc}") from exc
    for candidate in (local / "model", local / "components" / "model", local):
        if (candidate / "config.json").exists():
            if not (candidate / "tokenizer_config.json").exists() and (local / "components" / "tokenizer").exists():
                for f in (local / "components" / "tokenizer").iterdir():
                    (candidate / f.name).write_bytes(f.read_bytes())
            return candidate
    raise TrackingError(f"'{uri}' does not hold a transformers model folder")


def registered_sources(cfg: PipelineConfig) -> set[str]:
    """Run ids that some registered version points to (gc must keep their files)."""
    c = client(cfg)
    try:
        return {mv.run_id for mv in c.search_model_versions(f"name = '{cfg.registry.name}'") if mv.run_id}
    except Exception:
        return set()


def _user() -> str:
    try:
        return os.environ.get("QWEN_SFT_USER") or getpass.getuser()
    except Exception:
        return "unknown"


def tag_value(cfg: PipelineConfig, run_id: str, key: str) -> str | None:
    return client(cfg).get_run(run_id).data.tags.get(key)


def is_logged(cfg: PipelineConfig, run_id: str, key: str, marker: str) -> bool:
    """Whether the run's `key` tag says `marker` was logged.

    The tags read when this process resumed the run answer "yes" without a round-trip (a
    marker tag is only ever set after its logging finished); anything else asks the store.
    """
    if _resumed_tags.get(run_id, {}).get(key) == marker:
        return True
    return tag_value(cfg, run_id, key) == marker
