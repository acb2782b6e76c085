"""The override lists that shrink a run, for the tests and the benches alike (`--set` syntax).

One place, so that a test and a bench that say "tiny" run the same shape: a 32-wide tiny Qwen2 on 256-token rows,
two rows per optimizer step. Each list below adds what its users share on top of `TINY_MODEL`.
"""

TINY_MODEL = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=1024",
    "data.max_length=256", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
]

# a model this small learns nothing worth selecting by generation: selection by eval loss (no generation while
# training) and no lm-eval; the demo's own test (tests/test_demo.py) runs both
NO_GENERATION_WHILE_TRAINING = ["train.metric_for_best_model=loss", "eval.harness=false"]

# the flow tests' run: 24 steps, two evaluations and saves, three questions generated with 8 new tokens
FLOW = [
    *TINY_MODEL, *NO_GENERATION_WHILE_TRAINING,
    "train.max_steps=24", "train.eval_steps=12", "train.save_steps=12", "train.logging_steps=1",
    "eval.num_generate=3", "eval.max_new_tokens=8", "eval.batch_size=4",
]

# the pipeline bench's smoke run: the flow tests' shape with a quarter of the steps
BENCH_PIPELINE = [
    *TINY_MODEL, *NO_GENERATION_WHILE_TRAINING,
    "train.max_steps=6", "train.eval_steps=3", "train.save_steps=3", "train.logging_steps=1",
    "eval.num_generate=3", "eval.max_new_tokens=8", "eval.batch_size=4",
]
