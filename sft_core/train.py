"""Full-parameter supervised fine-tuning with transformers' `Trainer`.

Device-agnostic (bf16 on CUDA, fp32 on CPU) and process-agnostic: the same code runs
under ``accelerate launch`` for DDP / FSDP / DeepSpeed. The loss skips prompt tokens and
computes the vocabulary projection in chunks (`sft_core.loss`), padding-free batches keep
examples apart through position_ids, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sft_core.chat import IGNORE_INDEX
from sft_core.checkpoints import checkpoint_step, last_checkpoint, make_checksum_callback, make_finite_loss_callback
from sft_core.config import PipelineConfig, TrainConfig
from sft_core.data import read_jsonl
from sft_core.generate import generate_answers, generation_metrics
from sft_core.metrics import SELECTION, SELECTION_LOSS
from sft_core.modeling import load_model, load_tokenizer, prepare_for_sft, resolve_device, resolve_dtype
from sft_core.results import Trained
from sft_core.vllm_engine import generate_answers_vllm

MetricsSink = Callable[[int, dict[str, float]], None]

ATTN_KEEPS_PACKED_APART = {"sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}


@dataclass
class GenerationCheck:
    """Greedy answers to the selection questions, scored at every saved checkpoint to pick the best one.

    Why not eval loss: on a small set, eval loss rises as soon as the model starts to memorise,
    while what the job needs (one think block, an answer, a stop) is still being learned; the
    checkpoint with the lowest eval loss can be one that never closes `</think>` (measured on
    the demo: BENCHMARKS.md, "Does the demo learn").
    """

    questions: list[str]
    references: list[str]
    system_prompt: str
    max_new_tokens: int
    batch_size: int = 16
    repetition_penalty: float = 1.0
    engine: str = "hf"  # `vllm`: the checkpoint is written to a folder and answered by a vLLM server on it
    vllm: str | None = None

    def run(self, model: Any, tokenizer: Any) -> dict[str, float]:
        if self.engine == "vllm":
            gens = self._with_vllm(model, tokenizer)
        else:
            gens = generate_answers(model, tokenizer, self.questions, system_prompt=self.system_prompt,
                                    max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                    repetition_penalty=self.repetition_penalty, references=self.references)
        m = generation_metrics(gens)
        return {"gen_score": m["score"], **{k: m[k] for k in GENERATION_CHECK_METRICS[1:]}}

    def _with_vllm(self, model: Any, tokenizer: Any) -> list:
        """The weights as they are now, saved to a temporary folder a vLLM server loads (greedy, same stops)."""
        with tempfile.TemporaryDirectory(prefix="selection-") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            return generate_answers_vllm(folder, self.questions, system_prompt=self.system_prompt,
                                         max_new_tokens=self.max_new_tokens, references=self.references,
                                         repetition_penalty=self.repetition_penalty, vllm=self.vllm)


def generation_check(cfg: PipelineConfig, select_rows: str | Path, max_new_tokens: int) -> GenerationCheck | None:
    """The selection questions that checkpoint selection generates on (None: selection by loss or none)."""
    if cfg.train.metric_for_best_model != "gen_score" or cfg.eval.num_generate == 0:
        return None
    rows = read_jsonl(select_rows)[: cfg.eval.num_generate]
    if not rows:
        return None
    return GenerationCheck(questions=[r["question"] for r in rows], references=[r["answer"] for r in rows],
                           system_prompt=cfg.data.system_prompt, max_new_tokens=max_new_tokens,
                           batch_size=cfg.eval.generate_batch_size, repetition_penalty=cfg.eval.repetition_penalty,
                           engine=cfg.eval.engine, vllm=cfg.eval.vllm)


GENERATION_CHECK_METRICS = ("gen_score", "format_ok_rate", "stop_rate", "usable_rate", "rouge_l", "mean_new_tokens")


def resolve_padding_free(setting: bool | str, device: str) -> bool:
    """`train.padding_free`: auto = padding-free on accelerators, padded batches on CPU."""
    return device != "cpu" if setting == "auto" else bool(setting)


def resolve_loss_chunk_size(size: int, device: str) -> int:
    """`train.loss_chunk_size`: 0 = 256 tokens on CPU (a 151,936-wide fp32 chunk is 155 MB), 1024 on a GPU."""
    return size or (256 if device == "cpu" else 1024)


M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def return_freed_memory_to_os(threshold_bytes: int = 4 << 20) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more from mmap, so freeing it returns it to the OS.

    glibc's default mmap threshold is dynamic: it rises to the size of the largest block
    freed (up to 32 MiB), after which activations and gradients of many MiB come from the
    brk heap. Freed between steps, they fragment it, and a CPU training process keeps
    ~250-400 MB it no longer uses (measured with ``bench/loss_micro.py``: peak RSS
    1,750 MB with glibc's default, 1,370 MB at 1 MiB, 1,440-1,480 MB at 4 MiB). A fixed
    threshold also turns the dynamic one off for the rest of the process.

    The price is fresh pages: every mmap'd block is zeroed by the kernel on first touch.
    PyTorch backs tensors of 2 MB or more with huge pages when ``THP_MEM_ALLOC_ENABLE=1``
    (the entry points, flows/finetune.py and sft_core/launch.py, set it before torch is
    imported), but only the whole 2 MB extents of a block: the tail of a 3.9 MB
    activation still faults in 4 KiB pages. The 4 MiB default keeps such blocks on the
    heap, where they are reused: per training step of the bench's model, ~26k page faults
    and 0.6-0.8 s of kernel time instead of ~210k and 1.2-1.3 s at 1 MiB, for ~100 MB more
    peak RSS. Linux/glibc only; returns False (and changes nothing) elsewhere.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def make_collator(tokenizer: Any, *, padding_free: bool, attn_implementation: str, pad_to_multiple_of: int | None = None):
    """Padding-free flattening where attention keeps examples apart, else dynamic padding."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free and attn_implementation in ATTN_KEEPS_PACKED_APART:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of)


def best_model_metric(tc: TrainConfig, *, has_eval: bool, can_generate: bool) -> str | None:
    """The Trainer's `metric_for_best_model`, or None when the last step is kept.

    `gen_score` needs evaluation at every save (save_steps a multiple of eval_steps) and a model
    every rank can generate with (one process, or DDP); otherwise eval loss decides.
    """
    if not has_eval or tc.metric_for_best_model == "none" or tc.save_steps % tc.eval_steps != 0:
        return None
    if tc.metric_for_best_model == "gen_score" and can_generate:
        return "eval_gen_score"
    return "eval_loss"


def build_training_args(tc: TrainConfig, output_dir: str | Path, *, device: str, bf16: bool, has_eval: bool,
                        best_metric: str | None):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=tc.per_device_train_batch_size,
        per_device_eval_batch_size=tc.per_device_eval_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        num_train_epochs=tc.num_train_epochs,
        max_steps=tc.max_steps,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler_type,
        warmup_steps=tc.warmup_ratio,
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=tc.eval_steps,
        logging_strategy="steps",
        logging_steps=tc.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=tc.save_steps,
        save_total_limit=tc.save_total_limit,
        load_best_model_at_end=best_metric is not None,
        metric_for_best_model=best_metric,
        greater_is_better=None if best_metric is None else best_metric != "eval_loss",
        prediction_loss_only=True,  # never gather 150k-wide eval logits
        activation_checkpointing=tc.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if tc.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if tc.group_by_length else "random",
        length_column_name="length",
        bf16=bf16,
        seed=tc.seed,
        data_seed=tc.seed,
        use_cpu=device == "cpu",
        report_to="none",  # the project's own callback logs; transformers' MLflowCallback stays off
        dataloader_num_workers=tc.dataloader_num_workers,
        save_only_model=False,
        disable_tqdm=True,  # progress is one line per logged step (make_metrics_callback), not a bar
        logging_nan_inf_filter=False,  # its filter logged a NaN loss as 0 (the mean of none); a NaN stops training
        ddp_find_unused_parameters=False,
    )


def make_trainer_class():
    """A `Trainer` whose loss skips prompt logits and which reports supervised tokens/s."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from sft_core.loss import compute_sft_loss

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """Length grouping whose order is a function of (seed, epoch) alone.

        transformers builds its `LengthGroupedSampler` for training without a generator, so each epoch's order
        is drawn from the global torch RNG as it stands when the epoch starts: after a whole epoch 1 in an
        uninterrupted run, right after start-up in a run resumed inside epoch 2 (from there on the losses
        differed). Seeded per epoch (accelerate's `set_epoch`, as its seedable random sampler is), the resumed run
        skips the same batches of the same order; every rank draws the same order too.
        """

        def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
            super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            self.generator.manual_seed(self.seed + self.epoch)
            return super().__iter__()

    class SFTTrainer(Trainer):
        loss_mode: str = "chunked"

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            return sampler

        def __init__(self, *args: Any, loss_mode: str = "chunked", loss_chunk_size: int = 1024,
                     generation_check: GenerationCheck | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.loss_mode = loss_mode
            self.loss_chunk_size = loss_chunk_size
            self.generation_check = generation_check
            self._supervised_tokens = 0
            self._tokens_clock = time.perf_counter()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "length"}
            loss, stats = compute_sft_loss(model, inputs, num_items_in_batch=num_items_in_batch, mode=self.loss_mode,
                                            chunk_size=self.loss_chunk_size)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # the count is summed over ranks and DDP averages gradients (as Trainer does)
            if model.training:
                self._supervised_tokens += int(stats["num_tokens"])
            return (loss, {}) if return_outputs else loss  # no logits: eval is prediction_loss_only

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:  # a training log line: attach supervised tokens/s since the last one
                now = time.perf_counter()
                tokens = torch.tensor(self._supervised_tokens, device=self.args.device)
                if self.args.world_size > 1:
                    tokens = self.accelerator.reduce(tokens, reduction="sum")
                logs["tokens_per_second"] = round(float(tokens) / max(now - self._tokens_clock, 1e-9), 2)
                self._supervised_tokens, self._tokens_clock = 0, now
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
            """Eval loss, plus the generation check when this step saves a checkpoint (NaN otherwise:
            only a saved checkpoint can be selected, so generating at other evaluations is wasted)."""
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if self.generation_check is not None:
                measured = self.control.should_save
                if measured:
                    found = self.generation_check.run(self.accelerator.unwrap_model(self.model), self.processing_class)
                else:
                    found = dict.fromkeys(GENERATION_CHECK_METRICS, float("nan"))
                found = {f"{metric_key_prefix}_{k}": v for k, v in found.items()}
                metrics.update(found)
                if measured:
                    self.log(found)
            return metrics

    return SFTTrainer


ProgressLine = Callable[[str], None]


def progress_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    """One line per logged step: where training is and how it goes."""
    short = {"train/loss": "loss", "train/learning_rate": "lr", "train/grad_norm": "grad", SELECTION_LOSS: "eval loss",
             SELECTION + "format_ok_rate": "format", SELECTION + "stop_rate": "stop", SELECTION + "rouge_l": "rouge"}
    parts = [f"step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f}%)"]
    parts += [f"{label} {metrics[k]:.4g}" for k, label in short.items() if k in metrics]
    if "train/tokens_per_second" in metrics:
        parts.append(f"{metrics['train/tokens_per_second']:,.0f} tok/s")
    return "  ".join(parts)


def read_metrics(metrics_file: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl; a last line cut off by a crash is left out."""
    path = Path(metrics_file)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def drop_metrics_after(metrics_file: Path, step: int) -> None:
    """Keep the metric lines up to `step` (atomically): what a resumed run logs again replaces the rest."""
    if not metrics_file.exists():
        return
    kept = [r for r in read_metrics(metrics_file) if r.get("step", 0) <= step]
    tmp = metrics_file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(metrics_file)


def make_metrics_callback(metrics_file: Path, sink: MetricsSink | None = None, progress: ProgressLine | None = None):
    """Per-step metrics to a JSONL file (always), to `sink` (e.g. MLflow) and as one line to `progress`,
    main process only."""
    from transformers import TrainerCallback

    # evaluations during training run on the selection set: their curve is `selection/…`, never the figures
    # of the model the run ships (`eval/…`, `gen/…`, measured afterwards on the report set)
    names = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
             "tokens_per_second": "train/tokens_per_second", "epoch": "train/epoch", "eval_loss": f"{SELECTION}loss",
             **{f"eval_{k}": f"{SELECTION}{k}" for k in GENERATION_CHECK_METRICS}}

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            metrics = {names[k]: float(v) for k, v in logs.items() if k in names and v is not None and math.isfinite(float(v))}
            if not metrics:
                return
            with metrics_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **metrics}) + "\n")
            if sink is not None:
                sink(state.global_step, metrics)
            if progress is not None and set(metrics) - {"train/epoch"}:
                progress(progress_line(state.global_step, state.max_steps, metrics))

    return MetricsCallback()


def run_training(
    cfg: PipelineConfig,
    *,
    model_dir: str | Path,
    train_data: str | Path,
    eval_data: str | Path | None,
    output_dir: str | Path,
    sink: MetricsSink | None = None,
    progress: ProgressLine | None = None,
    extra_callbacks: list | None = None,
    generation_check: GenerationCheck | None = None,
) -> Trained:
    """Fine-tune `model_dir` on tokenized datasets saved with `save_to_disk`; resume when possible."""
    import datasets
    import torch
    from transformers import set_seed

    tc = cfg.train
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(tc.seed)
    device = resolve_device(tc.device)
    if device == "cpu":  # host RAM is the training memory: do not let the heap hoard freed activations
        return_freed_memory_to_os()
    dtype = resolve_dtype(cfg.model.dtype, device)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(model_dir, dtype=dtype, device="cpu", attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code)
    prepare_for_sft(model, tokenizer)
    if getattr(model.config, "tie_word_embeddings", False):  # the lm_head is the embedding: a checkpoint has no copy,
        model._keys_to_ignore_on_save = {"lm_head.weight"}  # so loading the selected one ties it instead of warning
    if cfg.eval.repetition_penalty != 1.0:  # the shipped model generates as it was evaluated and selected
        model.generation_config.repetition_penalty = cfg.eval.repetition_penalty
    model.config.use_cache = False

    train_ds = datasets.load_from_disk(str(train_data))
    eval_ds = datasets.load_from_disk(str(eval_data)) if eval_data else None
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    has_eval = eval_ds is not None
    # every rank must generate the same thing to agree on the best checkpoint: one process or DDP, not sharded weights
    can_generate = generation_check is not None and (tc.num_processes == 1 or tc.accelerate_config == "ddp")
    best_metric = best_model_metric(tc, has_eval=has_eval, can_generate=can_generate)
    args = build_training_args(tc, out, device=device, bf16=dtype == torch.bfloat16 and device == "cuda",
                               has_eval=has_eval, best_metric=best_metric)
    collator = make_collator(tokenizer, padding_free=resolve_padding_free(tc.padding_free, device),
                             attn_implementation=cfg.model.attn_implementation,
                             pad_to_multiple_of=8 if device == "cuda" else None)
    metrics_file = out / "metrics.jsonl"
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[make_finite_loss_callback(), make_metrics_callback(metrics_file, sink, progress),
                   make_checksum_callback(), *(extra_callbacks or [])],
        # the chunked loss calls the lm_head outside the wrapper's forward: fine for DDP, not for sharded weights
        loss_mode=tc.loss if tc.num_processes == 1 or tc.accelerate_config == "ddp" else "standard",
        loss_chunk_size=resolve_loss_chunk_size(tc.loss_chunk_size, device),
        generation_check=generation_check if best_metric == "eval_gen_score" else None,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it would print every log dict a second time
    resume = last_checkpoint(out, warn=progress or print)
    if resume is not None:  # the steps after the checkpoint are trained again: their old lines would count twice
        drop_metrics_after(metrics_file, checkpoint_step(resume))
        if trainer.is_world_process_zero():
            (progress or print)(f"resuming from {Path(resume).name}: the steps after {checkpoint_step(resume)} are "
                                "trained again")
    # the selection curve starts at step 0 with the base model's eval loss (a fresh start only: a resumed run has
    # that point already)
    trainer.args.eval_on_start = has_eval and resume is None
    result = trainer.train(resume_from_checkpoint=resume)
    final_dir = out / "final"
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final model is one full state dict on rank 0
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final_dir))  # safetensors; main process only under accelerate
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final_dir)
        trainer.model.generation_config.save_pretrained(final_dir)
        (final_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: the shipped model is safetensors only
    state = trainer.state
    return Trained(
        key=None,
        folder=str(out),
        output_dir=str(out),
        final_model_dir=str(final_dir),
        global_step=state.global_step,
        epochs=float(state.epoch or 0.0),
        train_loss=float(result.training_loss) if result.training_loss is not None else None,
        best_checkpoint=state.best_model_checkpoint,
        selected_by=best_metric,
        best_value=float(state.best_metric) if state.best_metric is not None and best_metric else None,
        resumed_from=resume,
        metrics_file=str(metrics_file),
    )
