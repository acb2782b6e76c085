"""The `pretrained-demo` preset's path end to end, on a tiny GGUF written here instead of SmolLM2 (no download):
GGUF -> converted base model -> validate -> tokenize -> train -> evaluate and generate (base too) -> register.

The tiny model starts from random weights, so its base loss is ~ln(vocabulary); with the preset's recipe at a
learning rate a tiny model needs, the preset's 40 steps bring the held-out loss below it (measured when the
preset made 29 steps: by 0.63 to 0.9 nats at either saved checkpoint over three seeds and learning rates 3e-3 to
3e-2), so the 0.3 asserted is no luck.
"""

from __future__ import annotations

import math

import pytest

from sft_core.config import load_config
from tests.tiny_gguf import write_tiny_gguf

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

VOCAB = 1024


def test_the_pretrained_demo_path_fine_tunes_a_gguf_below_its_base_loss_and_registers_it(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.finetune import run_in_process
    from tasks import tracking

    gguf = tmp_path / "tiny-llama.Q8_0.gguf"
    write_tiny_gguf(gguf, qtype="Q8_0", vocab_size=VOCAB)
    overrides = [f"workdir={tmp_path / 'w'}", f"model.source=gguf://{gguf}",
                 "train.learning_rate=1e-2", "train.warmup_ratio=0.1",  # the preset's 1e-4 is for pretrained weights
                 "train.eval_steps=14", "train.save_steps=14",
                 "eval.num_generate=4", "eval.generate_batch_size=4", "eval.max_new_tokens=32"]
    cfg = load_config("pretrained-demo", overrides)
    summary = run_in_process("pretrained-demo", overrides)  # as `qwen-sft run -c pretrained-demo --set ...` runs it

    m = summary.metrics
    print({k: round(v, 4) for k, v in m.items()})
    assert m["base/eval/loss"] > math.log(VOCAB) - 0.5, "the tiny base is random: its loss is about ln(vocabulary)"
    assert m["eval/loss"] < m["base/eval/loss"] - 0.3, "the fine-tune learned from the sample"
    assert summary.train_steps == cfg.train.max_steps == 40, "the preset's 40 steps of 4 rows (batch 1 x GA 4)"
    stages = {r.stage: r.status for r in summary.stages}
    assert stages["base-model"] == "ran" and stages["register"] == "ran"
    assert summary.registered.alias == "candidate"

    folder = tracking.download_model(f"models:/{cfg.registry.name}@candidate", cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # the tutorial's way: a normal folder, no gguf_file
    model = AutoModelForCausalLM.from_pretrained(folder)
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert "gguf://" in (folder.parent / "README.md").read_text(encoding="utf-8"), "the card names the GGUF source"
