"""`lcc` console script: list methods, measure one method's KL curve."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from lcc_harness.errors import HarnessError, WriteError
from lcc_harness.models.load import DEFAULT_MODEL
from lcc_harness.options import DEFAULT_CHUNK, OPTIONS, add_cli_options, run_fields

if TYPE_CHECKING:  # for annotations only: _cmd_measure imports run.py when it runs
    from lcc_harness.engines.results import MethodResult
    from lcc_harness.engines.torch.harness import Harness


def _cmd_methods(args: argparse.Namespace) -> int:
    from lcc_harness.methods.registry import families, unavailable

    rows = []
    for fam, cls in sorted(families().items()):
        rows.append(
            [fam, " | ".join(cls.forms), ", ".join(cls.engines), ", ".join(cls.examples), cls.description]
        )
    for fam, cls in sorted(unavailable().items()):
        lib = cls.library
        why = f"UNAVAILABLE: {lib.missing()}; install: {lib.install}"
        rows.append(
            [
                fam,
                " | ".join(cls.forms),
                ", ".join(cls.engines),
                ", ".join(cls.examples),
                f"{why}. {cls.description}",
            ]
        )
    headers = ["family", "id forms", "engines", "examples", "description"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(
        "\nllama.cpp methods compose with '+': a GGUF weight type and a KV-cache type, e.g. gguf-q4_k_m+kv-q8_0"
    )
    return 0


def format_curve_table(stats: dict, fmt: str = "github") -> str:
    """lengths × (window KL, cumulative KL, p99, top-1, ΔNLL, top-1's SE, and reverse KL when it was computed)
    as a table, then lengths × Δp statistics (report.DP_COLUMNS) when the stats carry them."""
    from lcc_harness.report import DP_COLUMNS, fmt_dp, fmt_kl

    reverse = any(s.reverse_kl is not None for s in stats.values())
    rows = [
        [
            L,
            f"{s.window_kl:.5f}",
            f"{s.cumulative_kl:.5f}",
            f"{s.p99:.4f}",
            f"{s.top1:.4f}",
            f"{s.dnll:+.5f}",
            f"{s.top1_se:.4f}" if s.top1_se is not None else fmt_kl(None),
        ]
        + ([f"{s.reverse_kl:.5f}" if s.reverse_kl is not None else fmt_kl(None)] if reverse else [])
        for L, s in sorted(stats.items())
    ]
    headers = ["length", "window KL", "cumulative KL", "p99 KL", "top-1", "ΔNLL", "top-1 SE"]
    headers += ["reverse KL"] if reverse else []
    main = tabulate(
        rows, headers=headers, tablefmt=fmt, disable_numparse=True, colalign=("right",) * len(headers)
    )
    dp_rows = [
        [L] + [fmt_dp(k, getattr(s, k)) for k, _ in DP_COLUMNS]
        for L, s in sorted(stats.items())
        if s.dp_mean is not None
    ]
    if not dp_rows:
        return main
    dp = tabulate(
        dp_rows,
        headers=["length"] + [f"Δp {h}" if not h.endswith("Δp") else h for _, h in DP_COLUMNS],
        tablefmt=fmt,
        disable_numparse=True,
        colalign=("right",) * (len(DP_COLUMNS) + 1),
    )
    return f"{main}\n\nΔp = p_cmp − p_ref of the actual next token, over the window (informational):\n{dp}"


def format_matched(matched, fmt: str = "github") -> str:
    """The matched-target curves of a MethodResult (run.MatchedCurves): lengths × (KL, top-1, ΔNLL, reverse KL
    when it was computed, per-sample KL), then the growth line."""
    reverse = any(s.reverse_kl is not None for s in matched.stats.values())
    rows = [
        [L, f"{s.window_kl:.5f}", f"{s.top1:.4f}", f"{s.dnll:+.5f}"]
        + ([f"{s.reverse_kl:.5f}" if s.reverse_kl is not None else "—"] if reverse else [])
        + [" ".join(f"{v:.4g}" for v in s.per_sample["window_kl"])]
        for L, s in sorted(matched.stats.items())
    ]
    headers = ["length", "KL", "top-1", "ΔNLL"] + (["reverse KL"] if reverse else []) + ["KL per sample"]
    table = tabulate(
        rows, headers=headers, tablefmt=fmt, disable_numparse=True, colalign=("right",) * len(headers)
    )
    g = matched.growth or {}
    if g.get("slope") is None:
        line = f"log-log slope: n/a ({g.get('na') or 'not measured'})"
    else:
        ci = g.get("ci") or [None, None]
        ci_text = f", 90 % CI [{ci[0]:+.3f}, {ci[1]:+.3f}]" if None not in ci else ""
        line = f"log-log slope b {g['slope']:+.3f}{ci_text} (KL ∝ L^b, ×{g['per_doubling']:.3g} per doubling)"
    head = f"matched target: the last {matched.target_tokens} tokens of each sample, scored at every length"
    return f"{head}\n{table}\n{line}"


def _cmd_measure(args: argparse.Namespace) -> int:
    from lcc_harness.engines.results import RunConfig
    from lcc_harness.files import write_json
    from lcc_harness.options import parse_lengths

    values = {o.key: getattr(args, o.dest) for o in OPTIONS if o.where != "pytest"}
    cfg = RunConfig(
        **{**run_fields(values), "lengths": parse_lengths(args.lcc_lengths)},
        use_cache=not args.no_cache,
        progress=not args.quiet,
    )
    if args.kld_base is not None:
        return _cmd_kld(args, cfg)
    from lcc_harness.methods.registry import parse_method

    # every id checked before anything loads: a bad one fails at once
    # as --lcc-methods: empty entries (a trailing comma) skipped, a method given twice measured once
    parsed = (parse_method(t) for t in (args.method or "").split(",") if t.strip())
    methods = list({m.id: m for m in parsed}.values())
    if args.method is not None and not methods:
        raise HarnessError(
            f"--method '{args.method}' names no method; pass ids like rtn-w4-g64,kv-q8_0 (see `lcc methods`)"
        )
    if args.name is not None and not args.compressed:
        raise HarnessError("--name names a --compressed checkpoint; a method's name is its id")
    if args.quiet:  # transformers' own "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from lcc_harness.engines import make_harness

    harness = make_harness(cfg)
    results, failed = [], []
    for m in methods or [None]:
        try:
            result = harness.run(m) if m is not None else _run_compressed(harness, args)
        except HarnessError as exc:
            if len(methods) < 2:
                raise
            print(f"lcc: error: {' '.join(str(exc).split())}", file=sys.stderr)  # the others still run
            failed.append(m.id)
            continue
        _print_result(cfg, result)
        results.append(result)
    if cfg.engine == "llama.cpp" and results:
        print(format_engine_floor(harness.engine_floor()))
    if args.json and results:
        obj = results[0].to_dict() if len(results) == 1 else {"methods": [r.to_dict() for r in results]}
        if cfg.engine == "llama.cpp":
            for r in [obj] if len(results) == 1 else obj["methods"]:
                r["engine_floor"] = harness.engine_floor()
        try:
            write_json(args.json, obj)
        except WriteError:  # the disk refused: the message names the file and the fix
            raise
        except OSError as exc:
            raise HarnessError(
                f"cannot write --json file '{args.json}' ({exc.strerror or exc}); pass a writable path"
            ) from exc
        print(f"wrote {args.json}")
    errors = [msg for r in results for msg in r.errors.values()]
    for msg in errors:  # lengths that ran out of memory: the others are in the tables above
        print(f"lcc: error: {msg}", file=sys.stderr)
    return 2 if errors or failed else 0


def format_engine_floor(floor: dict) -> str:
    """The llama.cpp engine floor (LlamaCppHarness.engine_floor) as a table: lengths × variants, window KL."""
    from lcc_harness.report import engine_floor_table

    table = engine_floor_table(floor)
    return (
        "engine floor: the reference against itself with one setting changed (window KL, nats; no compression)\n"
        + table
    )


def _print_result(cfg, result: MethodResult) -> None:
    """One method's curves, statistics block, notes and timings, as `lcc measure` prints them."""
    from lcc_harness.report import stats_block_tables

    t = result.timings
    engine = f", engine {cfg.engine}" if cfg.engine != "torch" else ""
    print(
        f"model {cfg.model} ({result.info['dtype']}, {result.info['device_type']}{engine}), method {result.method}, "
        f"{cfg.samples} sample(s), {result.mode}; KL(P_ref || P_cmp) in nats"
    )
    if result.stats:
        print(format_curve_table(result.stats))
        block = stats_block_tables([(result.method, L, s.stats) for L, s in sorted(result.stats.items())])
        if block:
            print()
            print(block)
    if result.matched is not None:
        print(format_matched(result.matched))
    if result.probes is not None:
        from lcc_harness.report import probe_tables

        print()
        print(probe_tables([(result.method, result.probes)], fmt="simple"))
        for note in result.probes.get("notes", []):
            print(f"note: probes: {note}")
    if result.anatomy is not None:
        from lcc_harness.measure.anatomy import format_tables

        print(format_tables(result.anatomy.to_dict()))
    for note in [*result.info.get("notes", []), result.info.get("length_dependent")]:
        if note:
            print(f"note: {note}")
    from lcc_harness.report import super_weight_warning

    warn = super_weight_warning(result.method, {"method_info": result.info.get("method_info")})
    if warn:
        print(f"warning: {warn.replace('`', '')}")
    print(
        f"timings: reference {t['reference_s']:.1f}s{' (cache hit)' if t['reference_cache_hit'] else ''}, "
        f"compression {t['compression_s']:.1f}s, measurement {t['measurement_s']:.1f}s"
        + (f", matched measurement {t['matched_measurement_s']:.1f}s" if "matched_measurement_s" in t else "")
        + (
            f", anatomy reference {t['anatomy_reference_s']:.1f}s (extra forwards {t['anatomy_extra_s']:.1f}s)"
            if "anatomy_reference_s" in t
            else ""
        )
        + (
            f", probes reference {t['probe_reference_s']:.1f}s (once), probes {t['probe_s']:.1f}s"
            if "probe_s" in t
            else ""
        )
    )
    print()


def _run_compressed(harness: Harness, args: argparse.Namespace) -> MethodResult:
    """The --compressed checkpoint measured as the method, named by --name or its file name."""
    from pathlib import Path

    from lcc_harness.engines.torch.checkpoint import check_name, measure_checkpoint

    name = check_name(args.name or Path(args.compressed).name, "--name")
    return measure_checkpoint(harness, args.compressed, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcc", description="Long-context KL of compressed LLMs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list registered compression methods").set_defaults(func=_cmd_methods)
    m = sub.add_parser("measure", help="measure one method's KL curve against the uncompressed model")
    what = m.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--method",
        help="method id(s), comma-separated, e.g. rtn-w3-g64 or kv-q8_0,gguf-q4_k_m (see `lcc methods`)",
    )
    what.add_argument(
        "--compressed",
        metavar="PATH",
        help="measure this compressed checkpoint (.gguf or HF folder) of --model instead of a method; it must "
        "have the reference's tokenizer and architecture",
    )
    m.add_argument(
        "--name",
        default=None,
        help="the --compressed checkpoint's name in the results (default: its file name)",
    )
    add_cli_options(
        m,
        {
            "model": DEFAULT_MODEL,
            "lengths": "256,512,1024,2048",
            "samples": 2,
            "text-field": "text",
            "device": "auto",
            "seed": 0,
            "calib-samples": 8,
            "calib-length": 512,
            "chunk-size": DEFAULT_CHUNK,
        },
    )
    m.add_argument(
        "--kld-base",
        metavar="FILE",
        default=None,
        help="llama.cpp engine: a llama-perplexity --kl-divergence-base file as the reference (its tokens and "
        "log-probabilities); measure the --compressed GGUF against it",
    )
    m.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    m.add_argument("--json", default=None, help="write the full result as JSON to this file")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    m.set_defaults(func=_cmd_measure)
    g = sub.add_parser(
        "merge",
        help="join the run records of CI shards (pytest --lcc-shard I/N) into one report and baseline update",
    )
    g.add_argument(
        "records", nargs="+", metavar="RECORD", help="each shard's lcc-record.json (or its report folder)"
    )
    g.add_argument("--report-dir", default="reports", help="where the merged report goes (default: reports)")
    g.add_argument("--baseline-dir", default="baselines", help="the baselines to compare with or update")
    g.add_argument(
        "--update-baselines",
        action="store_true",
        help="write the shards' entries and the claims' verdicts to the baseline file (atomically, once)",
    )
    g.set_defaults(func=_cmd_merge)
    return p


def _cmd_merge(args: argparse.Namespace) -> int:
    from lcc_harness.report import terminal_summary
    from lcc_harness.session.merge import merge

    rec, status = merge(args.records, args.report_dir, args.baseline_dir, update=args.update_baselines)
    print(terminal_summary(rec.public()))
    for line in rec.baseline_changes:
        print(f"baseline: {line}")
    print(f"report: {args.report_dir}")
    return status


def _cmd_kld(args: argparse.Namespace, cfg: Any) -> int:
    """`lcc measure --kld-base FILE --compressed x.gguf`: print llama-perplexity's statistics and the per-position
    curve (in position buckets); --json writes the full result."""
    from lcc_harness.engines import llamacpp_gpu_layers
    from lcc_harness.engines.llamacpp.binding import binding
    from lcc_harness.engines.llamacpp.kld_base import measure_kld_base, read_kld_base
    from lcc_harness.files import write_json
    from lcc_harness.report import stats_block_tables

    if not args.compressed:
        raise HarnessError("--kld-base needs --compressed x.gguf: the model measured against the base file")
    base = read_kld_base(args.kld_base)
    binding()
    out = measure_kld_base(
        base, Path(args.compressed), llamacpp_gpu_layers(cfg.device, cfg.gpu_layers), cfg.threads
    )
    print(
        f"--kld-base {base.path.name}: {base.n_chunk} chunk(s) of {base.n_ctx}, positions {base.first}…{base.n_ctx - 2} "
        f"scored; compressed {Path(args.compressed).name} through llama.cpp"
    )
    print(stats_block_tables([(Path(args.compressed).name, base.n_ctx, out["stats"])]))
    print(f"PPL(Q) {out['stats']['ppl']:.6f}, PPL(base) {out['stats']['ppl_base']:.6f}")
    curve = out["position_curve"]
    pos = sorted(int(k) for k in curve)
    step = max(1, -(-len(pos) // 8))  # eight buckets of consecutive positions
    rows = []
    for k in range(0, len(pos), step):
        part = pos[k : k + step]
        vals = [curve[str(p)] for p in part]
        rows.append([f"{part[0]}…{part[-1]}", f"{sum(vals) / len(vals):.6f}"])
    from tabulate import tabulate

    print("mean KLD by position within a chunk (mean over chunks):")
    print(tabulate(rows, headers=["positions", "mean KLD"], tablefmt="github", disable_numparse=True))
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lcc: %(message)s")
    # torchao (an adapter library, also imported by transformers when installed) logs every CUDA-only extension
    # it skips on a CPU machine
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except HarnessError as exc:
        if args.debug:
            raise
        print(f"lcc: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
