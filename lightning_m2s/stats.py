"""Paired differences between runs with a 95% bootstrap interval over test clips (and seeds).

Two arms of a grid are scored on the same test clips, so their difference is taken clip by clip
(paired): clip difficulty cancels and the interval is far narrower than the spread of either arm.
The interval resamples clips with replacement (and seeds, when a grid has several) and takes the
2.5 / 97.5 percentiles of the mean difference. What it covers: which clips happened to be in the test
set, and seed-to-seed training noise only when there are several seeds. At one seed it is silent
about training noise: a second seed may move an arm by more than the interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 10_000


@dataclass(frozen=True)
class Difference:
    mean: float
    lo: float
    hi: float
    clips: int
    seeds: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def per_clip_matrix(runs: list[list[dict]], dataset: str, metric: str) -> tuple[np.ndarray, list[str]]:
    """[seeds, clips] values of `metric` on `dataset` from per-clip rows (one row list per seed),
    keeping only the clips every seed has; and the clip ids (columns)."""
    tables = [{r["clip"]: r[metric] for r in rows if r["dataset"] == dataset and metric in r} for rows in runs]
    clips = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    return np.array([[t[c] for c in clips] for t in tables], dtype=np.float64).reshape(len(tables), len(clips)), clips


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> Difference:
    """mean(a - b) and its 95% bootstrap interval; a, b: [seeds, clips] on the same clips (b may have one
    row, e.g. a training-free floor, which then pairs with every seed). NaN values (undefined, e.g.
    inside an empty mask) drop their clip."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired_difference needs the same clips, got {a.shape[1]} and {b.shape[1]}")
    d = a - b  # [S, C] (broadcast over seeds)
    d = d[:, np.isfinite(d).all(axis=0)]
    S, C = d.shape
    if C == 0:
        return Difference(float("nan"), float("nan"), float("nan"), 0, S)
    if S * C < 2:  # one clip at one seed: nothing to resample, so no interval (and never a star)
        return Difference(float(d.mean()), float("nan"), float("nan"), C, S)
    rng = np.random.default_rng(seed)
    si = rng.integers(0, S, (n_boot, S))
    ci = rng.integers(0, C, (n_boot, C))
    boot = d[si[:, :, None], ci[:, None, :]].mean(axis=(1, 2))  # [n_boot]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Difference(float(d.mean()), float(lo), float(hi), C, S)
