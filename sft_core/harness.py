"""lm-evaluation-harness on a model folder, with the project's validation split as a local task.

An evaluator this project did not write: lm-eval renders the chat template, batches, generates
greedily until the stop tokens and aggregates; the task (``sft_core/harness_task/``) only names the
data and the two metrics (the think/answer format check and character-level ROUGE-L). Offline:
the model is a local folder and the data a local JSON Lines file. Needs ``pip install '.[eval]'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from sft_core.chat import stop_token_ids
from sft_core.data import write_jsonl
from sft_core.errors import ConfigError
from sft_core.stats import bootstrap_mean, rate

TASK = "qwen_sft_medical"


EXTRA = "pip install 'qwen-sft-pipeline[eval]'"  # the optional dependency that brings lm-evaluation-harness


def lm_eval_missing() -> str | None:
    """What to say when lm-evaluation-harness cannot be imported (a plain install, without the `[eval]` extra),
    or None when it can. A run skips `eval.harness` with this line; `qwen-sft harness` refuses with it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return f"lm-evaluation-harness is not installed ({EXTRA} adds it)"
    return None


def require_lm_eval() -> None:
    """A clear error when the optional evaluator is not installed."""
    missing = lm_eval_missing()
    if missing:
        raise ConfigError(f"{missing}: it is needed here, or set eval.harness=false")


def write_task(folder: Path, val_jsonl: Path, *, max_new_tokens: int, stop: list[str],
               repetition_penalty: float = 1.0) -> Path:
    """The task YAML (data file, budget and the model's stop strings filled in) and its metrics module, into `folder`.

    `until` is always the model's own end-of-turn strings: left out, lm-eval stops at its few-shot delimiter
    `"\n\n"`, which a reasoning model writes inside its think block, so every answer would be cut there.
    """
    import yaml

    if not stop:
        raise ValueError("the harness task needs the model's stop strings")
    src = resources.files("sft_core") / "harness_task"
    folder.mkdir(parents=True, exist_ok=True)
    text = (src / f"{TASK}.yaml").read_text(encoding="utf-8")
    text = text.replace("VAL_JSONL", json.dumps(str(val_jsonl)))
    text = text.replace("max_gen_toks: 256", f"max_gen_toks: {int(max_new_tokens)}")
    text = text.replace('until: ["<|im_end|>", "<|endoftext|>"]', f"until: {json.dumps(stop, ensure_ascii=False)}")
    if repetition_penalty != 1.0:
        text = text.replace("do_sample: false", f"do_sample: false\n  repetition_penalty: {float(repetition_penalty)}")
    yaml.safe_load(text.replace("!function", ""))  # still YAML after the edits
    (folder / f"{TASK}.yaml").write_text(text, encoding="utf-8")
    (folder / "utils.py").write_text((src / "utils.py").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def stop_strings(model_dir: str | Path) -> list[str]:
    """The model's stop tokens as text (its generation config's eos, `<|im_end|>`, `<|endoftext|>`)."""
    from transformers import GenerationConfig

    from sft_core.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    try:
        generation_config = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        generation_config = None
    return [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, generation_config)]
def _quiet_hf_model(model_args: dict[str, Any], batch_size: int):
    """lm-eval's Hugging Face model, built as `simple_evaluate(model="hf")` builds it, without its progress bars.

    Its request loops pass `disable=False` to tqdm themselves (TQDM_DISABLE does not reach them); a bar's carriage
    returns garble Prefect's log lines and a worker's log. Same class, same requests, same answers.
    """
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM.create_from_arg_obj(model_args, {"batch_size": batch_size, "max_batch_size": None, "device": None})


@contextlib.contextmanager
def _quiet_git_probe() -> Iterator[None]:
    """lm-eval records `git describe` of the current folder and lets git print `fatal: not a git repository` where
    it is not one (a worker's folder): the same probe, with git's complaint discarded."""
    import lm_eval.evaluator as evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_commit_hash() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_harness(
    model_dir: str | Path,
    val_rows: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    system_prompt: str,
    max_new_tokens: int,
    batch_size: int = 16,
    repetition_penalty: float = 1.0,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run the task on `val_rows` with the model in `model_dir`; figures, results and samples into `out_dir`."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = Path(out_dir)
    data = write_jsonl([{k: r[k] for k in ("question", "think", "answer")} for r in val_rows], out / "val.jsonl")
    task_dir = write_task(out / "task", data, max_new_tokens=max_new_tokens, stop=stop_strings(model_dir),
                          repetition_penalty=repetition_penalty)
    model_args = {"pretrained": str(model_dir), "dtype": dtype, "device": device, "trust_remote_code": False}
    with _quiet_git_probe():
        results = lm_eval.simple_evaluate(
            model=_quiet_hf_model(model_args, batch_size),
            model_args=model_args,
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),  # not its ~10k built-in tasks
            apply_chat_template=True,
            system_instruction=system_prompt,
            batch_size=batch_size,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
        )
    figures = results["results"][TASK]
    samples = [{"question": s["doc"]["question"], "output": s["filtered_resps"][0], "format_ok": s["format_ok"],
                "rouge_l": s["rouge_l"]} for s in results["samples"][TASK]]
    # lm-eval's own aggregates, with the pipeline's intervals around them (Wilson, fixed-seed bootstrap)
    format_ok, rouge = rate([bool(s["format_ok"]) for s in samples]), bootstrap_mean([s["rouge_l"] for s in samples])
    metrics = {"format_ok_rate": float(figures["format_ok,none"]), "format_ok_rate_lo": format_ok.lo,
               "format_ok_rate_hi": format_ok.hi, "rouge_l": float(figures["rouge_l,none"]), "rouge_l_lo": rouge.lo,
               "rouge_l_hi": rouge.hi, "num_samples": float(len(samples))}
    write_jsonl(samples, out / "samples.jsonl")
    (out / "results.json").write_text(json.dumps({"metrics": metrics, "lm_eval": results["results"],
                                                  "versions": results.get("versions"),
                                                  "lm_eval_version": getattr(lm_eval, "__version__", "?")},
                                                 ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    return {"metrics": metrics, "samples": str(out / "samples.jsonl"), "results": str(out / "results.json")}
