"""The sweeps the analysis reads, from sweeps/*.yaml: which exist, each grid's arms, the paper tables it fills."""

from __future__ import annotations

from functools import cache

from lightning_m2s.comparison import reference_arm
from lightning_m2s.config import SWEEPS_DIR

# The order the report's answers list the sweeps in (the files do not say); other sweep files follow by name.
ORDER = ("left_cond", "left_cond_diffusion", "full_attention", "loss", "inference_steps", "runtime", "baselines",
         "hparams")


def ordered(values, order) -> list:
    """`values` once each: those in `order` in its order, then the rest sorted."""
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


@cache
def _specs() -> dict:
    """name -> SweepSpec of every sweep file, in ORDER (read once: the files do not change under a report)."""
    from lightning_m2s.sweep import load_sweep  # the sweep runner's imports are only needed here

    return {name: load_sweep(name) for name in ordered((p.stem for p in SWEEPS_DIR.glob("*.yaml")), ORDER)}


def sweep_names() -> tuple[str, ...]:
    """Every sweep of sweeps/, grids and searches: each logs to the MLflow experiment `sweep-<name>`."""
    return tuple(_specs())


def arms(ablation: str) -> tuple[str, ...]:
    """A grid's arms in the order plots show them: its reference arm first (the arm without the studied
    component, comparison.reference_arm), then the sweep file's order; () for a search or no such sweep."""
    spec = _specs().get(ablation)
    names = list(spec.arms) if spec else []
    first = reference_arm(names)
    return tuple(([first] if first else []) + [a for a in names if a != first])


def paper_tables(ablation: str) -> str:
    """The paper tables a sweep reproduces as its file's `table:` says ("4, 7"); "" for none or no such sweep."""
    spec = _specs().get(ablation)
    return spec.table if spec else ""
