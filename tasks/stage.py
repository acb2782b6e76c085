"""One Prefect task runs any stage of `sft_core.stages.STAGES`.

The stage folder's ``_DONE.json`` is the one record of "done". Prefect's cache is derived from
it: the cache key is the folder plus the record's bytes plus the stage's code version, so a
folder that is not done has no key (never served from Prefect's cache), a rewritten one gets
a new key, and ``--refresh`` sets ``refresh_cache`` (the stage is run and its record replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any, Iterator

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from sft_core.config import PipelineConfig
from sft_core.errors import DataSourceError, ModelSourceError, SftError
from sft_core.stages import DONE, STAGES, Result


def done_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The Prefect cache key of a stage run: None until its folder holds `_DONE.json`."""
    folder = Path(parameters["folder"])
    try:
        record = (folder / DONE).read_bytes()
    except OSError:
        return None
    code = STAGES[parameters["name"]].code_version()
    digest = hashlib.sha256(str(folder.resolve()).encode() + b"\0" + record + b"\0" + code.encode()).hexdigest()
    return f"qwen-sft-{digest[:32]}"


def can_heal(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry what a second try can fix (network, a busy service), not a bad file,
    a failed validation or a bad setting."""
    try:
        state.result()
    except (DataSourceError, ModelSourceError) as exc:
        return getattr(exc, "transient", True)
    except SftError:
        return False
    except Exception:  # noqa: BLE001  (anything else: an OS or network error may pass)
        return True
    return False


@contextlib.contextmanager
def _training_extras(cfg: PipelineConfig, run_id: str | None, folder: str) -> Iterator[dict[str, Any]]:
    """The train stage's progress: each logged step to the Prefect log and to MLflow (buffered, outage-tolerant,
    a step once a checkpoint in `folder` holds it: a resumed run's steps are never the killed run's)."""
    logger = get_run_logger()
    mlflow_logger = None
    if run_id:
        from tasks.tracking import BufferedMetricLogger

        mlflow_logger = BufferedMetricLogger(cfg, run_id, folder=folder)

    def sink(step: int, metrics: dict[str, float]) -> None:
        if mlflow_logger:
            mlflow_logger.log(step, metrics)

    finished = False
    try:
        yield {"sink": sink, "log": logger.info}  # one progress line per logged step in the Prefect log
        finished = True
    finally:
        if mlflow_logger:
            left = mlflow_logger.close(finished=finished)
            if left:
                logger.warning("%d metric points could not reach MLflow yet; they are re-sent from metrics.jsonl", left)


PROGRESS_STAGES = ("generate", "generate-base")  # long stages besides train that say how far they are


@task(persist_result=True, cache_key_fn=done_cache_key)
def stage_task(name: str, cfg: PipelineConfig, inputs: dict[str, Any], folder: str, refresh: bool = False,
               run_id: str | None = None) -> Result:
    """Run the stage `name` on `inputs` (results of earlier stages and plain values) into `folder`."""
    stage = STAGES[name]
    if name == "train":
        extras = _training_extras(cfg, run_id, folder)
    elif name in PROGRESS_STAGES:  # one progress line per batch of answers in the Prefect log
        extras = contextlib.nullcontext({"log": get_run_logger().info})
    else:
        extras = contextlib.nullcontext({})
    with extras as kwargs:
        return stage.run(cfg, refresh=refresh, extras=kwargs, **inputs)


class StageRunner:
    """Runs stages inside the flow and keeps the (stage, ran or cached, seconds) rows of the result table."""

    def __init__(self, cfg: PipelineConfig, *, refresh: bool = False) -> None:
        self.cfg, self.refresh = cfg, refresh
        self.rows: list[dict[str, Any]] = []

    def __call__(self, name: str, *, run_id: str | None = None, **inputs: Any) -> Result:
        stage = STAGES[name]
        key = stage.key_of(self.cfg, **inputs)
        refresh = self.refresh or key is None
        options: dict[str, Any] = {"name": name, "task_run_name": name, "refresh_cache": refresh}
        if stage.retries:
            options.update(retries=stage.retries, retry_delay_seconds=[10, 60][: stage.retries],
                           retry_condition_fn=can_heal)
        started = time.perf_counter()
        state = stage_task.with_options(**options)(name, self.cfg, inputs, str(stage.folder_of(self.cfg, key)),
                                                   refresh, run_id, return_state=True)
        result = state.result()
        cached = state.name == "Cached" or result.reused
        self.rows.append({"stage": name, "status": "cached" if cached else "ran", "folder": result.folder,
                          "seconds": round(time.perf_counter() - started, 2), "compute_seconds": result.seconds})
        return result

    def timed(self, name: str, fn, *args: Any, **kwargs: Any) -> Any:
        """A step that is not a stage (registration) in the same table: `ran`, or `cached` if it found its work done."""
        started = time.perf_counter()
        state = fn(*args, return_state=True, **kwargs)
        out = state.result()
        reused = isinstance(out, dict) and out.get("reused", False)
        self.rows.append({"stage": name, "status": "cached" if reused else "ran", "folder": None,
                          "seconds": round(time.perf_counter() - started, 2), "compute_seconds": 0.0})
        return out
