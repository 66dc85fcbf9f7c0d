"""KV-cache quantization, KIVI-style: keys per channel, values per token, the newest block in full precision.

`kv-k{b}v{c}[-g{G}]` quantizes what attention caches, per KV head (before the GQA repeat): the keys AFTER
rotary embedding and the values as projected, asymmetric min-max with an integer zero point (_quant).

- Keys: per channel, statistics over blocks of G consecutive tokens (KIVI: key outliers live in channels).
- Values: per token, statistics over groups of min(G, head_dim) channels of one head.
- Residual: a real cache can quantize a key block only once its G tokens exist, so the block holding the
  newest token stays in full precision (KIVI's residual). A query at position t sees blocks that ended
  before its own block quantized, and the keys and values of its own block, positions [G*(t//G), t], exact.

Where: a registered attention function (`AttentionInterface`, named `lcc_kvquant_<base>`) replaces the
model's `sdpa`/`eager` one on the compressed copy only (its own config; the reference is another object).
It builds both versions of the cache, quantized and exact, and for each chunk of QUERY_CHUNK queries
concatenates the quantized keys up to the chunk's end with the exact keys of the chunk's blocks; the
attention mask lets each query see the quantized copy of earlier blocks and the exact copy of its own
block, and the original implementation does the rest. Queries, weights and everything else
are untouched.

Why one full pass is a decode: with use_cache=False every query t attends, in one pass, to exactly the
keys/values a KIVI cache would hold when token t is decoded (its quantized blocks depend only on tokens of
finished blocks, all < t), so position t never depends on later tokens and the harness's one-pass
measurement equals per-length passes and token-by-token decoding with a quantized cache. (KIVI's prefill
attends to the exact prompt; this measures every position as decoded, the long-context regime.)
Equal up to float noise: passes of different lengths compute keys with ~1e-6 differences, and a value
that sits on a rounding boundary can then land one level apart (seen on SmolLM2 at 2 bits: KL ≤ 3e-5).
Cost: an explicit mask prevents the causal kernels' skipping, so attention does about T²/2 + T·QUERY_CHUNK
key-query products where a plain causal pass does T²/2.

A full pass on CPU under `sdpa` without a padding mask (the harness's measurement) takes a cheaper route
(`_prefill_cpu`): per chunk of PREFILL_CHUNK queries, the quantized keys before the chunk are visible to every
query in it, so that part runs unmasked; only the chunk's own 2 × PREFILL_CHUNK keys (quantized and exact) need
the block mask, and the two partial attentions are joined by their log-sum-exp. One layer's output equals the
general route's up to float rounding (≤ 6e-7 relative on SmolLM2); through the model, the quantization grid turns
such differences into an occasional one-level flip in later layers, as passes of different lengths do (SmolLM2,
kv-k4v4, 1024 tokens: window KL 0.019160 against 0.019145, 0.08 %). At SmolLM2's shapes and 8192 tokens one
layer costs 1.24 × a plain causal one instead of 1.59 × (`python bench/kv_attention.py`, 2026-12-06).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._quant import effective_bits, quant_params, quantize_dequantize, resolve_group
from lcc_harness.methods.registry import CompressContext, Method, param, register

DEFAULT_GROUP = 64
ATTR = "lcc_kv_quant"  # attribute set on each attention module of the compressed copy
NAME_PREFIX = "lcc_kvquant_"
SUPPORTED_BASES = ("sdpa", "eager")
# Query rows per attention call (rounded down to whole blocks). Each call sees the quantized keys up to its
# last query and the exact keys of its own blocks, so the masked attention costs about T²/2 + T·rows
# key-query pairs instead of the 2T² of one call over [quantized | exact] for every query.
QUERY_CHUNK = 512
# Query rows per chunk of the CPU prefill route (rounded down to whole blocks); 256 was the fastest of 128…1024
# on SmolLM2 at 8192 tokens (bench/kv_attention.py). LSE_PREFILL=False sends every call the general route.
PREFILL_CHUNK = 256
LSE_PREFILL = True


def quantize_keys(key: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """key (B, H, T, D) → same shape/dtype; each channel quantized over blocks of `group` tokens.

    Tokens of the trailing incomplete block (T % group) are returned unchanged.
    """
    B, H, T, D = key.shape
    n = T // group
    out = key.clone()
    if n == 0:
        return out
    kb = key[:, :, : n * group].reshape(B, H, n, group, D).transpose(-1, -2)  # (B, H, n, D, G)
    s, z = quant_params(kb, bits, sym=False)
    deq = quantize_dequantize(kb, s, z, bits, sym=False)  # (B, H, n, D, G) float32
    out[:, :, : n * group] = deq.transpose(-1, -2).reshape(B, H, n * group, D).to(key.dtype)
    return out


def quantize_values(value: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """value (B, H, T, D) → same shape/dtype; each token quantized over groups of `group` channels (divides D)."""
    B, H, T, D = value.shape
    g = resolve_group(D, group, " (value head dim)")
    vg = value.reshape(B, H, T, D // g, g)  # (B, H, T, D/g, g)
    s, z = quant_params(vg, bits, sym=False)
    return quantize_dequantize(vg, s, z, bits, sym=False).reshape(B, H, T, D).to(value.dtype)


def chunk_masks(
    a: int, b: int, a0: int, group: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query, key) pairs read the quantized / the exact cache, for the queries at positions [a, b).

    Quantized: key block < query block; exact: same block and key ≤ query (both imply causality). Quantized keys [0, b) → (b−a, b), exact keys
    [a0, b) → (b−a, b−a0). Keys at or after b are never visible to these queries (causal); exact keys
    before a0 are not either when a0 is the start of position a's block."""
    qpos = torch.arange(a, b, device=device)
    kq, ke = torch.arange(b, device=device), torch.arange(a0, b, device=device)
    qb = (qpos // group)[:, None]
    quant = (kq // group)[None, :] < qb  # (Tq, b)
    exact = ((ke // group)[None, :] == qb) & (ke[None, :] <= qpos[:, None])  # (Tq, b − a0)
    return quant, exact


def _combine_mask(
    mask: torch.Tensor | None,
    quant: torch.Tensor,
    exact: torch.Tensor,
    qcols: tuple[int, int],
    ecols: tuple[int, int],
    base: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The mask over [quantized keys qcols | exact keys ecols] (…, Tq, len(qcols) + len(ecols)), in the form
    `base` expects; `mask` (…, Tq, ≥ Tk), when given, is the model's own mask over key positions."""
    if mask is None:
        out = torch.cat([quant, exact], dim=-1)[None, None]  # (1, 1, Tq, Tk')
    elif mask.dtype == torch.bool:
        return torch.cat([mask[..., slice(*qcols)] & quant, mask[..., slice(*ecols)] & exact], dim=-1)
    else:  # additive float mask: keep its values where allowed
        lo = torch.finfo(mask.dtype).min
        return torch.cat(
            [
                mask[..., slice(*qcols)].masked_fill(~quant, lo),
                mask[..., slice(*ecols)].masked_fill(~exact, lo),
            ],
            dim=-1,
        )
    if base == "eager":  # eager adds the mask to the scores
        return torch.zeros(out.shape, dtype=dtype, device=out.device).masked_fill(
            ~out, torch.finfo(dtype).min
        )
    return out


def _base_function(base: str, module: nn.Module) -> Callable:
    if base == "eager":  # each modeling file defines its own eager attention
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(
                f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}"
            )
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def _make_attention(base: str) -> Callable:
    """An AttentionInterface function that quantizes the cache as the module's KVQuant says, then runs `base`."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ):
        spec: KVQuant | None = getattr(module, ATTR, None)
        if spec is False:  # a layer the method leaves exact (kv-…-swa / kv-…-full on the other layer type)
            return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        if spec is None:
            raise RuntimeError(
                f"attention '{NAME_PREFIX}{base}' reached {type(module).__name__} without a "
                f"`{ATTR}` attribute; apply the kv method to the whole model"
            )
        fn = _base_function(base, module)
        q_len, kv_len = query.shape[2], key.shape[2]
        G = spec.group
        if kv_len - 1 < G:  # every query is in the first block: nothing quantized is visible yet
            return fn(module, query, key, value, attention_mask, **kwargs)
        kq = quantize_keys(key, spec.key_bits, G)  # (B, Hkv, Tk, D)
        vq = quantize_values(value, spec.value_bits, min(G, value.shape[-1]))  # (B, Hkv, Tk, Dv)
        if _prefill_cpu_applies(base, query, key, attention_mask, kwargs):
            return _prefill_cpu(query, key, value, kq, vq, G, kwargs.get("scaling")), None
        kwargs.pop("is_causal", None)  # the masks below are the causal structure
        rows = max(G, QUERY_CHUNK // G * G)  # query rows per call, whole blocks
        outs, weights = [], None
        for qs in range(0, q_len, rows):
            qe = min(q_len, qs + rows)
            a, b = kv_len - q_len + qs, kv_len - q_len + qe  # absolute positions of these queries
            a0 = a // G * G  # first exact key any of them sees: the start of its own block
            quant, exact = chunk_masks(a, b, a0, G, key.device)
            m = None if attention_mask is None else attention_mask[..., qs:qe, :]
            mask = _combine_mask(m, quant, exact, (0, b), (a0, b), base, query.dtype)
            out, weights = fn(
                module,
                query[:, :, qs:qe],
                torch.cat([kq[:, :, :b], key[:, :, a0:b]], dim=2),
                torch.cat([vq[:, :, :b], value[:, :, a0:b]], dim=2),
                mask,
                **kwargs,
            )
            outs.append(out)  # (B, q, H, D): transformers' attention functions return queries on dim 1
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), (weights if len(outs) == 1 else None)

    return attention


def _prefill_cpu_applies(
    base: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict
) -> bool:
    """Whether a call can take the CPU prefill route: sdpa on CPU, a full pass (as many queries as keys), no
    mask of the model's own (no padding, no sliding window in force), and nothing sdpa would add (dropout,
    position bias, soft-capping)."""
    return (
        LSE_PREFILL
        and base == "sdpa"
        and mask is None
        and query.device.type == "cpu"
        and query.shape[2] == key.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and not kwargs.get("dropout")
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _prefill_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kq: torch.Tensor,
    vq: torch.Tensor,
    group: int,
    scale: float | None,
) -> torch.Tensor:
    """The quantized-cache attention of a full pass, (B, T, Hq, Dv) like sdpa's, from query (B, Hq, T, D), the
    exact and the quantized keys/values (B, Hkv, T, ·).

    Per chunk [a, b) of whole blocks: (1) the quantized keys [0, a), all visible to the chunk, unmasked; (2) the
    quantized and the exact keys [a, b) under the block mask (quantized: an earlier block; exact: the query's own
    block, causal), the same mask for every chunk since a is a block start. CPU flash attention returns each
    part's log-sum-exp, which weighs the two: out = o₂ + σ(lse₁ − lse₂)·(o₁ − o₂)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    B, Hq, T, _ = query.shape
    rep = Hq // key.shape[1]
    kqr, vqr = (x.repeat_interleave(rep, dim=1) if rep > 1 else x for x in (kq, vq))  # (B, Hq, T, ·)
    R = max(group, PREFILL_CHUNK // group * group)
    # (R, 2R): the local mask of any chunk that starts a block
    allowed = torch.cat(chunk_masks(0, R, 0, group, query.device), dim=-1)
    local = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~allowed, -torch.inf
    )
    kbuf = query.new_empty(B, Hq, 2 * R, key.shape[-1])
    vbuf = query.new_empty(B, Hq, 2 * R, value.shape[-1])
    out = torch.empty(B, Hq, T, value.shape[-1], dtype=query.dtype, device=query.device)
    for a in range(0, T, R):
        b = min(T, a + R)
        n = b - a
        kbuf[:, :, :n], vbuf[:, :, :n] = kqr[:, :, a:b], vqr[:, :, a:b]
        kbuf[:, :, n : 2 * n] = key[:, :, a:b].repeat_interleave(rep, dim=1)
        vbuf[:, :, n : 2 * n] = value[:, :, a:b].repeat_interleave(rep, dim=1)
        m = local if n == R else torch.cat([local[:n, :n], local[:n, R : R + n]], dim=-1)
        q = query[:, :, a:b]
        o2, l2 = flash(q, kbuf[:, :, : 2 * n], vbuf[:, :, : 2 * n], attn_mask=m[None, None], scale=scale)
        if a == 0:
            out[:, :, a:b] = o2
            continue
        o1, l1 = flash(q, kqr[:, :, :a], vqr[:, :, :a], scale=scale)
        w = torch.sigmoid(l1.float() - l2.float()).unsqueeze(-1)  # (B, Hq, n, 1)
        out[:, :, a:b] = (o2.float() + w * (o1.float() - o2.float())).to(out.dtype)
    return out.transpose(1, 2).contiguous()


def _register_attention(base: str) -> str:
    """Register `lcc_kvquant_<base>` (attention + the base's mask builder) and return its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = NAME_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(base))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _layer_kind(module: nn.Module, types: list[str]) -> str | None:
    """'sliding_attention' / 'full_attention' of an attention module: its own attribute (Gemma, Mistral-likes),
    else its layer's entry in the config's layer_types."""
    if hasattr(module, "is_sliding"):
        return "sliding_attention" if module.is_sliding else "full_attention"
    idx = getattr(module, "layer_idx", None)
    if idx is not None and 0 <= idx < len(types):
        return types[idx]
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules: classes named *Attention that carry the model's config."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and getattr(m, "config", None) is not None
    ]


@register
@dataclass(frozen=True)
class KVQuant(Method):
    """KIVI-style KV-cache quantization: keys per channel over G-token blocks, values per token."""

    key_bits: int = param(4, 2, 8, "key bits")
    value_bits: int = param(4, 2, 8, "value bits")
    group: int = param(DEFAULT_GROUP, 1, 1 << 16)
    swa: bool = False  # quantize the sliding-window layers' caches only
    full: bool = False  # quantize the full (global) attention layers' caches only

    family = "kv"
    forms = ("kv-k{key_bits}v{value_bits}[-g{group}][-swa][-full]",)
    examples = ("kv-k4v4", "kv-k2v2", "kv-k2v2-g32")  # -swa / -full apply to sliding-window models only
    description = (
        "KV-cache quantization (KIVI): post-RoPE keys per channel over blocks of G tokens, values "
        f"per token over min(G, head_dim) channels, asymmetric, bits 2-8; the newest block stays "
        f"exact (residual); default G={DEFAULT_GROUP}; -swa / -full: only the sliding-window / only the "
        "full-attention layers of a model that has both (Gemma 2/3, …), the others stay exact"
    )

    def layer_selection(self, model: nn.Module, mods: list[tuple[str, nn.Module]]) -> list[bool]:
        """Per attention module, whether this method quantizes its cache (all, or one layer type)."""
        if not (self.swa or self.full):
            return [True] * len(mods)
        if self.swa and self.full:
            raise MethodError(
                f"method '{self.id}': -swa and -full together mean every layer; drop both suffixes"
            )
        types = list(getattr(model.config, "layer_types", None) or [])
        kinds = [_layer_kind(m, types) for _, m in mods]
        want = "sliding_attention" if self.swa else "full_attention"
        if "sliding_attention" not in kinds or "full_attention" not in kinds:
            raise MethodError(
                f"method '{self.id}': {type(model).__name__} does not have both sliding-window and full "
                f"attention layers (its config's layer_types); use kv-k{self.key_bits}v{self.value_bits} "
                "without -swa/-full"
            )
        return [k == want for k in kinds]

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        config = getattr(model, "config", None)
        base = getattr(config, "_attn_implementation", None)
        if base is not None and base.startswith(NAME_PREFIX):
            raise MethodError(
                f"method '{self.id}': the model's KV cache is already quantized; apply one kv method"
            )
        if base not in SUPPORTED_BASES:
            raise MethodError(
                f"method '{self.id}' needs attention implementation {' or '.join(SUPPORTED_BASES)}, "
                f"the model uses '{base}'; load it with attn_implementation='sdpa'"
            )
        mods = attention_modules(model)
        if not mods:
            raise MethodError(
                f"method '{self.id}': {type(model).__name__} has no *Attention modules to quantize"
            )
        head_dim = 0
        chosen = self.layer_selection(model, mods)
        for (name, m), on in zip(mods, chosen, strict=True):
            if not on:
                setattr(m, ATTR, False)
                continue
            hd = getattr(m, "head_dim", None)
            if hd and hd % min(self.group, hd):
                raise MethodError(
                    f"method '{self.id}': value group {self.group} does not divide the head dim "
                    f"{hd} of {name}; use -g{{G}} with G a divisor of {hd} or G >= {hd}"
                )
            head_dim = hd or head_dim
            setattr(m, ATTR, self)
        name = _register_attention(base)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(name)
        else:
            config._attn_implementation = name
        wrong = [n for n, m in mods if m.config._attn_implementation != name]
        if wrong:
            raise MethodError(f"method '{self.id}': could not switch the attention of {wrong[0]} to '{name}'")
        kbits = effective_bits(self.key_bits, self.group, self.group, sym=False)
        vgroup = min(self.group, head_dim) if head_dim else self.group
        vbits = effective_bits(self.value_bits, vgroup, vgroup, sym=False)
        ctx.info.update(
            {
                "kv_key_bits": kbits,
                "kv_value_bits": vbits,
                "kv_bits": (kbits + vbits) / 2,
                "kv_residual_tokens": f"< {self.group} (exact)",
                "kv_layers": f"{sum(chosen)} of {len(chosen)}",
                "attn_implementation": name,
            }
        )
        return model
