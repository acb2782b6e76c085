"""Serving a model folder over HTTP, within limits: `qwen-sft serve-model`.

Two protocols on one server:
- OpenAI's chat completions, what every chat client, SDK and gateway speaks: ``GET /v1/models`` and
  ``POST /v1/chat/completions`` (plain, or ``"stream": true`` as server-sent events ending ``data: [DONE]``);
  the reply's think block comes back as ``reasoning_content``, the answer as ``content``
  (`sft_core.openai_api`).
- MLflow's scoring protocol, for clients of `mlflow models serve`: ``POST /invocations {"inputs": ["question",
  ...], "params": {"max_new_tokens": 512}}`` answers ``{"predictions": ["<think>…</think>\\n\\n…", ...]}``.

Unlike a bare model server, it holds its limits: a request over a cap (generated tokens, characters, questions
per request, body size: counted while the body is read, chunked bodies included) is refused with a 4xx that
names the cap; a body of the wrong shape gets a 4xx that says what was expected; generation stops when the
client disconnects, when the request's time is up, or when the server is told to stop (SIGTERM), so no work
goes on for nobody. A message's text is encoded as text (`sft_core.chat.encode_chat`): it cannot open or close
a chat turn, whichever engine generates (`sft_core.engine`).

It binds 127.0.0.1 by default. With an API key (`--api-key` or QWEN_SFT_API_KEY) every route but `/ping` and
`/health` wants ``Authorization: Bearer KEY`` and answers 401 without it; to serve others, keep it on loopback
behind a reverse proxy that terminates TLS.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request  # at module level: FastAPI reads the handlers' annotations by name
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from sft_core import openai_api as oai
from sft_core.engine import Engine, Piece, Sampling
from sft_core.errors import EngineError
from sft_core.openai_api import API_KEY_ENV  # noqa: F401 - where the CLI and the docs find it


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 2048  # generated tokens per answer
    default_new_tokens: int = 1024
    max_input_chars: int = 4000  # characters per question (per conversation on /v1/chat/completions)
    max_batch: int = 8  # questions per request
    max_body_bytes: int = 256 * 1024
    timeout_s: float = 600.0  # per request, queueing included


class RequestError(Exception):
    """A request the server refuses: `status` and a message that names the cap or what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, counted while it arrives: past the cap the request is refused at once (413), whether the
    client announced its length or sends it chunked."""
    def too_big(size: int, more: str = "") -> RequestError:
        return RequestError(413, f"request body of {more}{size:,} bytes; this server takes at most "
                                 f"{limits.max_body_bytes:,} (serve-model --max-body-bytes)")

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big(size, "more than ")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except RecursionError:
        raise RequestError(400, "the body nests JSON too deeply") from None
    except ValueError:
        raise RequestError(400, "the body is not JSON") from None


def parse_request(body: Any, limits: Limits) -> tuple[list[str], dict[str, Any]]:
    """(questions, generation settings) of an `/invocations` body, or a RequestError."""
    if not isinstance(body, dict):
        raise RequestError(422, f'expected a JSON object {{"inputs": ["question", ...]}}, got {_kind(body)}')
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
    _check_budget(n, limits, "max_new_tokens")
    if not isinstance(settings["do_sample"], bool):
        raise RequestError(422, "do_sample must be true or false")
    for key, low, high in (("temperature", 0.0, 10.0), ("top_p", 0.0, 1.0)):
        value = settings[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low < value <= high:
            raise RequestError(422, f"{key} must be a number in ({low}, {high}], got {value!r}")
    return inputs, settings


def parse_chat(body: Any, limits: Limits, model_name: str) -> tuple[oai.ChatRequest, Sampling]:
    """The request and its decoding settings of a `/v1/chat/completions` body, or a RequestError."""
    if not isinstance(body, dict):
        raise RequestError(422, f"expected a JSON object {oai.EXPECTED_CHAT}, got {_kind(body)}")
    try:
        req = oai.ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestError(422, oai.validation_message(exc, oai.EXPECTED_CHAT)) from None
    if req.model != model_name:
        raise RequestError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'")
    chars = sum(len(m.text()) for m in req.messages)
    if chars > limits.max_input_chars:
        raise RequestError(413, f"the messages hold {chars:,} characters; this server takes at most "
                                f"{limits.max_input_chars:,} (serve-model --max-input-chars)")
    budget = req.new_tokens() or limits.default_new_tokens
    _check_budget(budget, limits, "max_tokens")
    sample = bool(req.temperature)  # absent or 0: greedy
    return req, Sampling(max_new_tokens=budget, do_sample=sample, temperature=req.temperature or 1.0,
                         top_p=req.top_p or 1.0, seed=req.seed)


def _check_budget(n: int, limits: Limits, name: str) -> None:
    if n > limits.max_new_tokens:
        raise RequestError(422, f"{name} {n:,} is over this server's cap of {limits.max_new_tokens:,} "
                                "(serve-model --max-new-tokens)")


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def make_app(engine: Engine, limits: Limits, *, model_name: str = "", api_key: str | None = None) -> FastAPI:
    """The FastAPI app: `/v1/models`, `/v1/chat/completions`, `/invocations`, `/ping`, `/health`."""
    app = FastAPI(title="qwen-sft model server", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())

    def unauthorized() -> RequestError:
        return RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")

    class _Job:
        """One request's clock and cancellation: `should_stop()` for the engine, and why it stopped."""

        def __init__(self) -> None:
            self.started = time.monotonic()
            self.gone = threading.Event()

        def should_stop(self) -> bool:
            return self.gone.is_set() or time.monotonic() - self.started > limits.timeout_s

        def why(self) -> tuple[int, str]:
            if self.gone.is_set():
                return 499, "the client closed the connection; generation stopped"
            if engine.shutting_down.is_set():
                return 503, "the server is stopping; generation stopped"
            return 504, (f"the answer took longer than {limits.timeout_s:g} s (serve-model --timeout); "
                         "generation stopped")

    async def run_watched(request: Request, job: _Job, fn, *args):
        """Run `fn` in a worker thread; when the client disconnects meanwhile, tell the engine to stop."""
        work = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        while not work.done():
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if not done and await request.is_disconnected():
                job.gone.set()  # nobody waits for the answer: stop generating it
        return await work

    @app.get("/ping")
    def ping() -> dict:
        return {"status": "ok"}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "engine": engine.name, "busy": engine.busy, **engine.stats,
                "limits": limits.__dict__}

    @app.get("/v1/models")
    def models(request: Request):
        if not authorized(request):
            return _openai_error(unauthorized())
        return oai.models_list(model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        job = _Job()
        try:
            if not authorized(request):
                raise unauthorized()
            req, sampling = parse_chat(parse_json(await read_body(request, limits)), limits, model_name)
            prompt = engine.encode([{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                                    for m in req.messages])
            if engine.max_model_len and len(prompt) + sampling.max_new_tokens > engine.max_model_len:
                raise RequestError(413, f"the prompt is {len(prompt):,} tokens; with max_tokens "
                                        f"{sampling.max_new_tokens:,} that is over this server's context of "
                                        f"{engine.max_model_len:,} tokens (serve-model --max-model-len)")
        except RequestError as exc:
            return _openai_error(exc)
        cid = oai.completion_id()
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_events(job, cid, prompt, sampling, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            piece: Piece = await run_watched(request, job, engine.complete, prompt, sampling, job.should_stop)
        except EngineError as exc:  # vLLM gone or refusing: say so, the server stays up
            return _openai_error(RequestError(502, str(exc)))
        if piece.finish_reason == "cancelled":
            return _openai_error(RequestError(*job.why()))
        return oai.chat_completion(cid, model_name, piece.text, piece.finish_reason or "stop", len(prompt),
                                   piece.completion_tokens)

    async def _events(job: _Job, cid: str, prompt: list[int], sampling: Sampling,
                      include_usage: bool) -> AsyncIterator[str]:
        """The reply as server-sent events: the role, reasoning deltas, answer deltas, the finish, [DONE]."""
        from starlette.concurrency import iterate_in_threadpool

        splitter = oai.ReasoningSplitter()
        last = Piece("")
        try:
            yield _sse(oai.chunk(cid, model_name, {"role": "assistant", "content": ""}))
            try:
                async for piece in iterate_in_threadpool(engine.stream(prompt, sampling, job.should_stop)):
                    last = piece
                    for field, text in splitter.feed(piece.text):
                        yield _sse(oai.chunk(cid, model_name, oai.delta(field, text)))
            except EngineError as exc:
                yield _sse(oai.error_body(502, str(exc)))
                yield "data: [DONE]\n\n"
                return
            if last.finish_reason == "cancelled":  # headers are sent: the error travels as an event
                yield _sse(oai.error_body(*job.why()))
            else:
                for field, text in splitter.finish():
                    yield _sse(oai.chunk(cid, model_name, oai.delta(field, text)))
                yield _sse(oai.chunk(cid, model_name, {}, last.finish_reason or "stop"))
                if include_usage:
                    yield _sse(oai.chunk(cid, model_name, None, usage_=oai.usage(len(prompt),
                                                                                 last.completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            job.gone.set()  # the client left (this task was cancelled) or the reply is complete: stop either way

    @app.post("/invocations")
    async def invocations(request: Request):
        job = _Job()
        try:
            if not authorized(request):
                raise unauthorized()
            questions, settings = parse_request(parse_json(await read_body(request, limits)), limits)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        texts, cut_short = await run_watched(request, job, engine.answer, questions, Sampling(**settings),
                                             job.should_stop)
        if cut_short:
            return _error(*job.why())
        return {"predictions": texts}

    return app


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": status, "message": message}, status_code=status)


def _openai_error(exc: RequestError) -> JSONResponse:
    return JSONResponse(oai.error_body(exc.status, str(exc)), status_code=exc.status)


def serve(engine: Engine, limits: Limits, *, host: str = "127.0.0.1", port: int = 5001, model_name: str = "",
          api_key: str | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; a generation in flight is stopped so that shutdown is prompt, and
    the engine (a vLLM process) is closed last."""
    import uvicorn

    config = uvicorn.Config(make_app(engine, limits, model_name=model_name, api_key=api_key), host=host, port=port,
                            log_level="info", timeout_graceful_shutdown=15, access_log=False)
    server = uvicorn.Server(config)
    original = server.handle_exit

    def handle_exit(sig, frame) -> None:
        engine.shutting_down.set()  # a running generation ends at its next step
        original(sig, frame)

    server.handle_exit = handle_exit  # uvicorn installs this for SIGINT and SIGTERM
    try:
        server.run()
    finally:
        engine.close()
