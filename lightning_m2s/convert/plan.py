"""Plan: what one conversion does, resolved once from the video, the model and the options, then read by
every stage (so no stage re-derives a default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_m2s.convert.options import ConvertOptions
from lightning_m2s.convert.schedule import (
    Chunk, chunk_schedule, default_close_kernel, memory_tile, model_alignment, padded_size, tile_grid,
)
from lightning_m2s.data.video_io import VideoInfo


@dataclass(frozen=True)
class Plan:
    input: Path
    out: Path
    frames: int  # T
    height: int  # H
    width: int  # W
    padded: tuple[int, int]  # (hp, wp): H, W rounded up to the model's alignment
    device: torch.device
    steps: int  # refinement steps (1 = Eq. 4)
    fps: float  # the output's frame rate
    fps_id: float  # the model's fps conditioning
    max_disparity: float  # D_max in pixels
    close_kernel: int  # mask closing kernel (0 / 1: none)
    tile: int | None  # tile side in pixels; None = the whole frame
    tiles_per_chunk: int
    schedule: list[Chunk]
    opts: ConvertOptions


def make_plan(input: Path, out: Path, info: VideoInfo, model, eval_cfg: dict, device: torch.device,
              opts: ConvertOptions) -> Plan:
    """The plan for `model` (already on `device`: the free GPU memory left beside it picks the tile)."""
    T, H, W = info.num_frames, info.height, info.width
    fps = float(info.fps) if info.fps and np.isfinite(info.fps) and info.fps > 0 else 30.0
    hp, wp = padded_size(model, H, W)
    tile = opts.tile
    if tile is None and device.type == "cuda":  # the free memory is cheap to know there: tiles that fit it
        bytes_per_value = 4 if model.autocast_dtype is None and next(model.parameters()).dtype == torch.float32 else 2
        align, _ = model_alignment(model)
        tile = memory_tile(torch.cuda.mem_get_info(device)[0], opts.chunk_frames, hp, wp, align, bytes_per_value)
    _, _, _, ys, xs = tile_grid(model, hp, wp, tile, opts.tile_overlap)
    return Plan(
        input=input, out=out, frames=T, height=H, width=W, padded=(hp, wp), device=device,
        steps=int(opts.steps or eval_cfg.get("steps", 1)),
        fps=opts.fps or fps,
        fps_id=opts.fps_id if opts.fps_id is not None else fps,
        max_disparity=float(opts.max_disparity or max(1, int(0.05 * W))),
        close_kernel=opts.close_kernel if opts.close_kernel is not None else default_close_kernel(H, W),
        tile=tile, tiles_per_chunk=len(ys) * len(xs),
        schedule=chunk_schedule(T, opts.chunk_frames, opts.overlap_frames),
        opts=opts,
    )
