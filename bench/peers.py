"""Against what users would pick instead: the product's training and generation vs TRL, side by side.

Training sides, each in its own process (its peak RSS is its own), interleaved over --repeats,
medians reported. All train the same random-init Qwen2 (hidden 256, 4 layers, the real 151,936
vocabulary with ``../shared/qwen2.5-tokenizer``) on the same real rows (``../shared/data``, else
the bundled sample) in the same chat format, with the same max_length, learning rate (1e-4),
linear schedule, seed (42), 4 rows per optimizer step and --steps optimizer steps (the first
one untimed), fp32 on CPU or bf16 on CUDA (``--device cuda``):

ours          the product's training stage: ``sft_core.tokenize.tokenize_rows`` then
              ``sft_core.train.run_training`` with configs/qwen2.5-1.5b-medical.yaml as shipped
              (bs 1, GA 4, chunked loss, gradient checkpointing, group_by_length), in a process
              set up by ``configure_process()`` as the CLI's; bench overrides only: max_length,
              max_steps, device, no evaluation or checkpoint during the steps.
ours-bs4      the same with ``--set train.per_device_train_batch_size=4 --set
              train.gradient_accumulation_steps=1`` (the 4 rows in one batch).
trl-defaults  ``trl.SFTTrainer`` with ``SFTConfig`` defaults except what must match: batch 1,
              GA 4, max_steps, learning rate, max_length, ``eos_token="<|im_end|>"``, CPU
              (``use_cpu``, ``bf16=False``). Data: the prompt-completion form, the prompt and
              completion texts the product renders (``sft_core.chat.render_example``), so both
              train on the same token ids and labels (checked below). TRL's conversational form
              would supervise one more token per row: Qwen's template writes a newline after the
              closing ``<|im_end|>``, which TRL counts as completion.
trl-tuned     the same trainer as TRL's documentation tunes it for this job: its chunked
              loss (``loss_type="nll"``, the default fused LM head), the 4 rows of a step in one
              batch (bs 4, GA 1), ``group_by_length`` to cut padding, gradient checkpointing kept
              (the real job needs it on one GPU), and padding-free batches only where its docs
              support them (FlashAttention on CUDA; not SDPA, not CPU). Not switchable in TRL 1.16:
              the entropy and token-accuracy metrics its loss computes on every micro-batch, and
              on CPU (no Triton) its LM head scores every position, prompt and padding included.
tutorial      the tutorial's recipe through the ``Trainer`` it uses: f-string prompt, labels
              ending on the pad token, bs 1, GA 4, ``DataCollatorForSeq2Seq``, gradient
              checkpointing, the model's own loss (full logits).

Figures: supervised tokens/s over the timed optimizer steps, peak RSS (and peak CUDA memory),
first-step and last-step training loss. Loss check: at the initial weights, ours and TRL compute
the loss of the same first 4 rows with their own data pipeline and loss code; the labels must be
identical and the losses agree within 1e-4 (relative), else the bench fails.

Generation (one process, same model, same questions, greedy, exactly --new-tokens new tokens
per question: the stop tokens' output rows are zeroed, as bench/generate.py does): ours
(``sft_core.generate.generate_answers`` as the generate stage calls it, the preset's batch
size 16), the tutorial's one-at-a-time loop, and plain ``model.generate`` on the left-padded
batch of all questions (what a TRL user would write).

    timeout 5400 .venv/bin/python bench/peers.py               # CPU, full (about 40 minutes)
    .venv/bin/python bench/peers.py --tiny                     # smoke (a few minutes)
    python bench/peers.py --device cuda --max-length 2048      # one GPU, bf16

Needs ``pip install '.[bench]'`` (trl). Writes ``$OUT/peers.json`` when OUT is set. Ends with
``peer train speedup vs trl-tuned N.NNx`` (ours over trl-tuned, supervised tokens/s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESET = "qwen2.5-1.5b-medical"
ROWS_PER_STEP = 4
CHECK_ROWS = 4  # the loss check: the first rows, at the initial weights
SIDES = {
    "ours": "the product's training stage, preset as shipped (bs 1, GA 4)",
    "ours-bs4": "the product's training stage, preset with bs 4, GA 1",
    "trl-defaults": "trl.SFTTrainer, SFTConfig defaults (bs 1, GA 4)",
    "trl-tuned": "trl.SFTTrainer as its docs tune it (bs 4, GA 1, group_by_length)",
    "tutorial": "the tutorial's Trainer recipe (bs 1, GA 4, full logits)",
}
GEN_SIDES = {
    "ours": "generate_answers, as the generate stage calls it",
    "tutorial": "one question at a time (the tutorial's predict)",
    "batched": "plain model.generate on the left-padded batch",
}


# ---------------------------------------------------------------- shared inputs (parent)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The model every side starts from and the rows every side trains on, written once."""
    from bench.common import load_rows
    from sft_core.config import TinyModelConfig
    from sft_core.tiny_model import build_tiny_model

    heads = max(2, args.hidden // 64)
    model_dir = build_tiny_model(work / "model", TinyModelConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=max(64, args.hidden * 35 // 6 // 64 * 64),
        max_position_embeddings=max(4096, args.max_length)))
    rows, source = load_rows(args.steps * ROWS_PER_STEP)
    rows_file = work / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tokenizer_kind = json.loads((model_dir / "TINY_MODEL.json").read_text(encoding="utf-8"))["tokenizer"]
    return {"model_dir": str(model_dir), "rows": str(rows_file), "rows_source": source, "tokenizer": tokenizer_kind}


# ---------------------------------------------------------------- measuring a Trainer (child)


class Probe:
    """Step end times, and the loss and supervised tokens of every micro-batch, from any Trainer.

    ``Trainer.training_step`` is wrapped (TRL's calls it too): the loss it returns is what the
    Trainer logs, kept as a tensor so that measuring adds no device sync.
    """

    def __init__(self) -> None:
        from transformers import Trainer, TrainerCallback

        self.step_ends: list[float] = []
        self.losses: list[Any] = []
        self.tokens: list[Any] = []
        probe, original = self, Trainer.training_step

        def training_step(trainer, model, inputs, *args, **kwargs):
            labels = inputs["labels"]
            probe.tokens.append((labels[..., 1:] != -100).sum())
            loss = original(trainer, model, inputs, *args, **kwargs)
            probe.losses.append(loss.detach())
            return loss

        Trainer.training_step = training_step

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step and args.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
                probe.step_ends.append(time.perf_counter())

        self.callback = StepClock()

    def figures(self, accumulation: int) -> dict[str, Any]:
        steps = len(self.step_ends)
        per_step_loss = [sum(float(x) for x in self.losses[i * accumulation:(i + 1) * accumulation])
                         for i in range(steps)]
        tokens = [int(t) for t in self.tokens]
        timed_tokens = sum(tokens[accumulation:steps * accumulation])  # the first step is a warm-up
        seconds = self.step_ends[-1] - self.step_ends[0]
        return {"steps": steps, "tok_s": timed_tokens / seconds, "seconds": seconds, "timed_tokens": timed_tokens,
                "first_loss": per_step_loss[0], "last_loss": per_step_loss[-1]}


def digest(lists: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(lists).encode()).hexdigest()[:16]


def load_peer_model(model_dir: str, device: str):
    """The shared model as a TRL or tutorial script loads it: bf16 on CUDA (the real checkpoint's dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")


# ---------------------------------------------------------------- the sides (child)


def ours_config(args: argparse.Namespace, side: str, out: Path):
    from sft_core.config import load_config

    overrides = [f"data.max_length={args.max_length}", f"train.max_steps={args.steps}", f"train.device={args.device}",
                 f"workdir={out}", f"train.save_steps={10 ** 6}", f"train.eval_steps={10 ** 6}",
                 "train.metric_for_best_model=none"]
    if side == "ours-bs4":
        overrides += ["train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1"]
    return load_config(PRESET, overrides)


def run_ours(args: argparse.Namespace, side: str, inputs: dict, out: Path, check: bool) -> dict:
    from sft_core.process import configure_process

    configure_process()  # what the CLI and the flow do before torch is imported
    import datasets  # noqa: F401  (imported here, after the process settings)

    from sft_core.data import read_jsonl
    from sft_core.modeling import load_tokenizer
    from sft_core.tokenize import tokenize_rows

    cfg = ours_config(args, side, out)
    tokenizer = load_tokenizer(inputs["model_dir"])
    rows = read_jsonl(inputs["rows"])
    ds, _ = tokenize_rows(rows, tokenizer, system_prompt=cfg.data.system_prompt, max_length=cfg.data.max_length,
                          truncation=cfg.data.truncation)
    if check:
        return check_ours(cfg, inputs["model_dir"], ds.select(range(CHECK_ROWS)))
    ds.save_to_disk(str(out / "train_ds"))
    from sft_core.train import run_training

    probe = Probe()
    run_training(cfg, model_dir=inputs["model_dir"], train_data=out / "train_ds", eval_data=None,
                 output_dir=out / "train", extra_callbacks=[probe.callback], progress=lambda line: None)
    return probe.figures(cfg.train.gradient_accumulation_steps)


def check_ours(cfg, model_dir: str, rows) -> dict:
    """The loss `run_training`'s trainer computes on these rows, at the initial weights."""
    import torch

    from sft_core.loss import compute_sft_loss
    from sft_core.modeling import load_model, load_tokenizer, prepare_for_sft, resolve_device, resolve_dtype
    from sft_core.train import make_collator, resolve_loss_chunk_size, resolve_padding_free

    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=resolve_dtype(cfg.model.dtype, device), device=device,
                       attn_implementation=cfg.model.attn_implementation)
    prepare_for_sft(model, tokenizer)
    collator = make_collator(tokenizer, padding_free=resolve_padding_free(cfg.train.padding_free, device),
                             attn_implementation=cfg.model.attn_implementation)
    examples = [{k: rows[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(rows))]
    batch = {k: v.to(device) for k, v in collator(examples).items()}
    n = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
    with torch.no_grad():
        loss, _ = compute_sft_loss(model, batch, num_items_in_batch=n, mode=cfg.train.loss,
                                   chunk_size=resolve_loss_chunk_size(cfg.train.loss_chunk_size, device))
    return {"check_loss": float(loss), "labels": digest([ex["labels"] for ex in examples]),
            "input_ids": digest([ex["input_ids"] for ex in examples]), "supervised": n}


def flash_attention_available(device: str) -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return device == "cuda"


def run_trl(args: argparse.Namespace, side: str, inputs: dict, out: Path, check: bool) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from sft_core.config import load_config
    from sft_core.data import read_jsonl
    from sft_core.modeling import load_tokenizer

    system_prompt = load_config(PRESET).data.system_prompt
    tokenizer = load_tokenizer(inputs["model_dir"])
    from sft_core.chat import render_example

    pairs = [render_example(tokenizer, row, system_prompt) for row in read_jsonl(inputs["rows"])]
    data = datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    cpu = args.device == "cpu"
    model = load_peer_model(inputs["model_dir"], args.device)
    settings: dict[str, Any] = {
        "output_dir": str(out / "trl"), "max_steps": args.steps, "learning_rate": 1e-4,
        "max_length": args.max_length, "eos_token": "<|im_end|>", "use_cpu": cpu, "bf16": not cpu,
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
    }
    if side == "trl-tuned":
        settings.update(per_device_train_batch_size=4, gradient_accumulation_steps=1,
                        train_sampling_strategy="group_by_length")
        if flash_attention_available(args.device):  # TRL's docs: padding-free needs FlashAttention
            settings["padding_free"] = True
            model = load_peer_model_flash(inputs["model_dir"])
    probe = None if check else Probe()
    trainer = SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=data, processing_class=tokenizer,
                         callbacks=[] if probe is None else [probe.callback])
    if check:
        return check_trl(trainer)
    trainer.train()
    return probe.figures(settings["gradient_accumulation_steps"])


def load_peer_model_flash(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="flash_attention_2")


def check_trl(trainer) -> dict:
    """The loss TRL's trainer computes on the first rows, with its own data pipeline and loss."""
    import torch

    rows = trainer.train_dataset.select(range(CHECK_ROWS))
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    n = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n)
    return {"check_loss": float(loss), "labels": digest([ex["labels"] for ex in examples]),
            "input_ids": digest([ex["input_ids"] for ex in examples]), "supervised": n}


def run_tutorial(args: argparse.Namespace, inputs: dict, out: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from bench.common import TUTORIAL_SYSTEM, tokenize_like_tutorial
    from sft_core.data import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(inputs["model_dir"])
    examples = tokenize_like_tutorial(read_jsonl(inputs["rows"]), tokenizer, args.max_length, TUTORIAL_SYSTEM)
    data = datasets.Dataset.from_list([{**ex, "attention_mask": [1] * len(ex["input_ids"])} for ex in examples])
    model = load_peer_model(inputs["model_dir"], args.device)
    model.enable_input_require_grads()  # as the tutorial does, for gradient checkpointing
    training_args = TrainingArguments(  # the tutorial's, without evaluation and saving during the steps
        output_dir=str(out / "tutorial"), per_device_train_batch_size=1, gradient_accumulation_steps=4,
        logging_steps=10, max_steps=args.steps, learning_rate=1e-4, gradient_checkpointing=True,
        report_to="none", save_strategy="no", use_cpu=args.device == "cpu", disable_tqdm=True)
    probe = Probe()
    Trainer(model=model, args=training_args, train_dataset=data, callbacks=[probe.callback],
            data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)).train()
    return probe.figures(4)


def run_side(args: argparse.Namespace, side: str, check: bool) -> dict:
    inputs = json.loads(Path(args.inputs).read_text(encoding="utf-8"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=Path(args.inputs).parent) as tmp:
        out = Path(tmp)
        if side.startswith("ours"):
            result = run_ours(args, side, inputs, out, check)
        elif side.startswith("trl"):
            result = run_trl(args, side, inputs, out, check)
        else:
            result = run_tutorial(args, inputs, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------- generation (child)


def run_generation(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from bench.common import median, timed
    from bench.generate import block_stop_tokens, tutorial_predict
    from sft_core.config import load_config
    from sft_core.data import read_jsonl
    from sft_core.generate import generate_answers

    inputs = json.loads(Path(args.inputs).read_text(encoding="utf-8"))
    if args.threads:
        torch.set_num_threads(args.threads)
    e, system = (cfg := load_config(PRESET)).eval, cfg.data.system_prompt
    tokenizer = AutoTokenizer.from_pretrained(inputs["model_dir"])
    model = load_peer_model(inputs["model_dir"], args.device).to(args.device).eval()
    block_stop_tokens(model, tokenizer)
    questions = [r["question"] for r in read_jsonl(inputs["rows"])][: args.questions]
    n = args.new_tokens

    def ours(qs: list[str], new: int) -> int:
        return sum(g.new_tokens for g in generate_answers(
            model, tokenizer, qs, system_prompt=system, max_new_tokens=new, batch_size=e.generate_batch_size,
            repetition_penalty=e.repetition_penalty))

    def batched(qs: list[str], new: int) -> int:
        texts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                               tokenize=False, add_generation_prompt=True) for q in qs]
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=new, do_sample=False)
        new_ids = out[:, enc["input_ids"].shape[1]:]
        tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        return int(new_ids.numel())

    def tutorial(qs: list[str], new: int) -> int:
        return tutorial_predict(model, tokenizer, qs, new, system)

    fns = {"ours": ours, "tutorial": tutorial, "batched": batched}

    def run(name: str, qs: list[str], new: int) -> int:
        with torch.inference_mode():
            made = fns[name](qs, new)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return made

    for name in fns:  # warm-up: first-call costs are not what we measure
        run(name, questions[:2], 2)
    walls: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.repeats):
        for name in fns:  # interleaved
            wall, made = timed(lambda: run(name, questions, n))
            if made != len(questions) * n:
                raise SystemExit(f"generation side {name} made {made} tokens, expected {len(questions) * n}")
            walls[name].append(wall)
            print(f"  generate repeat {r + 1}/{args.repeats} {name}: {wall:.2f} s", file=sys.stderr, flush=True)
    return {"questions": len(questions), "new_tokens": n, "batch_size": e.generate_batch_size,
            "tok_s": {name: len(questions) * n / median(w) for name, w in walls.items()}}


# ---------------------------------------------------------------- driver (parent)


def child(argv: list[str], what: str) -> dict:
    from bench.common import child_result

    return child_result(__file__, argv, what)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of 4 rows, the first untimed (>= 12)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default=",".join(SIDES), help=f"training sides, from {','.join(SIDES)}")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--tiny", action="store_true", help="smoke run: hidden 32, 1 layer, 3 steps, 1 repeat")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: one training side in this process
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # internal: the loss check only
    p.add_argument("--generation", action="store_true", help=argparse.SUPPRESS)  # internal: the generation part
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.steps, args.repeats = 32, 1, 3, 1
        args.max_length, args.questions, args.new_tokens = min(args.max_length, 256), 4, 8
    if args.side or args.generation:
        result = run_generation(args) if args.generation else run_side(args, args.side, args.check)
        print("RESULT " + json.dumps(result), flush=True)
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if set(sides) - set(SIDES) or not {"ours", "trl-tuned"} <= set(sides):
        raise SystemExit(f"--sides: need ours and trl-tuned, from {sorted(SIDES)}; got {sides}")
    if args.steps < 12 and not args.tiny:
        raise SystemExit("--steps: at least 12 (the first optimizer step is not timed)")
    try:
        import trl
    except ImportError:
        raise SystemExit("bench/peers.py needs TRL: pip install '.[bench]'") from None

    from bench.common import machine_info

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        inputs = prepare(args, work)
        (work / "inputs.json").write_text(json.dumps(inputs), encoding="utf-8")
        common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                  ("device", "hidden", "layers", "steps", "max_length", "threads", "questions", "new_tokens",
                   "repeats")]
        common.append(f"--inputs={work / 'inputs.json'}")
        checks = {s: child([*common, f"--side={s}", "--check"], f"loss check {s}") for s in ("ours", "trl-tuned")}
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.repeats):
            for s in sides:  # interleaved, so background load hits every side alike
                runs[s].append(child([*common, f"--side={s}"], f"side {s}"))
                print(f"  repeat {r + 1}/{args.repeats} {s}: " + json.dumps(runs[s][-1]), file=sys.stderr, flush=True)
        generation = None if args.skip_generation else child([*common, "--generation"], "generation")

    med = {s: {k: statistics.median(x[k] for x in runs[s]) for k in ("tok_s", "peak_rss_mb")} for s in sides}
    if args.device == "cuda":
        for s in sides:
            med[s]["peak_cuda_mb"] = statistics.median(x["peak_cuda_mb"] for x in runs[s])
    print(f"machine: {machine_info()}, trl {trl.__version__}")
    print(f"model: Qwen2-shaped hidden {args.hidden}, {args.layers} layers, {inputs['tokenizer']} tokenizer; "
          f"{'bf16 CUDA' if args.device == 'cuda' else 'fp32 CPU'}")
    print(f"work: {args.steps * ROWS_PER_STEP} rows from {inputs['rows_source']}, max length {args.max_length}, "
          f"{args.steps} optimizer steps x 4 rows (first untimed), lr 1e-4 linear, seed 42; median of {args.repeats}")
    mem = "peak CUDA MB" if args.device == "cuda" else "peak RSS MB"
    header = f"{'side':<13} {'sup tok/s':>9} {'vs trl-tuned':>12} {mem:>12} {'first loss':>10} {'last loss':>9}  what"
    print(header)
    print("-" * len(header))
    key = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    for s in sides:
        print(f"{s:<13} {med[s]['tok_s']:>9.1f} {med[s]['tok_s'] / med['trl-tuned']['tok_s']:>11.2f}x "
              f"{med[s][key]:>12.0f} {runs[s][0]['first_loss']:>10.4f} {runs[s][0]['last_loss']:>9.4f}  {SIDES[s]}")
    ours_c, trl_c = checks["ours"], checks["trl-tuned"]
    same_labels = ours_c["labels"] == trl_c["labels"] and ours_c["input_ids"] == trl_c["input_ids"]
    agree = abs(ours_c["check_loss"] - trl_c["check_loss"]) <= 1e-4 * max(1.0, abs(trl_c["check_loss"]))
    print(f"loss check, first {CHECK_ROWS} rows at the initial weights: labels "
          f"{'identical' if same_labels else 'DIFFER'} ({ours_c['supervised']} vs {trl_c['supervised']} supervised); "
          f"ours {ours_c['check_loss']:.6f}, trl {trl_c['check_loss']:.6f} -> {'agree' if agree else 'DISAGREE'}")
    if generation is not None:
        g = generation["tok_s"]
        print(f"generation: {generation['questions']} questions x {generation['new_tokens']} new tokens, greedy; "
              "tok/s " + ", ".join(f"{n} {g[n]:.1f} ({GEN_SIDES[n]})" for n in GEN_SIDES))
        print(f"peer generate speedup: {g['ours'] / g['tutorial']:.2f}x the one-at-a-time loop, "
              f"{g['ours'] / g['batched']:.2f}x plain batched generate")
    for s in ("tutorial", "trl-defaults"):
        if s in sides:
            print(f"ours vs {s}: {med['ours']['tok_s'] / med[s]['tok_s']:.2f}x tok/s, "
                  f"{med['ours'][key] / med[s][key]:.2f}x memory")
    print(f"ours vs trl-tuned memory: {med['ours'][key] / med['trl-tuned'][key]:.2f}x")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "peers.json").write_text(json.dumps(
            {"args": vars(args), "inputs": inputs, "runs": runs, "medians": med, "checks": checks,
             "generation": generation}, indent=2), encoding="utf-8")
    print(f"peer train speedup vs trl-tuned {med['ours']['tok_s'] / med['trl-tuned']['tok_s']:.2f}x")
    if not (same_labels and agree):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
