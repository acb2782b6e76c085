"""sft_core/workspace.py: what `qwen-sft gc` plans to delete and why (`plan_gc`), `gc` doing it, the marker rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

from sft_core.errors import ConfigError
from sft_core.results import Evaluated
from sft_core.stage_engine import DONE, OWNED, write_done
from sft_core.stages import STAGE_FOLDERS
from sft_core.workspace import GcPlan, GcResult, gc, owned, plan_gc, require_workdir


def _folder(workdir: Path, stage: str, name: str, *, done: bool = True, mtime: float | None = None,
            marked: bool = True, files: dict[str, int] | None = None) -> Path:
    """A stage folder as a run leaves it: its files, `_DONE.json` when it finished (at `mtime`), the project's
    marker."""
    assert stage in STAGE_FOLDERS or stage == "downloads"
    folder = workdir / stage / name
    folder.mkdir(parents=True)
    for rel, size in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"0" * size)
    if done:
        write_done(folder, Evaluated(key=name, folder=str(folder), metrics={}))
        if mtime is not None:
            os.utime(folder / DONE, (mtime, mtime))
    if marked:
        (folder / OWNED).write_text("written by qwen-sft\n", encoding="utf-8")
    return folder


def test_the_stage_folders_are_the_pipelines():
    assert STAGE_FOLDERS == ("ingest", "model", "validate", "split", "tokenize", "train", "evaluate", "generate",
                             "harness")


def test_the_keep_newest_finished_folders_of_each_stage_stay_and_the_older_go(tmp_path):
    old, mid, new = (_folder(tmp_path, "split", n, mtime=t) for n, t in (("old", 1000), ("mid", 2000), ("new", 3000)))
    lone = _folder(tmp_path, "validate", "lone", mtime=500)  # older than all, but the newest of its own stage
    plan = plan_gc(tmp_path, keep=2, protected=set())
    assert plan.delete == [old]
    assert plan.reason(old) == "older than the 2 newest finished split folder(s)"
    assert set(plan.kept) == {mid, new, lone}
    assert plan.foreign == []
    assert [p for p in plan_gc(tmp_path, keep=1, protected=set()).delete] == [mid, old], "newest first, by _DONE.json"


def test_a_protected_folder_is_never_planned_for_deletion_however_old(tmp_path):
    old = _folder(tmp_path, "evaluate", "old", mtime=1000)
    new = _folder(tmp_path, "evaluate", "new", mtime=2000)
    same_folder = tmp_path / "evaluate" / ".." / "evaluate" / "old"  # protected paths are compared resolved
    plan = plan_gc(tmp_path, keep=1, protected={same_folder})
    assert plan.delete == [] and set(plan.kept) == {old, new}
    assert plan_gc(tmp_path, keep=1, protected=set()).delete == [old]


def test_the_resume_points_of_a_finished_training_go_and_its_final_model_stays(tmp_path):
    trained = _folder(tmp_path, "train", "t", files={"checkpoint-4/optimizer.pt": 10, "checkpoint-8/optimizer.pt": 10,
                                                       "damaged-checkpoint-6/x": 1, "final/model.safetensors": 10})
    plan = plan_gc(tmp_path, keep=1, protected=set())
    assert plan.delete == [trained / "checkpoint-4", trained / "checkpoint-8", trained / "damaged-checkpoint-6"]
    assert {plan.reason(p) for p in plan.delete} == {"checkpoint of a finished training"}
    assert plan.kept == [trained]


def test_a_finished_folder_of_another_stage_keeps_its_checkpoint_named_files(tmp_path):
    folder = _folder(tmp_path, "evaluate", "e", files={"checkpoint-1/x": 1})
    assert plan_gc(tmp_path, keep=1, protected=set()).delete == [], "only training declares resume points"
    assert (folder / "checkpoint-1").exists()


def test_a_crashed_training_is_kept_to_resume_unless_partial_but_its_damaged_checkpoints_go(tmp_path):
    crashed = _folder(tmp_path, "train", "crashed", done=False,
                      files={"checkpoint-2/optimizer.pt": 10, "damaged-checkpoint-4/optimizer.pt": 10})
    plan = plan_gc(tmp_path, keep=1, protected=set())
    assert plan.kept == [crashed]
    assert plan.delete == [crashed / "damaged-checkpoint-4"] and plan.reason(plan.delete[0]) == "damaged checkpoint"
    plan = plan_gc(tmp_path, keep=1, protected=set(), partial=True)
    assert plan.delete == [crashed] and plan.kept == []
    assert plan.reason(crashed) == "left by a run that stopped before it finished"


def test_a_folder_another_stage_left_unfinished_goes_without_partial(tmp_path):
    half = _folder(tmp_path, "validate", "half", done=False, files={"valid.jsonl": 30})
    plan = plan_gc(tmp_path, keep=3, protected=set())
    assert plan.delete == [half] and plan.reason(half) == "left by a run that stopped before it finished"


def test_an_unfinished_folder_whose_lock_a_running_stage_holds_is_kept(tmp_path):
    running = _folder(tmp_path, "tokenize", "running", done=False)
    with FileLock(str(running) + ".lock"):
        plan = plan_gc(tmp_path, keep=1, protected=set(), partial=True)
        assert plan.kept == [running] and plan.delete == []
    assert plan_gc(tmp_path, keep=1, protected=set(), partial=True).delete == [running], "lock released: it goes"


def test_a_folder_without_the_marker_is_never_touched(tmp_path):
    _folder(tmp_path, "split", "ours", mtime=3000)
    theirs_old = _folder(tmp_path, "split", "theirs-old", mtime=1000, marked=False)
    theirs_half = _folder(tmp_path, "train", "theirs-half", done=False, marked=False, files={"checkpoint-1/x": 5})
    unowned_download = _folder(tmp_path, "downloads", "m.partial", done=False, marked=False)
    plan = plan_gc(tmp_path, keep=1, protected=set(), partial=True)
    assert set(plan.foreign) == {theirs_old, theirs_half}
    assert plan.delete == []
    gc(tmp_path, keep=1, protected=set(), partial=True)
    assert theirs_old.exists() and (theirs_half / "checkpoint-1").exists() and unowned_download.exists()


def test_an_owned_unfinished_download_goes(tmp_path):
    _folder(tmp_path, "model", "m", mtime=1000)
    download = _folder(tmp_path, "downloads", "qwen-main.partial", done=False)
    finished = _folder(tmp_path, "downloads", "qwen-main", done=False)  # not `*.partial`: a finished download
    plan = plan_gc(tmp_path, keep=1, protected=set())
    assert plan.delete == [download] and plan.reason(download) == "an unfinished download"
    assert finished not in plan.delete


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused(tmp_path, keep):
    _folder(tmp_path, "split", "s")
    with pytest.raises(ValueError, match="^--keep must be >= 1$"):
        plan_gc(tmp_path, keep=keep, protected=set())


# --- the marker rule ----------------------------------------------------------------------------------------

def test_owned_means_the_marker_file_is_there(tmp_path):
    assert owned(_folder(tmp_path, "split", "a"))
    assert not owned(_folder(tmp_path, "split", "b", marked=False))
    (tmp_path / "split" / "c" / OWNED).mkdir(parents=True)
    assert not owned(tmp_path / "split" / "c"), "a folder of that name is not the marker"
    assert OWNED == ".qwen-sft-owned"


def test_a_folder_where_no_stage_folder_carries_the_marker_is_not_a_workdir(tmp_path):
    home = tmp_path / "home"
    (home / "model" / "my-model").mkdir(parents=True)  # a user's own folders named like stages
    (home / "split" / "notes").mkdir(parents=True)
    (home / "downloads" / "x.partial").mkdir(parents=True)
    (home / "downloads" / "x.partial" / OWNED).touch()  # a download's marker does not make a workdir
    message = (f"{home} is not a qwen-sft workdir: none of its folders carries the {OWNED} marker that qwen-sft "
               "writes into each folder it creates, so gc deletes nothing there (check workdir, or --set workdir=...)")
    with pytest.raises(ConfigError) as err:
        require_workdir(home)
    assert str(err.value) == message
    with pytest.raises(ConfigError):
        gc(home, keep=1, protected=set(), partial=True)
    assert (home / "model" / "my-model").is_dir() and (home / "downloads" / "x.partial").is_dir()
    with pytest.raises(ConfigError):
        require_workdir(tmp_path / "empty")


def test_one_marked_stage_folder_makes_a_workdir(tmp_path):
    _folder(tmp_path, "harness", "h")
    assert require_workdir(tmp_path) is None


# --- gc ------------------------------------------------------------------------------------------------------

def _workdir_with_garbage(tmp_path: Path) -> tuple[Path, Path, Path]:
    old = _folder(tmp_path, "generate", "old", mtime=1000, files={"predictions.jsonl": 3000})
    _folder(tmp_path, "generate", "new", mtime=2000, files={"predictions.jsonl": 100})
    trained = _folder(tmp_path, "train", "t", files={"checkpoint-2/optimizer.pt": 5000, "final/model.safetensors": 7})
    return old, trained / "checkpoint-2", trained / "final"


def test_a_dry_run_deletes_nothing_and_counts_what_it_would_free(tmp_path):
    old, checkpoint, _ = _workdir_with_garbage(tmp_path)
    done_size = (old / DONE).stat().st_size + (old / OWNED).stat().st_size
    result = gc(tmp_path, keep=1, protected=set(), dry_run=True)
    assert isinstance(result, GcResult) and isinstance(result.plan, GcPlan) and result.dry_run is True
    assert result.plan.delete == [checkpoint, old], "stage by stage, in the pipeline's order"
    assert result.freed_bytes == 3000 + done_size + 5000
    assert old.exists() and checkpoint.exists()


def test_gc_deletes_the_plan_and_frees_what_the_dry_run_said(tmp_path):
    old, checkpoint, final = _workdir_with_garbage(tmp_path)
    dry = gc(tmp_path, keep=1, protected=set(), dry_run=True)
    result = gc(tmp_path, keep=1, protected=set())
    assert result.dry_run is False and result.freed_bytes == dry.freed_bytes
    assert result.plan.delete == dry.plan.delete
    assert not old.exists() and not checkpoint.exists()
    assert (final / "model.safetensors").exists() and (tmp_path / "generate" / "new" / DONE).exists()
    again = gc(tmp_path, keep=1, protected=set())
    assert again.plan.delete == [] and again.freed_bytes == 0, "nothing left to free"
