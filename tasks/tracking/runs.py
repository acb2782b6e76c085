"""One MLflow run per (config, data): experiments, runs, params, metrics, artifacts, tags.

Metric logging during training is buffered and retried, so a tracking outage never stops
training.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_core.checkpoints import newest_whole_step
from sft_core.config import PipelineConfig, redact_uri, where_it_runs
from sft_core.data import read_jsonl
from sft_core.generate import PREDICTION_COLUMNS, side_by_side
from sft_core.metrics import SELECTION_LOSS
from sft_core.results import Split, Trained
from sft_core.sources import parse_data_source, parse_model_source
from sft_core.train import read_metrics
from sft_core.validation import REPORT_HTML
from tasks.tracking.store import artifact_root, client, tracking_uri

RUN_KEY_TAG = "qwen_sft.run_key"
FLOW_RUNS_TAG = "prefect.flow_run_ids"  # every Prefect flow run that worked on the run, oldest first
FLOW_RUN_URL_TAG = "prefect.flow_run_url"  # the page of the flow run that created the run (with a Prefect UI)
LAST_FLOW_RUN_URL_TAG = "prefect.last_flow_run_url"  # the page of the latest flow run that continued it
_resumed_tags: dict[str, dict[str, str]] = {}  # run id -> its tags when this process resumed it


def experiment_name(cfg: PipelineConfig) -> str:
    """`tracking.experiment`, else `<dataset>--<model>` (e.g. delicate_medical_r1_data--Qwen2.5-1.5B)."""
    if cfg.tracking.experiment:
        return cfg.tracking.experiment
    return f"{parse_data_source(cfg.data.source).name}--{parse_model_source(cfg.model.source).name}"


# The experiment's type, as the MLflow UI's own type selector writes it ("Machine learning"). MLflow 3.17's UI
# reads it only with its workflow switch off; with the switch (the default) a browser opens every experiment on the
# GenAI overview unless the URL says `workflowType=machine_learning` or the user picked "Model training" in that
# browser. So every link this package prints carries the parameter (`UI_QUERY`).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "?workflowType=machine_learning"


def ensure_experiment(cfg: PipelineConfig) -> str:
    c = client(cfg)
    name = experiment_name(cfg)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=artifact_root(cfg), tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently by another run
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
        for key, value in EXPERIMENT_KIND.items():
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class RunHandle:
    run_id: str
    resumed: bool  # an earlier flow run made it: this one continues it
    finished_before: bool  # and it had finished: what it measured (status, start and end) is left as it is


def start_or_resume_run(cfg: PipelineConfig, run_key: str, run_name: str, tags: dict[str, str],
                        flow_run: str | None = None) -> RunHandle:
    """One MLflow run per (config, data, code): a re-run or a resumed crash continues the same run.

    A continuation is recorded in tags (`qwen_sft.continuations`, `qwen_sft.last_continued_at`, every
    flow run in `prefect.flow_run_ids`); the creation tags and a finished run's status and times stay.
    """
    from filelock import FileLock

    lock_dir = cfg.workdir_path / "runs"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{run_key}.lock")):  # two identical runs at once share one MLflow run
        return _start_or_resume_run(cfg, run_key, run_name, tags, flow_run)


def _start_or_resume_run(cfg: PipelineConfig, run_key: str, run_name: str, tags: dict[str, str],
                         flow_run: str | None) -> RunHandle:
    c = client(cfg)
    exp_id = ensure_experiment(cfg)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1,
                          order_by=["attributes.start_time DESC"])
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if found:
        run = found[0]
        run_id, old = run.info.run_id, dict(run.data.tags)
        _resumed_tags[run_id] = old
        finished = run.info.status == "FINISHED"
        if not finished:  # a crashed or interrupted run: this flow run finishes its work
            c.update_run(run_id, status="RUNNING")
        flow_runs = [f for f in old.get(FLOW_RUNS_TAG, "").split(",") if f]
        update = {"qwen_sft.continuations": str(int(old.get("qwen_sft.continuations", "0")) + 1),
                  "qwen_sft.last_continued_at": now}
        if flow_run and flow_run not in flow_runs:
            update[FLOW_RUNS_TAG] = ",".join([*flow_runs, flow_run])
        if tags.get(FLOW_RUN_URL_TAG):  # the creator's page stays; this flow run's page beside it
            update[LAST_FLOW_RUN_URL_TAG] = tags[FLOW_RUN_URL_TAG]
        set_tags(cfg, run_id, update)
        return RunHandle(run_id, True, finished)
    first = {FLOW_RUNS_TAG: flow_run} if flow_run else {}
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags, **first})
    return RunHandle(run.info.run_id, False, False)


@contextlib.contextmanager
def run_lock(cfg: PipelineConfig, run_id: str) -> Iterator[None]:
    """One writer at a time per run: two identical runs at once log, register and evaluate it once."""
    from filelock import FileLock

    folder = cfg.workdir_path / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{run_id}.lock")):
        yield


def end_run(cfg: PipelineConfig, handle: RunHandle, status: str = "FINISHED", detail: str = "") -> None:
    """End the run, or, for a continuation of a finished run, record how the continuation ended."""
    if handle.finished_before:
        set_tags(cfg, handle.run_id, {"qwen_sft.last_continuation": status.lower() + (f": {detail}" if detail else "")})
        return
    client(cfg).set_terminated(handle.run_id, status=status)


LOCAL_UI = "http://127.0.0.1:5000"  # where `qwen-sft ui` serves an embedded store


def ui_base(cfg: PipelineConfig) -> str:
    """The MLflow UI: the tracking server, or `qwen-sft ui`'s for the embedded store (password hidden)."""
    uri = tracking_uri(cfg)
    return redact_uri(uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI)


def run_url(cfg: PipelineConfig, run_id: str, tab: str = "") -> str:
    """The run's page in the MLflow UI (`tab`: e.g. `artifacts/validation/validation_report.html`), opening in
    the model-training view."""
    exp_id = client(cfg).get_run(run_id).info.experiment_id
    return f"{ui_base(cfg)}/#/experiments/{exp_id}/runs/{run_id}{'/' + tab if tab else ''}{UI_QUERY}"


def experiment_url(cfg: PipelineConfig, base: str | None = None) -> str | None:
    """The experiment's page in the MLflow UI at `base` (default `ui_base`), opening on its training runs; None
    before its first run."""
    exp = client(cfg).get_experiment_by_name(experiment_name(cfg))
    return f"{base or ui_base(cfg)}/#/experiments/{exp.experiment_id}{UI_QUERY}" if exp else None


def needs_local_ui(cfg: PipelineConfig) -> bool:
    """Whether the run's URL works only while `qwen-sft ui` runs (an embedded store)."""
    return not tracking_uri(cfg).startswith(("http://", "https://"))


def log_config(cfg: PipelineConfig, run_id: str) -> None:
    """What the run computes as params (the comparison view); the whole resolved config as config.yaml."""
    from mlflow.entities import Param

    c = client(cfg)
    existing = c.get_run(run_id).data.params
    params = [Param(k, v[:6000]) for k, v in sorted(cfg.flat_params().items())
              if k not in existing and not where_it_runs(k)]  # where it ran: in config.yaml, not in the comparison
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cfg.to_yaml(), encoding="utf-8")
        c.log_artifact(run_id, str(path))


def log_dataset_inputs(cfg: PipelineConfig, run_id: str, splits: Split, source_location: str) -> None:
    """Lineage: train and val as MLflow dataset inputs (digest, source, row counts)."""
    import pandas as pd
    from mlflow.entities import InputTag

    import mlflow

    c = client(cfg)
    already = {d.dataset.digest for d in c.get_run(run_id).inputs.dataset_inputs}
    for context, path, full_digest in (("train", splits.train, splits.train_digest), ("val", splits.val, splits.val_digest)):
        digest = full_digest[:36]
        if digest in already:
            continue
        df = pd.DataFrame(read_jsonl(path))[["question", "think", "answer"]]
        with warnings.catch_warnings():  # a local path matches two equivalent source types; MLflow picks one and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = mlflow.data.from_pandas(df, source=redact_uri(source_location), name=f"{experiment_name(cfg)}-{context}",
                                         digest=digest)
        c.log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(ds._to_mlflow_entity(),
                                                                    tags=[InputTag("mlflow.data.context", context)])])


def log_validation(cfg: PipelineConfig, run_id: str, report: str | None, docs: str | None,
                   quarantine: str | None) -> None:
    """Under `validation/`: first the report as one self-contained page, linked from the run's description (MLflow's
    artifact view shows it whole), then as JSON, the whole GX Data Docs site (its index links to the result and
    suite pages, styled and navigable in a browser opened on the downloaded folder: MLflow's view shows one file
    without its style sheets), and the quarantined rows."""
    if report:
        page = Path(report).with_name(REPORT_HTML)
        if page.exists():
            log_artifact(cfg, run_id, page, "validation")
            _describe(cfg, run_id, f"Data validation: [{REPORT_HTML}]"
                                   f"({run_url(cfg, run_id, f'artifacts/validation/{REPORT_HTML}')})")
        log_artifact(cfg, run_id, report, "validation")
    if docs:
        log_artifact(cfg, run_id, Path(docs).parent, "validation/data_docs")  # the site, not only its index.html
    if quarantine:
        log_artifact(cfg, run_id, quarantine, "validation")


def _describe(cfg: PipelineConfig, run_id: str, line: str) -> None:
    """Add `line` (Markdown) to the run's description, once."""
    c = client(cfg)
    note = c.get_run(run_id).data.tags.get("mlflow.note.content", "")
    if line not in note:
        c.set_tag(run_id, "mlflow.note.content", f"{note}\n\n{line}".strip())


def log_artifact(cfg: PipelineConfig, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    p = Path(path)
    if not p.exists():
        return
    c = client(cfg)
    if p.is_dir():
        c.log_artifacts(run_id, str(p), artifact_path)
    else:
        c.log_artifact(run_id, str(p), artifact_path)


def log_json(cfg: PipelineConfig, run_id: str, data: Any, artifact_file: str) -> None:
    """`data` as a JSON artifact at `artifact_file` (e.g. `evaluation/report.json`)."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        client(cfg).log_artifact(run_id, str(path), folder or None)


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

    With `folder` (the training's), a step is sent once a whole checkpoint holds it (one with its checksum
    manifest, `sft_core.checkpoints`), or when training ends: MLflow keeps the first value of a step and
    cannot delete one, so a step a killed run logged after its last checkpoint would keep that run's value
    when the resumed run trains it again. `close(finished=False)` (training failed or was stopped) drops the
    steps after the newest checkpoint: the resumed run logs them. The terminal and the Prefect log show every
    step as it comes; the MLflow charts follow checkpoint by checkpoint.
    """

    def __init__(self, cfg: PipelineConfig, run_id: str, flush_every: float = 2.0, flush_timeout: float = 120.0,
                 folder: str | Path | None = None):
        self.cfg, self.run_id = cfg, run_id
        self.flush_every, self.flush_timeout = flush_every, flush_timeout
        self.folder = Path(folder) if folder is not None else None
        self._queue: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures = 0
        self._known: dict[str, set[int]] = {}  # key -> steps the run had before this logger (fetched once per key)
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Queue `metrics` at `step`; a step the run already has for a key is not sent twice."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            self._queue.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())

    def _final_step(self) -> float:
        """The last step whose points are final: all of them without a folder, else the newest whole checkpoint's."""
        return float("inf") if self.folder is None else newest_whole_step(self.folder)

    def _flush(self, upto: float | None = None) -> bool:
        upto = self._final_step() if upto is None else upto
        with self._lock:
            batch = [m for m in self._queue if m.step <= upto]
            self._queue = [m for m in self._queue if m.step > upto]
        if not batch:
            return True
        try:
            c = client(self.cfg)
            batch = [m for m in batch if m.step not in self._logged_steps(c, m.key)]
            for i in range(0, len(batch), 500):
                c.log_batch(self.run_id, metrics=batch[i : i + 500])
            return True
        except Exception:
            self.failures += 1
            with self._lock:  # put them back, oldest first
                self._queue = batch + self._queue
            return False

    def _logged_steps(self, c, key: str) -> set[int]:
        if key not in self._known:
            self._known[key] = {m.step for m in c.get_metric_history(self.run_id, key)}
        return self._known[key]

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_every):
            self._flush()

    def close(self, finished: bool = True) -> int:
        """Send what is final (everything when training `finished`); the number of points that could not be sent."""
        self._stop.set()
        self._thread.join(timeout=30)
        upto = float("inf") if finished else self._final_step()
        with self._lock:  # a stopped training's steps after its newest checkpoint are trained and logged again
            self._queue = [m for m in self._queue if m.step <= upto]
        deadline = time.monotonic() + self.flush_timeout
        while not self._flush(upto) and time.monotonic() < deadline:
            time.sleep(2.0)
        with self._lock:
            return len(self._queue)


def sync_training_metrics(cfg: PipelineConfig, run_id: str, metrics_file: str | Path) -> int:
    """Make sure every point of the training metrics file is in the run (after an outage or a cached train)."""
    from mlflow.entities import Metric

    c = client(cfg)
    points: dict[str, dict[int, float]] = {}
    for rec in read_metrics(metrics_file):
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
    for rec in read_metrics(metrics_file):
        if "train/loss" in rec:
            train.append((rec["step"], rec["train/loss"]))
        if SELECTION_LOSS in rec:
            evals.append((rec["step"], rec[SELECTION_LOSS]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*sorted(dict(train).items())), label="train/loss")
    if evals:
        ax.plot(*zip(*sorted(dict(evals).items())), marker="o", label=f"{SELECTION_LOSS} (selection questions)")
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
    import pandas as pd

    import mlflow

    def read(path: str | Path | None) -> list[dict]:
        return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()] if path else []

    df = pd.DataFrame(side_by_side(read(predictions_file), read(base_file) or None)).reindex(columns=list(PREDICTION_COLUMNS))
    client(cfg)
    mlflow.log_table(data=df, artifact_file=artifact_file, run_id=run_id)


CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model")  # what a user can load


def log_checkpoints(cfg: PipelineConfig, run_id: str, trained: Trained) -> list[str]:
    """The selected checkpoint (or all) as loadable files: weights, tokenizer, configs, trainer state.

    Optimizer and scheduler state, RNG states and pickles stay on the worker's disk for resuming:
    at 1.5B the AdamW state alone is ~12 GB, four times the weights.
    """
    mode = cfg.tracking.log_checkpoints
    if mode == "none":
        return []
    out = Path(trained.output_dir)
    best = [Path(trained.best_checkpoint)] if trained.best_checkpoint else []
    chosen = sorted(out.glob("checkpoint-*")) if mode == "all" else best
    logged = []
    c = client(cfg)
    for ckpt in chosen:
        if not ckpt.exists():
            continue
        for f in sorted({f for pattern in CHECKPOINT_FILES for f in ckpt.glob(pattern)}):
            c.log_artifact(run_id, str(f), f"checkpoints/{ckpt.name}")
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
