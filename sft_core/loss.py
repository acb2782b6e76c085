"""Supervised fine-tuning loss that never materialises logits it does not need.

A Qwen2.5 vocabulary has 151,936 entries, so the ``[tokens, vocab]`` logits (and the
fp32 softmax and its gradient) dominate both the time and the memory of a training
step on small and mid-sized models. ``compute_sft_loss(mode="chunked")``:

1. runs the decoder only (``model.get_decoder()``) for a plain model; for a wrapped one
   (DDP, anything with ``.module``) it calls the *wrapper's* forward with
   ``logits_to_keep`` = an empty index tensor and ``output_hidden_states=True`` (the last
   entry is the final, normed hidden state), so DDP's gradient synchronisation is set up
   as usual, at the price of an all-zero lm_head weight gradient;
2. keeps only the positions whose *shifted* label is not -100 (prompt and padding
   positions never reach the lm_head);
3. applies the lm_head + fp32 cross-entropy in chunks of ``chunk_size`` tokens and,
   while a chunk's logits exist, also its gradients (softmax - one-hot, two matmuls);
   the logits are then freed. Peak memory holds one chunk of logits, not all of them,
   and nothing is recomputed in backward (``torch.utils.checkpoint`` per chunk would
   redo the lm_head matmul: 4 vocab-sized matmuls per token instead of 3, measured
   slower than the tutorial's full logits on CPU). Backward only scales the stored
   gradients by the incoming one, in place, so the loss can be backpropagated once
   (``retain_graph=True`` and a second backward raise).

Labels follow the Hugging Face convention (not yet shifted, -100 ignored). A global
shift is also right for padding-free batches from ``DataCollatorWithFlattening``: the
collator sets the first label of every packed example to -100, so the last token of one
example is never trained to predict the first token of the next.

Both modes call the model with ``use_cache=False``. In transformers 5.24 a forward with
the cache on (the config default) skips the packed-sequence detection from
``position_ids``, so padding-free examples attend across their boundaries (measured:
logits off by 0.26 on a tiny Qwen2). Gradient checkpointing hides this by turning the
cache off; without it, only ``use_cache=False`` (or ``config.use_cache=False``) keeps
packed examples apart.

Wrappers: plain models and ``DistributedDataParallel`` work (the forward runs through
the wrapper; the lm_head weight is then read from the unwrapped module, a full
replica). Under FSDP / DeepSpeed ZeRO-3 the lm_head weight may be sharded outside the
wrapper's forward: use ``mode="standard"`` there unless the lm_head stays unsharded
(FSDP2 keeps the root unit's parameters gathered between forward and backward).
Untested here: FSDP and ZeRO-3 need several processes and were not run.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sft_core.chat import IGNORE_INDEX
from sft_core.errors import ConfigError

# devices whose fp32 logits are computed as W @ hᵀ into a [vocab, chunk] buffer (see _ChunkedLinearCrossEntropy)
VOCAB_MAJOR_DEVICES = ("cpu",)
_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")


def compute_sft_loss(
    model: nn.Module,
    inputs: dict[str, Tensor],
    *,
    num_items_in_batch: int | Tensor | None = None,
    mode: Literal["chunked", "standard"] = "chunked",
    chunk_size: int = 1024,
) -> tuple[Tensor, dict[str, int]]:
    """Next-token cross-entropy over the supervised tokens of a batch.

    ``inputs`` holds ``input_ids`` and ``labels`` (unshifted, -100 = ignored) and
    optionally ``attention_mask`` / ``position_ids``; other keys are ignored. The loss
    is the summed token CE divided by ``num_items_in_batch`` when given (how the HF
    Trainer normalises across gradient accumulation), else by the number of supervised
    tokens. A batch with no supervised token gives a zero loss that still backpropagates.
    Returns ``(loss, {"num_tokens": ..., "num_correct": ...})``, where ``num_correct``
    counts tokens whose argmax prediction equals the label (token accuracy).
    """
    if "input_ids" not in inputs or "labels" not in inputs:
        raise ConfigError(f"compute_sft_loss needs 'input_ids' and 'labels' in inputs, got keys {sorted(inputs)}")
    if chunk_size < 1:
        raise ConfigError(f"compute_sft_loss: chunk_size must be >= 1, got {chunk_size}")
    labels = inputs["labels"]
    # target of position t is the label at t+1; the last position of each row has none
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    forward_inputs = _without_redundant_mask({k: inputs[k] for k in _FORWARD_KEYS if inputs.get(k) is not None})

    if mode == "standard":
        logits = model(**forward_inputs, use_cache=False).logits
        loss_sum, num_correct = _ce_sum_and_correct(logits.reshape(-1, logits.shape[-1]), targets)
        num_tokens = int((targets != IGNORE_INDEX).sum())
    elif mode == "chunked":
        hidden = _final_hidden_states(model, forward_inputs)
        positions = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
        num_tokens = int(positions.numel())
        loss_sum, num_correct = _chunked_ce(
            _unwrap(model).get_output_embeddings(),
            hidden.reshape(-1, hidden.shape[-1])[positions],
            targets[positions],
            chunk_size,
            anchor=hidden,
        )
    else:
        raise ConfigError(f"compute_sft_loss: mode must be 'chunked' or 'standard', got {mode!r}")

    if num_items_in_batch is None:
        num_items_in_batch = num_tokens
    if isinstance(num_items_in_batch, Tensor):  # HF Trainer passes a tensor, maybe on another device
        loss = loss_sum / num_items_in_batch.to(loss_sum.device).clamp(min=1)
    else:
        loss = loss_sum / max(num_items_in_batch, 1)  # an all-masked window gives 0, not NaN
    return loss, {"num_tokens": num_tokens, "num_correct": int(num_correct)}


def _without_redundant_mask(forward_inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop an attention mask that only marks right padding.

    In a causal model no real token attends to a later position, so right padding cannot
    change any real token's output, and padding positions carry no label. Without the
    mask, SDPA runs its causal kernel instead of building and applying a
    ``[batch, 1, seq, seq]`` mask (measured ~8% faster per training step on CPU, same
    loss bit for bit). Left padding, holes, or explicit position ids keep the mask.
    """
    mask = forward_inputs.get("attention_mask")
    if mask is None or "position_ids" in forward_inputs or mask.dim() != 2:
        return forward_inputs
    right_padded_only = bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())
    if not right_padded_only:
        return forward_inputs
    return {k: v for k, v in forward_inputs.items() if k != "attention_mask"}


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / FSDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _final_hidden_states(model: nn.Module, forward_inputs: dict[str, Tensor]) -> Tensor:
    """Last (normed) hidden states ``[batch, seq, hidden]`` without computing any logits."""
    inner = _unwrap(model)
    if model is inner or "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        # plain model: the decoder alone (the lm_head is applied chunk by chunk later)
        return inner.get_decoder()(**forward_inputs, use_cache=False).last_hidden_state
    # wrapped (DDP...): through the wrapper's forward, so that its hooks run; the lm_head
    # sees zero positions (costs one all-zero [vocab, hidden] gradient in backward)
    no_positions = torch.empty(0, dtype=torch.long, device=forward_inputs["input_ids"].device)
    out = model(**forward_inputs, logits_to_keep=no_positions, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def _ce_sum_and_correct(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed fp32 cross-entropy and the number of argmax hits (targets may hold -100)."""
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).sum()
    return loss_sum, correct


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed CE of ``hidden @ weight.T (+ bias)`` against ``targets``, one chunk at a time.

    The gradients are computed in the forward, chunk by chunk, while each chunk's logits
    are still there; backward only scales them by the incoming gradient. So no
    ``[tokens, vocab]`` tensor outlives its chunk and the logits are never recomputed
    (checkpointing would redo the lm_head matmul). Per chunk the logits are touched by
    four elementwise passes (max, subtract, exp, sum), all in place: with
    ``e = exp(logits - max)`` and ``s = e.sum(-1)``, d(CE)/d(logits) = (e - s*onehot)/s;
    the one-hot is folded into ``e`` at the target entries and the 1/s scaling is applied
    to the small ``[chunk, hidden]`` side of the two matmuls. Costs a fp32 ``[vocab, hidden]`` weight-gradient buffer
    between forward and backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # type: ignore[override]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        vocab = weight.shape[0]
        # one logits buffer for all chunks: on CPU a fresh [chunk, vocab] tensor per chunk
        # costs page faults (measured ~30% of the logits matmul's time)
        buffer = torch.empty(min(chunk_size, hidden.shape[0]) * vocab, device=hidden.device)
        plain_fp32 = weight.dtype == torch.float32 and bias is None
        # on CPU, W @ hᵀ into a [vocab, chunk] buffer is ~20% faster than h @ Wᵀ into [chunk, vocab]
        # (measured 134 vs 165 ms, chunk 256, hidden 256); `logits` is then its [chunk, vocab] view
        vocab_major = plain_fp32 and hidden.device.type in VOCAB_MAJOR_DEVICES
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, t = hidden[rows], targets[rows]
            n = h.shape[0]
            if vocab_major:
                logits = torch.mm(weight, h.t(), out=buffer[: vocab * n].view(vocab, n)).t()
            elif plain_fp32:
                logits = torch.mm(h, weight.t(), out=buffer[: n * vocab].view(n, vocab))
            else:
                logits = buffer[: n * vocab].view(n, vocab)
                logits.copy_(F.linear(h, weight, bias))
            # amax: a quarter of max()'s time on CPU (no indices); a token is correct when its
            # target's logit is the row maximum (argmax == target but for exact ties)
            top = logits.amax(dim=-1)
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            correct += (target_logit >= top).sum()
            e = logits.sub_(top[:, None]).exp_()  # exp(logits - max), in place
            total = e.sum(dim=-1)
            loss_sum += (top + total.log() - target_logit).sum()
            if not (want_h or want_w or want_b):
                continue
            # e/s - onehot = (e - s * onehot) / s: fold the one-hot into e, scale the small side
            e[torch.arange(t.shape[0], device=t.device), t] -= total
            inv = total.reciprocal()[:, None]
            e = e.to(weight.dtype)
            if want_h:
                grad_h[rows] = (torch.mm(e, weight) * inv).to(hidden.dtype)
            if want_w:
                h_scaled = (h.float() * inv).to(weight.dtype)
                if weight.dtype == torch.float32:
                    grad_w.addmm_(e.t(), h_scaled)
                else:  # bf16/fp16 matmul, accumulated in fp32
                    grad_w.add_(torch.mm(e.t(), h_scaled))
            if want_b:
                grad_b += (inv.t().to(e.dtype) @ e).squeeze(0).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(correct)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):  # type: ignore[override]
        if getattr(ctx, "scaled", False):
            raise RuntimeError("compute_sft_loss(mode='chunked'): the loss can be backpropagated only once")
        ctx.scaled = True
        grad_h, grad_w, grad_b = ctx.saved_tensors  # scaled in place: no second vocab-sized buffer
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None


def _chunked_ce(
    lm_head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int, *, anchor: Tensor
) -> tuple[Tensor, Tensor]:
    """lm_head + CE over ``hidden [n, H]`` in chunks of ``chunk_size`` rows."""
    # zero, yet part of the graph: a batch without supervised tokens still backpropagates
    zero = anchor.sum().float() * 0.0
    if hidden.shape[0] == 0:
        return zero, torch.zeros((), dtype=torch.long, device=hidden.device)
    loss_sum, correct = _ChunkedLinearCrossEntropy.apply(
        hidden, lm_head.weight, getattr(lm_head, "bias", None), targets, chunk_size
    )
    return loss_sum, correct


def per_row_losses(model: nn.Module, inputs: dict[str, Tensor], *, chunk_size: int = 1024) -> dict[str, Tensor]:
    """Summed cross-entropy, supervised tokens and argmax hits of each row of a padded batch, without gradients.

    The evaluation side of `compute_sft_loss`: the same shift and the same lm_head-on-supervised-tokens-only,
    chunk by chunk, but each token's loss is added to its own row (what a per-question interval needs).
    Returns ``{"loss_sum": [B] float32, "tokens": [B] long, "correct": [B] long}``.
    """
    labels = inputs["labels"]
    rows_in_batch, width = labels.shape
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    forward_inputs = _without_redundant_mask({k: inputs[k] for k in _FORWARD_KEYS if inputs.get(k) is not None})
    with torch.no_grad():
        hidden = _final_hidden_states(model, forward_inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        positions = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
        row_of = positions // width
        head = _unwrap(model).get_output_embeddings()
        loss_sum = torch.zeros(rows_in_batch, dtype=torch.float32, device=hidden.device)
        correct = torch.zeros(rows_in_batch, dtype=torch.long, device=hidden.device)
        for start in range(0, positions.numel(), chunk_size):
            at, rows = positions[start : start + chunk_size], row_of[start : start + chunk_size]
            logits = head(hidden[at]).float()
            t = targets[at]
            loss_sum.index_add_(0, rows, F.cross_entropy(logits, t, reduction="none"))
            correct.index_add_(0, rows, (logits.argmax(-1) == t).long())
        tokens = torch.bincount(row_of, minlength=rows_in_batch)
    return {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}
