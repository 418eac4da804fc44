"""Temporal sampling and paired spatial crops; the same crop on every stream, disparity values rescaled.

Resizing: RGB with antialiased bilinear. Disparity with nearest ("nearest-exact", pixel centres aligned
like the bilinear RGB): every output value is the disparity of a real surface, so depth edges stay
sharp. Bilinear or area resizing would average foreground and background across an edge into
"flying pixels" that the warp scatters into the gap (tests/test_data_transforms.py checks this).
Disparity values scale with the horizontal factor: output width / crop width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.errors import ConfigError, DataError


def sample_frame_indices(
    num_video_frames: int,
    video_fps: float,
    frames: int,
    target_fps: float,
    rng: np.random.Generator | None = None,
    name: str = "video",
    adapt_stride: bool = False,
) -> tuple[np.ndarray, float]:
    """`frames` indices at `target_fps`: stride = round(video_fps / target_fps), at least 1.

    rng None: start at frame 0 (evaluation); else a random start. adapt_stride: when the video is too
    short for the stride, use the largest stride that fits (training with a random fps; the returned
    fps is the one actually sampled). Returns (indices int64 [frames], sampling fps).
    """
    if frames < 1 or not target_fps > 0:
        raise ConfigError(f"need frames >= 1 and fps > 0, got frames={frames}, fps={target_fps}")
    stride = max(1, round(video_fps / target_fps))
    need = (frames - 1) * stride + 1
    if need > num_video_frames and adapt_stride and frames > 1:
        stride = (num_video_frames - 1) // (frames - 1)
        need = (frames - 1) * stride + 1
    if stride < 1 or need > num_video_frames:
        raise DataError(
            f"{name}: clip too short: {frames} frames at {target_fps:g} fps (stride {max(stride, 1)}) need "
            f"{(frames - 1) * max(stride, 1) + 1} frames, the video has {num_video_frames}"
        )
    start = 0 if rng is None else int(rng.integers(0, num_video_frames - need + 1))
    return start + stride * np.arange(frames, dtype=np.int64), video_fps / stride


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int


def _largest_box(H: int, W: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Largest (h, w) with the output's aspect ratio inside H x W (square output: side min(H, W))."""
    aspect = out_w / out_h
    h = min(H, W / aspect)
    return max(1, int(round(h))), max(1, min(W, int(round(h * aspect))))


def random_resized_crop_box(
    H: int, W: int, out_h: int, out_w: int, scale: tuple[float, float], rng: np.random.Generator
) -> CropBox:
    """The released crop: a random crop of the largest box with the output's aspect (a square of side
    min(H, W) for square buckets), then RandomResizedCrop inside it with area fraction in `scale` and
    the output's aspect ratio (ratio 1 for square buckets)."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {scale}")
    bh, bw = _largest_box(H, W, out_h, out_w)
    by, bx = int(rng.integers(0, H - bh + 1)), int(rng.integers(0, W - bw + 1))
    s = math.sqrt(rng.uniform(lo, hi))
    ch, cw = max(1, int(round(bh * s))), max(1, int(round(bw * s)))
    cy, cx = by + int(rng.integers(0, bh - ch + 1)), bx + int(rng.integers(0, bw - cw + 1))
    return CropBox(cy, cx, ch, cw)


def center_crop_box(H: int, W: int, out_h: int, out_w: int) -> CropBox:
    """Evaluation crop: the central largest box with the output's aspect (the shorter side resized to the
    output size, then a centre crop, as the paper's 512 centre crop)."""
    bh, bw = _largest_box(H, W, out_h, out_w)
    return CropBox((H - bh) // 2, (W - bw) // 2, bh, bw)


def resize_video(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float [T, C, h, w] -> [T, C, *size], antialiased bilinear (a no-op at the same size)."""
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    return F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_disparity(disparity: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[T, h, w] pixels -> [T, *size] pixels of the output: nearest resampling, values times out_w / w."""
    if tuple(disparity.shape[-2:]) == tuple(size):
        return disparity
    out = F.interpolate(disparity[:, None].float(), size=size, mode="nearest-exact")[:, 0]
    return out * (size[1] / disparity.shape[-1])


def crop_resize(
    left: np.ndarray, right: np.ndarray, disparity: np.ndarray | None, box: CropBox, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 [T, H, W, 3] views and disparity [T, H, W] (or None) -> float [T, 3, h, w] in [-1, 1] views
    and disparity [T, h, w] in output pixels, all cropped by `box` and resized to `size` = (h, w)."""
    views = _crop_resize_rgb(left, box, size), _crop_resize_rgb(right, box, size)
    if disparity is None:
        return (*views, None)
    d = torch.from_numpy(np.ascontiguousarray(disparity[:, box.top : box.top + box.height, box.left : box.left + box.width]))
    return (*views, resize_disparity(d.float(), size))


def crop_resize_warp(warped: np.ndarray, holes: np.ndarray, box: CropBox, size: tuple[int, int]):
    """A precomputed warp: uint8 [T, H, W, 3] and bool hole mask [T, H, W] -> float [T, 3, h, w] in
    [-1, 1] and bool [T, h, w] (a pixel is a hole when most of it was), cropped and resized as the views."""
    sl = (slice(None), slice(box.top, box.top + box.height), slice(box.left, box.left + box.width))
    m = torch.from_numpy(np.ascontiguousarray(holes[sl]))[:, None].float()  # [T, 1, H, W]
    return _crop_resize_rgb(warped, box, size), resize_video(m, size)[:, 0] > 0.5


def _crop_resize_rgb(frames: np.ndarray, box: CropBox, size: tuple[int, int]) -> torch.Tensor:
    x = frames[:, box.top : box.top + box.height, box.left : box.left + box.width]
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    return resize_video(x, size).div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)
