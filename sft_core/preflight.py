"""Checks that run before any work: a bad setting fails in seconds, naming the key."""

from __future__ import annotations

from pathlib import Path

from sft_core.config import PipelineConfig
from sft_core.errors import ConfigError

REMOTE_PREFIXES = ("modelscope://", "hf://", "http://", "https://", "s3://")


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
    """Local data files and model folders must exist."""
    src = cfg.data.source
    if src not in ("sample", "bundled://sample") and not src.startswith(REMOTE_PREFIXES):
        if not Path(src.removeprefix("file://")).expanduser().is_file():
            raise ConfigError(f"data.source='{src}': no such file")
    m = cfg.model.source
    if not m.startswith((*REMOTE_PREFIXES, "tiny://")):
        folder = Path(m.removeprefix("file://")).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.source='{m}': no model folder there (expected {folder / 'config.json'})")


def check_prompt_fits(cfg: PipelineConfig, tokenizer) -> int:
    """data.max_length must leave room after the system prompt and chat markup."""
    from sft_core.tokenize import render_prompt

    prompt_tokens = len(tokenizer(render_prompt(tokenizer, "", cfg.data.system_prompt), add_special_tokens=False)["input_ids"])
    if cfg.data.max_length <= prompt_tokens + 8:
        raise ConfigError(f"data.max_length={cfg.data.max_length} leaves no room for an answer: the system prompt "
                          f"and chat markup alone take {prompt_tokens} tokens")
    return prompt_tokens


def preflight(cfg: PipelineConfig) -> None:
    """Everything checkable without downloading or training."""
    check_output_paths(cfg)
    check_sources(cfg)
    if cfg.eval.harness:
        from sft_core.harness import require_lm_eval

        require_lm_eval()
    from sft_core.modeling import load_tokenizer, model_is_local, resolve_model_dir

    if model_is_local(cfg.model, cfg.workdir_path):  # downloads and builds wait for the base-model task
        check_prompt_fits(cfg, load_tokenizer(resolve_model_dir(cfg.model, cfg.workdir_path)))
