"""The llama.cpp engine: GGUF files run through llama.cpp's own kernels (llama-cpp-python's low-level binding,
which mirrors llama.h), logits for every position of one sequence in one pass, streamed one micro-batch at a time.

    reference GGUF (engines.gguf_files.reference_gguf) ─┐   same micro-batch of ids, two contexts in lock-step
    compressed GGUF or KV-cache types (the method)  ────┴─→ measure.compare on (c, V) logits → PositionStats

No (T, V) logits tensor of a whole sequence exists: each context's logits buffer holds one micro-batch
(n_batch × V float32; `binding.micro_batch` bounds n_batch by the vocabulary and the context length), read in
place as a numpy view and compared before the next decode. The reference forward runs again for each method (2 forwards per method per sample): caching it would
mean vocabulary-sized files (0.8 GB per 8192-token SmolLM2 sample), which this harness avoids.

The engine floor (`engine_floor`) is what no compression costs on this engine: the reference against itself with
flash attention off, and with another micro-batch size. Every KV-cache method is measured against a reference on
the same attention path (flash attention on for both, as quantized V caches require), so the floor's flash part
is a kernel-path switch, not quantization; the gate's floor comes from the micro-batch part (what a rerun on
another runner can see, see `LlamaCppHarness.self_noise`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcc_harness import __version__
from lcc_harness.engines import llamacpp_dtype, llamacpp_gpu_layers
from lcc_harness.engines.llamacpp.binding import (
    Context,
    ContextSpec,
    GGUFModel,
    binding,
    micro_batch,
    paired_pass,
    physical_cores,
)
from lcc_harness.engines.llamacpp.gguf_files import (
    REFERENCE_TYPES,
    cache_root,
    check_gguf_file,
    check_same_model,
    file_sha256,
    gguf_identity,
    hf_reference_gguf,
    load_imatrix,
    quantized_gguf,
    reference_gguf,
)
from lcc_harness.errors import CheckpointError, HarnessError, MethodError, ModelNotFoundError
from lcc_harness.measure.kl import (
    PositionStats,
    cat_stats,
    check_finite,
    compare,
    identity_head,
    summarize,
)
from lcc_harness.measure.probe_scores import rows_in_blocks, score_rows, summarize_probes
from lcc_harness.measure.probes import (
    ProbeConfig,
    ProbeReference,
    analyse_reference,
    check_probe_lengths,
    probe_sequences,
)
from lcc_harness.methods.llamacpp import IMATRIX_REQUIRED, LEGACY_FTYPES, LLAMA_FTYPES, engine_only
from lcc_harness.methods.registry import Method, parse_method
from lcc_harness.models.corpus import Sample, TokenizedCorpus, load_corpus
from lcc_harness.options import DESIGNS, parse_lengths

FLOOR_UBATCH = 128  # the other micro-batch size of the engine floor


FLOOR_SAMPLES = 2  # samples the engine floor is measured on (it is a property of the engine, not of the text)


@dataclass
class EngineInfo:
    """What the session and the reports read of the loaded model (the torch harness's LoadedModel fields)."""

    name: str
    source: str
    dtype: torch.dtype
    device_type: str
    max_positions: int
    tokenizer: Any


def resolve_source(spec: str, cache_dir: Path | None = None) -> Path:
    """The file or folder a model spec names for the llama.cpp engine: the embedded model's GGUF, a .gguf path,
    or a transformers folder (written as a GGUF by gguf_files.hf_reference_gguf)."""
    from lcc_harness.models.embedded import EMBEDDED

    if spec in EMBEDDED:
        return EMBEDDED[spec].gguf_path(cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" or (path.is_file() and path.suffix != ""):
        if not path.exists():
            raise ModelNotFoundError(f"GGUF file '{spec}' does not exist; check the path")
        return path
    raise ModelNotFoundError(
        f"model '{spec}' is neither a GGUF file nor a transformers folder here; the llama.cpp engine runs GGUF files "
        f"— pass a .gguf, a local Llama model folder, or an embedded model ({', '.join(EMBEDDED)})"
    )


class LlamaCppHarness:
    """The llama.cpp engine behind the harness's interface (run.Harness's): loads the reference GGUF and the
    corpus once, draws the same kind of samples, and measures methods (GGUF weight types, KV-cache types, and
    compressed GGUF files) against the reference one pass per sample."""

    engine = "llama.cpp"

    def __init__(self, cfg: Any) -> None:
        from lcc_harness.engines.results import validate_lengths

        self.cfg = cfg
        binding()  # one line naming the install command when the binding is missing
        if cfg.design != "window":
            raise HarnessError(
                f"--design {cfg.design}: the llama.cpp engine measures window curves only; pass --design window "
                f"(the matched design and the claims run on the torch engine)"
                if cfg.design in DESIGNS
                else f"design '{cfg.design}' is not one of {', '.join(DESIGNS)}"
            )
        if cfg.anatomy:
            raise HarnessError(
                "--anatomy hooks torch layers; the llama.cpp engine has none — pass --anatomy 0"
            )
        self.lengths = parse_lengths(cfg.lengths)
        dtype = llamacpp_dtype(cfg.dtype)
        self.n_gpu_layers = llamacpp_gpu_layers(cfg.device, cfg.gpu_layers)
        self.dtype_name = dtype
        self.ref_kv = REFERENCE_TYPES[dtype][2]
        self.threads = cfg.threads or physical_cores()
        self.cache = cache_root(cfg.cache_dir)
        if cfg.imatrix:
            load_imatrix(Path(cfg.imatrix))  # a bad file fails now, not at the first method that uses it
        self.source = resolve_source(cfg.model, self.cache)
        t0 = time.perf_counter()
        from lcc_harness.models.embedded import EMBEDDED

        # a GGUF --model is the reference as it is; an embedded model's file holds quantized linears (Q4_1,
        # Q4_K_M), and its torch reference is their dequantized values: written at the run's dtype, so both
        # engines measure the same model
        if self.source.is_dir():  # a transformers folder: its weights written as a GGUF of the run's dtype
            self.ref_path = hf_reference_gguf(self.source, dtype, self.cache)
        elif cfg.model in EMBEDDED:
            self.ref_path = reference_gguf(self.source, dtype, self.cache)
        else:
            self.ref_path = self.source
        self.ref_model = GGUFModel(self.ref_path, self.n_gpu_layers, "reference GGUF")
        self.ref_is_quantized = gguf_identity(self.ref_path, "reference GGUF")["file_type"] not in (
            None,
            0,
            1,
            32,
        )
        self.ref_s = time.perf_counter() - t0
        validate_lengths(self.lengths, self.ref_model.n_ctx_train, cfg.model, cfg.allow_extrapolation)
        self.lm = EngineInfo(
            name=cfg.model,
            source=str(self.source),
            dtype={"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype],
            device_type="cuda" if self.n_gpu_layers > 0 else "cpu",
            max_positions=self.ref_model.n_ctx_train,
            tokenizer=self.ref_model,
        )
        self.n_batch = micro_batch(self.ref_model.n_vocab, self.lengths[-1])
        self.corpus = load_corpus(cfg.corpus, cfg.text_field)
        self.tokens = TokenizedCorpus(self.corpus, self.ref_model)
        self.samples: list[Sample] = self.tokens.draw(cfg.samples, self.lengths[-1], cfg.seed)
        self.target = max(
            1, self.lengths[0] // 2
        )  # the findings' basis key; the claims need the torch engine
        self._ref_ctx: Context | None = None
        self._floor: dict[str, Any] | None = None
        self._digest: str | None = None
        self.head_note = None
        self.probe_cfg = ProbeConfig(tuple(cfg.probes)) if cfg.probes else None
        if self.probe_cfg is not None:
            check_probe_lengths(self.probe_cfg, self.lengths)
        self._probe_ref: ProbeReference | None = None

    # ---- contexts ---------------------------------------------------------------------------------
    def spec(self, **over: Any) -> ContextSpec:
        base = ContextSpec(
            n_ctx=self.lengths[-1],
            type_k=self.ref_kv,
            type_v=self.ref_kv,
            flash=True,
            n_batch=self.n_batch,
            n_ubatch=self.n_batch,
            threads=self.threads,
        )
        return dataclasses.replace(base, **over)

    def ref_context(self) -> Context:
        if self._ref_ctx is None:
            self._ref_ctx = Context(self.ref_model, self.spec())
        return self._ref_ctx

    @property
    def reference_built(self) -> None:
        return None

    # ---- methods ----------------------------------------------------------------------------------
    def _compressed_model(self, m: Method) -> tuple[GGUFModel, dict[str, Any]]:
        """The GGUF a method runs with: the reference's (KV-cache methods) or llama.cpp's quantization of it."""
        spec = m.engine_spec()
        if spec.weight_type is None:
            return self.ref_model, {}
        wt = spec.weight_type
        ftype = LLAMA_FTYPES.get(wt, LEGACY_FTYPES.get(wt))
        if ftype is None:
            raise MethodError(f"method '{m.id}': llama.cpp has no weight type '{wt}'")
        imatrix = Path(self.cfg.imatrix) if self.cfg.imatrix else None
        if imatrix is None and wt in IMATRIX_REQUIRED:
            raise MethodError(
                f"method '{m.id}': llama.cpp makes {wt.upper()} only with an importance matrix; pass --imatrix FILE "
                "(from llama-imatrix)"
            )
        path = quantized_gguf(
            binding(),
            self.ref_path,
            wt.upper(),
            ftype,
            self.cache,
            self.threads,
            imatrix,
            self.ref_is_quantized,
            self._ref_digest(),
        )
        info = {
            "gguf_type": wt.upper(),
            "gguf_bytes": path.stat().st_size,
            "reference_bytes": self.ref_path.stat().st_size,
        }
        if imatrix is not None:
            info["imatrix"] = str(imatrix)
        return GGUFModel(path, self.n_gpu_layers, f"{wt.upper()} GGUF"), info

    def _ref_digest(self) -> str:
        """The reference GGUF's sha256, read once per harness (every quantized method's cache key)."""
        if self._digest is None:
            self._digest = file_sha256(self.ref_path)
        return self._digest

    def run(self, method: Method | str, noise_probe: bool = False) -> Any:
        """Measure a method (a GGUF weight type, a KV-cache type, both, or none) against the reference."""
        m = parse_method(method) if isinstance(method, str) else method
        if "llama.cpp" not in m.engines:
            raise MethodError(engine_only(m.id, "torch"))
        t0 = time.perf_counter()
        model, info = self._compressed_model(m)
        spec = m.engine_spec()
        cspec = self.spec(type_k=spec.type_k or self.ref_kv, type_v=spec.type_v or self.ref_kv)
        if spec.type_k or spec.type_v:
            info["kv_cache"] = {"type_k": cspec.type_k, "type_v": cspec.type_v}
        try:
            return self._measure(m.id, model, cspec, info, time.perf_counter() - t0, noise_probe)
        finally:
            if model is not self.ref_model:
                model.close()

    def run_checkpoint_file(self, path: str | Path, name: str, noise_probe: bool = False) -> Any:
        """Measure a compressed GGUF file (--compressed x.gguf) as method `name`."""
        path = Path(path)
        t0 = time.perf_counter()
        check_gguf_file(path, "compressed GGUF")
        check_same_model(self.ref_path, path)
        model = GGUFModel(path, self.n_gpu_layers, "compressed GGUF")
        if model.n_vocab != self.ref_model.n_vocab:
            model.close()
            raise CheckpointError(
                f"compressed GGUF '{path}' has a vocabulary of {model.n_vocab} tokens but the reference has "
                f"{self.ref_model.n_vocab}; it must be a quantization of the same model"
            )
        try:
            info = {"checkpoint": str(path.resolve()), "gguf_bytes": path.stat().st_size}
            return self._measure(name, model, self.spec(), info, time.perf_counter() - t0, noise_probe)
        finally:
            model.close()

    def _measure(
        self,
        name: str,
        model: GGUFModel,
        cspec: ContextSpec,
        info: dict[str, Any],
        t_compress: float,
        noise: bool,
    ) -> Any:
        from lcc_harness.engines.results import MethodResult

        pr = self.probe_reference() if self.probe_cfg is not None else None
        ref = self.ref_context()
        cmp = Context(model, cspec)
        probes = None
        try:
            t0 = time.perf_counter()
            sts = []
            for i, s in enumerate(self.samples):
                st = paired_pass(
                    ref, cmp, s.ids[: self.lengths[-1]], self.cfg.chunk_size, self.cfg.reverse_kl
                )
                for L in self.lengths:
                    check_finite(name, L, i, st)
                sts.append(st)
            t_measure = time.perf_counter() - t0
            stats = {L: summarize(L, sts) for L in self.lengths}
            if pr is not None:
                t0 = time.perf_counter()
                scores = None
                if (
                    pr.sequences is not None
                ):  # both contexts over each probe sequence, only its scored rows kept
                    scores = [
                        score_rows(
                            rows_in_blocks(lambda q=q: ref.logit_blocks(q.ids), q.rows),
                            rows_in_blocks(lambda q=q: cmp.logit_blocks(q.ids), q.rows),
                            q.targets,
                        )
                        for q in pr.sequences
                    ]
                keep = {L: [(st.kl, st.top1) for st in sts] for L in self.lengths}
                probes = summarize_probes(
                    self.probe_cfg, self.lengths, keep, pr.analyses, pr.sequences, scores
                )
                t_probes = time.perf_counter() - t0
        finally:
            cmp.close()  # before the probe's contexts: at most two contexts of the longest length at a time
        probe = self._length_probe(model, cspec, sts, all_samples=noise)
        info = {**info, "length_probe": probe}
        if noise:
            info["float_noise"] = {"absolute": probe["absolute"], "relative": probe["relative"]}
        return MethodResult(
            method=name,
            model=self.cfg.model,
            lengths=self.lengths,
            stats=stats,
            mode="one-pass",
            timings={
                "reference_s": self.ref_s,
                "reference_cache_hit": False,
                "compression_s": t_compress,
                "measurement_s": t_measure,
                **({"probe_reference_s": pr.seconds, "probe_s": t_probes} if probes is not None else {}),
            },
            info={"method_info": info, **self.metadata()},
            probes=probes,
        )

    def _length_probe(
        self, model: GGUFModel, cspec: ContextSpec, sts: list[PositionStats], all_samples: bool
    ) -> dict[str, Any]:
        """One-pass soundness on this engine: separate passes of both models over the shortest length alone
        (a context of that size) against the one-pass values; 'absolute' = the largest per-sample difference of
        window KL, 'relative' = that ÷ the mean. Raises HarnessError when they differ by more than 1e-6 nats and
        1e-4 relative (the curve would depend on the total length; measured: exactly 0 on CPU)."""
        L0 = self.lengths[0]
        if self.lengths[-1] == L0:  # one length: its pass is the one pass, nothing to compare
            return {"absolute": 0.0, "relative": 0.0, "samples": 0, "length": L0}
        ref = Context(self.ref_model, self.spec(n_ctx=L0))
        cmp = Context(model, dataclasses.replace(cspec, n_ctx=L0))
        try:
            n = len(self.samples) if all_samples else 1
            short = [paired_pass(ref, cmp, s.ids[:L0], self.cfg.chunk_size) for s in self.samples[:n]]
        finally:
            ref.close()
            cmp.close()
        a = summarize(L0, short).per_sample["window_kl"]
        b = summarize(L0, sts[:n]).per_sample["window_kl"]
        absolute = max(abs(x - y) for x, y in zip(a, b, strict=True))
        mean = abs(sum(b) / len(b))
        rel = absolute / mean if mean > 0 else 0.0
        if absolute > 1e-6 and rel > 1e-4:
            raise HarnessError(
                f"llama.cpp's output at length {L0} depends on the total length (window KL {b[0]:.6g} in one pass "
                f"vs {a[0]:.6g} alone); the one-pass design is unsound here — report this with the model and build"
            )
        return {"absolute": absolute, "relative": rel, "samples": n, "length": L0}

    # ---- probes -----------------------------------------------------------------------------------
    def probe_reference(self) -> ProbeReference:
        """The reference's side of the probes (probes.ProbeReference), once per harness: its analysis from a pass of
        the reference context over each sample and short-context passes in a context of W + W/2 positions, and the
        probe sequences (the reference's logits at their rows come from the paired pass of each method)."""
        if self._probe_ref is None:
            cfg = self.probe_cfg
            t0 = time.perf_counter()
            analyses = None
            if cfg.reference_analysis:
                ref = self.ref_context()
                short = Context(self.ref_model, self.spec(n_ctx=cfg.window + cfg.window // 2))

                def short_logits(x: torch.Tensor, k: int) -> torch.Tensor:
                    rows = torch.arange(x.shape[0] - k, x.shape[0])
                    return rows_in_blocks(lambda: short.logit_blocks(x), rows)

                try:
                    analyses = [
                        analyse_reference(
                            s.ids[: self.lengths[-1]],
                            cfg.window,
                            lambda s=s: ref.logit_blocks(s.ids[: self.lengths[-1]]),
                            short_logits,
                        )
                        for s in self.samples
                    ]
                finally:
                    short.close()
            seqs = None
            if cfg.sequence:
                seqs = probe_sequences(self.samples, self.lengths, self.ref_model, cfg, self.cfg.seed)
            self._probe_ref = ProbeReference(analyses, seqs, None, time.perf_counter() - t0)
        return self._probe_ref

    # ---- floors -----------------------------------------------------------------------------------
    def engine_floor(self) -> dict[str, Any]:
        """What no compression costs on this engine, per length (mean window KL over FLOOR_SAMPLES samples, and
        the largest per-sample value): the reference against itself with flash attention off, and with
        micro-batches of FLOOR_UBATCH positions. Computed once per harness."""
        if self._floor is None:
            ref = self.ref_context()
            out: dict[str, Any] = {}
            for key, over in (
                ("flash_off", {"flash": False}),
                (f"ubatch_{FLOOR_UBATCH}", {"n_ubatch": FLOOR_UBATCH}),
            ):
                if over.get("n_ubatch", 0) >= self.n_batch:
                    continue
                other = Context(self.ref_model, self.spec(**over))
                try:
                    sts = [
                        paired_pass(ref, other, s.ids[: self.lengths[-1]], self.cfg.chunk_size)
                        for s in self.samples[:FLOOR_SAMPLES]
                    ]
                finally:
                    other.close()
                out[key] = {
                    str(L): {
                        "window_kl": (st := summarize(L, sts)).window_kl,
                        "max_sample": max(abs(v) for v in st.per_sample["window_kl"]),
                    }
                    for L in self.lengths
                }
            self._floor = out
        return self._floor

    def self_noise(self) -> float:
        """The gate's float-noise input on this engine: the largest per-sample window KL, over lengths and floor
        variants (flash attention off, another micro-batch size), of the reference against itself. The gate's
        floor is at least twice it (gate.floor_from_self_noise), so no tolerance is set below the engine floor."""
        fl = self.engine_floor()
        vals = [v["max_sample"] for per in fl.values() for v in per.values()]
        return max(vals) if vals else 0.0

    def check_reference_intact(self, method_id: str) -> None:
        """Nothing to check: a llama.cpp method never touches the reference's weights (another file or context)."""

    def metadata(self) -> dict[str, Any]:
        ll = binding()
        import transformers

        md: dict[str, Any] = {
            "harness_version": __version__,
            "engine": "llama.cpp",
            "llama_cpp_python": getattr(ll, "__version__", "unknown"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "model_source": str(self.source),
            "reference_gguf": self.ref_path.name,
            "dtype": self.dtype_name,
            "device_type": self.lm.device_type,
            "n_gpu_layers": self.n_gpu_layers,
            "threads": self.threads,
            "micro_batch": self.n_batch,
            "reference_kv_cache": self.ref_kv,
            "flash_attention": True,
            "corpus": self.corpus.name,
            "corpus_sha256": self.corpus.fingerprint,
            "seed": self.cfg.seed,
            "samples": [s.span.to_dict() for s in self.samples],
        }
        if self._floor is not None:
            md["engine_floor"] = self._floor
        return md

    def close(self) -> None:
        if self._ref_ctx is not None:
            self._ref_ctx.close()
            self._ref_ctx = None
        self.ref_model.close()


def torch_agreement(h: LlamaCppHarness, samples: int = FLOOR_SAMPLES) -> dict[str, dict[str, float]]:
    """The two engines against each other on the reference (the torch engine's model, loaded from the same
    source at the same dtype, against llama.cpp's reference GGUF): per length, the mean window KL(P_torch ‖
    P_llama.cpp) and the largest per-position KL over the first `samples` samples. Part of the engine floor: a
    torch number and a llama.cpp number can only be compared beyond it."""
    from lcc_harness.measure.head import final_hidden, output_head
    from lcc_harness.models.load import load_model

    lm = load_model(h.cfg.model, "cpu", h.dtype_name, h.cache)
    head = output_head(lm.model)
    Lmax = h.lengths[-1]
    sts = []
    for s in h.samples[:samples]:
        ids = s.ids[:Lmax]
        hid = final_hidden(lm.model, ids)  # (T, H)
        blocks = []
        for st, z in h.ref_context().logit_blocks(ids):
            e = st + z.shape[0]
            blocks.append(
                compare(head, identity_head, hid[st:e], z, ids[st : min(e + 1, Lmax)], h.cfg.chunk_size)
            )
        sts.append(cat_stats(blocks))
    del lm
    return {
        str(L): {"window_kl": (x := summarize(L, sts)).window_kl, "max_position_kl": x.max} for L in h.lengths
    }
