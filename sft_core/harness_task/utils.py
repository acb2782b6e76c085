"""Metrics of the `qwen_sft_medical` lm-eval task: the same parse and ROUGE-L as the pipeline's generate stage."""

from sft_core.generate import parse_response, rouge_l_chars


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    parsed = parse_response(results[0])
    return {"format_ok": float(parsed.format_ok), "rouge_l": rouge_l_chars(parsed.answer, doc["answer"])}
