"""A tiny Llama written as a GGUF file by the `gguf` package's own writer, as llama.cpp's converter lays it out.

Tests need a GGUF without a download: this one has SmolLM2's shape of tokenizer (a byte-level BPE whose
first tokens are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, marked CONTROL) and a ChatML template.
The weights come from a Hugging Face `LlamaForCausalLM` (returned too), with the query and key rows
permuted as llama.cpp stores them, so a correct reader gives back that model.
"""

from __future__ import annotations

import json
from pathlib import Path

# SmolLM2-135M-Instruct's template (ChatML with a default system turn)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _permute(w, n_head: int):
    """llama.cpp's row order for q/k (`convert_hf_to_gguf.LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, seed: int = 0, arch: str = "llama", qtype: str | None = None,
                    end_token: str = "<|im_end|>", vocab_size: int = 1024, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 128):
    """Write the GGUF; return the Hugging Face model it holds. `qtype` quantizes the matrices ("Q8_0"...);
    `end_token` renames `<|im_end|>` (a tokenizer without it); `arch` writes another architecture's name."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_core.tiny_model import build_bpe_tokenizer

    tok = json.loads(build_bpe_tokenizer(vocab_size).backend_tokenizer.to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    tokens = [end_token if t == "<|im_end|>" else t for t, _ in vocab]
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}

    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=ids["<|im_start|>"], eos_token_id=ids[end_token])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1.0, so that a weight lost on the way shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|im_start|>"])
    w.add_eos_token_id(ids[end_token])
    w.add_unk_token_id(ids["<|endoftext|>"])
    w.add_pad_token_id(ids[end_token])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML.replace("<|im_end|>", end_token))

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    qt = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None

    def put(name: str, array, quantize: bool = True) -> None:
        if qt is not None and quantize and array.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(array, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, array)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
