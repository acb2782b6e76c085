"""What a person reads: the run summary in Prefect, the links between Prefect and MLflow, run names."""

from __future__ import annotations

import os
import re

import pytest

from flows.finetune import RunSummary, _markdown, describe
from sft_core.config import load_config, redact_uri
from tasks.stage import StageRow
from tasks.tracking import Registration


def _summary(url: str, local: bool, registered: Registration | None) -> RunSummary:
    return RunSummary(run_id="abc123", run_url=url, tracking_uri="sqlite:///x.db", needs_local_ui=local,
                      stages=[StageRow(stage="train", status="ran", seconds=3.0)], metrics={"eval/loss": 1.5},
                      registered=registered, promoted=None, retrained=True, dataset_digest="d", config_hash="c",
                      train_steps=3)


def test_the_prefect_summary_links_to_the_mlflow_run_with_a_working_url():
    cfg = load_config("demo")
    for url, local in (("http://127.0.0.1:5000/#/experiments/1/runs/abc123", True),
                       ("http://mlflow:5000/#/experiments/1/runs/abc123", False)):
        text = _markdown(cfg, _summary(url, local, None))
        (link,) = re.findall(r"\[abc123\]\(([^)]*)\)", text)
        assert link == url, "the link target is the URL alone, no hint inside it"
        assert ("qwen-sft ui" in text) is local


def test_registration_says_what_it_did_to_the_aliases():
    new = Registration(name="m", version=3, alias="candidate", reused=False, aliases={"candidate": 3})
    old = Registration(name="m", version=1, alias=None, reused=True, aliases={"candidate": 2, "production": 2})
    assert new.line() == "Registered `m` version 3 as `@candidate`."
    assert old.line() == ("Version 1 of `m` was already registered for this config and data; no alias moved "
                          "(@candidate v2, @production v2).")
    text = _markdown(load_config("demo"), _summary("http://h/#/runs/abc123", False, new))
    assert text.endswith("Registered `m` version 3 as `@candidate`."), "the run summary ends on what registering did"


def test_run_names_say_what_differs_and_leave_out_where_it_ran():
    assert describe("demo", ['train.learning_rate=0.001', 'workdir="/srv/x"', 'tracking.uri="http://h:5000"',
                             'data.source="/data/rows #2.jsonl"']) == \
        "demo train.learning_rate=0.001 data.source=/data/rows #2.jsonl"
    assert describe("/home/me/configs/my-preset.yaml", None) == "my-preset"
    many = describe("demo", [f"train.option_{i}=value-{i}" for i in range(40)])
    assert len(many) <= 200 and many.endswith("more)"), "a name fits MLflow's 250-character run names"


def test_secrets_never_reach_what_a_person_reads():
    assert redact_uri("error: MLflow tracking server http://bob:p@ss@mlflow:5000/x?token=abc is unreachable") == \
        "error: MLflow tracking server http://bob:***@mlflow:5000/x?token=*** is unreachable"
    assert redact_uri("see https://ghp_tok3n@mlflow.example/x") == "see https://***@mlflow.example/x", \
        "a user part alone is a token"


def test_mlflow_requests_carry_no_credentials_in_their_urls(tmp_path, monkeypatch):
    """MLflow prints the URL of a failed request ("API request to URL failed", in tracebacks and Prefect logs):
    credentials in `tracking.uri` travel in MLflow's username/password settings, never in that URL."""
    from tasks.tracking.store import client

    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "3"),
                        ("MLFLOW_TRACKING_USERNAME", "unset"), ("MLFLOW_TRACKING_PASSWORD", "unset")):
        monkeypatch.setenv(name, value)  # the last two are restored (removed) after the test
    cfg = load_config("demo", [f"workdir={tmp_path}", "tracking.uri=http://bob:s3cr%40t@127.0.0.1:9"])
    with pytest.raises(Exception) as failed:  # nothing listens on port 9
        client(cfg).search_experiments()
    assert "127.0.0.1:9" in str(failed.value) and "s3cr" not in str(failed.value), str(failed.value)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "s3cr@t")


def test_the_experiment_is_typed_for_model_training_and_its_links_open_on_the_runs(tmp_path):
    """MLflow 3.17's UI opens an experiment on its GenAI overview unless the link says
    `workflowType=machine_learning` (its type tag is read only with its workflow switch off): the type tag is the
    value its own selector writes, set on an experiment made before, and every printed link carries the view (#27)."""
    from pathlib import Path

    import mlflow
    from tasks import tracking

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    ui = "".join(p.read_text(encoding="utf-8", errors="replace") for p in bundle.glob("main.*.js"))
    assert 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"' in ui and '"mlflow.experimentKind"' in ui
    assert 'MACHINE_LEARNING="machine_learning"' in ui and 'get("workflowType")' in ui, "the UI still reads the view"

    cfg = load_config("demo", [f"workdir={tmp_path}"])
    c = tracking.client(cfg)
    made_before = c.create_experiment(tracking.experiment_name(cfg), tags={"mlflow.experimentKind": "finetuning"})
    assert tracking.ensure_experiment(cfg) == made_before
    assert c.get_experiment(made_before).tags["mlflow.experimentKind"] == "custom_model_development"
    fresh = tracking.ensure_experiment(load_config("demo", [f"workdir={tmp_path}", "tracking.experiment=fresh"]))
    assert c.get_experiment(fresh).tags["mlflow.experimentKind"] == "custom_model_development"

    run_id = c.create_run(made_before).info.run_id
    assert tracking.run_url(cfg, run_id) == (f"http://127.0.0.1:5000/#/experiments/{made_before}/runs/{run_id}"
                                             "?workflowType=machine_learning")
    assert tracking.experiment_url(cfg) == (f"http://127.0.0.1:5000/#/experiments/{made_before}"
                                            "?workflowType=machine_learning")


def test_redaction_is_linear_on_long_text():
    """The redaction that every error message passes through was quadratic (100k letters: 17 s; a 1 MB column
    name in a message: minutes at 100 % CPU). Run in a child with a deadline, so that a regression fails here
    instead of hanging the suite."""
    import subprocess
    import sys

    code = """
import time
from sft_core.config import redact_uri
for text in ("a" * 100_000, "a" * 1_000_000, "x" * 1_000_000 + "://y", " ://" * 250_000,
             "columns found: " + "c" * 1_000_000 + " at http://bob:s3cret@host:5000/x?token=abc"):
    started = time.perf_counter()
    out = redact_uri(text)
    print(len(text), round(time.perf_counter() - started, 3), "s3cret" in out)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    assert all(line.endswith("False") for line in done.stdout.splitlines()) and len(done.stdout.splitlines()) == 5


@pytest.mark.parametrize("url, shown", [
    ("http://bob:p#ss@mlflow:5000", "http://bob:***@mlflow:5000"),
    ("http://bob:p/ss@mlflow:5000/api", "http://bob:***@mlflow:5000/api"),
    ("http://bob:p?ss@mlflow:5000", "http://bob:***@mlflow:5000"),
    ("http://bob:p@ss@mlflow:5000/x?token=abc", "http://bob:***@mlflow:5000/x?token=***"),
    ("1http://bob:pw@mlflow", "1http://bob:***@mlflow"),
    ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ("http://mlflow:5000/api/2.0/runs/get?run_id=abc", "http://mlflow:5000/api/2.0/runs/get?run_id=abc"),
])
def test_a_password_with_unencoded_url_characters_is_still_hidden(url, shown):
    assert redact_uri(f"at {url} (x)") == f"at {shown} (x)"


@pytest.mark.parametrize("char", ["#", "/", "?", " "])
def test_a_tracking_uri_whose_password_needs_encoding_is_one_line_that_never_shows_it(char, tmp_path):
    """`#`, `/`, `?` end a URL's host part: the password's first part showed in a 140-line traceback; with a space
    the whole URI was printed. Now: one line, exit 2, what to do, and no character of the password."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["run", "-c", "demo", "--set", f"workdir={tmp_path}",
                                      "--set", f"tracking.uri=http://alice:Xy7{char}Qz9@127.0.0.1:9"])
    text = (result.stderr or "") + result.output
    assert result.exit_code == 2, text
    assert "Xy7" not in text and "Qz9" not in text and "Traceback" not in text
    lines = result.output.strip().splitlines()  # stdout and stderr together
    assert len(lines) == 1 and lines[0].startswith("error: tracking.uri http://alice:***@127.0.0.1:9: the password "
                                                   "holds a character"), lines
    assert "percent-encode" in lines[0]
