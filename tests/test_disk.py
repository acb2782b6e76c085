"""sft_core/disk.py: free space, what a training run writes, a full disk recognised, work that cannot fit refused."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

from sft_core.config import load_config
from sft_core.disk import check_space, free_bytes, free_space, is_disk_full, size_text, training_space
from sft_core.errors import StorageError
from sft_core.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("disk") / "tiny", load_config("demo").model.tiny)


def _weights(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _copy(model_dir: Path, dest: Path, **config: object) -> Path:
    """A copy of the model folder, its config.json updated with `config`."""
    shutil.copytree(model_dir, dest)
    data = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    (dest / "config.json").write_text(json.dumps({**data, **config}), encoding="utf-8")
    return dest


# --- size_text / free_bytes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1500, "1.5 KB"),
                                         (2_500_000, "2.5 MB"), (3 * 10**9, "3.0 GB"), (4.2e12, "4.2 TB"),
                                         (5 * 10**15, "5000.0 TB")])
def test_size_text_is_decimal_units_with_one_decimal_above_bytes(n, text):
    assert size_text(n) == text


def test_free_bytes_of_a_folder_not_made_yet_is_its_nearest_existing_parents(tmp_path):
    later = tmp_path / "not" / "made" / "yet"
    found = free_bytes(later)
    assert not later.exists() and found > 0
    assert abs(found - shutil.disk_usage(tmp_path).free) < 100 * 10**6, "the same device (give or take other writers)"
    assert re.fullmatch(r"\d+(\.\d)? [KMGT]?B", free_space(later))


# --- check_space ---------------------------------------------------------------------------------------------

def test_work_that_fits_passes(tmp_path):
    assert check_space(tmp_path, 1, "training") is None
    assert check_space(tmp_path / "new" / "folder", 0, "training") is None


def test_work_that_cannot_fit_is_refused_naming_the_folder_and_what_is_free(tmp_path):
    folder = tmp_path / "train" / "abc"
    with pytest.raises(StorageError) as err:
        check_space(folder, 10**15, "training")
    assert re.fullmatch(rf"training needs about 1000\.0 TB in {re.escape(str(folder))}, and its device has "
                        r"\d+(\.\d)? [KMGT]?B free; free some with `qwen-sft gc`, lower train\.save_total_limit, "
                        r"or set workdir on a larger disk", str(err.value)), str(err.value)
    assert err.value.exit_code == 9
    with pytest.raises(StorageError, match=r"^converting needs about "):
        check_space(folder, free_bytes(folder) + 10**12, "converting")


# --- is_disk_full --------------------------------------------------------------------------------------------

def _raised(exc: Exception, cause: Exception, *, implicit: bool = False) -> Exception:
    """`exc` as Python leaves it when raised while handling (`implicit`) or from (`cause`) another."""
    try:
        try:
            raise cause
        except type(cause) as inner:
            if implicit:
                raise exc  # the implicit __context__ is what is tested
            raise exc from inner
    except type(exc) as outer:
        return outer


def test_enospc_is_a_full_disk_and_other_os_errors_are_not():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.ENOSPC, "quota"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert not is_disk_full(ValueError("bad value"))


def test_a_full_disk_wrapped_in_a_librarys_error_is_recognised():
    class SafetensorError(Exception):
        pass

    assert is_disk_full(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                        "message: \"No space left on device\" })"))
    assert is_disk_full(_raised(RuntimeError("save failed"), OSError(errno.ENOSPC, "disk full")))
    assert is_disk_full(_raised(RuntimeError("save failed"), OSError(errno.ENOSPC, "disk full"), implicit=True))
    assert not is_disk_full(_raised(RuntimeError("save failed"), OSError(errno.EIO, "I/O error")))


# --- training_space ------------------------------------------------------------------------------------------

def test_training_space_is_the_final_model_and_save_total_limit_plus_one_checkpoints(tiny_dir, tmp_path):
    weights = _weights(tiny_dir)
    assert weights > 10**6
    cfg = load_config("demo", [f"workdir={tmp_path}"])  # float32, save_total_limit 2
    assert training_space(cfg, str(tiny_dir)) == weights + (2 + 1) * 3 * weights
    more = load_config("demo", [f"workdir={tmp_path}", "train.save_total_limit=4"])
    assert training_space(more, str(tiny_dir)) == weights + (4 + 1) * 3 * weights


def test_training_space_grows_with_the_model(tiny_dir, tmp_path):
    cfg = load_config("demo", [f"workdir={tmp_path}"])
    bigger = _copy(tiny_dir, tmp_path / "bigger")
    (bigger / "model-extra.safetensors").write_bytes(b"0" * _weights(tiny_dir))  # a second shard as big again
    assert training_space(cfg, str(bigger)) == 2 * training_space(cfg, str(tiny_dir))
    assert training_space(cfg, str(tmp_path)) == 0, "no weights, nothing to write"


def test_half_precision_weights_trained_in_float32_count_twice(tiny_dir, tmp_path):
    weights = _weights(tiny_dir)
    half = _copy(tiny_dir, tmp_path / "half", torch_dtype="bfloat16", dtype=None)  # as older hub configs say it
    fp32 = load_config("demo", [f"workdir={tmp_path}"])
    assert training_space(fp32, str(half)) == 2 * weights * (1 + 3 * 3)
    cpu_auto = load_config("demo", [f"workdir={tmp_path}", "model.dtype=auto", "train.device=cpu"])
    assert training_space(cpu_auto, str(half)) == 2 * weights * (1 + 3 * 3), "auto on a CPU trains in float32"
    bf16 = load_config("demo", [f"workdir={tmp_path}", "model.dtype=bfloat16"])
    assert training_space(bf16, str(half)) == weights * (1 + 3 * 3), "trained as stored"


def test_a_half_precision_model_saved_by_current_transformers_counts_twice_too(tiny_dir, tmp_path):
    weights = _weights(tiny_dir)
    assert "dtype" in json.loads((tiny_dir / "config.json").read_text(encoding="utf-8")), "how transformers saves it"
    half = _copy(tiny_dir, tmp_path / "half", dtype="bfloat16")
    fp32 = load_config("demo", [f"workdir={tmp_path}"])
    assert training_space(fp32, str(half)) == 2 * weights * (1 + 3 * 3)
