"""vLLM as the engine: `serve-model --engine vllm` and `sft_core.vllm_engine.generate_answers_vllm`.

vLLM lives in its own virtualenv (`make vllm` builds `.venv-vllm`). The tests that need it are marked slow; on a
user's clone without it they skip and say so, in CI (CI=true, where `.ci/run` builds it) they fail. The
failure modes a user meets first (no vLLM, a vLLM with the wrong transformers, a memory reservation refused)
are one line each, with what to do.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sft_core.errors import EngineError
from tests.conftest import require
from tests.servers import BIN, child_env
from tests.test_serving import _serve_model, check_openai_client

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The Python of vLLM's environment; missing: skipped on a clone, a failure in CI."""
    from sft_core.vllm_engine import check_environment, find_vllm

    try:
        target = find_vllm()
        if target.python is not None:
            check_environment(target.python)
    except EngineError as exc:
        require(False, f"vLLM's environment (`make vllm`; {exc})")
    return target.python


def _serve_model_fails(tmp_path: Path, *extra: str, env: dict[str, str] | None = None,
                       timeout: float = 600) -> subprocess.CompletedProcess:
    argv = [str(BIN / "qwen-sft"), "serve-model", "-c", "demo", "--engine", "vllm", "--set", "train.device=cpu",
            "--set", f"workdir={tmp_path / 'workdir'}", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env=child_env(HF_HUB_OFFLINE="1", **(env or {})))


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_no_vllm_where_it_is_looked_for_is_one_line_naming_the_make_target(tmp_path, tiny_model_dir):
    """QWEN_SFT_VLLM pointing at nothing, or at a Python without vLLM: one line that says `make vllm`, exit 10."""
    for setting, words in ((str(tmp_path / "no-such-venv"), "neither a Python interpreter"),
                           (sys.executable, "vLLM is not installed in")):
        proc = _serve_model_fails(tmp_path, "--model", str(tiny_model_dir), env={"QWEN_SFT_VLLM": setting},
                                  timeout=180)
        _one_line_error(proc, 10, words, "make vllm")


@pytest.mark.slow
def test_a_vllm_environment_with_the_wrong_transformers_is_refused_in_one_line(tmp_path, tiny_model_dir,
                                                                                 vllm_python):
    """vLLM pins transformers below the project's: a vLLM that would import the project's transformers (here:
    the project's site-packages first on its path) is refused before it starts, naming both versions."""
    import transformers

    wrapper = tmp_path / "python"
    site = Path(transformers.__file__).resolve().parent.parent
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{vllm_python}" "$@"\n', encoding="utf-8")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    proc = _serve_model_fails(tmp_path, "--model", str(tiny_model_dir), env={"QWEN_SFT_VLLM": str(wrapper)},
                              timeout=180)
    _one_line_error(proc, 10, f"has {transformers.__version__}", "needs transformers", "make vllm")


@pytest.mark.slow
def test_a_memory_reservation_vllm_refuses_is_one_line_with_what_to_do(tmp_path, format_model_dir, vllm_python):
    """On CPU vLLM reserves `--gpu-memory-utilization` of the host's RAM and refuses to start when that much is
    not free: one line that names the option, not vLLM's tracebacks."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") or _has_cuda():
        pytest.skip("the refusal reproduced here is the CPU backend's")
    proc = _serve_model_fails(tmp_path, "--model", str(format_model_dir), "--gpu-memory-utilization", "0.999")
    _one_line_error(proc, 10, "could not reserve", "--gpu-memory-utilization", "vLLM's log")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
def test_vllm_behind_serve_model_answers_openai_clients_within_the_same_limits(tmp_path, format_model_dir,
                                                                                 vllm_python):
    """`serve-model --engine vllm`: the same OpenAI checks as the HF engine (replies, stream, injection question
    counted as text by vLLM itself, caps, API key); SIGTERM stops the server and the vLLM process with it."""
    import signal

    import psutil

    key = "sk-vllm-" + "z" * 24
    server = _serve_model(tmp_path, format_model_dir, engine="vllm", api_key=key, timeout=600)
    try:
        family = psutil.Process(server.pid).children(recursive=True)
        assert any("vllm.entrypoints.openai.api_server" in " ".join(p.cmdline()) for p in family)
        check_openai_client(server.url, key, format_model_dir)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
    finally:
        server.stop()
    gone, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, f"vLLM outlived serve-model: {[p.pid for p in alive]}"
    log = server.log_tail(100_000)
    assert key not in log and "vLLM ready in" in log, log[-3000:]


@pytest.mark.slow
def test_both_engines_make_the_same_format_and_stop_decisions(tmp_path, format_model_dir, vllm_python):
    """`generate_answers_vllm` returns what `generate_answers` returns: on the same questions, greedy, the same
    format and stop decisions; where the text differs, the first differing token is a near tie in the HF model's
    own logits (float rounding of two kernels picks either), which is said per question."""
    import json

    import psutil
    import torch

    from sft_core.chat import encode_prompt
    from sft_core.data import BUNDLED_SAMPLE
    from sft_core.generate import generate_answers
    from sft_core.modeling import load_model, load_tokenizer
    from sft_core.vllm_engine import generate_answers_vllm
    from tests.format_model import ROWS, SYSTEM

    unseen = [json.loads(x)["question"][:40] for x in BUNDLED_SAMPLE.read_text(encoding="utf-8").splitlines()[100:106]]
    questions = [r["question"] for r in ROWS] + unseen
    references = [r["answer"] for r in ROWS] + ["" for _ in unseen]
    tokenizer = load_tokenizer(format_model_dir)
    model = load_model(format_model_dir, dtype="float32", device="cpu")
    hf = generate_answers(model, tokenizer, questions, system_prompt=SYSTEM, max_new_tokens=96, batch_size=1,
                          references=references)
    calls = []
    vl = generate_answers_vllm(format_model_dir, questions, system_prompt=SYSTEM, max_new_tokens=96,
                               references=references, progress=lambda done, total: calls.append((done, total)),
                               log_path=tmp_path / "vllm.log")
    assert calls[-1] == (len(questions), len(questions)) and len(calls) == len(questions)
    assert not [p for p in psutil.Process().children(recursive=True) if "vllm" in " ".join(p.cmdline())], \
        "the server started for the call is stopped after it"
    assert [type(g) for g in vl] == [type(g) for g in hf] and [g.question for g in vl] == questions
    assert sum(g.format_ok and g.stopped for g in hf) >= len(ROWS) // 2, "the model learned the format"

    diverged = [i for i, (h, v) in enumerate(zip(hf, vl)) if h.text != v.text]
    for i in set(range(len(questions))) - set(diverged):
        h, v = hf[i], vl[i]
        assert (h.format_ok, h.stopped, h.new_tokens, h.think, h.answer, h.rouge_l) == \
               (v.format_ok, v.stopped, v.new_tokens, v.think, v.answer, v.rouge_l), i
    print(f"{len(questions) - len(diverged)}/{len(questions)} replies identical token for token")

    # a vLLM already running (QWEN_SFT_VLLM=http://…, base_url=): the same answers, and the call leaves it running
    from sft_core.engine import Sampling
    from sft_core.vllm_engine import VllmServer

    with VllmServer(format_model_dir, served_name="running", max_model_len=512, log_path=tmp_path / "v2.log") as server:
        os.environ["VLLM_API_KEY"] = server.key
        try:
            again = generate_answers_vllm(format_model_dir, questions[:3], system_prompt=SYSTEM, max_new_tokens=96,
                                          references=references[:3], base_url=server.url)
        finally:
            del os.environ["VLLM_API_KEY"]
        assert [g.to_dict() for g in again] == [g.to_dict() for g in vl[:3]]
        assert server.proc is not None and server.proc.poll() is None
        # explain each divergence: where the two engines' ids part, the HF model's top two logits are a near tie
        import httpx

        stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        with httpx.Client(timeout=300) as client:
            for i in diverged:
                prompt = encode_prompt(tokenizer, questions[i], SYSTEM)
                v_ids = server.generate_ids(client, prompt, Sampling(max_new_tokens=96), stops, 1.0)
                with torch.inference_mode():
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=96, do_sample=False,
                                         eos_token_id=stops, pad_token_id=stops[0])
                    h_ids = out[0, len(prompt):].tolist()
                    k = next(j for j, (a, b) in enumerate(zip(h_ids, v_ids)) if a != b)
                    top = torch.topk(model(torch.tensor([prompt + h_ids[:k]])).logits[0, -1], 2).values
                gap = float(top[0] - top[1])
                same = (hf[i].format_ok, hf[i].stopped) == (vl[i].format_ok, vl[i].stopped)
                print(f"question {i}: the engines part at generated token {k}, where the HF model's top two "
                      f"logits are {gap:.2e} apart; same format and stop decision: {same}")
                assert gap < 1e-3, f"question {i}: a real difference at token {k} (gap {gap:.3f}), not rounding"
    assert len(diverged) <= len(questions) // 4, diverged


@pytest.mark.slow
def test_the_engines_bench_runs(vllm_python):
    """`bench/engines.py --tiny` runs end to end and ends with its ratio line (no timing asserted)."""
    import re

    from tests.test_bench_smoke import last_line, run_bench

    assert re.fullmatch(r"vllm speedup [\d.]+x", last_line(run_bench("engines.py", "--tiny", timeout=900)))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_run_with_vllm_as_the_evaluation_engine_reports_what_the_hf_engine_reports(tmp_path, vllm_python):
    """`--set eval.engine=vllm`: checkpoint selection and both generate stages answer through vLLM servers (one
    per checkpoint folder and per model), and the run ends with the same table as with transformers."""
    from flows.finetune import comparison_rows, run_in_process

    shape = ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=256", "model.tiny.vocab_size=1024",
             "model.tiny.num_attention_heads=4", "model.tiny.num_key_value_heads=2",  # head size 32: vLLM's CPU has it
             "data.max_length=256", "train.max_steps=8", "train.eval_steps=4", "train.save_steps=4",
             "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "eval.max_new_tokens=8",
             "eval.harness=false", "registry.enabled=false", "train.metric_for_best_model=gen_score"]
    runs = {}
    for engine in ("hf", "vllm"):
        runs[engine] = run_in_process("demo", [*shape, f"workdir={tmp_path / engine}", f"eval.engine={engine}",
                                               f"eval.vllm={vllm_python}"])
    hf, vl = runs["hf"], runs["vllm"]
    assert [r[0] for r in comparison_rows(vl.metrics)] == [r[0] for r in comparison_rows(hf.metrics)]
    assert vl.metrics["gen/num_samples"] == hf.metrics["gen/num_samples"] == 13
    import json
    from pathlib import Path

    def selection_scores(summary) -> dict[int, float]:
        folder = next(Path(r.folder) for r in summary.stages if r.stage == "train")
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["selection/gen_score"] for r in lines if "selection/gen_score" in r}

    assert sorted(selection_scores(vl)) == [4, 8], "selection generated through vLLM at every save"
    assert selection_scores(vl) == selection_scores(hf), "greedy on the same weights: the same selection"
    for name in ("gen/format_ok_rate", "gen/stop_rate", "base/gen/format_ok_rate", "base/gen/stop_rate"):
        assert vl.metrics[name] == hf.metrics[name], name
