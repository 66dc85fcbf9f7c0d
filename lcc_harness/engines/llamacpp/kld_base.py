"""llama.cpp's KL-divergence workflow, read: a `llama-perplexity --kl-divergence-base FILE` file as the reference.

File layout (tools/perplexity/perplexity.cpp, written by `perplexity` when --kl-divergence-base is given, read by
`kl_divergence`), little-endian:

    char[8]   "_logits_"
    uint32    n_ctx                     tokens per chunk
    int32     n_vocab
    int32     n_chunk
    int32     tokens[n_chunk · n_ctx]   the evaluation text, chunk after chunk
    then per chunk, for each of its positions j = n_ctx/2 … n_ctx − 2 (n_ctx − 1 − n_ctx/2 rows):
        uint16 row[nv], nv = 2·⌈n_vocab / 2⌉ + 4
        row[0:2] = float32 scale, row[2:4] = float32 min_log_prob, row[4:4+n_vocab] = q[v]
        log p_base(v) = scale · q[v] + min_log_prob   (q = 0 marks log p ≤ max_logit − 16 below the top)

Each chunk is decoded from an empty cache with its first token replaced by BOS when the vocabulary adds one, and
positions n_ctx/2 … n_ctx − 2 are scored against the next token. `measure_kld_base` does the same with the
compressed GGUF through the llama.cpp engine and reproduces llama-perplexity's statistics from the same
arithmetic (p_base below e^-16 left out of the KL sum, as llama.cpp does), plus the curve over positions within a
chunk, which llama-perplexity does not print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcc_harness.errors import HarnessError
from lcc_harness.files import read_head

MAGIC = b"_logits_"


class KldBaseError(HarnessError):
    """A --kld-base file that is not (or not all of) a llama-perplexity KL-divergence base file."""


@dataclass
class KldBase:
    """A parsed base file: header, tokens (n_chunk, n_ctx) and a read-only memory map of the log-prob rows."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # (n_chunk, n_ctx) int32
    rows: np.ndarray  # (n_chunk, n_ctx − 1 − n_ctx // 2, nv) uint16, a memmap

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    def log_probs(self, chunk: int) -> torch.Tensor:
        """(n_scored, n_vocab) float32 base log-probabilities of one chunk, decoded as llama.cpp decodes them."""
        r = np.asarray(self.rows[chunk])  # (n, nv) uint16
        head = r[:, :4].copy().view(np.float32)  # (n, 2): scale, min_log_prob
        q = r[:, 4 : 4 + self.n_vocab].astype(np.float32)
        return torch.from_numpy(head[:, :1] * q + head[:, 1:2])


def read_kld_base(path: str | Path) -> KldBase:
    """Parse a --kld-base file; KldBaseError (one line) for a special, short, truncated or foreign file."""
    p = Path(path)
    size, head = read_head(
        p, 20, "--kld-base", KldBaseError, "pass the file llama-perplexity --kl-divergence-base wrote"
    )
    if len(head) < 20 or head[:8] != MAGIC:
        raise KldBaseError(
            f"--kld-base '{p}' is not a llama-perplexity KL-divergence base file (no '_logits_' header); write one "
            "with llama-perplexity -m base.gguf -f text --kl-divergence-base FILE"
        )
    n_ctx = int.from_bytes(head[8:12], "little")
    n_vocab = int.from_bytes(head[12:16], "little", signed=True)
    n_chunk = int.from_bytes(head[16:20], "little", signed=True)
    if not (4 <= n_ctx <= 1 << 24 and 0 < n_vocab <= 1 << 24 and 0 < n_chunk <= 1 << 24):
        raise KldBaseError(
            f"--kld-base '{p}' has an impossible header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}); "
            "the file is corrupt"
        )
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_rows = n_ctx - 1 - n_ctx // 2
    tok_bytes = 4 * n_ctx * n_chunk
    need = 20 + tok_bytes + 2 * nv * n_rows * n_chunk
    if size != need:
        raise KldBaseError(
            f"--kld-base '{p}' is {size} bytes but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, "
            f"{n_chunk} chunks) needs {need}; the file is truncated or was written by another tool"
        )
    tokens = np.fromfile(p, dtype="<i4", count=n_ctx * n_chunk, offset=20).reshape(n_chunk, n_ctx)
    if tokens.min() < 0 or tokens.max() >= n_vocab:
        raise KldBaseError(
            f"--kld-base '{p}' holds token ids outside its vocabulary of {n_vocab}; the file is corrupt"
        )
    rows = np.memmap(p, dtype="<u2", mode="r", offset=20 + tok_bytes, shape=(n_chunk, n_rows, nv))
    return KldBase(p, n_ctx, n_vocab, n_chunk, tokens, rows)


def chunk_stats(
    lp_base: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per scored position of one chunk, llama-perplexity's arithmetic: lp_base (n, V) decoded base log-probs,
    logits (n, V) of the compressed model, targets (n,) next tokens → kld, p_diff, same_top, nll, nll_base."""
    lp = torch.log_softmax(logits.double(), dim=-1)  # (n, V)
    keep = lp_base > -16.0  # llama.cpp leaves out base probabilities below e^-16
    lpb = lp_base.double()
    kld = torch.where(keep, lpb.exp() * (lpb - lp), torch.zeros((), dtype=torch.float64)).sum(-1)
    idx = targets.view(-1, 1).long()
    nll = -lp.gather(1, idx).squeeze(1)
    nll_base = -lpb.gather(1, idx).squeeze(1)
    return {
        "kld": kld,
        "p_diff": torch.exp(-nll) - torch.exp(-nll_base),
        "same_top": logits.argmax(-1) == lp_base.argmax(-1),
        "nll": nll,
        "nll_base": nll_base,
    }


def measure_kld_base(
    base: KldBase, compressed: Path, n_gpu_layers: int = 0, threads: int = 0
) -> dict[str, Any]:
    """The compressed GGUF measured against a base file through the llama.cpp engine, with llama-perplexity's
    defaults (f16 KV cache, flash attention, micro-batches of 512): its statistics over every chunk, and the mean
    KL per position within a chunk (the curve)."""
    from lcc_harness.engines.llamacpp.binding import (
        MAX_BATCH,
        Context,
        ContextSpec,
        GGUFModel,
        physical_cores,
    )
    from lcc_harness.engines.llamacpp.gguf_files import check_gguf_file
    from lcc_harness.measure.kl import statistics_block

    check_gguf_file(compressed, "compressed GGUF")
    model = GGUFModel(compressed, n_gpu_layers, "compressed GGUF")
    try:
        if model.n_vocab != base.n_vocab:
            raise KldBaseError(
                f"--kld-base '{base.path}' has a vocabulary of {base.n_vocab} tokens but '{compressed}' has "
                f"{model.n_vocab}; the base file must come from the same model"
            )
        nb = min(base.n_ctx, MAX_BATCH)
        spec = ContextSpec(base.n_ctx, "f16", "f16", True, nb, nb, threads or physical_cores())
        ctx = Context(model, spec)
        acc: dict[str, list[torch.Tensor]] = {k: [] for k in ("kld", "p_diff", "same_top", "nll", "nll_base")}
        first = base.first
        try:
            for c in range(base.n_chunk):
                ids = torch.from_numpy(base.tokens[c].astype(np.int64))
                if model.add_bos:
                    ids = ids.clone()
                    ids[0] = model.bos
                lp_base = base.log_probs(c)  # (n, V)
                n = lp_base.shape[0]
                parts = []
                for s, z in ctx.logit_blocks(ids):
                    lo, hi = max(s, first), min(s + z.shape[0], first + n)
                    if hi > lo:
                        parts.append(z[lo - s : hi - s].clone())
                logits = torch.cat(parts)  # (n, V): positions first … n_ctx − 2
                targets = torch.from_numpy(base.tokens[c, first + 1 : first + 1 + n].astype(np.int64))
                st = chunk_stats(lp_base, logits, targets)
                for k, v in st.items():
                    acc[k].append(v)
        finally:
            ctx.close()
    finally:
        model.close()
    kld = torch.stack(acc["kld"])  # (n_chunk, n)
    block = statistics_block(
        kld.reshape(-1),
        torch.stack(acc["same_top"]).reshape(-1),
        torch.stack(acc["p_diff"]).reshape(-1),
        (torch.stack(acc["nll"]) - torch.stack(acc["nll_base"])).reshape(-1),
    )
    nll, nll_b = torch.stack(acc["nll"]).reshape(-1), torch.stack(acc["nll_base"]).reshape(-1)
    block["ppl"] = math.exp(float(nll.mean()))
    block["ppl_base"] = math.exp(float(nll_b.mean()))
    per_pos = kld.mean(0)  # (n,): mean over chunks at each position first … n_ctx − 2
    return {
        "base": str(base.path),
        "compressed": str(compressed),
        "n_ctx": base.n_ctx,
        "n_chunk": base.n_chunk,
        "scored_per_chunk": int(kld.shape[1]),
        "stats": block,
        "position_curve": {str(first + i): float(v) for i, v in enumerate(per_pos.tolist())},
    }


def engine_chunk_kld(
    tokens: np.ndarray, reference: Path, compressed: Path, kv: str = "f16", threads: int = 0, chunk: int = 256
) -> dict[str, Any]:
    """llama-perplexity's KLD design with the harness's own reference: each chunk of `tokens` (n_chunk, n_ctx)
    run through the reference and the compressed GGUF in lock-step (llama.cpp engine, flash attention, KV cache
    `kv`), KL(P_ref ‖ P_cmp) from both float32 logits (measure.compare), scored at positions n_ctx/2 … n_ctx − 2.
    Differs from llama-perplexity only in how the reference is kept (it stores 16-bit log-probabilities and leaves
    out those below e^-16). Returns the statistics block and the mean KLD."""
    from lcc_harness.engines.llamacpp.binding import (
        MAX_BATCH,
        Context,
        ContextSpec,
        GGUFModel,
        paired_pass,
        physical_cores,
    )
    from lcc_harness.measure.kl import statistics_block

    n_chunk, n_ctx = tokens.shape
    ref_m, cmp_m = GGUFModel(reference, 0, "reference GGUF"), GGUFModel(compressed, 0, "compressed GGUF")
    nb = min(n_ctx, MAX_BATCH)
    spec = ContextSpec(n_ctx, kv, kv, True, nb, nb, threads or physical_cores())
    ref, cmp = Context(ref_m, spec), Context(cmp_m, spec)
    first = n_ctx // 2
    kl, top1, dp, dnll = [], [], [], []
    try:
        for c in range(n_chunk):
            ids = torch.from_numpy(tokens[c].astype(np.int64))
            if ref_m.add_bos:
                ids[0] = ref_m.bos
            st = paired_pass(ref, cmp, ids, chunk)
            kl.append(st.kl[first : n_ctx - 1])
            top1.append(st.top1[first : n_ctx - 1])
            dp.append(st.dp[first : n_ctx - 1])
            dnll.append(st.dnll[first : n_ctx - 1])
    finally:
        ref.close(), cmp.close(), ref_m.close(), cmp_m.close()
    block = statistics_block(torch.cat(kl), torch.cat(top1), torch.cat(dp), torch.cat(dnll))
    return {"stats": block, "mean_kld": block["kld"]["mean"], "positions": int(sum(x.numel() for x in kl))}
