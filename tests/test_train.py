"""Training on CPU with a tiny model: it learns, it learns to stop, it resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sft_core.config import PipelineConfig, TinyModelConfig
from sft_core.data import BUNDLED_SAMPLE
from sft_core.tiny_model import build_tiny_model
from sft_core.tokenize import tokenize_rows

SYSTEM = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"


def _short_rows(n: int) -> list[dict]:
    rows = [json.loads(x) for x in BUNDLED_SAMPLE.read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    return [{"question": r["question"][:40], "think": r["think"][:24], "answer": r["answer"][:16]} for r in rows]


def _cfg(**train) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "data": {"system_prompt": SYSTEM, "max_length": 512},
        "model": {"source": "tiny://", "dtype": "float32"},
        "train": {"device": "cpu", "gradient_checkpointing": False, "group_by_length": False, "warmup_ratio": 0.0,
                  "save_steps": 1000, "eval_steps": 1000, "logging_steps": 1, **train},
    })


def _datasets(model_dir: Path, rows: list[dict], out: Path) -> Path:
    from sft_core.modeling import load_tokenizer

    ds, _ = tokenize_rows(rows, load_tokenizer(model_dir), system_prompt=SYSTEM, max_length=512)
    ds.save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def overfit_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("overfit-model"), TinyModelConfig(hidden_size=128, intermediate_size=256))


def test_overfit_learns_the_format_and_to_stop(tmp_path, overfit_model):
    from sft_core.generate import generate_answers
    from sft_core.modeling import load_model, load_tokenizer
    from sft_core.train import run_training

    rows = _short_rows(8)
    data = _datasets(overfit_model, rows, tmp_path / "train_ds")
    cfg = _cfg(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=60, learning_rate=3e-3,
               padding_free=True)
    result = run_training(cfg, model_dir=overfit_model, train_data=data, eval_data=None, output_dir=tmp_path / "out")
    assert result.global_step == 60
    losses = [json.loads(x)["train/loss"] for x in Path(result.metrics_file).read_text().splitlines() if "train/loss" in x]
    print("first/last loss", losses[0], losses[-1])
    assert losses[-1] <= 0.3 * losses[0], f"loss fell only from {losses[0]:.3f} to {losses[-1]:.3f}"

    final = Path(result.final_model_dir)
    assert (final / "model.safetensors").exists() and (final / "generation_config.json").exists()
    tok = load_tokenizer(final)
    model = load_model(final, dtype="float32", device="cpu")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    max_new = 200
    gens = generate_answers(model, tok, [r["question"] for r in rows[:3]], system_prompt=SYSTEM, max_new_tokens=max_new, batch_size=3)
    for g in gens:
        assert g.text.lstrip().startswith("<think>"), g.text[:80]
        assert g.stopped and g.new_tokens < max_new, f"did not stop: {g.text[-80:]!r}"


def test_saved_generation_config_stops_on_im_end_with_the_real_tokenizer(tmp_path, qwen_tokenizer, tiny_model_dir):
    from sft_core.train import run_training

    data = _datasets(tiny_model_dir, _short_rows(4), tmp_path / "ds")
    result = run_training(_cfg(per_device_train_batch_size=2, max_steps=1), model_dir=tiny_model_dir, train_data=data,
                          eval_data=None, output_dir=tmp_path / "out")
    gen = json.loads((Path(result.final_model_dir) / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert 151645 in eos and 151643 in eos
    assert gen["pad_token_id"] not in (151645,)


class _Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from transformers import TrainerCallback

    from sft_core.train import last_checkpoint, run_training

    data = _datasets(tiny_model_dir, _short_rows(16), tmp_path / "ds")
    cfg = _cfg(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, save_steps=2,
               learning_rate=1e-3, group_by_length=True)

    straight = run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=tmp_path / "a")

    class CrashAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                raise _Crash("simulated kill after checkpoint-2")

    with pytest.raises(_Crash):
        run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=tmp_path / "b",
                     extra_callbacks=[CrashAtStep3()])
    assert last_checkpoint(tmp_path / "b").endswith("checkpoint-2")
    resumed = run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=tmp_path / "b")
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.global_step == straight.global_step == 4

    from safetensors.torch import load_file

    a = load_file(str(Path(straight.final_model_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.final_model_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a), "training changed nothing"


def _losses(metrics_file: str | Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, Path(metrics_file).read_text().splitlines())
            if "train/loss" in r}


def test_resume_inside_epoch_2_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Length-grouped batches drew each epoch's order from the global RNG as it stood when the epoch began: after
    a resume inside epoch 2 the order, and so every loss after it, differed (inside epoch 1 they matched). Each
    epoch's order is now a function of (seed, epoch): the resumed run logs the uninterrupted run's losses."""
    from transformers import TrainerCallback

    from sft_core.train import run_training

    data = _datasets(tiny_model_dir, _short_rows(16), tmp_path / "ds")  # 4 optimizer steps per epoch
    cfg = _cfg(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=10, save_steps=2,
               save_total_limit=5, learning_rate=1e-3, group_by_length=True)
    straight = run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=tmp_path / "a")

    class CrashInEpoch2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 6:
                raise _Crash("simulated kill after checkpoint-6, in the middle of epoch 2")

    with pytest.raises(_Crash):
        run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=tmp_path / "b",
                     extra_callbacks=[CrashInEpoch2()])
    said: list[str] = []
    resumed = run_training(cfg, model_dir=tiny_model_dir, train_data=data, eval_data=None, output_dir=tmp_path / "b",
                           progress=said.append)
    assert _losses(resumed.metrics_file) == _losses(straight.metrics_file), "the same loss at every step"
    assert resumed.resumed_from.endswith("checkpoint-6")
    assert "resuming from checkpoint-6: the steps after 6 are trained again" in said
    assert sorted(_losses(resumed.metrics_file)) == list(range(1, 11))


def test_a_non_finite_loss_stops_training_and_is_never_shown_as_0(tmp_path, tiny_model_dir):
    """A model whose weights hold NaN trained on silently, its loss logged as 0 (the Trainer's NaN filter): now the
    first non-finite loss stops training with what to do (exit 5)."""
    from safetensors.torch import load_file, save_file

    from sft_core.errors import NonFiniteError
    from sft_core.train import run_training

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    data = _datasets(broken, _short_rows(8), tmp_path / "ds")
    with pytest.raises(NonFiniteError) as stopped:
        run_training(_cfg(per_device_train_batch_size=2, max_steps=4), model_dir=broken, train_data=data,
                     eval_data=None, output_dir=tmp_path / "out")
    assert str(stopped.value).startswith("training loss is nan at step 1 in ") and stopped.value.exit_code == 5
    logged = tmp_path / "out" / "metrics.jsonl"
    assert 0.0 not in (_losses(logged) if logged.exists() else {}).values()


def test_cpu_and_gpu_defaults_for_batching_and_loss_chunks():
    from sft_core.config import load_config
    from sft_core.errors import ConfigError
    from sft_core.train import resolve_loss_chunk_size, resolve_padding_free

    assert resolve_padding_free("auto", "cpu") is False  # SDPA with a packed mask is slower on CPU
    assert resolve_padding_free("auto", "cuda") is True
    assert resolve_padding_free(True, "cpu") is True and resolve_padding_free(False, "cuda") is False
    assert (resolve_loss_chunk_size(0, "cpu"), resolve_loss_chunk_size(0, "cuda"), resolve_loss_chunk_size(64, "cpu")) == (256, 1024, 64)
    assert load_config("demo", ["train.padding_free=auto"]).train.padding_free == "auto"
    assert load_config("demo", ["train.padding_free=false"]).train.padding_free is False
    with pytest.raises(ConfigError, match="train.padding_free"):
        load_config("demo", ["train.padding_free=sometimes"])
    with pytest.raises(ConfigError, match="train.loss_chunk_size"):
        load_config("demo", ["train.loss_chunk_size=-1"])


_FRAGMENT_HEAP = """
import os, sys, torch
if sys.argv[1] == "policy":  # (only then: what other modules allocate at import moves glibc's thresholds too)
    from sft_core.train import return_freed_memory_to_os
    assert return_freed_memory_to_os()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
first = torch.ones(16 << 20, dtype=torch.uint8); del first  # glibc: the dynamic mmap threshold rises to 16 MiB
before = rss_mb()
blocks, pins = [], []
for _ in range(64):  # like a step's activations: 8 MiB blocks between small long-lived allocations
    blocks.append(torch.ones(8 << 20, dtype=torch.uint8))
    pins.append(torch.ones(16, dtype=torch.uint8))
del blocks
print(round(rss_mb() - before))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's allocator on Linux")
def test_cpu_training_returns_freed_activations_to_the_os():
    """Without the policy 512 MiB of freed 8 MiB blocks stay resident; with it they go back."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]

    def retained_mb(mode: str, huge_pages: str) -> int:
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": huge_pages}  # torch reads it at start-up; pin it either way
        out = subprocess.run([sys.executable, "-c", _FRAGMENT_HEAP, mode], cwd=repo, env=env, capture_output=True,
                             text=True, check=True, timeout=120)
        return int(out.stdout.split()[-1])

    assert retained_mb("default", "0") >= 400  # glibc's and torch's defaults: the problem exists
    assert retained_mb("policy", "0") <= 32  # the policy alone
    assert retained_mb("policy", "1") <= 32  # as a training process runs (the entry points turn huge pages on)
