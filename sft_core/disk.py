"""The workdir's disk: what is free, what a training run writes there, and a full disk recognised as such.

A stage that cannot fit is refused before it starts, and one that fills the disk anyway ends in one
message that names the folder and what is free (`sft_core.stage_engine.run_in_folder`).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from sft_core.config import PipelineConfig
from sft_core.errors import StorageError


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when a library wraps it in its own error (safetensors' SafetensorError)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(folder: Path) -> int:
    """Free bytes on `folder`'s device (of its nearest existing parent: the folder may not exist yet)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def free_space(folder: Path) -> str:
    """`free_bytes`, for a person to read."""
    return size_text(free_bytes(folder))


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def training_space(cfg: PipelineConfig, model_dir: str) -> int:
    """Bytes a training run writes: the final model, and `save_total_limit` + 1 checkpoints (one more while
    rotating, or the selected one kept), each the weights and the optimizer's two moments (~3x the weights)."""
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    trains_fp32 = cfg.model.dtype == "float32" or (cfg.model.dtype == "auto" and cfg.train.device == "cpu")
    if trains_fp32 and _stored_half(model_dir):  # bf16 on disk, fp32 when trained: checkpoints twice the size
        weights *= 2
    return weights + (cfg.train.save_total_limit + 1) * 3 * weights


def _stored_half(model_dir: str) -> bool:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        dtype = config.get("dtype") or config.get("torch_dtype") or ""  # transformers 5 writes `dtype`
    except (OSError, ValueError):
        return False
    return str(dtype).endswith(("bfloat16", "float16"))


def check_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start work that cannot fit, before hours of it are lost at the first checkpoint."""
    free = free_bytes(folder)
    if free < needed:
        raise StorageError(f"{what} needs about {size_text(needed)} in {folder}, and its device has {size_text(free)} "
                           "free; free some with `qwen-sft gc`, lower train.save_total_limit, or set workdir on a "
                           "larger disk")
