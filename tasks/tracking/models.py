"""The model and its registry: log the final model, register versions, move aliases, download.

Aliases: ``candidate`` (the newest registered version), ``production`` (promoted through
the gate), ``previous`` (the one production replaced; the target of a rollback).
"""

from __future__ import annotations

import contextlib
import getpass
import importlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sft_core.chat import render_prompt
from sft_core.config import ALIASES, CANDIDATE, PREVIOUS, PRODUCTION, PipelineConfig, redact_uri, stable_hash
from sft_core.errors import PromotionError, TrackingError
from sft_core.gate import Decision, decide
from sft_core.metrics import is_bound, shown
from sft_core.modeling import load_tokenizer
from sft_core.report import figures_of
from sft_core.stage_engine import OWNED
from tasks.tracking.store import client, tracking_uri

GATE_TAG = "gate"  # on a promoted version: "passed", or "forced" (it failed the gate; --force with a reason)
REPORT_ARTIFACT = "evaluation/report.json"  # the run's evaluation report (sft_core.report), what the gate pairs
REGISTERED_TAG = "qwen_sft.registered"  # set last: a version without it was cut short and is finished by a re-run
# The registry renders descriptions as Markdown and drops a bare `<think>` as an HTML tag: code spans keep it.
MODEL_DESCRIPTION = "Qwen2.5 medical `<think>` assistant (qwen-sft-pipeline)"
_OLD_DESCRIPTION = "Qwen2.5 medical <think> assistant (qwen-sft-pipeline)"  # before #27: shown without `<think>`

PIP_REQUIREMENTS = ["torch", "transformers>=5,<6", "accelerate", "safetensors", "tokenizers"]


def serving_prompt_template(cfg: PipelineConfig, model_dir: str) -> str:
    """The chat prompt around `{prompt}`, so a served model gets what it was trained on."""
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


def _logged_models(c, run_id: str) -> list:
    """The run's logged models named `model` (the fine-tune; a crash may have left a PENDING one)."""
    import mlflow

    return [m for m in mlflow.search_logged_models(experiment_ids=[c.get_run(run_id).info.experiment_id],
                                                    filter_string=f"source_run_id = '{run_id}'", output_format="list")
            if m.name == "model"]


def log_model(cfg: PipelineConfig, run_id: str, model_dir: str, *, max_new_tokens: int, card: str | None = None,
              step: int = 0) -> str:
    """Log the final model from its folder with the transformers flavor; returns the model URI.

    `card` (Markdown) is saved as the flavor's model card, so MLflow does not try to fetch one from the hub.
    `step` is the step the fine-tune's figures sit at: MLflow links the run's metrics at the model's step to the
    logged model (at step 0 they are the base model's).
    """
    from mlflow.models import infer_signature

    import mlflow

    c = client(cfg)
    logged = _logged_models(c, run_id)
    ready = [m for m in logged if str(m.status).endswith("READY")]
    if ready:
        return ready[0].model_uri
    for orphan in logged:  # a crash while logging left it PENDING; this run's lock says no one else is logging it
        c.delete_logged_model(orphan.model_id)
    # request-time generation settings a served model accepts in `"params"` (defaults: greedy, like evaluation)
    params = {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": cfg.eval.temperature,
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
            # no `model_config`: MLflow would log it as run params; the defaults are the model's generation_config
            # (greedy, its stop tokens and budget) and the signature's params
            metadata={"system_prompt": cfg.data.system_prompt},
            model_card=_hub_card(card),
            step=step,
        )
    return info.model_uri


def link_model_metrics(cfg: PipelineConfig, run_id: str, keys: list[str]) -> int:
    """The fine-tune's figures on its logged model: each key's newest point in the run, sent again with the
    model's id (the same step, time and value, so the run's history does not change); the number linked."""
    from mlflow.entities import Metric

    c = client(cfg)
    models = [m for m in _logged_models(c, run_id) if str(m.status).endswith("READY")]
    if not models:
        return 0
    points = []
    for key in keys:
        history = c.get_metric_history(run_id, key)
        if history:
            m = max(history, key=lambda p: (p.step, p.timestamp))
            points.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=models[0].model_id, run_id=run_id))
    if points:
        c.log_batch(run_id, metrics=points)
    return len(points)


def _link_version(c, model_uri: str, name: str, version: str) -> None:
    """The logged model names its registered version (the tag MLflow's UI reads; its server sets it, the
    embedded store does not)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    if not model_uri.startswith("models:/m-"):
        return
    model_id = model_uri.split("/")[-1]
    entry = {"name": name, "version": str(version)}
    linked = json.loads(c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if entry not in linked:
        c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def _hub_card(text: str | None):
    """The card as a hub `ModelCard` (its metadata block is what the hub format expects at the top)."""
    if text is None:
        return None
    from huggingface_hub import ModelCard

    meta = "---\nlanguage: zh\npipeline_tag: text-generation\nlibrary_name: transformers\ntags: [medical, sft]\n---\n"
    return ModelCard(meta + text)


def attach_model_card(cfg: PipelineConfig, model_uri: str, version: int, text: str) -> None:
    """The card as README.md in the logged model's artifacts and as the version's description."""
    c = client(cfg)
    if model_uri.startswith("models:/m-"):
        with tempfile.TemporaryDirectory() as tmp:
            readme = Path(tmp) / "README.md"
            readme.write_text(text, encoding="utf-8")
            c.log_model_artifact(model_uri.split("/")[-1], str(readme))
    c.update_model_version(cfg.registry.name, str(version), description=text)


@dataclass
class Registration:
    """What registering did: the version, the alias it moved (None: it found its version already registered and
    moved none), and where every alias points now."""

    name: str
    version: int
    alias: str | None
    reused: bool
    aliases: dict[str, int]
    model_uri: str = ""

    def line(self) -> str:
        """What registration did to the registry, in one sentence (the alias rule included)."""
        if self.reused:
            return (f"Version {self.version} of `{self.name}` was already registered for this config and data; no "
                    f"alias moved ({aliases_line(self.aliases)}).")
        return f"Registered `{self.name}` version {self.version} as `@{self.alias}`."


def aliases_line(aliases: dict[str, int]) -> str:
    """`@candidate v3, @production v2`."""
    return ", ".join(f"@{a} v{v}" for a, v in aliases.items()) or "no aliases"


def register(cfg: PipelineConfig, run_id: str, model_uri: str, metrics: dict[str, float],
             train_key: str) -> Registration:
    """Register a version and point `candidate` at it; idempotent per run + train key.

    The alias rule: `candidate` moves only to a version this call creates. A re-run that finds its
    version already registered (cached training, a scheduled run on unchanged data) moves no alias,
    so it never takes `candidate` back from a newer experiment.
    """
    c = client(cfg)
    name = cfg.registry.name
    try:
        if c.get_registered_model(name).description == _OLD_DESCRIPTION:
            c.update_registered_model(name, description=MODEL_DESCRIPTION)
    except Exception:
        try:
            c.create_registered_model(name, description=MODEL_DESCRIPTION)
        except Exception:
            c.get_registered_model(name)  # created concurrently
    found = c.search_model_versions(f"name = '{name}' and tag.train_key = '{train_key}' and run_id = '{run_id}'")
    if found and not _cut_short(c, name, found[0]):
        # an unchanged run: its version exists, and every alias stays where a person or the gate put it
        _link_version(c, model_uri, name, found[0].version)
        return Registration(name, int(found[0].version), None, True, aliases(cfg), model_uri)
    if found:  # a crash between creating the version and moving the alias: finish that registration
        version = found[0]
    else:
        tags = {"run_id": run_id, "train_key": train_key,  # as the table shows them: `0.86 [0.42, 0.97]`
                **{k.replace("/", "_"): shown(k, metrics) for k in metrics if not is_bound(k)}}
        model_id = model_uri.split("/")[-1] if model_uri.startswith("models:/m-") else None
        version = c.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
        _wait_ready(c, name, version.version)
    _link_version(c, model_uri, name, version.version)
    c.set_registered_model_alias(name, CANDIDATE, version.version)
    c.set_model_version_tag(name, version.version, REGISTERED_TAG, "true")
    return Registration(name, int(version.version), CANDIDATE, False, aliases(cfg), model_uri)


def _cut_short(c, name: str, mv) -> bool:
    """Whether registering `mv` stopped before its alias moved: no completion tag, and (for versions older
    than that tag) it is the newest version and no alias points at it."""
    if mv.tags.get(REGISTERED_TAG) == "true":
        return False
    newest = max(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
    return int(mv.version) == newest and not getattr(mv, "aliases", None)


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


def _version_report(c, run_id: str) -> dict | None:
    """The evaluation report a version's run logged (None for a run from before reports were logged)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, REPORT_ARTIFACT, tmp)
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception:
            return None


def _figures(c, mv, which: str = "fine_tuned"):
    return figures_of(_version_report(c, mv.run_id), dict(c.get_run(mv.run_id).data.metrics), which)


@dataclass
class Promotion:
    """What `promote` did: the gate's decision and checks, where the aliases point now, and whether it was forced."""

    name: str
    version: int
    production: int
    previous: int | None
    decision: Decision
    forced: bool


def promote(cfg: PipelineConfig, *, version: int | None = None, alias: str = CANDIDATE, force: bool = False,
            reason: str = "") -> Promotion:
    """Gate the candidate against its base and production (`sft_core.gate`); on pass move `production`, keep
    the old one as `previous`. `force` promotes a refused candidate, recorded on the version with the reason."""
    c = client(cfg)
    name = cfg.registry.name
    try:
        cand = c.get_model_version(name, str(version)) if version is not None else c.get_model_version_by_alias(name, alias)
    except Exception as exc:
        raise PromotionError(f"registered model '{name}' has no {'version ' + str(version) if version else 'alias @' + alias}") from exc
    prod = _by_alias(c, name, PRODUCTION)
    if prod is not None and prod.version == cand.version:
        raise PromotionError(f"version {cand.version} of '{name}' is already @{PRODUCTION}")
    decision = decide(_figures(c, cand), _figures(c, cand, "base"), _figures(c, prod) if prod is not None else None,
                      cfg.registry.gate)
    if not decision.passed and not force:
        error = PromotionError(f"version {cand.version} of '{name}' was refused by the gate: {decision.reason} "
                               "(`promote --force --reason ...` overrides, recorded on the version)")
        error.decision = decision
        raise error
    forced = not decision.passed
    if forced and not reason.strip():
        raise PromotionError("a forced promotion needs --reason: it is recorded on the version")
    _move_production(c, name, cand.version, prod)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {"promoted_at": stamp, "promoted_by": _user(), GATE_TAG: "forced" if forced else "passed",
            "promotion_reason": reason or "gate passed", "gate_decision": decision.reason[:5000]}
    for k, v in tags.items():
        c.set_model_version_tag(name, cand.version, k, v)
    return Promotion(name, int(cand.version), int(cand.version), int(prod.version) if prod else None, decision, forced)


def _move_production(c, name: str, version: str, prod) -> None:
    if prod is not None:
        c.set_registered_model_alias(name, PREVIOUS, prod.version)
    c.set_registered_model_alias(name, PRODUCTION, version)


@dataclass
class Rollback:
    name: str
    production: int
    previous: int | None


def rollback(cfg: PipelineConfig, *, force: bool = False, reason: str = "") -> Rollback:
    """`production` <- `previous` (and the demoted version becomes `previous`).

    A `previous` that reached production only by `promote --force` (it failed the gate) is not put back
    without `force`: rolling back must not quietly re-promote a model the gate refused.
    """
    c = client(cfg)
    name = cfg.registry.name
    try:
        prev = c.get_model_version_by_alias(name, PREVIOUS)
    except Exception as exc:
        raise PromotionError(f"registered model '{name}' has no @{PREVIOUS} version to roll back to") from exc
    if prev.tags.get(GATE_TAG) == "forced" and not force:
        raise PromotionError(f"@{PREVIOUS} is version {prev.version}, which failed the gate and was promoted only by "
                             f"--force ({prev.tags.get('promotion_reason', 'no reason recorded')}); `rollback --force "
                             "--reason ...` puts it back anyway")
    if force and prev.tags.get(GATE_TAG) == "forced" and not reason.strip():
        raise PromotionError("a forced rollback needs --reason: it is recorded on the version")
    prod = _by_alias(c, name, PRODUCTION)
    c.set_registered_model_alias(name, PRODUCTION, prev.version)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    c.set_model_version_tag(name, prev.version, "restored_at", stamp)
    if reason:
        c.set_model_version_tag(name, prev.version, "restore_reason", reason)
    if prod is not None:
        c.set_registered_model_alias(name, PREVIOUS, prod.version)
        c.set_model_version_tag(name, prod.version, "rolled_back_at", stamp)
    return Rollback(name, int(prev.version), int(prod.version) if prod else None)


def aliases(cfg: PipelineConfig) -> dict[str, int]:
    c = client(cfg)
    found = {a: _by_alias(c, cfg.registry.name, a) for a in ALIASES}
    return {a: int(mv.version) for a, mv in found.items() if mv is not None}


def _by_alias(c, name: str, alias: str):
    """The model version `name@alias`, or None when the model or the alias does not exist."""
    try:
        return c.get_model_version_by_alias(name, alias)
    except Exception:
        return None


def download_model(uri: str, cfg: PipelineConfig) -> Path:
    """A local folder with config + weights + tokenizer for an MLflow model URI.

    `models:/NAME@alias` is resolved to its version first, so a moved alias never serves an old copy.
    A download lands in a temporary folder and is renamed into place once whole, under a lock: a crash
    mid-download leaves nothing that a later call would trust, and a finished copy is reused.
    """
    from filelock import FileLock

    import mlflow

    c = client(cfg)
    pinned = _pinned(c, uri)
    dest = cfg.workdir_path / "downloads" / (pinned.replace("models:/", "").replace("/", "-v") if pinned.startswith(
        "models:/") else stable_hash(uri))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock"):
        if not (dest / ".complete").exists():
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)
            partial.mkdir()
            (partial / OWNED).touch()  # `qwen-sft gc` may delete it if the download never completes
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(partial))
            except Exception as exc:
                raise TrackingError(f"cannot download '{uri}' from {redact_uri(tracking_uri(cfg))}: {exc}") from exc
            _model_folder(partial, uri)  # a model is there before it is trusted
            (partial / ".complete").write_text(pinned, encoding="utf-8")
            partial.rename(dest)
    return _model_folder(dest, uri)


def _pinned(c, uri: str) -> str:
    """`models:/NAME@alias` as `models:/NAME/VERSION` (what the alias points to now); other URIs as they are."""
    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri.removeprefix("models:/").split("@", 1)
        try:
            return f"models:/{name}/{c.get_model_version_by_alias(name, alias).version}"
        except Exception as exc:
            raise TrackingError(f"'{uri}': registered model '{name}' has no @{alias} version") from exc
    return uri


def _model_folder(local: Path, uri: str) -> Path:
    """The transformers folder inside a downloaded MLflow model (the tokenizer copied beside the weights)."""
    for candidate in (local / "model", local / "components" / "model", local):
        if (candidate / "config.json").exists():
            tokenizer = local / "components" / "tokenizer"
            if not (candidate / "tokenizer_config.json").exists() and tokenizer.exists():
                for f in tokenizer.iterdir():
                    (candidate / f.name).write_bytes(f.read_bytes())
            return candidate
    raise TrackingError(f"'{uri}' does not hold a transformers model folder")


def run_of(cfg: PipelineConfig, uri: str) -> str | None:
    """The run a `models:/NAME@alias` or `models:/NAME/VERSION` URI was registered from, None if it names no version."""
    ref = uri.removeprefix("models:/")
    name, sep_alias, alias = ref.partition("@")
    c = client(cfg)
    try:
        if sep_alias:
            return c.get_model_version_by_alias(name, alias).run_id
        name, _, version = ref.partition("/")
        return c.get_model_version(name, version).run_id if version.isdigit() else None
    except Exception:
        return None


def registered_folders(cfg: PipelineConfig) -> set[Path]:
    """Train folders that some registered version came from (`qwen-sft gc` must keep them)."""
    c = client(cfg)
    try:
        run_ids = {mv.run_id for mv in c.search_model_versions(f"name = '{cfg.registry.name}'") if mv.run_id}
    except Exception:
        return set()
    keep: set[Path] = set()
    for run_id in run_ids:
        try:
            tag = c.get_run(run_id).data.tags.get("qwen_sft.logged.train", "")
        except Exception:
            continue
        if tag:
            keep.add(Path(tag.rsplit(":", 1)[0]).resolve())
    return keep


def _user() -> str:
    try:
        return os.environ.get("QWEN_SFT_USER") or getpass.getuser()
    except Exception:
        return "unknown"
