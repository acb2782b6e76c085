"""The chat format, defined once: control tokens, the assistant turn, the prompt, the stop tokens.

Each row becomes ``[system, user=question, assistant="<think>\\n{think}\\n</think>\\n\\n{answer}"]``,
rendered by the tokenizer's own chat template. The Qwen2.5 base model ends a text on
``<|endoftext|>``; the fine-tune is trained to end its turn on ``<|im_end|>``.
"""

from __future__ import annotations

import re
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHAT_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # what a Qwen2.5 chat needs; the tiny BPE has exactly these
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IGNORE_INDEX = -100  # label of a position the loss skips (Hugging Face convention)


def format_assistant(think: str, answer: str) -> str:
    """The assistant turn the model is trained to produce."""
    return f"{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n\n{answer}"


def build_messages(question: str, system_prompt: str, think: str | None = None, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    if think is not None and answer is not None:
        messages.append({"role": "assistant", "content": format_assistant(think, answer)})
    return messages


def render_prompt(tokenizer: Any, question: str, system_prompt: str) -> str:
    """The generation prompt as text: system + user + ``<|im_start|>assistant\\n``."""
    return tokenizer.apply_chat_template(build_messages(question, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def render_example(tokenizer: Any, row: dict, system_prompt: str) -> tuple[str, str]:
    """(prompt text, completion text); the completion ends on the end-of-turn token."""
    prompt = render_prompt(tokenizer, row["question"], system_prompt)
    full = tokenizer.apply_chat_template(
        build_messages(row["question"], system_prompt, row["think"], row["answer"]), tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    completion = full[len(prompt):]
    end = completion.rfind(IM_END)
    if end < 0:
        raise ValueError(f"the chat template does not end the assistant turn with {IM_END}")
    return prompt, completion[: end + len(IM_END)]


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a special token the tokenizer really has (not its unknown-token fallback; a tokenizer whose
    unknown token *is* that token, as `Qwen2Tokenizer`'s default `<|endoftext|>`, has it)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid >= 0 and (tid != tokenizer.unk_token_id or token == tokenizer.unk_token):
        return tid
    return None


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The ids generation stops on, in order: the generation config's `eos_token_id` (int or list),
    then `<|im_end|>` (where the fine-tune ends) and `<|endoftext|>` (where the base ends); the
    tokenizer's eos when it has neither."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    ids += [t for t in (token_id(tokenizer, IM_END), token_id(tokenizer, ENDOFTEXT)) if t is not None and t not in ids]
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


_SLOT = "\ue000{}\ue001"  # private-use characters: where a message's content goes in the rendered template


def control_tokens(tokenizer: Any) -> list[str]:
    """Every token the tokenizer adds to its vocabulary (special or not): `<|im_end|>`, `<|vision_start|>`,
    `<tool_call>`, ...; text that spells one of them could be read as that token."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=lambda t: (-len(t), t))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """The ids of `text` as text: no control token can come out of it.

    Special tokens are split as text (`split_special_tokens=True`); added tokens that are not
    special (Qwen's `<tool_call>`, `<|fim_prefix|>`) would still match, so each occurrence is
    encoded in two halves that match nothing.
    """
    def plain(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"] if piece else []

    found = [t for t in control_tokens(tokenizer) if t in text]
    if not found:
        return plain(text)
    ids: list[int] = []
    pos = 0
    for match in re.finditer("|".join(map(re.escape, found)), text):
        token = match.group(0)
        half = max(1, len(token) // 2)
        ids += plain(text[pos:match.start()]) + plain(token[:half]) + plain(token[half:])
        pos = match.end()
    return ids + plain(text[pos:])


def encode_chat(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
    """The token ids of a chat, with every message's content encoded as plain text.

    The chat template's own markup (`<|im_start|>`, `<|im_end|>`, roles) is parsed as control
    tokens; the content of a message never is (`encode_text`): a question that spells
    `<|im_end|>` or opens a "system" turn stays text, so it cannot end its turn or start another.
    For content without such strings the ids equal those of tokenizing the rendered text.
    """
    slots = [_SLOT.format(i) for i in range(len(messages))]
    rendered = tokenizer.apply_chat_template([{**m, "content": slot} for m, slot in zip(messages, slots)],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    rest = rendered
    for message, slot in zip(messages, slots):
        markup, found, rest = rest.partition(slot)
        if not found:
            raise ValueError("the tokenizer's chat template does not place each message's content once")
        ids += tokenizer(markup, add_special_tokens=False)["input_ids"]
        ids += encode_text(tokenizer, message["content"])
    return ids + tokenizer(rest, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: Any, question: str, system_prompt: str) -> list[int]:
    """The generation prompt's ids (system + user + `<|im_start|>assistant\\n`), the question inert."""
    return encode_chat(tokenizer, build_messages(question, system_prompt), add_generation_prompt=True)


def encode_example(tokenizer: Any, row: dict, system_prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a training row; the completion ends on the end-of-turn token."""
    prompt = encode_prompt(tokenizer, row["question"], system_prompt)
    full = encode_chat(tokenizer, build_messages(row["question"], system_prompt, row["think"], row["answer"]))
    if full[: len(prompt)] != prompt:
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    completion = full[len(prompt):]
    end = token_id(tokenizer, IM_END)
    if end is None or end not in completion:
        raise ValueError(f"the chat template does not end the assistant turn with {IM_END}")
    cut = len(completion) - completion[::-1].index(end)
    return prompt, completion[:cut]
