"""What each stage hands to the next: typed results, also what a stage folder's `_DONE.json` holds.

The ground floor of the stage modules: plain dataclasses with no project imports, so the library
(`sft_core.train` returns a `Trained`), the stage engine and the stage declarations all read them
without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(kw_only=True)
class Result:
    """What every stage result has: its key (None: not cached), its folder, how long its body took."""

    key: str | None
    folder: str
    seconds: float = 0.0
    reused: bool = field(default=False, compare=False)  # found done (not stored)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("reused")
        return data

    def own_fields(self) -> dict[str, Any]:
        """The fields of this kind of result (what a stage body returns): without key, folder and timing."""
        data = self.to_json()
        for name in ("key", "folder", "seconds"):
            data.pop(name)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        """The result stored in `data`; ValueError when it lacks a field (written by older code)."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not required <= set(data):
            raise ValueError(f"{cls.__name__} record lacks {sorted(required - set(data))}")
        return cls(**{k: v for k, v in data.items() if k in names and k != "reused"})


@dataclass(kw_only=True)
class Ingested(Result):
    raw: str
    row_numbers: str
    digest: str  # sha256 of the canonical rows
    rows: int
    source: str
    location: str
    extra_columns: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Validated(Result):
    valid: str
    digest: str
    good_rows: int
    bad_rows: int
    report: str | None = None
    docs: str | None = None
    quarantine: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Split(Result):
    """train / val (the tutorial's 90/10), and val cut into the selection and report sets."""

    train: str
    val: str
    train_rows: int
    val_rows: int
    train_digest: str
    val_digest: str
    select: str
    report: str
    select_rows: int
    report_rows: int
    sets: str  # validation_sets.json: the rule, the counts and the question ids of each set
    sets_digest: str  # of the two sets' question ids: what the stages after the split are keyed on


@dataclass(kw_only=True)
class BaseModel(Result):
    model_dir: str


@dataclass(kw_only=True)
class Tokenized(Result):
    """The tokenized train, selection and report sets (`save_to_disk` folders), their statistics (and the
    whole validation split's, which sizes the generation budget), and the question ids of the kept rows."""

    train_ds: str
    select_ds: str
    report_ds: str
    stats: dict[str, Any]
    ids: str  # ids.json: {"select": [...], "report": [...]}, the question id of each row of those datasets

    @property
    def val_response_lengths(self) -> dict[str, int]:
        return self.stats["val"].get("response_length_percentiles", {})


@dataclass(kw_only=True)
class Trained(Result):
    output_dir: str
    final_model_dir: str
    global_step: int
    epochs: float
    train_loss: float | None
    best_checkpoint: str | None  # the checkpoint the final model is, when one was selected
    selected_by: str | None  # the metric that chose it (eval_gen_score, eval_loss); None: the last step
    best_value: float | None
    resumed_from: str | None
    metrics_file: str

    @property
    def model_dir(self) -> str:
        return self.final_model_dir


@dataclass(kw_only=True)
class Evaluated(Result):
    metrics: dict[str, float]
    losses: str | None = None  # losses.json: each report question's id, summed loss and supervised tokens


@dataclass(kw_only=True)
class Generated(Result):
    predictions: str
    metrics: dict[str, float]


@dataclass(kw_only=True)
class Harnessed(Result):
    metrics: dict[str, float]
    samples: str
    results: str
