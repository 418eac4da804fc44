"""Monocular training video for the pretraining recipes: synthetic scenes and camera pans over photographs.

Both recipes (the video VAE and the image-to-video prior) draw from one pool of uint8 clips
[N, P, 3, S, S] rendered once per run:

- synthetic: both views of the synthetic source's TRAINING scenes (seed 0, as the stereo fine-tune),
  each at a random start and frame stride (5-30 fps);
- pans: a window gliding (and zooming) across one of scikit-image's bundled photographs, with
  sub-pixel motion (bilinear resampling of a pre-scaled, antialiased copy), at a random speed.

Never used: the evaluation seeds of the synthetic source and the Middlebury pair (test data).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# scikit-image's bundled colour or rich grey photographs (no download). The Middlebury pair
# (stereo_motorcycle) is test data and never here.
PAN_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "brick", "grass", "gravel", "coins", "moon", "page", "text", "colorwheel",
    "logo", "microaneurysms",
)
SYNTHETIC_TRAIN = {"name": "synthetic", "size": [128, 128], "num_frames": 150, "fps": 30, "seed": 0}
HELDOUT_SCENES = 30_000  # the prior's held-out report: scenes of no other split (val 10000, test 20000)
STRIDES = (1, 6)  # frame strides of the pool's clips: 30 fps source -> 5-30 fps


def _photo(name: str) -> torch.Tensor:
    """float [3, H, W] in 0..255."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    img = img[..., :3].astype(np.float32)
    if img.max() <= 1.0:  # a few are floats / booleans in [0, 1]
        img = img * 255.0
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def render_pan(photo: torch.Tensor, frames: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One camera pan over `photo` [3, H, W]: uint8 [frames, 3, size, size].

    The window covers 40-100% of the photo's short side, moves in a straight line at up to ~1.5 %
    of its side per frame, and zooms by up to +-20% over the clip."""
    _, H, W = photo.shape
    side0 = rng.uniform(0.4, 1.0) * min(H, W)
    zoom = rng.uniform(-0.2, 0.2)
    # pre-scale with antialiasing so the window is ~1.25 x size pixels: bilinear sampling then never aliases
    scale = min(1.0, 1.25 * size / side0)
    img = F.interpolate(photo[None], scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)[0]
    _, h, w = img.shape
    side = side0 * scale * (1 + zoom * np.linspace(0, 1, frames))  # [frames] window side in img pixels
    speed = rng.uniform(0.0, 0.015) * side[0]
    angle = rng.uniform(0, 2 * np.pi)
    path = speed * np.arange(frames)  # distance travelled
    span_y, span_x = path[-1] * np.sin(angle), path[-1] * np.cos(angle)
    # a start that keeps the whole path inside the photo
    lo_y, hi_y = side.max() / 2 + max(0, -span_y), h - side.max() / 2 - max(0, span_y)
    lo_x, hi_x = side.max() / 2 + max(0, -span_x), w - side.max() / 2 - max(0, span_x)
    cy0 = rng.uniform(lo_y, hi_y) if hi_y > lo_y else h / 2
    cx0 = rng.uniform(lo_x, hi_x) if hi_x > lo_x else w / 2
    cy, cx = cy0 + path * np.sin(angle), cx0 + path * np.cos(angle)
    # affine grids in normalised coordinates (align_corners=False): one per frame
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = torch.from_numpy(side / w).float()
    theta[:, 1, 1] = torch.from_numpy(side / h).float()
    theta[:, 0, 2] = torch.from_numpy(2 * cx / w - 1).float()
    theta[:, 1, 2] = torch.from_numpy(2 * cy / h - 1).float()
    grid = F.affine_grid(theta, (frames, 3, size, size), align_corners=False)
    out = F.grid_sample(img[None].expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def render_pool(num_synthetic: int, num_pans: int, frames: int, size: int = 128, seed: int = 0,
                scene_seed: int = SYNTHETIC_TRAIN["seed"]) -> torch.Tensor:
    """uint8 [2 * num_synthetic + num_pans, frames, 3, size, size]: both views of `num_synthetic`
    synthetic scenes (`scene_seed`: the training scenes by default) and `num_pans` photograph pans,
    with windows, starts and strides drawn from `seed`."""
    from lightning_m2s.data.sources import build_source

    rng = np.random.default_rng([seed, 7])
    clips = []
    if num_synthetic:
        src = build_source(**{**SYNTHETIC_TRAIN, "size": [size, size], "seed": scene_seed}, num_videos=num_synthetic,
                           cache_scenes=1)
        for i in range(num_synthetic):
            stride = int(rng.integers(STRIDES[0], STRIDES[1] + 1))
            start = int(rng.integers(0, src.num_frames - (frames - 1) * stride))
            left, right, _ = src.read(i, start + stride * np.arange(frames))
            clips += [torch.from_numpy(v).permute(0, 3, 1, 2) for v in (left, right)]
    photos = {}
    for k in range(num_pans):
        name = PAN_PHOTOS[k % len(PAN_PHOTOS)]
        if name not in photos:
            photos[name] = _photo(name)
        clips.append(render_pan(photos[name], frames, size, rng))
    return torch.stack(clips)


class ClipSampler:
    """Random training batches from the pool, in [-1, 1].

    `__call__(batch, frames, size, out_size)`: `batch` random windows of `frames` frames, a random
    `size` crop each (time-reversed half the time: motion both ways), resized to `out_size` (area).
    Its one numpy Generator is checkpointed, so a resumed run draws the same batches."""

    def __init__(self, pool: torch.Tensor, seed: int):
        self.pool = pool
        self.rng = np.random.default_rng([seed, 11])

    def __call__(self, batch: int, frames: int, size: int, out_size: int | None = None) -> torch.Tensor:
        N, P, _, H, W = self.pool.shape
        r = self.rng
        clips = []
        for _ in range(batch):
            n, t, y, x = (int(r.integers(m)) for m in (N, P - frames + 1, H - size + 1, W - size + 1))
            clip = self.pool[n, t : t + frames, :, y : y + size, x : x + size]
            clips.append(clip.flip(0) if r.random() < 0.5 else clip)
        video = torch.stack(clips).float().div_(127.5).sub_(1.0)  # [B, T, 3, size, size]
        if out_size and out_size != size:
            video = F.interpolate(video.flatten(0, 1), size=(out_size, out_size), mode="area").unflatten(0, (batch, frames))
        return video
