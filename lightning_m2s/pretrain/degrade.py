"""Per-frame conditions for the prior, made from monocular clips: a clip degraded as a depth warp degrades a view.

`warp_degrade(video, rng)` takes a clean clip (the target) and returns what the stereo pipeline would
hand the UNet for it: the clip forward-warped to a virtual second view under a random disparity and
back again, so that

- what the virtual view could not see is a hole, closed with the pipeline's 11x11 kernel and black
  (geometry.close_mask, as data.clip.make_clip does for the warped right view);
- known pixels went through two sub-pixel splats (resampling blur);
- pixels on depth edges take in-between disparities (flying pixels);
- the way back uses a disparity off by a random scale (disparity scale errors).

The disparity is made per clip: a smooth random field, layers cut from the clip's own colours (so depth
edges fall on image edges, as in real scenes) and a few moving ellipses in front. Nothing here reads a
second view: the prior stays monocular.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.geometry import close_mask, forward_splat

# At the evaluation size (64 px) the real clips have disparities of 1-11 px and holes over 10-29% of a
# frame after closing; draw the largest disparity over that range, in units of the frame width.
MAX_DISPARITY = (1.5 / 64, 14.0 / 64)
SCALE_ERROR = 0.1  # the way back uses disparity x U(1 - e, 1 + e)
FLYING_PIXELS = 0.5  # chance that the disparity is blurred across its edges (in-between depths)


def random_disparity(video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """video [T, 3, H, W] in [-1, 1] -> disparity [T, H, W] >= 0 in pixels, nearer = larger."""
    T, _, H, W = video.shape
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    # 1. a smooth field (a slanted, curved background)
    smooth = F.interpolate(torch.rand(1, 1, 3, 3, generator=g), size=(H, W), mode="bicubic", align_corners=True)[0, 0]
    # 2. layers from the clip's colours: a random projection of the blurred frames, quantised to 2-4 levels
    blurred = F.avg_pool2d(video, 5, stride=1, padding=2, count_include_pad=False)  # [T, 3, H, W]
    proj = (blurred * torch.randn(1, 3, 1, 1, generator=g)).sum(1)  # [T, H, W]
    levels = int(rng.integers(2, 5))
    edges = torch.quantile(proj.flatten()[:: max(1, proj.numel() // 4096)], torch.linspace(0, 1, levels + 1)[1:-1])
    layers = torch.bucketize(proj, edges).float() / max(1, levels - 1)  # [T, H, W] in [0, 1]
    # 3. up to three ellipses in front, each moving in a straight line
    front = torch.zeros(T, H, W)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    t = torch.arange(T, dtype=torch.float32)[:, None, None]
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ry, rx = rng.uniform(0.08, 0.3) * H, rng.uniform(0.08, 0.3) * W
        vy, vx = rng.uniform(-0.02, 0.02) * H, rng.uniform(-0.02, 0.02) * W
        inside = ((yy - cy - vy * t) / ry) ** 2 + ((xx - cx - vx * t) / rx) ** 2 < 1
        front = torch.where(inside, torch.full_like(front, rng.uniform(1.0, 1.5)), front)
    w = rng.dirichlet([1.0, 1.0])
    depth_order = w[0] * smooth + w[1] * layers  # [T, H, W] in [0, 1]
    depth_order = torch.maximum(depth_order, front)
    d = depth_order / depth_order.amax().clamp_min(1e-6)
    return d * rng.uniform(*MAX_DISPARITY) * W


def _splat_with_disparity(image: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splat image [T, 3, H, W] and its disparity together: (warped, warped disparity [T, H, W], holes)."""
    out, holes = forward_splat(torch.cat([image, disparity[:, None]], 1), disparity)  # torch splat: 4 channels
    return out[:, :3], out[:, 3], holes


def warp_degrade(video: torch.Tensor, rng: np.random.Generator, close_kernel: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """video [T, 3, H, W] in [-1, 1] -> (degraded [T, 3, H, W], closed hole mask bool [T, H, W]).

    The clip plays the right view: its pixels go to a virtual left view (x + d: a splat of the mirrored
    frames) and come back (x - d) with the left view's own disparity; holes of the way there stay holes."""
    disparity = random_disparity(video, rng)  # [T, H, W], of the right view
    if rng.random() < FLYING_PIXELS:
        disparity = F.avg_pool2d(disparity[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    # 1. to the virtual left view: mirrored, a splat to x - d is a splat to x + d
    left, left_disp, left_holes = _splat_with_disparity(video.flip(-1), disparity.flip(-1))
    left, left_disp, left_holes = left.flip(-1), left_disp.flip(-1), left_holes.flip(-1)
    # 2. back to the right view with a scale error; the left view's holes land nowhere
    x = torch.arange(video.shape[-1], dtype=torch.float32)
    back = left_disp * rng.uniform(1 - SCALE_ERROR, 1 + SCALE_ERROR)
    back = torch.where(left_holes, x + 2, back)  # x - d = -2: off the frame (as data.clip does for unknown pixels)
    warped, holes = forward_splat(left, back)
    mask = close_mask(holes, close_kernel)
    return warped.masked_fill(mask[:, None], -1.0), mask
