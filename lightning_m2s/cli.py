"""The `m2s` command: train, sweep, evaluate, convert, bench, dashboard, notebook."""

from __future__ import annotations

import argparse
import sys

from lightning_m2s.errors import M2SError


def _bench(args: argparse.Namespace) -> None:
    from lightning_m2s import bench

    bench.main(args.names, as_json=args.json, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2s", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="run benchmarks and print their figures")
    p.add_argument("names", nargs="+", help="benchmark names, or 'all'")
    p.add_argument("--json", action="store_true", help="print one JSON object per benchmark")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except M2SError as err:
        print(f"m2s {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
