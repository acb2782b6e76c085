"""Micro-benchmark of the loss and batching alone: the tutorial's step (A) against our loss path (B).

Not the product's training stage and not a peer comparison: both sides are hand-written
optimizer loops inside this script, so that the loss path (chunked cross-entropy over the
supervised tokens), the batching and the process memory settings can be varied one at a time.
For the product's own training stage against TRL's SFTTrainer and the tutorial's Trainer,
run bench/peers.py.

A  = the tutorial re-implemented: f-string prompt, labels = response + pad, one row per
     micro-batch (DataCollatorForSeq2Seq padding=True), gradient accumulation 4,
     gradient checkpointing, HF's own loss (full logits on every position).
B  = ours, as `sft_core.train` trains on CPU: the same token ids ending on <|im_end|>
     instead of pad (same token count), the 4 rows of a step in one right-padded batch
     (train.padding_free=auto is padded on CPU), compute_sft_loss(mode="chunked") (logits
     only at supervised positions, train.loss_chunk_size=auto = 256 at a time on CPU,
     gradients computed in the same pass), gradient checkpointing on (as the real preset),
     and the product's process memory settings: allocations >= 4 MiB from mmap, returned
     on free (sft_core.train.return_freed_memory_to_os), and tensors >= 2 MB on huge pages
     (THP_MEM_ALLOC_ENABLE=1, set by the entry points), which keep the fresh pages cheap.
     A-alloc / B-heap swap those settings, to show how much of the gap is the process's
     memory settings and how much the training path.
     Measured alternatives (--variants): padding-free rows are slower on CPU (sdpa
     with a packed mask cannot skip the masked blocks: 4x the attention work of
     padded rows), B without checkpointing is as fast but larger, bs1 GA4 is leaner
     but pays the vocab-sized weight-gradient passes 4 times per step, B-sparse (a sparse
     input-embedding gradient) is ~7% faster but no smaller: autograd adds the sparse
     gradient to the tied lm_head's dense one out of place, a vocab-sized copy.
Both: AdamW (fused, lr 1e-4, no decay), linear decay, grad-norm clip 1.0 (the Trainer
defaults), 4 rows and the same supervised tokens per optimizer step, fp32 on CPU, a
Qwen2-shaped model with the real 151,936-entry vocabulary. Each variant runs in its own
subprocess so that its peak RSS is its own; runs are interleaved and the median of
--repeats is reported. The first optimizer step is a warm-up and is not timed.

    timeout 1200 .venv/bin/python bench/loss_micro.py            # full (minutes)
    .venv/bin/python bench/loss_micro.py --tiny                  # smoke (about a minute)
    .venv/bin/python bench/loss_micro.py --variants A,B,B-nockpt,B-flat,B-bs1

Ends with one line: ``loss micro speedup N.NNx`` (B tok/s over A tok/s, wall clock).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import load_rows, tokenize_like_tutorial  # noqa: E402

QWEN_VOCAB = 151936
ROWS_PER_STEP = 4


@dataclass(frozen=True)
class Variant:
    """How one optimizer step of 4 rows is batched and what loss path it uses."""

    batching: str  # "bs1": 4 micro-batches of 1 row (GA 4); "pad4": one padded batch; "flat4": padding-free
    loss: str  # "hf": model(**batch).loss; "chunked" / "standard": compute_sft_loss(mode=...)
    checkpointing: bool
    end_on_im_end: bool
    about: str
    sparse_embedding: bool = False
    our_allocation: bool = True  # the product's CPU process: freed blocks >= 4 MiB go back to the OS, huge pages
    mmap_threshold_mib: float | None = None  # None: the product's default (sft_core.train.return_freed_memory_to_os)


VARIANTS = {
    "A": Variant("bs1", "hf", True, False, "tutorial: bs1 GA4, HF loss, grad ckpt", our_allocation=False),
    "A-alloc": Variant("bs1", "hf", True, False, "tutorial, in our process's memory settings"),
    "B": Variant("pad4", "chunked", True, True, "ours: 4 rows padded, chunked CE, grad ckpt"),
    "B-heap": Variant("pad4", "chunked", True, True, "as B, default memory settings (glibc heap, 4 KiB pages)",
                      our_allocation=False),
    "B-1m": Variant("pad4", "chunked", True, True, "as B, mmap threshold 1 MiB", mmap_threshold_mib=1),
    "B-8m": Variant("pad4", "chunked", True, True, "as B, mmap threshold 8 MiB", mmap_threshold_mib=8),
    "B-sparse": Variant("pad4", "chunked", True, True, "as B, sparse input-embedding gradient", sparse_embedding=True),
    "B-nockpt": Variant("pad4", "chunked", False, True, "4 rows padded, chunked CE"),
    "B-flat": Variant("flat4", "chunked", True, True, "4 rows padding-free, chunked CE, grad ckpt"),
    "B-flat-nockpt": Variant("flat4", "chunked", False, True, "4 rows padding-free, chunked CE"),
    "B-bs1": Variant("bs1", "chunked", False, True, "bs1 GA4, chunked CE"),
    "flat-std": Variant("flat4", "standard", False, True, "4 rows padding-free, full logits"),
}


# ---------------------------------------------------------------- data and model (child side)


def load_tokenizer():
    from sft_core.tiny_model import build_bpe_tokenizer, find_qwen_tokenizer_dir
    from transformers import AutoTokenizer

    qwen_dir = find_qwen_tokenizer_dir()
    if qwen_dir is not None:
        return AutoTokenizer.from_pretrained(str(qwen_dir)), "qwen2.5"
    return build_bpe_tokenizer(2048), "bpe"


def end_on_im_end(examples: list[dict], pad_id: int, im_end_id: int) -> list[dict]:
    """Our rows: the same ids, but the closing pad becomes <|im_end|> (token counts unchanged)."""
    out = []
    for ex in examples:
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        if ids[-1] == pad_id and labels[-1] == pad_id:
            ids[-1] = labels[-1] = im_end_id
        out.append({"input_ids": ids, "labels": labels})
    return out


def build_model(hidden: int, layers: int, vocab: int, pad_id: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(1, hidden // 64)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=max(64, hidden * 35 // 6 // 64 * 64),  # Qwen2.5-1.5B's 8960/1536 ratio
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        pad_token_id=pad_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def supervised(labels: list[int]) -> int:
    """Tokens that are trained: shifted labels != -100."""
    return sum(1 for t in labels[1:] if t != -100)


# ---------------------------------------------------------------- one variant (child process)


def run_variant(name: str, args: argparse.Namespace) -> dict:
    v = VARIANTS[name]
    # torch reads this at its first allocation: the product's entry points (flows/finetune.py, sft_core/launch.py)
    # set it before torch is imported; the tutorial's process runs with torch's default
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if v.our_allocation else "0"
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from bench.flops import measure_matmul_peak
    from sft_core.loss import compute_sft_loss

    from sft_core.train import resolve_loss_chunk_size, return_freed_memory_to_os

    if v.our_allocation:  # as sft_core.train.run_training does on CPU, before the model exists
        if v.mmap_threshold_mib is None:
            return_freed_memory_to_os()
        else:
            return_freed_memory_to_os(int(v.mmap_threshold_mib * 2**20))
    chunk_size = resolve_loss_chunk_size(args.chunk_size, "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, tok_kind = load_tokenizer()
    rows, source = load_rows(args.rows)
    a_examples = tokenize_like_tutorial(rows, tokenizer, args.max_length)
    vocab = args.vocab or (QWEN_VOCAB if tok_kind == "qwen2.5" else max(len(tokenizer), QWEN_VOCAB))
    pad_id = tokenizer.pad_token_id
    im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = end_on_im_end(a_examples, pad_id, im_end_id) if v.end_on_im_end else a_examples

    model = build_model(args.hidden, args.layers, vocab, pad_id)
    model.config.use_cache = False
    if v.sparse_embedding:
        model.get_input_embeddings().sparse = True
    if v.checkpointing:  # what TrainingArguments(gradient_checkpointing=True) turns on
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.enable_input_require_grads()  # as the tutorial does
    model.train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)  # Trainer's default
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / args.steps))
    seq2seq = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)
    flatten = DataCollatorWithFlattening(return_tensors="pt")

    def step_rows(step: int, exs: list[dict]) -> list[dict]:
        return [exs[(step * ROWS_PER_STEP + i) % len(exs)] for i in range(ROWS_PER_STEP)]

    def micro_batches(group: list[dict]) -> list[dict]:
        with_mask = [{**ex, "attention_mask": [1] * len(ex["input_ids"])} for ex in group]
        if v.batching == "bs1":
            return [dict(seq2seq([ex])) for ex in with_mask]
        if v.batching == "pad4":
            return [dict(seq2seq(with_mask))]
        return [dict(flatten(group))]

    def loss_of(batch: dict, n_items: int):
        if v.loss == "hf":
            return model(**batch, num_items_in_batch=n_items).loss
        return compute_sft_loss(model, batch, num_items_in_batch=n_items, mode=v.loss, chunk_size=chunk_size)[0]

    check_loss = None
    if v.end_on_im_end:  # B's loss path on A's exact ids, at the same initial weights
        group = step_rows(0, a_examples)
        with torch.no_grad():
            check_loss = sum(
                float(loss_of(b, sum(supervised(ex["labels"]) for ex in group))) for b in micro_batches(group)
            )

    peak_flops = measure_matmul_peak(torch.float32, "cpu")  # here, under the same load as the run
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses, times, cpu_times, tokens = [], [], [], []
    for step in range(args.steps):
        group = step_rows(step, examples)
        n_items = sum(supervised(ex["labels"]) for ex in group)
        start, cpu_start = time.perf_counter(), time.process_time()
        total = 0.0
        for batch in micro_batches(group):
            loss = loss_of(batch, n_items)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(total)
        tokens.append(n_items)
    timed = slice(1, None) if args.steps > 1 else slice(None)
    seconds, sup_tokens = sum(times[timed]), sum(tokens[timed])
    return {
        "variant": name,
        "tok_s": sup_tokens / seconds,
        "seconds": seconds,
        # CPU seconds per thread: less sensitive than wall time to other jobs on the machine
        "tok_cpu_s": sup_tokens / (sum(cpu_times[timed]) / torch.get_num_threads()),
        "timed_tokens": sup_tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_training_mb": rss_before,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "check_loss_on_a_ids": check_loss,
        "params": params,
        "peak_flops": peak_flops,
        "vocab": vocab,
        "tokenizer": tok_kind,
        "rows_source": source,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- driver (parent process)


def variant_result(name: str, argv: list[str]) -> dict:
    from bench.common import child_result

    return child_result(__file__, [*argv, "--variant", name], f"variant {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of 4 rows (the first is a warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=0,
                   help="tokens per loss chunk (0: the project's CPU default, sft_core.train.resolve_loss_chunk_size)")
    p.add_argument("--vocab", type=int, default=0, help="model vocab size (0: 151,936)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    p.add_argument("--variants", default="A,B", help=f"comma-separated, from {','.join(VARIANTS)}; A and B required")
    p.add_argument("--tiny", action="store_true", help="smoke run: hidden 32, 1 layer, 8 rows, 2 steps, 1 repeat")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.rows, args.steps, args.repeats = 32, 1, 8, 2, 1
        args.max_length = min(args.max_length, 256)

    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args)), flush=True)
        return

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not {"A", "B"} <= set(names):
        raise SystemExit(f"--variants: need A and B, known {sorted(VARIANTS)}; got unknown {unknown}")
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("hidden", "layers", "rows", "steps", "max_length", "chunk_size", "vocab", "threads")]

    from bench.flops import mfu

    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:  # interleaved, so background load hits every variant alike
            runs[n].append(variant_result(n, argv))
            print(f"  repeat {r + 1}/{args.repeats} {n}: " + json.dumps(runs[n][-1]), file=sys.stderr, flush=True)

    first = runs["A"][0]
    peak = statistics.median(x["peak_flops"] for n in names for x in runs[n])
    print(f"model: Qwen2-shaped hidden {args.hidden}, {args.layers} layers, vocab {first['vocab']:,}, "
          f"{first['params'] / 1e6:.1f}M trainable params (tied embedding/lm_head counted once); fp32 CPU, "
          f"{first['threads']} threads, load avg {os.getloadavg()[0]:.1f}")
    print(f"data: {args.rows} rows from {first['rows_source']} ({first['tokenizer']} tokenizer), max length "
          f"{args.max_length}, {args.steps} steps x 4 rows (first untimed), median of {args.repeats}")
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^2 matmul, median over the runs)")
    print("MFU = 6 x all trainable params (lm_head/embedding included) x supervised tokens / s / peak;"
          " tok/cpu-s = supervised tokens per CPU-second per thread (robust to other jobs);"
          " train MB = peak RSS - peak RSS before the first step (runtime, tokenizer, model)")
    header = (f"{'variant':<13} {'sup tok/s':>9} {'tok/cpu-s':>9} {'peak RSS MB':>11} {'train MB':>8} "
              f"{'GFLOP/s':>8} {'MFU':>6} {'final loss':>10}  about")
    print(header)
    print("-" * len(header))
    medians = {}
    for n in names:
        tok_s = statistics.median(x["tok_s"] for x in runs[n])
        rss = statistics.median(x["peak_rss_mb"] for x in runs[n])
        tok_cpu_s = statistics.median(x["tok_cpu_s"] for x in runs[n])
        train_mb = statistics.median(x["peak_rss_mb"] - x["rss_before_training_mb"] for x in runs[n])
        medians[n] = (tok_s, rss, tok_cpu_s, train_mb)
        gflops = 6 * first["params"] * tok_s / 1e9
        util = mfu(first["params"], tok_s, 1.0, peak)
        print(f"{n:<13} {tok_s:>9.1f} {tok_cpu_s:>9.1f} {rss:>11.0f} {train_mb:>8.0f} {gflops:>8.1f} {util:>6.1%} "
              f"{runs[n][0]['final_loss']:>10.4f}  {VARIANTS[n].about}")

    a_loss, b_check = runs["A"][0]["first_loss"], runs["B"][0]["check_loss_on_a_ids"]
    agree = abs(a_loss - b_check) <= 1e-4 * max(1.0, abs(a_loss))
    print(f"first-step loss on A's ids: A (HF loss) {a_loss:.6f}, B (compute_sft_loss) {b_check:.6f} -> "
          f"{'agree' if agree else 'DISAGREE'}")
    print(f"B/A: peak RSS {medians['B'][1] / medians['A'][1]:.2f}x, RSS added by training "
          f"{medians['B'][3] / medians['A'][3]:.2f}x, tok per CPU-second {medians['B'][2] / medians['A'][2]:.2f}x")
    print(f"loss micro speedup {medians['B'][0] / medians['A'][0]:.2f}x")
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
