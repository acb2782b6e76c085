"""A GGUF file (llama.cpp's single-file format) turned into an ordinary Hugging Face model folder.

transformers reads a GGUF with ``from_pretrained(dir, gguf_file=name)`` (the ``gguf`` package does
the reading) and dequantizes its weights, but refuses to ``save_pretrained`` what it loaded ("quantized
with gguf and is not serializable"). So the model is rebuilt from its config, without the
quantization record, the dequantized weights are loaded into it, and it is saved as safetensors
(float32: the exact dequantized values) with the tokenizer, its chat template and a generation config
that stops on the end-of-turn token. Everything downstream then sees a normal folder.
"""

from __future__ import annotations

from pathlib import Path

from sft_core.chat import IM_END, encode_example, token_id
from sft_core.errors import ModelSourceError
from sft_core.files import content_sha256

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts like a GGUF (its first four bytes)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content (computed once per process for a given size and mtime)."""
    try:
        return content_sha256(path)
    except OSError as exc:
        raise ModelSourceError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture` (`llama`, `qwen2`, ...); ModelSourceError when it is no GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelSourceError("reading a GGUF model needs the gguf package: pip install gguf") from exc
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ModelSourceError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:160]})") from exc


def convert_gguf(path: Path, out: Path) -> Path:
    """Write `path` (a .gguf) to the folder `out` as config + safetensors + tokenizer + generation config.

    Fails with one line when transformers cannot dequantize the file's architecture, or when its tokenizer has
    no `<|im_end|>` or a chat template that does not end the assistant's turn with it (the chat format,
    `sft_core.chat`, trains the model to stop there).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    arch = gguf_architecture(path)
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except Exception as exc:  # "GGUF model with architecture X is not supported yet", a ggml type it lacks, ...
        raise ModelSourceError(
            f"{path}: transformers {transformers.__version__} cannot load this GGUF (architecture '{arch}'): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    _check_chat_format(path, tokenizer)

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse; the weights are dequantized already
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    im_end = token_id(tokenizer, IM_END)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=im_end,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else im_end,
    )
    model.config.eos_token_id = im_end
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _check_chat_format(path: Path, tokenizer) -> None:
    if token_id(tokenizer, IM_END) is None:
        raise ModelSourceError(f"{path}: its tokenizer has no {IM_END} token, so a fine-tune could not learn "
                               "where its turn ends; use a chat model whose template is ChatML")
    if not tokenizer.chat_template:
        raise ModelSourceError(f"{path}: the GGUF holds no chat template (tokenizer.chat_template); "
                               "use a chat (instruct) model")
    try:
        encode_example(tokenizer, {"question": "q", "think": "t", "answer": "a"}, "s")
    except Exception as exc:
        raise ModelSourceError(f"{path}: its chat template does not fit the project's chat format: {exc}") from exc
