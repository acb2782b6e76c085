"""One MLflow run per (config, data): experiments, runs, params, metrics, artifacts, tags.

Metric logging during training is buffered and retried, so a tracking outage never stops
training.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sft_core.config import PipelineConfig
from sft_core.stages import Split, Trained
from tasks.tracking.store import artifact_root, client, tracking_uri

RUN_KEY_TAG = "qwen_sft.run_key"
_resumed_tags: dict[str, dict[str, str]] = {}  # run id -> its tags when this process resumed it


def experiment_name(cfg: PipelineConfig) -> str:
    """`tracking.experiment`, else `<dataset>--<model>` (e.g. delicate_medical_r1_data--Qwen2.5-1.5B)."""
    from sft_core.sources import parse_data_source, parse_model_source

    if cfg.tracking.experiment:
        return cfg.tracking.experiment
    return f"{parse_data_source(cfg.data.source).name}--{parse_model_source(cfg.model.source).name}"


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
                             cwd=Path(__file__).resolve().parents[2])
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


def log_dataset_inputs(cfg: PipelineConfig, run_id: str, splits: Split, source_location: str) -> None:
    """Lineage: train and val as MLflow dataset inputs (digest, source, row counts)."""
    import mlflow
    import pandas as pd
    from mlflow.entities import InputTag

    from sft_core.data import read_jsonl

    c = client(cfg)
    already = {d.dataset.digest for d in c.get_run(run_id).inputs.dataset_inputs}
    for context, path, full_digest in (("train", splits.train, splits.train_digest), ("val", splits.val, splits.val_digest)):
        digest = full_digest[:36]
        if digest in already:
            continue
        df = pd.DataFrame(read_jsonl(path))[["question", "think", "answer"]]
        ds = mlflow.data.from_pandas(df, source=source_location, name=f"{experiment_name(cfg)}-{context}", digest=digest)
        c.log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(ds._to_mlflow_entity(),
                                                                    tags=[InputTag("mlflow.data.context", context)])])


def log_validation(cfg: PipelineConfig, run_id: str, report: str | None, docs: str | None,
                   quarantine: str | None) -> None:
    """The validation report, its Data Docs site and the quarantined rows, under `validation/`."""
    for path, where in ((report, "validation"), (docs, "validation/data_docs"), (quarantine, "validation")):
        if path:
            log_artifact(cfg, run_id, path, where)


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


def log_predictions(cfg: PipelineConfig, run_id: str, predictions_file: str | Path,
                    base_file: str | Path | None = None, artifact_file: str = "predictions.json") -> None:
    """One table: question, reference, the base model's output, the fine-tune's think and answer (raw text when unparsed)."""
    import mlflow
    import pandas as pd

    from sft_core.generate import PREDICTION_COLUMNS, side_by_side

    def read(path: str | Path | None) -> list[dict]:
        return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()] if path else []

    df = pd.DataFrame(side_by_side(read(predictions_file), read(base_file) or None)).reindex(columns=list(PREDICTION_COLUMNS))
    client(cfg)
    mlflow.log_table(data=df, artifact_file=artifact_file, run_id=run_id)


def log_checkpoints(cfg: PipelineConfig, run_id: str, trained: Trained) -> list[str]:
    mode = cfg.tracking.log_checkpoints
    if mode == "none":
        return []
    out = Path(trained.output_dir)
    best = [Path(trained.best_checkpoint)] if trained.best_checkpoint else []
    chosen = sorted(out.glob("checkpoint-*")) if mode == "all" else best
    logged = []
    for ckpt in chosen:
        if ckpt.exists():
            log_artifact(cfg, run_id, ckpt, f"checkpoints/{ckpt.name}")
            logged.append(ckpt.name)
    return logged



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
