"""Workspace hygiene: `qwen-sft gc` deletes old stage folders, never what a registered version needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from sft_core.config import PipelineConfig
from sft_core.stages import DONE, STAGE_VERSIONS
from tasks import tracking


def protected_folders(cfg: PipelineConfig) -> set[Path]:
    """Train folders of runs that a registered model version points to."""
    c = tracking.client(cfg)
    keep: set[Path] = set()
    for run_id in tracking.registered_sources(cfg):
        try:
            tag = c.get_run(run_id).data.tags.get("qwen_sft.logged.train", "")
        except Exception:
            continue
        if tag:
            keep.add(Path(tag.rsplit(":", 1)[0]).resolve())
    return keep


def plan_gc(cfg: PipelineConfig, keep: int) -> tuple[list[Path], list[Path]]:
    """(to delete, kept) finished stage folders: the `keep` newest per stage + protected ones survive.

    Unfinished folders (no result yet: running, or a crashed train that can resume) are left alone.
    """
    if keep < 1:
        raise ValueError("--keep must be >= 1")
    protected = protected_folders(cfg)
    delete, kept = [], []
    for stage in STAGE_VERSIONS:
        root = cfg.workdir_path / stage
        if not root.is_dir():
            continue
        done = sorted((p for p in root.iterdir() if (p / DONE).exists()), key=lambda p: (p / DONE).stat().st_mtime,
                      reverse=True)
        for i, folder in enumerate(done):
            (kept if i < keep or folder.resolve() in protected else delete).append(folder)
    return delete, kept


def gc(cfg: PipelineConfig, keep: int, dry_run: bool = False) -> dict:
    delete, kept = plan_gc(cfg, keep)
    freed = 0
    for folder in delete:
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if not dry_run:
            shutil.rmtree(folder)
    return {"deleted": [str(p) for p in delete], "kept": [str(p) for p in kept], "bytes": freed, "dry_run": dry_run}
