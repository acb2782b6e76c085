"""sft_core/openai_api.py: the chat request OpenAI clients send (accepted, refused, and what the refusal says), the
reasoning split of a whole and of a streamed reply, and the reply, chunk, usage, error and model-list shapes."""

from __future__ import annotations

import re
import time

import pytest
from pydantic import ValidationError

from sft_core.openai_api import (
    API_KEY_ENV,
    EXPECTED_CHAT,
    ChatRequest,
    ReasoningSplitter,
    chat_completion,
    chunk,
    completion_id,
    delta,
    error_body,
    models_list,
    reasoning_fields,
    split_reasoning,
    usage,
    validation_message,
)

USER = {"role": "user", "content": "孩子发烧39度怎么办？"}
OK = {"model": "m", "messages": [USER]}


def _refusal(body: object) -> str:
    with pytest.raises(ValidationError) as err:
        ChatRequest.model_validate(body)
    return validation_message(err.value, EXPECTED_CHAT)


# --- ChatRequest ---------------------------------------------------------------------------------------------

def test_a_minimal_request_is_greedy_single_and_not_streamed():
    req = ChatRequest.model_validate(OK)
    assert (req.model, req.n, req.stream, req.temperature, req.top_p, req.seed, req.stop) == ("m", 1, False, None,
                                                                                             None, None, None)
    assert req.new_tokens() is None and req.messages[0].text() == USER["content"]


def test_what_openai_clients_send_and_changes_nothing_is_accepted_and_ignored():
    body = {**OK, "user": "u-1", "metadata": {"k": "v"}, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logprobs": False, "tools": None, "stop": None, "n": 1, "store": False, "temperature": 0.7, "top_p": 0.9,
            "seed": 7, "stream": True, "stream_options": {"include_usage": True, "other": 1}}
    req = ChatRequest.model_validate(body)
    assert req.stream and req.stream_options.include_usage and req.seed == 7 and req.temperature == 0.7
    assert not hasattr(req, "user") and not hasattr(req, "metadata")


def test_a_message_may_be_text_parts_and_carry_the_earlier_reasoning():
    req = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "s"}, {"role": "developer", "content": "d"},
        {"role": "user", "content": [{"type": "text", "text": "发烧"}, {"type": "text", "text": "怎么办"}]},
        {"role": "assistant", "content": "答", "reasoning_content": "想", "name": "bot"}]})
    assert [m.text() for m in req.messages] == ["s", "d", "发烧怎么办", "答"]
    assert req.messages[3].reasoning_content == "想"


@pytest.mark.parametrize(("extra", "tokens"), [({}, None), ({"max_tokens": 16}, 16),
                                               ({"max_completion_tokens": 32}, 32),
                                               ({"max_tokens": 16, "max_completion_tokens": 32}, 32)])
def test_new_tokens_is_max_completion_tokens_else_max_tokens(extra, tokens):
    assert ChatRequest.model_validate({**OK, **extra}).new_tokens() == tokens


@pytest.mark.parametrize(("body", "said"), [
    ([1, 2], "the body: Input should be a valid dictionary or instance of ChatRequest"),
    ("hello", "the body: Input should be a valid dictionary or instance of ChatRequest"),
    ({"messages": [USER]}, "model: Field required"),
    ({"model": "m", "messages": []}, "messages: List should have at least 1 item after validation, not 0"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages.0.role: Field required"),
    ({"model": "m", "messages": [{"role": "bot", "content": "x"}]},
     "messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'"),
    ({"model": "m", "messages": [{"role": "system", "content": "x"}]},
     "messages: Value error, needs at least one message with role 'user'"),
    ({**OK, "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({**OK, "temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
    ({**OK, "top_p": 0}, "top_p: Input should be greater than 0"),
    ({**OK, "n": 2}, "n: Input should be 1"),
    ({**OK, "stop": ["\n"]}, "stop: Input should be None"),
    ({**OK, "presence_penalty": 0.5}, "presence_penalty: Input should be 0 or 0.0"),
    ({**OK, "logprobs": True}, "logprobs: Input should be False"),
])
def test_a_bad_body_is_refused_with_what_was_wrong_and_what_was_expected(body, said):
    assert _refusal(body) == f"{said}; expected {EXPECTED_CHAT}"


def test_the_refusal_names_three_problems_and_counts_the_rest():
    message = _refusal({"messages": [USER], "n": 2, "temperature": 3, "stop": ["x"], "presence_penalty": 0.5})
    assert message == ("model: Field required; temperature: Input should be less than or equal to 2; n: Input should "
                       f"be 1 (and 2 more); expected {EXPECTED_CHAT}")


def test_the_api_key_variable_and_the_expected_body_are_the_documented_ones():
    assert API_KEY_ENV == "QWEN_SFT_API_KEY"
    assert ChatRequest.model_validate_json(EXPECTED_CHAT.replace("...", "x")).messages[0].role == "user"


# --- split_reasoning / ReasoningSplitter ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "reasoning", "answer"), [
    ("<think>\n嗯，头痛。\n\n先想病因 </think>\n\n多休息。\n必要时就医。\n", "嗯，头痛。\n\n先想病因", "多休息。\n必要时就医。"),
    ("  \n<think>x</think>y", "x", "y"),
    ("没有思考的回答 ", "", "没有思考的回答"),
    ("<think>\n没有写完的思考  ", "没有写完的思考", ""),
    ("<think>a<think>b</think>c", "ab", "c"),
    ("<think></think>只有回答", "", "只有回答"),
    ("<think>\nt\n</think>\n\n", "t", ""),
    ("a < b </ c", "", "a < b </ c"),
    ("<thi", "", "<thi"),
    ("答 <think>x</think>", "", "答 <think>x</think>"),
    ("", "", ""),
])
def test_split_reasoning_is_the_opening_think_block_and_the_text_after_it(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)


def _streamed(text: str, sizes: list[int]) -> tuple[str, str, list[tuple[str, str]]]:
    splitter, pieces, i, k = ReasoningSplitter(), [], 0, 0
    while i < len(text):
        j = i + sizes[k % len(sizes)]
        pieces += splitter.feed(text[i:j])
        i, k = j, k + 1
    pieces += splitter.finish()
    return ("".join(t for f, t in pieces if f == "reasoning_content"),
            "".join(t for f, t in pieces if f == "content"), pieces)


STREAMED = ["<think>\n嗯，头痛。\n\n先想病因 </think>\n\n多休息。\n必要时就医。\n", "  <think>x</think>y", "没有思考的回答 ",
            "<think>\n没有写完的思考  ", "<think>a<think>b</think>c", "<think></think>只有回答", "a < b </ c", "<thi",
            "<think>a </ b <t c </thin</think> d < e", "<think>a</thin</think>b", "\n\n<think> a\t\n</think>\t b \n c ",
            "<<think>x</think>", "<think>x</think></think>y", "<think>1 < 2 and 3 > 2</think>so 2 < 3"]


@pytest.mark.parametrize("text", STREAMED)
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [7], [8, 5, 1]], ids=["byte-by-byte", "2", "3-1", "7", "8-5-1"])
def test_a_reply_streamed_in_any_pieces_splits_as_the_whole_reply(text, sizes):
    """Pieces cut across `<think>` and `</think>` give what the whole text gives, and never an empty piece."""
    reasoning, answer, pieces = _streamed(text, sizes)
    assert (reasoning, answer) == split_reasoning(text)
    assert all(field in ("reasoning_content", "content") and piece for field, piece in pieces)


def test_the_splitter_sends_reasoning_as_it_comes_and_holds_back_only_what_may_be_a_tag():
    splitter = ReasoningSplitter()
    assert splitter.feed("  <thi") == [], "maybe the start of <think>"
    assert splitter.feed("nk>\n先想") == [("reasoning_content", "先想")]
    assert splitter.feed("病因 </th") == [("reasoning_content", "病因")], "the trailing space and a partial tag wait"
    assert splitter.feed("ink>\n\n多") == [("content", "多")]
    assert splitter.feed("休息 ") == [("content", "休息")]
    assert splitter.feed("吧") == [("content", " 吧")], "the held space was text after all"
    assert splitter.finish() == []


def test_an_untagged_reply_is_content_from_its_first_visible_text():
    splitter = ReasoningSplitter()
    assert splitter.feed("\n ") == [] and splitter.feed("多休息") == [("content", "多休息")]
    assert splitter.feed("。<think>") == [("content", "。<think>")], "after the start a tag is only text"


@pytest.mark.parametrize("text", ["<think>a</think>b<think>c</think>d", "<think></think>t<think>"])
def test_an_opening_tag_after_the_think_block_is_answer_text_whole_or_streamed(text):
    close = text.index("</think>") + len("</think>")
    assert split_reasoning(text) == (text[len("<think>"):close - len("</think>")], text[close:])
    assert _streamed(text, [1])[:2] == split_reasoning(text)


# --- reasoning_fields / delta --------------------------------------------------------------------------------

def test_the_reasoning_goes_under_both_names_clients_read():
    assert reasoning_fields("想") == {"reasoning_content": "想", "reasoning": "想"}
    assert reasoning_fields(None) == {"reasoning_content": None, "reasoning": None}
    assert delta("reasoning_content", "想") == {"reasoning_content": "想", "reasoning": "想"}
    assert delta("content", "答") == {"content": "答"}


# --- replies -------------------------------------------------------------------------------------------------

def test_usage_adds_the_prompt_and_the_completion():
    assert usage(12, 30) == {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}


def test_a_completion_id_is_openai_shaped_and_new_each_time():
    first = completion_id()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", first) and completion_id() != first


def test_a_chat_completion_is_openais_shape_with_the_reasoning_split_out():
    before = int(time.time())
    body = chat_completion("chatcmpl-1", "m", "<think>想一想</think>\n\n多喝水", "stop", 12, 30)
    assert before <= body.pop("created") <= int(time.time())
    assert body == {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
                    "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "多喝水", "reasoning_content": "想一想",
                                             "reasoning": "想一想"}}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}


def test_a_reply_without_reasoning_has_null_reasoning_fields():
    message = chat_completion("c", "m", "多喝水", "length", 1, 2)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "多喝水", "reasoning_content": None, "reasoning": None}


def test_a_chunk_carries_one_delta_and_the_closing_one_only_usage():
    body = chunk("chatcmpl-1", "m", {"content": "多"})
    assert isinstance(body.pop("created"), int)
    assert body == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                    "choices": [{"index": 0, "delta": {"content": "多"}, "logprobs": None, "finish_reason": None}]}
    assert chunk("c", "m", None, "stop")["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                                         "finish_reason": "stop"}]
    closing = chunk("c", "m", None, usage_=usage(1, 2))
    assert closing["choices"] == [] and closing["usage"] == {"prompt_tokens": 1, "completion_tokens": 2,
                                                             "total_tokens": 3}
    assert closing["object"] == "chat.completion.chunk"


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (401, "authentication_error"),
                                              (404, "not_found_error"), (413, "request_too_large"),
                                              (422, "invalid_request_error"), (429, "rate_limit_error"),
                                              (500, "server_error"), (503, "server_error")])
def test_an_error_body_is_openais_with_the_type_its_status_maps_to(status, kind):
    assert error_body(status, "no such model") == {
        "error": {"message": "no such model", "type": kind, "param": None, "code": status}}


def test_the_model_list_names_the_one_model_served():
    assert models_list("qwen-sft-medical", 1700000000) == {
        "object": "list", "data": [{"id": "qwen-sft-medical", "object": "model", "created": 1700000000,
                                    "owned_by": "qwen-sft"}]}
