"""Workspace hygiene: `qwen-sft gc` deletes old stage folders, never what a registered version needs.

Plain functions over the workdir; which folders registered versions came from is the caller's
answer (`tasks.tracking.registered_folders`), so this module knows nothing of MLflow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sft_core.stages import DONE, STAGE_FOLDERS


def plan_gc(workdir: Path, keep: int, protected: set[Path]) -> tuple[list[Path], list[Path]]:
    """(to delete, kept) finished stage folders: the `keep` newest per stage + the protected ones survive.

    Unfinished folders (no result yet: running, or a crashed train that can resume) are left alone.
    """
    if keep < 1:
        raise ValueError("--keep must be >= 1")
    protected = {p.resolve() for p in protected}
    delete, kept = [], []
    for stage in STAGE_FOLDERS:
        root = workdir / stage
        if not root.is_dir():
            continue
        done = sorted((p for p in root.iterdir() if (p / DONE).exists()), key=lambda p: (p / DONE).stat().st_mtime,
                      reverse=True)
        for i, folder in enumerate(done):
            (kept if i < keep or folder.resolve() in protected else delete).append(folder)
    return delete, kept


def gc(workdir: Path, keep: int, protected: set[Path], dry_run: bool = False) -> dict:
    delete, kept = plan_gc(workdir, keep, protected)
    freed = 0
    for folder in delete:
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if not dry_run:
            shutil.rmtree(folder)
    return {"deleted": [str(p) for p in delete], "kept": [str(p) for p in kept], "bytes": freed, "dry_run": dry_run}
