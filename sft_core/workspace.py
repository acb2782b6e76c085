"""Workspace hygiene: `qwen-sft gc` frees what the workdir no longer needs, never what a registered version needs.

Plain functions over the workdir; which folders registered versions came from is the caller's
answer (`tasks.tracking.registered_folders`), so this module knows nothing of MLflow. What goes:

- finished stage folders beyond the `keep` newest per stage (unless a registered version came from them);
- the checkpoints inside finished training folders (resume points: a finished run resumes nothing; its
  final model stays, and the selected checkpoint is in MLflow when `tracking.log_checkpoints` says so);
- damaged checkpoints moved aside by a resume (`damaged-checkpoint-N`) and half-done downloads;
- orphaned partial folders (no `_DONE.json`, and no process holds their lock) of every stage but
  training, whose partial folder is where a crashed run resumes: those go only with `partial=True`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sft_core.stages import DONE, STAGE_FOLDERS


@dataclass
class GcPlan:
    delete: list[Path] = field(default_factory=list)  # whole folders
    kept: list[Path] = field(default_factory=list)
    reasons: dict[Path, str] = field(default_factory=dict)

    def add(self, path: Path, reason: str) -> None:
        self.delete.append(path)
        self.reasons[path] = reason


def _unlocked(folder: Path) -> bool:
    """No process holds the folder's stage lock (a run that is still going holds it)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


def plan_gc(workdir: Path, keep: int, protected: set[Path], *, partial: bool = False) -> GcPlan:
    if keep < 1:
        raise ValueError("--keep must be >= 1")
    protected = {p.resolve() for p in protected}
    plan = GcPlan()
    for stage in STAGE_FOLDERS:
        root = workdir / stage
        if not root.is_dir():
            continue
        folders = [p for p in root.iterdir() if p.is_dir()]
        done = sorted((p for p in folders if (p / DONE).exists()), key=lambda p: (p / DONE).stat().st_mtime,
                      reverse=True)
        for i, folder in enumerate(done):
            if i < keep or folder.resolve() in protected:
                plan.kept.append(folder)
                if stage == "train":
                    for ckpt in sorted([*folder.glob("checkpoint-*"), *folder.glob("damaged-checkpoint-*")]):
                        plan.add(ckpt, "checkpoint of a finished training")
            else:
                plan.add(folder, f"older than the {keep} newest finished {stage} folder(s)")
        for folder in (p for p in folders if not (p / DONE).exists()):
            if not _unlocked(folder):
                plan.kept.append(folder)  # a run is working in it
            elif stage == "train" and not partial:
                plan.kept.append(folder)  # a crashed training resumes from it
                plan.delete.extend(c for c in folder.glob("damaged-checkpoint-*"))
            else:
                plan.add(folder, "left by a run that stopped before it finished")
    downloads = workdir / "downloads"
    if downloads.is_dir():
        for folder in downloads.glob("*.partial"):
            plan.add(folder, "an unfinished download")
    return plan


def gc(workdir: Path, keep: int, protected: set[Path], dry_run: bool = False, partial: bool = False) -> dict:
    plan = plan_gc(workdir, keep, protected, partial=partial)
    freed = 0
    for folder in plan.delete:
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
    return {"deleted": [str(p) for p in plan.delete], "reasons": {str(k): v for k, v in plan.reasons.items()},
            "kept": [str(p) for p in plan.kept], "bytes": freed, "dry_run": dry_run}
