"""Deterministic train/validation split.

- `shuffle` reproduces the tutorial exactly: ``random.seed(seed); random.shuffle(rows)``
  on the rows in source order, first ``int(n * fraction)`` rows train.
- `hash` puts each row in a bucket by a hash of its question, so a row keeps its side
  when the dataset grows (appending rows never moves an old row).
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal, TypeVar

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
