"""The promotion gate's rule, as a plain function: a candidate's metrics against its base and production.

A candidate must beat the model it was fine-tuned from on the job (format adherence: a fine-tune
that does not answer in the think/answer form more often than its base has learned nothing
useful), and must not be worse than the current production model (eval loss, format rate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from sft_core.config import GateConfig

BASE_FORMAT = "base/gen/format_ok_rate"


@dataclass
class Check:
    metric: str
    candidate: float | None
    against: str  # "base" or "production"
    reference: float | None
    rule: str
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.metric} {self.candidate} vs {self.against} {self.reference} (needs {self.rule})"


def _check(metric: str, cand: dict, ref: dict, ref_metric: str, against: str, rule: str,
           ok: Callable[[float, float], bool]) -> Check:
    a, b = cand.get(metric), ref.get(ref_metric)
    return Check(metric, a, against, b, rule, a is not None and b is not None and ok(a, b))


def gate_checks(candidate: dict[str, float], production: dict[str, float] | None, gate: GateConfig) -> list[Check]:
    """Every check the candidate must pass; the base check only when the run measured its base."""
    checks = []
    if BASE_FORMAT in candidate:
        checks.append(_check("gen/format_ok_rate", candidate, candidate, BASE_FORMAT, "base", "> base",
                             lambda a, b: a > b))
    if production is not None:
        checks.append(_check("eval/loss", candidate, production, "eval/loss", "production",
                             f"<= production + {gate.max_eval_loss_increase}",
                             lambda a, b: a <= b + gate.max_eval_loss_increase))
        checks.append(_check("gen/format_ok_rate", candidate, production, "gen/format_ok_rate", "production",
                             f">= production + {gate.min_format_ok_delta}",
                             lambda a, b: a >= b + gate.min_format_ok_delta))
    return checks
