"""The OpenAI chat-completions protocol as `serve-model` speaks it: request models, the reasoning split, replies.

Requests are pydantic models, so a body of the wrong shape (`[1, 2]`, `"hello"`, a message without a role) is
refused with a 422 that says what was expected instead of failing inside the server. Fields that OpenAI clients
send and that change nothing here (`user`, `metadata`, a zero penalty) are accepted and ignored, as vLLM does.

A think model's reply is split for the client the way vLLM and DeepSeek do: what the model writes inside its
opening `<think>…</think>` block goes to `reasoning_content`, the answer after it to `content`. One splitter does
it for a whole reply and for a stream, so a streamed reply reassembles to exactly the plain one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sft_core.chat import THINK_CLOSE, THINK_OPEN

API_KEY_ENV = "QWEN_SFT_API_KEY"  # the API key of `serve-model` (also --api-key)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    reasoning_content: str | None = None  # a client may send the earlier reply back whole; the model never sees it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`: what this server reads of OpenAI's request."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # absent or 0: greedy, as evaluation decodes
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: None = Field(default=None, description="the model stops on its own end-of-turn token")
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logprobs: Literal[False] = False
    tools: None = None

    @field_validator("messages")
    @classmethod
    def _has_a_user_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("needs at least one message with role 'user'")
        return messages

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


EXPECTED_CHAT = '{"model": "...", "messages": [{"role": "user", "content": "..."}]}'


def validation_message(exc: ValidationError, expected: str) -> str:
    """One line that names what was wrong and what was expected: `messages.0.role: Input should be 'system', …`."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(x) for x in error["loc"]) or "the body"
        parts.append(f"{where}: {error['msg']}")
    more = f" (and {len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return f"{'; '.join(parts)}{more}; expected {expected}"


class ReasoningSplitter:
    """Splits a think model's text, fed in pieces as it is generated, into reasoning and answer.

    The reasoning is the text of the opening `<think>` block (the reply's first non-blank text), the answer
    what follows `</think>`; without an opening `<think>` the whole reply is answer, and a block never closed
    is all reasoning. Both are stripped of surrounding whitespace, as `sft_core.generate.parse_response`
    strips them, and for a reply with one think block they equal its think and answer. Held back until more
    text decides: whitespace at the end of what came so far, and the start of a tag.
    """

    def __init__(self) -> None:
        self.mode: Literal["start", "reasoning_content", "content"] = "start"
        self.fresh = True  # nothing emitted yet in this field: leading whitespace is dropped
        self.buffer = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """(field, text) pieces ready to send: field is `reasoning_content` or `content`."""
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, str]]:
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while True:
            if self.mode == "start":
                self.buffer = self.buffer.lstrip()
                if not final and (not self.buffer or THINK_OPEN.startswith(self.buffer)):
                    return out  # nothing yet, or maybe the start of <think>
                if self.buffer.startswith(THINK_OPEN):
                    self.buffer, self.mode = self.buffer[len(THINK_OPEN):], "reasoning_content"
                else:
                    self.mode = "content"
                continue
            if self.mode == "reasoning_content":
                close = self.buffer.find(THINK_CLOSE)
                head = self.buffer if close < 0 else self.buffer[:close]
                if THINK_OPEN in head:  # a stray opening tag inside the reasoning is no text (after it, it is)
                    self.buffer = head.replace(THINK_OPEN, "") + self.buffer[len(head):]
                    close = self.buffer.find(THINK_CLOSE)
                if close >= 0:
                    self._emit(out, self.buffer[:close].rstrip())
                    self.buffer, self.mode, self.fresh = self.buffer[close + len(THINK_CLOSE):], "content", True
                    continue
            ready = self.buffer.rstrip() if final else _safe_prefix(self.buffer, self.mode == "reasoning_content")
            self.buffer = "" if final else self.buffer[len(ready):]
            self._emit(out, ready)
            return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if self.fresh:
            text = text.lstrip()
        if text:
            out.append((self.mode, text))
            self.fresh = False


def _safe_prefix(text: str, in_think: bool) -> str:
    """What can be sent now: `text` less trailing whitespace and, inside the think block, a partial tag."""
    ready = text.rstrip()
    if in_think:
        for tag in (THINK_CLOSE, THINK_OPEN):
            for n in range(min(len(tag) - 1, len(ready)), 0, -1):
                if ready.endswith(tag[:n]):
                    ready = ready[:-n].rstrip()
                    break
    return ready


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply: the splitter fed everything at once."""
    fields = {"reasoning_content": "", "content": ""}
    splitter = ReasoningSplitter()
    for field, piece in splitter.feed(text) + splitter.finish():
        fields[field] += piece
    return fields["reasoning_content"], fields["content"]


def reasoning_fields(text: str | None) -> dict[str, str | None]:
    """The reasoning under both names clients read: `reasoning_content` (DeepSeek, vLLM before 0.11) and
    `reasoning` (vLLM now)."""
    return {"reasoning_content": text, "reasoning": text}


def delta(field: str, text: str) -> dict[str, str]:
    """A streamed delta of the answer (`content`) or of the reasoning (under both names)."""
    return {"content": text} if field == "content" else dict(reasoning_fields(text))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """The non-streaming reply."""
    reasoning, answer = split_reasoning(text)
    message = {"role": "assistant", "content": answer, **reasoning_fields(reasoning or None)}
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk` event; with `usage_` the closing one, whose choices are empty."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model}
    if usage_ is not None:
        body.update(choices=[], usage=usage_)
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return body


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error shape: the `openai` client raises it as the matching exception, with this message."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "qwen-sft"}]}
