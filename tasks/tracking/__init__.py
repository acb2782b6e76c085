"""Everything that talks to MLflow lives in this package; callers use ``tracking.<name>``.

- ``store``: where the store is (``tracking.uri`` / ``MLFLOW_TRACKING_URI`` / embedded SQLite), its
  creation in the background, the client, the reachability check;
- ``runs``: experiments, one run per (config, data), params, metrics (buffered and retried),
  artifacts, predictions, tags;
- ``models``: the logged model, registry versions, the candidate / production / previous aliases.
"""

from tasks.tracking.models import (
    PIP_REQUIREMENTS,
    REPORT_ARTIFACT,
    Promotion,
    Registration,
    Rollback,
    aliases_line,
    aliases,
    attach_model_card,
    download_model,
    link_model_metrics,
    log_model,
    promote,
    register,
    registered_folders,
    rollback,
    run_of,
    serving_prompt_template,
)
from tasks.tracking.runs import (
    FLOW_RUN_URL_TAG,
    FLOW_RUNS_TAG,
    RUN_KEY_TAG,
    BufferedMetricLogger,
    RunHandle,
    end_run,
    ensure_experiment,
    experiment_name,
    experiment_url,
    git_commit,
    is_logged,
    log_artifact,
    log_checkpoints,
    log_config,
    log_dataset_inputs,
    log_json,
    log_loss_curve,
    log_metrics,
    log_predictions,
    log_validation,
    needs_local_ui,
    run_lock,
    run_url,
    set_tags,
    start_or_resume_run,
    sync_training_metrics,
    tag_value,
)
from tasks.tracking.store import artifact_root, check_reachable, client, tracking_uri, warm_store

__all__ = [
    "REPORT_ARTIFACT", "Promotion", "Registration", "Rollback", "aliases_line", "log_json",
    "FLOW_RUN_URL_TAG", "FLOW_RUNS_TAG", "PIP_REQUIREMENTS", "RUN_KEY_TAG", "BufferedMetricLogger", "RunHandle", "aliases", "artifact_root", "attach_model_card",
    "check_reachable", "client", "download_model", "end_run", "ensure_experiment", "experiment_name", "experiment_url", "git_commit",
    "is_logged", "link_model_metrics", "log_artifact", "log_checkpoints", "log_config", "log_dataset_inputs", "log_loss_curve",
    "log_metrics", "log_model", "log_predictions", "log_validation", "needs_local_ui", "promote", "register", "registered_folders", "rollback",
    "run_lock", "run_of", "run_url", "serving_prompt_template", "set_tags", "start_or_resume_run", "sync_training_metrics", "tag_value",
    "tracking_uri", "warm_store",
]
