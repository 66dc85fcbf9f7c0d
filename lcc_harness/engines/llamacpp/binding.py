"""The llama.cpp binding, thin: llama-cpp-python's low-level calls (which mirror llama.h) under GGUFModel and
Context, a context's logits streamed one micro-batch at a time, and paired_pass (reference and compressed contexts
in lock-step, compared with measure.compare)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcc_harness.engines.llamacpp import _log
from lcc_harness.engines.llamacpp._log import last_log_error
from lcc_harness.engines.llamacpp.gguf_files import (
    EngineError,
    check_gguf_file,
)
from lcc_harness.errors import ModelLoadError
from lcc_harness.measure.kl import (
    PositionStats,
    cat_stats,
    compare,
    identity_head,
)
from lcc_harness.methods.llamacpp import KV_TYPES

PIN = "0.3.36"


INSTALL = f"pip install 'lcc-harness[llamacpp]' (llama-cpp-python=={PIN}; builds llama.cpp from source, ~7 min on 2 cores)"


LOGITS_BUDGET = 128 * 2**20  # bytes of one context's logits buffer: n_batch ≤ this ÷ (4 · vocabulary)


MAX_BATCH = 512  # positions per micro-batch (llama.cpp's default n_batch / n_ubatch)


CONTEXT_BUDGET = 2**20  # micro-batch positions × context positions: n_batch ≤ this ÷ n_ctx


MIN_BATCH = 64  # the smallest micro-batch: below it, llama.cpp's CPU results depend on it (micro_batch)


def micro_batch(n_vocab: int, n_ctx: int) -> int:
    """Positions per micro-batch (n_batch = n_ubatch) of a context of n_ctx positions: llama.cpp's default 512,
    fewer where one micro-batch's logits (n_batch × V float32) would pass LOGITS_BUDGET or n_batch × n_ctx would
    pass CONTEXT_BUDGET (a context's compute and output buffers grow with both: at 8192 positions of SmolLM2,
    128 instead of 512 lowers the paired pass's peak RSS from 2278 to 1928 MiB, bench/llamacpp_rss.py); at least
    MIN_BATCH. From 64 positions up the micro-batch changes no number on a CPU (tests/test_engine_llamacpp.py:
    64, 128 and 512 give bit-identical window KL for KV-cache and weight types); at 32 and below llama.cpp's CPU
    kernels take other paths and KL moves (up to 9 % for q8_0 weights on the tiny test model)."""
    return max(MIN_BATCH, min(MAX_BATCH, LOGITS_BUDGET // (4 * n_vocab), CONTEXT_BUDGET // max(1, n_ctx)))


_LL: Any = None


_LOG_CB: Any = None  # the ctypes callback must outlive every llama.cpp call


def binding() -> Any:
    """The llama_cpp module, its backend initialized and its log quiet (errors kept for messages); an EngineError
    naming the install command when it is missing or its shared library does not load."""
    global _LL, _LOG_CB
    if _LL is not None:
        return _LL
    try:
        import llama_cpp as ll
    except ImportError:
        raise EngineError(
            f"--engine llama.cpp needs llama-cpp-python, which is not installed; {INSTALL}"
        ) from None
    except OSError as exc:  # the bundled libllama.so does not load (glibc, CPU features)
        raise EngineError(
            f"llama-cpp-python is installed but its library does not load ({str(exc).splitlines()[0][:160]}); "
            f"rebuild it here: pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python=={PIN}"
        ) from None

    def log(level: int, text: bytes, _user: Any) -> None:
        if level in (3, 4) and text:  # ggml_log_level: WARN 3, ERROR 4
            line = text.decode("utf-8", errors="replace").strip()
            if line:
                _log.record(line)

    _LOG_CB = ll.llama_log_callback(log)
    ll.llama_log_set(_LOG_CB, ctypes.c_void_p())
    ll.llama_backend_init()
    _LL = ll
    return ll


def physical_cores() -> int:
    """Physical CPU cores (llama.cpp's own default for its thread count), from /proc/cpuinfo; else os.cpu_count()."""
    try:
        seen = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                seen.add((phys, core))
        if seen:
            return len(seen)
    except OSError:
        pass
    return os.cpu_count() or 1


class GGUFModel:
    """One GGUF file loaded by llama.cpp (weights mapped once; contexts are made per configuration)."""

    def __init__(self, path: Path, n_gpu_layers: int = 0, what: str = "GGUF") -> None:
        ll = binding()
        check_gguf_file(path, what)
        self.path = Path(path)
        p = ll.llama_model_default_params()
        p.n_gpu_layers = n_gpu_layers
        _log.clear()
        self.ptr = ll.llama_model_load_from_file(str(path).encode(), p)
        if not self.ptr:
            raise ModelLoadError(
                f"llama.cpp could not load {what} '{path}'"
                f"{' (' + last_log_error() + ')' if last_log_error() else ''}; the file is truncated, corrupt or of "
                "an architecture this llama.cpp does not know"
            )
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(self.ptr))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(ll.llama_vocab_bos(self.vocab))
        self.architecture = self.meta("general.architecture") or "unknown"

    def meta(self, key: str) -> str | None:
        ll = binding()
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    # the tokenizer interface TokenizedCorpus uses
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ll = binding()
        data = text.encode("utf-8")
        cap = len(data) + 16
        for _ in range(2):
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special_tokens, False)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise EngineError("llama.cpp could not tokenize the corpus text")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            binding().llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


@dataclass(frozen=True)
class ContextSpec:
    """A llama.cpp context configuration: KV-cache types, flash attention, micro-batch, threads."""

    n_ctx: int
    type_k: str = "f32"
    type_v: str = "f32"
    flash: bool = True
    n_batch: int = MAX_BATCH
    n_ubatch: int = MAX_BATCH
    threads: int = 1

    def describe(self) -> str:
        return (
            f"K {self.type_k}, V {self.type_v}, flash attention {'on' if self.flash else 'off'}, "
            f"micro-batch {self.n_ubatch}"
        )


class Context:
    """A llama.cpp context over a GGUFModel; `logit_blocks` runs one sequence in one pass."""

    def __init__(self, model: GGUFModel, spec: ContextSpec) -> None:
        ll = binding()
        self.model, self.spec = model, spec
        p = ll.llama_context_default_params()
        p.n_ctx = spec.n_ctx
        p.n_batch = spec.n_batch
        p.n_ubatch = spec.n_ubatch
        p.n_seq_max = 1
        p.n_threads = spec.threads
        p.n_threads_batch = spec.threads
        p.type_k = KV_TYPES[spec.type_k]
        p.type_v = KV_TYPES[spec.type_v]
        p.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if spec.flash else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.no_perf = True
        _log.clear()
        self.ptr = ll.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise EngineError(
                f"llama.cpp could not make a context ({spec.describe()}, {spec.n_ctx} positions)"
                f"{': ' + last_log_error() if last_log_error() else ''}; a quantized V cache needs flash attention, "
                "and the context must fit in memory"
            )
        self.batch = ll.llama_batch_init(spec.n_batch, 0, 1)

    def logit_blocks(self, ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, logits (c, V) float32) per micro-batch of ids (T,), positions 0…T−1 of one sequence from an
        empty cache. Each tensor is a view of llama.cpp's buffer: valid until the next block is asked for."""
        ll = binding()
        T = int(ids.shape[0])
        if self.spec.n_ctx < T:
            raise EngineError(f"{T} tokens do not fit a context of {self.spec.n_ctx}")
        ll.llama_memory_clear(ll.llama_get_memory(self.ptr), True)
        V = self.model.n_vocab
        toks = ids.to(torch.int64).tolist()
        b = self.batch
        for s in range(0, T, self.spec.n_batch):
            e = min(T, s + self.spec.n_batch)
            for k, t in enumerate(toks[s:e]):
                b.token[k] = t
                b.pos[k] = s + k
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = 0
                b.logits[k] = 1
            b.n_tokens = e - s
            rc = ll.llama_decode(self.ptr, b)
            if rc != 0:
                raise EngineError(
                    f"llama.cpp failed to decode positions {s}…{e - 1} (code {rc}"
                    f"{': ' + last_log_error() if last_log_error() else ''}); lower the lengths or free memory"
                )
            ptr = ll.llama_get_logits(self.ptr)
            yield s, torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(e - s, V)))

    def close(self) -> None:
        ll = binding()
        if getattr(self, "ptr", None):
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def paired_pass(
    ref: Context, cmp: Context, ids: torch.Tensor, chunk: int, reverse: bool = False
) -> PositionStats:
    """One pass of both contexts over ids (T,), micro-batch by micro-batch in lock-step: per-position KL(P_ref ‖
    P_cmp), top-1, ΔNLL, Δp and, when `reverse`, reverse KL (measure.compare on logits), as one sequence's
    PositionStats."""
    blocks = []
    T = int(ids.shape[0])
    for (s, z_ref), (s2, z_cmp) in zip(ref.logit_blocks(ids), cmp.logit_blocks(ids), strict=True):
        assert s == s2
        e = s + z_ref.shape[0]
        blocks.append(
            compare(identity_head, identity_head, z_ref, z_cmp, ids[s : min(e + 1, T)], chunk, reverse)
        )
    return cat_stats(blocks)
