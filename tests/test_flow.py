"""The fine-tune flow end to end: real Prefect (test harness), real MLflow server, real GX.

One module-scoped first run on a tiny model; the other tests re-run it and check caching,
partial re-runs, and the registry loop (promote, refusal, rollback).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sft_core.config import load_config
from sft_core.stages import STAGES
from tests.servers import mlflow_server
from tests.sizes import FLOW

pytestmark = pytest.mark.usefixtures("prefect_harness")

# the registry loop and caching on a model too small to learn; no base comparison (its gate would refuse an
# untrained candidate)
FAST = [*FLOW, "eval.compare_base=false", "registry.name=flow-test-model"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workdir")


def _cfg(workdir: Path, server, *extra: str):
    return load_config("demo", [*FAST, f"workdir={workdir}", f"tracking.uri={server.url}", *extra])


def _run(cfg, **kw):
    from flows.finetune import run_config

    started = time.perf_counter()
    summary = run_config(cfg, **kw)
    return summary, time.perf_counter() - started


@pytest.fixture(scope="module")
def first(workdir, server):
    cfg = _cfg(workdir, server)
    summary, seconds = _run(cfg)
    return cfg, summary, seconds


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.url)


def test_first_run_tracks_everything(first, server):
    cfg, summary, seconds = first
    print(f"first run: {seconds:.1f} s")
    assert all(r.status == "ran" for r in summary.stages if r.stage != "base-model")
    assert summary.train_steps == 24
    train_folder = next(r.folder for r in summary.stages if r.stage == "train")
    generation = json.loads((Path(train_folder) / "final" / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["max_new_tokens"] == 8, "the run's budget goes with the model (predict, serve-model, vLLM)"
    c = _client(server)
    run = c.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "sample--qwen2"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development", "the type the UI's selector writes"
    assert summary.run_url.endswith(f"/runs/{run.info.run_id}?workflowType=machine_learning"), \
        "the link opens the run in the model-training view"
    # the run's name says what differs from the preset; its description says how to run it again
    assert run.info.run_name.startswith("demo ") and "train.max_steps=24" in run.info.run_name
    assert "workdir=" not in run.info.run_name and "tracking.uri" not in run.info.run_name
    assert "qwen-sft run -c demo" in run.data.tags["mlflow.note.content"]
    assert "workdir" not in run.data.params and not any(k.startswith("tracking.") for k in run.data.params), \
        "machine-specific settings stay out of the param comparison (they are in config.yaml)"
    assert "max_new_tokens" not in run.data.params and "do_sample" not in run.data.params
    assert run.data.tags["data.rows_train"] == "234" and not any(k.startswith("data/") for k in run.data.metrics)
    # params (flattened config) + config.yaml
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert run.data.params["data.source"] == "bundled://sample"
    # tags
    tags = run.data.tags
    for key in ("git_commit", "dataset_digest", "config_hash", "prefect.flow_run_id", "device"):
        assert tags.get(key), key
    assert tags["config_hash"] == cfg.config_hash()
    # dataset lineage
    contexts = {i.dataset.digest: {t.key: t.value for t in i.tags}.get("mlflow.data.context") for i in run.inputs.dataset_inputs}
    assert sorted(contexts.values()) == ["train", "val"]
    # artifacts
    files = _artifact_paths(c, run.info.run_id)
    assert "config.yaml" in files
    assert "validation/validation_report.json" in files
    # the whole Data Docs site: the index and the validation-result and suite pages it links to
    assert "validation/data_docs/index.html" in files
    assert any(f.startswith("validation/data_docs/validations/") and f.endswith(".html") for f in files)
    assert any(f.startswith("validation/data_docs/expectations/") and f.endswith(".html") for f in files)
    assert "artifacts/validation/validation_report.html?workflowType=machine_learning)" in \
        run.data.tags["mlflow.note.content"], "the description links the report page MLflow shows whole"
    page = Path(c.download_artifacts(run.info.run_id, "validation/validation_report.html")).read_text(encoding="utf-8")
    assert "All checks passed" in page and "expect_column_values_to_be_unique" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page, \
        "the report page is self-contained"
    # a checkpoint is what a user can load: weights, tokenizer, configs; no optimizer state or pickles
    ckpt = [f for f in files if f.startswith("checkpoints/")]
    assert any(f.endswith("model.safetensors") for f in ckpt) and any(f.endswith("config.json") for f in ckpt)
    assert not any(f.endswith((".pt", ".pth", ".bin")) for f in ckpt), ckpt
    assert "plots/loss_curve.png" in files
    assert "predictions.json" in files
    # per-step curves
    loss = c.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in loss}) == list(range(1, 25))
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        assert len(c.get_metric_history(run.info.run_id, key)) >= 24, key
    curve = c.get_metric_history(run.info.run_id, "selection/loss")
    assert sorted(m.step for m in curve) == [0, 12, 24], "the learning curve on the selection set: the base, then "\
        "every evaluation"
    eval_loss = c.get_metric_history(run.info.run_id, "eval/loss")
    assert [m.step for m in eval_loss] == [24], "the shipped model's figure (report set), once, at the last step"
    # final metrics
    for key in ("eval/loss", "eval/perplexity", "eval/token_accuracy", "gen/format_ok_rate", "gen/rouge_l",
                "gen/stop_rate", "gen/mean_think_chars", "gen/mean_answer_chars"):
        assert key in run.data.metrics, key
    # the predictions table keeps think and answer apart
    table = json.loads(Path(c.download_artifacts(run.info.run_id, "predictions.json")).read_text())
    assert {"question", "think", "answer", "reference_answer", "format_ok", "rouge_l"} <= set(table["columns"])
    assert len(table["data"]) == 3
    # registry
    mv = c.get_model_version_by_alias("flow-test-model", "candidate")
    assert mv.run_id == run.info.run_id and int(mv.version) == summary.registered.version
    assert "eval_loss" in mv.tags and mv.tags["run_id"] == run.info.run_id
    # the logged model carries the fine-tune's figures and names its version
    logged = c.get_logged_model(mv.source.split("/")[-1])  # models:/m-<id>
    assert run.data.metrics["eval/loss"] in {m.value for m in logged.metrics if m.key == "eval/loss"}
    assert {"gen/format_ok_rate", "eval/perplexity"} <= {m.key for m in logged.metrics}
    assert {"name": "flow-test-model", "version": mv.version} in json.loads(logged.tags["mlflow.modelVersions"])


def _stage_files(workdir: Path) -> dict[str, tuple[int, int]]:
    """Every file the stages wrote, with its size and mtime (ns): a stage that redid work changes them."""
    stages = ("ingest", "validate", "split", "tokenize", "train", "evaluate", "generate")
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for stage in stages for p in sorted((workdir / stage).rglob("*")) if p.is_file()}


def test_flow_runs_have_names_a_person_tells_apart(first, server):
    """The Prefect flow run is named by the preset, the overrides that differ (machine settings left out) and
    its start time, not by the flow's name alone."""
    import re

    from prefect.client.orchestration import get_client

    _, summary, _ = first
    flow_run_id = _client(server).get_run(summary.run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        name = prefect.read_flow_run(flow_run_id).name
    assert name.startswith("demo ") and "train.max_steps=24" in name, name
    assert "workdir" not in name and "tracking.uri" not in name, name
    assert re.search(r" · \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", name), name


def test_second_run_is_all_cached(first, workdir, server):
    """Nothing is redone: every stage reports cached and no stage output is rewritten; the continuation leaves what
    the first run measured (status, start and end) as it was and is recorded in tags.

    How much faster the cached run is, is measured by bench/pipeline.py (BENCHMARKS.md), not asserted here:
    wall-clock ratios flake on a shared CI machine.
    """
    cfg, summary, first_seconds = first
    before = _stage_files(workdir)
    assert any(k.startswith("train/") and k.endswith(".safetensors") for k in before)
    measured = _client(server).get_run(summary.run_id).info
    again, seconds = _run(cfg)
    print(f"first run {first_seconds:.1f} s, cached re-run {seconds:.1f} s ({seconds / first_seconds:.1%})")
    assert _stage_files(workdir) == before, "a cached re-run rewrote stage outputs"
    statuses = {r.stage: r.status for r in again.stages}
    assert set(statuses.values()) == {"cached"}, statuses
    assert again.run_id == summary.run_id, "a re-run continues the same MLflow run"
    run = _client(server).get_run(summary.run_id)
    assert (run.info.status, run.info.start_time, run.info.end_time) == ("FINISHED", measured.start_time,
                                                                         measured.end_time), "the duration was rewritten"
    flow_runs = run.data.tags["prefect.flow_run_ids"].split(",")
    assert len(flow_runs) == 2 and flow_runs[0] == run.data.tags["prefect.flow_run_id"], "every flow run is kept"
    assert run.data.tags["qwen_sft.continuations"] == "1" and run.data.tags["qwen_sft.last_continuation"] == "finished"
    # one cache: what said "cached" is the stage's _DONE.json; Prefect shows it as the state `Cached` of the task
    # run (its UI badge), and keeps no result store of its own
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        def cached_task_runs(flow_run_id: str) -> int:
            runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return sum(r.state is not None and r.state.name == "Cached" for r in runs)

        stage_rows = [r for r in again.stages if r.stage in STAGES]  # registration is a row, not a stage task
        assert len(stage_rows) == 8 and cached_task_runs(flow_runs[1]) == len(stage_rows)
        assert cached_task_runs(flow_runs[0]) == sum(r.status == "cached" for r in summary.stages if r.stage in STAGES)
    assert again.registered.version == summary.registered.version, "no duplicate version"
    assert not again.retrained
    c = _client(server)
    assert len(c.search_model_versions("name = 'flow-test-model'")) == 1
    assert sorted({m.step for m in c.get_metric_history(summary.run_id, "train/loss")}) == list(range(1, 25))


def test_eval_change_reruns_only_evaluation_stages(first, workdir, server):
    cfg, summary, _ = first
    changed = _cfg(workdir, server, "eval.max_new_tokens=12", "eval.batch_size=2")
    result, _ = _run(changed)
    statuses = {r.stage: r.status for r in result.stages}
    for stage in ("ingest", "validate", "split", "base-model", "tokenize", "train"):
        assert statuses[stage] == "cached", (stage, statuses)
    for stage in ("evaluate", "generate", "register"):
        assert statuses[stage] == "ran", (stage, statuses)
    assert result.run_id != summary.run_id, "a new config is a new MLflow run"
    # the new run still has the full training curves (copied from the cached train stage)
    c = _client(server)
    assert len({m.step for m in c.get_metric_history(result.run_id, "train/loss")}) == 24
    assert result.registered.version == summary.registered.version + 1


def test_an_unchanged_rerun_moves_no_alias(first, workdir, server):
    """The alias rule: after a second experiment registered v2 (@candidate), a scheduled re-run of the first config
    on unchanged data finds its v1 and leaves @candidate on v2, and says so."""
    from tasks.tracking import aliases

    cfg, summary, _ = first
    assert aliases(cfg)["candidate"] == summary.registered.version + 1, "the eval-change run's version"
    again, _ = _run(cfg)
    assert again.registered.reused and again.registered.version == summary.registered.version
    assert aliases(cfg)["candidate"] == summary.registered.version + 1, "a cached re-run took @candidate back"

    assert "no alias moved" in again.registered.line()


def test_promote_refuse_and_rollback(first, server):
    from sft_core.errors import PromotionError
    from tasks.tracking import aliases, promote, rollback

    cfg, summary, _ = first
    name = cfg.registry.name
    c = _client(server)
    v1 = summary.registered.version
    first_promo = promote(cfg, version=v1)
    assert first_promo.production == v1 and first_promo.previous is None and not first_promo.forced
    # a new candidate with the same figures (the same run's model registered again) is a tie with production:
    # refused by default, accepted when the config says a tie within noise is enough
    src = c.get_model_version(name, str(v1))
    same = c.create_model_version(name, source=src.source, run_id=src.run_id, model_id=src.source.split("/")[-1])
    c.set_registered_model_alias(name, "candidate", same.version)
    v2 = int(same.version)
    with pytest.raises(PromotionError, match="not better than production beyond noise") as refused:
        promote(cfg)
    assert "(n=3)" in str(refused.value) and "(paired)" in str(refused.value)
    second = promote(cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"gate": cfg.registry.gate.model_copy(update={"allow_equal": True})})}))
    assert second.production == v2 and second.previous == v1
    assert [ch.verdict for ch in second.decision.checks] == ["not distinguishable", "not distinguishable"]
    tags = c.get_model_version(name, str(v2)).tags
    assert tags["promoted_by"] and tags["promoted_at"] and tags["promotion_reason"] == "gate passed"
    assert tags["gate"] == "passed"

    # a worse candidate: a version whose run has a much higher eval loss and no generation figures
    exp_id = c.get_run(c.get_model_version(name, str(v1)).run_id).info.experiment_id
    bad_run = c.create_run(exp_id, run_name="worse")
    c.log_metric(bad_run.info.run_id, "eval/loss", 99.0)
    c.set_terminated(bad_run.info.run_id)
    bad = c.create_model_version(name, source=src.source, run_id=bad_run.info.run_id, model_id=src.source.split("/")[-1])
    c.set_registered_model_alias(name, "candidate", bad.version)
    with pytest.raises(PromotionError, match="eval/loss"):
        promote(cfg)
    assert aliases(cfg)["production"] == v2, "a refused candidate moves nothing"
    with pytest.raises(PromotionError, match="needs --reason"):
        promote(cfg, force=True)
    forced = promote(cfg, force=True, reason="incident drill")
    assert forced.forced and forced.production == int(bad.version)
    bad_tags = c.get_model_version(name, bad.version).tags
    assert bad_tags["promotion_reason"] == "incident drill" and bad_tags["gate"] == "forced", "the forced mark"

    back = rollback(cfg)
    assert back.production == v2 and aliases(cfg)["production"] == v2 and aliases(cfg)["previous"] == int(bad.version)
    # a second rollback would put the gate-failed version back: refused without --force (issue 27, item 7)
    with pytest.raises(PromotionError, match="failed the gate"):
        rollback(cfg)
    assert aliases(cfg)["production"] == v2
    again = rollback(cfg, force=True, reason="it was fine after all")
    assert again.production == int(bad.version)


def _artifact_paths(c, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in c.list_artifacts(run_id, path):
        out.extend(_artifact_paths(c, run_id, f.path) if f.is_dir else [f.path])
    return out


def test_in_process_runs_skip_heartbeats_only_against_the_ephemeral_server():
    """No heartbeat thread to join when the API server lives in this process; a configured server keeps them."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.finetune import in_process_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert in_process_settings() == {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        with temporary_settings(updates=in_process_settings()):
            from prefect.settings import get_current_settings

            assert get_current_settings().flows.heartbeat_frequency is None
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert in_process_settings() == {}


def test_refresh_after_two_plain_runs_reruns_every_stage_and_keeps_the_registry_consistent(first, workdir, server):
    """`run --refresh` redoes every stage even once Prefect holds cache records for all of them (after two plain
    runs it did not: the records ignored refresh); the MLflow run continues and an identical result registers no
    second version."""
    cfg, summary, _ = first
    plain, _ = _run(cfg)  # two plain runs by now: every stage has a Prefect cache record
    assert {r.status for r in plain.stages} == {"cached"}
    done_before = {p: p.stat().st_mtime_ns for p in workdir.glob("*/*/_DONE.json")}
    c = _client(server)
    versions = len(c.search_model_versions("name = 'flow-test-model'"))
    refreshed, _ = _run(cfg, refresh=True)
    statuses = {r.stage: r.status for r in refreshed.stages}
    assert all(statuses[s] == "ran" for s in statuses if s != "register"), statuses
    rewritten = {p.parent for p, mtime in done_before.items() if p.exists() and p.stat().st_mtime_ns != mtime}
    used = {Path(r.folder) for r in refreshed.stages if r.folder}
    assert used == {Path(r.folder) for r in plain.stages if r.folder}, "the same folders, rewritten"
    assert used <= rewritten, "each stage folder of this config was rewritten"
    assert refreshed.run_id == summary.run_id and refreshed.retrained
    assert refreshed.registered.version == summary.registered.version, "same train key: same version"
    assert len(c.search_model_versions("name = 'flow-test-model'")) == versions
    assert sorted({m.step for m in c.get_metric_history(summary.run_id, "train/loss")}) == list(range(1, 25))
