"""compute_sft_loss: the chunked path equals the ordinary full-logits loss, with less memory."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening, Qwen2Config, Qwen2ForCausalLM

from sft_core.errors import ConfigError
from sft_core.loss import compute_sft_loss

VOCAB = 97
PAD = 0


def _model(tied: bool = True, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).to(dtype)


def _examples(lengths=(9, 14, 6), prompt_lengths=(4, 5, 2), seed: int = 1) -> list[dict[str, list[int]]]:
    """Rows like our tokenizer's: prompt labels -100, the rest supervised."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, p in zip(lengths, prompt_lengths):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def _pad_rows(rows) -> dict[str, torch.Tensor]:
    """Right-padded batch with an attention mask (labels padded with -100)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _flat(rows) -> dict[str, torch.Tensor]:
    return dict(DataCollatorWithFlattening(return_tensors="pt")(rows))


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss, stats = compute_sft_loss(model, batch, **kwargs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), stats, grads


def _assert_grads_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Mean CE, supervised-token count and argmax hits from full logits, written out by hand."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != -100
    loss = F.cross_entropy(shift_logits[keep], shift_labels[keep])
    hits = int((shift_logits[keep].argmax(-1) == shift_labels[keep]).sum())
    return loss, int(keep.sum()), hits


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_chunked_equals_standard_loss_and_grads(tied: bool, layout: str) -> None:
    model = _model(tied=tied)
    batch = (_pad_rows if layout == "padded" else _flat)(_examples())
    ref_loss, ref_stats, ref_grads = _loss_and_grads(model, batch, mode="standard")
    loss, stats, grads = _loss_and_grads(model, batch, mode="chunked", chunk_size=5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert stats == ref_stats
    _assert_grads_close(grads, ref_grads)


def test_standard_mode_matches_hand_written_reference_and_hf_loss() -> None:
    model = _model()
    batch = _pad_rows(_examples())
    loss, stats = compute_sft_loss(model, batch, mode="standard")
    with torch.no_grad():
        out = model(**batch)
    ref_loss, n, hits = _reference(out.logits, batch["labels"])
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=1e-6)  # HF's own loss
    assert stats == {"num_tokens": n, "num_correct": hits}
    assert n == (9 - 4) + (14 - 5) + (6 - 2)


def test_padding_free_gives_the_padded_loss() -> None:
    """Flattened rows (position_ids restart per example) == padded rows: no cross-example leak."""
    model = _model()
    rows = _examples()
    flat = _flat(rows)
    assert flat["input_ids"].shape[0] == 1 and flat["position_ids"][0, 9].item() == 0
    # the collator masks the first label of every packed example, so a global shift is right
    assert flat["labels"][0, 9].item() == -100 and flat["labels"][0, 9 + 14].item() == -100
    for mode in ("chunked", "standard"):
        padded_loss, padded_stats = compute_sft_loss(model, _pad_rows(rows), mode=mode)
        flat_loss, flat_stats = compute_sft_loss(model, flat, mode=mode)
        torch.testing.assert_close(flat_loss, padded_loss, atol=1e-5, rtol=1e-5)
        assert flat_stats == padded_stats
    # why both modes pass use_cache=False: with the cache on, transformers skips the
    # packed-sequence detection and the second example attends to the first
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
        packed = {k: flat[k] for k in ("input_ids", "position_ids")}
        apart = model(**packed, use_cache=False).logits[0, 9:23]
        leaky = model(**packed, use_cache=True).logits[0, 9:23]
    torch.testing.assert_close(apart, alone, atol=1e-5, rtol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3, "transformers now separates packed rows with the cache on"


def test_plain_model_never_runs_the_lm_head_module_on_all_positions() -> None:
    model = _model()
    calls = []
    model.lm_head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    compute_sft_loss(model, _flat(_examples()))
    assert calls == []  # decoder only; the weight is applied chunk by chunk
    compute_sft_loss(model, _flat(_examples()), mode="standard")
    assert calls == [torch.Size([1, 29, 32])]


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_sizes_agree(chunk_size: int) -> None:
    model = _model()
    batch = _flat(_examples())
    ref_loss, ref_stats, ref_grads = _loss_and_grads(model, batch, mode="standard")
    loss, stats, grads = _loss_and_grads(model, batch, chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert stats == ref_stats
    _assert_grads_close(grads, ref_grads)


def test_num_items_in_batch_normalises_the_sum_across_accumulation() -> None:
    """Two micro-batches divided by the window's token count == one batch of both, averaged."""
    model = _model()
    rows = _examples()
    first, second = _pad_rows(rows[:2]), _pad_rows(rows[2:])
    total = compute_sft_loss(model, first)[1]["num_tokens"] + compute_sft_loss(model, second)[1]["num_tokens"]
    for n_items in (total, torch.tensor(total)):
        l1, s1 = compute_sft_loss(model, first, num_items_in_batch=n_items)
        l2, s2 = compute_sft_loss(model, second, num_items_in_batch=n_items)
        whole, _ = compute_sft_loss(model, _pad_rows(rows))
        torch.testing.assert_close(l1 + l2, whole, atol=1e-5, rtol=1e-5)
        mean1, _ = compute_sft_loss(model, first)
        torch.testing.assert_close(l1, mean1 * s1["num_tokens"] / total, atol=1e-6, rtol=1e-5)


def test_token_accuracy_equals_full_logits_argmax() -> None:
    model = _model()
    # train a little so that accuracy is not trivially zero
    batch = _pad_rows(_examples(lengths=(12, 12), prompt_lengths=(2, 3)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(8):
        opt.zero_grad()
        compute_sft_loss(model, batch)[0].backward()
        opt.step()
    _, stats = compute_sft_loss(model, batch, chunk_size=3)
    with torch.no_grad():
        _, n, hits = _reference(model(**batch).logits, batch["labels"])
    assert stats == {"num_tokens": n, "num_correct": hits}
    assert 0 < hits <= n


@pytest.mark.parametrize("mode", ["chunked", "standard"])
def test_fully_masked_batch_gives_zero_loss_that_backpropagates(mode: str) -> None:
    model = _model()
    batch = _pad_rows(_examples())
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, stats = compute_sft_loss(model, batch, mode=mode)
    assert stats == {"num_tokens": 0, "num_correct": 0}
    assert loss.item() == 0.0 and loss.requires_grad
    for n_items in (0, torch.tensor(0)):  # a whole accumulation window without supervised tokens
        assert compute_sft_loss(model, batch, mode=mode, num_items_in_batch=n_items)[0].item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_bf16_model_upcasts_logits_and_tracks_fp32_reference() -> None:
    model = _model(dtype=torch.bfloat16)
    batch = _flat(_examples())
    chunked, stats = compute_sft_loss(model, batch, chunk_size=4)
    standard, ref_stats = compute_sft_loss(model, batch, mode="standard")
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, standard, atol=1e-4, rtol=1e-4)
    assert stats == ref_stats


def test_tiny_model_from_build_tiny_model(tmp_path) -> None:
    """The project's tiny checkpoint (tied embeddings, real tokenizer when present)."""
    from sft_core.config import TinyModelConfig
    from sft_core.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path / "tiny", TinyModelConfig(hidden_size=32, intermediate_size=64))
    model = Qwen2ForCausalLM.from_pretrained(path)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rows = [{**r} for r in _examples()]
    batch = _flat(rows)
    ref_loss, ref_stats, ref_grads = _loss_and_grads(model, batch, mode="standard")
    loss, stats, grads = _loss_and_grads(model, batch, chunk_size=8)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert stats == ref_stats
    _assert_grads_close(grads, ref_grads)


def test_works_through_ddp_wrapper(tmp_path) -> None:
    """The chunked path calls the wrapper's forward: DDP syncs the grads, equal to standard."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    ddp = None
    try:
        batch = _flat(_examples())
        ref_loss, _, ref_grads = _loss_and_grads(_model(), batch, mode="standard")
        ddp = DistributedDataParallel(_model())
        head_inputs = []
        ddp.module.lm_head.register_forward_hook(lambda mod, args, out: head_inputs.append(args[0].shape))
        loss, _, grads = _loss_and_grads(ddp, batch)
        assert head_inputs == [torch.Size([1, 0, 32])]  # via the wrapper's forward, zero positions
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        _assert_grads_close({k.removeprefix("module."): v for k, v in grads.items()}, ref_grads)
    finally:
        # the wrapper's reducer holds the process group: freed after destroy_process_group, gloo's destructor
        # can wait forever on its worker threads (seen once in 2.13), so it goes first
        del ddp
        gc.collect()
        dist.destroy_process_group()


def test_bad_arguments_name_the_setting() -> None:
    model = _model()
    batch = _pad_rows(_examples())
    with pytest.raises(ConfigError, match="mode"):
        compute_sft_loss(model, batch, mode="fused")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="chunk_size"):
        compute_sft_loss(model, batch, chunk_size=0)
    with pytest.raises(ConfigError, match="labels"):
        compute_sft_loss(model, {"input_ids": batch["input_ids"]})


@pytest.mark.parametrize("vocab_major", [True, False], ids=["W@hT", "h@WT"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_matches_autograd(dtype: torch.dtype, bias: bool, vocab_major: bool,
                                                       monkeypatch) -> None:
    """The fused function alone (with or without a bias, both logits layouts, scaled upstream gradient) vs autograd."""
    from sft_core import loss as loss_module
    from sft_core.loss import _ChunkedLinearCrossEntropy

    monkeypatch.setattr(loss_module, "VOCAB_MAJOR_DEVICES", ("cpu",) if vocab_major else ())
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=g).to(dtype).requires_grad_()
    w = torch.randn(VOCAB, 8, generator=g).to(dtype).requires_grad_()
    b = torch.randn(VOCAB, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, VOCAB, (13,), generator=g)
    inputs = (h, w) if b is None else (h, w, b)
    ref = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.37, inputs)
    loss, correct = _ChunkedLinearCrossEntropy.apply(h, w, b, t, 4)  # 13 rows: 3 full chunks and a partial one
    grads = torch.autograd.grad(loss * 0.37, inputs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)
    assert int(correct) == int((F.linear(h, w, b).float().argmax(-1) == t).sum())
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_second_backward_through_chunked_loss_raises() -> None:
    """Gradients are scaled in place in backward: a retained second pass must not double them."""
    model = _model()
    loss, _ = compute_sft_loss(model, _pad_rows(_examples()))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_a_right_padding_mask_is_dropped_and_a_left_padding_one_kept() -> None:
    """Right padding cannot reach a real token of a causal model: the mask goes, the loss stays."""
    from sft_core.loss import _without_redundant_mask

    model = _model()
    rows = _examples()
    right = _pad_rows(rows)
    assert right["attention_mask"].min() == 0, "the fixture must pad"
    assert "attention_mask" not in _without_redundant_mask(dict(right))
    left = {k: torch.flip(v, dims=[1]) for k, v in right.items()}  # left padding (and reversed ids: fine here)
    assert "attention_mask" in _without_redundant_mask(dict(left))
    holes = dict(right, attention_mask=right["attention_mask"].clone())
    holes["attention_mask"][0, 1] = 0
    assert "attention_mask" in _without_redundant_mask(holes)
    flat = _flat(rows)
    assert _without_redundant_mask(dict(flat, attention_mask=torch.ones_like(flat["input_ids"]))).keys() >= {"attention_mask"}

    # the loss of the right-padded batch equals each row's loss on its own, summed
    loss, stats = compute_sft_loss(model, right, num_items_in_batch=1)
    alone = sum(compute_sft_loss(model, _pad_rows([r]), num_items_in_batch=1)[0] for r in rows)
    torch.testing.assert_close(loss, alone, atol=1e-5, rtol=1e-5)
    # and a left-padded batch, whose mask is kept, gives the same loss as unpadded rows
    lp = _left_pad(rows)
    torch.testing.assert_close(compute_sft_loss(model, lp, num_items_in_batch=1)[0], alone, atol=1e-4, rtol=1e-4)


def _left_pad(rows) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n:], labels[i, width - n:], mask[i, width - n:] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        pos[i, width - n:] = torch.arange(n)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}
