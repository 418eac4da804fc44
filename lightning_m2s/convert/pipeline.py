"""`convert()`: check the inputs, load the model, plan, then wire the stages:

    reader thread  WarpStage     read, depth -> disparity, splat, closing, intermediates   (warp.py)
    main thread    RefineStage   known frames, refine, decode, cross-fade                 (refine.py)
    writer thread  WriteStage    compose, encode, per-frame means                         (writer.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from lightning_m2s.convert.options import MIN_SIDE, ConvertOptions
from lightning_m2s.convert.plan import make_plan
from lightning_m2s.convert.refine import RefineStage
from lightning_m2s.convert.report import ConvertReport, StageTimes, make_report
from lightning_m2s.convert.schedule import Chunk
from lightning_m2s.convert.warp import WarpStage, open_depth, open_intermediates
from lightning_m2s.convert.writer import OUTPUT_SUFFIXES, StreamWriter, WriteStage, writable_folder
from lightning_m2s.data.video_io import VideoInfo, remove_stale_partials, video_info
from lightning_m2s.errors import ConfigError, DataError

QUEUE_CHUNKS = 2  # chunks prepared ahead of the model / waiting to be written


def _check_inputs(input: Path, out: Path, depth, depth_model, opts: ConvertOptions) -> VideoInfo:
    """The input video's info, after every check that needs no model (so a mistake costs no model load)."""
    info = video_info(input)  # DataError naming the file if missing or unreadable
    H, W = info.height, info.width
    if min(H, W) < MIN_SIDE:
        raise DataError(f"video {input} frames are {H}x{W}; m2s convert needs at least {MIN_SIDE} pixels per side")
    if out.exists() and out.resolve() == input.resolve():
        raise ConfigError(f"output {out} is the input video; the input is never overwritten")
    if depth is not None and out.exists() and out.resolve() == Path(depth).resolve():
        raise ConfigError(f"output {out} is the depth file; the inputs are never overwritten")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"output {out}: unsupported extension; use one of {sorted(OUTPUT_SUFFIXES)}")
    for folder in [out.parent] + ([Path(opts.save_intermediates)] if opts.save_intermediates else []):
        writable_folder(folder)  # before the model and depth passes, not after them
    remove_stale_partials(out)  # what a convert killed with -9 left beside this output
    if (depth is None) == (depth_model is None):
        raise ConfigError("give exactly one depth provider: a depth file (--depth FILE) or a model (--depth-model DIR)")
    return info


def _load_model(checkpoint, model, opts: ConvertOptions, device: torch.device):
    """(the refiner on `device` in eval mode, its eval settings): `model` as given (one step), else a model
    directory (m2s import-release, run as released) or a training checkpoint."""
    if model is None and Path(checkpoint).is_dir():
        from lightning_m2s.models.released import load_model_dir

        model, eval_cfg = load_model_dir(checkpoint)
    elif model is None:
        from lightning_m2s.modules import load_refiner

        model, eval_cfg = load_refiner(str(checkpoint))  # ModelError naming the file
    else:
        eval_cfg = {"steps": 1}
    if opts.dtype is not None:  # autocast around the model's calls (bf16 / fp16 on GPUs)
        from lightning_m2s.models.refiner import AUTOCAST_DTYPES

        model.autocast_dtype = AUTOCAST_DTYPES[opts.dtype]
    return model.to(device).eval(), eval_cfg


def _run_chunks(schedule: list[Chunk], warp: WarpStage, refine: RefineStage, write: WriteStage,
                stack: contextlib.ExitStack) -> None:
    """A reader thread prepares the next chunks and a writer thread composes and encodes finished frames
    while the model refines the current chunk; both queues are bounded (QUEUE_CHUNKS), so host memory is
    bounded by a few chunks, not the video."""
    reader, encoder = ThreadPoolExecutor(1, "m2s-read"), ThreadPoolExecutor(1, "m2s-write")
    for pool in (encoder, reader):  # on an error: stop both before the writers are aborted
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    prepared = deque(reader.submit(warp, c) for c in schedule[:QUEUE_CHUNKS])
    written: deque[Future] = deque()
    for index, chunk in enumerate(schedule):
        frames = prepared.popleft().result()
        if index + QUEUE_CHUNKS < len(schedule):
            prepared.append(reader.submit(warp, schedule[index + QUEUE_CHUNKS]))
        right = refine(index, chunk, frames)  # [written - start, 3, H, W]
        written.append(encoder.submit(write, frames.left_u8[: len(right)], right))
        while len(written) > QUEUE_CHUNKS:
            written.popleft().result()
    for future in written:
        future.result()


def convert(
    input: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    depth: str | Path | None = None,
    depth_model: str | Path | None = None,
    options: ConvertOptions | None = None,
    model=None,
    **overrides,
) -> ConvertReport:
    """Convert `input` to a stereo video at `out`; returns a report (frames, chunks, timing, boundary jumps).

    depth: a depth file (lightning_m2s.depth); depth_model: a transformers depth-estimation directory;
    exactly one. `model` (a StereoRefiner) skips loading `checkpoint`. `overrides` set ConvertOptions fields.
    """
    from tqdm.auto import tqdm

    opts = dataclasses.replace(options or ConvertOptions(), **overrides)
    opts.validate()
    start_time = time.perf_counter()
    input, out = Path(input), Path(out)
    info = _check_inputs(input, out, depth, depth_model, opts)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, eval_cfg = _load_model(checkpoint, model, opts, device)
    plan = make_plan(input, out, info, model, eval_cfg, device, opts)
    times = StageTimes()
    convert_start = time.perf_counter()  # the conversion proper, after loading the model

    with contextlib.ExitStack() as stack:  # on an error: threads stopped, partial outputs removed
        source, value_range = open_depth(plan, depth, depth_model, stack)
        writer = stack.enter_context(StreamWriter(out, plan.fps, opts.crf, opts.lossless))
        extras = open_intermediates(plan, stack)
        bar = stack.enter_context(tqdm(total=plan.frames, desc="convert", unit="frame", disable=not opts.progress))
        write = WriteStage(writer, opts.format, times, bar)
        _run_chunks(plan.schedule, WarpStage(plan, source, value_range, extras, times), RefineStage(plan, model, times),
                    write, stack)
        if writer.frames != plan.frames:
            raise DataError(f"video {input}: wrote {writer.frames} frames but the video has {plan.frames}")
        for extra in extras.values():
            extra.commit()
        writer.commit()
    return make_report(plan, times, write.right_means, write.left_means, start_time, convert_start)
