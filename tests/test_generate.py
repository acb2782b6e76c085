"""Parsing, ROUGE-L, metrics and batched generation on a tiny random Qwen2."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from sft_core.config import TinyModelConfig
from sft_core.generate import (
    _skinny_lm_head,
    _to_generation,
    Generation,
    generate_answers,
    generation_metrics,
    lcs_length,
    parse_response,
    rouge_l_chars,
)
from sft_core.chat import stop_token_ids
from sft_core.stats import wilson
from sft_core.tiny_model import build_tiny_model

SYSTEM = "你是一个医学专家,你需要根据用户的问题,给出带有思考的回答。"
QUESTIONS = [
    "糖尿病人应该选择什么样的碳水化合物？",
    "头痛",
    "医生,我最近总是失眠,晚上睡不着,白天又很困,请问这是什么原因,应该怎么调理比较好呢?",
    "高血压患者可以喝咖啡吗？",
    "感冒发烧三天了,需要去医院吗?",
]


# ---------------------------------------------------------------- parsing


def test_parse_well_formed():
    p = parse_response("<think>\n先分析症状\n</think>\n\n多喝水，注意休息。")
    assert (p.think, p.answer, p.format_ok) == ("先分析症状", "多喝水，注意休息。", True)


def test_parse_leading_whitespace_is_fine():
    p = parse_response("  \n<think>想</think>答")
    assert (p.think, p.answer, p.format_ok) == ("想", "答", True)


def test_parse_missing_open_tag():
    p = parse_response("先分析症状\n</think>\n\n多喝水")
    assert (p.think, p.answer, p.format_ok) == ("先分析症状", "多喝水", False)


def test_parse_unclosed_think_is_all_think():
    p = parse_response("<think>\n一直在想，没有结束")
    assert (p.think, p.answer, p.format_ok) == ("一直在想，没有结束", "", False)


def test_parse_no_tags_has_no_answer():
    """A completion that never closes a think block has answered nothing: no answer to score (the old rule
    took all of it as the answer, so ROUGE-L rewarded a base model's untagged text)."""
    p = parse_response("直接回答")
    assert (p.think, p.answer, p.format_ok) == ("", "", False)


def test_rouge_l_scores_only_the_text_after_the_closing_think_tag(tiny):
    """The reference answer spelled inside an unclosed think block scores 0; after `</think>`, it scores 1."""
    model, tok = tiny
    ref = "多喝水，注意休息。"
    unclosed = _to_generation(tok, "q", tok.encode(f"<think>{ref}", add_special_tokens=False), set(), ref)
    untagged = _to_generation(tok, "q", tok.encode(ref, add_special_tokens=False), set(), ref)
    closed = _to_generation(tok, "q", tok.encode(f"<think>想</think>{ref}", add_special_tokens=False), set(), ref)
    assert unclosed.rouge_l == 0.0 and untagged.rouge_l == 0.0, "the old rule gave these 1.0"
    assert not unclosed.format_ok and not untagged.format_ok
    assert closed.rouge_l == 1.0 and closed.format_ok


def test_parse_nested_and_repeated_tags():
    nested = parse_response("<think>外<think>内</think>还在想</think>答案")
    assert (nested.think, nested.answer, nested.format_ok) == ("外内还在想", "答案", False)
    repeated = parse_response("<think>一</think>中间<think>二</think>最终答案")
    assert (repeated.think, repeated.answer, repeated.format_ok) == ("一中间二", "最终答案", False)


def test_parse_text_before_open_tag_is_not_format_ok():
    assert parse_response("前言<think>想</think>答").format_ok is False


@pytest.mark.parametrize("answer", ["", "  \n\t "])
def test_parse_empty_or_blank_answer_is_not_format_ok(answer):
    p = parse_response(f"<think>想</think>{answer}")
    assert (p.think, p.answer, p.format_ok) == ("想", "", False)


def test_parse_cuts_after_im_end():
    p = parse_response("<think>想</think>答案<|im_end|>\n<|im_start|>user\n<think>x</think>别的")
    assert (p.think, p.answer, p.format_ok) == ("想", "答案", True)
    assert parse_response("<think>想</think>答<|endoftext|>垃圾").answer == "答"


# ---------------------------------------------------------------- ROUGE-L


def _lcs_dp(a: str, b: str) -> int:
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_matches_textbook_dp():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("甲乙丙丁ab") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("甲乙丙丁ab") for _ in range(rng.randint(0, 70)))
        assert lcs_length(a, b) == _lcs_dp(a, b), (a, b)


def test_rouge_l_chinese_known_value():
    # LCS("今天天气很好", "今天天气不错") = 4 -> P = R = 4/6 -> F1 = 2/3
    assert rouge_l_chars("今天天气很好", "今天天气不错") == pytest.approx(2 / 3)
    # P = 2/2, R = 2/4 -> F1 = 2*1*0.5/1.5
    assert rouge_l_chars("头痛", "头部疼痛") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_rouge_l_identical_disjoint_whitespace():
    assert rouge_l_chars("多喝水", "多喝水") == 1.0
    assert rouge_l_chars("多喝水", "少吃盐") == 0.0
    assert rouge_l_chars("多 喝\n水", " 多喝 水\t") == 1.0
    assert rouge_l_chars("", "多喝水") == 0.0
    assert rouge_l_chars("  ", "") == 1.0


def test_rouge_l_long_inputs_are_fast_and_capped():
    rng = random.Random(1)
    a = "".join(rng.choice("心肝脾肺肾") for _ in range(10_000))
    assert 0.0 < rouge_l_chars(a, a[::-1]) < 1.0
    assert rouge_l_chars(a[:4000] + "x" * 100, a[:4000]) == 1.0  # past the cap is ignored


# ---------------------------------------------------------------- metrics


def _gen(format_ok=True, stopped=True, think="想想", answer="答案", new_tokens=10, ref=None, rouge=None):
    return Generation("q", "t", think, answer, format_ok, stopped, new_tokens, ref, rouge)


def test_generation_metrics_values():
    gens = [
        _gen(new_tokens=10, ref="答案", rouge=1.0),
        _gen(format_ok=False, stopped=False, think="", answer="长一点的答案", new_tokens=30, ref="x", rouge=0.5),
        _gen(new_tokens=20),  # no reference: not in the ROUGE-L mean
    ]
    m = generation_metrics(gens)
    two_of_three = wilson(2, 3)
    assert m == {
        "score": pytest.approx(0.99 * 2 / 3 + 0.01 * 0.75),  # usable answers (formed and stopped); ROUGE breaks ties
        "format_ok_rate": pytest.approx(2 / 3),
        "format_ok_rate_lo": pytest.approx(two_of_three.lo), "format_ok_rate_hi": pytest.approx(two_of_three.hi),
        "stop_rate": pytest.approx(2 / 3),
        "stop_rate_lo": pytest.approx(two_of_three.lo), "stop_rate_hi": pytest.approx(two_of_three.hi),
        "usable_rate": pytest.approx(2 / 3),
        "usable_rate_lo": pytest.approx(two_of_three.lo), "usable_rate_hi": pytest.approx(two_of_three.hi),
        "rouge_l": pytest.approx(0.75), "rouge_l_lo": pytest.approx(0.5), "rouge_l_hi": pytest.approx(1.0),
        "mean_think_chars": pytest.approx(4 / 3),
        "mean_answer_chars": pytest.approx(10 / 3),
        "mean_new_tokens": pytest.approx(20.0),
        "num_samples": 3.0,
    }


def test_generation_metrics_without_references_has_nan_rouge():
    assert math.isnan(generation_metrics([_gen()])["rouge_l"])


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a 2nd thread, and on a shared 2-core box OpenMP
    threads that wait on each other made these tests 3x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), TinyModelConfig())


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def _with_stop_bias(tiny, bias: float):
    """A copy of the tiny model whose lm_head adds `bias` to every stop token's logit."""
    model, tok = tiny
    model = copy.deepcopy(model)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[stop_token_ids(tok, model.generation_config)] = bias
    model.lm_head = head
    return model, tok


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    new = 12
    batched = generate_answers(model, tok, QUESTIONS, system_prompt=SYSTEM, max_new_tokens=new, batch_size=3)
    assert [g.question for g in batched] == QUESTIONS
    stops = stop_token_ids(tok, model.generation_config)
    for q, g in zip(QUESTIONS, batched):
        prompt = tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
        )
        ids = tok([prompt], return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new, eos_token_id=stops, pad_token_id=stops[0], do_sample=False)
        single = out[0, ids.shape[1] :].tolist()
        end = next((i for i, t in enumerate(single) if t in stops), None)
        kept = single if end is None else single[:end]
        # fp32 + sdpa: left padding gave bit-identical greedy tokens here; if a future kernel
        # flips a near-tie argmax, compare a prefix instead of the whole completion.
        assert g.text == tok.decode(kept, skip_special_tokens=True), q
        assert g.new_tokens == (len(single) if end is None else end + 1)
        assert g.stopped == (end is not None)


def test_skinny_output_projection_matches_and_is_put_back(tiny):
    """The CPU-only (W @ hᵀ)ᵀ head gives the logits of F.linear and is removed afterwards, even on errors."""
    model, tok = tiny
    head = model.get_output_embeddings()
    hidden = torch.randn(3, 2, model.config.hidden_size)
    with torch.inference_mode():
        plain = head(hidden)
        with _skinny_lm_head(model):
            assert "forward" in vars(head)
            skinny = head(hidden)
        assert "forward" not in vars(head)
        with pytest.raises(RuntimeError), _skinny_lm_head(model):
            raise RuntimeError("boom")
    assert "forward" not in vars(head)
    assert skinny.shape == plain.shape
    torch.testing.assert_close(skinny, plain, rtol=1e-5, atol=1e-5)
    generate_answers(model, tok, QUESTIONS[:2], system_prompt=SYSTEM, max_new_tokens=2)
    assert "forward" not in vars(head)


def test_batch_size_does_not_change_greedy_output(tiny):
    model, tok = tiny
    one = generate_answers(model, tok, QUESTIONS, system_prompt=SYSTEM, max_new_tokens=8, batch_size=1)
    calls = []
    many = generate_answers(
        model, tok, QUESTIONS, system_prompt=SYSTEM, max_new_tokens=8, batch_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert [g.text for g in one] == [g.text for g in many]
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_restores_padding_side_and_train_mode(tiny):
    model, tok = tiny
    tok.padding_side = "right"
    model.train()
    generate_answers(model, tok, QUESTIONS[:2], system_prompt=SYSTEM, max_new_tokens=2)
    assert tok.padding_side == "right" and model.training
    model.eval()


def test_forced_stop_stops_at_once(tiny):
    model, tok = _with_stop_bias(tiny, +1e4)
    gens = generate_answers(model, tok, QUESTIONS, system_prompt=SYSTEM, max_new_tokens=10, batch_size=2)
    assert all(g.stopped and g.new_tokens == 1 and g.text == "" for g in gens)
    m = generation_metrics(gens)
    assert m["stop_rate"] == 1.0 and m["mean_new_tokens"] == 1.0 and m["format_ok_rate"] == 0.0


def test_never_stopping_runs_to_max_new_tokens(tiny):
    model, tok = _with_stop_bias(tiny, -1e4)
    refs = ["多喝水"] * len(QUESTIONS)
    gens = generate_answers(
        model, tok, QUESTIONS, system_prompt=SYSTEM, max_new_tokens=6, batch_size=4, references=refs
    )
    assert all(not g.stopped and g.new_tokens == 6 for g in gens)
    assert all(g.reference_answer == "多喝水" and 0.0 <= g.rouge_l <= 1.0 for g in gens)
    m = generation_metrics(gens)
    assert m["stop_rate"] == 0.0 and m["mean_new_tokens"] == 6.0 and m["num_samples"] == 5.0


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny):
    model, tok = tiny
    kw = dict(system_prompt=SYSTEM, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate_answers(model, tok, QUESTIONS[:3], seed=7, **kw)
    after = torch.rand(1)
    b = generate_answers(model, tok, QUESTIONS[:3], seed=7, **kw)
    c = generate_answers(model, tok, QUESTIONS[:3], seed=8, **kw)
    assert torch.equal(before, after)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]


def test_no_questions_no_generations(tiny):
    model, tok = tiny
    assert generate_answers(model, tok, [], system_prompt=SYSTEM, max_new_tokens=4) == []


def test_references_must_match_questions(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="references has 1 items but questions has 2"):
        generate_answers(model, tok, QUESTIONS[:2], system_prompt=SYSTEM, max_new_tokens=2, references=["x"])


def test_auto_means_one_budget_the_run_resolves_and_keeps_with_the_model(tmp_path):
    """`auto` is resolved once, by the run, from the validation responses; `predict` and `serve-model` read that
    budget back from the model folder (`max_new_tokens` in generation_config.json, which HF and vLLM also default
    to); a number is a number; a model this project did not train falls back to `data.max_length`."""
    from sft_core.generate import model_budget, resolve_max_new_tokens, store_budget

    budget = resolve_max_new_tokens("auto", {"p95": 300, "p99": 420}, max_length=2048).max_new_tokens
    assert budget == 528  # 420 * 1.25 = 525, rounded up to a multiple of 16
    (tmp_path / "generation_config.json").write_text('{"repetition_penalty": 1.15}', encoding="utf-8")
    assert model_budget("auto", tmp_path, 2048) == 2048, "not trained here: the trained length"
    store_budget(tmp_path, budget)
    assert model_budget("auto", tmp_path, 2048) == 528
    assert model_budget(64, tmp_path, 2048) == 64
    import json

    kept = json.loads((tmp_path / "generation_config.json").read_text(encoding="utf-8"))
    assert kept == {"max_new_tokens": 528, "repetition_penalty": 1.15}, "the model's other defaults are kept"
