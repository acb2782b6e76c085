"""The embedded MLflow store is created by a child process while the data stages run."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sft_core.config import load_config
from tasks import tracking
from tasks.tracking import runs, store


def _cfg(tmp_path: Path, *extra: str):
    return load_config("demo", [f"workdir={tmp_path}", *extra])


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}


def test_a_new_embedded_store_is_built_by_a_child_then_used(tmp_path: Path):
    cfg = _cfg(tmp_path)
    uri = tracking.tracking_uri(cfg)
    db = tmp_path / "mlflow.db"
    assert tracking.warm_store(cfg) is True
    proc, _ = store._store_builders[uri]
    assert proc.pid != os.getpid()
    assert tracking.warm_store(cfg) is False, "one builder per store"
    assert proc.wait(timeout=120) == 0
    assert {"experiments", "runs", "registered_models", "alembic_version"} <= _tables(db)
    exp_id = tracking.ensure_experiment(cfg)  # waits for (here: collects) the child, then uses the store
    assert uri not in store._store_builders and uri in store._stores_ready
    assert tracking.client(cfg).get_experiment(exp_id).name == tracking.experiment_name(cfg)


def test_an_existing_store_or_a_server_needs_no_builder(tmp_path: Path):
    cfg = _cfg(tmp_path)
    tracking.ensure_experiment(cfg)  # creates the store in this process
    assert tracking.warm_store(cfg) is False
    assert tracking.warm_store(_cfg(tmp_path / "other", "tracking.uri=http://127.0.0.1:9")) is False


def test_a_failed_builder_is_not_fatal(tmp_path: Path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(store, "_BUILD_STORE", "import sys; sys.exit('no store for you')")
    assert tracking.warm_store(cfg) is True
    assert tracking.ensure_experiment(cfg)  # this process builds the store itself
    assert "experiments" in _tables(tmp_path / "mlflow.db")


def test_is_logged_trusts_a_resumed_runs_tags_and_otherwise_asks_the_store(tmp_path: Path):
    cfg = _cfg(tmp_path)
    first = tracking.start_or_resume_run(cfg, "key-1", "run", {})
    run_id = first.run_id
    assert not first.resumed
    assert not tracking.is_logged(cfg, run_id, "qwen_sft.logged.data", "m1")
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.data": "m1"})
    assert tracking.is_logged(cfg, run_id, "qwen_sft.logged.data", "m1"), "asks the store: not resumed here"
    again = tracking.start_or_resume_run(cfg, "key-1", "run", {})
    assert (again.run_id, again.resumed) == (run_id, True)
    assert runs._resumed_tags[run_id]["qwen_sft.logged.data"] == "m1"
    tracking.set_tags(cfg, run_id, {"qwen_sft.logged.data": "m2"})  # logged after the resume: the store knows
    assert tracking.is_logged(cfg, run_id, "qwen_sft.logged.data", "m2")
    assert not tracking.is_logged(cfg, run_id, "qwen_sft.logged.data", "m3")


def test_every_flow_run_that_touches_a_run_is_linked_from_it(tmp_path: Path):
    """The creator's Prefect page stays in `prefect.flow_run_url`; a continuation adds its id to
    `prefect.flow_run_ids` and its page as `prefect.last_flow_run_url`."""
    cfg = _cfg(tmp_path)
    ui = "http://127.0.0.1:4200/runs/flow-run/"
    first = tracking.start_or_resume_run(cfg, "key-2", "run", {tracking.FLOW_RUN_URL_TAG: ui + "f1"}, "f1")
    tracking.start_or_resume_run(cfg, "key-2", "run", {tracking.FLOW_RUN_URL_TAG: ui + "f2"}, "f2")
    tags = tracking.client(cfg).get_run(first.run_id).data.tags
    assert tags[tracking.FLOW_RUNS_TAG] == "f1,f2"
    assert (tags["prefect.flow_run_url"], tags["prefect.last_flow_run_url"]) == (ui + "f1", ui + "f2")
