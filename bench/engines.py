"""Generation engines side by side: Hugging Face batched `generate` (HF) against vLLM, same questions, model, budget.

HF   = `sft_core.generate.generate_answers`: prompts sorted by length into left-padded batches of
       --batch-size, greedy (what the generate stages run today).
vLLM = `sft_core.vllm_engine.generate_answers_vllm` on a vLLM server started on the same folder (from
       `.venv-vllm`, `make vllm`, or QWEN_SFT_VLLM): the same prompt ids, stop tokens and budget, greedy,
       all questions in flight at once (continuous batching: no batch waits for its longest answer).
Load time (HF: the weights into this process; vLLM: the server up and its first token) is reported apart from
generation. Without --model the model is the demo preset's shape (hidden 192, 3 layers, head size 48, the
4,096-token BPE), random weights, fp32, with its stop tokens' output rows zeroed so that every answer runs the
whole budget (tok/s compare like for like); with --model (e.g. the demo's fine-tuned folder) answers stop where
the model stops them, and each engine's own token count is used. One untimed warm-up, then --repeats timed runs,
interleaved; the median is reported.

    .venv/bin/python bench/engines.py                         # CPU, ~5 minutes with the server start
    .venv/bin/python bench/engines.py --model .qwen-sft/train/<key>/final --new-tokens 1024
    .venv/bin/python bench/engines.py --tiny                  # smoke: 4 questions, 16 tokens

Ends with one line: ``vllm speedup N.NNx`` (vLLM tok/s over HF tok/s, generation only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import BUNDLED_ROWS, machine_info, median, timed  # noqa: E402

SYSTEM = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"  # the presets' system prompt


def questions(n: int) -> list[str]:
    """The last n questions of the bundled sample (the demo's validation split is drawn from them)."""
    rows = [json.loads(x) for x in BUNDLED_ROWS.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [r["question"] for r in rows[-n:]]


def demo_shaped_model(out: Path) -> Path:
    """The demo preset's tiny model, random weights, stop tokens never chosen (their output rows are zero)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft_core.chat import stop_token_ids
    from sft_core.config import TinyModelConfig
    from sft_core.modeling import load_tokenizer
    from sft_core.tiny_model import build_tiny_model

    folder = build_tiny_model(out / "base", TinyModelConfig(tokenizer="bpe", vocab_size=4096, hidden_size=192,
                                                            num_hidden_layers=3, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=384))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = load_tokenizer(folder)
    model.config.tie_word_embeddings = False  # zero the output rows only; the prompt's <|im_end|> keeps its embedding
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.lm_head.weight[sorted(set(stop_token_ids(tokenizer, model.generation_config)))] = 0.0
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a model folder (default: the demo's shape, random, never stopping)")
    p.add_argument("--questions", type=int, default=13, help="the demo's validation size")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="HF's batch (the presets' eval.generate_batch_size)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="HF's torch threads: vLLM's CPU backend binds its compute "
                   "to one thread per core less one it keeps for its server (1 on a 2-core host)")
    p.add_argument("--compile", action="store_true", help="vLLM compiles its graphs (on CPU it runs eager by default)")
    p.add_argument("--dtype", default="float32", help="vLLM's dtype (HF computes in float32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="smoke run: 4 questions, 16 tokens, 1 repeat")
    args = p.parse_args()
    if args.tiny:
        args.questions, args.new_tokens, args.repeats = 4, 16, 1

    from sft_core.generate import generate_answers
    from sft_core.modeling import load_model, load_tokenizer
    from sft_core.vllm_engine import VllmServer, find_vllm, generate_answers_vllm, model_shape

    import torch

    torch.set_num_threads(args.threads)
    qs = questions(args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or demo_shaped_model(Path(tmp))
        hf_load, (model, tokenizer) = timed(lambda: (load_model(folder, dtype="float32", device="cpu"),
                                                     load_tokenizer(folder)))
        length = min(model_shape(folder).get("max_position_embeddings") or 4096, 512 + args.new_tokens)
        server = VllmServer(folder, served_name="bench", max_model_len=length, target=find_vllm(),
                            sequences=len(qs), log_path=Path(tmp) / "vllm.log", dtype=args.dtype,
                            eager=False if args.compile else None)
        vllm_load, _ = timed(server.start)
        try:
            def hf(qs_: list[str], n: int) -> int:
                return sum(g.new_tokens for g in generate_answers(model, tokenizer, qs_, system_prompt=SYSTEM,
                                                                  max_new_tokens=n, batch_size=args.batch_size))

            def vllm(qs_: list[str], n: int) -> int:
                return sum(g.new_tokens for g in generate_answers_vllm(folder, qs_, system_prompt=SYSTEM,
                                                                       max_new_tokens=n, server=server))

            engines = {"HF": hf, "vLLM": vllm}
            for run in engines.values():  # warm-up: first-call costs are not what we measure
                run(qs[:2], 4)
            walls: dict[str, list[float]] = {name: [] for name in engines}
            tokens: dict[str, int] = {}
            for r in range(args.repeats):
                for name, run in engines.items():
                    wall, made = timed(lambda run=run: run(qs, args.new_tokens))
                    walls[name].append(wall)
                    tokens[name] = made
                    print(f"  repeat {r + 1}/{args.repeats} {name}: {wall:.2f} s, {made} tokens, "
                          f"{made / wall:.1f} tok/s", file=sys.stderr, flush=True)
        finally:
            server.stop()
        params = sum(t.numel() for t in model.parameters())

    print(f"machine: {machine_info()}")
    print(f"model: {'demo shape, random, stops blocked' if args.model is None else folder}, "
          f"{params / 1e6:.1f}M params; HF float32, vLLM {args.dtype} {'compiled' if args.compile else 'eager'}")
    print(f"work: {len(qs)} questions of the bundled sample, budget {args.new_tokens} new tokens, greedy; HF batch "
          f"{args.batch_size} on {args.threads} thread(s), vLLM all in flight; median of {args.repeats}")
    header = f"{'engine':<6} {'load s':>7} {'gen s':>7} {'tokens':>7} {'tok/s':>8} {'vs HF':>6}"
    print(header)
    print("-" * len(header))
    tok_s = {name: tokens[name] / median(walls[name]) for name in walls}
    for name, load in (("HF", hf_load), ("vLLM", vllm_load)):
        print(f"{name:<6} {load:>7.1f} {median(walls[name]):>7.2f} {tokens[name]:>7} {tok_s[name]:>8.1f} "
              f"{tok_s[name] / tok_s['HF']:>5.2f}x")
    print(f"vllm speedup {tok_s['vLLM'] / tok_s['HF']:.2f}x")


if __name__ == "__main__":
    main()
