"""Benchmarks behind `m2s bench NAME [--json]`: each measures, prints, and writes benchmarks/NAME.json
(`--quick` smoke runs only print: their figures never replace the recorded ones).

One module per benchmark in `lightning_m2s/benchmarks/`, each with `run(quick: bool) -> dict`.
Timings are ratios within one run where the issue asks for them (the machine is shared and noisy).
"""

from __future__ import annotations

import importlib
import json
import resource
import signal
import time
from pathlib import Path
from typing import Callable

from lightning_m2s.errors import ConfigError, Interrupted
from lightning_m2s.files import write_json

# name -> module in lightning_m2s.benchmarks
BENCHMARKS = {
    "splat": "splat",  # geometry.forward_splat, ms per 512^2 frame
    "data": "data",  # loader samples per second on the embedded default's buckets
    "attention": "attention",  # masked full attention over the stock processor
    "model": "model",  # tiny UNet step times, img2vid-xt FLOPs on the meta device
    "train": "train",  # training steps per second of each variant, loader rate beside it
    "step": "step",  # the fine-tune step: bf16 vs fp32, encodes in one call, VAE layouts
    "convert": "convert",  # m2s convert frames per second, seconds per stage, memory at 64 px
    "convert_memory": "convert_memory",  # m2s convert peak memory at 300 vs 1000 frames of 320x240 (long)
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and finished children) in MiB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return self_kb / 1024.0


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of `fn` in seconds over `repeats` runs (the minimum is the least noisy estimate)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_benchmark(name: str, quick: bool = False, out_dir: Path | None = Path("benchmarks")) -> dict:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    module = importlib.import_module(f"lightning_m2s.benchmarks.{BENCHMARKS[name]}")
    result = {"benchmark": name, **module.run(quick=quick)}
    if out_dir is not None and not quick:  # smoke figures never replace the recorded ones
        write_json(out_dir / f"{name}.json", result)
    return result


def _stop(signum, frame):
    raise Interrupted(signum, None)


def main(names: list[str], as_json: bool, quick: bool = False) -> None:
    # SIGTERM unwinds like Ctrl-C, so the benchmarks' temporary folders are removed
    signal.signal(signal.SIGTERM, _stop)
    if names == ["all"]:
        names = list(BENCHMARKS)
    for name in names:
        result = run_benchmark(name, quick=quick)
        if as_json:
            print(json.dumps(result))  # one JSON object on the last line
        else:
            for key, value in result.items():
                print(f"{name:>10}  {key:<40} {value}")
