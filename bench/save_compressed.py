"""Save a model compressed by one of the harness's methods as a Hugging Face folder (safetensors + tokenizer):
a checkpoint to measure with `lcc measure --compressed` (docs/methods.md, "Measure your own compressed model").

    python bench/save_compressed.py --model smollm2-135m --method magnitude-s50 OUT_DIR
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", required=True)
    p.add_argument("out")
    a = p.parse_args(argv)

    from lcc_harness.engines.results import RunConfig
    from lcc_harness.engines.torch.harness import Harness

    h = Harness(RunConfig(model=a.model, lengths=(256,), samples=1, device="cpu", use_cache=False))
    model, ctx, seconds = h.compress(a.method)  # a deep copy: the harness's own model stays as loaded
    # a model loaded from GGUF carries transformers' "gguf" quantizer, which refuses to save; its weights are plain
    # dequantized tensors by now, so the checkpoint is saved as an ordinary float model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(a.out)
    h.lm.tokenizer.save_pretrained(a.out)
    print(f"{a.out}: {a.model} compressed with {a.method} in {seconds:.1f}s; {ctx.info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
