"""Temporal sampling and the paired crop: disparity values follow the horizontal scale; warp and crop commute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_m2s.data.transforms import (
    CropBox,
    center_crop_box,
    crop_resize,
    random_resized_crop_box,
    resize_disparity,
    sample_frame_indices,
)
from lightning_m2s.errors import DataError
from lightning_m2s.geometry import forward_splat


def test_temporal_sampling_stride_start_and_fps():
    idx, fps = sample_frame_indices(150, 30.0, 16, 5.0)  # the paper's 16 frames at 5 fps
    np.testing.assert_array_equal(idx, np.arange(0, 91, 6))
    assert fps == 5.0
    idx, fps = sample_frame_indices(150, 30.0, 4, 60.0)  # faster than the video: stride 1
    np.testing.assert_array_equal(idx, [0, 1, 2, 3])
    starts = {int(sample_frame_indices(150, 24.0, 8, 8.0, np.random.default_rng(s))[0][0]) for s in range(40)}
    assert len(starts) > 10 and max(starts) <= 150 - 22  # random start, always in range
    a = sample_frame_indices(150, 24.0, 8, 8.0, np.random.default_rng(5))[0]
    np.testing.assert_array_equal(a, sample_frame_indices(150, 24.0, 8, 8.0, np.random.default_rng(5))[0])


def test_temporal_sampling_too_short_and_adaptive_stride():
    with pytest.raises(DataError, match="clip_x.*too short"):
        sample_frame_indices(40, 30.0, 16, 5.0, name="clip_x")
    idx, fps = sample_frame_indices(40, 30.0, 16, 5.0, adapt_stride=True)  # stride 6 -> 2
    np.testing.assert_array_equal(idx, np.arange(0, 31, 2))
    assert fps == 15.0
    with pytest.raises(DataError, match="too short"):
        sample_frame_indices(10, 30.0, 16, 5.0, adapt_stride=True)


def test_crop_boxes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = random_resized_crop_box(90, 160, 32, 32, (0.3, 1.0), rng)
        assert b.height == b.width  # ratio 1 for square buckets
        assert 0 <= b.top and b.top + b.height <= 90 and 0 <= b.left and b.left + b.width <= 160
        assert 0.3 * 90**2 * 0.95 <= b.height * b.width <= 90**2  # area fraction of the min(H, W) square
    wide = random_resized_crop_box(90, 160, 32, 64, (1.0, 1.0), rng)
    assert wide.width == 2 * wide.height == 160  # bucket aspect kept
    assert center_crop_box(90, 160, 64, 64) == CropBox(0, 35, 90, 90)


def _shifted_pair(H=48, W=96, d=2):
    """A smooth random image and its exact right view under constant disparity d (whole pixels)."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, H // 4, (W + d) // 4 + 1, generator=g), size=(H, W + d), mode="bilinear")[0]
    to_u8 = lambda x: (x * 255).round().byte().permute(1, 2, 0).numpy()  # noqa: E731
    left, right = to_u8(base[:, :, :W]), to_u8(base[:, :, d : d + W])  # right(x) = left(x + d)
    return left[None].repeat(2, 0), np.zeros_like(left[None].repeat(2, 0)), np.full((2, H, W), float(d), np.float32)


def test_crop_scales_disparity_values_by_horizontal_factor():
    left, right, disp = _shifted_pair()
    box = CropBox(4, 10, 24, 24)
    _, _, d = crop_resize(left, right, disp, box, (48, 48))  # 2x upscale
    assert torch.all(d == 4.0)
    _, _, d = crop_resize(left, right, disp, CropBox(0, 0, 48, 48), (24, 24))  # 2x downscale
    assert torch.all(d == 1.0)


def test_warp_of_crop_equals_crop_of_warp():
    left, right, disp = _shifted_pair(d=2)
    box, size = CropBox(8, 20, 32, 32), (64, 64)
    # a) crop and resize first, then warp with the rescaled disparity (what the pipeline does)
    l_crop, _, d_crop = crop_resize(left, right, disp, box, size)
    warp_of_crop, holes = forward_splat(l_crop, d_crop)
    # b) warp at full resolution, then crop and resize the warped view
    lt = torch.from_numpy(left).permute(0, 3, 1, 2).float() / 127.5 - 1
    warped_full, _ = forward_splat(lt, torch.from_numpy(disp))
    w_u8 = ((warped_full + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    crop_of_warp, _, _ = crop_resize(w_u8, w_u8, disp, box, size)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, 64 - 4 - 2))  # off the crop border and the hole strip
    assert not holes[:, 2:-2, 2 : 64 - 4 - 2].any()
    assert (warp_of_crop - crop_of_warp)[inner].abs().max() < 1e-4


def test_disparity_resize_keeps_depth_edges_sharp():
    # a foreground square (d=9) on a background (d=3), downscaled by a non-integer factor
    d = torch.full((1, 50, 50), 3.0)
    d[:, 15:35, 15:35] = 9.0
    out = resize_disparity(d, (32, 32))
    values = sorted(torch.unique(out).tolist())
    scale = 32 / 50
    # only the two surfaces' disparities (in output pixels): no flying pixels between them, which
    # bilinear or area resizing would make along the edge
    assert values == pytest.approx([3 * scale, 9 * scale])
