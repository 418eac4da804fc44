"""The one sample type of the project: a stereo clip with its warped right view and disocclusion mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_m2s.geometry import SPLATS, close_mask


@dataclass
class StereoClip:
    """A stereo clip `[T, C, H, W]`, or a batch of them `[B, T, C, H, W]` after `collate_clips`.

    Images are float in [-1, 1]. `disparity` is in pixels of these images for the LEFT view (the
    disparity the warp used: ground truth or estimated). `holes` are the raw splat holes; `mask` is
    the disocclusion mask M (holes closed with the configured kernel) that the model and the
    inside/outside metrics use. Warped pixels under `mask` are -1 (black), as the released code does.
    `meta` is a dict per clip (a list of dicts for a batch). A dataclass, so Lightning's
    `move_data_to_device` / `apply_to_collection` moves every tensor field and keeps `meta`.
    """

    left: torch.Tensor  # [T, 3, H, W] float in [-1, 1]
    right: torch.Tensor  # [T, 3, H, W] ground-truth right view
    warped: torch.Tensor  # [T, 3, H, W] left splatted to the right view, -1 under `mask`
    disparity: torch.Tensor  # [T, 1, H, W] float pixels, left view (NaN: unknown, e.g. a precomputed warp's)
    holes: torch.Tensor  # [T, 1, H, W] bool, raw splat holes
    mask: torch.Tensor  # [T, 1, H, W] bool, holes closed (disocclusion mask M)
    meta: Any = field(default_factory=dict)  # dict (one clip) or list of dicts (batch)

    @property
    def num_frames(self) -> int:
        return self.left.shape[-4]


def to_float_video(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> float `[T, 3, H, W]` in [-1, 1]."""
    x = torch.as_tensor(frames)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def make_clip(
    left: torch.Tensor,
    right: torch.Tensor,
    disparity: torch.Tensor | None,
    meta: dict | None = None,
    close_kernel: int = 11,
    warp: tuple[torch.Tensor, torch.Tensor] | None = None,
    splat: str = "nearest",
) -> StereoClip:
    """Warp `left` with `disparity` and build the sample.

    left, right: float `[T, 3, H, W]` in [-1, 1]; disparity: float `[T, H, W]` pixels of these images,
    NaN where a source has none (Stereo4D's flow outliers): those pixels land nowhere, so what they
    would have covered is a hole. Warping happens here, in the pipeline, so ground-truth and estimated
    disparity go through the same code; `splat` names the algorithm (geometry.SPLATS).
    warp: a precomputed (warped float [T, 3, H, W], holes bool [T, H, W]) instead (the M2SVid release's
    offline warps); the disparity is then unknown and NaN.
    """
    if warp is None:
        warped, holes = SPLATS[splat](left, _landing_nowhere(disparity))  # [T, 3, H, W], [T, H, W]
    else:
        warped, holes = warp
        disparity = torch.full(holes.shape, float("nan"))
    mask = close_mask(holes, close_kernel)  # [T, H, W]
    warped = warped.masked_fill(mask[:, None], -1.0)  # black under M, as the released code
    return StereoClip(
        left=left,
        right=right,
        warped=warped,
        disparity=disparity[:, None].float(),
        holes=holes[:, None],
        mask=mask[:, None],
        meta=dict(meta or {}),
    )


def _landing_nowhere(disparity: torch.Tensor) -> torch.Tensor:
    """Disparity whose NaN pixels are sent two columns left of the frame (x - d = -2), where neither tap of
    any splat lands: they write nothing."""
    unknown = torch.isnan(disparity)
    if not unknown.any():
        return disparity
    x = torch.arange(disparity.shape[-1], dtype=disparity.dtype, device=disparity.device)
    return torch.where(unknown, x + 2, disparity)


def collate_clips(clips: list[StereoClip]) -> StereoClip:
    """Stack clips of one shape into a batch: tensors `[B, T, C, H, W]`, meta a list of dicts."""
    shapes = {tuple(c.left.shape) for c in clips}
    if len(shapes) != 1:
        raise ValueError(f"collate_clips needs clips of one shape (a bucket batch), got {sorted(shapes)}")
    stack = lambda name: torch.stack([getattr(c, name) for c in clips])  # noqa: E731
    return StereoClip(
        left=stack("left"),
        right=stack("right"),
        warped=stack("warped"),
        disparity=stack("disparity"),
        holes=stack("holes"),
        mask=stack("mask"),
        meta=[c.meta for c in clips],
    )
