"""Generation throughput: the tutorial's `predict()` (A) against `generate_answers` (B).

A  = the tutorial: one question at a time, chat template -> `tokenizer([text])` ->
     `model.generate(input_ids, max_new_tokens=N)` -> batch_decode.
B  = ours: `sft_core.generate.generate_answers`, prompts sorted by length into
     left-padded batches of --batch-size, greedy, parsed into think/answer.
Both: the same questions, the same random-weight Qwen2-shaped model (real 151,936-entry
Qwen vocabulary when the tokenizer is on this machine), fp32 on CPU, and exactly
--new-tokens new tokens per question: the output-embedding rows of the stop tokens are
zeroed, so their logit is exactly 0 and greedy decoding, whose row maximum over 151,936
random logits is positive, never picks one (no row stops early; tok/s compare like for
like). A `min_new_tokens` logits processor would do the same at the price of a
vocabulary-wide `where` per step, 8% of a batched step here. Variants run
interleaved in one process after a short untimed warm-up; the median of --repeats is
reported.

    timeout 1200 .venv/bin/python bench/generate.py                 # full (minutes)
    .venv/bin/python bench/generate.py --tiny                       # smoke (seconds)
    .venv/bin/python bench/generate.py --variants A,B,B-bs1,B-bs4   # batch-size scaling

Ends with one line: ``generate speedup N.NNx`` (B tok/s over A tok/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info, median, timed  # noqa: E402
from sft_core.tiny_model import shared_dir  # noqa: E402

BUNDLED_ROWS = REPO / "sft_core" / "sample_data" / "medical_sample.jsonl"
SHARED_ROWS = shared_dir() / "data" / "delicate_medical_r1_sample.jsonl"
SYSTEM = "你是一个医学专家,你需要根据用户的问题,给出带有思考的回答。"  # the tutorial's system prompt
# variant -> batch size (None: the tutorial's one-question predict())
VARIANTS: dict[str, int | None] = {"A": None, "B": 0, "B-bs1": 1, "B-bs4": 4, "B-bs8": 8}


def load_questions(n: int) -> tuple[list[str], str]:
    """n questions: the bundled sample, the shared real sample, else synthetic Chinese."""
    for path in (BUNDLED_ROWS, SHARED_ROWS):
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            qs = [json.loads(line).get("question", "") for line in lines if line.strip()]
            qs = [q for q in qs if q]
            if qs:
                return [qs[i % len(qs)] for i in range(n)], str(path)
    topics = ["发热", "咳嗽", "头痛", "失眠", "高血压", "糖尿病", "胃痛", "过敏"]
    return [f"医生，我最近{topics[i % 8]}，持续了{i + 2}天，" + "请问该怎么办？" * (1 + i % 4) for i in range(n)], "synthetic"


def build(args: argparse.Namespace, out_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_core.config import TinyModelConfig
    from sft_core.tiny_model import build_tiny_model, find_qwen_tokenizer_dir

    heads = max(2, args.hidden // 64)
    cfg = TinyModelConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        intermediate_size=max(64, args.hidden * 35 // 6 // 64 * 64),  # Qwen2.5-1.5B's 8960/1536
    )
    path = build_tiny_model(out_dir, cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, "qwen2.5" if find_qwen_tokenizer_dir() else "bpe fallback"


def block_stop_tokens(model, tokenizer) -> None:
    """Zero the output-embedding rows of every stop token: their logit is 0, below the row maximum."""
    import torch

    from sft_core.chat import stop_token_ids

    with torch.no_grad():
        model.get_output_embeddings().weight[sorted(set(stop_token_ids(tokenizer, model.generation_config)))] = 0.0


def tutorial_predict(model, tokenizer, questions: list[str], new_tokens: int, system: str = SYSTEM) -> int:
    """Variant A, as the tutorial writes it (device and max length aside); returns tokens made."""
    made = 0
    for q in questions:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        model_inputs = tokenizer([text], return_tensors="pt").to(model.device)
        generated_ids = model.generate(model_inputs.input_ids, max_new_tokens=new_tokens)
        generated_ids = [out[len(inp):] for inp, out in zip(model_inputs.input_ids, generated_ids)]
        tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
        made += sum(len(g) for g in generated_ids)
    return made


def ours(model, tokenizer, questions: list[str], new_tokens: int, batch_size: int) -> int:
    from sft_core.generate import generate_answers

    gens = generate_answers(
        model, tokenizer, questions, system_prompt=SYSTEM, max_new_tokens=new_tokens, batch_size=batch_size
    )
    return sum(g.new_tokens for g in gens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="variant B's batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="A,B", help=f"comma-separated from {','.join(VARIANTS)}; A and B required")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="smoke run: hidden 32, 1 layer, 4 questions, 8 tokens, 1 repeat")
    args = p.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.questions, args.new_tokens, args.repeats = 32, 1, 4, 8, 1
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not {"A", "B"} <= set(names) or set(names) - set(VARIANTS):
        raise SystemExit(f"--variants: need A and B, from {sorted(VARIANTS)}; got {names}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    questions, source = load_questions(args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, kind = build(args, Path(tmp))
    block_stop_tokens(model, tokenizer)
    expected = args.questions * args.new_tokens

    def run(name: str, qs: list[str], n: int) -> int:
        bs = VARIANTS[name]
        with torch.inference_mode():
            if bs is None:
                return tutorial_predict(model, tokenizer, qs, n)
            return ours(model, tokenizer, qs, n, bs or args.batch_size)

    for name in names:  # warm-up: first-call costs (allocator, kernels) are not what we measure
        run(name, questions[:2], 2)
    walls: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:  # interleaved, so background load hits every variant alike
            wall, made = timed(lambda: run(name, questions, args.new_tokens))
            if made != expected:
                raise SystemExit(f"variant {name} generated {made} tokens, expected {expected}")
            walls[name].append(wall)
            print(f"  repeat {r + 1}/{args.repeats} {name}: {wall:.2f} s, {made / wall:.1f} tok/s",
                  file=sys.stderr, flush=True)

    params = sum(t.numel() for t in model.parameters())
    prompt_lens = [len(tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], add_generation_prompt=True,
        tokenize=False)) for q in questions]
    print(f"machine: {machine_info()}")
    print(f"model: Qwen2-shaped hidden {args.hidden}, {args.layers} layers, vocab {model.config.vocab_size:,} "
          f"({kind} tokenizer), {params / 1e6:.1f}M params, fp32")
    print(f"work: {args.questions} questions from {source} (prompts {min(prompt_lens)}-{max(prompt_lens)} chars), "
          f"{args.new_tokens} new tokens each, greedy; median of {args.repeats}")
    header = f"{'variant':<7} {'batch':>5} {'wall s':>8} {'tok/s':>8} {'vs A':>6}"
    print(header)
    print("-" * len(header))
    tok_s = {n: expected / median(walls[n]) for n in names}
    for n in names:
        bs = VARIANTS[n]
        batch = 1 if bs is None else (bs or args.batch_size)
        print(f"{n:<7} {batch:>5} {median(walls[n]):>8.2f} {tok_s[n]:>8.1f} {tok_s[n] / tok_s['A']:>5.2f}x")
    print(f"generate speedup {tok_s['B'] / tok_s['A']:.2f}x")


if __name__ == "__main__":
    main()
