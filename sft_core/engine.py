"""What generates for `serve-model`: the model in this process (Hugging Face `generate`), or vLLM behind it.

An engine takes the token ids of a prompt, built here with `sft_core.chat.encode_chat` so that no text of a
message can act as a control token, and streams the reply's text as it is generated; every generation can be
cut short (`should_stop()`: the client left, the time is up, the server stops). `HfEngine` runs one generation
at a time, the model in memory; `sft_core.vllm_engine.VllmEngine` hands the ids to a vLLM server.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_core.chat import build_messages, encode_chat, stop_token_ids
from sft_core.generate import _stop_when, generate_answers

StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class Sampling:
    """How to decode one request: greedy unless `do_sample`."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None


@dataclass
class Piece:
    """Text generated since the last piece; the last piece of a reply says how it ended.

    `finish_reason`: `stop` (the model ended its turn), `length` (the token budget ran out), `cancelled`
    (`should_stop()` said so); `completion_tokens` counts the stop token, as `Generation.new_tokens` does.
    """

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


class IncrementalDecoder:
    """Token ids in, new text out; the pieces add up to `tokenizer.decode(ids, skip_special_tokens=True)`.

    Each step decodes only a window from the last piece's start (what serving engines do: the whole reply
    each step costs O(n²), 1.6 s for 2,048 tokens). Text ending in U+FFFD (a character whose bytes are split
    across tokens) is held back until it completes; ids after the first stop id are ignored.
    """

    def __init__(self, tokenizer: Any, stops: set[int]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.prefix = self.read = 0  # the window starts at `prefix`; ids before `read` are sent

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        for tid in ids:
            if self.stopped:
                break
            self.ids.append(tid)
            self.stopped = tid in self.stops
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.sent += now[len(before):]
        return now[len(before):]

    def flush(self) -> str:
        """The rest of the reply: what the window held back."""
        full = self._decode(self.ids)
        rest = full[len(self.sent):] if full.startswith(self.sent) else ""
        self.sent += rest
        return rest


class Engine:
    """What both engines share: the tokenizer, the system prompt, the stop tokens, prompt building, counters."""

    name = "engine"

    def __init__(self, model_dir: str | Path, *, system_prompt: str, repetition_penalty: float | None = None,
                 generation_config: Any = None) -> None:
        from sft_core.modeling import load_tokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.system_prompt = system_prompt
        if generation_config is None:
            from transformers import GenerationConfig

            try:
                generation_config = GenerationConfig.from_pretrained(model_dir)
            except OSError:  # no generation_config.json: the tokenizer's stop tokens
                generation_config = None
        self.stops = stop_token_ids(self.tokenizer, generation_config)
        self.repetition_penalty = (repetition_penalty if repetition_penalty is not None
                                   else getattr(generation_config, "repetition_penalty", None) or 1.0)
        self.shutting_down = threading.Event()
        self.stats = {"completed": 0, "cancelled": 0}
        self.running = 0
        self.max_model_len: int | None = None  # a context cap of the engine's own, checked before a request runs
        self._count = threading.Lock()

    @property
    def busy(self) -> bool:
        return self.running > 0

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's ids: the chat template's markup as control tokens, every message's content as text;
        without a system message, the one the model was trained with comes first."""
        if not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True)

    def encode_question(self, question: str) -> list[int]:
        return encode_chat(self.tokenizer, build_messages(question, self.system_prompt), add_generation_prompt=True)

    def stream(self, prompt_ids: list[int], sampling: Sampling, should_stop: StopCheck) -> Iterator[Piece]:
        raise NotImplementedError

    def complete(self, prompt_ids: list[int], sampling: Sampling, should_stop: StopCheck) -> Piece:
        """The whole reply as one piece (its text, how it ended, its token count)."""
        text, last = [], Piece("")
        for piece in self.stream(prompt_ids, sampling, should_stop):
            text.append(piece.text)
            last = piece
        return Piece("".join(text), last.finish_reason, last.completion_tokens)

    def answer(self, questions: list[str], sampling: Sampling, should_stop: StopCheck) -> tuple[list[str], bool]:
        """(texts, cut short) for `/invocations`: the questions generated side by side."""
        prompts = [self.encode_question(q) for q in questions]
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            pieces = list(pool.map(lambda ids: self.complete(ids, sampling, should_stop), prompts))
        return [p.text for p in pieces], any(p.finish_reason == "cancelled" for p in pieces)

    def _started(self) -> None:
        with self._count:
            self.running += 1

    def _ended(self, cancelled: bool) -> None:
        with self._count:
            self.running -= 1
            self.stats["cancelled" if cancelled else "completed"] += 1

    def close(self) -> None:
        """Free what the engine holds (a server process); the in-process engine holds nothing to free."""


class _QueueStreamer:
    """A `transformers` streamer that hands each step's new token ids to a queue (the prompt is skipped)."""

    def __init__(self, out: queue.Queue) -> None:
        self.out, self.prompt_seen = out, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.out.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class HfEngine(Engine):
    """The model in this process, generating one request at a time (other requests wait their turn)."""

    name = "hf"

    def __init__(self, model_dir: str | Path, *, system_prompt: str, device: str = "auto", dtype: str = "auto",
                 repetition_penalty: float | None = None) -> None:
        from sft_core.modeling import load_model, resolve_device

        self.device = resolve_device(device)
        model = load_model(model_dir, dtype=dtype, device=self.device)
        super().__init__(model_dir, system_prompt=system_prompt, repetition_penalty=repetition_penalty,
                         generation_config=model.generation_config)
        self.model = model
        self.lock = threading.Lock()

    def _turn(self, should_stop: StopCheck) -> bool:
        """Wait for the model; False when the request was cancelled while it waited."""
        while not self.lock.acquire(timeout=0.1):
            if should_stop() or self.shutting_down.is_set():
                return False
        return True

    def stream(self, prompt_ids: list[int], sampling: Sampling, should_stop: StopCheck) -> Iterator[Piece]:
        """Generate in a thread of its own; its tokens come through a queue as they are made."""
        import torch

        cut = threading.Event()

        def stop() -> bool:
            if self.shutting_down.is_set() or should_stop():
                cut.set()
            return cut.is_set()

        tokens: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                if not self._turn(stop):
                    cut.set()
                    return
                self._started()
                try:
                    ids = torch.tensor([prompt_ids], device=self.device)
                    kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens,
                                              "do_sample": sampling.do_sample}
                    if sampling.do_sample:
                        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
                        if sampling.seed is not None:
                            torch.manual_seed(sampling.seed)
                    if self.repetition_penalty != 1.0:
                        kwargs["repetition_penalty"] = self.repetition_penalty
                    with torch.inference_mode():
                        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            eos_token_id=self.stops, pad_token_id=self.stops[0],
                                            streamer=_QueueStreamer(tokens), stopping_criteria=_stop_when(stop),
                                            **kwargs)
                finally:
                    self.lock.release()
                    self._ended(cut.is_set())
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                result["error"] = exc
            finally:
                tokens.put(None)

        threading.Thread(target=run, name="generate", daemon=True).start()
        decoder = IncrementalDecoder(self.tokenizer, set(self.stops))
        while (ids := tokens.get()) is not None:
            if text := decoder.add(ids):
                yield Piece(text)
        if "error" in result:
            raise result["error"]
        reason = "stop" if decoder.stopped else "cancelled" if cut.is_set() else "length"
        yield Piece(decoder.flush(), reason, len(decoder.ids))

    def answer(self, questions: list[str], sampling: Sampling, should_stop: StopCheck) -> tuple[list[str], bool]:
        """One batch through `generate_answers`, as evaluation generates."""
        cut = threading.Event()

        def stop() -> bool:
            if self.shutting_down.is_set() or should_stop():
                cut.set()
            return cut.is_set()

        if not self._turn(stop):
            return [""] * len(questions), True
        self._started()
        try:
            gens = generate_answers(self.model, self.tokenizer, questions, system_prompt=self.system_prompt,
                                    max_new_tokens=sampling.max_new_tokens, batch_size=len(questions),
                                    do_sample=sampling.do_sample, temperature=sampling.temperature,
                                    top_p=sampling.top_p, repetition_penalty=self.repetition_penalty,
                                    seed=sampling.seed or 0, should_stop=stop)
        finally:
            self.lock.release()
            self._ended(cut.is_set())
        return [g.text for g in gens], cut.is_set()
