"""Multi-process training: ``accelerate launch -m sft_core.launch ...``, started and watched from here.

`launch_training` writes the resolved config to JSON and launches this module with an accelerate
config shipped in the package (``infra/accelerate/``, read as ``sft_core.accelerate``); every
rank runs the same `run_training`, rank 0 writes the result JSON that `launch_training` returns.
The ranks' metrics reach the caller's `sink` by tailing ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from sft_core import errors
from sft_core.config import PipelineConfig
from sft_core.errors import SftError
from sft_core.modeling import resolve_device
from sft_core.process import configure_process
from sft_core.train import generation_check, run_training


def accelerate_config_file(name: str) -> Path:
    """One of the shipped accelerate configs (`ddp`, `fsdp`, `deepspeed_zero3`, `cpu_gloo`)."""
    return Path(str(resources.files("sft_core.accelerate") / f"{name}.yaml"))


def accelerate_command(cfg: PipelineConfig, args: list[str]) -> list[str]:
    name = cfg.train.accelerate_config
    if resolve_device(cfg.train.device) == "cpu":  # also `auto` on a machine without a GPU
        name = "cpu_gloo"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_file(name)),
            "--num_processes", str(cfg.train.num_processes), "-m", "sft_core.launch", *args]


def launch_training(cfg: PipelineConfig, *, model_dir: str, tokens: Any, select_rows: str, max_new_tokens: int,
                    output_dir: Path, sink: Callable[[int, dict], None] | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Run `accelerate launch`, stream its output to `log` and its metrics to `sink`; the result's fields."""
    log = log or (lambda line: print(line, flush=True))
    cfg_json, result_json = output_dir / "launch_config.json", output_dir / "launch_result.json"
    cfg_json.write_text(cfg.model_dump_json(), encoding="utf-8")
    result_json.unlink(missing_ok=True)  # never pick up the result of an earlier attempt
    cmd = accelerate_command(cfg, ["--config-json", str(cfg_json), "--model-dir", model_dir,
                                   "--train-data", tokens.train_ds, "--eval-data", tokens.select_ds,
                                   "--select-rows", select_rows, "--max-new-tokens", str(max_new_tokens),
                                   "--output-dir", str(output_dir), "--result-json", str(result_json)])
    log("launching: " + " ".join(cmd))
    stop = threading.Event()
    tail = threading.Thread(target=_tail_metrics, args=(output_dir / "metrics.jsonl", sink, stop), daemon=True)
    tail.start()
    last_lines: deque[str] = deque(maxlen=200)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line and "it/s]" not in line and "s/it]" not in line:
                log(f"[accelerate] {line[-500:]}")
                last_lines.append(line[-500:])
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the caller was cancelled or crashed: do not leave the ranks training
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop.set()
        tail.join(timeout=10)
    if code != 0 or not result_json.exists():
        rank_error = project_error(last_lines)
        if rank_error is not None:  # a rank's own error (a bad model, a full disk, NaN): as one process raises it
            raise rank_error
        detail = "\n".join(list(last_lines)[-15:])
        raise RuntimeError(f"accelerate launch ({Path(cmd[cmd.index('--config_file') + 1]).name}, "
                           f"{cfg.train.num_processes} processes) exited with {code} without writing "
                           f"{result_json.name}; last output:\n{detail}")
    return json.loads(result_json.read_text(encoding="utf-8"))


_PROJECT_ERROR = re.compile(r"\bsft_core\.errors\.(\w+): (.+)$")


def project_error(lines: Iterable[str]) -> SftError | None:
    """The last project error a rank's traceback printed (`sft_core.errors.X: message`), as that exception."""
    for line in reversed(list(lines)):
        found = _PROJECT_ERROR.search(line)
        kind = getattr(errors, found[1], None) if found else None
        if isinstance(kind, type) and issubclass(kind, SftError):
            return kind(found[2])
    return None


def _tail_metrics(path: Path, sink: Callable[[int, dict], None] | None, stop: threading.Event) -> None:
    offset = path.stat().st_size if path.exists() else 0
    while True:
        finished = stop.is_set()
        if path.exists() and sink is not None:
            with path.open("r", encoding="utf-8") as f:
                f.seek(offset)
                for line in f:
                    if line.endswith("\n"):
                        rec = json.loads(line)
                        sink(int(rec.pop("step")), rec)
                        offset += len(line.encode("utf-8"))
        if finished:
            return
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    """One rank: train, and on rank 0 write the result JSON."""
    configure_process()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config-json", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--train-data", required=True)
    p.add_argument("--eval-data")
    p.add_argument("--select-rows", help="selection rows (JSON Lines) for the generation check that selects a "
                                         "checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--result-json", required=True)
    a = p.parse_args(argv)

    cfg = PipelineConfig.model_validate(json.loads(Path(a.config_json).read_text(encoding="utf-8")))
    check = generation_check(cfg, a.select_rows, a.max_new_tokens) if a.select_rows and a.max_new_tokens else None
    result = run_training(cfg, model_dir=a.model_dir, train_data=a.train_data, eval_data=a.eval_data,
                          output_dir=a.output_dir, generation_check=check)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(a.result_json).write_text(json.dumps(result.own_fields(), indent=2), encoding="utf-8")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a clean exit: gloo's threads can abort one left open
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
