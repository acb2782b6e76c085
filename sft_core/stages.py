"""The pipeline's stages, each declared once: its name, what its key hashes, its code, its body.

A stage writes into ``<workdir>/<folder>/<key>/`` and finishes by writing ``_DONE.json`` (its
typed result) atomically. ``_DONE.json`` is the one record of "done": a folder that has it is
complete and reused as is; a folder without it is a crash's leftover and is wiped first
(except train's, whose checkpoints resume). The key hashes the stage's inputs (digests or the
keys of the stages it reads), the config section it reads, and its code version: a hash of
the source of its body, its key function, its result type and the library modules its body
runs, normalised so that comments, docstrings and formatting do not count.

``STAGES`` holds every declaration. ``Stage.run`` runs one without orchestration (the
``prepare`` command, tests); ``tasks.stage`` runs the same declaration as a Prefect task.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sft_core.config import PipelineConfig, stable_hash
from sft_core.disk import check_space, free_space, is_disk_full, training_space
from sft_core.errors import StorageError

DONE = "_DONE.json"
OWNED = ".qwen-sft-owned"  # written into every folder a stage creates: `qwen-sft gc` deletes nothing else


# --- typed results: what a stage hands to the next, and what its _DONE.json holds ---------------------------

@dataclass(kw_only=True)
class Result:
    """What every stage result has: its key (None: not cached), its folder, how long its body took."""

    key: str | None
    folder: str
    seconds: float = 0.0
    reused: bool = field(default=False, compare=False)  # found done (not stored)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("reused")
        return data

    def own_fields(self) -> dict[str, Any]:
        """The fields of this kind of result (what a stage body returns): without key, folder and timing."""
        data = self.to_json()
        for name in ("key", "folder", "seconds"):
            data.pop(name)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        """The result stored in `data`; ValueError when it lacks a field (written by older code)."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not required <= set(data):
            raise ValueError(f"{cls.__name__} record lacks {sorted(required - set(data))}")
        return cls(**{k: v for k, v in data.items() if k in names and k != "reused"})


@dataclass(kw_only=True)
class Ingested(Result):
    raw: str
    row_numbers: str
    digest: str  # sha256 of the canonical rows
    rows: int
    source: str
    location: str
    extra_columns: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Validated(Result):
    valid: str
    digest: str
    good_rows: int
    bad_rows: int
    report: str | None = None
    docs: str | None = None
    quarantine: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Split(Result):
    """train / val (the tutorial's 90/10), and val cut into the selection and report sets."""

    train: str
    val: str
    train_rows: int
    val_rows: int
    train_digest: str
    val_digest: str
    select: str
    report: str
    select_rows: int
    report_rows: int
    sets: str  # validation_sets.json: the rule, the counts and the question ids of each set
    sets_digest: str  # of the two sets' question ids: what the stages after the split are keyed on


@dataclass(kw_only=True)
class BaseModel(Result):
    model_dir: str


@dataclass(kw_only=True)
class Tokenized(Result):
    """The tokenized train, selection and report sets (`save_to_disk` folders), their statistics (and the
    whole validation split's, which sizes the generation budget), and the question ids of the kept rows."""

    train_ds: str
    select_ds: str
    report_ds: str
    stats: dict[str, Any]
    ids: str  # ids.json: {"select": [...], "report": [...]}, the question id of each row of those datasets

    @property
    def val_response_lengths(self) -> dict[str, int]:
        return self.stats["val"].get("response_length_percentiles", {})


@dataclass(kw_only=True)
class Trained(Result):
    output_dir: str
    final_model_dir: str
    global_step: int
    epochs: float
    train_loss: float | None
    best_checkpoint: str | None  # the checkpoint the final model is, when one was selected
    selected_by: str | None  # the metric that chose it (eval_gen_score, eval_loss); None: the last step
    best_value: float | None
    resumed_from: str | None
    metrics_file: str

    @property
    def model_dir(self) -> str:
        return self.final_model_dir


@dataclass(kw_only=True)
class Evaluated(Result):
    metrics: dict[str, float]
    losses: str | None = None  # losses.json: each report question's id, summed loss and supervised tokens


@dataclass(kw_only=True)
class Generated(Result):
    predictions: str
    metrics: dict[str, float]


@dataclass(kw_only=True)
class Harnessed(Result):
    metrics: dict[str, float]
    samples: str
    results: str


# --- the declaration -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One stage: `key(cfg, **inputs)` says what its folder key hashes (None: never cached),
    `body(cfg, folder, **inputs, **extras)` does the work and returns the result's fields."""

    name: str
    folder: str
    result: type[Result]
    key: Callable[..., dict[str, Any] | None]
    body: Callable[..., dict[str, Any]]
    modules: tuple[str, ...] = ()  # the library modules its body runs: part of its code version
    keep_partial: bool = False  # a crashed run's files are kept (train: checkpoints to resume from)
    retries: int = 0  # for stages that reach the network; nothing else can heal by retrying

    def code_version(self) -> str:
        """A hash of the normalised source of the body, key function, result type and modules, as this process
        loaded them (computed once per process: a file edited while a run goes on does not relabel its work)."""
        return _code_version(self.body, self.key, self.result, self.modules)

    def key_of(self, cfg: PipelineConfig, **inputs: Any) -> str | None:
        spec = self.key(cfg, **inputs)
        if spec is None:
            return None
        return stable_hash({"stage": self.name, "code": self.code_version(), "inputs": spec}, length=16)

    def folder_of(self, cfg: PipelineConfig, key: str | None) -> Path:
        return cfg.workdir_path / self.folder / (key or "latest")

    def run(self, cfg: PipelineConfig, *, refresh: bool = False, extras: dict[str, Any] | None = None,
            **inputs: Any) -> Result:
        """Run the body unless its folder holds a finished result (always, when the key is None)."""
        key = self.key_of(cfg, **inputs)
        return self.run_into(cfg, self.folder_of(cfg, key), key=key, refresh=refresh or key is None, extras=extras,
                             **inputs)

    def run_into(self, cfg: PipelineConfig, folder: Path, *, key: str | None = None, refresh: bool = False,
                 extras: dict[str, Any] | None = None, **inputs: Any) -> Result:
        """Run the body into `folder` (a command's own output folder, or the keyed one), same rules."""
        return run_in_folder(
            folder, lambda f: self.result(key=key, folder=str(f), **self.body(cfg, f, **inputs, **(extras or {}))),
            self.result, refresh=refresh, keep_partial=self.keep_partial,
        )


def read_done(folder: Path, result: type[Result]) -> Result | None:
    """The finished result in `folder`, or None (not done, unreadable, or written by older code)."""
    marker = folder / DONE
    try:
        return result.from_json(json.loads(marker.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def write_done(folder: Path, result: Result) -> Result:
    tmp = folder / (DONE + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, folder / DONE)
    return result


def run_in_folder(folder: Path, body: Callable[[Path], Result], result: type[Result], *, refresh: bool = False,
                  keep_partial: bool = False) -> Result:
    """`body(folder)` unless the folder already holds a finished result; the result is recorded in _DONE.json.

    A file lock beside the folder makes concurrent runs of the same stage wait for each other: the
    second finds the first's result instead of redoing (or clobbering) it.
    """
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if refresh and folder.exists():
            shutil.rmtree(folder)
        done = read_done(folder, result)
        if done is not None:
            done.reused = True
            return done
        if folder.exists() and not keep_partial:
            shutil.rmtree(folder)
        started = time.perf_counter()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / OWNED).write_text("written by qwen-sft: `qwen-sft gc` may delete this folder\n", encoding="utf-8")
            out = body(folder)
            out.seconds = round(time.perf_counter() - started, 3)
            return write_done(folder, out)
        except Exception as exc:
            if is_disk_full(exc):
                raise StorageError(f"no space left on the device of {folder} ({free_space(folder)} free): "
                                   f"{type(exc).__name__}: {str(exc)[:200]}; free some with `qwen-sft gc`, or set "
                                   "workdir on a larger disk") from exc
            raise


# --- code versions: source, normalised ---------------------------------------------------------------------

def _normalised(source: str) -> str:
    """Source without comments, docstrings or formatting: what the code does, not how it reads."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


_AST_LOCK = threading.Lock()  # CPython 3.11's ast is not safe across threads ("recursion depth mismatch")


def _code_version(body: Callable, key: Callable, result: type, modules: tuple[str, ...]) -> str:
    with _AST_LOCK:
        return _code_version_locked(body, key, result, modules)


@functools.cache
def _code_version_locked(body: Callable, key: Callable, result: type, modules: tuple[str, ...]) -> str:
    parts = [_normalised(inspect.getsource(obj)) for obj in (body, key, result)]
    parts += [_module_source(name) for name in modules]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"stage module {name} not found")
    return _normalised(Path(spec.origin).read_text(encoding="utf-8"))


# --- bodies and keys ------------------------------------------------------------------------------------------

def _source_fingerprint(cfg: PipelineConfig) -> str | None:
    """Content hash of a local data file (or the bundled sample); None for a hub dataset."""
    from sft_core.data import BUNDLED_SAMPLE
    from sft_core.sources import parse_data_source

    src = parse_data_source(cfg.data.source, revision=cfg.data.revision)
    path = BUNDLED_SAMPLE if src.kind == "bundled" else src.path
    if path is None or not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ingest_key(cfg: PipelineConfig) -> dict | None:
    """A local file is keyed by its content; a hub dataset is fetched again and judged by its digest (None)."""
    fingerprint = _source_fingerprint(cfg)
    if fingerprint is None:
        return None
    return {"file": fingerprint, **cfg.data.model_dump(include={"subset", "split"})}


def ingest_body(cfg: PipelineConfig, folder: Path) -> dict:
    from sft_core.data import dataset_digest, load_rows, write_jsonl

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
    from sft_core.chat import control_tokens
    from sft_core.data import dataset_digest, read_jsonl, write_jsonl
    from sft_core.modeling import load_tokenizer
    from sft_core.validation import validate_rows

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
    from sft_core.data import dataset_digest, read_jsonl, write_jsonl
    from sft_core.split import assign_validation, check_split, question_id, split_rows

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
    from sft_core.sources import parse_model_source

    from sft_core.tiny_model import tokenizer_origin

    m = cfg.model
    src = parse_model_source(m.source, revision=m.revision)
    spec: dict[str, Any] = {"source": src.uri()}
    if src.kind == "tiny":  # its shape, and what its tokenizer is built from
        spec["tiny"] = m.tiny.model_dump()
        spec["tokenizer"] = tokenizer_origin(m.tiny)
    elif src.kind == "gguf":
        from sft_core.gguf import file_sha256

        spec = {"gguf_sha256": file_sha256(src.path)}
    elif src.kind == "local" and src.path.is_dir():
        spec["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.path.iterdir()
                               if p.is_file())
    return spec


def base_model_body(cfg: PipelineConfig, folder: Path) -> dict:
    from sft_core.modeling import fetch_base_model

    return {"model_dir": str(fetch_base_model(cfg.model, folder, cfg.workdir_path))}


def tokenize_key(cfg: PipelineConfig, splits: Split, model: BaseModel) -> dict:
    return {"train": splits.train_digest, "val": splits.val_digest, "sets": splits.sets_digest, "model": model.key,
            **cfg.data.model_dump(include={"system_prompt", "max_length", "truncation"})}


def tokenize_body(cfg: PipelineConfig, folder: Path, splits: Split, model: BaseModel) -> dict:
    from sft_core.data import read_jsonl
    from sft_core.modeling import load_tokenizer
    from sft_core.preflight import check_prompt_fits
    from sft_core.split import question_id
    from sft_core.tokenize import tokenize_rows

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
    from sft_core.launch import launch_training
    from sft_core.train import run_training

    if not any(Path(folder).glob("checkpoint-*")):  # a fresh start (a resumed one has most of its files already)
        check_space(folder, training_space(cfg, model.model_dir), "training")
    if cfg.train.num_processes > 1:  # the ranks build the same generation check from the selection rows
        return launch_training(cfg, model_dir=model.model_dir, tokens=tokens, select_rows=splits.select,
                               max_new_tokens=max_new_tokens, output_dir=folder, sink=sink, log=log)
    check = generation_check(cfg, splits.select, max_new_tokens)
    return run_training(cfg, model_dir=model.model_dir, train_data=tokens.train_ds, eval_data=tokens.select_ds,
                        output_dir=folder, sink=sink, progress=log, generation_check=check).own_fields()


def generation_check(cfg: PipelineConfig, select_rows: str, max_new_tokens: int):
    """The selection questions that checkpoint selection generates on (None: selection by loss or none)."""
    from sft_core.data import read_jsonl
    from sft_core.train import GenerationCheck

    if cfg.train.metric_for_best_model != "gen_score" or cfg.eval.num_generate == 0:
        return None
    rows = read_jsonl(select_rows)[: cfg.eval.num_generate]
    if not rows:
        return None
    return GenerationCheck(questions=[r["question"] for r in rows], references=[r["answer"] for r in rows],
                           system_prompt=cfg.data.system_prompt, max_new_tokens=max_new_tokens,
                           batch_size=cfg.eval.generate_batch_size, repetition_penalty=cfg.eval.repetition_penalty,
                           engine=cfg.eval.engine, vllm=cfg.eval.vllm)


def evaluate_key(cfg: PipelineConfig, model: BaseModel | Trained, tokens: Tokenized) -> dict:
    return {"model": model.key, "tokens": tokens.key, "batch_size": cfg.eval.batch_size}


def evaluate_body(cfg: PipelineConfig, folder: Path, model: BaseModel | Trained, tokens: Tokenized) -> dict:
    """Loss, perplexity and token accuracy of a model (fine-tuned or base) on the report set, and each report
    question's loss (what the gate's interval of a loss difference is built from)."""
    import datasets

    from sft_core.evaluate import evaluate_model
    from sft_core.modeling import load_model, load_tokenizer, resolve_device

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
    from sft_core.data import read_jsonl

    return read_jsonl(splits.report)[: cfg.eval.num_generate]


def generate_key(cfg: PipelineConfig, model: BaseModel | Trained, splits: Split, max_new_tokens: int) -> dict:
    e = cfg.eval.model_dump(exclude={"batch_size", "compare_base", "harness", "max_new_tokens", "vllm"})
    return {"model": model.key, "val": splits.val_digest, "sets": splits.sets_digest, "eval": e,
            "max_new_tokens": max_new_tokens, "system_prompt": cfg.data.system_prompt}


def generate_body(cfg: PipelineConfig, folder: Path, model: BaseModel | Trained, splits: Split,
                  max_new_tokens: int, log: Callable[[str], None] | None = None) -> dict:
    """Greedy answers to the report questions, parsed and scored; `log` gets one progress line per batch."""
    from sft_core.data import write_jsonl
    from sft_core.generate import generate_answers, generation_metrics
    from sft_core.modeling import load_model, load_tokenizer, prepare_for_sft, resolve_device
    from sft_core.split import question_id

    e = cfg.eval
    rows = report_rows(cfg, splits)
    questions, references = [r["question"] for r in rows], [r["answer"] for r in rows]
    progress = (lambda done, total: log(f"answered {done}/{total} report questions")) if log else None
    sampling = {"max_new_tokens": max_new_tokens, "do_sample": e.do_sample, "temperature": e.temperature,
                "top_p": e.top_p, "repetition_penalty": e.repetition_penalty, "seed": cfg.train.seed}
    if e.engine == "vllm":  # the same prompts, stops (<|im_end|> for the base too) and parse, through a vLLM server
        from sft_core.vllm_engine import generate_answers_vllm

        gens = generate_answers_vllm(model.model_dir, questions, system_prompt=cfg.data.system_prompt,
                                     references=references, progress=progress, vllm=e.vllm,
                                     dtype=_vllm_dtype(cfg), **sampling)
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


def _vllm_dtype(cfg: PipelineConfig) -> str:
    """The dtype vLLM loads the model in: the one the HF engine would use on this device."""
    from sft_core.modeling import resolve_device, resolve_dtype

    return str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.train.device))).removeprefix("torch.")


def harness_key(cfg: PipelineConfig, model: Trained, splits: Split, max_new_tokens: int) -> dict:
    e = cfg.eval.model_dump(include={"num_generate", "generate_batch_size", "repetition_penalty"})
    return {"model": model.key, "val": splits.val_digest, "sets": splits.sets_digest, "eval": e,
            "max_new_tokens": max_new_tokens, "system_prompt": cfg.data.system_prompt}


def harness_body(cfg: PipelineConfig, folder: Path, model: Trained, splits: Split, max_new_tokens: int) -> dict:
    """lm-evaluation-harness on the same report questions as `generate` (`eval.harness`)."""
    from sft_core.harness import run_harness
    from sft_core.modeling import resolve_device, resolve_dtype

    device = resolve_device(cfg.train.device)
    return run_harness(model.model_dir, report_rows(cfg, splits), folder,
                       system_prompt=cfg.data.system_prompt, max_new_tokens=max_new_tokens,
                       batch_size=cfg.eval.generate_batch_size, repetition_penalty=cfg.eval.repetition_penalty,
                       device=device, dtype=str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch."))


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
           *_GENERATE), keep_partial=True),
    Stage("evaluate", "evaluate", Evaluated, evaluate_key, evaluate_body, _EVALUATE),
    Stage("generate", "generate", Generated, generate_key, generate_body, _GENERATE),
    Stage("evaluate-base", "evaluate", Evaluated, evaluate_key, evaluate_body, _EVALUATE),
    Stage("generate-base", "generate", Generated, generate_key, generate_body, _GENERATE),
    Stage("harness", "harness", Harnessed, harness_key, harness_body, ("sft_core.harness", *_GENERATE)),
)}
STAGE_FOLDERS: tuple[str, ...] = tuple(dict.fromkeys(s.folder for s in STAGES.values()))


def generation_budget(cfg: PipelineConfig, tokens: Tokenized):
    """`eval.max_new_tokens` resolved against the validation responses (a `GenerationBudget`)."""
    from sft_core.generate import resolve_max_new_tokens

    return resolve_max_new_tokens(cfg.eval.max_new_tokens, tokens.val_response_lengths, cfg.data.max_length)


def prepare_data(cfg: PipelineConfig, *, refresh: bool = False, log: Callable[[str], None] = print) -> dict[str, Result]:
    """ingest -> base model -> validate -> split -> tokenize, without orchestration (the `prepare` command)."""
    raw = STAGES["ingest"].run(cfg, refresh=refresh)
    log(f"ingest: {raw.rows} rows from {raw.location}")
    model = STAGES["base-model"].run(cfg, refresh=refresh)
    valid = STAGES["validate"].run(cfg, refresh=refresh, raw=raw, model=model)
    log(f"validate: {valid.good_rows} good, {valid.bad_rows} quarantined")
    for warning in valid.warnings:
        log(f"warning: {warning}")
    splits = STAGES["split"].run(cfg, refresh=refresh, valid=valid)
    log(f"split: {splits.train_rows} train / {splits.val_rows} val ({splits.select_rows} choose the checkpoint, "
        f"{splits.report_rows} report)")
    tokens = STAGES["tokenize"].run(cfg, refresh=refresh, splits=splits, model=model)
    return {"ingest": raw, "validate": valid, "split": splits, "base-model": model, "tokenize": tokens}
