"""Workspace hygiene: `qwen-sft gc` frees what the workdir no longer needs, never what a registered version needs.

Plain functions over the workdir; which folders registered versions came from is the caller's
answer (`tasks.tracking.registered_folders`), so this module knows nothing of MLflow. What goes:

- finished stage folders beyond the `keep` newest per stage (unless a registered version came from them);
- the checkpoints inside finished training folders (resume points: a finished run resumes nothing; its
  final model stays, and the selected checkpoint is in MLflow when `tracking.log_checkpoints` says so);
- damaged checkpoints moved aside by a resume (`damaged-checkpoint-N`) and half-done downloads;
- orphaned partial folders (no `_DONE.json`, and no process holds their lock) of every stage but
  training, whose partial folder is where a crashed run resumes: those go only with `partial=True`.

What counts as the project's (the rule): a folder is deleted only when it carries the marker
`.qwen-sft-owned` (`sft_core.stage_engine.OWNED`), which `run_in_folder` writes into every stage folder it
creates and a model download into its partial folder; checkpoints go only from inside such a folder.
A workdir where no stage folder carries it is not a workdir (`workdir=~` named the user's home, whose
own `model/` and `split/` folders gc deleted): it is refused and nothing is deleted. Folders written
before the marker existed are left alone (gc lists how many; delete them by hand if they are yours).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sft_core.errors import ConfigError
from sft_core.stage_engine import DONE, OWNED
from sft_core.stages import STAGE_FOLDERS, folder_stage


@dataclass
class GcPlan:
    delete: list[Path] = field(default_factory=list)  # whole folders
    kept: list[Path] = field(default_factory=list)
    reasons: dict[Path, str] = field(default_factory=dict)
    foreign: list[Path] = field(default_factory=list)  # folders without the marker: not the project's, never deleted

    def add(self, path: Path, reason: str) -> None:
        self.delete.append(path)
        self.reasons[path] = reason

    def reason(self, path: Path) -> str:
        return self.reasons.get(path, "damaged checkpoint")


@dataclass
class GcResult:
    """What `gc` deleted (with `dry_run`: would delete), what it kept, and the bytes that freed."""

    plan: GcPlan
    freed_bytes: int
    dry_run: bool


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


def owned(folder: Path) -> bool:
    """The folder was written by this project (it carries the marker)."""
    return (folder / OWNED).is_file()


def require_workdir(workdir: Path) -> None:
    """ConfigError (nothing touched) unless some stage folder of `workdir` carries the project's marker."""
    if not any(owned(p) for stage in STAGE_FOLDERS if (workdir / stage).is_dir() for p in (workdir / stage).iterdir()):
        raise ConfigError(f"{workdir} is not a qwen-sft workdir: none of its folders carries the {OWNED} marker "
                          "that qwen-sft writes into each folder it creates, so gc deletes nothing there (check "
                          "workdir, or --set workdir=...)")


def plan_gc(workdir: Path, keep: int, protected: set[Path], *, partial: bool = False) -> GcPlan:
    """What `gc` deletes: per stage folder, the finished folders past the `keep` newest (never one in `protected`,
    what a registered version came from), the resume points of finished trainings, what crashed runs left (a
    crashed training's folder only with `partial`: it resumes from it), unfinished downloads; never a folder
    without the project's marker, nor one whose lock a running stage holds."""
    if keep < 1:
        raise ValueError("--keep must be >= 1")
    require_workdir(workdir)
    protected = {p.resolve() for p in protected}
    plan = GcPlan()
    for stage in STAGE_FOLDERS:
        declared = folder_stage(stage)
        root = workdir / stage
        if not root.is_dir():
            continue
        plan.foreign += [p for p in root.iterdir() if p.is_dir() and not owned(p)]
        folders = [p for p in root.iterdir() if p.is_dir() and owned(p)]
        done = sorted((p for p in folders if (p / DONE).exists()), key=lambda p: (p / DONE).stat().st_mtime,
                      reverse=True)
        for i, folder in enumerate(done):
            if i < keep or folder.resolve() in protected:
                plan.kept.append(folder)
                for point in sorted(p for pattern in declared.resume_points for p in folder.glob(pattern)):
                    plan.add(point, "checkpoint of a finished training")
            else:
                plan.add(folder, f"older than the {keep} newest finished {stage} folder(s)")
        for folder in (p for p in folders if not (p / DONE).exists()):
            if not _unlocked(folder):
                plan.kept.append(folder)  # a run is working in it
            elif declared.keep_partial and not partial:
                plan.kept.append(folder)  # a crashed training resumes from it
                plan.delete.extend(c for c in folder.glob("damaged-checkpoint-*"))
            else:
                plan.add(folder, "left by a run that stopped before it finished")
    downloads = workdir / "downloads"
    if downloads.is_dir():
        for folder in downloads.glob("*.partial"):
            if owned(folder):
                plan.add(folder, "an unfinished download")
    return plan


def gc(workdir: Path, keep: int, protected: set[Path], dry_run: bool = False, partial: bool = False) -> GcResult:
    """Carry out `plan_gc` (unless `dry_run`)."""
    plan = plan_gc(workdir, keep, protected, partial=partial)
    freed = 0
    for folder in plan.delete:
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
    return GcResult(plan, freed, dry_run)
