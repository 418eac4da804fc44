"""The prior's per-frame conditions: monocular clips degraded as a depth warp degrades a view."""

import numpy as np
import torch

from lightning_m2s.geometry import close_mask
from lightning_m2s.pretrain.data import ClipSampler, render_pool
from lightning_m2s.pretrain.degrade import random_disparity, warp_degrade


def _clips(n=4, frames=6):
    sampler = ClipSampler(render_pool(1, 3, frames, size=96, seed=3), 0)
    return [sampler(1, frames, 96, 64)[0] for _ in range(n)]


def test_holes_are_closed_and_black_and_known_pixels_stay_close():
    rng = np.random.default_rng(0)
    fractions = []
    for clip in _clips():
        degraded, mask = warp_degrade(clip, rng)
        assert degraded.shape == clip.shape and mask.shape == (clip.shape[0], 64, 64) and mask.dtype == torch.bool
        assert torch.equal(close_mask(mask, 11), mask)  # already closed as the pipeline closes
        assert (degraded.permute(1, 0, 2, 3)[:, mask] == -1).all()  # black under the mask
        known = ~mask[:, None].expand_as(clip)
        mse = ((degraded - clip)[known] / 2).square().mean()
        assert 10 * torch.log10(1 / mse) > 20  # resampled and slightly misplaced, not another picture
        fractions.append(float(mask.float().mean()))
    assert 0.01 < np.mean(fractions) < 0.5  # holes of the real clips' order (10-29% at 64 px)


def test_the_same_seed_gives_the_same_condition_and_disparity_is_nearer_in_front():
    clip = _clips(1)[0]
    a, b = (warp_degrade(clip, np.random.default_rng(5)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    d = random_disparity(clip, np.random.default_rng(1))
    assert d.shape == (clip.shape[0], 64, 64) and d.min() >= 0 and d.max() <= 14.0 + 1e-4
