"""What a `pretrained-demo` run costs, part by part, through the project's own code: an estimate to size the preset.

Measures, on SmolLM2-135M-Instruct (the GGUF `qwen-sft fetch-sample-model` brings) and the preset's data:
one training step (the real `run_training`, batch 1 x GA 4), one evaluation of the validation split
(`evaluate_model`), and greedy generation per decoding step at two answer lengths (`generate_answers`, the
preset's batch), then adds up the run the preset describes (steps, evaluations, generation checks at every
saved checkpoint, final and base evaluation and generation, all at the full `auto` budget: the worst case).

Timings are process CPU seconds with torch on --threads (default 1): on a shared machine a single thread's
CPU time hardly depends on what else runs, while two threads' wall time does (every small op waits on a
barrier for a descheduled thread). The 2-core wall estimate divides by --speedup and --gen-speedup (2 threads
over 1: assumed, not measured here; measure them on a quiet machine with --threads 2).

    .venv/bin/qwen-sft fetch-sample-model
    timeout 3600 .venv/bin/python bench/pretrained_budget.py [--set train.num_train_epochs=2 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info  # noqa: E402


def cpu_seconds(fn):
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="preset override, as qwen-sft's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="training steps measured (the first is not counted)")
    ap.add_argument("--gen-lengths", default="1,64,256", help="three numbers of new tokens, to fit a round's cost")
    ap.add_argument("--speedup", type=float, default=1.6,
                    help="2 threads over 1 on training and evaluation (large matrix products), for the wall estimate")
    ap.add_argument("--gen-speedup", type=float, default=1.3,
                    help="2 threads over 1 on decoding (small products of a few rows, more synchronisation)")
    args = ap.parse_args()

    from sft_core.process import configure_process

    configure_process()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pretrained-budget-") as tmp:  # the converted model and checkpoints
        measure(Path(tmp), args)


def measure(work: Path, args: argparse.Namespace) -> None:
    import datasets
    import torch
    from transformers import TrainerCallback

    from sft_core.config import load_config
    from sft_core.data import read_jsonl
    from sft_core.evaluate import evaluate_model
    from sft_core.generate import generate_answers
    from sft_core.modeling import load_model, load_tokenizer, prepare_for_sft
    from sft_core.stages import generation_budget, prepare_data
    from sft_core.train import run_training

    cfg = load_config("pretrained-demo", [f"workdir={work}", *args.overrides])
    print(machine_info())
    wall = time.perf_counter()
    prep_cpu, prepared = cpu_seconds(lambda: prepare_data(cfg, log=lambda line: None))
    model_dir, tokens, splits = prepared.model.model_dir, prepared.tokens, prepared.splits
    budget = generation_budget(cfg, tokens).max_new_tokens
    train_ds = datasets.load_from_disk(tokens.train_ds)
    sup_per_row = sum(sum(1 for x in r["labels"] if x != -100) for r in train_ds) / len(train_ds)
    tc = cfg.train
    rows_per_step = tc.per_device_train_batch_size * tc.gradient_accumulation_steps

    step_cpu: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.process_time()

        def on_step_end(self, *a, **k):
            step_cpu.append(time.process_time() - self.t)

    short = cfg.model_copy(deep=True)
    short.train.max_steps, short.train.metric_for_best_model = args.steps, "none"
    short.train.eval_steps = short.train.save_steps = 10**6
    run_training(short, model_dir=model_dir, train_data=tokens.train_ds, eval_data=None, output_dir=work / "train",
                 extra_callbacks=[StepClock()])
    train_step = sum(step_cpu[1:]) / max(1, len(step_cpu) - 1)  # the first step pays for warming up

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32", device="cpu")
    eval_cpu, _ = cpu_seconds(lambda: evaluate_model(model, tokenizer, datasets.load_from_disk(tokens.select_ds),
                                                     batch_size=cfg.eval.batch_size))
    prepare_for_sft(model, tokenizer)
    questions = [r["question"] for r in read_jsonl(splits.report)][: cfg.eval.num_generate]
    lengths = [int(x) for x in args.gen_lengths.split(",")]
    cost = {}
    for n in lengths:
        model.generation_config.min_new_tokens = n  # no stop before n: every row runs its full length
        cost[n], _ = cpu_seconds(lambda: generate_answers(model, tokenizer, questions, max_new_tokens=n,
                                                          system_prompt=cfg.data.system_prompt,
                                                          batch_size=cfg.eval.generate_batch_size))
    # a batch's cost: prompt prefill p, then steps whose cost grows with the context: p + a*n + c*n^2, fitted exactly
    p, a, c = (float(x) for x in torch.linalg.solve(torch.tensor([[1.0, n, n * n] for n in lengths], dtype=torch.float64),
                                                   torch.tensor([cost[n] for n in lengths], dtype=torch.float64)))
    batches = math.ceil(len(questions) / cfg.eval.generate_batch_size)
    gen_round = p + a * budget + c * budget**2  # (the fit covers all batches of the round: it timed all of them)

    steps = math.ceil(splits.train_rows / rows_per_step) * tc.num_train_epochs if tc.max_steps < 0 else tc.max_steps
    steps = math.ceil(steps)
    # the Trainer also evaluates and saves at the last step; a generation check runs where an evaluation saves
    evals = math.ceil(steps / tc.eval_steps) + 2  # in training, then the final model's and the base's
    checks = math.ceil(steps / tc.save_steps) if tc.metric_for_best_model == "gen_score" else 0
    rounds = checks + (2 if cfg.eval.compare_base else 1)
    parts = {"prepare (convert, ingest..tokenize)": (prep_cpu, 1),
             f"training: {steps} steps x {train_step:.0f} s": (train_step * steps, args.speedup),
             f"evaluation: {evals} x {eval_cpu:.0f} s": (eval_cpu * evals, args.speedup),
             f"generation: {rounds} rounds x {gen_round:.0f} s ({len(questions)} questions, {budget} tokens)":
                 (gen_round * rounds, args.gen_speedup)}
    print(f"rows per step {rows_per_step}, supervised tokens per row {sup_per_row:.0f}: "
          f"{rows_per_step * sup_per_row / train_step * args.threads:.1f} supervised tokens per CPU second")
    print(f"generation ({batches} batch(es) of up to {cfg.eval.generate_batch_size}): CPU s "
          + ", ".join(f"{cost[n]:.1f} for {n} new tokens" for n in lengths)
          + f"; fit {p:.1f} + {a * 1000:.0f} ms x n + {c * 1e6:.1f} us x n^2")
    total = 0.0
    for name, (cpu, speed) in parts.items():
        minutes = cpu / 60 / (speed if args.threads == 1 else 1)
        total += minutes
        print(f"  {name:<80} {cpu / 60:7.1f} CPU min  ~{minutes:5.1f} min on 2 cores")
    print(f"estimated run (registration excluded, ~1 min): ~{total:.0f} min on 2 cores "
          f"(measured in {(time.perf_counter() - wall) / 60:.0f} min of wall here)")
    print("RESULT " + json.dumps({"train_step_cpu_s": train_step, "eval_cpu_s": eval_cpu, "gen_round_cpu_s": gen_round,
                                  "budget": budget, "steps": steps, "estimate_min": total}))


if __name__ == "__main__":
    main()
