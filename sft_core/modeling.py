"""Resolve, download and load the base model; make it stop where the fine-tune ends.

Sources: ``modelscope://Qwen/Qwen2.5-1.5B`` (real ``snapshot_download``), ``hf://owner/name``,
a local folder, or ``tiny://`` (a random-weight Qwen2 built here, for CPU demos and tests).
Weights load as safetensors only and ``trust_remote_code`` stays off unless configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_core.config import ModelConfig, stable_hash
from sft_core.errors import ModelSourceError

IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("train.device=cuda but no CUDA device is visible (use train.device=auto or cpu)")
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` is bf16 on a GPU that supports it, fp32 elsewhere."""
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def model_cache_key(cfg: ModelConfig) -> str:
    return stable_hash({"source": cfg.source, "revision": cfg.revision, "tiny": cfg.tiny.model_dump()})


def model_is_local(cfg: ModelConfig, workdir: str | Path) -> bool:
    """True when `resolve_model_dir` will not build or download anything."""
    if cfg.source.startswith("tiny://"):
        return (Path(workdir) / "models" / f"tiny-{model_cache_key(cfg)}" / "config.json").exists()
    if cfg.source.startswith(("modelscope://", "hf://")):
        return False
    return True


def resolve_model_dir(cfg: ModelConfig, workdir: str | Path) -> Path:
    """Return a local folder holding config + safetensors + tokenizer for `cfg.source`."""
    source = cfg.source
    cache_dir = cfg.cache_dir or str(Path(workdir) / "models" / "cache")
    if source.startswith("tiny://"):
        from sft_core.tiny_model import build_tiny_model

        out = Path(workdir) / "models" / f"tiny-{model_cache_key(cfg)}"
        if not (out / "config.json").exists():
            build_tiny_model(out, cfg.tiny)
        return out
    if source.startswith("modelscope://"):
        return _download_modelscope(source.removeprefix("modelscope://"), cfg.revision, cache_dir)
    if source.startswith("hf://"):
        return _download_hf(source.removeprefix("hf://"), cfg.revision, cache_dir)
    path = Path(source.removeprefix("file://")).expanduser()
    if not (path / "config.json").exists():
        raise ModelSourceError(
            f"model.source '{source}': no model folder there (expected config.json); "
            "use a local folder, modelscope://owner/name, hf://owner/name or tiny://"
        )
    return path


def _download_modelscope(model_id: str, revision: str | None, cache_dir: str) -> Path:
    try:
        from modelscope import snapshot_download

        return Path(snapshot_download(model_id, revision=revision or "master", cache_dir=cache_dir))
    except Exception as exc:  # modelscope raises NetworkError / ConnectionError / HTTPError / CacheNotFound
        raise ModelSourceError(
            f"model.source 'modelscope://{model_id}': download failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the network and the model id, or point model.source at a local folder"
        ) from exc


def _download_hf(repo_id: str, revision: str | None, cache_dir: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"],
            )
        )
    except Exception as exc:
        raise ModelSourceError(
            f"model.source 'hf://{repo_id}': download failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the network and the repo id, or point model.source at a local folder"
        ) from exc


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelSourceError(f"cannot load a tokenizer from '{model_dir}': {exc}") from exc


def load_model(
    model_dir: str | Path,
    *,
    dtype: Any = "auto",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
):
    """Load a causal LM from safetensors only, on `device`."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except Exception as exc:
        raise ModelSourceError(f"cannot load a safetensors model from '{model_dir}': {exc}") from exc
    return model.to(device)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """`<|im_end|>` (what the fine-tune ends on) then `<|endoftext|>` (what the base ends on)."""
    ids = []
    for token in (IM_END, ENDOFTEXT):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.append(tid)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def prepare_for_sft(model: Any, tokenizer: Any) -> None:
    """Pad with a token that is not the trained end token; stop generation on `<|im_end|>`.

    The Qwen2.5 base model stops only on `<|endoftext|>`; the fine-tune is trained to end
    on `<|im_end|>`. Without this, a fine-tuned model never stops.
    """
    stops = stop_token_ids(tokenizer)
    im_end = stops[0]
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == im_end:
        pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        tokenizer.pad_token = ENDOFTEXT if isinstance(pad, int) and pad >= 0 and pad != im_end else tokenizer.unk_token
    if tokenizer.convert_tokens_to_ids(IM_END) == im_end:
        tokenizer.eos_token = IM_END
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.eos_token_id = stops
    gen.pad_token_id = tokenizer.pad_token_id
    # a clean greedy default; sampling is switched on per call
    gen.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gen, key):
            setattr(gen, key, None)
