"""Validation metrics over the whole validation split: loss, perplexity, token accuracy.

Batched, length-sorted (little padding), and computed through the same memory-lean loss
as training, so no [tokens x vocab] logits tensor is ever materialised for the split.
"""

from __future__ import annotations

import math
from typing import Any, Callable


def evaluate_model(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Token-weighted mean CE over supervised tokens, its perplexity, and argmax accuracy."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from sft_core.chat import IGNORE_INDEX
    from sft_core.loss import compute_sft_loss

    if len(dataset) == 0:
        raise ValueError("the validation split is empty: nothing to evaluate")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    columns = ["input_ids", "attention_mask", "labels"]
    order = sorted(range(len(dataset)), key=lambda i: dataset[i]["length"]) if "length" in dataset.column_names else list(range(len(dataset)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens, total_correct = 0.0, 0, 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for n, idx in enumerate(batches, 1):
            rows = dataset.select(idx)
            features = [{c: rows[j][c] for c in columns} for j in range(len(rows))]
            batch = {k: v.to(device) for k, v in collator(features).items()}
            loss_sum, stats = compute_sft_loss(model, batch, num_items_in_batch=1, mode="chunked")
            total_loss += float(loss_sum)
            total_tokens += int(stats["num_tokens"])
            total_correct += int(stats["num_correct"])
            if progress:
                progress(n, len(batches))
    if was_training:
        model.train()
    mean = total_loss / max(total_tokens, 1)
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "token_accuracy": total_correct / max(total_tokens, 1),
        "tokens": float(total_tokens),
        "examples": float(len(dataset)),
    }
