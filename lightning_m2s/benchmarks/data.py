"""Train-loader throughput on the embedded default's buckets with 2 workers (`m2s bench data`).

Samples per second per bucket (a loader with only that bucket) and for the weighted mix, measured after
the first batch (worker start-up and scene/texture warm-up excluded). The loader does all the work of a
training sample: render/read, temporal sampling, random resized crop, forward splat, mask closing.
"""

from __future__ import annotations

import time

from lightning_m2s.bench import peak_rss_mb
from lightning_m2s.data.datamodule import DEFAULT_BUCKETS, StereoDataModule
from lightning_m2s.data.buckets import parse_buckets

NUM_WORKERS = 2


def _rate(buckets, batches: int) -> tuple[float, float]:
    """(samples/s, frames/s) over `batches` batches after a warm-up batch."""
    dm = StereoDataModule(buckets=buckets, num_workers=NUM_WORKERS, train_batches=batches + 1, seed=0)
    it = iter(dm.train_dataloader())
    next(it)  # workers up, photos loaded, numba kernel ready
    samples = frames = 0
    start = time.perf_counter()
    for batch in it:
        samples += batch.left.shape[0]
        frames += batch.left.shape[0] * batch.left.shape[1]
    elapsed = time.perf_counter() - start
    del it
    return samples / elapsed, frames / elapsed


def run(quick: bool = False) -> dict:
    batches = 4 if quick else 24
    result: dict = {"num_workers": NUM_WORKERS, "batch_size": StereoDataModule().batch_size, "batches_timed": batches}
    for b in parse_buckets(DEFAULT_BUCKETS):
        name = f"{b.frames}x{b.height}" + (f"x{b.width}" if b.width != b.height else "")
        sps, fps = _rate([b], batches)
        result[f"samples_per_s_{name}"] = round(sps, 2)
        result[f"frames_per_s_{name}"] = round(fps, 1)
    sps, fps = _rate(DEFAULT_BUCKETS, batches * 2)
    result["samples_per_s"] = round(sps, 2)
    result["frames_per_s"] = round(fps, 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result
