"""Shared benchmark helpers: machine description, timing, child-process results, the rows and the tutorial's format."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_core.tiny_model import shared_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_ROWS = shared_dir() / "data" / "delicate_medical_r1_sample.jsonl"
BUNDLED_ROWS = REPO / "sft_core" / "sample_data" / "medical_sample.jsonl"
TUTORIAL_SYSTEM = "你是一个医学专家,你需要根据用户的问题,给出带有思考的回答。"  # the tutorial's system prompt


def machine_info() -> str:
    """CPU model, cores, torch threads and versions, current load: print it beside any timing."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, load avg {os.getloadavg()[0]:.1f}"
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def child_result(script: str | Path, argv: list[str], what: str) -> dict:
    """Run `python SCRIPT ARGV...` in a fresh process and return the JSON of its last ``RESULT {...}`` line.

    On a failure (non-zero exit or no result line) print the child's stderr tail and exit, naming `what`.
    """
    cmd = [sys.executable, str(Path(script).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    return json.loads(lines[-1][len("RESULT ") :])


def load_rows(n: int) -> tuple[list[dict], str]:
    """n rows with question/think/answer (cycled): the shared real sample, the bundled one, else synthetic."""
    for path in (SHARED_ROWS, BUNDLED_ROWS):
        if path.exists():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            rows = [r for r in rows if all(k in r for k in ("question", "think", "answer"))]
            if rows:
                return [rows[i % len(rows)] for i in range(n)], str(path)
    body = "患者出现发热、咳嗽和乏力，需要结合病史、体格检查与实验室检查综合判断。"
    rows = [
        {"question": f"问题{i}：发热伴咳嗽应如何处理？", "think": body * (8 + i % 5), "answer": body * (2 + i % 3)}
        for i in range(n)
    ]
    return rows, "synthetic"


def tokenize_like_tutorial(rows: list[dict], tokenizer: Any, max_length: int,
                           system: str = TUTORIAL_SYSTEM) -> list[dict[str, list[int]]]:
    """The tutorial's process_func: f-string prompt, labels = response + pad, then truncation."""
    out = []
    for row in rows:
        output = f"<think>{row['think']}</think> \n {row['answer']}"  # dataset_jsonl_transfer's format
        instruction = tokenizer(
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{row['question']}<|im_end|>\n"
            "<|im_start|>assistant\n",
            add_special_tokens=False,
        )
        response = tokenizer(output, add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
        out.append({"input_ids": input_ids[:max_length], "labels": labels[:max_length]})
    return out
