"""Re-quantize a GGUF's decoder-block linear weights to another GGML type with gguf-py: a real compressed file
for `lcc measure --compressed` / `--lcc-compressed` (docs/methods.md, "Measure your own compressed model").

    python bench/requant_gguf.py IN.gguf OUT.gguf --type Q4_0

Metadata (architecture, tokenizer, …) and every other tensor are copied unchanged; each `blk.*.weight` matrix is
dequantized to float32 and quantized to `--type`. The embedded SmolLM2 GGUF holds its block linears as Q4_1:
re-quantizing to Q4_1 gives the same weights, to Q4_0 or Q5_0 another rounding of them.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def requantize(src: str, dst: str, qtype_name: str) -> int:
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[qtype_name]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    changed = 0
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists dims innermost first
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(shape) == 2:
            w = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
            q = quants.quantize(w, qtype)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
            changed += 1
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--type", default="Q4_0", help="GGML type of the block linears (Q4_0, Q5_0, Q5_1, Q8_0, …)"
    )
    a = p.parse_args(argv)
    n = requantize(a.src, a.dst, a.type)
    print(f"{a.dst}: {n} block linear(s) as {a.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
