"""The model card of a registered version: what it is, what it was trained on, how well, how to use it.

One text serves as the version's ``README.md`` (in the logged model's artifacts) and as its MLflow
model-version description, so it stays within the registry's 5,000-character description limit:
the validation samples are shortened until it fits.
"""

from __future__ import annotations

import html
import shlex
from dataclasses import dataclass, field
from typing import Any

from sft_core.config import PipelineConfig
from sft_core.metrics import (
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    EVAL_TOKEN_ACCURACY,
    FORMAT_OK,
    MEAN_NEW_TOKENS,
    ROUGE_L,
    STOP,
    USABLE,
    fmt,
    sample_size,
    shown,
)
from sft_core.sources import parse_data_source

DESCRIPTION_LIMIT = 5000  # characters: MLflow's model_versions.description column

# (metric, label) in the order of the comparison table; digits and intervals: sft_core.metrics
CARD_METRICS = (
    (EVAL_LOSS, "validation loss"),
    (EVAL_PERPLEXITY, "validation perplexity"),
    (EVAL_TOKEN_ACCURACY, "validation token accuracy"),
    (FORMAT_OK, "think/answer format rate"),
    (STOP, "stop rate"),
    (USABLE, "usable answers (well-formed and stopped)"),
    (ROUGE_L, "ROUGE-L (characters, answer only)"),
    (MEAN_NEW_TOKENS, "mean generated tokens"),
)

DISCLAIMER = ("This model is a research and engineering artefact, not a medical device. Its answers can be wrong, "
              "incomplete or dangerous; it must not be used for diagnosis or treatment, and it does not replace a "
              "doctor. In an emergency, call the local emergency number.")


@dataclass
class CardFacts:
    """What the card says, gathered by the flow (plain values, no MLflow objects)."""

    registered_name: str
    version: int | None
    dataset_digest: str
    train_rows: int
    val_rows: int
    fine_tuned: dict[str, float]
    base: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)  # question, think, answer, format_ok
    train_steps: int | None = None
    selected_by: str | None = None
    select_rows: int = 0  # validation questions that chose the checkpoint
    report_rows: int = 0  # validation questions the figures are measured on
    kept_step: int | None = None  # the optimizer step of the checkpoint that became the model
    config: str | None = None  # the preset (or file) and `--set` overrides the run was made with
    overrides: list[str] = field(default_factory=list)


def metric_rows(fine_tuned: dict[str, float], base: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(metric, base, fine-tuned, n) rows, formatted (`0.86 [0.42, 0.97]`), for every card metric the fine-tune has."""
    rows = []
    for name, _label in CARD_METRICS:
        if name in fine_tuned:
            n = sample_size(name, fine_tuned)
            rows.append((name, shown(name, base), shown(name, fine_tuned), fmt(n, 0) if n is not None else "—"))
    return rows


def render_model_card(cfg: PipelineConfig, facts: CardFacts, *, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as Markdown, at most `limit` characters."""
    for sample_chars in (600, 300, 150, 60, 0):
        text = _render(cfg, facts, sample_chars)
        if len(text) <= limit:
            return text
    return text[: limit - 1] + "…"


def _render(cfg: PipelineConfig, f: CardFacts, sample_chars: int) -> str:
    ref = f"models:/{f.registered_name}/{f.version}" if f.version else f"models:/{f.registered_name}@candidate"
    d, m = cfg.data, cfg.model
    lines = [
        f"# {f.registered_name}" + (f" v{f.version}" if f.version else ""),
        "",
        f"Full-parameter fine-tune of `{m.source}`" + (f" (revision `{m.revision}`)" if m.revision else "")
        + " that answers a medical question in Chinese as `<think>reasoning</think>` followed by an answer, "
        "and stops on `<|im_end|>`.",
        "",
        "## Data",
        f"- source: `{d.source}`" + (f" (subset `{d.subset}`, split `{d.split}`)" if parse_data_source(d.source).is_hub else ""),
        f"- digest (sha256 of the canonical rows): `{f.dataset_digest}`",
        f"- split: {f.train_rows} train / {f.val_rows} validation ({d.split_method}, seed {d.split_seed}, "
        f"train fraction {d.train_fraction})",
        f"- validated by the Great Expectations suite `{d.suite}` (policy `{d.validation_policy}`)",
        "",
        "## Base against fine-tuned (report questions, greedy)",
        f"Measured on {f.report_rows} validation questions that never chose the checkpoint ({f.select_rows} others "
        "did); 95 % intervals in brackets (Wilson for rates, bootstrap for ROUGE-L), n questions.",
        "",
        "| metric | base | fine-tuned | n |",
        "|---|---|---|---|",
        *[f"| {name} | {b} | {t} | {n} |" for name, b, t, n in metric_rows(f.fine_tuned, f.base)],
    ]
    if f.train_steps is not None:
        lines += ["", kept_line(f)]
    if f.samples and sample_chars:
        lines += ["", "## Samples (report questions)"]
        for i, s in enumerate(f.samples[:3], 1):
            lines += ["", f"**{i}. {_text(s.get('question', ''), 200)}**", "",
                      f"- think: {_text(s.get('think') or '(none)', sample_chars)}",
                      f"- answer: {_text(s.get('answer') or s.get('text') or '(none)', sample_chars)}",
                      f"- format ok: {bool(s.get('format_ok'))}"]
    args = command_args(f)
    lines += [
        "", "## Use it",
        "```bash",
        f'qwen-sft predict {args} --model {ref} "孩子发烧39度怎么办？"',
        f"qwen-sft serve-model {args} --alias production   # once promoted: an OpenAI API on http://127.0.0.1:5001/v1",
        "```",
        "With transformers: download the version (`mlflow artifacts download -u " + ref + "`), then "
        "`AutoModelForCausalLM.from_pretrained(folder)` and `apply_chat_template(messages, "
        "add_generation_prompt=True)` with the system prompt below; the saved generation config stops on "
        "`<|im_end|>`.",
        "",
        f"System prompt: `{d.system_prompt}`",
        "",
        "## Intended use",
        "Demonstrating and evaluating a fine-tuning pipeline for medical question answering with visible "
        "reasoning; research on such assistants under expert supervision.",
        "",
        "## Medical disclaimer",
        DISCLAIMER,
        "",
        "## Resolved config",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"


def kept_line(f: CardFacts) -> str:
    """Which checkpoint became the model: its step, and the rule that chose it."""
    chosen = {"eval_gen_score": "the most usable answers on the selection questions",
              "eval_loss": "the lowest validation loss on the selection questions"}.get(f.selected_by or "")
    if chosen is None:
        return f"{f.train_steps} optimizer steps; the model is the last step's weights (step {f.train_steps})."
    step = f.kept_step if f.kept_step is not None else f.train_steps
    return f"{f.train_steps} optimizer steps; the model is the checkpoint of step {step}, the one with {chosen}."


def command_args(f: CardFacts) -> str:
    """`-c PRESET --set k=v ...` as the run was made: what `predict` and `serve-model` need to find the same
    registry, store and prompt."""
    parts = ["-c", f.config or "CONFIG"]
    for override in f.overrides:
        parts += ["--set", override]
    return shlex.join(parts)


def _text(text: str, n: int) -> str:
    """Free text (questions, model output) shortened, with `<` and `>` escaped: Markdown viewers (MLflow's UI,
    the hub) render a bare `<think>` as an HTML tag and show nothing."""
    return html.escape(_cut(text, n), quote=False)


def _cut(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: max(n - 1, 0)] + "…"
