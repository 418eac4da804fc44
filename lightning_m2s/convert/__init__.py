"""`m2s convert`: a monocular video -> a stereo video (paper Sec. 4, App. C.1, App. E).

    depth (file or model) -> disparity (one normalisation per video, D_max, convergence)
      -> forward splat -> mask closing -> one-step refinement (temporal chunks x spatial tiles)
      -> export (sbs, half-sbs, top-bottom, half-top-bottom, anaglyph, right)

Long videos (App. E) run in autoregressive temporal chunks: the last `overlap_frames` generated right
frames enter the next chunk as known frames (their warped input is the generated frame and their mask
is empty, as `modules.base.replace_frames_with_truth` does in training); those frames are written
once the next chunk has predicted them too, cross-faded from the old to the new prediction, so a model
that does not reproduce its known frames exactly leaves a smaller seam. Every frame is written once, by
a chunk that saw it (`chunk_schedule`). A reader thread prepares the next chunks (decord reads by index,
the depth range, splat, closing) and a writer thread composes and encodes finished frames (a streaming
PyAV writer) while the model refines the current one; both queues are bounded, so host memory is
bounded by a few chunks, not the video. High resolution: every chunk is padded to the model's multiple,
split into overlapping tiles whose latents are blended with linear ramps over the overlap, then decoded
on the same tile grid (pixels blended with the same ramps) and cropped back. Outputs go to a temporary
file beside the target and are renamed into place only when complete; the input is only read.

The modules, in the order a conversion uses them:
    options   ConvertOptions: every setting, its default and why; validation
    schedule  temporal chunks, spatial tiles and ramps, padding, the tile that fits a GPU's memory
    plan      Plan: the settings resolved from the video, the model and the options
    warp      the read / warp stage (reader thread)
    refine    refine_latent / decode_latent and the model stage (main thread)
    writer    the atomic StreamWriter and the compose / write stage (writer thread)
    report    stage timings, boundary jumps, ConvertReport
    pipeline  convert(): checks, model loading, the stages wired with bounded queues

Python API:
    report = convert("in.mp4", "model.ckpt", "out.mp4", depth="depth.npz", options=ConvertOptions(format="anaglyph"))
    report.frames_per_second, dataclasses.asdict(report)
"""

from lightning_m2s.convert.options import MIN_SIDE, ConvertOptions
from lightning_m2s.convert.pipeline import convert
from lightning_m2s.convert.refine import decode_latent, refine_latent
from lightning_m2s.convert.report import ConvertReport, StageTimes, boundary_jumps
from lightning_m2s.convert.schedule import (
    BYTES_PER_FRAME_PIXEL, MEMORY_SHARE, Chunk, chunk_schedule, default_close_kernel, memory_tile, model_alignment,
    ramp, tile_grid, tile_starts,
)
from lightning_m2s.convert.writer import OUTPUT_SUFFIXES, StreamWriter, writable_folder

__all__ = [
    "BYTES_PER_FRAME_PIXEL", "MEMORY_SHARE", "MIN_SIDE", "OUTPUT_SUFFIXES", "Chunk", "ConvertOptions", "ConvertReport",
    "StageTimes", "StreamWriter", "boundary_jumps", "chunk_schedule", "convert", "decode_latent", "default_close_kernel",
    "memory_tile", "model_alignment", "ramp", "refine_latent", "tile_grid", "tile_starts", "writable_folder",
]
