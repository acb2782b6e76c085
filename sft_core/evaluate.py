"""Validation metrics of a model on a tokenized set: loss, perplexity, token accuracy, and each row's share.

Batched, length-sorted (little padding), with the vocabulary projection applied to supervised tokens
only (`sft_core.loss.per_row_losses`), so no [tokens x vocab] logits tensor is ever materialised for
the set. The per-row sums let the promotion gate put an interval on a difference of losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from sft_core.chat import IGNORE_INDEX


@dataclass
class Evaluation:
    """Token-weighted figures of a set, and each row's summed loss and supervised tokens (in dataset order)."""

    metrics: dict[str, float]
    loss_sums: list[float]
    tokens: list[int]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Token-weighted mean CE over supervised tokens, its perplexity, and argmax accuracy."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from sft_core.loss import per_row_losses

    if len(dataset) == 0:
        raise ValueError("the validation set is empty: nothing to evaluate")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    columns = ["input_ids", "attention_mask", "labels"]
    lengths = dataset["length"] if "length" in dataset.column_names else [0] * len(dataset)
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sums, tokens, correct = [0.0] * len(dataset), [0] * len(dataset), [0] * len(dataset)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for n, idx in enumerate(batches, 1):
            rows = dataset.select(idx)
            features = [{c: rows[j][c] for c in columns} for j in range(len(rows))]
            batch = {k: v.to(device) for k, v in collator(features).items()}
            found = per_row_losses(model, batch)
            for j, i in enumerate(idx):
                loss_sums[i] = float(found["loss_sum"][j])
                tokens[i] = int(found["tokens"][j])
                correct[i] = int(found["correct"][j])
            if progress:
                progress(n, len(batches))
    if was_training:
        model.train()
    total_tokens = sum(tokens)
    mean = sum(loss_sums) / max(total_tokens, 1)
    metrics = {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "token_accuracy": sum(correct) / max(total_tokens, 1),
        "tokens": float(total_tokens),
        "examples": float(len(dataset)),
    }
    return Evaluation(metrics, loss_sums, tokens)
