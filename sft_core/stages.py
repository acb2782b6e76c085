"""The pipeline's stages, each declared once: its name, folder, key, body, result type and what its body takes.

``STAGES`` holds every declaration and `prepare` spells the data stages' order once, for the flow and the
CLI alike. The engine that runs a declaration into its keyed folder is `sft_core.stage_engine`; the
results the stages hand on are `sft_core.results`. ``Stage.run`` runs one without orchestration (the
CLI's commands, tests); ``tasks.stage`` runs the same declaration as a Prefect task.

Heavy libraries (torch, datasets, Great Expectations, lm-eval) load inside the bodies that use them,
through the library modules: importing this module is cheap, so a command that only checks or lists
answers at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sft_core.chat import control_tokens
from sft_core.config import PipelineConfig, stable_hash
from sft_core.data import BUNDLED_SAMPLE, dataset_digest, load_rows, read_jsonl, write_jsonl
from sft_core.disk import check_space, training_space
from sft_core.evaluate import evaluate_model
from sft_core.files import content_sha256
from sft_core.generate import (GenerationBudget, generate_answers, generation_metrics, resolve_max_new_tokens,
                               store_budget)
from sft_core.gguf import file_sha256
from sft_core.harness import run_harness
from sft_core.launch import launch_training
from sft_core.modeling import (fetch_base_model, load_model, load_tokenizer, prepare_for_sft, resolve_device,
                               resolve_dtype)
from sft_core.results import (BaseModel, Evaluated, Generated, Harnessed, Ingested, Result, Split, Tokenized, Trained,
                              Validated)
from sft_core.sources import parse_data_source, parse_model_source
from sft_core.split import assign_validation, check_split, question_id, split_rows
from sft_core.stage_engine import Stage
from sft_core.tiny_model import tokenizer_origin
from sft_core.tokenize import check_prompt_fits, tokenize_rows
from sft_core.train import generation_check, run_training
from sft_core.validation import validate_rows
from sft_core.vllm_engine import generate_answers_vllm


# --- keys and bodies ----------------------------------------------------------------------------------------

def _source_fingerprint(cfg: PipelineConfig) -> str | None:
    """Content hash of a local data file (or the bundled sample); None for a hub dataset."""
    src = parse_data_source(cfg.data.source, revision=cfg.data.revision)
    path = BUNDLED_SAMPLE if src.kind == "bundled" else src.path
    if path is None or not path.is_file():
        return None
    return content_sha256(path)  # already known when the preflight read the file


def ingest_key(cfg: PipelineConfig) -> dict | None:
    """A local file is keyed by its content; a hub dataset is fetched again and judged by its digest (None)."""
    fingerprint = _source_fingerprint(cfg)
    if fingerprint is None:
        return None
    return {"file": fingerprint, **cfg.data.model_dump(include={"subset", "split"})}


def ingest_body(cfg: PipelineConfig, folder: Path) -> dict:
    d = cfg.data
    loaded = load_rows(d.source, subset=d.subset, split=d.split, revision=d.revision, cache_dir=d.cache_dir)
    write_jsonl(loaded.rows, folder / "raw.jsonl")
    (folder / "row_numbers.json").write_text(json.dumps(loaded.row_numbers), encoding="utf-8")
    return {"raw": str(folder / "raw.jsonl"), "row_numbers": str(folder / "row_numbers.json"),
            "digest": dataset_digest(loaded.rows), "rows": len(loaded.rows), "source": d.source,
            "location": loaded.location, "extra_columns": loaded.extra_columns}


def validate_key(cfg: PipelineConfig, raw: Ingested, model: BaseModel | None) -> dict:
    return {"digest": raw.digest, "model": model.key if model else None,  # its tokenizer's control tokens
            **cfg.data.model_dump(include={"suite", "validation_policy", "min_rows", "max_field_chars"})}


def validate_body(cfg: PipelineConfig, folder: Path, raw: Ingested, model: BaseModel | None) -> dict:
    """The suite on the ingested rows; the model's tokenizer says which strings are control tokens
    (without a model at hand, the suite's own list: the Qwen chat tokens)."""
    d = cfg.data
    tokens = control_tokens(load_tokenizer(model.model_dir)) if model is not None else None
    result = validate_rows(
        read_jsonl(raw.raw), source_name=raw.location, suite=d.suite, policy=d.validation_policy, out_dir=folder,
        min_rows=d.min_rows, max_field_chars=d.max_field_chars,
        row_numbers=json.loads(Path(raw.row_numbers).read_text(encoding="utf-8")), control_tokens=tokens,
    )
    write_jsonl(result.good_rows, folder / "valid.jsonl")
    return {"valid": str(folder / "valid.jsonl"), "digest": dataset_digest(result.good_rows),
            "good_rows": len(result.good_rows), "bad_rows": len(result.bad_rows),
            "report": str(result.report_path) if result.report_path else None,
            "docs": str(result.docs_path) if result.docs_path else None,
            "quarantine": str(result.quarantine_path) if result.quarantine_path else None,
            "warnings": result.warnings}


def split_key(cfg: PipelineConfig, valid: Validated) -> dict:
    return {"digest": valid.digest,
            **cfg.data.model_dump(include={"split_method", "train_fraction", "split_seed", "selection_fraction"})}


def split_body(cfg: PipelineConfig, folder: Path, valid: Validated) -> dict:
    d = cfg.data
    train, val = split_rows(read_jsonl(valid.valid), method=d.split_method, train_fraction=d.train_fraction,
                            seed=d.split_seed)
    check_split(train, val, method=d.split_method, train_fraction=d.train_fraction)
    select, report = assign_validation(val, d.selection_fraction)
    paths = {name: write_jsonl(rows, folder / f"{name}.jsonl")
             for name, rows in (("train", train), ("val", val), ("select", select), ("report", report))}
    sets = {"rule": "validation questions ordered by sha256(question); the first floor(n * selection_fraction) "
                    "choose the checkpoint (selection), the rest report the model's figures (report)",
            "selection_fraction": d.selection_fraction,
            "counts": {"validation": len(val), "selection": len(select), "report": len(report)},
            "selection": [question_id(r["question"]) for r in select],
            "report": [question_id(r["question"]) for r in report]}
    (folder / "validation_sets.json").write_text(json.dumps(sets, indent=2), encoding="utf-8")
    return {"train": str(paths["train"]), "val": str(paths["val"]), "train_rows": len(train), "val_rows": len(val),
            "train_digest": dataset_digest(train), "val_digest": dataset_digest(val), "select": str(paths["select"]),
            "report": str(paths["report"]), "select_rows": len(select), "report_rows": len(report),
            "sets": str(folder / "validation_sets.json"),
            "sets_digest": stable_hash({k: sets[k] for k in ("selection", "report")}, length=16)}


def base_model_key(cfg: PipelineConfig) -> dict:
    """A hub model by source and revision (fetched once per workdir: pin a commit, or --refresh, to update);
    a local folder by its files' names, sizes and times; a GGUF file by its content (wherever it lies, however
    often it is copied, it converts once; a changed file converts again); a tiny model by its shape."""
    m = cfg.model
    src = parse_model_source(m.source, revision=m.revision)
    spec: dict[str, Any] = {"source": src.uri()}
    if src.kind == "tiny":  # its shape, and what its tokenizer is built from
        spec["tiny"] = m.tiny.model_dump()
        spec["tokenizer"] = tokenizer_origin(m.tiny)
    elif src.kind == "gguf":
        spec = {"gguf_sha256": file_sha256(src.path)}
    elif src.kind == "local" and src.path.is_dir():
        spec["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.path.iterdir()
                               if p.is_file())
    return spec


def base_model_body(cfg: PipelineConfig, folder: Path) -> dict:
    return {"model_dir": str(fetch_base_model(cfg.model, folder, cfg.workdir_path))}


def tokenize_key(cfg: PipelineConfig, splits: Split, model: BaseModel) -> dict:
    return {"train": splits.train_digest, "val": splits.val_digest, "sets": splits.sets_digest, "model": model.key,
            **cfg.data.model_dump(include={"system_prompt", "max_length", "truncation"})}


def tokenize_body(cfg: PipelineConfig, folder: Path, splits: Split, model: BaseModel) -> dict:
    tokenizer = load_tokenizer(model.model_dir, trust_remote_code=cfg.model.trust_remote_code)
    check_prompt_fits(cfg, tokenizer)  # a downloaded model's tokenizer is first seen here
    d = cfg.data
    stats, ids = {}, {}
    for name, path in (("train", splits.train), ("val", splits.val), ("select", splits.select),
                       ("report", splits.report)):
        rows = read_jsonl(path)
        ds, st = tokenize_rows(rows, tokenizer, system_prompt=d.system_prompt, max_length=d.max_length,
                               truncation=d.truncation, desc=f"tokenize {name}")
        if name != "val":  # the whole split only for its statistics (the generation budget)
            ds.save_to_disk(str(folder / name))
        dropped = set(st.dropped_rows)
        ids[name] = [question_id(r["question"]) for i, r in enumerate(rows) if i not in dropped]
        stats[name] = st.to_dict()
    (folder / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    (folder / "ids.json").write_text(json.dumps({k: ids[k] for k in ("select", "report")}), encoding="utf-8")
    return {"train_ds": str(folder / "train"), "select_ds": str(folder / "select"), "report_ds": str(folder / "report"),
            "stats": stats, "ids": str(folder / "ids.json")}


def train_key(cfg: PipelineConfig, tokens: Tokenized, splits: Split, model: BaseModel, max_new_tokens: int) -> dict:
    tc = cfg.train.model_dump(exclude={"device", "dataloader_num_workers", "num_processes", "accelerate_config"})
    spec = {"tokens": tokens.key, "model": model.key, "train": tc,
            "load": cfg.model.model_dump(include={"dtype", "attn_implementation"}),
            "repetition_penalty": cfg.eval.repetition_penalty}  # saved in the model's generation_config
    if cfg.train.metric_for_best_model == "gen_score":  # what selects the checkpoint
        spec["check"] = {"val": splits.val_digest, "sets": splits.sets_digest, "max_new_tokens": max_new_tokens,
                         "system_prompt": cfg.data.system_prompt,
                         **cfg.eval.model_dump(include={"num_generate", "generate_batch_size", "engine"})}
    return spec


def train_body(cfg: PipelineConfig, folder: Path, tokens: Tokenized, splits: Split, model: BaseModel,
               max_new_tokens: int, sink=None, log=None) -> dict:
    """`sink(step, metrics)` receives every logged step (MLflow); `log(line)` one line of progress per step.

    Selection sees the selection set only: eval loss during training and the generation check at every save."""
    if not any(Path(folder).glob("checkpoint-*")):  # a fresh start (a resumed one has most of its files already)
        check_space(folder, training_space(cfg, model.model_dir), "training")
    if cfg.train.num_processes > 1:  # the ranks build the same generation check from the selection rows
        fields = launch_training(cfg, model_dir=model.model_dir, tokens=tokens, select_rows=splits.select,
                                 max_new_tokens=max_new_tokens, output_dir=folder, sink=sink, log=log)
    else:
        check = generation_check(cfg, splits.select, max_new_tokens)
        fields = run_training(cfg, model_dir=model.model_dir, train_data=tokens.train_ds, eval_data=tokens.select_ds,
                              output_dir=folder, sink=sink, progress=log, generation_check=check).own_fields()
    store_budget(fields["final_model_dir"], max_new_tokens)  # what `auto` means where the model goes next
    return fields


def evaluate_key(cfg: PipelineConfig, model: BaseModel | Trained, tokens: Tokenized) -> dict:
    return {"model": model.key, "tokens": tokens.key, "batch_size": cfg.eval.batch_size}


def evaluate_body(cfg: PipelineConfig, folder: Path, model: BaseModel | Trained, tokens: Tokenized) -> dict:
    """Loss, perplexity and token accuracy of a model (fine-tuned or base) on the report set, and each report
    question's loss (what the gate's interval of a loss difference is built from)."""
    import datasets

    device = resolve_device(cfg.train.device)
    lm = load_model(model.model_dir, dtype=cfg.model.dtype, device=device,
                    attn_implementation=cfg.model.attn_implementation)
    found = evaluate_model(lm, load_tokenizer(model.model_dir), datasets.load_from_disk(tokens.report_ds),
                           batch_size=cfg.eval.batch_size)
    ids = json.loads(Path(tokens.ids).read_text(encoding="utf-8"))["report"]
    (folder / "metrics.json").write_text(json.dumps(found.metrics, indent=2), encoding="utf-8")
    (folder / "losses.json").write_text(json.dumps({"ids": ids, "loss_sums": found.loss_sums,
                                                    "tokens": found.tokens}), encoding="utf-8")
    return {"metrics": found.metrics, "losses": str(folder / "losses.json")}


def report_rows(cfg: PipelineConfig, splits: Split) -> list[dict]:
    """The report questions generation answers: all of them, or the first `eval.num_generate`."""
    return read_jsonl(splits.report)[: cfg.eval.num_generate]


def generate_key(cfg: PipelineConfig, model: BaseModel | Trained, splits: Split, max_new_tokens: int) -> dict:
    e = cfg.eval.model_dump(exclude={"batch_size", "compare_base", "harness", "max_new_tokens", "vllm"})
    return {"model": model.key, "val": splits.val_digest, "sets": splits.sets_digest, "eval": e,
            "max_new_tokens": max_new_tokens, "system_prompt": cfg.data.system_prompt}


def generate_body(cfg: PipelineConfig, folder: Path, model: BaseModel | Trained, splits: Split,
                  max_new_tokens: int, log: Callable[[str], None] | None = None) -> dict:
    """Greedy answers to the report questions, parsed and scored; `log` gets one progress line per batch."""
    e = cfg.eval
    rows = report_rows(cfg, splits)
    questions, references = [r["question"] for r in rows], [r["answer"] for r in rows]
    progress = (lambda done, total: log(f"answered {done}/{total} report questions")) if log else None
    sampling = {"max_new_tokens": max_new_tokens, "do_sample": e.do_sample, "temperature": e.temperature,
                "top_p": e.top_p, "repetition_penalty": e.repetition_penalty, "seed": cfg.train.seed}
    if e.engine == "vllm":  # the same prompts, stops (<|im_end|> for the base too) and parse, through a vLLM server
        gens = generate_answers_vllm(model.model_dir, questions, system_prompt=cfg.data.system_prompt,
                                     references=references, progress=progress, vllm=e.vllm,
                                     dtype=_dtype_name(cfg), **sampling)
    else:
        tokenizer = load_tokenizer(model.model_dir)
        lm = load_model(model.model_dir, dtype=cfg.model.dtype, device=resolve_device(cfg.train.device),
                        attn_implementation=cfg.model.attn_implementation)
        if isinstance(model, BaseModel):  # the untouched base: make it stop on <|im_end|> too, for a fair comparison
            prepare_for_sft(lm, tokenizer)
        gens = generate_answers(lm, tokenizer, questions, system_prompt=cfg.data.system_prompt,
                                batch_size=e.generate_batch_size, references=references, progress=progress,
                                **sampling)
    path = write_jsonl([{"id": question_id(g.question), **g.to_dict()} for g in gens], folder / "predictions.jsonl")
    return {"predictions": str(path), "metrics": generation_metrics(gens)}


def _dtype_name(cfg: PipelineConfig) -> str:
    """The dtype the model runs in on this device (`float32`, `bfloat16`), for engines that take it by name."""
    return str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.train.device))).removeprefix("torch.")


def harness_key(cfg: PipelineConfig, model: Trained, splits: Split, max_new_tokens: int) -> dict:
    e = cfg.eval.model_dump(include={"num_generate", "generate_batch_size", "repetition_penalty"})
    return {"model": model.key, "val": splits.val_digest, "sets": splits.sets_digest, "eval": e,
            "max_new_tokens": max_new_tokens, "system_prompt": cfg.data.system_prompt}


def harness_body(cfg: PipelineConfig, folder: Path, model: Trained, splits: Split, max_new_tokens: int) -> dict:
    """lm-evaluation-harness on the same report questions as `generate` (`eval.harness`)."""
    return run_harness(model.model_dir, report_rows(cfg, splits), folder,
                       system_prompt=cfg.data.system_prompt, max_new_tokens=max_new_tokens,
                       batch_size=cfg.eval.generate_batch_size, repetition_penalty=cfg.eval.repetition_penalty,
                       device=resolve_device(cfg.train.device), dtype=_dtype_name(cfg))


# --- the declarations ---------------------------------------------------------------------------------------

_EVALUATE = ("sft_core.evaluate", "sft_core.loss", "sft_core.modeling")
_GENERATE = ("sft_core.generate", "sft_core.chat", "sft_core.modeling")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", "ingest", Ingested, ingest_key, ingest_body, ("sft_core.data", "sft_core.sources"), retries=2),
    Stage("base-model", "model", BaseModel, base_model_key, base_model_body,
          ("sft_core.modeling", "sft_core.tiny_model", "sft_core.gguf"), retries=2),
    Stage("validate", "validate", Validated, validate_key, validate_body,
          ("sft_core.validation", "sft_core.data_docs", "sft_core.chat")),
    Stage("split", "split", Split, split_key, split_body, ("sft_core.split",)),
    Stage("tokenize", "tokenize", Tokenized, tokenize_key, tokenize_body, ("sft_core.tokenize", "sft_core.chat")),
    Stage("train", "train", Trained, train_key, train_body,
          ("sft_core.train", "sft_core.checkpoints", "sft_core.loss", "sft_core.modeling", "sft_core.launch",
           *_GENERATE),
          takes=("sink", "log"), keep_partial=True, resume_points=("checkpoint-*", "damaged-checkpoint-*")),
    Stage("evaluate", "evaluate", Evaluated, evaluate_key, evaluate_body, _EVALUATE),
    Stage("generate", "generate", Generated, generate_key, generate_body, _GENERATE, takes=("log",)),
    Stage("evaluate-base", "evaluate", Evaluated, evaluate_key, evaluate_body, _EVALUATE),
    Stage("generate-base", "generate", Generated, generate_key, generate_body, _GENERATE, takes=("log",)),
    Stage("harness", "harness", Harnessed, harness_key, harness_body, ("sft_core.harness", *_GENERATE)),
)}
STAGE_FOLDERS: tuple[str, ...] = tuple(dict.fromkeys(s.folder for s in STAGES.values()))


def folder_stage(folder: str) -> Stage:
    """The declaration behind a stage folder (stages sharing a folder share its rules)."""
    return next(s for s in STAGES.values() if s.folder == folder)


# --- the data stages, in order ----------------------------------------------------------------------------

@dataclass
class Prepared:
    """What the data stages hand to training and evaluation."""

    raw: Ingested
    model: BaseModel
    valid: Validated
    splits: Split
    tokens: Tokenized


def prepare(run: Callable[..., Result], *, ingested: Callable[[Ingested], None] | None = None) -> Prepared:
    """ingest -> base model -> validate -> split -> tokenize, each through `run(name, **inputs)`: `Stage.run` for
    the CLI, a Prefect task in the flow. `ingested(raw)` is told as soon as the rows are in (the flow starts its
    MLflow run then, while the other stages work)."""
    raw = run("ingest")
    if ingested is not None:
        ingested(raw)
    model = run("base-model")
    valid = run("validate", raw=raw, model=model)
    splits = run("split", valid=valid)
    tokens = run("tokenize", splits=splits, model=model)
    return Prepared(raw, model, valid, splits, tokens)


def prepare_data(cfg: PipelineConfig, *, refresh: bool = False, log: Callable[[str], None] = print) -> Prepared:
    """`prepare` without orchestration (the `prepare` and `harness` commands), one line per stage to `log`."""
    def run(name: str, **inputs: Any) -> Result:
        return STAGES[name].run(cfg, refresh=refresh, **inputs)

    prepared = prepare(run, ingested=lambda raw: log(f"ingest: {raw.rows} rows from {raw.location}"))
    valid, splits = prepared.valid, prepared.splits
    log(f"validate: {valid.good_rows} good, {valid.bad_rows} quarantined")
    for warning in valid.warnings:
        log(f"warning: {warning}")
    log(f"split: {splits.train_rows} train / {splits.val_rows} val ({splits.select_rows} choose the checkpoint, "
        f"{splits.report_rows} report)")
    return prepared


def generation_budget(cfg: PipelineConfig, tokens: Tokenized) -> GenerationBudget:
    """`eval.max_new_tokens` resolved against the validation responses."""
    return resolve_max_new_tokens(cfg.eval.max_new_tokens, tokens.val_response_lengths, cfg.data.max_length)
