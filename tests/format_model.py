"""A tiny model that has learned the job's form: `<think>…</think>` + answer, then `<|im_end|>`.

Served replies then have a reasoning part and an answer and end on their own, so the serving and engine tests
check the split, the stop and the token counts on real output, not on a random model's babble. The recipe is
`tests/test_train.py::test_overfit_learns_the_format_and_to_stop`'s (8 short rows, 60 steps, ~1 minute on 2
cores); head size 32, which vLLM's CPU attention supports (the random tiny model's 16 it does not).
"""

from __future__ import annotations

from pathlib import Path

from sft_core.config import TinyModelConfig
from sft_core.tiny_model import build_tiny_model
from tests.test_train import SYSTEM, _cfg, _datasets, _short_rows

ROWS = _short_rows(8)


def train_format_model(folder: Path) -> Path:
    """The fine-tuned folder (weights, tokenizer, a generation config that stops on `<|im_end|>`)."""
    from sft_core.train import run_training

    base = build_tiny_model(folder / "base", TinyModelConfig(hidden_size=128, intermediate_size=256))
    data = _datasets(base, ROWS, folder / "train_ds")
    cfg = _cfg(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=60, learning_rate=3e-3,
               padding_free=True)
    result = run_training(cfg, model_dir=base, train_data=data, eval_data=None, output_dir=folder / "out")
    return Path(result.final_model_dir)


__all__ = ["ROWS", "SYSTEM", "train_format_model"]
