"""SFT tokenization of rows in the chat format (`sft_core.chat`).

Each row is rendered by the tokenizer's own chat template (not a hand-written f-string). Labels are
-100 on the prompt (everything up to and including ``<|im_start|>assistant\\n``), then the
assistant tokens, then ``<|im_end|>`` with a real label, so the model learns to stop.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sft_core.chat import IGNORE_INDEX, encode_example, render_prompt
from sft_core.config import PipelineConfig
from sft_core.errors import ConfigError


@dataclass
class TokenizeStats:
    rows_in: int = 0
    rows_out: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_rows: list[int] = field(default_factory=list)  # positions (0-based) of the rows left out
    supervised_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)
    # assistant-turn tokens per row before truncation (the `<|im_end|>` included): a generation budget
    response_length_percentiles: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def encode_batch(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    system_prompt: str,
    max_length: int,
    truncation: Literal["truncate", "drop"] = "truncate",
) -> dict[str, list]:
    """`datasets.map(batched=True)` function: rows -> input_ids / attention_mask / labels / length.

    The rows' text is encoded as text (`sft_core.chat.encode_example`): only the chat template's
    markup becomes control tokens, whatever a field spells.
    """
    encoded = [
        encode_example(tokenizer, {"question": q, "think": t, "answer": a}, system_prompt)
        for q, t, a in zip(batch["question"], batch["think"], batch["answer"])
    ]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "length": [], "truncated": [], "keep": [],
                            "response_tokens": []}
    for p, c in encoded:
        ids = p + c
        labels = [IGNORE_INDEX] * len(p) + c
        truncated = len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        keep = not (truncated and truncation == "drop") and any(x != IGNORE_INDEX for x in labels)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["truncated"].append(truncated)
        out["keep"].append(keep)
        out["response_tokens"].append(len(c))
    return out


def tokenize_rows(
    rows: list[dict],
    tokenizer: Any,
    *,
    system_prompt: str,
    max_length: int,
    truncation: Literal["truncate", "drop"] = "truncate",
    batch_size: int = 256,
    num_proc: int | None = None,
    desc: str = "tokenize",
):
    """Tokenize rows into a `datasets.Dataset` (input_ids, attention_mask, labels, length) + stats."""
    import datasets

    base = datasets.Dataset.from_dict(
        {k: [str(r[k]) for r in rows] for k in ("question", "think", "answer")}
    )
    encoded = base.map(
        encode_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=base.column_names,
        fn_kwargs={"tokenizer": tokenizer, "system_prompt": system_prompt, "max_length": max_length, "truncation": truncation},
        desc=desc,
        # a fingerprint of our own: hashing the tokenizer for datasets' default one costs seconds
        new_fingerprint=uuid.uuid4().hex,
    )
    stats = TokenizeStats(rows_in=len(rows), truncated=int(sum(encoded["truncated"])),
                          response_length_percentiles=_percentiles(encoded["response_tokens"]))
    keep = encoded["keep"]
    stats.dropped_rows = [i for i, k in enumerate(keep) if not k]
    stats.dropped = len(stats.dropped_rows)
    if stats.dropped:
        encoded = encoded.filter(lambda k: k, input_columns="keep", desc=f"{desc}: drop", new_fingerprint=uuid.uuid4().hex)
    encoded = encoded.remove_columns(["truncated", "keep", "response_tokens"])
    stats.rows_out = len(encoded)
    stats.length_percentiles = _percentiles(encoded["length"])
    stats.supervised_tokens = int(sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in encoded["labels"]))
    return encoded, stats


def _percentiles(values: list[int]) -> dict[str, int]:
    """p50 / p90 / p95 / p99 / p100 of `values` (0s for none)."""
    import numpy as np

    arr = np.asarray(values if len(values) else [0])
    return {f"p{q}": int(np.ceil(np.percentile(arr, q))) for q in (50, 90, 95, 99, 100)}


def check_prompt_fits(cfg: PipelineConfig, tokenizer: Any) -> int:
    """data.max_length must leave room after the system prompt and chat markup (ConfigError naming both)."""
    prompt = render_prompt(tokenizer, "", cfg.data.system_prompt)
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if cfg.data.max_length <= prompt_tokens + 8:
        raise ConfigError(f"data.max_length={cfg.data.max_length} leaves no room for an answer: the system prompt "
                          f"and chat markup alone take {prompt_tokens} tokens")
    return prompt_tokens
