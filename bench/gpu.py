"""GPU training throughput at the real job's shape: the tutorial's recipe (A) against ours (B).

Model: the Qwen2.5-1.5B architecture (``../shared/qwen2.5-tokenizer/config.json`` when
present, else the numbers below) with random weights in bf16 on one CUDA device: no
download, no network. Rows: MAX_LENGTH 2048 and the real row-length distribution (the
shared real rows tokenized with the real tokenizer when both are on this machine, else
the percentiles stored below, measured that way on 121 real rows); token ids are random
(their values do not change the cost). Every variant trains on the same rows, starts from
the same weights, and uses the same optimizer (AdamW, fused on CUDA, grad-norm clip 1.0).

A       the tutorial: batch size 1, GA 4, padded collator, labels ending on pad,
        gradient checkpointing, the model's own loss (full logits on every position).
B       ours: the 4 rows of a step flattened padding-free (DataCollatorWithFlattening) into
        one micro-batch, ``compute_sft_loss(mode="chunked")``, no checkpointing.
B-ckpt  B with gradient checkpointing (what to use if B does not fit).
B-cfg   configs/qwen2.5-1.5b-medical.yaml as written: bs 1, GA 4, chunked CE, checkpointing.
B-16    16 rows flattened per step, no checkpointing (a bigger effective batch: reference only).

Reported per variant: supervised tokens/s, MFU = 6 x params x supervised tokens/s over a
measured bf16 matmul peak (``bench/flops.py``; attention's seq^2 term not counted), peak
memory (``torch.cuda.max_memory_allocated``, weights + grads + AdamW state + activations),
and the projected time of the full job: 2 epochs x 1,800 train rows (2,000 x 0.9) x the
mean supervised tokens per row, at the measured tokens/s (evaluation and saving excluded).
A variant that runs out of memory is reported as OOM and the others still run.

    python bench/gpu.py                          # one CUDA GPU; stops new variants after 420 s
    python bench/gpu.py --variants A,B --steps 20
    python bench/gpu.py --dry-run                # CPU: hidden 64, 2 layers, vocab 8192, max_len 256, 2 steps

Writes ``$OUT/gpu_bench.json`` when ``OUT`` is set (or ``--json PATH``). Ends with one line:
``gpu train speedup N.NNx`` (the fastest 4-rows-per-step B variant over A, in tokens/s).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
ARCH_FILE = SHARED / "qwen2.5-tokenizer" / "config.json"
TOKENIZER_DIR = SHARED / "qwen2.5-tokenizer"
REAL_ROWS = SHARED / "data" / "delicate_medical_r1_sample.jsonl"
SYSTEM = "你是一个医学专家,你需要根据用户的问题,给出带有思考的回答。"  # the tutorial's system prompt

QWEN25_1_5B: dict[str, Any] = {
    "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 32768,
}
# the dry run checks code paths, not speed: a small vocabulary keeps it to seconds on 2 cores
DRY_RUN_ARCH = {**QWEN25_1_5B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 8192}
MAX_LENGTH = 2048
QWEN_PAD, QWEN_IM_END = 151643, 151645  # <|endoftext|> (the tutorial's pad), <|im_end|>
# The real job: 2,000 rows, 90% train, 2 epochs.
JOB_ROWS, JOB_TRAIN_FRACTION, JOB_EPOCHS = 2000, 0.9, 2

# Tokens per row at percentiles 0, 5, ..., 100: 121 real rows of krisfu/delicate_medical_r1_data
# in the tutorial's format, Qwen2.5 tokenizer (prompt = system + user + assistant header;
# completion = <think>..</think> answer + the closing pad). Means: prompt 64.7, completion 723.7.
PROMPT_TOKENS = (36, 44, 48, 50, 52, 54, 56, 59, 60, 62, 64, 65, 67, 69, 71, 74, 78, 81, 84, 87, 110)
COMPLETION_TOKENS = (321, 486, 503, 543, 564, 596, 617, 628, 658, 695, 710, 735, 765, 774, 807, 838, 863, 900,
                     966, 1029, 1318)


@dataclass(frozen=True)
class Variant:
    """How the rows of one optimizer step are batched, and which loss path runs."""

    rows_per_step: int
    rows_per_micro: int  # rows_per_step / rows_per_micro = gradient accumulation steps
    batching: str  # "pad": right-padded (DataCollatorForSeq2Seq-like); "flat": DataCollatorWithFlattening
    loss: str  # "hf": model(**batch).loss; "chunked": compute_sft_loss(mode="chunked")
    checkpointing: bool
    end_on_im_end: bool  # the last label is <|im_end|> (ours) instead of pad (tutorial)
    about: str


VARIANTS = {
    "A": Variant(4, 1, "pad", "hf", True, False, "tutorial: bs1 GA4, padded, HF loss, grad ckpt"),
    "B": Variant(4, 4, "flat", "chunked", False, True, "ours: 4 rows padding-free, chunked CE"),
    "B-ckpt": Variant(4, 4, "flat", "chunked", True, True, "B + grad ckpt"),
    "B-cfg": Variant(4, 1, "flat", "chunked", True, True, "1.5b yaml: bs1 GA4, chunked CE, grad ckpt"),
    "B-16": Variant(16, 16, "flat", "chunked", False, True, "16 rows padding-free (bigger batch; reference)"),
}
DEFAULT_VARIANTS = "A,B,B-ckpt,B-cfg,B-16"


# ---------------------------------------------------------------- shape and rows


def architecture(dry_run: bool) -> tuple[dict[str, Any], str]:
    """Qwen2Config keyword arguments and where they came from."""
    if dry_run:
        return dict(DRY_RUN_ARCH), "dry-run tiny shape"
    if ARCH_FILE.exists():
        found = json.loads(ARCH_FILE.read_text(encoding="utf-8"))
        return {k: found.get(k, v) for k, v in QWEN25_1_5B.items()}, str(ARCH_FILE)
    return dict(QWEN25_1_5B), "built-in Qwen2.5-1.5B numbers"


def quantile(table: tuple[int, ...], u: float) -> int:
    """Inverse CDF from evenly spaced percentiles, linearly interpolated."""
    pos = u * (len(table) - 1)
    i = min(int(pos), len(table) - 2)
    return round(table[i] + (table[i + 1] - table[i]) * (pos - i))


def real_lengths() -> list[tuple[int, int]]:
    """(prompt, completion) tokens of the shared real rows, tutorial format; [] when unavailable."""
    if not (REAL_ROWS.exists() and (TOKENIZER_DIR / "tokenizer.json").exists()):
        return []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    out = []
    for line in REAL_ROWS.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{row['question']}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        completion = f"<think>{row['think']}</think> \n {row['answer']}"
        out.append((len(tok(prompt, add_special_tokens=False)["input_ids"]),
                    len(tok(completion, add_special_tokens=False)["input_ids"]) + 1))  # + the closing pad
    return out


def row_lengths(n: int, source: str, seed: int, scale: float) -> tuple[list[tuple[int, int]], str]:
    """n (prompt, completion) pairs, untruncated, drawn from the real rows or the stored percentiles."""
    rng = random.Random(seed)
    real = real_lengths() if source in ("auto", "real") else []
    if source == "real" and not real:
        raise SystemExit(f"--lengths real: needs {REAL_ROWS} and {TOKENIZER_DIR}/tokenizer.json")
    if real:
        pairs, desc = [rng.choice(real) for _ in range(n)], f"{len(real)} real rows, Qwen2.5 tokenizer"
    else:
        pairs = [(quantile(PROMPT_TOKENS, rng.random()), quantile(COMPLETION_TOKENS, rng.random())) for _ in range(n)]
        desc = "stored percentiles of 121 real rows"
    if scale != 1.0:
        pairs = [(max(2, round(p * scale)), max(2, round(c * scale))) for p, c in pairs]
        desc += f", lengths x{scale:g}"
    return pairs, desc


def make_examples(pairs: list[tuple[int, int]], max_length: int, vocab: int, end_id: int, seed: int) -> list[dict]:
    """Token rows like the tutorial's process_func: prompt (-100 labels) + completion ending on end_id, truncated."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ceiling = min(QWEN_PAD, vocab - 3)  # ordinary tokens only
    out = []
    for p, c in pairs:
        ids = torch.randint(0, ceiling, (p + c,), generator=g).tolist()
        ids[-1] = end_id
        labels = [-100] * p + ids[p:]
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return out


def supervised(labels: list[int]) -> int:
    """Trained tokens: shifted labels that are not -100."""
    return sum(1 for t in labels[1:] if t != -100)


def pad_collate(rows: list[dict], pad_id: int) -> dict:
    """DataCollatorForSeq2Seq(padding=True) without a tokenizer: right padding, labels -100."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = [r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
    labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


# ---------------------------------------------------------------- model and one variant


def build_model(arch: dict[str, Any], dtype, device: str, attn: str, pad_id: int, seed: int = 0):
    """Random-weight Qwen2ForCausalLM, created directly on the device in `dtype`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**arch, pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id,
                         use_cache=False, attn_implementation=attn)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model  # parameters already in `dtype`; buffers such as RoPE inv_freq stay fp32


def enable_checkpointing(model, kwargs: dict | None) -> None:
    """Gradient (activation) checkpointing under its transformers >= 5.2x name, else the older one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def micro_batches(v: Variant, rows: list[dict], pad_id: int) -> list[dict]:
    from transformers import DataCollatorWithFlattening

    groups = [rows[i : i + v.rows_per_micro] for i in range(0, len(rows), v.rows_per_micro)]
    if v.batching == "pad":
        return [pad_collate(g, pad_id) for g in groups]
    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return [dict(flatten([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in g])) for g in groups]


def loss_of(model, v: Variant, batch: dict, n_items: int):
    from sft_core.loss import compute_sft_loss

    if v.loss == "hf":
        return model(**batch, num_items_in_batch=n_items).loss
    return compute_sft_loss(model, batch, num_items_in_batch=n_items, mode="chunked")[0]


def run_variant(name: str, args: argparse.Namespace, arch: dict, rows_a: list[dict], rows_b: list[dict],
                pad_id: int) -> dict:
    """Build a fresh model, train warmup + measured steps, return the figures."""
    import torch

    from bench.flops import trainable_params

    v = VARIANTS[name]
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build_model(arch, args.dtype, args.device, args.attn, pad_id)
    if v.checkpointing:
        if v.loss == "hf":  # as the tutorial (Trainer defaults + enable_input_require_grads)
            enable_checkpointing(model, None)
            model.enable_input_require_grads()
        else:  # as sft_core/train.py
            enable_checkpointing(model, {"use_reentrant": False})
    model.train()
    params = trainable_params(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=cuda)
    rows = rows_b if v.end_on_im_end else rows_a

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times, tokens, losses = [], [], []
    for step in range(args.warmup + args.steps):
        group = [rows[(step * v.rows_per_step + i) % len(rows)] for i in range(v.rows_per_step)]
        n_items = sum(supervised(r["labels"]) for r in group)
        sync()
        start = time.perf_counter()
        total = torch.zeros((), device=args.device)
        for batch in micro_batches(v, group, pad_id):
            batch = {k: t.to(args.device, non_blocking=True) for k, t in batch.items()}
            loss = loss_of(model, v, batch, n_items)
            loss.backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n_items)
        losses.append(float(total))
    seconds = sum(times)
    return {
        "variant": name,
        "about": v.about,
        "rows_per_step": v.rows_per_step,
        "grad_accum": v.rows_per_step // v.rows_per_micro,
        "checkpointing": v.checkpointing,
        "tok_s": sum(tokens) / seconds,
        "step_s_median": statistics.median(times),
        "measured_steps": len(times),
        "measured_supervised_tokens": sum(tokens),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "params": params,
    }


def loss_agreement(args: argparse.Namespace, arch: dict, rows_a: list[dict], pad_id: int) -> dict:
    """The tutorial's loss (rows one by one) and ours (4 rows packed, chunked) on the same ids and weights."""
    import torch

    model = build_model(arch, args.dtype, args.device, args.attn, pad_id)
    group = rows_a[:4]
    n_items = sum(supervised(r["labels"]) for r in group)
    with torch.no_grad():
        ref = sum(float(loss_of(model, VARIANTS["A"], {k: t.to(args.device) for k, t in b.items()}, n_items))
                  for b in micro_batches(VARIANTS["A"], group, pad_id))
        ours = sum(float(loss_of(model, VARIANTS["B"], {k: t.to(args.device) for k, t in b.items()}, n_items))
                   for b in micro_batches(VARIANTS["B"], group, pad_id))
    tolerance = 1e-4 if args.dtype == torch.float32 else 1e-2
    rel = abs(ref - ours) / max(abs(ref), 1e-9)
    return {"tutorial_loss": ref, "ours_loss": ours, "rel_diff": rel, "tolerance": tolerance, "agree": rel <= tolerance}


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


# ---------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated from {','.join(VARIANTS)}; A required")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--lengths", choices=("auto", "real", "stored"), default="auto",
                   help="row lengths from the shared real rows, or the stored percentiles")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, ...)")
    p.add_argument("--pool", type=int, default=JOB_ROWS, help="rows drawn for the length distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining variants after this many seconds")
    p.add_argument("--json", help="also write the results here (default: $OUT/gpu_bench.json when OUT is set)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shape on CPU (hidden 64, 2 layers, max_len 256, 1 warmup + 2 steps): checks the code paths")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "A" not in names:
        p.error(f"--variants: need A, known {', '.join(VARIANTS)}; unknown {unknown}")
    args.names = names
    if args.dry_run:
        args.max_length, args.steps, args.warmup = min(args.max_length, 256), min(args.steps, 2), min(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    import torch

    if args.dry_run:
        args.device, args.dtype = "cpu", torch.float32
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False). It measures the real "
              "job shape on one CUDA GPU; run it on a GPU machine, or add --dry-run for a tiny CPU check of the "
              "code paths.", file=sys.stderr)
        return 2
    else:
        args.device, args.dtype = "cuda", torch.bfloat16

    from bench.flops import measure_matmul_peak, mfu

    arch, arch_source = architecture(args.dry_run)
    vocab = arch["vocab_size"]
    pad_id, im_end_id = (QWEN_PAD, QWEN_IM_END) if vocab > QWEN_IM_END else (vocab - 3, vocab - 1)
    pairs, lengths_source = row_lengths(args.pool, args.lengths, args.seed, args.max_length / MAX_LENGTH)
    rows_a = make_examples(pairs, args.max_length, vocab, pad_id, args.seed)
    rows_b = make_examples(pairs, args.max_length, vocab, im_end_id, args.seed)  # same ids, ends on <|im_end|>
    sup_per_row = statistics.mean(supervised(r["labels"]) for r in rows_a)
    all_per_row = statistics.mean(len(r["input_ids"]) for r in rows_a)
    truncated = sum(1 for p, c in pairs if p + c > args.max_length)
    job_tokens = JOB_EPOCHS * round(JOB_ROWS * JOB_TRAIN_FRACTION) * sup_per_row

    cuda = args.device == "cuda"
    peak = measure_matmul_peak(args.dtype, args.device, size=8192 if cuda else 512, repeats=10 if cuda else 3)
    check = loss_agreement(args, arch, rows_a, pad_id)
    free_memory(cuda)

    results: list[dict] = []
    for name in args.names:
        if time.perf_counter() - started > args.budget_s:
            results.append({"variant": name, "skipped": f"time budget {args.budget_s:.0f} s spent"})
            continue
        try:
            results.append(run_variant(name, args, arch, rows_a, rows_b, pad_id))
        except torch.OutOfMemoryError as exc:
            results.append({"variant": name, "oom": True, "error": str(exc).splitlines()[0][:200]})
        free_memory(cuda)
        r = results[-1]
        print(f"  {name}: " + (f"{r['tok_s']:.0f} tok/s" if "tok_s" in r else r.get("skipped", "OOM")),
              file=sys.stderr, flush=True)

    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    ran = {r["variant"]: r for r in results if "tok_s" in r}
    params = next(iter(ran.values()))["params"] if ran else 0
    print(f"device: {device_name}; torch {torch.__version__}, transformers {_transformers_version()}, "
          f"attn {args.attn}, {str(args.dtype).removeprefix('torch.')}")
    print(f"model: Qwen2 hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, "
          f"{arch['num_attention_heads']}/{arch['num_key_value_heads']} heads, vocab {vocab:,} ({arch_source}); "
          f"{params / 1e9:.3f}B trainable params, random weights")
    print(f"rows: {lengths_source}; max_length {args.max_length}; mean {all_per_row:.0f} tokens/row, "
          f"{sup_per_row:.0f} supervised; {truncated}/{len(pairs)} truncated")
    print(f"{args.warmup} warmup + {args.steps} measured optimizer steps per variant; matmul peak "
          f"{_flops(peak)} ({str(args.dtype).removeprefix('torch.')}); MFU = 6 x params x supervised tok/s / peak")
    print(f"job: {JOB_EPOCHS} epochs x {round(JOB_ROWS * JOB_TRAIN_FRACTION)} rows x {sup_per_row:.0f} "
          f"supervised tokens = {job_tokens / 1e6:.2f}M tokens")
    header = (f"{'variant':<8} {'rows/st':>7} {'GA':>3} {'ckpt':>4} {'sup tok/s':>10} {'step ms':>8} {'MFU':>6} "
              f"{'peak GiB':>8} {'job min':>8}  about")
    print(header)
    print("-" * len(header))
    for r in results:
        name = r["variant"]
        if "tok_s" not in r:
            print(f"{name:<8} {'OOM' if r.get('oom') else 'skipped':>7}  {r.get('error') or r.get('skipped', '')}")
            continue
        mem = f"{r['peak_mem_gib']:8.1f}" if r["peak_mem_gib"] is not None else f"{'-':>8}"
        r["mfu"] = mfu(r["params"], r["tok_s"], 1.0, peak)
        r["job_minutes"] = job_tokens / r["tok_s"] / 60
        print(f"{name:<8} {r['rows_per_step']:>7} {r['grad_accum']:>3} {'on' if r['checkpointing'] else 'off':>4} "
              f"{r['tok_s']:>10.0f} {r['step_s_median'] * 1e3:>8.0f} {r['mfu']:>6.1%} {mem} "
              f"{r['job_minutes']:>8.1f}  {r['about']}")
    print(f"loss on the same ids and weights: tutorial path {check['tutorial_loss']:.5f}, ours (packed, chunked) "
          f"{check['ours_loss']:.5f} -> {'agree' if check['agree'] else 'DISAGREE'} "
          f"(rel diff {check['rel_diff']:.1e}, tolerance {check['tolerance']:.0e})")

    ours = [n for n in ran if n != "A" and VARIANTS[n].rows_per_step == VARIANTS["A"].rows_per_step]
    best = max(ours, key=lambda n: ran[n]["tok_s"]) if ours else None
    speedup = ran[best]["tok_s"] / ran["A"]["tok_s"] if best and "A" in ran else None
    summary = {
        "device": device_name, "torch": torch.__version__, "transformers": _transformers_version(),
        "dry_run": args.dry_run, "attn": args.attn, "dtype": str(args.dtype), "arch": arch, "arch_source": arch_source,
        "lengths_source": lengths_source, "max_length": args.max_length, "mean_tokens_per_row": all_per_row,
        "mean_supervised_per_row": sup_per_row, "job_supervised_tokens": job_tokens, "matmul_peak_flops": peak,
        "warmup": args.warmup, "steps": args.steps, "loss_check": check, "variants": results,
        "ours": best, "speedup": speedup, "seconds": time.perf_counter() - started,
    }
    _write_json(summary, args.json)
    if speedup is None:
        print("error: A or every 4-rows-per-step B variant did not run (OOM or skipped): no speedup", file=sys.stderr)
        return 1
    print(f"ours = {best} (the fastest 4-rows-per-step B variant); total {summary['seconds']:.0f} s")
    print(f"gpu train speedup {speedup:.2f}x")
    return 0 if check["agree"] else 1


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _write_json(summary: dict, path: str | None) -> None:
    target = Path(path) if path else (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    if target is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(f"results: {target}")


if __name__ == "__main__":
    sys.exit(main())
