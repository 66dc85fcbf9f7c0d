"""`lcc` console script: list methods, measure one method's KL curve."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tabulate import tabulate

from .errors import HarnessError
from .models import DEFAULT_MODEL
from .options import DEFAULT_CHUNK, OPTIONS, add_cli_options, run_fields


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods.registry import families

    rows = []
    for fam, cls in sorted(families().items()):
        rows.append([fam, " | ".join(cls.forms), ", ".join(cls.examples), cls.description])
    print(tabulate(rows, headers=["family", "id forms", "examples", "description"], tablefmt="github"))
    return 0


def format_curve_table(stats: dict, fmt: str = "github") -> str:
    """lengths × (window KL, cumulative KL, p99, top-1, ΔNLL) as a table."""
    rows = [[L, s.window_kl, s.cumulative_kl, s.p99, s.top1, s.dnll] for L, s in sorted(stats.items())]
    return tabulate(
        rows,
        headers=["length", "window KL", "cumulative KL", "p99 KL", "top-1", "ΔNLL"],
        tablefmt=fmt,
        floatfmt=("d", ".5f", ".5f", ".4f", ".4f", "+.5f"),
    )


def _cmd_measure(args: argparse.Namespace) -> int:
    from .run import Harness, RunConfig, parse_lengths, write_json_atomic

    values = {o.key: getattr(args, o.dest) for o in OPTIONS if o.where != "pytest"}
    cfg = RunConfig(
        **{**run_fields(values), "lengths": parse_lengths(args.lcc_lengths)},
        use_cache=not args.no_cache,
        progress=not args.quiet,
    )
    from .methods.registry import parse_method

    method = parse_method(args.method)  # fail on a bad id before loading anything
    if args.quiet:  # transformers' own "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    harness = Harness(cfg)
    result = harness.run(method)
    t = result.timings
    print(
        f"model {cfg.model} ({result.info['dtype']}, {result.info['device_type']}), method {result.method}, "
        f"{cfg.samples} sample(s), {result.mode}; KL(P_ref || P_cmp) in nats"
    )
    print(format_curve_table(result.stats))
    for note in [*result.info.get("notes", []), result.info.get("length_dependent")]:
        if note:
            print(f"note: {note}")
    from .report import super_weight_warning

    warn = super_weight_warning(result.method, {"method_info": result.info.get("method_info")})
    if warn:
        print(f"warning: {warn.replace('`', '')}")
    print(
        f"timings: reference {t['reference_s']:.1f}s{' (cache hit)' if t['reference_cache_hit'] else ''}, "
        f"compression {t['compression_s']:.1f}s, measurement {t['measurement_s']:.1f}s"
    )
    if args.json:
        try:
            write_json_atomic(args.json, result.to_dict())
        except OSError as exc:
            raise HarnessError(
                f"cannot write --json file '{args.json}' ({exc.strerror or exc}); pass a writable path"
            ) from exc
        print(f"wrote {args.json}")
    if result.errors:  # lengths that ran out of memory: the others are in the table above
        for msg in result.errors.values():
            print(f"lcc: error: {msg}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcc", description="Long-context KL of compressed LLMs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list registered compression methods").set_defaults(func=_cmd_methods)
    m = sub.add_parser("measure", help="measure one method's KL curve against the uncompressed model")
    m.add_argument("--method", required=True, help="method id, e.g. rtn-w3-g128 (see `lcc methods`)")
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
    m.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    m.add_argument("--json", default=None, help="write the full result as JSON to this file")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    m.set_defaults(func=_cmd_measure)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lcc: %(message)s")
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
