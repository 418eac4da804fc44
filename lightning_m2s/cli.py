"""The `m2s` command: train, sweep, evaluate, convert, bench, dashboard, notebook."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_m2s.errors import M2SError


def _train(args: argparse.Namespace) -> None:
    from lightning_m2s.config import load_config
    from lightning_m2s.train import train

    metrics = train(load_config(args.experiment, args.overrides))
    for key, value in sorted(metrics.items()):
        print(f"{key:<40} {value:.4f}")


def _sweep(args: argparse.Namespace) -> None:
    from lightning_m2s.sweep import format_table, run_sweep

    summary = run_sweep(args.ablation, experiment=args.experiment, overrides=args.overrides, trials=args.trials,
                        storage=args.storage, tracking_uri=args.tracking_uri)
    print(f"\nstudy {summary['study']} (objective {summary['objective']}, {summary['direction']}):")
    print(format_table(summary))


def _dashboard(args: argparse.Namespace) -> None:
    from lightning_m2s.dashboard import serve

    serve(args.tracking_uri, args.host, args.port)


def _notebook(args: argparse.Namespace) -> None:
    from lightning_m2s.analysis import run_notebook

    print(f"wrote {run_notebook(args.tracking_uri, args.out)}")


def _bench(args: argparse.Namespace) -> None:
    from lightning_m2s import bench

    bench.main(args.names, as_json=args.json, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2s", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and test one experiment")
    p.add_argument("experiment", nargs="?", default="tiny", help="a name in experiments/ or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=1e-4 trainer.max_steps=10")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="run (or resume) an ablation grid from sweeps/")
    p.add_argument("ablation", help="a name in sweeps/ (left_cond, full_attention, loss, ...) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides applied to every trial")
    p.add_argument("--experiment", help="the experiment every trial starts from (default: the sweep's, tiny)")
    p.add_argument("--trials", type=int, help="run at most this many trials now")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<checkout>/optuna.db)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<checkout>/mlflow.db)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("dashboard", help="serve the MLflow UI over the tracking store")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<checkout>/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("notebook", help="execute notebooks/tables_4_10.ipynb headless and write its HTML report")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<checkout>/mlflow.db)")
    p.add_argument("--out", type=Path, help="HTML report (default notebooks/tables_4_10.html)")
    p.set_defaults(func=_notebook)

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
