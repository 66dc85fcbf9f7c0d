"""Stage 2, engines: what runs a model's forward pass. `torch` (engines/torch: transformers models, methods that rewrite
torch weights) and `llama.cpp` (engines/llamacpp: GGUF files through llama.cpp's own kernels, GGUF weight types
and KV-cache types as methods). Both hand the same per-position statistics (measure.PositionStats) to the shared
measure → gate → verdicts → report pipeline; `make_harness` picks one from the run's configuration.
"""

from __future__ import annotations

from typing import Any


def make_harness(cfg: Any) -> Any:
    """The harness of `cfg.engine` (options.engine): torch.harness.Harness or llamacpp.harness.LlamaCppHarness."""
    if cfg.engine == "llama.cpp":
        from lcc_harness.engines.llamacpp.harness import LlamaCppHarness

        return LlamaCppHarness(cfg)
    from lcc_harness.engines.torch.harness import Harness

    return Harness(cfg)


DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def llamacpp_dtype(dtype: str | None) -> str:
    """The llama.cpp engine's dtype name for --dtype (default float32: the reference GGUF at F32)."""
    from lcc_harness.errors import HarnessError

    name = DTYPE_NAMES.get(str(dtype or "float32").strip().lower())
    if name is None:
        raise HarnessError(f"dtype '{dtype}' is not supported; use one of float32, bfloat16, float16")
    return name


def llamacpp_gpu_layers(device: str | None, gpu_layers: int | None) -> int:
    """Layers the llama.cpp engine offloads: --gpu-layers when given (0 with --device cpu), else all (999) when
    the binding has a GPU backend and the device is auto or cuda, else 0. A HarnessError for --device cuda
    without a GPU build."""
    from lcc_harness.errors import HarnessError

    dev = str(device or "auto").strip().lower()
    if dev not in ("auto", "cpu", "cuda"):
        raise HarnessError(
            f"device '{device}' is not supported by the llama.cpp engine; use cpu, cuda or auto"
        )
    if dev == "cpu":
        return 0
    try:
        import llama_cpp

        gpu = bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, OSError):
        gpu = False
    if dev == "cuda" and not gpu:
        raise HarnessError(
            "device 'cuda' was asked for but llama-cpp-python has no GPU backend here; rebuild it with "
            "CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall --no-binary llama-cpp-python "
            "llama-cpp-python==0.3.36, or pass --device cpu"
        )
    if gpu_layers is not None:
        return gpu_layers
    return 999 if gpu else 0


def expected_identity(device: str | None, dtype: str | None, gpu_layers: int | None) -> tuple[str, str]:
    """(dtype, device type) a llama.cpp run will report, from the options alone (for the baseline's file name)."""
    return llamacpp_dtype(dtype), "cuda" if llamacpp_gpu_layers(device, gpu_layers) > 0 else "cpu"
