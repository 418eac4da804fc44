"""`m2s bench convert_memory`: peak memory of 300 vs 1000 frames at 320x240 (see benchmarks/convert.py)."""

from lightning_m2s.benchmarks.convert import run_memory as run

__all__ = ["run"]
