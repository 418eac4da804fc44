"""StereoDataModule: the one DataModule every training variant shares (config section `data:` -> kwargs)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from lightning_m2s.config import with_defaults
from lightning_m2s.data.buckets import BucketBatchSampler, parse_buckets
from lightning_m2s.data.clip import collate_clips
from lightning_m2s.data.dataset import StereoClipDataset, build_sources
from lightning_m2s.errors import ConfigError
from lightning_m2s.geometry import SPLATS

# Embedded default (CPU, minutes): procedural scenes for training, with mild disparity errors so the
# warped view carries artifacts the left view can fix; evaluation on held-out scenes (other seeds) and
# on real-content clips of the Middlebury pair. Buckets are the paper's shapes scaled by 1/4 in size.
DEFAULT_SYNTHETIC = {"name": "synthetic", "size": [128, 128], "num_frames": 150, "fps": 30,
                     "error_blur": 1.0, "error_scale": 0.05, "error_thin": True}
# Half of the training scenes are dense (2-6 objects up to 24 px of disparity at 128 px: holes cover about
# 8% of a 64 px frame, as in real footage with depth edges everywhere; the sparse ones 1-2%): a fine-tune on
# sparse scenes alone barely learns to fill holes (measured: +1.7 dB on the real clips from the dense half).
DEFAULT_TRAIN = [{**DEFAULT_SYNTHETIC, "weight": 0.5, "num_videos": 256, "seed": 0},
                 {**DEFAULT_SYNTHETIC, "weight": 0.5, "num_videos": 256, "seed": 1, "max_disparity": 24,
                  "num_objects": [2, 6]}]
# Validation (which selects the best checkpoint) is synthetic only: the real-pair clips all come from
# one Middlebury image, so validating on them would select on the content of test/real.
DEFAULT_VAL = [{**DEFAULT_SYNTHETIC, "num_videos": 8, "seed": 10_000}]
# Test: held-out scenes (disjoint seed) where each mechanism has something to do: every scene has a
# thin fence whose disparity the warp misses and blurred depth edges (errors the left view can correct,
# Sec. 5 (2)), and 1-2 objects moving on their own in front of the background (background hidden in one
# frame and visible in another, Sec. 5 (3)); plus real-content camera pans over the Middlebury pair: 24 of
# them, because their per-clip differences spread most (at 12 the with/without-left interval was -0.37 / +0.33 dB).
DEFAULT_TEST = [{**DEFAULT_SYNTHETIC, "num_videos": 16, "seed": 20_000, "fence_prob": 1.0},
                {"name": "image_pairs", "num_clips": 24, "seed": 2}]
DEFAULT_BUCKETS = [{"frames": 4, "size": 128}, {"frames": 16, "size": 64}, {"frames": 25, "size": 48}]
PAPER_BUCKETS = [{"frames": 4, "size": 512}, {"frames": 16, "size": 256}, {"frames": 25, "size": 192}]


class StereoDataModule(L.LightningDataModule):
    """Train: bucketed random clips (`train_batches` per epoch, sources may be procedural). Val/test:
    fixed clips, `eval_frames` at `eval_fps`, centre crop `eval_size` (paper: 16 frames, 5 fps, 512).

    Every source entry is {name, weight (train mixing, default 1), clips (eval cap), **source options}.
    """

    def __init__(self, **settings):
        """`settings`: the `data:` config section; a key not given takes experiments/base.yaml's default."""
        super().__init__()
        s = with_defaults("data", settings)
        self.train_sources = DEFAULT_TRAIN if s["train_sources"] is None else list(s["train_sources"])
        self.val_sources = DEFAULT_VAL if s["val_sources"] is None else list(s["val_sources"])
        self.test_sources = DEFAULT_TEST if s["test_sources"] is None else list(s["test_sources"])
        self.buckets = parse_buckets(DEFAULT_BUCKETS if s["buckets"] is None else s["buckets"], key="data.buckets")
        if s["batch_size"] < 1 or s["eval_batch_size"] < 1 or s["train_batches"] < 1 or s["num_workers"] < 0:
            raise ConfigError(
                "data.batch_size, data.eval_batch_size, data.train_batches must be >= 1 and data.num_workers >= 0"
            )
        if s["close_kernel"] < 0 or (s["close_kernel"] > 1 and s["close_kernel"] % 2 == 0):
            raise ConfigError(f"data.close_kernel must be odd (or 0/1 for none), got {s['close_kernel']}")
        if s["splat"] not in SPLATS:
            raise ConfigError(f"data.splat {s['splat']!r} must be one of {sorted(SPLATS)}")
        self.splat = s["splat"]
        lo, hi = s["crop_scale"]
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(s['crop_scale'])}")
        self.batch_size, self.train_batches = int(s["batch_size"]), int(s["train_batches"])
        self.train_fps, self.crop_scale = s["train_fps"], tuple(s["crop_scale"])
        self.eval = {"eval_frames": int(s["eval_frames"]), "eval_size": int(s["eval_size"]), "eval_fps": float(s["eval_fps"])}
        self.eval_batch_size, self.val_clips, self.test_clips = int(s["eval_batch_size"]), s["val_clips"], s["test_clips"]
        self.close_kernel, self.num_workers = int(s["close_kernel"]), int(s["num_workers"])
        self.pin_memory, self.seed = s["pin_memory"], int(s["seed"])
        self._datasets: dict[str, StereoClipDataset] = {}

    def dataset(self, split: str) -> StereoClipDataset:
        """The dataset of 'train', 'val' or 'test', built on first use (source listing only, no decoding)."""
        if split not in self._datasets:
            entries = {"train": self.train_sources, "val": self.val_sources, "test": self.test_sources}[split]
            if not entries:
                raise ConfigError(f"data.{split}_sources is empty")
            sources, weights, caps = build_sources(entries, f"data.{split}_sources")
            clips = {"val": self.val_clips, "test": self.test_clips}.get(split)
            self._datasets[split] = StereoClipDataset(
                sources, weights, train=split == "train", fps=self.train_fps, crop_scale=self.crop_scale,
                close_kernel=self.close_kernel, eval_clips=clips, caps=caps, splat=self.splat, **self.eval,
            )
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val", "test"]}
        for split in splits.get(stage, []):
            self.dataset(split)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset, num_workers=self.num_workers, collate_fn=collate_clips, pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0, **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        # Built here (inside Lightning's hook) so that under DDP Lightning can re-create it with its
        # DistributedSampler, from which the sampler takes rank and world size.
        sampler = BucketBatchSampler(
            SequentialSampler(ds), buckets=self.buckets, batch_size=self.batch_size,
            num_batches=self.train_batches, seed=self.seed, weights=ds.sample_weights(),
        )
        return self._loader(ds, batch_sampler=sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = EvalDistributedSampler(ds, num_replicas=trainer.world_size, rank=trainer.global_rank)
        return self._loader(ds, batch_size=self.eval_batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class EvalDistributedSampler(DistributedSampler):
    """Evaluation clips split over ranks in order, every clip scored once.

    Lightning's DistributedSampler pads the last ranks with repeats of the first clips, which the metrics
    would count twice. Here the fillers are marked (index -1 - i for clip i; the dataset flags them
    meta["padding"] and the module does not score them), so all ranks still run the same number of
    steps and their collectives stay in step."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        n = len(self.dataset)
        order = list(range(n)) + [-1 - i % n for i in range(self.total_size - n)]
        return iter(order[self.rank : self.total_size : self.num_replicas])
