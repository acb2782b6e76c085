"""What may be resumed from and what may be shipped: whole checkpoints and finite models.

A checkpoint is whole when its manifest (``checksums.sha256``, `sha256sum` format, written when
the Trainer has saved every file of it) lists every file it holds with the sha256 they still have,
and its known formats parse: trainer_state.json, each safetensors header against its size, and
each torch pickle (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, ...) as the zip archive torch
writes. The manifest is what catches bytes overwritten in place (same size: the weights read as
NaN and the run resumed silently) and a truncated `scheduler.pt` or `rng_state.pth` (only state,
weights and optimizer were checked: every re-run failed with a traceback). A checkpoint without a
manifest was cut short while saving (this code writes one into every checkpoint it saves) and is
not whole either. Check it by hand: ``cd checkpoint-N && sha256sum -c checksums.sha256``.

A model is shipped (registered) only when its eval loss is a finite number and every weight of it
is finite: `check_registrable`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

from sft_core.errors import NonFiniteError
from sft_core.metrics import EVAL_LOSS

MANIFEST = "checksums.sha256"
_CHUNK = 8 << 20
_TORCH_PICKLES = (".pt", ".pth", ".bin")  # torch.save writes zip archives


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.split("-")[-1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def write_manifest(ckpt: str | Path) -> Path:
    """The sha256 of every file of `ckpt`, written atomically as `checksums.sha256` (last: it marks the checkpoint
    as whole)."""
    ckpt = Path(ckpt)
    lines = [f"{_sha256(p)}  {p.relative_to(ckpt).as_posix()}\n" for p in _files(ckpt)]
    tmp = ckpt / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MANIFEST)
    return ckpt / MANIFEST


def _manifest_problem(ckpt: Path) -> str | None:
    try:
        text = (ckpt / MANIFEST).read_text(encoding="utf-8")
    except OSError:
        return f"no {MANIFEST} (the save was cut short)"
    listed = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            return f"{MANIFEST}: unreadable line {line[:80]!r}"
        listed[name] = digest
    for name, digest in listed.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name}: missing (listed in {MANIFEST})"
        if _sha256(path) != digest:
            return f"{name}: its {path.stat().st_size:,} bytes differ from the ones saved ({MANIFEST})"
    extra = [p.relative_to(ckpt).as_posix() for p in _files(ckpt) if p.relative_to(ckpt).as_posix() not in listed]
    if extra:
        return f"{extra[0]}: not listed in {MANIFEST} (not part of the checkpoint that was saved)"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """What makes a checkpoint folder unusable for resuming, or None when it is whole."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"trainer_state.json: {exc}"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "no safetensors weights"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    for path in sorted(p for p in ckpt.iterdir() if p.suffix in _TORCH_PICKLES and p.is_file()):
        try:
            with zipfile.ZipFile(path):  # a cut file has no central directory; bytes changed in place: the manifest
                pass
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
            return f"{path.name}: {exc}"
    return _manifest_problem(ckpt)


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors: its size must match."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"header of {n} bytes in a {size}-byte file"
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        return f"unreadable header ({exc})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + (max(ends) if ends else 0)
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    return None


def last_checkpoint(output_dir: str | Path, warn: Callable[[str], None] = print) -> str | None:
    """The newest `checkpoint-N` folder that is whole; a damaged newer one is moved aside.

    A crash while saving or a bad disk damages the newest checkpoint; resuming falls back to the one
    before it, and the damaged one is renamed `damaged-checkpoint-N` (kept for a look; a name the
    Trainer's checkpoint rotation does not match, so it is never resumed from nor counted).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=checkpoint_step, reverse=True)
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        if (ckpt / "trainer_state.json").exists():  # saved (or half saved) by a run: damaged, not in progress
            aside = ckpt.with_name(f"damaged-{ckpt.name}")
            shutil.rmtree(aside, ignore_errors=True)
            ckpt.rename(aside)
            warn(f"warning: {ckpt} is damaged ({problem}); resuming from an earlier one, it is kept as {aside.name}")
    return None


def newest_whole_step(output_dir: str | Path) -> int:
    """The step of the newest checkpoint that has its manifest (0: none yet): the steps up to it are final."""
    steps = [checkpoint_step(p.parent) for p in Path(output_dir).glob(f"checkpoint-*/{MANIFEST}")
             if p.parent.name.split("-")[-1].isdigit()]
    return max(steps, default=0)


def make_checksum_callback():
    """A TrainerCallback that writes each checkpoint's manifest once the Trainer has saved all of it (every rank's
    files: the ranks meet at a barrier first); the main process writes it."""
    from transformers import TrainerCallback

    class ChecksumCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    write_manifest(ckpt)
            return control

    return ChecksumCallback()


def make_finite_loss_callback():
    """A TrainerCallback that stops training at the first non-finite training loss, with what to do (the Trainer
    would go on, and once showed the NaN as 0)."""
    from transformers import TrainerCallback

    class FiniteLossCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise NonFiniteError(
                    f"training loss is {float(loss)} at step {state.global_step} in {args.output_dir}: the weights "
                    "or the gradients are no longer numbers; nothing was registered. Lower train.learning_rate, "
                    "check the base model's weights, or run again with --refresh to start over")
            return control

    return FiniteLossCallback()


def non_finite_weights(model_dir: str | Path) -> list[str]:
    """The names of the tensors of `model_dir`'s safetensors files that hold a NaN or an infinity (one at a time)."""
    import torch
    from safetensors import safe_open

    bad = []
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
    return bad


def check_registrable(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Refuse to ship a model whose eval loss is not a finite number or whose weights hold NaN or infinity."""
    loss = metrics.get(EVAL_LOSS)
    if loss is None or not math.isfinite(float(loss)):
        raise NonFiniteError(f"not registered: the fine-tuned model's eval/loss is {loss} ({model_dir}); a model "
                             "that does not compute numbers is never a candidate. Run again with --refresh, or lower "
                             "train.learning_rate")
    bad = non_finite_weights(model_dir)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"not registered: {len(bad)} weight tensors of {model_dir} hold NaN or infinity "
                             f"({shown}); run again with --refresh, or lower train.learning_rate")
