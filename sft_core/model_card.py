"""The model card of a registered version: what it is, what it was trained on, how well, how to use it.

One text serves as the version's ``README.md`` (in the logged model's artifacts) and as its MLflow
model-version description, so it stays within the registry's 5,000-character description limit:
the validation samples are shortened until it fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sft_core.config import PipelineConfig
from sft_core.sources import parse_data_source

DESCRIPTION_LIMIT = 5000  # characters: MLflow's model_versions.description column

# (metric, label, digits) in the order of the comparison table
CARD_METRICS = (
    ("eval/loss", "validation loss", 4),
    ("eval/perplexity", "validation perplexity", 2),
    ("eval/token_accuracy", "validation token accuracy", 4),
    ("gen/format_ok_rate", "think/answer format rate", 2),
    ("gen/stop_rate", "stop rate", 2),
    ("gen/rouge_l", "ROUGE-L (characters)", 4),
    ("gen/mean_new_tokens", "mean generated tokens", 1),
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


def fmt(value: Any, digits: int = 4) -> str:
    """One rounding rule for every figure a person reads (card, terminal table, summary)."""
    if value is None:
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:  # NaN
        return "—"
    return f"{number:.{digits}f}"


def metric_rows(fine_tuned: dict[str, float], base: dict[str, float]) -> list[tuple[str, str, str]]:
    """(metric, base, fine-tuned) rows, formatted, for every card metric the fine-tune has."""
    return [(name, fmt(base.get(name), digits), fmt(fine_tuned.get(name), digits))
            for name, _label, digits in CARD_METRICS if name in fine_tuned]


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
        "## Base against fine-tuned (validation split, greedy)",
        "| metric | base | fine-tuned |",
        "|---|---|---|",
        *[f"| {name} | {b} | {t} |" for name, b, t in metric_rows(f.fine_tuned, f.base)],
    ]
    if f.train_steps is not None:
        chosen = {"eval_gen_score": "the best generation score on the validation questions",
                  "eval_loss": "the lowest validation loss"}.get(f.selected_by or "", "the last step")
        lines += ["", f"{f.train_steps} optimizer steps; the checkpoint kept is the one with {chosen}."]
    if f.samples and sample_chars:
        lines += ["", "## Validation samples"]
        for i, s in enumerate(f.samples[:3], 1):
            lines += ["", f"**{i}. {_cut(s.get('question', ''), 200)}**", "",
                      f"- think: {_cut(s.get('think') or '(none)', sample_chars)}",
                      f"- answer: {_cut(s.get('answer') or s.get('text') or '(none)', sample_chars)}",
                      f"- format ok: {bool(s.get('format_ok'))}"]
    lines += [
        "", "## Use it",
        "```bash",
        f'qwen-sft predict --model {ref} "孩子发烧39度怎么办？"',
        "qwen-sft serve-model --alias production   # once promoted: an OpenAI API on http://127.0.0.1:5001/v1",
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


def _cut(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: max(n - 1, 0)] + "…"
