"""Batched generation, `<think>…</think>` answer parsing and generation metrics.

`generate_answers` renders each question with the chat template, sorts the prompts by
length into left-padded batches (less padding), generates greedily (or with a seeded
sampler) and returns one `Generation` per question in the input order.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sft_core.chat import ENDOFTEXT, IM_END, THINK_CLOSE, THINK_OPEN, encode_prompt, stop_token_ids
from sft_core.errors import ConfigError, ModelSourceError
from sft_core.stats import bootstrap_mean, rate

END_MARKERS = (IM_END, ENDOFTEXT)
ROUGE_MAX_CHARS = 4000
_TAG = re.compile(r"</?think>")
_WS = re.compile(r"\s+")


@dataclass
class ParsedResponse:
    think: str
    answer: str
    format_ok: bool


def parse_response(text: str) -> ParsedResponse:
    """Split a completion into think and answer.

    Text after the first end marker (`<|im_end|>`, `<|endoftext|>`) is dropped. The answer is
    what follows the *last* `</think>`, and only that: a completion that never closes its think
    block has no answer (a reasoning model cut off mid-thought has not answered, and scoring its
    reasoning as an answer would reward rambling). The think is what precedes `</think>`, stray
    tags removed; with no `</think>`, whatever follows an opened `<think>` (else nothing).
    `format_ok`: exactly one `<think>` (first, after optional whitespace), exactly one
    `</think>`, and a non-blank answer.
    """
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    text = text.lstrip()
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        think, answer = text[:close], text[close + len(THINK_CLOSE) :]
    elif THINK_OPEN in text:
        think, answer = text[text.find(THINK_OPEN) :], ""
    else:
        think, answer = "", ""
    ok = (
        text.startswith(THINK_OPEN)
        and text.count(THINK_OPEN) == 1
        and text.count(THINK_CLOSE) == 1
        and bool(answer.strip())
    )
    return ParsedResponse(think=_TAG.sub("", think).strip(), answer=answer.strip(), format_ok=ok)


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of `a` and `b`.

    The O(len(a)*len(b)) LCS dynamic programme computed a whole DP column at a time in
    the bits of one Python int (Hyyrö's bit-parallel form): exact, ~100x faster than the
    cell-by-cell loop. Bit i of `v` is 0 where the DP value steps up at row i.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_chars(pred: str, ref: str) -> float:
    """ROUGE-L F1 over characters, whitespace ignored (Chinese has no word spaces).

    Inputs are capped at `ROUGE_MAX_CHARS` characters each. Both empty -> 1.0.
    """
    p, r = _WS.sub("", pred)[:ROUGE_MAX_CHARS], _WS.sub("", ref)[:ROUGE_MAX_CHARS]
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Generation:
    question: str
    text: str  # the decoded completion, special tokens stripped
    think: str
    answer: str
    format_ok: bool
    stopped: bool  # ended on a stop token before max_new_tokens
    new_tokens: int  # generated tokens, the stop token included
    reference_answer: str | None = None
    rouge_l: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _skinny_lm_head(model: Any) -> Iterator[None]:
    """On CPU, compute the output projection as ``(W @ hᵀ)ᵀ`` while generating.

    A decode step multiplies a few rows of hidden states by the (vocab × hidden) output
    matrix, 151,936 rows for Qwen. For that skinny product, ``F.linear`` on CPU picks a
    kernel about half as fast as the same product written ``W @ hᵀ`` (measured: 70 ms vs
    37 ms for 16 rows, hidden 256; see BENCHMARKS.md); the logits agree to float rounding.
    GPUs and layers with a bias are left alone.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or weight is None or weight.device.type != "cpu":
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        return (weight @ flat.T).T.reshape(*hidden.shape[:-1], weight.shape[0])

    head.forward = forward  # an instance attribute shadows the class method until deleted
    try:
        yield
    finally:
        del head.forward


def _stop_when(should_stop: Callable[[], bool] | None):
    """A stopping criterion that ends every row once `should_stop()` is true (None: no extra criterion)."""
    if should_stop is None:
        return None
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by prompt length (longest first), cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: list[str],
    *,
    system_prompt: str,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    references: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Generation]:
    """Answer `questions` in length-sorted, left-padded batches; results in input order.

    Greedy by default; `do_sample=True` samples with `temperature`/`top_p`, seeded by
    `seed` (the global RNG state is restored afterwards). `progress(done, total)` is
    called after each batch. `stopped`/`new_tokens` come from the first stop id in each
    row's generated ids (rows that stop early are padded after their stop token).
    `should_stop()` is asked after every decoding step; when it says yes, generation ends
    there (a server's client left, a deadline passed) and the rows come back as they are.
    """
    import torch

    if references is not None and len(references) != len(questions):
        raise ValueError(f"references has {len(references)} items but questions has {len(questions)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(
            f"eval.generate_batch_size={batch_size} and eval.max_new_tokens={max_new_tokens} must both be >= 1"
        )
    if not questions:
        return []
    stops = stop_token_ids(tokenizer, model.generation_config)
    if not stops:
        raise ModelSourceError(
            "the model has no stop token: set eos_token_id in its generation_config.json "
            "(the fine-tune ends on <|im_end|>) or use a tokenizer that has <|im_end|>"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = [encode_prompt(tokenizer, q, system_prompt) for q in questions]  # a question's text stays text
    lengths = [len(ids) for ids in prompts]
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    if repetition_penalty != 1.0:
        gen_kwargs["repetition_penalty"] = repetition_penalty
    results: list[Generation | None] = [None] * len(questions)
    stop_set = set(stops)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    old_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices), _skinny_lm_head(model):
            torch.manual_seed(seed)
            done = 0
            for idx in _batches(lengths, batch_size):
                enc = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding=True, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(**enc, eos_token_id=stops, pad_token_id=pad_id, **gen_kwargs,
                                     stopping_criteria=_stop_when(should_stop))
                for i, ids in zip(idx, out[:, enc["input_ids"].shape[1] :].tolist()):
                    ref = references[i] if references is not None else None
                    results[i] = _to_generation(tokenizer, questions[i], ids, stop_set, ref)
                done += len(idx)
                if progress is not None:
                    progress(done, len(questions))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return [g for g in results if g is not None]


def _to_generation(tokenizer: Any, question: str, ids: list[int], stops: set[int], ref: str | None) -> Generation:
    """One row of generated ids -> Generation; the row ends at its first stop id (pads follow it)."""
    end = next((j for j, t in enumerate(ids) if t in stops), None)
    text = tokenizer.decode(ids if end is None else ids[:end], skip_special_tokens=True)
    parsed = parse_response(text)
    return Generation(
        question=question,
        text=text,
        think=parsed.think,
        answer=parsed.answer,
        format_ok=parsed.format_ok,
        stopped=end is not None,
        new_tokens=len(ids) if end is None else end + 1,
        reference_answer=ref,
        rouge_l=rouge_l_chars(parsed.answer, ref) if ref is not None else None,
    )


def generation_metrics(gens: list[Generation]) -> dict[str, float]:
    """Format adherence, stop and usable rates and ROUGE-L, each with its 95 % interval (`…_lo`, `…_hi`:
    Wilson for the rates, a fixed-seed bootstrap for ROUGE-L; NaN when no generation has a reference),
    lengths, the number of questions, and the selection score.

    `usable`: well-formed *and* stopped, an answer a person can use. `score` is what checkpoint
    selection maximises (`train.metric_for_best_model: gen_score`): the usable rate, with rouge_l
    (0 without references) weighted 0.01 so that it only breaks ties (one answer more of 13 weighs
    0.076) and the score stays in [0, 1]. Averaging the three rates let a higher ROUGE-L, mostly noise
    on a small model, buy back a lost answer.
    """
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    figures = {
        "format_ok_rate": rate([g.format_ok for g in gens]),
        "stop_rate": rate([g.stopped for g in gens]),
        "usable_rate": rate([g.format_ok and g.stopped for g in gens]),
        "rouge_l": bootstrap_mean([g.rouge_l for g in gens if g.rouge_l is not None]),
    }
    rouge = figures["rouge_l"].value
    out = {"score": 0.99 * figures["usable_rate"].value + 0.01 * (0.0 if math.isnan(rouge) else rouge)}
    for name, interval in figures.items():
        out |= {name: interval.value, f"{name}_lo": interval.lo, f"{name}_hi": interval.hi}
    return out | {
        "mean_think_chars": mean([float(len(g.think)) for g in gens]),
        "mean_answer_chars": mean([float(len(g.answer)) for g in gens]),
        "mean_new_tokens": mean([float(g.new_tokens) for g in gens]),
        "num_samples": float(len(gens)),
    }


@dataclass
class GenerationBudget:
    """`eval.max_new_tokens` resolved against the validation responses' token counts."""

    max_new_tokens: int
    p95: int
    p99: int
    warning: str | None = None


def resolve_max_new_tokens(setting: int | str, response_percentiles: dict[str, int], max_length: int) -> GenerationBudget:
    """`auto` = p99 of the responses plus a quarter, rounded up to 16, capped at `max_length`.

    A fixed number below the 95th percentile comes back with a warning: such generations can
    never close `</think>`, answer and stop, so format and stop rates would read 0 whatever
    the model learned.
    """
    p95, p99 = int(response_percentiles.get("p95", 0)), int(response_percentiles.get("p99", 0))
    if setting == "auto":
        budget = max(16, -(-int(p99 * 1.25) // 16) * 16)
        return GenerationBudget(min(budget, max_length), p95, p99)
    budget = int(setting)
    warning = None
    if budget < p95:
        warning = (f"eval.max_new_tokens={budget} is below the 95th percentile of the validation responses "
                   f"({p95} tokens; p99 {p99}): answers that need more can never close </think> or stop, "
                   "so format and stop rates undercount; use eval.max_new_tokens=auto")
    return GenerationBudget(budget, p95, p99, warning)


def store_budget(model_dir: str | Path, max_new_tokens: int) -> None:
    """Keep the run's resolved budget with the model, as the default of its `generation_config.json`
    (`max_new_tokens`): Hugging Face `generate` and vLLM take it as their default, and `auto` reads it back
    wherever the model is used without its validation data (`predict`, `serve-model`)."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["max_new_tokens"] = int(max_new_tokens)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_budget(setting: int | str, model_dir: str | Path, max_length: int) -> int:
    """`eval.max_new_tokens` for a model used on its own: a number as written; `auto` the budget its training run
    resolved (the one rule of `resolve_max_new_tokens`, kept by `store_budget`), else `max_length` for a model
    this project did not train."""
    if setting != "auto":
        return int(setting)
    path = Path(model_dir) / "generation_config.json"
    stored = json.loads(path.read_text(encoding="utf-8")).get("max_new_tokens") if path.is_file() else None
    return int(stored) if stored else max_length


PREDICTION_COLUMNS = ("id", "question", "reference_answer", "base_output", "think", "answer", "raw_output", "format_ok",
                      "stopped", "rouge_l", "new_tokens", "base_format_ok", "base_stopped")


def side_by_side(fine_tuned: list[dict[str, Any]], base: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per report question (its `id` as in the logged sets): the base model's output and outcome beside
    the fine-tune's think, answer and outcome.

    `raw_output` holds the fine-tune's text whenever it does not parse as one think block and an
    answer, so what the model said is never hidden behind empty think/answer cells.
    """
    by_question = {b["question"]: b for b in base or []}
    rows = []
    for g in fine_tuned:
        b = by_question.get(g["question"])
        rows.append({
            "id": g.get("id"), "question": g["question"], "reference_answer": g.get("reference_answer"),
            "base_output": b["text"] if b else None, "think": g["think"], "answer": g["answer"],
            "raw_output": None if g["format_ok"] else g["text"], "format_ok": g["format_ok"],
            "stopped": g["stopped"], "rouge_l": g.get("rouge_l"), "new_tokens": g["new_tokens"],
            "base_format_ok": b.get("format_ok") if b else None, "base_stopped": b.get("stopped") if b else None,
        })
    return rows
