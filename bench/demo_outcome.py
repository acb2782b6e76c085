"""Does the demo learn, over seeds: the demo preset end to end, one fresh process per seed, its figures on the
report questions with their 95 % intervals, base beside fine-tuned, and the wall time of each run.

Each seed runs `qwen-sft run -c demo --set train.seed=N` as the README's `make demo` does (its own temporary
workdir and PREFECT_HOME, nothing cached), in a child process that prints its flow summary; this script prints
one table row per seed and ends with one line: ``demo beyond noise N/M seeds``, where a seed counts when the
lower end of the fine-tune's interval is above the upper end of its base's, for format and for stopping
(what tests/test_demo.py asserts).

    timeout 3600 .venv/bin/python bench/demo_outcome.py --seeds 42 1 7
    .venv/bin/python bench/demo_outcome.py --seeds 42 --set train.num_train_epochs=9 --set eval.harness=false
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RATES = ("gen/format_ok_rate", "gen/stop_rate", "gen/usable_rate")


def run_seed(seed: int, overrides: list[str]) -> tuple[dict, float]:
    """One demo run in a fresh process: (its flow summary's metrics and stage rows, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="demo-outcome-") as tmp:
        code = ("import json, sys; from dataclasses import asdict; from sft_core.process import configure_process; "
                "configure_process(); from flows.finetune import run_in_process; "
                "s = run_in_process('demo', sys.argv[1:]); "
                "print('RESULT ' + json.dumps({'metrics': s.metrics, 'stages': [asdict(r) for r in s.stages]}))")
        argv = [sys.executable, "-c", code, f"workdir={tmp}/work", f"train.seed={seed}", *overrides]
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect"}
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
        seconds = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT ")), seconds


def beyond_noise(m: dict) -> bool:
    return all(m[f"{r}_lo"] > m[f"base/{r}_hi"] for r in ("gen/format_ok_rate", "gen/stop_rate"))


def main() -> None:
    from bench.common import machine_info
    from sft_core.metrics import shown

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 7])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="more `--set` overrides")
    a = p.parse_args()
    print(machine_info())
    print(f"overrides: {a.overrides or 'none (the preset as shipped)'}")
    print("| seed | n | format | stop | usable | ROUGE-L | base format | base stop | eval loss (base) | train s | "
          "generate s (base) | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    good = 0
    for seed in a.seeds:
        result, seconds = run_seed(seed, a.overrides)
        m = result["metrics"]
        took = {r["stage"]: r["compute_seconds"] for r in result["stages"]}
        good += beyond_noise(m)
        cells = [shown(r, m) for r in RATES] + [shown("gen/rouge_l", m), shown("base/gen/format_ok_rate", m),
                                                 shown("base/gen/stop_rate", m)]
        print(f"| {seed} | {int(m['gen/num_samples'])} | " + " | ".join(cells)
              + f" | {m['eval/loss']:.3f} ({m['base/eval/loss']:.3f}) | {took.get('train', 0):.0f} | "
              f"{took.get('generate', 0):.0f} ({took.get('generate-base', 0):.0f}) | {seconds:.0f} |", flush=True)
    print(f"demo beyond noise {good}/{len(a.seeds)} seeds")


if __name__ == "__main__":
    main()
