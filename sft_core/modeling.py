"""Resolve, download and load the base model; make it stop where the fine-tune ends.

Sources (`sft_core.sources`): ``modelscope://Qwen/Qwen2.5-1.5B`` (real ``snapshot_download``),
``hf://owner/name``, a local folder, a local ``.gguf`` file (converted to a folder: `sft_core.gguf`),
or ``tiny://`` (a random-weight Qwen2 built here, for CPU demos and tests).
Weights load as safetensors only and ``trust_remote_code`` stays off unless configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_core.chat import ENDOFTEXT, IM_END, stop_token_ids, token_id
from sft_core.config import ModelConfig
from sft_core.errors import ModelSourceError
from sft_core.sources import parse_model_source


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


def fetch_base_model(cfg: ModelConfig, folder: Path, workdir: Path) -> Path:
    """A local folder holding config + safetensors + tokenizer for `cfg.source`.

    `tiny://` is built into `folder`, a GGUF file converted into it; hub sources download into the shared
    cache (`model.cache_dir`, default `<workdir>/models/cache`: resumable, shared by every run);
    a local folder is used where it is.
    """
    src = parse_model_source(cfg.source, revision=cfg.revision)
    if src.kind == "tiny":
        from sft_core.tiny_model import build_tiny_model

        return build_tiny_model(folder, cfg.tiny)
    if src.kind == "gguf":
        from sft_core.gguf import convert_gguf

        return convert_gguf(src.path, folder)
    cache_dir = cfg.cache_dir or str(workdir / "models" / "cache")
    if src.kind == "modelscope":
        return _download_modelscope(src.repo_id, src.revision, cache_dir)
    if src.kind == "hf":
        return _download_hf(src.repo_id, src.revision, cache_dir)
    if not (src.path / "config.json").exists():
        raise ModelSourceError(
            f"model.source '{cfg.source}': no model folder there (expected config.json); "
            "use a local folder, modelscope://owner/name, hf://owner/name or tiny://", transient=False,
        )
    return src.path


def _download_modelscope(model_id: str, revision: str | None, cache_dir: str) -> Path:
    try:
        from modelscope import snapshot_download

        return Path(snapshot_download(model_id, revision=revision or "master", cache_dir=cache_dir))
    except Exception as exc:  # modelscope raises NetworkError / ConnectionError / HTTPError / CacheNotFound
        raise ModelSourceError(
            f"model.source 'modelscope://{model_id}': download failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the network and the model id, or point model.source at a local folder", transient=_may_pass(exc),
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
            "check the network and the repo id, or point model.source at a local folder", transient=_may_pass(exc),
        ) from exc


def _may_pass(exc: BaseException) -> bool:
    """Whether a failed download may succeed on a retry: not when the hub said the model, revision or file does
    not exist or is gated (huggingface_hub's RepositoryNotFoundError / RevisionNotFoundError / EntryNotFoundError
    / GatedRepoError, modelscope's NotExistError, any HTTP 401/403/404). An offline miss of the local cache
    (LocalEntryNotFoundError) is the network's: it may pass."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "LocalEntryNotFoundError" in names:
        return True
    if names & {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "GatedRepoError",
                "NotExistError"}:
        return False
    return getattr(getattr(exc, "response", None), "status_code", None) not in (401, 403, 404)


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


def prepare_for_sft(model: Any, tokenizer: Any) -> None:
    """Pad with a token that is not the trained end token; stop generation on `<|im_end|>`.

    The Qwen2.5 base model stops only on `<|endoftext|>`; the fine-tune is trained to end
    on `<|im_end|>`. Without this, a fine-tuned model never stops.
    """
    stops = stop_token_ids(tokenizer)
    im_end = stops[0]
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == im_end:
        pad = token_id(tokenizer, ENDOFTEXT)
        tokenizer.pad_token = ENDOFTEXT if pad is not None and pad != im_end else tokenizer.unk_token
    if token_id(tokenizer, IM_END) == im_end:
        tokenizer.eos_token = IM_END
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id  # as the Trainer would align it, with a warning
    gen = model.generation_config
    gen.eos_token_id = stops
    gen.pad_token_id = tokenizer.pad_token_id
    # a clean greedy default; sampling is switched on per call
    gen.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gen, key):
            setattr(gen, key, None)
