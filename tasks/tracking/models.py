"""The model and its registry: log the final model, register versions, move aliases, download.

Aliases: ``candidate`` (the newest registered version), ``production`` (promoted through
the gate), ``previous`` (the one production replaced; the target of a rollback).
"""

from __future__ import annotations

import contextlib
import getpass
import importlib
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from sft_core.config import PipelineConfig, redact_uri
from sft_core.errors import PromotionError, TrackingError
from sft_core.stages import OWNED
from tasks.tracking.store import client, tracking_uri

ALIASES = ("candidate", "production", "previous")
REGISTERED_TAG = "qwen_sft.registered"  # set last: a version without it was cut short and is finished by a re-run

PIP_REQUIREMENTS = ["torch", "transformers>=5,<6", "accelerate", "safetensors", "tokenizers"]


def serving_prompt_template(cfg: PipelineConfig, model_dir: str) -> str:
    """The chat prompt around `{prompt}`, so a served model gets what it was trained on."""
    from sft_core.modeling import load_tokenizer
    from sft_core.chat import render_prompt

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


def log_model(cfg: PipelineConfig, run_id: str, model_dir: str, *, max_new_tokens: int, card: str | None = None) -> str:
    """Log the final model from its folder with the transformers flavor; returns the model URI.

    `card` (Markdown) is saved as the flavor's model card, so MLflow does not try to fetch one from the hub.
    """
    import mlflow
    from mlflow.models import infer_signature

    c = client(cfg)
    logged = [m for m in mlflow.search_logged_models(experiment_ids=[c.get_run(run_id).info.experiment_id],
                                                       filter_string=f"source_run_id = '{run_id}'", output_format="list")
              if m.name == "model"]
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
        )
    return info.model_uri


def _hub_card(text: str | None):
    """The card as a hub `ModelCard` (its metadata block is what the hub format expects at the top)."""
    if text is None:
        return None
    from huggingface_hub import ModelCard

    meta = "---\nlanguage: zh\npipeline_tag: text-generation\nlibrary_name: transformers\ntags: [medical, sft]\n---\n"
    return ModelCard(meta + text)


def attach_model_card(cfg: PipelineConfig, model_uri: str, version: int, text: str) -> None:
    """The card as README.md in the logged model's artifacts and as the version's description."""
    import tempfile

    c = client(cfg)
    if model_uri.startswith("models:/m-"):
        with tempfile.TemporaryDirectory() as tmp:
            readme = Path(tmp) / "README.md"
            readme.write_text(text, encoding="utf-8")
            c.log_model_artifact(model_uri.split("/")[-1], str(readme))
    c.update_model_version(cfg.registry.name, str(version), description=text)


def register(cfg: PipelineConfig, run_id: str, model_uri: str, metrics: dict[str, float], train_key: str) -> dict:
    """Register a version and point `candidate` at it; idempotent per run + train key.

    The alias rule: `candidate` moves only to a version this call creates. A re-run that finds its
    version already registered (cached training, a scheduled run on unchanged data) moves no alias,
    so it never takes `candidate` back from a newer experiment.
    """
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
    if found and not _cut_short(c, name, found[0]):
        # an unchanged run: its version exists, and every alias stays where a person or the gate put it
        return {"name": name, "version": int(found[0].version), "alias": None, "reused": True,
                "aliases": aliases(cfg)}
    if found:  # a crash between creating the version and moving the alias: finish that registration
        version = found[0]
    else:
        tags = {"run_id": run_id, "train_key": train_key,
                **{k.replace("/", "_"): f"{v:.6g}" for k, v in metrics.items()}}
        model_id = model_uri.split("/")[-1] if model_uri.startswith("models:/m-") else None
        version = c.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
        _wait_ready(c, name, version.version)
    c.set_registered_model_alias(name, "candidate", version.version)
    c.set_model_version_tag(name, version.version, REGISTERED_TAG, "true")
    return {"name": name, "version": int(version.version), "alias": "candidate", "reused": False,
            "aliases": aliases(cfg)}


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


def promote(cfg: PipelineConfig, *, version: int | None = None, alias: str = "candidate", force: bool = False,
            reason: str = "") -> dict:
    """Gate the candidate against production; on pass move `production`, keep the old as `previous`."""
    c = client(cfg)
    name = cfg.registry.name
    try:
        cand = c.get_model_version(name, str(version)) if version is not None else c.get_model_version_by_alias(name, alias)
    except Exception as exc:
        raise PromotionError(f"registered model '{name}' has no {'version ' + str(version) if version else 'alias @' + alias}") from exc
    prod = _by_alias(c, name, "production")
    if prod is not None and prod.version == cand.version:
        raise PromotionError(f"version {cand.version} of '{name}' is already @production")
    from sft_core.gate import gate_checks

    pm = _version_metrics(c, name, prod.version) if prod is not None else None
    checks = gate_checks(_version_metrics(c, name, cand.version), pm, cfg.registry.gate)
    failed = [ch for ch in checks if not ch.passed]
    if failed and not force:
        detail = "; ".join(ch.describe() for ch in failed)
        raise PromotionError(f"version {cand.version} of '{name}' failed the gate: {detail} (use --force to override)")
    if prod is not None:
        c.set_registered_model_alias(name, "previous", prod.version)
    c.set_registered_model_alias(name, "production", cand.version)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for k, v in {"promoted_at": stamp, "promoted_by": _user(), "promotion_reason": reason or ("forced" if failed else "gate passed")}.items():
        c.set_model_version_tag(name, cand.version, k, v)
    return {"name": name, "production": int(cand.version), "previous": int(prod.version) if prod else None,
            "checks": [ch.to_dict() for ch in checks], "forced": bool(failed)}


def rollback(cfg: PipelineConfig) -> dict:
    """`production` <- `previous` (and the demoted version becomes `previous`)."""
    c = client(cfg)
    name = cfg.registry.name
    try:
        prev = c.get_model_version_by_alias(name, "previous")
    except Exception as exc:
        raise PromotionError(f"registered model '{name}' has no @previous version to roll back to") from exc
    prod = _by_alias(c, name, "production")
    c.set_registered_model_alias(name, "production", prev.version)
    if prod is not None:
        c.set_registered_model_alias(name, "previous", prod.version)
        c.set_model_version_tag(name, prod.version, "rolled_back_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return {"name": name, "production": int(prev.version), "previous": int(prod.version) if prod else None}


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
    import shutil

    import mlflow
    from filelock import FileLock

    from sft_core.config import stable_hash

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
