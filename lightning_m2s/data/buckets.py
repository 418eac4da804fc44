"""Mixed-resolution bucket batch sampler: every batch has one (frames, height, width).

Each step draws a bucket by weight, then batch_size (dataset index, per-sample seed) pairs by the
dataset's sampling weights. The sequence is a function of (seed, epoch) only, and every key carries
its shape and seed, so a sample does not depend on the worker that loads it. Under DDP all ranks
compute the same global sequence: step k holds one bucket and world_size batches, rank r takes batch
r of every step (disjoint slices; all ranks run the same shape at the same step, so none waits on a
bigger one).

Lightning: this is a `BatchSampler` with a `sampler` argument, so when Lightning injects its
DistributedSampler under DDP, rank and world size are read from it. Rank and world size can also be
given, or come from an initialised torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from lightning_m2s.errors import ConfigError


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    weight: float = 1.0
    batch_size: int | None = None  # None: the sampler's batch_size


@dataclass(frozen=True)
class SampleKey:
    """What a dataset needs to build one sample deterministically."""

    index: int
    frames: int
    height: int
    width: int
    seed: int


def parse_buckets(buckets: Sequence, multiple_of: int = 8, key: str = "buckets") -> list[Bucket]:
    """Buckets from dicts {frames, height, width (default height), weight, batch_size}, Bucket objects or
    strings "FxHxW" / "FxS". Sizes must be multiples of `multiple_of` (the VAE downsamples by 8)."""
    out = []
    for j, b in enumerate(buckets):
        where = f"{key}[{j}]"
        if isinstance(b, Bucket):
            pass
        elif isinstance(b, str):
            try:
                parts = [int(p) for p in b.lower().split("x")]
            except ValueError:
                raise ConfigError(f"{where}: bucket {b!r} must look like '16x256x256' or '16x256'") from None
            if len(parts) not in (2, 3):
                raise ConfigError(f"{where}: bucket {b!r} must look like '16x256x256' or '16x256'")
            b = Bucket(parts[0], parts[1], parts[-1])
        elif isinstance(b, dict) or hasattr(b, "keys"):
            b = dict(b)
            unknown = set(b) - {"frames", "height", "width", "size", "weight", "batch_size"}
            if unknown:
                raise ConfigError(f"{where}: unknown bucket key(s) {sorted(unknown)}")
            size = b.pop("size", None)
            b.setdefault("height", size)
            b.setdefault("width", b["height"])
            if b.get("frames") is None or b["height"] is None:
                raise ConfigError(f"{where}: a bucket needs 'frames' and 'height' (or 'size')")
            b = Bucket(int(b["frames"]), int(b["height"]), int(b["width"]), float(b.get("weight", 1.0)), b.get("batch_size"))
        else:
            raise ConfigError(f"{where}: cannot read bucket {b!r}")
        if b.frames < 1 or b.weight < 0 or (b.batch_size is not None and b.batch_size < 1):
            raise ConfigError(f"{where}: frames and batch_size must be >= 1 and weight >= 0, got {b}")
        if b.height % multiple_of or b.width % multiple_of or b.height < multiple_of or b.width < multiple_of:
            raise ConfigError(f"{where}: height and width must be positive multiples of {multiple_of}, got {b.height}x{b.width}")
        out.append(b)
    if not out or sum(b.weight for b in out) <= 0:
        raise ConfigError(f"{key}: need at least one bucket with a positive weight")
    return out


class BucketBatchSampler(BatchSampler):
    """Yields lists of SampleKey, `num_batches` per epoch on each rank.

    sampler: the dataset's index space (anything with len(); a DistributedSampler gives rank and world
    size too). weights: sampling weight per dataset index (uniform when None).
    """

    def __init__(
        self,
        sampler=None,
        buckets: Sequence = ("4x128x128",),
        batch_size: int = 1,
        num_batches: int = 100,
        seed: int = 0,
        weights: Sequence[float] | np.ndarray | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,  # unused (batches are always full); Lightning looks for the attribute
    ):
        self.sampler = sampler
        self.buckets = parse_buckets(buckets)
        self.batch_size, self.num_batches, self.seed, self.drop_last = int(batch_size), int(num_batches), int(seed), drop_last
        if self.batch_size < 1 or self.num_batches < 1:
            raise ConfigError(f"batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}")
        data = getattr(sampler, "dataset", None) or getattr(sampler, "data_source", None)
        size = len(weights) if weights is not None else len(data) if data is not None else len(sampler) if sampler is not None else 0
        if size < 1:
            raise ConfigError("BucketBatchSampler needs a non-empty index space (sampler or weights)")
        w = np.ones(size) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != size or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"sampling weights must be {size} values >= 0 with a positive sum")
        self.p = w / w.sum()
        bw = np.asarray([b.weight for b in self.buckets], dtype=np.float64)
        self.bucket_p = bw / bw.sum()
        if isinstance(sampler, DistributedSampler):
            rank, world_size = sampler.rank, sampler.num_replicas
        elif rank is None and world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size = int(rank or 0), int(world_size or 1)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self, epoch: int) -> list[list[list[SampleKey]]]:
        """The whole epoch on all ranks: [step][rank] -> batch of keys."""
        rng = np.random.default_rng([self.seed, epoch])
        steps = []
        for _ in range(self.num_batches):
            b = self.buckets[rng.choice(len(self.buckets), p=self.bucket_p)]
            n = b.batch_size or self.batch_size
            idx = rng.choice(len(self.p), size=(self.world_size, n), p=self.p)
            seeds = rng.integers(0, 2**62, size=(self.world_size, n))
            steps.append([
                [SampleKey(int(i), b.frames, b.height, b.width, int(s)) for i, s in zip(idx[r], seeds[r])]
                for r in range(self.world_size)
            ])
        return steps

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in self.global_batches(self.epoch):
            yield step[self.rank]
