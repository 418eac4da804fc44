"""What a conversion reports: the stage timings (summed over the threads that run them), the brightness
jumps at chunk hand-overs, and the ConvertReport built from them."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from lightning_m2s.convert.plan import Plan

MODEL_STAGES = ("encode", "unet", "decode")  # the rest (read, depth, splat, write) runs beside the model


class StageTimes:
    """Seconds per stage of a conversion, summed over the threads that run them: `with times("unet"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - start


def boundary_jumps(means: np.ndarray, boundaries: list[tuple[int, int]]) -> dict[str, float]:
    """Brightness / colour jumps at chunk hand-overs.

    means: the per-frame mean colour [T, 3]; boundaries: (first, last) frame of each hand-over region (a
    chunk's known frames and its first new frame). The step between frames i-1 and i is the mean over
    channels of |means[i] - means[i-1]|; "boundary" is the mean over hand-overs of the largest step in
    each region, "within" the mean step everywhere else. Compare both with the input video's values
    (its own motion): a seam shows up as a boundary value well above the input's."""
    if len(means) < 2:
        return {"boundary": 0.0, "within": 0.0}
    steps = np.abs(np.diff(means, axis=0)).mean(axis=1)  # steps[i - 1] = frame i-1 -> i
    region = np.zeros(len(steps), dtype=bool)
    peaks = []
    for first, last in boundaries:
        idx = [i - 1 for i in range(max(first, 1), min(last, len(means) - 1) + 1)]
        if idx:
            region[idx] = True
            peaks.append(steps[idx].max())
    return {
        "boundary": float(np.mean(peaks)) if peaks else 0.0,
        "within": float(steps[~region].mean()) if (~region).any() else 0.0,
    }


@dataclass(frozen=True)
class ConvertReport:
    """The result of `convert`; `dataclasses.asdict` gives the JSON the benchmarks print."""

    output: str
    frames: int
    height: int
    width: int
    format: str
    padded: list[int]  # [hp, wp]
    chunks: int
    chunk_frames: int  # frames per chunk (the video's length if shorter)
    tiles_per_chunk: int
    max_disparity: float
    close_kernel: int
    steps: int
    seconds: float  # wall time, loading the model included
    frames_per_second: float
    boundary_jump: float  # boundary_jumps of the output's right view ...
    within_chunk_jump: float
    input_boundary_jump: float  # ... and of the input (its own motion) on the same frames
    input_within_jump: float
    # seconds per frame of each stage (read, depth, splat = splat + closing, encode, unet, decode,
    # write = compose + encode the video), and the share of the wall time outside the model
    stage_seconds_per_frame: dict[str, float]
    non_model_fraction: float


def make_report(plan: Plan, times: StageTimes, right_means: list[np.ndarray], left_means: list[np.ndarray],
                start_time: float, convert_start: float) -> ConvertReport:
    """The report of a finished conversion. right_means, left_means: the per-frame mean colours, [t, 3] per
    written chunk; start_time: when `convert` was called; convert_start: when the conversion proper began."""
    T, schedule = plan.frames, plan.schedule
    seconds = time.perf_counter() - start_time
    convert_seconds = time.perf_counter() - convert_start
    model_seconds = sum(times.seconds[k] for k in MODEL_STAGES)
    boundaries = [(c.start, c.start + c.known) for c in schedule[1:]]  # the frames where chunks hand over
    right_jump = boundary_jumps(np.concatenate(right_means), boundaries)
    left_jump = boundary_jumps(np.concatenate(left_means), boundaries)
    return ConvertReport(
        output=str(plan.out),
        frames=T,
        height=plan.height,
        width=plan.width,
        format=plan.opts.format,
        padded=list(plan.padded),
        chunks=len(schedule),
        chunk_frames=max(c.stop - c.start for c in schedule),
        tiles_per_chunk=plan.tiles_per_chunk,
        max_disparity=plan.max_disparity,
        close_kernel=plan.close_kernel,
        steps=plan.steps,
        seconds=seconds,
        frames_per_second=T / seconds,
        boundary_jump=right_jump["boundary"],
        within_chunk_jump=right_jump["within"],
        input_boundary_jump=left_jump["boundary"],
        input_within_jump=left_jump["within"],
        stage_seconds_per_frame={k: v / T for k, v in sorted(times.seconds.items())},
        non_model_fraction=max(0.0, 1 - model_seconds / convert_seconds),
    )
