"""Entry point for multi-process training: ``accelerate launch -m sft_core.launch ...``.

The train task writes the resolved config to JSON and launches this module with the
accelerate config from ``infra/accelerate/``; every rank runs the same `run_training`,
rank 0 writes the result JSON that the task picks up.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sft_core.config import PipelineConfig

# before torch is imported (it reads this once): CPU tensors >= 2 MB on huge pages, so that training's
# freed-memory policy (sft_core.train.return_freed_memory_to_os) does not pay a page fault per 4 KiB
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config-json", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--train-data", required=True)
    p.add_argument("--eval-data")
    p.add_argument("--val-rows", help="validation rows (JSON Lines) for the generation check that selects a checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--result-json", required=True)
    a = p.parse_args(argv)
    from sft_core.stages import generation_check
    from sft_core.train import run_training

    cfg = PipelineConfig.model_validate(json.loads(Path(a.config_json).read_text(encoding="utf-8")))
    check = generation_check(cfg, {"val": a.val_rows}, a.max_new_tokens) if a.val_rows and a.max_new_tokens else None
    result = run_training(cfg, model_dir=a.model_dir, train_data=a.train_data, eval_data=a.eval_data,
                          output_dir=a.output_dir, generation_check=check)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(a.result_json).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a clean exit: gloo's threads can abort one left open
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
