"""A Dataset over a weighted mix of sources: read, sample in time, crop/resize, warp, close the mask."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_m2s.data.buckets import SampleKey
from lightning_m2s.data.clip import StereoClip, make_clip
from lightning_m2s.data.sources import StereoSource, build_source
from lightning_m2s.data.transforms import (
    center_crop_box, crop_resize, crop_resize_warp, random_resized_crop_box, sample_frame_indices,
)
from lightning_m2s.errors import ConfigError
from lightning_m2s.geometry import SPLATS


def build_sources(entries: Sequence[dict], key: str) -> tuple[list[StereoSource], list[float], list[int | None]]:
    """Config entries {name, weight=1, clips=None, **options} -> sources, weights, per-entry clip caps."""
    sources, weights, caps = [], [], []
    for j, entry in enumerate(entries or []):
        entry = dict(entry)
        if "name" not in entry:
            raise ConfigError(f"{key}[{j}]: a source entry needs 'name'")
        name = entry.pop("name")
        weight = float(entry.pop("weight", 1.0))
        cap = entry.pop("clips", None)
        if weight < 0:
            raise ConfigError(f"{key}[{j}].weight must be >= 0, got {weight}")
        sources.append(build_source(name, key=f"{key}[{j}].name", **entry))
        weights.append(weight)
        caps.append(None if cap is None else int(cap))
    return sources, weights, caps


class StereoClipDataset(Dataset):
    """Stereo clips from `sources`.

    Training (train=True): `__getitem__(SampleKey)` with the key's frames, size and seed: random start,
    random fps in `fps` (an int range [lo, hi], drawn uniformly per sample, or one number), random
    resized crop. Evaluation: `__getitem__(i)` for clip i of a fixed list (the sources' videos
    interleaved, each capped by `caps`, all capped by `eval_clips`): start 0, `eval_fps`, centre crop to
    `eval_size`. Warping happens here with geometry.forward_splat from the source's disparity (or a
    source's offline warp, cropped and resized with the views).
    """

    def __init__(
        self,
        sources: Sequence[StereoSource],
        weights: Sequence[float] | None = None,
        *,
        train: bool = True,
        fps: float | Sequence[float] = (5, 30),
        crop_scale: Sequence[float] = (0.3, 1.0),
        close_kernel: int = 11,
        eval_frames: int = 16,
        eval_size: int | Sequence[int] = 128,
        eval_fps: float = 5.0,
        eval_clips: int | None = None,
        caps: Sequence[int | None] | None = None,
        splat: str = "nearest",
    ):
        if not sources:
            raise ConfigError("a dataset needs at least one source")
        self.sources = list(sources)
        self.weights = [1.0] * len(self.sources) if weights is None else [float(w) for w in weights]
        self.train = train
        self.fps = tuple(fps) if isinstance(fps, (list, tuple)) else (fps, fps)
        if len(self.fps) != 2 or not 0 < self.fps[0] <= self.fps[1]:
            raise ConfigError(f"train fps must be a number or a range [lo, hi] with 0 < lo <= hi, got {fps}")
        self.crop_scale = tuple(crop_scale)
        self.close_kernel = int(close_kernel)
        if splat not in SPLATS:
            raise ConfigError(f"data.splat {splat!r} must be one of {sorted(SPLATS)}")
        self.splat = splat
        self.eval_frames, self.eval_fps = int(eval_frames), float(eval_fps)
        self.eval_size = (eval_size, eval_size) if isinstance(eval_size, int) else tuple(eval_size)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])  # global index -> (source, item)
        # evaluation clips: interleave sources so a global cap keeps every source represented
        caps = list(caps) if caps is not None else [None] * len(self.sources)
        per = [list(range(len(s) if c is None else min(c, len(s)))) for s, c in zip(self.sources, caps)]
        order = [(k, i) for j in range(max(map(len, per))) for k, items in enumerate(per) if j < len(items) for i in [items[j]]]
        self.eval_items = order[:eval_clips] if eval_clips is not None else order

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.train else len(self.eval_items)

    def sample_weights(self) -> np.ndarray:
        """Per global index: the source's weight spread over its videos (for the bucket sampler)."""
        return np.concatenate([np.full(len(s), w / len(s)) for s, w in zip(self.sources, self.weights)])

    def locate(self, index: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return k, int(index - self.offsets[k])

    def __getitem__(self, key: SampleKey | int) -> StereoClip:
        if isinstance(key, SampleKey) and self.train:
            k, item = self.locate(key.index)
            return self._load(k, item, key.frames, (key.height, key.width), np.random.default_rng(key.seed), key.seed)
        if not self.train and int(key) < 0:  # a rank's filler under DDP (EvalDistributedSampler): not scored
            clip = self[-1 - int(key)]
            clip.meta["padding"] = True
            return clip
        k, item = self.eval_items[int(key)] if not self.train else self.locate(int(key))
        return self._load(k, item, self.eval_frames, self.eval_size, None, None)

    def _load(self, k: int, item: int, frames: int, size: tuple[int, int], rng, seed) -> StereoClip:
        source = self.sources[k]
        info = source.info(item)
        where = source.describe(item)
        if rng is None:  # evaluation: fixed start, fixed fps, centre crop
            indices, fps = sample_frame_indices(info.num_frames, info.fps, frames, self.eval_fps, None, where)
        else:
            lo, hi = self.fps
            target = float(rng.integers(int(lo), int(hi) + 1)) if hi > lo else float(lo)
            indices, fps = sample_frame_indices(info.num_frames, info.fps, frames, target, rng, where, adapt_stride=hi > lo)
        left, right, disparity = source.read(item, indices)
        warp = source.read_warp(item, indices)  # None unless the source ships offline warps
        H, W = left.shape[1:3]
        box = center_crop_box(H, W, *size) if rng is None else random_resized_crop_box(H, W, *size, self.crop_scale, rng)
        left_t, right_t, disp_t = crop_resize(left, right, disparity, box, size)
        warp_t = crop_resize_warp(*warp, box, size) if warp is not None else None
        meta = {
            "source": source.name,
            "video": info.name,
            "index": item,
            "start_frame": int(indices[0]),
            "frame_indices": indices.tolist(),
            "fps": float(fps),  # the sampling fps of this clip (SVD's fps conditioning)
            "video_fps": float(info.fps),
            "crop": (box.top, box.left, box.height, box.width),
            "disparity_scale": size[1] / box.width,  # output pixels per source pixel
            "seed": seed,
            # pixels of the read frames without a disparity (a source's outliers: holes), and of all
            "disparity_outliers": 0 if disparity is None else int(np.isnan(disparity).sum()),
            "disparity_pixels": 0 if disparity is None else int(disparity.size),
        }
        with torch.no_grad():
            return make_clip(left_t, right_t, disp_t, meta, self.close_kernel, warp=warp_t, splat=self.splat)
