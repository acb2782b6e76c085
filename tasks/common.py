"""What every stage task shares: cache keys bound to the stage folder, result storage, logging."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

from sft_core.stages import DONE


def folder_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect cache key = the stage folder (itself keyed by input digests + config section + code version).

    No key (no cache) while the folder has no finished result, so a deleted or
    half-written folder is never served from Prefect's cache.
    """
    folder = parameters.get("folder")
    if folder is None or not (Path(folder) / DONE).exists():
        return None
    return "qwen-sft-" + hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:32]


def task_options(**extra: Any) -> dict[str, Any]:
    """Options for a cached stage task."""
    return {"cache_key_fn": folder_cache_key, "persist_result": True, **extra}
