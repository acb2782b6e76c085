"""One Prefect task runs any stage of `sft_core.stages.STAGES`.

The stage folder's ``_DONE.json`` is the one cache (`sft_core.stage_engine`): the task asks it once, and
Prefect keeps no second store of results (no persisted result, no cache key). A stage found done ends
its task run in a Completed state named ``Cached``, so the Prefect UI shows the badge it shows for its
own cache; ``--refresh`` redoes the stage and replaces its record. What a stage's body takes besides
its inputs (a progress log, a metrics sink) is declared on the stage (`Stage.takes`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from sft_core.config import PipelineConfig
from sft_core.errors import DataSourceError, ModelSourceError, SftError
from sft_core.results import Result
from sft_core.stage_engine import Stage
from sft_core.stages import STAGES
from tasks.tracking import BufferedMetricLogger


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
def _takes(stage: Stage, cfg: PipelineConfig, run_id: str | None, folder: str) -> Iterator[dict[str, Any]]:
    """What the stage's body takes: `log`, one progress line per step or batch into the Prefect log; `sink`,
    each logged training step to MLflow (buffered, outage-tolerant, a step once a checkpoint in `folder` holds
    it: a resumed run's steps are never the killed run's)."""
    logger = get_run_logger()
    extras: dict[str, Any] = {"log": logger.info} if "log" in stage.takes else {}
    mlflow_logger = BufferedMetricLogger(cfg, run_id, folder=folder) if "sink" in stage.takes and run_id else None
    if "sink" in stage.takes:
        extras["sink"] = mlflow_logger.log if mlflow_logger else None
    finished = False
    try:
        yield extras
        finished = True
    finally:
        if mlflow_logger:
            left = mlflow_logger.close(finished=finished)
            if left:
                logger.warning("%d metric points could not reach MLflow yet; they are re-sent from metrics.jsonl", left)


@task(persist_result=False, cache_policy=NO_CACHE)
def stage_task(name: str, cfg: PipelineConfig, inputs: dict[str, Any], refresh: bool = False,
               run_id: str | None = None) -> Result | State:
    """Run the stage `name` on `inputs` (results of earlier stages and plain values): its body, or its record
    when its folder is done (then the task run is `Cached`)."""
    stage = STAGES[name]
    key = stage.key_of(cfg, **inputs)
    folder = stage.folder_of(cfg, key)
    with _takes(stage, cfg, run_id, str(folder)) as extras:
        result = stage.run_into(cfg, folder, key=key, refresh=refresh or key is None, extras=extras, **inputs)
    if result.reused:
        return Completed(data=result, name="Cached", message=f"done before: {folder}")
    return result


@dataclass
class StageRow:
    """One line of the run's stage table."""

    stage: str
    status: str  # "ran" or "cached"
    seconds: float  # wall, orchestration included
    compute_seconds: float = 0.0  # the body's own, as its record says (a cached stage's from when it ran)
    folder: str | None = None


class StageRunner:
    """Runs stages inside the flow and keeps the rows of the run's stage table."""

    def __init__(self, cfg: PipelineConfig, *, refresh: bool = False) -> None:
        self.cfg, self.refresh = cfg, refresh
        self.rows: list[StageRow] = []

    def __call__(self, name: str, *, run_id: str | None = None, **inputs: Any) -> Result:
        stage = STAGES[name]
        options: dict[str, Any] = {"name": name, "task_run_name": name}
        if stage.retries:
            options.update(retries=stage.retries, retry_delay_seconds=[10, 60][: stage.retries],
                           retry_condition_fn=can_heal)
        started = time.perf_counter()
        state = stage_task.with_options(**options)(name, self.cfg, inputs, self.refresh, run_id, return_state=True)
        result = state.result()  # the stage's result, whether it ran or its task returned the `Cached` state
        self.rows.append(StageRow(name, "cached" if result.reused else "ran", round(time.perf_counter() - started, 2),
                                  result.seconds, result.folder))
        return result

    def timed(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A step that is not a stage (registration) in the same table: `ran`, or `cached` if it found its work
        done (a result whose `reused` says so)."""
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        reused = bool(getattr(out, "reused", False))
        self.rows.append(StageRow(name, "cached" if reused else "ran", round(time.perf_counter() - started, 2)))
        return out
