"""The pipeline's stages as plain functions: input paths in, one output folder, a small dict out.

Each stage writes into its own folder and finishes by writing ``_DONE.json`` (its result)
atomically; a folder with that marker is complete and is reused as is. Prefect tasks in
`tasks/` wrap these with cache keys and tracking; `qwen-sft prepare` calls them directly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from sft_core.config import PipelineConfig, stable_hash

DONE = "_DONE.json"

# Bump a stage's version when its code changes what it writes: old cache entries stop matching.
STAGE_VERSIONS = {
    "model": 1,
    "ingest": 1,
    "validate": 1,
    "split": 1,
    "tokenize": 1,
    "train": 1,
    "evaluate": 1,
    "generate": 1,
    "harness": 1,
}


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """hash(input digests + the config section the stage reads + the stage code version)."""
    return stable_hash({"stage": stage, "version": STAGE_VERSIONS[stage], "inputs": inputs}, length=16)


def stage_dir(cfg: PipelineConfig, stage: str, key: str) -> Path:
    return cfg.workdir_path / stage / key


def read_done(folder: Path) -> dict | None:
    marker = folder / DONE
    if marker.exists():
        return json.loads(marker.read_text(encoding="utf-8"))
    return None


def write_done(folder: Path, result: dict) -> dict:
    tmp = folder / (DONE + ".tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, folder / DONE)
    return result


def run_stage(folder: Path, body: Callable[[Path], dict], *, refresh: bool = False, keep_partial: bool = False) -> dict:
    """Run `body(folder)` unless the folder already holds a finished result.

    A file lock beside the folder makes concurrent runs of the same stage wait for each
    other: the second finds the first's result instead of redoing (or clobbering) it.
    A half-written folder from a crash is wiped first, unless `keep_partial` (train keeps
    its checkpoints to resume from them).
    """
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if refresh and folder.exists():
            shutil.rmtree(folder)
        done = read_done(folder)
        if done is not None:
            return {**done, "reused": True}
        if folder.exists() and not keep_partial:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = body(folder)
        result["seconds"] = round(time.perf_counter() - started, 3)
        result["folder"] = str(folder)
        write_done(folder, result)
        return {**result, "reused": False}


# --- data stages -------------------------------------------------------------------------

def ingest(cfg: PipelineConfig, folder: Path) -> dict:
    from sft_core.data import dataset_digest, load_rows, write_jsonl

    d = cfg.data
    loaded = load_rows(d.source, subset=d.subset, split=d.split, revision=d.revision, cache_dir=d.cache_dir)
    write_jsonl(loaded.rows, folder / "raw.jsonl")
    (folder / "row_numbers.json").write_text(json.dumps(loaded.row_numbers), encoding="utf-8")
    return {
        "raw": str(folder / "raw.jsonl"),
        "digest": dataset_digest(loaded.rows),
        "rows": len(loaded.rows),
        "source": d.source,
        "location": loaded.location,
        "extra_columns": loaded.extra_columns,
    }


def validate(cfg: PipelineConfig, raw: dict, folder: Path) -> dict:
    from sft_core.data import dataset_digest, read_jsonl, write_jsonl
    from sft_core.validation import validate_rows

    rows = read_jsonl(raw["raw"])
    row_numbers = json.loads((Path(raw["raw"]).parent / "row_numbers.json").read_text(encoding="utf-8"))
    result = validate_rows(
        rows,
        source_name=raw["location"],
        suite=cfg.data.suite,
        policy=cfg.data.validation_policy,
        out_dir=folder,
        min_rows=cfg.data.min_rows,
        max_field_chars=cfg.data.max_field_chars,
        row_numbers=row_numbers,
    )
    write_jsonl(result.good_rows, folder / "valid.jsonl")
    return {
        "valid": str(folder / "valid.jsonl"),
        "digest": dataset_digest(result.good_rows),
        "good_rows": len(result.good_rows),
        "bad_rows": len(result.bad_rows),
        "report": str(result.report_path) if result.report_path else None,
        "docs": str(result.docs_path) if result.docs_path else None,
        "quarantine": str(result.quarantine_path) if result.quarantine_path else None,
        "success": bool(result.success),
    }


def split(cfg: PipelineConfig, valid: dict, folder: Path) -> dict:
    from sft_core.data import dataset_digest, read_jsonl, write_jsonl
    from sft_core.split import split_rows

    rows = read_jsonl(valid["valid"])
    train, val = split_rows(rows, method=cfg.data.split_method, train_fraction=cfg.data.train_fraction, seed=cfg.data.split_seed)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(val, folder / "val.jsonl")
    return {
        "train": str(folder / "train.jsonl"),
        "val": str(folder / "val.jsonl"),
        "train_rows": len(train),
        "val_rows": len(val),
        "train_digest": dataset_digest(train),
        "val_digest": dataset_digest(val),
    }


def tokenize(cfg: PipelineConfig, splits: dict, model_dir: str, folder: Path) -> dict:
    from sft_core.data import read_jsonl
    from sft_core.modeling import load_tokenizer
    from sft_core.tokenize import tokenize_rows

    from sft_core.preflight import check_prompt_fits

    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    check_prompt_fits(cfg, tokenizer)  # a downloaded model's tokenizer is first seen here
    d = cfg.data
    stats = {}
    for name in ("train", "val"):
        ds, st = tokenize_rows(read_jsonl(splits[name]), tokenizer, system_prompt=d.system_prompt,
                               max_length=d.max_length, truncation=d.truncation, desc=f"tokenize {name}")
        ds.save_to_disk(str(folder / name))
        stats[name] = st.to_dict()
    (folder / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return {"train_ds": str(folder / "train"), "val_ds": str(folder / "val"), "stats": stats}


# --- model stages ------------------------------------------------------------------------

def generation_budget(cfg: PipelineConfig, tokens: dict):
    """`eval.max_new_tokens` resolved against the validation responses (a `GenerationBudget`)."""
    from sft_core.generate import resolve_max_new_tokens

    return resolve_max_new_tokens(cfg.eval.max_new_tokens, tokens["stats"]["val"].get("response_length_percentiles", {}),
                                  cfg.data.max_length)


def generation_check(cfg: PipelineConfig, splits: dict, max_new_tokens: int):
    """The validation questions that checkpoint selection generates on (None: selection by loss or none)."""
    from sft_core.data import read_jsonl
    from sft_core.train import GenerationCheck

    if cfg.train.metric_for_best_model != "gen_score" or cfg.eval.num_generate == 0:
        return None
    rows = read_jsonl(splits["val"])[: cfg.eval.num_generate]
    if not rows:
        return None
    return GenerationCheck(questions=[r["question"] for r in rows], references=[r["answer"] for r in rows],
                           system_prompt=cfg.data.system_prompt, max_new_tokens=max_new_tokens,
                           batch_size=cfg.eval.generate_batch_size, repetition_penalty=cfg.eval.repetition_penalty)


def train(cfg: PipelineConfig, tokens: dict, splits: dict, model_dir: str, folder: Path, max_new_tokens: int,
          sink=None) -> dict:
    from sft_core.train import run_training

    result = run_training(cfg, model_dir=model_dir, train_data=tokens["train_ds"], eval_data=tokens["val_ds"],
                          output_dir=folder, sink=sink, generation_check=generation_check(cfg, splits, max_new_tokens))
    return result.to_dict()


def evaluate(cfg: PipelineConfig, model_dir: str, tokens: dict, folder: Path) -> dict:
    """Loss, perplexity and token accuracy of the model in `model_dir` (fine-tuned or base) on the validation split."""
    import datasets

    from sft_core.evaluate import evaluate_model
    from sft_core.modeling import load_model, load_tokenizer, resolve_device

    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=cfg.model.dtype, device=device, attn_implementation=cfg.model.attn_implementation)
    metrics = evaluate_model(model, tokenizer, datasets.load_from_disk(tokens["val_ds"]), batch_size=cfg.eval.batch_size)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return {"metrics": metrics}


def generate(cfg: PipelineConfig, model_dir: str, splits: dict, folder: Path, max_new_tokens: int, *,
             base: bool = False) -> dict:
    """Greedy answers to the first `eval.num_generate` validation questions, parsed and scored."""
    from dataclasses import asdict

    from sft_core.data import read_jsonl
    from sft_core.generate import generate_answers, generation_metrics
    from sft_core.modeling import load_model, load_tokenizer, prepare_for_sft, resolve_device

    e = cfg.eval
    rows = read_jsonl(splits["val"])[: e.num_generate]
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=cfg.model.dtype, device=device, attn_implementation=cfg.model.attn_implementation)
    if base:  # the untouched base model: make it stop on <|im_end|> too, for a fair comparison
        prepare_for_sft(model, tokenizer)
    gens = generate_answers(
        model, tokenizer, [r["question"] for r in rows], system_prompt=cfg.data.system_prompt,
        max_new_tokens=max_new_tokens, batch_size=e.generate_batch_size, do_sample=e.do_sample,
        temperature=e.temperature, top_p=e.top_p, repetition_penalty=e.repetition_penalty, seed=cfg.train.seed,
        references=[r["answer"] for r in rows],
    )
    records = [asdict(g) for g in gens]
    path = folder / "predictions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return {"predictions": str(path), "metrics": generation_metrics(gens)}


def harness(cfg: PipelineConfig, model_dir: str, splits: dict, folder: Path, max_new_tokens: int) -> dict:
    """lm-evaluation-harness on the same validation questions as `generate` (`eval.harness`)."""
    from sft_core.data import read_jsonl
    from sft_core.harness import run_harness
    from sft_core.modeling import resolve_device, resolve_dtype

    device = resolve_device(cfg.train.device)
    dtype = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    rows = read_jsonl(splits["val"])[: cfg.eval.num_generate]
    return run_harness(model_dir, rows, folder, system_prompt=cfg.data.system_prompt, max_new_tokens=max_new_tokens,
                       batch_size=cfg.eval.generate_batch_size, repetition_penalty=cfg.eval.repetition_penalty,
                       device=device, dtype=dtype)


# --- cache keys: what each stage reads ---------------------------------------------------

def _source_fingerprint(cfg: PipelineConfig) -> str | None:
    """Content hash of a local source file; None for remote sources (always re-ingested)."""
    import hashlib

    from sft_core.data import BUNDLED_SAMPLE

    src = cfg.data.source
    path = BUNDLED_SAMPLE if src in ("sample", "bundled://sample") else Path(src.removeprefix("file://")).expanduser()
    if "://" in src and not src.startswith(("file://", "bundled://")):
        return None
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ingest_key(cfg: PipelineConfig) -> str | None:
    """None means 'do not cache': a remote dataset is fetched again and judged by its digest."""
    fp = _source_fingerprint(cfg)
    if fp is None:
        return None
    d = cfg.data
    return stage_key("ingest", {"file": fp, "subset": d.subset, "split": d.split})


def validate_key(cfg: PipelineConfig, raw: dict) -> str:
    d = cfg.data
    return stage_key("validate", {"digest": raw["digest"], "suite": d.suite, "policy": d.validation_policy,
                                  "min_rows": d.min_rows, "max_field_chars": d.max_field_chars})


def split_key(cfg: PipelineConfig, valid: dict) -> str:
    d = cfg.data
    return stage_key("split", {"digest": valid["digest"], "method": d.split_method, "fraction": d.train_fraction,
                               "seed": d.split_seed})


def model_key(cfg: PipelineConfig) -> str:
    m = cfg.model
    return stage_key("model", {"source": m.source, "revision": m.revision, "tiny": m.tiny.model_dump()})


def tokenize_key(cfg: PipelineConfig, splits: dict) -> str:
    d = cfg.data
    return stage_key("tokenize", {"train": splits["train_digest"], "val": splits["val_digest"], "model": model_key(cfg),
                                  "system_prompt": d.system_prompt, "max_length": d.max_length, "truncation": d.truncation})


def train_key(cfg: PipelineConfig, tok_key: str, max_new_tokens: int) -> str:
    tc = cfg.train.model_dump(exclude={"device", "dataloader_num_workers", "num_processes", "accelerate_config"})
    m = cfg.model.model_dump(include={"dtype", "attn_implementation"})
    # the repetition penalty is saved in the model's generation_config
    inputs = {"tokens": tok_key, "model": model_key(cfg), "train": tc, "load": m,
              "repetition_penalty": cfg.eval.repetition_penalty}
    if cfg.train.metric_for_best_model == "gen_score":  # what selects the checkpoint
        inputs["check"] = {"max_new_tokens": max_new_tokens, "system_prompt": cfg.data.system_prompt,
                           **cfg.eval.model_dump(include={"num_generate", "generate_batch_size"})}
    return stage_key("train", inputs)


def evaluate_key(cfg: PipelineConfig, trn_key: str | None, tok_key: str) -> str:
    """`trn_key` None: the base model."""
    model = trn_key or "base:" + model_key(cfg)
    return stage_key("evaluate", {"train": model, "tokens": tok_key, "batch_size": cfg.eval.batch_size})


def generate_key(cfg: PipelineConfig, trn_key: str | None, splits: dict, max_new_tokens: int) -> str:
    """`trn_key` None: the base model."""
    e = cfg.eval.model_dump(exclude={"batch_size", "compare_base", "harness", "max_new_tokens"})
    return stage_key("generate", {"train": trn_key or "base:" + model_key(cfg), "val": splits["val_digest"],
                                  "eval": e, "max_new_tokens": max_new_tokens, "system_prompt": cfg.data.system_prompt})


def harness_key(cfg: PipelineConfig, trn_key: str, splits: dict, max_new_tokens: int) -> str:
    e = cfg.eval.model_dump(include={"num_generate", "generate_batch_size", "repetition_penalty"})
    return stage_key("harness", {"train": trn_key, "val": splits["val_digest"], "eval": e, "max_new_tokens": max_new_tokens,
                                 "system_prompt": cfg.data.system_prompt})


def prepare_data(cfg: PipelineConfig, *, refresh: bool = False, log: Callable[[str], None] = print) -> dict:
    """ingest -> validate -> split -> model -> tokenize, without orchestration (the `prepare` command)."""
    from sft_core.modeling import resolve_model_dir

    out: dict[str, Any] = {}
    key = ingest_key(cfg)
    folder = stage_dir(cfg, "ingest", key) if key else cfg.workdir_path / "ingest" / "latest"
    out["ingest"] = run_stage(folder, lambda f: ingest(cfg, f), refresh=refresh or key is None)
    log(f"ingest: {out['ingest']['rows']} rows from {out['ingest']['location']}")
    out["validate"] = run_stage(stage_dir(cfg, "validate", validate_key(cfg, out["ingest"])),
                                lambda f: validate(cfg, out["ingest"], f), refresh=refresh)
    log(f"validate: {out['validate']['good_rows']} good, {out['validate']['bad_rows']} quarantined")
    out["split"] = run_stage(stage_dir(cfg, "split", split_key(cfg, out["validate"])),
                             lambda f: split(cfg, out["validate"], f), refresh=refresh)
    log(f"split: {out['split']['train_rows']} train / {out['split']['val_rows']} val")
    model_dir = str(resolve_model_dir(cfg.model, cfg.workdir_path))
    out["model"] = {"model_dir": model_dir}
    out["tokenize"] = run_stage(stage_dir(cfg, "tokenize", tokenize_key(cfg, out["split"])),
                                lambda f: tokenize(cfg, out["split"], model_dir, f), refresh=refresh)
    return out
