"""Each benchmark runs end to end at tiny sizes and ends with its ratio line (no timings asserted).

The benchmarks are not tests: this only keeps them from rotting. Each runs as a subprocess,
the way it is documented in BENCHMARKS.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

REPO = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )


def last_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-3000:]
    return lines[-1]


def test_loss_micro_tiny():
    assert re.fullmatch(r"loss micro speedup [\d.]+x", last_line(run_bench("loss_micro.py", "--tiny")))


def test_peers_tiny(tmp_path):
    """Every side trains (ours, TRL's SFTTrainer twice, the tutorial) and the generation part runs;
    ours and TRL label the same rows identically and agree on their loss."""
    require(importlib.util.find_spec("trl") is not None, "TRL (the bench extra: pip install '.[bench]')")
    proc = run_bench("peers.py", "--tiny", env={"OUT": str(tmp_path)}, timeout=900)
    assert re.fullmatch(r"peer train speedup vs trl-tuned [\d.]+x", last_line(proc))
    assert "labels identical" in proc.stdout and "-> agree" in proc.stdout
    result = json.loads((tmp_path / "peers.json").read_text(encoding="utf-8"))
    assert set(result["runs"]) == {"ours", "ours-bs4", "trl-defaults", "trl-tuned", "tutorial"}
    for side, runs in result["runs"].items():
        assert runs[0]["steps"] == 3 and runs[0]["tok_s"] > 0 and runs[0]["peak_rss_mb"] > 0, side
    assert set(result["generation"]["tok_s"]) == {"ours", "tutorial", "batched"}


def test_generate_tiny():
    assert re.fullmatch(r"generate speedup [\d.]+x", last_line(run_bench("generate.py", "--tiny")))


def test_gpu_dry_run_on_cpu(tmp_path):
    proc = run_bench("gpu.py", "--dry-run", env={"OUT": str(tmp_path)})
    assert re.fullmatch(r"gpu train speedup [\d.]+x", last_line(proc))
    result = json.loads((tmp_path / "gpu_bench.json").read_text(encoding="utf-8"))
    assert result["dry_run"] and result["loss_check"]["agree"]
    assert [v["variant"] for v in result["variants"]] == ["A", "B", "B-ckpt", "B-cfg", "B-16"]
    assert all(v["tok_s"] > 0 and v["measured_steps"] == 2 for v in result["variants"])
    assert result["speedup"] == pytest.approx(
        max(v["tok_s"] for v in result["variants"] if v["variant"] != "A" and v["rows_per_step"] == 4)
        / result["variants"][0]["tok_s"])


def test_gpu_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = run_bench("gpu.py", timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr


@pytest.mark.slow
def test_pipeline_tiny():
    # over a minute: Prefect's ephemeral server start alone is 15-60 s on 2 shared cores
    line = last_line(run_bench("pipeline.py", "--tiny", "--repeats", "1", timeout=900))
    assert re.fullmatch(r"pipeline cached/first [\d.]+%  overhead -?[\d.]+ s", line)


def test_demo_outcome_tiny():
    """One seed of the demo through the real flow at tests' sizes: a table row with intervals and the last line."""
    tiny = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=1024",
            "data.max_length=256", "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "eval.max_new_tokens=4",
            "eval.harness=false"]
    proc = run_bench("demo_outcome.py", "--seeds", "3", *[arg for o in tiny for arg in ("--set", o)], timeout=900)
    assert re.fullmatch(r"demo beyond noise [01]/1 seeds", last_line(proc))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 3 |"))
    assert row.startswith("| 3 | 13 | ") and row.count("[") >= 5, row


def test_pretrained_budget_tiny(tmp_path):
    """The budget of a pretrained-demo run, measured on a tiny GGUF instead of SmolLM2 (no download)."""
    from tests.tiny_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf", vocab_size=512)
    proc = run_bench("pretrained_budget.py", "--set", f"model.source=gguf://{tmp_path / 'tiny.gguf'}",
                     "--gen-lengths", "1,4,8")
    line = last_line(proc)
    assert line.startswith("RESULT ")
    result = json.loads(line.removeprefix("RESULT "))
    from sft_core.config import load_config

    assert result["steps"] == load_config("pretrained-demo").train.max_steps  # the run the preset describes
    assert result["train_step_cpu_s"] > 0 and result["budget"] > 0
