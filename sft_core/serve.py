"""Serving a model folder over HTTP, within limits: `qwen-sft serve-model`.

The request and response follow MLflow's scoring protocol, so clients of `mlflow models serve`
keep working: ``POST /invocations {"inputs": ["question", ...], "params": {"max_new_tokens": 512}}``
answers ``{"predictions": ["<think>…</think>\\n\\n…", ...]}``. Unlike it, this server holds its limits:
a request over a cap (generated tokens, characters per question, questions per request, body
size) is refused with a 4xx that says which cap; generation stops when the client disconnects,
when the request's time is up, or when the server is told to stop (SIGTERM), so no work goes on
for nobody. A question is encoded as text: it cannot open or close a chat turn. One generation
runs at a time (one model in memory); other requests wait their turn.

It binds 127.0.0.1 by default and has no authentication of its own: to reach it from elsewhere,
put it behind a reverse proxy that authenticates (nginx or Caddy with basic auth or OIDC, a
cloud load balancer with IAM) instead of binding 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # at module level: FastAPI reads the handlers' annotations by name
from fastapi.responses import JSONResponse


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 2048  # generated tokens per answer
    default_new_tokens: int = 1024
    max_input_chars: int = 4000  # characters per question
    max_batch: int = 8  # questions per request
    max_body_bytes: int = 256 * 1024
    timeout_s: float = 600.0  # per request, queueing included


class RequestError(Exception):
    """A request the server refuses: `status` and a message that names the cap."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_request(body: dict[str, Any], limits: Limits) -> tuple[list[str], dict[str, Any]]:
    """(questions, generation settings) of an `/invocations` body, or a RequestError."""
    inputs = body.get("inputs", body.get("instances"))
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, dict) and "prompt" in inputs:
        inputs = inputs["prompt"] if isinstance(inputs["prompt"], list) else [inputs["prompt"]]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(q, str) for q in inputs):
        raise RequestError(422, 'expected {"inputs": ["question", ...]} (a string or a list of strings)')
    if len(inputs) > limits.max_batch:
        raise RequestError(413, f"{len(inputs)} questions in one request; this server takes at most "
                                f"{limits.max_batch} (serve-model --max-batch)")
    for i, q in enumerate(inputs):
        if len(q) > limits.max_input_chars:
            raise RequestError(413, f"question {i + 1} is {len(q):,} characters; this server takes at most "
                                    f"{limits.max_input_chars:,} (serve-model --max-input-chars)")
        if not q.strip():
            raise RequestError(422, f"question {i + 1} is blank")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError(422, '"params" must be an object')
    unknown = sorted(set(params) - {"max_new_tokens", "do_sample", "temperature", "top_p"})
    if unknown:
        raise RequestError(422, f"unknown params {', '.join(unknown)} (max_new_tokens, do_sample, temperature, top_p)")
    settings: dict[str, Any] = {"max_new_tokens": params.get("max_new_tokens", limits.default_new_tokens),
                                "do_sample": params.get("do_sample", False),
                                "temperature": params.get("temperature", 0.7), "top_p": params.get("top_p", 0.9)}
    n = settings["max_new_tokens"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RequestError(422, f"max_new_tokens must be a positive integer, got {n!r}")
    if n > limits.max_new_tokens:
        raise RequestError(422, f"max_new_tokens {n:,} is over this server's cap of {limits.max_new_tokens:,} "
                                "(serve-model --max-new-tokens)")
    if not isinstance(settings["do_sample"], bool):
        raise RequestError(422, "do_sample must be true or false")
    for key, low, high in (("temperature", 0.0, 10.0), ("top_p", 0.0, 1.0)):
        value = settings[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low < value <= high:
            raise RequestError(422, f"{key} must be a number in ({low}, {high}], got {value!r}")
    return inputs, settings


class Generator:
    """The model, generating one request at a time; every generation can be cut short."""

    def __init__(self, model_dir: str | Path, *, system_prompt: str, device: str = "auto", dtype: str = "auto",
                 repetition_penalty: float | None = None) -> None:
        from sft_core.modeling import load_model, load_tokenizer, resolve_device

        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype=dtype, device=self.device)
        self.system_prompt = system_prompt
        self.repetition_penalty = (repetition_penalty if repetition_penalty is not None
                                   else getattr(self.model.generation_config, "repetition_penalty", None) or 1.0)
        self.lock = threading.Lock()
        self.shutting_down = threading.Event()
        self.stats = {"completed": 0, "cancelled": 0}
        self.busy = False

    def answer(self, questions: list[str], settings: dict[str, Any], should_stop) -> tuple[list[str], bool]:
        """(texts, cut short) for `questions`; `should_stop()` is asked after every decoding step."""
        from sft_core.generate import generate_answers

        cut = {"short": False}

        def stop() -> bool:
            if self.shutting_down.is_set() or should_stop():
                cut["short"] = True
            return cut["short"]

        with self.lock:
            self.busy = True
            try:
                gens = generate_answers(self.model, self.tokenizer, questions, system_prompt=self.system_prompt,
                                        max_new_tokens=settings["max_new_tokens"], batch_size=len(questions),
                                        do_sample=settings["do_sample"], temperature=settings["temperature"],
                                        top_p=settings["top_p"], repetition_penalty=self.repetition_penalty,
                                        should_stop=stop)
            finally:
                self.busy = False
        self.stats["cancelled" if cut["short"] else "completed"] += 1
        return [g.text for g in gens], cut["short"]


def make_app(generator: Generator, limits: Limits, *, model_name: str = ""):
    """The FastAPI app: `/invocations`, `/ping`, `/health`."""
    app = FastAPI(title="qwen-sft model server", docs_url=None, redoc_url=None)

    @app.get("/ping")
    def ping() -> dict:
        return {"status": "ok"}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "busy": generator.busy, **generator.stats,
                "limits": limits.__dict__}

    @app.post("/invocations")
    async def invocations(request: Request):
        started = time.monotonic()
        size = int(request.headers.get("content-length") or 0)
        if size > limits.max_body_bytes:
            return _error(413, f"request body of {size:,} bytes; this server takes at most {limits.max_body_bytes:,} "
                               "(serve-model --max-body-bytes)")
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            return _error(413, f"request body of {len(body):,} bytes; this server takes at most "
                               f"{limits.max_body_bytes:,} (serve-model --max-body-bytes)")
        try:
            import json

            questions, settings = parse_request(json.loads(body or b"{}"), limits)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except ValueError:
            return _error(400, "the body is not JSON")
        gone = threading.Event()

        def should_stop() -> bool:
            return gone.is_set() or time.monotonic() - started > limits.timeout_s

        work = asyncio.get_running_loop().run_in_executor(None, generator.answer, questions, settings, should_stop)
        while not work.done():
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if not done and await request.is_disconnected():
                gone.set()  # nobody waits for the answer: stop generating it
        texts, cut_short = await work
        if cut_short and gone.is_set():
            return _error(499, "the client closed the connection; generation stopped")
        if cut_short and generator.shutting_down.is_set():
            return _error(503, "the server is stopping; generation stopped")
        if cut_short:
            return _error(504, f"the answer took longer than {limits.timeout_s:g} s (serve-model --timeout); "
                               "generation stopped")
        return {"predictions": texts}

    def _error(status: int, message: str):
        return JSONResponse({"error_code": status, "message": message}, status_code=status)

    return app


def serve(generator: Generator, limits: Limits, *, host: str = "127.0.0.1", port: int = 5001,
          model_name: str = "") -> None:
    """Run the server until SIGINT/SIGTERM; a generation in flight is stopped so that shutdown is prompt."""
    import uvicorn

    config = uvicorn.Config(make_app(generator, limits, model_name=model_name), host=host, port=port,
                            log_level="info", timeout_graceful_shutdown=15, access_log=False)
    server = uvicorn.Server(config)
    original = server.handle_exit

    def handle_exit(sig, frame) -> None:
        generator.shutting_down.set()  # a running generation ends at its next step
        original(sig, frame)

    server.handle_exit = handle_exit  # uvicorn installs this for SIGINT and SIGTERM
    server.run()
