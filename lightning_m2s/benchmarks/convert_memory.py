"""`m2s bench convert_memory`: peak memory against video length (see benchmarks/convert.py)."""

from lightning_m2s.benchmarks.convert import run_memory as run

__all__ = ["run"]
