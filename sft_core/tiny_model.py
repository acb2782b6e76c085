"""Build a tiny random-weight Qwen2 model + a tokenizer with Qwen's special tokens.

Used by the offline demo and the tests: no download, trains on 2 CPU cores in seconds.
The tokenizer is the real Qwen2.5 one when its files are available (``QWEN_TOKENIZER_DIR``
or ``../shared/qwen2.5-tokenizer`` next to the repo), else a small byte-level BPE
trained here on the bundled sample with Qwen's special tokens and chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from sft_core.chat import CHAT_TOKENS, ENDOFTEXT, IM_END, IM_START, THINK_CLOSE, THINK_OPEN
from sft_core.config import TinyModelConfig
from sft_core.data import BUNDLED_SAMPLE
from sft_core.stage_engine import OWNED

REPO_ROOT = Path(__file__).resolve().parent.parent

# The Qwen2.5 chat template without the tool branches (those need tokens this BPE lacks).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def shared_dir() -> Path:
    """`../shared` beside the checkout, where a machine keeps the real Qwen2.5 tokenizer and rows (CI's does, a
    user's clone has none); `QWEN_SFT_SHARED_DIR` points elsewhere, or at nothing to run as such a clone."""
    return Path(os.environ.get("QWEN_SFT_SHARED_DIR") or REPO_ROOT.parent / "shared")


def find_qwen_tokenizer_dir() -> Path | None:
    """The real Qwen2.5 tokenizer files, when this machine has them."""
    candidates = []
    if os.environ.get("QWEN_TOKENIZER_DIR"):
        candidates.append(Path(os.environ["QWEN_TOKENIZER_DIR"]))
    candidates.append(shared_dir() / "qwen2.5-tokenizer")
    for c in candidates:
        if (c / "tokenizer.json").exists() or (c / "vocab.json").exists():
            return c
    return None


def sample_texts() -> list[str]:
    """Text of the bundled sample, to train the fallback BPE on."""
    texts = []
    for line in BUNDLED_SAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.extend(str(row.get(k, "")) for k in ("question", "think", "answer"))
    return texts


def build_bpe_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE with Qwen's special tokens and chat template (offline fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = sample_texts() + [f"{THINK_OPEN}\n", f"\n{THINK_CLOSE}\n\n"]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def tokenizer_origin(cfg: TinyModelConfig) -> str:
    """What the tiny model's tokenizer will be built from: the Qwen2.5 files' path, or the BPE's corpus digest."""
    qwen_dir = find_qwen_tokenizer_dir() if cfg.tokenizer in ("auto", "qwen") else None
    if qwen_dir is not None:
        return f"qwen2.5:{qwen_dir}"
    return "bpe:" + hashlib.sha256(BUNDLED_SAMPLE.read_bytes()).hexdigest()[:16]


def load_tokenizer_for_tiny(cfg: TinyModelConfig):
    """The real Qwen2.5 tokenizer if available (and allowed), else the self-built BPE."""
    from transformers import AutoTokenizer

    qwen_dir = find_qwen_tokenizer_dir() if cfg.tokenizer in ("auto", "qwen") else None
    if cfg.tokenizer == "qwen" and qwen_dir is None:
        from sft_core.errors import ModelSourceError

        raise ModelSourceError(
            "model.tiny.tokenizer=qwen but no Qwen2.5 tokenizer files were found "
            "(set QWEN_TOKENIZER_DIR or use model.tiny.tokenizer=bpe)"
        )
    if qwen_dir is not None:
        return AutoTokenizer.from_pretrained(str(qwen_dir)), "qwen2.5"
    return build_bpe_tokenizer(cfg.vocab_size), "bpe"


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write a random-weight Qwen2ForCausalLM + tokenizer to `out_dir` (safetensors), a new or empty folder.

    The model is built in a hidden sibling folder and renamed into place when complete, so a process killed
    mid-build leaves no half-written `out_dir` (a 0-byte config.json) for a later run to trust.
    """
    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(p.name != OWNED for p in out.iterdir())):
        from sft_core.errors import ConfigError

        raise ConfigError(f"{out}: already exists and is not an empty folder; write the tiny model to a new one")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write_tiny_model(partial, cfg)
        if out.exists():
            for marker in out.iterdir():  # a stage folder's ownership marker goes with the model
                os.replace(marker, partial / marker.name)
            out.rmdir()
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _write_tiny_model(out: Path, cfg: TinyModelConfig) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer, kind = load_tokenizer_for_tiny(cfg)
    vocab = len(tokenizer)
    if kind == "qwen2.5":
        vocab = 151936  # the real embedding size (padded beyond the 151,665 tokens)
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    # like the Qwen2.5 *base* model: stops only on <|endoftext|> until fine-tuned
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "TINY_MODEL.json").write_text(
        json.dumps({**cfg.model_dump(), "tokenizer": kind}, indent=2), encoding="utf-8"
    )
