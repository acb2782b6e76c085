"""sft_core/checkpoints.py: a checkpoint's manifest and what makes it unusable, the one to resume from, the newest
whole step, the callbacks that write manifests and stop on a NaN loss, and the refusal to register a NaN model."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sft_core.checkpoints import (
    MANIFEST,
    check_registrable,
    checkpoint_problem,
    checkpoint_step,
    last_checkpoint,
    make_checksum_callback,
    make_finite_loss_callback,
    newest_whole_step,
    non_finite_weights,
    write_manifest,
)
from sft_core.errors import NonFiniteError

NAN, INF = float("nan"), float("inf")
WEIGHTS = {"lm_head.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "norm.weight": torch.ones(4)}


def _checkpoint(out: Path, step: int, *, manifest: bool = True) -> Path:
    """A checkpoint folder as the Trainer saves one: its state, safetensors weights, torch pickles, a config, a
    file in a subfolder, and (once all of it is written) the manifest."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
    save_file(WEIGHTS, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3}]}, ckpt / "optimizer.pt")
    torch.save({"python": 1}, ckpt / "rng_state.pth")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2", "step": step}), encoding="utf-8")
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "notes.txt").write_text("kept with the checkpoint\n", encoding="utf-8")
    if manifest:
        write_manifest(ckpt)
    return ckpt


# a stretch of each file's content (for a torch pickle: of the pickled data, not of the zip's directory)
CONTENT = {"model.safetensors": None, "optimizer.pt": b"param_groups", "rng_state.pth": b"python",
           "config.json": b"qwen2", "extra/notes.txt": b"kept"}


def _flip_a_byte(path: Path, name: str = "model.safetensors") -> None:
    """One byte of the file's content changed in place, its size unchanged (a bad disk, a stray write); for the
    weights, a byte of the last tensor's data."""
    data = bytearray(path.read_bytes())
    at = -3 if CONTENT[name] is None else data.index(CONTENT[name])
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _differs(ckpt: Path, name: str) -> str:
    return f"{name}: its {(ckpt / name).stat().st_size:,} bytes differ from the ones saved ({MANIFEST})"


# --- checkpoint_step -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "step"), [("checkpoint-0", 0), ("checkpoint-40", 40),
                                            ("/w/train/checkpoint-1200", 1200),
                                            (Path("out") / "damaged-checkpoint-8", 8)])
def test_checkpoint_step_is_the_number_after_the_last_dash_of_the_folder_name(path, step):
    assert checkpoint_step(path) == step


# --- write_manifest ------------------------------------------------------------------------------------------

def test_the_manifest_lists_every_file_but_itself_and_temporary_files_in_sha256sum_format(tmp_path):
    ckpt = _checkpoint(tmp_path, 4, manifest=False)
    (ckpt / "scheduler.pt.tmp").write_bytes(b"half written")
    manifest = write_manifest(ckpt)
    assert manifest == ckpt / MANIFEST and not (ckpt / (MANIFEST + ".tmp")).exists()
    lines = manifest.read_text(encoding="utf-8").splitlines()
    names = [line.split("  ", 1)[1] for line in lines]
    assert names == ["config.json", "extra/notes.txt", "model.safetensors", "optimizer.pt", "rng_state.pth",
                     "trainer_state.json"], "sorted, subfolders as posix paths, no .tmp, not the manifest itself"
    for line in lines:
        digest, name = line.split("  ", 1)
        assert digest == hashlib.sha256((ckpt / name).read_bytes()).hexdigest(), name
    again = write_manifest(ckpt)
    assert again.read_text(encoding="utf-8").splitlines() == lines, "writing it again lists the same files"


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils' sha256sum is not on this machine")
def test_the_manifest_is_what_sha256sum_checks_by_hand(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    ok = subprocess.run(["sha256sum", "-c", MANIFEST], check=False, cwd=ckpt, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _flip_a_byte(ckpt / "model.safetensors")
    bad = subprocess.run(["sha256sum", "-c", MANIFEST], check=False, cwd=ckpt, capture_output=True, text=True)
    assert bad.returncode != 0 and "model.safetensors: FAILED" in bad.stdout


# --- checkpoint_problem --------------------------------------------------------------------------------------

def test_an_intact_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path, 4)) is None


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng_state.pth", "config.json",
                                  "extra/notes.txt"])
def test_a_flipped_byte_in_any_file_is_named_by_the_manifest(tmp_path, name):
    """Same size, bytes changed in place: each format still parses (the weights would read as NaN), the manifest
    catches it."""
    ckpt = _checkpoint(tmp_path, 4)
    _flip_a_byte(ckpt / name, name)
    assert checkpoint_problem(ckpt) == _differs(ckpt, name)


def test_a_truncated_safetensors_file_is_caught_by_its_header(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    weights = ckpt / "model.safetensors"
    whole = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-7])
    assert checkpoint_problem(ckpt) == f"model.safetensors: truncated: {whole - 7} of {whole} bytes"


def test_a_safetensors_header_longer_than_its_file_or_unreadable_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    weights = ckpt / "model.safetensors"
    weights.write_bytes((1000).to_bytes(8, "little") + b"{}" + b"\0" * 10)
    assert checkpoint_problem(ckpt) == "model.safetensors: header of 1000 bytes in a 20-byte file"
    weights.write_bytes(b"\x01\x02")
    assert checkpoint_problem(ckpt).startswith("model.safetensors: unreadable header (")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_a_truncated_torch_pickle_is_not_a_zip_archive(tmp_path, name):
    """A cut scheduler.pt or rng_state.pth failed every re-run with a traceback: it is named instead."""
    ckpt = _checkpoint(tmp_path, 4)
    path = ckpt / name
    path.write_bytes(path.read_bytes()[:-200])
    assert checkpoint_problem(ckpt) == f"{name}: File is not a zip file"


def test_a_truncated_file_of_no_known_format_is_caught_by_the_manifest(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    config = ckpt / "config.json"
    config.write_bytes(config.read_bytes()[:5])
    assert checkpoint_problem(ckpt) == _differs(ckpt, "config.json")


def test_a_cut_or_missing_trainer_state_is_named_with_its_parse_error(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    state = ckpt / "trainer_state.json"
    state.write_text('{"global_step": 4', encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads(state.read_text(encoding="utf-8"))
    assert checkpoint_problem(ckpt) == f"trainer_state.json: {err.value}"
    state.unlink()
    assert checkpoint_problem(ckpt) == f"trainer_state.json: [Errno 2] No such file or directory: '{state}'"


def test_a_missing_file_is_named_as_listed_in_the_manifest(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    (ckpt / "extra" / "notes.txt").unlink()
    assert checkpoint_problem(ckpt) == f"extra/notes.txt: missing (listed in {MANIFEST})"
    (ckpt / "optimizer.pt").unlink()
    assert checkpoint_problem(ckpt) == f"extra/notes.txt: missing (listed in {MANIFEST})", "the first listed first"


def test_a_checkpoint_without_weights_or_without_its_manifest_is_not_whole(tmp_path):
    cut = _checkpoint(tmp_path, 4)
    (cut / MANIFEST).unlink()
    assert checkpoint_problem(cut) == f"no {MANIFEST} (the save was cut short)"
    bare = _checkpoint(tmp_path, 8)
    (bare / "model.safetensors").unlink()
    assert checkpoint_problem(bare) == "no safetensors weights"


def test_an_unreadable_manifest_line_is_quoted(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    with (ckpt / MANIFEST).open("a", encoding="utf-8") as f:
        f.write("not a checksum line\n")
    assert checkpoint_problem(ckpt) == f"{MANIFEST}: unreadable line 'not a checksum line'"


def test_a_file_the_manifest_does_not_list_makes_the_checkpoint_not_whole(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    (ckpt / "model-00002-of-00002.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    problem = checkpoint_problem(ckpt)
    assert problem is not None and "model-00002-of-00002.safetensors" in problem


# --- last_checkpoint -----------------------------------------------------------------------------------------

def test_no_output_folder_or_no_checkpoint_means_nothing_to_resume(tmp_path):
    said: list[str] = []
    assert last_checkpoint(tmp_path / "not-there", warn=said.append) is None
    assert last_checkpoint(tmp_path, warn=said.append) is None
    assert said == []


def test_the_newest_intact_checkpoint_is_resumed_by_step_not_by_name(tmp_path):
    for step in (9, 10, 2):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-best").mkdir()  # not a step: ignored
    (tmp_path / "checkpoint-99").write_text("a file, not a folder", encoding="utf-8")
    said: list[str] = []
    assert last_checkpoint(tmp_path, warn=said.append) == str(tmp_path / "checkpoint-10")
    assert said == [] and (tmp_path / "checkpoint-best").is_dir() and (tmp_path / "checkpoint-99").is_file()


def test_a_damaged_newest_checkpoint_is_moved_aside_with_a_warning_and_the_one_before_resumed(tmp_path):
    _checkpoint(tmp_path, 4)
    newest = _checkpoint(tmp_path, 8)
    _flip_a_byte(newest / "model.safetensors")
    problem = checkpoint_problem(newest)
    (tmp_path / "damaged-checkpoint-8").mkdir()  # an older one set aside under the same name: replaced
    (tmp_path / "damaged-checkpoint-8" / "old").write_text("x", encoding="utf-8")
    said: list[str] = []
    assert last_checkpoint(tmp_path, warn=said.append) == str(tmp_path / "checkpoint-4")
    assert said == [(f"warning: {newest} is damaged ({problem}); resuming from an earlier one, it is kept as "
                     "damaged-checkpoint-8")]
    aside = tmp_path / "damaged-checkpoint-8"
    assert not newest.exists() and sorted(p.name for p in aside.iterdir()) == sorted(
        ["config.json", "extra", "model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json", MANIFEST])
    assert last_checkpoint(tmp_path, warn=said.append) == str(tmp_path / "checkpoint-4") and len(said) == 1, \
        "the set-aside folder is never looked at again"


def test_a_checkpoint_still_being_saved_is_skipped_but_left_in_place(tmp_path):
    """No trainer_state.json yet: a save in progress (another rank), not a damaged checkpoint."""
    _checkpoint(tmp_path, 4)
    saving = tmp_path / "checkpoint-8"
    saving.mkdir()
    save_file(WEIGHTS, str(saving / "model.safetensors"))
    said: list[str] = []
    assert last_checkpoint(tmp_path, warn=said.append) == str(tmp_path / "checkpoint-4")
    assert said == [] and saving.is_dir() and not (tmp_path / "damaged-checkpoint-8").exists()


def test_when_every_checkpoint_is_damaged_training_starts_over(tmp_path):
    for step in (4, 8):
        (_checkpoint(tmp_path, step) / MANIFEST).unlink()
    said: list[str] = []
    assert last_checkpoint(tmp_path, warn=said.append) is None
    assert [line.split(" is damaged ")[0] for line in said] == [f"warning: {tmp_path / 'checkpoint-8'}",
                                                                f"warning: {tmp_path / 'checkpoint-4'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged-checkpoint-4", "damaged-checkpoint-8"]


# --- newest_whole_step ---------------------------------------------------------------------------------------

def test_the_newest_whole_step_is_the_newest_checkpoint_with_a_manifest(tmp_path):
    assert newest_whole_step(tmp_path / "not-there") == 0
    assert newest_whole_step(tmp_path) == 0
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, manifest=False)  # still being saved
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-x" / MANIFEST).write_text("", encoding="utf-8")
    assert newest_whole_step(tmp_path) == 10
    write_manifest(tmp_path / "checkpoint-12")
    assert newest_whole_step(tmp_path) == 12


# --- the Trainer callbacks -----------------------------------------------------------------------------------

def test_the_checksum_callback_writes_the_saved_checkpoints_manifest_on_the_main_process(tmp_path):
    callback = make_checksum_callback()
    ckpt = _checkpoint(tmp_path, 6, manifest=False)
    args, control = SimpleNamespace(output_dir=str(tmp_path)), object()
    other_rank = SimpleNamespace(is_world_process_zero=False, global_step=6)
    assert callback.on_save(args, other_rank, control) is control
    assert not (ckpt / MANIFEST).exists(), "only the main process writes it"
    main = SimpleNamespace(is_world_process_zero=True, global_step=6)
    assert callback.on_save(args, main, control) is control
    assert checkpoint_problem(ckpt) is None and newest_whole_step(tmp_path) == 6
    no_folder = SimpleNamespace(is_world_process_zero=True, global_step=7)
    assert callback.on_save(args, no_folder, control) is control  # nothing saved at that step: nothing written
    assert not (tmp_path / "checkpoint-7").exists()


@pytest.mark.parametrize(("loss", "shown"), [(NAN, "nan"), (INF, "inf"), (-INF, "-inf"), ("nan", "nan")])
def test_the_finite_loss_callback_stops_at_the_first_non_finite_training_loss(tmp_path, loss, shown):
    callback = make_finite_loss_callback()
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=7)
    with pytest.raises(NonFiniteError) as err:
        callback.on_log(args, state, object(), logs={"loss": loss, "learning_rate": 1e-3})
    assert str(err.value) == (
        f"training loss is {shown} at step 7 in {tmp_path}: the weights or the gradients are no longer numbers; "
        "nothing was registered. Lower train.learning_rate, check the base model's weights, or run again with "
        "--refresh to start over")
    assert err.value.exit_code == 5


def test_the_finite_loss_callback_lets_finite_losses_and_other_logs_pass(tmp_path):
    callback = make_finite_loss_callback()
    args, state, control = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=7), object()
    assert callback.on_log(args, state, control, logs={"loss": 2.5}) is control
    assert callback.on_log(args, state, control, logs={"eval_loss": NAN}) is control, "only the training loss"
    assert callback.on_log(args, state, control, logs=None) is control
    assert callback.on_log(args, state, control) is control


# --- non_finite_weights / check_registrable ------------------------------------------------------------------

def _model(folder: Path, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    return folder


def test_non_finite_weights_names_each_tensor_holding_a_nan_or_an_infinity(tmp_path):
    nan_one, inf_one = torch.ones(4), torch.ones(2, 2, dtype=torch.bfloat16)
    nan_one[2], inf_one[1, 0] = NAN, INF
    model = _model(tmp_path / "m", {
        "model-00001-of-00002.safetensors": {"a.weight": torch.ones(3), "b.weight": nan_one,
                                             "ids": torch.arange(4)},  # integers are never NaN
        "model-00002-of-00002.safetensors": {"c.weight": inf_one, "d.weight": torch.zeros(2)},
    })
    (model / "optimizer.pt").write_bytes(b"not a weights file: not read")
    assert non_finite_weights(model) == ["b.weight", "c.weight"]
    assert non_finite_weights(_model(tmp_path / "fine", {"model.safetensors": WEIGHTS})) == []
    assert non_finite_weights(tmp_path / "empty") == []


def test_a_finite_model_with_a_finite_eval_loss_is_registrable(tmp_path):
    model = _model(tmp_path / "m", {"model.safetensors": WEIGHTS})
    assert check_registrable(model, {"eval/loss": 1.25, "gen/format_ok_rate": NAN}) is None


@pytest.mark.parametrize(("loss", "shown"), [(None, "None"), (NAN, "nan"), (INF, "inf")])
def test_a_model_without_a_finite_eval_loss_is_not_registered(tmp_path, loss, shown):
    model = _model(tmp_path / "m", {"model.safetensors": WEIGHTS})
    metrics = {} if loss is None else {"eval/loss": loss}
    with pytest.raises(NonFiniteError) as err:
        check_registrable(model, metrics)
    assert str(err.value) == (
        f"not registered: the fine-tuned model's eval/loss is {shown} ({model}); a model that does not compute "
        "numbers is never a candidate. Run again with --refresh, or lower train.learning_rate")
    assert err.value.exit_code == 5


def test_a_model_holding_a_nan_weight_is_not_registered_and_the_tensor_is_named(tmp_path):
    broken = {name: t.clone() for name, t in WEIGHTS.items()}
    broken["norm.weight"][0] = NAN
    model = _model(tmp_path / "m", {"model.safetensors": broken})
    with pytest.raises(NonFiniteError) as err:
        check_registrable(model, {"eval/loss": 1.25})
    assert str(err.value) == (f"not registered: 1 weight tensors of {model} hold NaN or infinity (norm.weight); "
                              "run again with --refresh, or lower train.learning_rate")


def test_more_than_three_bad_tensors_are_named_three_and_counted(tmp_path):
    model = _model(tmp_path / "m", {"model.safetensors": {f"layer{i}.weight": torch.full((2,), NAN) for i in range(5)}})
    with pytest.raises(NonFiniteError) as err:
        check_registrable(model, {"eval/loss": 1.25})
    assert str(err.value) == (f"not registered: 5 weight tensors of {model} hold NaN or infinity (layer0.weight, "
                              "layer1.weight, layer2.weight and 2 more); run again with --refresh, or lower "
                              "train.learning_rate")
