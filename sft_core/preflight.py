"""Checks that run before any work: a bad setting fails in seconds, naming the key."""

from __future__ import annotations

from pathlib import Path

from sft_core.config import PipelineConfig
from sft_core.errors import ConfigError

def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_output_paths(cfg: PipelineConfig) -> None:
    """Output folders named in the config must stay inside the workdir."""
    root = cfg.workdir_path
    for key, value in (("data.cache_dir", cfg.data.cache_dir), ("model.cache_dir", cfg.model.cache_dir)):
        if value is None:
            continue
        p = Path(value).expanduser()
        p = p if p.is_absolute() else root / p
        if not inside(p, root):
            raise ConfigError(f"{key}='{value}' points outside the workdir {root}; use a path inside it "
                              "(or MODELSCOPE_CACHE / HF_HOME for a shared download cache)")


def check_sources(cfg: PipelineConfig) -> None:
    """Source URIs parse (hub ids are owner/name), local data files and model folders exist."""
    from sft_core.data import require_regular_file
    from sft_core.sources import parse_data_source, parse_model_source

    data = parse_data_source(cfg.data.source, revision=cfg.data.revision)
    if data.kind == "local" and data.path.exists():  # a FIFO or a folder: refused as `validate` refuses it
        require_regular_file(data.path)
    if data.kind == "local" and not data.path.is_file():
        raise ConfigError(f"data.source='{cfg.data.source}': no such file")
    model = parse_model_source(cfg.model.source, revision=cfg.model.revision)
    if model.kind == "local" and not (model.path / "config.json").is_file():
        raise ConfigError(f"model.source='{cfg.model.source}': no model folder there "
                          f"(expected {model.path / 'config.json'})")
    if model.kind == "gguf":
        from sft_core.gguf import is_gguf
        from sft_core.sample_model import SMOLLM2

        if not model.path.is_file():
            hint = " (fetch it with `qwen-sft fetch-sample-model`)" if model.path.name == SMOLLM2.file_name else ""
            raise ConfigError(f"model.source='{cfg.model.source}': no such file {model.path}{hint}")
        if not is_gguf(model.path):
            raise ConfigError(f"model.source='{cfg.model.source}': {model.path} is not a GGUF file")


def check_readable(cfg: PipelineConfig) -> None:
    """A local data file parses into rows (a hub dataset is fetched by the ingest stage): a bad file fails in
    seconds with its one-line error, before any orchestration starts."""
    from sft_core.data import load_rows
    from sft_core.sources import parse_data_source

    if parse_data_source(cfg.data.source, revision=cfg.data.revision).kind in ("local", "bundled"):
        d = cfg.data
        load_rows(d.source, subset=d.subset, split=d.split, revision=d.revision, cache_dir=d.cache_dir)


def check_prompt_fits(cfg: PipelineConfig, tokenizer) -> int:
    """data.max_length must leave room after the system prompt and chat markup."""
    from sft_core.chat import render_prompt

    prompt_tokens = len(tokenizer(render_prompt(tokenizer, "", cfg.data.system_prompt), add_special_tokens=False)["input_ids"])
    if cfg.data.max_length <= prompt_tokens + 8:
        raise ConfigError(f"data.max_length={cfg.data.max_length} leaves no room for an answer: the system prompt "
                          f"and chat markup alone take {prompt_tokens} tokens")
    return prompt_tokens


def local_model_dir(cfg: PipelineConfig) -> Path | None:
    """The base model's folder when it needs no build or download (a local folder, or a finished base-model stage)."""
    from sft_core.sources import parse_model_source
    from sft_core.stages import STAGES, read_done

    src = parse_model_source(cfg.model.source, revision=cfg.model.revision)
    if src.kind == "local":
        return src.path
    stage = STAGES["base-model"]
    done = read_done(stage.folder_of(cfg, stage.key_of(cfg)), stage.result)
    return Path(done.model_dir) if done is not None else None


def preflight(cfg: PipelineConfig) -> None:
    """Everything checkable without downloading or training."""
    check_output_paths(cfg)
    check_sources(cfg)  # (eval.harness without lm-evaluation-harness installed is skipped by the flow, not refused)
    from sft_core.modeling import load_tokenizer

    model_dir = local_model_dir(cfg)
    if model_dir is not None:  # a download or a build waits for the base-model stage, which checks again
        check_prompt_fits(cfg, load_tokenizer(model_dir))
