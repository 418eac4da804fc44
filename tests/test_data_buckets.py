"""Bucket batch sampler: homogeneous batches, weights, determinism, disjoint DDP ranks, Lightning's DDP injection."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import BatchSampler, DistributedSampler

from lightning_m2s.data.buckets import Bucket, BucketBatchSampler, parse_buckets
from lightning_m2s.errors import ConfigError

BUCKETS = [{"frames": 4, "size": 128}, {"frames": 16, "size": 64, "batch_size": 3}, "25x48"]


def make(**kw):
    args = {"buckets": BUCKETS, "batch_size": 2, "num_batches": 50, "seed": 1, "weights": np.ones(10)}
    args.update(kw)
    return BucketBatchSampler(None, **args)


def test_paper_and_default_buckets_parse():
    assert parse_buckets(["4x512", "16x256", "25x192"]) == [Bucket(4, 512, 512), Bucket(16, 256, 256), Bucket(25, 192, 192)]
    assert parse_buckets(BUCKETS)[1] == Bucket(16, 64, 64, 1.0, 3)
    with pytest.raises(ConfigError, match=r"buckets\[0\].*multiples of 8"):
        parse_buckets(["4x100"])


def test_batches_are_homogeneous_and_sized_per_bucket():
    shapes = {(4, 128, 128): 2, (16, 64, 64): 3, (25, 48, 48): 2}
    batches = list(make())
    assert len(batches) == 50
    for batch in batches:
        shape = {(k.frames, k.height, k.width) for k in batch}
        assert len(shape) == 1
        assert len(batch) == shapes[shape.pop()]


def test_bucket_and_index_weights():
    s = make(buckets=[{"frames": 4, "size": 32, "weight": 1}, {"frames": 8, "size": 32, "weight": 0},
                      {"frames": 2, "size": 32, "weight": 3}], num_batches=2000, weights=[0, 1, 1, 2])
    batches = list(s)
    frames = Counter(b[0].frames for b in batches)
    assert frames[8] == 0
    assert abs(frames[2] / 2000 - 0.75) < 0.04  # 4 sigma of a binomial(2000, 0.75)
    idx = Counter(k.index for b in batches for k in b)
    assert idx[0] == 0 and abs(idx[3] / sum(idx.values()) - 0.5) < 0.03


def test_deterministic_by_seed_and_epoch():
    a, b = list(make()), list(make())
    assert a == b
    s = make()
    s.set_epoch(1)
    assert list(s) != a
    assert list(make(seed=2)) != a
    assert len({k.seed for batch in a for k in batch}) == sum(len(batch) for batch in a)  # per-sample seeds


def test_ddp_ranks_get_disjoint_slices_of_one_sequence():
    world = 3
    ranks = [list(make(rank=r, world_size=world)) for r in range(world)]
    glob = make(rank=0, world_size=world).global_batches(0)
    for step in range(50):
        assert len({(b[0].frames, b[0].height) for b in (ranks[r][step] for r in range(world))}) == 1  # same shape
        for r in range(world):
            assert ranks[r][step] == glob[step][r]
    seeds = [k.seed for r in range(world) for batch in ranks[r] for k in batch]
    assert len(seeds) == len(set(seeds))  # no sample is drawn by two ranks


def test_lightning_ddp_injection_sets_rank(tmp_path):
    """Lightning re-creates the batch sampler with its DistributedSampler; the rank must come from it."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader

    from lightning_m2s.data import StereoDataModule

    dm = StereoDataModule(train_sources=[{"name": "synthetic", "num_videos": 4, "size": [32, 32]}],
                          buckets=["2x32"], train_batches=4)
    with _replace_dunder_methods(BatchSampler, "dataset"):  # what Lightning does around *_dataloader hooks
        loader = dm.train_dataloader()
    ds = loader.dataset
    new = _update_dataloader(loader, DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False))
    bs = new.batch_sampler
    assert isinstance(bs, BucketBatchSampler) and (bs.rank, bs.world_size) == (1, 2)
    assert list(bs) == [step[1] for step in bs.global_batches(0)]
