"""A run's evaluation report: which questions chose the checkpoint and which reported, each model's figures
with their intervals, and each report question's outcomes (what the promotion gate pairs).

Written by the flow as the `evaluation/report.json` artifact of the run; read back by the gate for the
candidate and for production.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sft_core.gate import ModelFigures
from sft_core.metrics import own_and_base

REPORT_VERSION = 1


def _read_jsonl(path: str | Path | None) -> list[dict]:
    """The rows of a predictions file; none for no file or an empty one (`sft_core.data.read_jsonl` refuses it)."""
    if not path:
        return []
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def _model_section(predictions: str | Path | None, losses: str | Path | None) -> dict[str, Any]:
    section: dict[str, Any] = {"generation": [{"id": p["id"], "format_ok": bool(p["format_ok"]),
                                               "stopped": bool(p["stopped"]), "rouge_l": p.get("rouge_l")}
                                              for p in _read_jsonl(predictions)]}
    if losses:
        found = json.loads(Path(losses).read_text(encoding="utf-8"))
        section["loss"] = [{"id": i, "loss_sum": s, "tokens": t}
                           for i, s, t in zip(found["ids"], found["loss_sums"], found["tokens"])]
    return section


def build_report(*, sets_file: str | Path, metrics: dict[str, float], predictions: str | Path,
                 losses: str | Path | None, base_predictions: str | Path | None = None,
                 base_losses: str | Path | None = None) -> dict[str, Any]:
    """The report of a run (see the module docstring)."""
    models = {"fine_tuned": _model_section(predictions, losses)}
    if base_predictions:
        models["base"] = _model_section(base_predictions, base_losses)
    return {"version": REPORT_VERSION, "sets": json.loads(Path(sets_file).read_text(encoding="utf-8")),
            "metrics": metrics, "models": models}


def figures_of(report: dict[str, Any] | None, metrics: dict[str, float], which: str = "fine_tuned") -> ModelFigures:
    """What the gate knows of one model of a run (`fine_tuned` or `base`): its headline metrics (the base's
    without their `base/` prefix) and, when the report has them, its per-question outcomes."""
    own, base = own_and_base(metrics)
    metrics = base if which == "base" else own
    section = (report or {}).get("models", {}).get(which)
    if not section:
        return ModelFigures(metrics)
    format_ok = {g["id"]: bool(g["format_ok"]) for g in section.get("generation", [])} or None
    losses = {x["id"]: (float(x["loss_sum"]), int(x["tokens"])) for x in section.get("loss", [])} or None
    return ModelFigures(metrics, format_ok=format_ok, losses=losses)
