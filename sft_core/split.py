"""Deterministic train/validation split, and the validation rows cut into selection and report sets.

- `shuffle` reproduces the tutorial exactly: ``random.seed(seed); random.shuffle(rows)``
  on the rows in source order, first ``int(n * fraction)`` rows train.
- `hash` puts each row in a bucket by a hash of its question, so a row keeps its side
  when the dataset grows (appending rows never moves an old row).
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Literal, TypeVar

from sft_core.errors import DataValidationError

T = TypeVar("T")


def split_rows(
    rows: list[T],
    *,
    method: Literal["shuffle", "hash"] = "shuffle",
    train_fraction: float = 0.9,
    seed: int = 42,
    key: str = "question",
) -> tuple[list[T], list[T]]:
    """Return (train, val) without mutating `rows`."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if method == "shuffle":
        shuffled = list(rows)
        random.seed(seed)  # the tutorial seeds the global RNG; do the same for identical order
        random.shuffle(shuffled)
        cut = int(len(shuffled) * train_fraction)
        return shuffled[:cut], shuffled[cut:]
    if method == "hash":
        train, val = [], []
        for row in rows:
            (train if hash_bucket(str(row[key]), seed) < train_fraction else val).append(row)  # type: ignore[index]
        return train, val
    raise ValueError(f"unknown split method {method!r} (use 'shuffle' or 'hash')")


def hash_bucket(text: str, seed: int = 42) -> float:
    """A stable number in [0, 1) for `text` (sha256, independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def question_id(question: str) -> str:
    """A question's id: the first 12 hex digits of the sha256 of its text (what the logged sets list)."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


def assign_validation(rows: list[T], selection_fraction: float, *, key: str = "question") -> tuple[list[T], list[T]]:
    """(selection, report): the validation rows cut in two sets that never share a question.

    The rule: rows ordered by the sha256 of their question (`question_id`, ties by the text), the first
    ``floor(n * selection_fraction)`` choose the checkpoint, the rest report the model's figures. Each set
    keeps at least one row when there are two or more and the fraction is above 0. The same validation rows
    always give the same sets, whatever their order in the file; a duplicated question (refused by
    validation) would land twice in the same set, never in both.
    """
    if not 0.0 <= selection_fraction < 1.0:
        raise ValueError(f"selection_fraction must be in [0, 1), got {selection_fraction}")
    order = sorted(range(len(rows)), key=lambda i: (question_id(str(rows[i][key])), str(rows[i][key])))  # type: ignore[index]
    cut = int(len(rows) * selection_fraction)
    if selection_fraction > 0 and len(rows) >= 2:
        cut = min(max(cut, 1), len(rows) - 1)
    chosen = set(order[:cut])
    # a question that appears twice goes wherever its first occurrence went
    first_side: dict[str, bool] = {}
    for i in order:
        first_side.setdefault(str(rows[i][key]), i in chosen)  # type: ignore[index]
    selection = [r for r in rows if first_side[str(r[key])]]  # type: ignore[index]
    report = [r for r in rows if not first_side[str(r[key])]]  # type: ignore[index]
    return selection, report


def check_split(train: list, val: list, *, method: str, train_fraction: float) -> None:
    """A split with an empty side cannot train (no training rows) or be evaluated and selected (no validation rows):
    say so, with the counts and what to do, instead of failing later on an empty file. Too little data for the
    split is a data problem, like too few rows: DataValidationError (exit 4)."""
    if train and val:
        return
    n = len(train) + len(val)
    side = "training" if not train else "validation"
    if method == "hash":
        fix = ("or set data.split_method=shuffle, which keeps a share of every dataset for validation" if not val
               else "or set data.split_method=shuffle")
    else:
        fix = f"at least {math.ceil(1 / train_fraction)} rows with data.train_fraction={train_fraction}, or raise it"
    raise DataValidationError(
        f"the {side} split is empty: the {method} split of {n} row{'s' if n != 1 else ''} (data.train_fraction="
        f"{train_fraction}) put {len(train)} in training and {len(val)} in validation, and a run needs both; add "
        f"rows ({fix})")
