"""Shared benchmark helpers: a one-line machine description, median timing, child-process results."""

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
