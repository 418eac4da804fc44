"""`m2s bench splat`: forward splatting time per 512x512 RGB frame on one thread.

Measured on a real disparity map (the Middlebury pair scikit-image ships, resized to 512^2) for one
frame and a 16-frame clip, against the plain per-pixel reference (`geometry.splat_reference`) timed in
the same run. The memory-bandwidth bound is the bytes the splat must touch over a measured copy rate.
The release's warp (`data.splat: released`, `geometry.released_splat`) is timed on the same frame.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data

from lightning_m2s.bench import best_time
from lightning_m2s.geometry import _released_torch, _splat_torch, forward_splat, released_splat, splat_reference

SIZE = 512


def _real_frame(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    left, _, disparity = data.stereo_motorcycle()
    image = torch.from_numpy(left).permute(2, 0, 1).float()[None] / 127.5 - 1  # [1, 3, H, W]
    disp = torch.from_numpy(np.where(np.isfinite(disparity), disparity, 0.0).astype(np.float32))[None, None]
    scale = size / image.shape[-1]
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)[0]
    disp = F.interpolate(disp, size=(size, size), mode="nearest")[0, 0] * scale  # values follow the width
    return image.contiguous(), disp.contiguous()


def _copy_bound_ms(image: torch.Tensor, disparity: torch.Tensor) -> float:
    """Time to read the inputs and write the outputs once (memcpy rate): the floor for any splat."""
    src = torch.cat([image.reshape(-1), disparity.reshape(-1), disparity.reshape(-1)])  # in + weights
    dst = torch.empty(image.numel() + disparity.numel() * 2)  # out + weights + holes
    return best_time(lambda: dst.copy_(src), repeats=20) * 1e3


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    image, disp = _real_frame(SIZE)
    clip_len = 4 if quick else 16
    clip = image.expand(clip_len, -1, -1, -1).contiguous()
    clip_disp = (disp[None] + torch.linspace(0, 2, clip_len)[:, None, None]).contiguous()
    forward_splat(image, disp)  # compile once
    released_splat(image, disp)

    frame_ms = best_time(lambda: forward_splat(image, disp), repeats=10) * 1e3
    clip_ms = best_time(lambda: forward_splat(clip, clip_disp), repeats=3) * 1e3 / clip_len
    torch_ms = best_time(lambda: _splat_torch(image, disp), repeats=3) * 1e3
    ref_rows = 16 if quick else 64  # the pure-Python reference is ~1000x slower: time a strip, scale up
    start = time.perf_counter()
    splat_reference(image[:, :ref_rows].numpy(), disp[:ref_rows].numpy())
    reference_ms = (time.perf_counter() - start) * 1e3 * SIZE / ref_rows
    bound_ms = _copy_bound_ms(image, disp)
    released_ms = best_time(lambda: released_splat(image, disp), repeats=10) * 1e3
    released_torch_ms = best_time(lambda: _released_torch(image, disp), repeats=3) * 1e3
    return {
        "size": SIZE,
        "threads": 1,
        "ms_per_frame_single": round(frame_ms, 3),
        "ms_per_frame_clip16": round(clip_ms, 3),
        "clip_frames": clip_len,
        "ms_per_frame_torch_vectorised": round(torch_ms, 3),
        "ms_per_frame_reference": round(reference_ms, 1),
        "speedup_vs_reference": round(reference_ms / frame_ms, 1),
        "memory_copy_floor_ms": round(bound_ms, 3),  # reading inputs + writing outputs once
        "ratio_to_memory_bound": round(frame_ms / bound_ms, 2),
        # data.splat: released (no depth test, a later write wins): another algorithm, its own figures
        "released": {"ms_per_frame_single": round(released_ms, 3),
                     "ms_per_frame_torch_vectorised": round(released_torch_ms, 3)},
    }
