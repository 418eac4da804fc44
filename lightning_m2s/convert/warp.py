"""The read / warp stage (the reader thread's work): a chunk's frames and depth -> disparity (one
normalisation per video) -> forward splat -> mask closing, and the intermediate videos of its new frames."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lightning_m2s.convert.plan import Plan
from lightning_m2s.convert.report import StageTimes
from lightning_m2s.convert.schedule import Chunk
from lightning_m2s.convert.writer import StreamWriter, grey, to_uint8
from lightning_m2s.data.clip import to_float_video
from lightning_m2s.data.video_io import read_frames
from lightning_m2s.depth import DepthSource, estimate_depth, inverse_range, normalised_disparity, open_depth_file
from lightning_m2s.geometry import SPLATS, close_mask

INTERMEDIATES = ("depth", "warped", "mask")  # videos written to save_intermediates


class WarpedChunk(NamedTuple):
    """What the read / warp stage hands to the model stage for one chunk of t frames."""

    left_u8: np.ndarray  # uint8 [t, H, W, 3]: the input frames, as read
    left: torch.Tensor  # [t, 3, H, W] in [-1, 1]
    warped: torch.Tensor  # [t, 3, H, W] in [-1, 1], -1 (black) under the mask
    mask: torch.Tensor  # bool [t, H, W]: the closed disocclusion mask M


def open_depth(plan: Plan, depth: str | Path | None, depth_model: str | Path | None,
               stack: contextlib.ExitStack) -> tuple[DepthSource, tuple[float, float]]:
    """A depth file, or the depth model's windows written to a memory-mapped .npy (in the intermediates
    folder when given, else in a temporary folder that `stack` removes), checked against the video; and
    its inverse-depth range (a pass over the whole video: one normalisation per video)."""
    opts = plan.opts
    if depth_model is not None:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m2s-depth-")))
        target = (Path(opts.save_intermediates) if opts.save_intermediates else work) / "depth.npy"
        source = estimate_depth(
            plan.input, depth_model, target, window=opts.depth_window, overlap=opts.depth_overlap, progress=opts.progress,
        )
    else:
        source = open_depth_file(depth, opts.depth_kind)
    source.check_matches(plan.frames, plan.height, plan.width, plan.input)
    return source, inverse_range(source)


def open_intermediates(plan: Plan, stack: contextlib.ExitStack) -> dict[str, StreamWriter]:
    """The intermediate videos' writers ({} without save_intermediates), atomic like the output."""
    opts = plan.opts
    if not opts.save_intermediates:
        return {}
    folder = Path(opts.save_intermediates)
    return {name: stack.enter_context(StreamWriter(folder / f"{name}.mp4", plan.fps, opts.crf, opts.lossless))
            for name in INTERMEDIATES}


class WarpStage:
    """The reader thread's work on one chunk, ahead of the model."""

    def __init__(self, plan: Plan, source: DepthSource, value_range: tuple[float, float],
                 extras: dict[str, StreamWriter], times: StageTimes):
        self.plan, self.source, self.value_range, self.extras, self.times = plan, source, value_range, extras, times

    def __call__(self, chunk: Chunk) -> WarpedChunk:
        s, e, known, _ = chunk
        plan, times = self.plan, self.times
        with times("read"):
            left_u8 = read_frames(plan.input, range(s, e))  # [t, H, W, 3]
        with times("depth"):
            inv = torch.from_numpy(self.source.inverse(s, e))  # [t, H, W]
            disparity = normalised_disparity(inv, self.value_range, plan.max_disparity, plan.opts.convergence)
        with times("splat"):
            left = to_float_video(left_u8)  # [t, 3, H, W]
            warped, holes = SPLATS[plan.opts.splat](left, disparity)  # [t, 3, H, W], [t, H, W]
            mask = close_mask(holes, plan.close_kernel)
            warped = warped.masked_fill(mask[:, None], -1.0)  # black under M, as in training
        if self.extras:  # the known frames were written by the previous chunk
            self._write_intermediates(inv[known:], warped[known:], mask[known:])
        return WarpedChunk(left_u8, left, warped, mask)

    def _write_intermediates(self, inv: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> None:
        """inv [t, H, W] (shown in the video's range), warped [t, 3, H, W], mask bool [t, H, W]."""
        lo, hi = self.value_range
        with self.times("write"):
            self.extras["depth"].write(grey((inv - lo) / max(hi - lo, 1e-6)))
            self.extras["warped"].write(to_uint8(warped))
            self.extras["mask"].write(grey(mask.float()))
