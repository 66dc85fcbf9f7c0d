"""Peak resident memory of one measurement at one length, in a fresh process (the high-water mark only rises).

    python bench/_rss_probe.py --model smollm2-135m --length 8192 --samples 2 --method rtn-w3-g64

Loads the model, builds the reference at `--length` (with the shorter bench lengths summarized from the same
pass), compresses it (`--strategy in-place`: the loaded model, restored from a host copy afterwards; `copy`: a
deep copy) and measures it; prints one JSON object: the process peak (VmHWM, load
included), the peak of each stage after loading (the mark reset through /proc/self/clear_refs), and the
bytes of the weights held (reference + compressed copy, or model + host snapshot), all in MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size in MiB (0 where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else 0.0


def maxrss_mb() -> float:
    """This process's resident high-water mark in MiB: VmHWM on Linux (ru_maxrss there also counts the
    parent's memory before exec), ru_maxrss elsewhere (KiB on Linux, bytes on macOS)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / MIB if sys.platform == "darwin" else v / 1024


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def weights_mb(*models) -> float:
    """Bytes of the distinct parameter and buffer storages of `models`, in MiB (tied weights count once)."""
    seen: set[int] = set()
    total = 0
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total / MIB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--lengths", default="", help="bench lengths; those ≤ --length are summarized too")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--method", default="rtn-w3-g64")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--strategy",
        choices=("in-place", "copy"),
        default="in-place",
        help="compress the loaded model in place (restored from a host copy) or a deep copy of it",
    )
    p.add_argument("--anatomy", type=int, default=0, help="error-anatomy samples (RunConfig.anatomy)")
    args = p.parse_args(argv)

    import torch

    from lcc_harness.engines.results import RunConfig
    from lcc_harness.engines.torch.harness import Harness
    from lcc_harness.models.load import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, object] = {"length": args.length, "rss_after_import_mb": rss_mb()}
    t0 = time.perf_counter()
    lm = load_model(args.model, "cpu")
    out["rss_after_load_mb"] = rss_mb()
    lengths = sorted(
        {int(x) for x in args.lengths.split(",") if x.strip() and int(x) <= args.length} | {args.length}
    )
    extra = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    h = Harness(
        RunConfig(
            model=args.model,
            lengths=tuple(lengths),
            samples=args.samples,
            device="cpu",
            use_cache=False,
            in_place=args.strategy == "in-place",
            anatomy=args.anatomy,
            **extra,
        ),
        lm=lm,
    )
    out["peak_load_mb"] = maxrss_mb()  # import, model load, corpus tokenization
    can_reset = reset_peak()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        stages[name] = maxrss_mb()
        reset_peak()

    _ = h.reference
    stage("reference")
    if args.anatomy:
        h.anatomy_reference()  # the reference's activations, held while the method is measured
        stage("anatomy reference")
    with h.compressed(args.method) as (model, _ctx, _), h._anatomy_tally():
        stage("compress")
        stats = h.measure_model(model, args.method)
        stage("measure")
        held = weights_mb(lm.model, model)
        del model
    snapshot = h._snapshot.nbytes / MIB if h._snapshot is not None else 0.0
    out.update(
        peak_rss_mb=maxrss_mb() if not can_reset else max([out["peak_load_mb"], *stages.values()]),
        peak_after_load_mb=max(stages.values()) if can_reset else None,
        stage_peak_mb=stages if can_reset else None,
        strategy=args.strategy,
        anatomy=args.anatomy,
        weights_mb=held
        + snapshot,  # on the device: `held`; the snapshot is host memory (the same RAM on CPU)
        snapshot_mb=snapshot,
        reference_weights_mb=weights_mb(lm.model),
        lengths=lengths,
        window_kl={str(L): s.window_kl for L, s in stats.items()},
        seconds=time.perf_counter() - t0,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
