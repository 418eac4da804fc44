"""Floors for every table: Evaluators that only predict, scored through the same data and metrics as the
model (Table 6 layout).

- warp-only: the warped right view with its holes left as they are (black);
- classical fill: each hole pixel takes the colour of the nearest known pixel to its right in the row.
  Disocclusions in the right view open on the right of a foreground edge (the foreground moves left
  more than the background), so the right-hand neighbour is background: background-side fill.
"""

from __future__ import annotations

import torch

from lightning_m2s.modules.base import Evaluator


def background_side_fill(warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """warped [..., C, H, W], mask bool [..., 1, H, W] -> holes filled from the right along each row."""
    W = warped.shape[-1]
    known = ~mask.expand_as(warped)
    cols = torch.arange(W, device=warped.device).expand_as(warped)
    # index of the nearest known column at or to the right of each pixel (W if none)
    candidate = torch.where(known, cols, torch.full_like(cols, W))
    nearest = candidate.flip(-1).cummin(-1).values.flip(-1)
    # rows with no known pixel to the right fall back to the nearest known pixel on the left
    left_candidate = torch.where(known, cols, torch.full_like(cols, -1))
    nearest_left = left_candidate.cummax(-1).values
    source = torch.where(nearest < W, nearest, nearest_left).clamp(0, W - 1)
    filled = warped.gather(-1, source)
    return torch.where(known, warped, filled)


class WarpOnlyModule(Evaluator):
    def predict_video(self, batch, seed: int = 0, steps: int | None = None):
        return batch.warped


class ClassicalFillModule(Evaluator):
    def predict_video(self, batch, seed: int = 0, steps: int | None = None):
        return background_side_fill(batch.warped, batch.mask)
