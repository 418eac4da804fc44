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

Python API:
    report = convert("in.mp4", "model.ckpt", "out.mp4", depth="depth.npz", options=ConvertOptions(format="anaglyph"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import tempfile
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.data.clip import to_float_video
from lightning_m2s.data.video_io import read_frames, remove_stale_partials, video_info
from lightning_m2s.depth import (
    DEPTH_KINDS, DEPTH_OVERLAP, DEPTH_WINDOW, DepthSource, estimate_depth, inverse_range, normalised_disparity,
    open_depth_file,
)
from lightning_m2s.errors import ConfigError, DataError
from lightning_m2s.geometry import SPLATS, close_mask
from lightning_m2s.stereo_formats import FORMATS, compose

OUTPUT_SUFFIXES = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov"}
MIN_SIDE = 16  # smallest frame side converted: two latent cells of an 8x VAE
MIN_FPS, MAX_FPS = 0.1, 1000.0  # frame rates a video container can carry sensibly
PAPER_CLOSE_KERNEL, PAPER_SIZE = 11, 512  # mask closing of the paper at 512 px (App. C.1)
QUEUE_CHUNKS = 2  # chunks prepared ahead of the model / waiting to be written
MODEL_STAGES = ("encode", "unet", "decode")  # the rest (read, depth, splat, write) runs beside the model


@dataclass
class ConvertOptions:
    """Every setting of a conversion, its default, and why."""

    format: str = "sbs"  # one of stereo_formats.FORMATS
    max_disparity: float | None = None  # D_max in pixels; None = int(0.05 * width) (released code)
    convergence: float = 0.0  # zero-parallax plane as a fraction of D_max (0 = everything behind the screen)
    depth_kind: str = "auto"  # what a depth file holds: depth | inverse | auto (see lightning_m2s.depth)
    depth_window: int = DEPTH_WINDOW  # depth-model temporal windows (DepthCrafter's 110 / 25, App. C.1)
    depth_overlap: int = DEPTH_OVERLAP
    close_kernel: int | None = None  # mask closing; None = 11 at 512 px scaled with the shorter side, odd
    splat: str = "nearest"  # the warp (geometry.SPLATS): nearest (depth-tested) | released; as the model was trained
    steps: int | None = None  # refinement steps; None = the checkpoint's eval.steps (1 = Eq. 4)
    chunk_frames: int = 16  # frames per refinement chunk (the paper trains 4 x 512^2 ... 25 x 192^2)
    overlap_frames: int = 4  # generated frames fed into the next chunk as known frames (App. E's m)
    blend_overlap: bool = True  # cross-fade the known frames from the last chunk's output to the new chunk's
    tile: int | None = None  # tile side in pixels (a multiple of the model's alignment); None = whole frame
    # on a CPU, on a GPU what fits its free memory (memory_tile)
    tile_overlap: int | None = None  # tile overlap in pixels, blended in latent space (linear ramps); None = tile / 4
    fps: float | None = None  # output frame rate; None = the input's
    fps_id: float | None = None  # the model's fps conditioning; None = the input's fps (released inference)
    decode_chunk_size: int = 8  # frames per VAE decoder call
    dtype: str | None = None  # autocast dtype of the model's calls: bfloat16 | float16 | float32; None = the model's
    device: str | None = None  # None = cuda when available, else cpu
    seed: int = 0  # noise augmentation of the condition (cond_aug) per chunk
    crf: int = 18  # H.264 quality (18 = visually lossless)
    lossless: bool = False  # RGB H.264 at crf 0 (bit-exact pixels; large files)
    save_intermediates: str | None = None  # folder for depth.mp4, warped.mp4, mask.mp4 (+ depth.npy from a model)
    progress: bool = True  # a tqdm bar over frames

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r}: choose from {', '.join(FORMATS)}")
        if self.splat not in SPLATS:
            raise ConfigError(f"splat {self.splat!r}: choose from {', '.join(SPLATS)}")
        if self.depth_kind not in DEPTH_KINDS:
            raise ConfigError(f"depth kind {self.depth_kind!r}: choose from {DEPTH_KINDS}")
        if self.max_disparity is not None and not self.max_disparity > 0:
            raise ConfigError(f"max_disparity must be > 0 pixels, got {self.max_disparity}")
        if not 0.0 <= self.convergence <= 1.0:
            raise ConfigError(f"convergence must be in [0, 1], got {self.convergence}")
        if self.chunk_frames < 1 or not 0 <= self.overlap_frames < self.chunk_frames:
            raise ConfigError(
                f"chunk_frames {self.chunk_frames} / overlap_frames {self.overlap_frames}: "
                "need chunk_frames >= 1 and 0 <= overlap_frames < chunk_frames"
            )
        if self.tile is not None and (self.tile < MIN_SIDE or not 0 <= (self.tile_overlap or 0) < self.tile):
            raise ConfigError(
                f"tile {self.tile} / tile_overlap {self.tile_overlap}: need tile >= {MIN_SIDE} and 0 <= overlap < tile"
            )
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.close_kernel is not None and (self.close_kernel < 0 or (self.close_kernel > 1 and self.close_kernel % 2 == 0)):
            raise ConfigError(f"close_kernel must be odd (or 0/1 for none), got {self.close_kernel}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype {self.dtype!r}: choose from float32, bfloat16, float16")
        if self.decode_chunk_size < 1:
            raise ConfigError(f"decode_chunk_size must be >= 1, got {self.decode_chunk_size}")
        for name in ("fps", "fps_id"):
            value = getattr(self, name)
            if value is not None and not MIN_FPS <= value <= MAX_FPS:
                raise ConfigError(f"{name} must be between {MIN_FPS} and {MAX_FPS} frames per second, got {value}")


# --- schedules --------------------------------------------------------------------------------------
class Chunk(NamedTuple):
    start: int  # first frame of the chunk
    stop: int  # one past its last frame
    known: int  # leading frames already generated by the previous chunk (fed in as known frames)
    written: int  # one past the last frame written once this chunk is done (the next chunk's start)


def chunk_schedule(num_frames: int, chunk_frames: int, overlap_frames: int) -> list[Chunk]:
    """Autoregressive chunks covering [0, num_frames): every chunk has chunk_frames frames (the video's
    length if shorter); chunk k > 0 starts overlap_frames before the previous one ended, except the last,
    which is moved back to stay full length and so gets more known frames. Chunk k writes the frames
    [start, written) = [start_k, start_k+1): each frame once, by a chunk that saw it; the frames
    [written, stop) are held back as the next chunk's known frames."""
    if chunk_frames < 1 or not 0 <= overlap_frames < chunk_frames:
        raise ConfigError(f"chunk_frames {chunk_frames} / overlap_frames {overlap_frames}: need 0 <= overlap < chunk")
    spans: list[tuple[int, int]] = []
    done = 0
    while done < num_frames:
        start = 0 if not spans else max(0, min(done - overlap_frames, num_frames - chunk_frames))
        spans.append((start, min(start + chunk_frames, num_frames)))
        done = spans[-1][1]
    starts = [start for start, _ in spans[1:]] + [num_frames]
    known = [0] + [prev_stop - start for (_, prev_stop), (start, _) in zip(spans, spans[1:])]
    return [Chunk(start, stop, k, written) for (start, stop), k, written in zip(spans, known, starts)]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length `tile` covering [0, size) with at least `overlap` between neighbours."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def ramp(length: int, width: int, rise: bool, fall: bool) -> torch.Tensor:
    """Blend weights along one tile axis: 1 inside, linear ramps of `width` cells at the sides that
    border another tile (rise at the start, fall at the end), never 0."""
    w = torch.ones(length)
    if width > 0:
        r = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1)
        n = min(width, length)
        if rise:
            w[:n] = torch.minimum(w[:n], r[:n])
        if fall:
            w[length - n :] = torch.minimum(w[length - n :], r[:n].flip(0))
    return w


def default_close_kernel(height: int, width: int) -> int:
    """The paper's 11 at 512 px, scaled with the shorter side and made odd (3 at 128 px, 23 at 1080p)."""
    k = max(1, int(round(PAPER_CLOSE_KERNEL * min(height, width) / PAPER_SIZE)))
    return k if k % 2 else k + 1


def model_alignment(model) -> tuple[int, int]:
    """(pixels, latent cells) a padded frame must be a multiple of: the VAE's downscale times the UNet's
    total downsampling (4 x 2 = 8 px for the tiny default, 8 x 8 = 64 px for img2vid-xt)."""
    down = int(model.vae.downscale)
    levels = 2 ** (len(model.unet.config.block_out_channels) - 1)
    return down * levels, levels


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# GPU memory one chunk of a conversion may take, per frame-pixel at 16 bits: the authors' own figure (24.8 GB
# peak for 24 frames of 512^2 in fp16, img2vid-xt's width) as an upper bound; chunked decoding needs less.
BYTES_PER_FRAME_PIXEL = 24.8e9 / (24 * 512 * 512)
MEMORY_SHARE = 0.8  # of the free GPU memory, the rest for the allocator's fragmentation and other processes


def memory_tile(free_bytes: int, chunk_frames: int, height: int, width: int, align: int, bytes_per_value: int = 2) -> int | None:
    """The tile side that keeps one chunk within MEMORY_SHARE of `free_bytes` (None: the whole frame fits),
    a multiple of `align`, never below MIN_SIDE. fp32 (`bytes_per_value` 4) takes twice fp16's memory."""
    budget = MEMORY_SHARE * free_bytes / (BYTES_PER_FRAME_PIXEL * bytes_per_value / 2)  # frame-pixels
    if chunk_frames * height * width <= budget:
        return None
    return max(MIN_SIDE, int((budget / chunk_frames) ** 0.5) // align * align)


def tile_grid(model, H: int, W: int, tile: int | None, tile_overlap: int | None = None):
    """(tile height, tile width, overlap, row starts, column starts) in pixels of a padded frame H x W:
    tiles are a multiple of the model's alignment, the overlap a multiple of the VAE's downscale."""
    align, _ = model_alignment(model)
    down = int(model.vae.downscale)
    if H % align or W % align:
        raise ConfigError(f"frame {H}x{W} is not padded to a multiple of {align}")
    tile_px = _round_up(tile, align) if tile else max(H, W)
    th, tw = min(tile_px, H), min(tile_px, W)
    if tile_overlap is None:
        tile_overlap = tile_px // 4 if tile else 0
    ov = min(_round_up(tile_overlap, down), tile_px - down) if tile else 0
    return th, tw, ov, tile_starts(H, th, ov), tile_starts(W, tw, ov)


# --- refinement of one chunk ------------------------------------------------------------------------
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


@torch.no_grad()
def refine_latent(
    model,
    left: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int = 1,
    fps_id: float = 5.0,
    tile: int | None = None,
    tile_overlap: int | None = None,
    seed: int = 0,
    times: StageTimes | None = None,
) -> torch.Tensor:
    """The right view's latent of one padded chunk, tile by tile, blended in latent space.

    left, warped: [T, 3, H, W] in [-1, 1] with H, W multiples of `model_alignment(model)[0]`; mask bool
    [T, H, W]. Returns [1, T, c, H/d, W/d]. One tile (tile None or >= the frame) is plain inference.
    """
    T, _, H, W = left.shape
    times = times or StageTimes()
    down = int(model.vae.downscale)
    th, tw, ov, ys, xs = tile_grid(model, H, W, tile, tile_overlap)
    h, w = H // down, W // down
    acc = torch.zeros(1, T, model.vae.latent_channels, h, w, device=left.device)
    wsum = torch.zeros(1, 1, 1, h, w, device=left.device)
    for y in ys:
        for x in xs:
            sl = (slice(None), slice(None), slice(y, y + th), slice(x, x + tw))
            generator = torch.Generator().manual_seed(seed)  # each tile draws the same (tile-local) noise
            with times("encode"):  # the VAE encodings of both views and the frame embedding
                cond = model.build_conditioning(
                    left[sl][None], warped[sl][None], mask[:, y : y + th, x : x + tw][None, :, None],
                    fps_id=fps_id, cond_aug=model.cond_aug_eval, generator=generator,
                )
            with times("unet"):
                z = model.generate(cond, steps, generator)  # [1, T, c, th/d, tw/d]
            wy = ramp(th // down, ov // down, rise=y > 0, fall=y + th < H).to(z)
            wx = ramp(tw // down, ov // down, rise=x > 0, fall=x + tw < W).to(z)
            weight = (wy[:, None] * wx[None, :])[None, None, None]  # [1, 1, 1, th/d, tw/d]
            ly, lx = y // down, x // down
            acc[..., ly : ly + th // down, lx : lx + tw // down] += z * weight
            wsum[..., ly : ly + th // down, lx : lx + tw // down] += weight
    return acc / wsum


@torch.no_grad()
def decode_latent(model, latent: torch.Tensor, tile: int | None = None, tile_overlap: int | None = None,
                  decode_chunk_size: int | None = None) -> torch.Tensor:
    """[1, T, c, h, w] -> [T, 3, H, W] in [-1, 1]. With tiles, the blended latent is decoded window by
    window on the same tile grid and the pixels blended with linear ramps, so the VAE's attention spans a
    tile rather than the frame (a 2x VAE's mid-block attends over every cell: quadratic in the frame)."""
    down = int(model.vae.downscale)
    H, W = latent.shape[-2] * down, latent.shape[-1] * down
    th, tw, ov, ys, xs = tile_grid(model, H, W, tile, tile_overlap)
    if len(ys) * len(xs) == 1:
        return model.decode(latent, decode_chunk_size)[0].clamp(-1, 1)
    acc = torch.zeros(latent.shape[1], 3, H, W)
    wsum = torch.zeros(1, 1, H, W)
    for y in ys:
        for x in xs:
            z = latent[..., y // down : (y + th) // down, x // down : (x + tw) // down]
            video = model.decode(z, decode_chunk_size)[0].clamp(-1, 1).float().cpu()  # [T, 3, th, tw]
            weight = ramp(th, ov, rise=y > 0, fall=y + th < H)[:, None] * ramp(tw, ov, rise=x > 0, fall=x + tw < W)[None, :]
            acc[..., y : y + th, x : x + tw] += video * weight
            wsum[..., y : y + th, x : x + tw] += weight
    return acc / wsum


def _pad(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """Replicate-pad the last two axes at the bottom / right to (hp, wp)."""
    H, W = x.shape[-2:]
    if (H, W) == (hp, wp):
        return x
    lead = x.shape[:-2]
    y = F.pad(x.reshape(-1, 1, H, W).float(), (0, wp - W, 0, hp - H), mode="replicate")
    return y.reshape(*lead, hp, wp).to(x.dtype)


# --- streaming, atomic output -----------------------------------------------------------------------
class StreamWriter:
    """Frames in, an H.264 video out, written to a temporary file beside `path` and renamed into place by
    `commit()` (atomic on one file system); `abort()` (or an exception in a `with` block) removes it."""

    def __init__(self, path: str | Path, fps: float, crf: int = 18, lossless: bool = False):
        import av

        self.path = Path(path)
        fmt = OUTPUT_SUFFIXES.get(self.path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"output {self.path}: unsupported extension; use one of {sorted(OUTPUT_SUFFIXES)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}", dir=self.path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while writing: a later convert removes only partials nobody holds
        self._lock_fd, self.tmp = fd, Path(tmp)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.crf, self.lossless = crf, lossless
        self.container = av.open(str(self.tmp), mode="w", format=fmt)
        self.stream = None
        self.frames = 0

    def _open_stream(self, height: int, width: int) -> None:
        if self.lossless:
            self.stream = self.container.add_stream("libx264rgb", rate=self.rate)
            self.stream.pix_fmt, self.stream.options = "rgb24", {"crf": "0", "preset": "ultrafast"}
        else:  # 4:2:0 needs even sizes; odd sizes keep full chroma
            self.stream = self.container.add_stream("libx264", rate=self.rate)
            self.stream.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
            self.stream.options = {"crf": str(self.crf), "preset": "medium"}
        self.stream.height, self.stream.width = height, width

    def write(self, frames: np.ndarray) -> None:
        """uint8 [T, H, W, 3]."""
        import av

        if self.stream is None:
            self._open_stream(*frames.shape[1:3])
        for frame in frames:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)
        self.frames += len(frames)

    def commit(self) -> Path:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp made it private; a finished video gets the usual mode
        os.replace(self.tmp, self.path)
        os.close(self._lock_fd)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()
        self.tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _grey(x: torch.Tensor) -> np.ndarray:
    """[T, H, W] in [0, 1] -> uint8 [T, H, W, 3]."""
    g = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(g[..., None], 3, axis=-1)


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


# --- the conversion ---------------------------------------------------------------------------------
def writable_folder(folder: Path) -> None:
    """Create `folder` if needed and check that files can be created in it (ConfigError naming it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"output folder {folder} is not writable ({err.strerror}); choose another --out") from err


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
) -> dict:
    """Convert `input` to a stereo video at `out`; returns a report (frames, chunks, timing, boundary jumps).

    depth: a depth file (lightning_m2s.depth); depth_model: a transformers depth-estimation directory;
    exactly one. `model` (a StereoRefiner) skips loading `checkpoint`. `overrides` set ConvertOptions fields.
    """
    opts = dataclasses.replace(options or ConvertOptions(), **overrides)
    opts.validate()
    start_time = time.perf_counter()
    input, out = Path(input), Path(out)

    # 1. Inputs: the video, the output path, the depth source, the model
    info = video_info(input)  # DataError naming the file if missing or unreadable
    T, H, W = info.num_frames, info.height, info.width
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
    if model is None and Path(checkpoint).is_dir():  # a model directory (m2s import-release), run as released
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
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    steps = int(opts.steps or eval_cfg.get("steps", 1))
    fps = float(info.fps) if info.fps and np.isfinite(info.fps) and info.fps > 0 else 30.0
    out_fps = opts.fps or fps
    fps_id = opts.fps_id if opts.fps_id is not None else fps
    max_disparity = float(opts.max_disparity or max(1, int(0.05 * W)))
    kernel = opts.close_kernel if opts.close_kernel is not None else default_close_kernel(H, W)
    align, _ = model_alignment(model)
    hp, wp = _round_up(H, align), _round_up(W, align)
    tile = opts.tile
    if tile is None and device.type == "cuda":  # the free memory is cheap to know there: tiles that fit it
        bytes_per_value = 4 if model.autocast_dtype is None and next(model.parameters()).dtype == torch.float32 else 2
        tile = memory_tile(torch.cuda.mem_get_info(device)[0], opts.chunk_frames, hp, wp, align, bytes_per_value)
    inter = Path(opts.save_intermediates) if opts.save_intermediates else None
    if inter is not None:
        inter.mkdir(parents=True, exist_ok=True)
    times = StageTimes()
    convert_start = time.perf_counter()  # the conversion proper, after loading the model

    with contextlib.ExitStack() as stack:
        # 2. Depth: a file, or the model's windows written to a memory-mapped .npy; then the range pass
        if depth_model is not None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m2s-depth-")))
            target = (inter or work) / "depth.npy"
            source: DepthSource = estimate_depth(
                input, depth_model, target, window=opts.depth_window, overlap=opts.depth_overlap, progress=opts.progress,
            )
        else:
            source = open_depth_file(depth, opts.depth_kind)
        source.check_matches(T, H, W, input)
        value_range = inverse_range(source)

        # 3. Writers: the output and the intermediate streams, all atomic
        writer = stack.enter_context(StreamWriter(out, out_fps, opts.crf, opts.lossless))
        extras = {}
        if inter is not None:
            for name in ("depth", "warped", "mask"):
                extras[name] = stack.enter_context(StreamWriter(inter / f"{name}.mp4", out_fps, opts.crf, opts.lossless))

        # 4. Chunks. A reader thread prepares the next chunks (read, depth, splat, closing) and a writer
        # thread composes and encodes finished frames while the model refines the current chunk; both
        # queues are bounded, so memory stays flat in the video's length.
        from tqdm.auto import tqdm

        schedule = chunk_schedule(T, opts.chunk_frames, opts.overlap_frames)
        bar = stack.enter_context(tqdm(total=T, desc="convert", unit="frame", disable=not opts.progress))
        held: torch.Tensor | None = None  # the last chunk's generated frames that the next chunk gets as known
        right_means, left_means = [], []

        def prepare(chunk: Chunk):
            s, e, known, _ = chunk
            with times("read"):
                left_u8 = read_frames(input, range(s, e))  # [t, H, W, 3]
            with times("depth"):
                inv = torch.from_numpy(source.inverse(s, e))  # [t, H, W]
                disparity = normalised_disparity(inv, value_range, max_disparity, opts.convergence)
            with times("splat"):
                left = to_float_video(left_u8)  # [t, 3, H, W]
                warped, holes = SPLATS[opts.splat](left, disparity)  # [t, 3, H, W], [t, H, W]
                mask = close_mask(holes, kernel)
                warped = warped.masked_fill(mask[:, None], -1.0)  # black under M, as in training
            if inter is not None:
                lo, hi = value_range
                with times("write"):
                    extras["depth"].write(_grey((inv[known:] - lo) / max(hi - lo, 1e-6)))
                    extras["warped"].write(_to_uint8(warped[known:]))
                    extras["mask"].write(_grey(mask[known:].float()))
            return left_u8, left, warped, mask

        def emit(left_frames: np.ndarray, right_frames: torch.Tensor) -> None:
            with times("write"):
                right_u8 = _to_uint8(right_frames)
                writer.write(compose(left_frames, right_u8, opts.format))
                right_means.append(right_u8.reshape(len(right_u8), -1, 3).mean(axis=1))
                left_means.append(left_frames.reshape(len(left_frames), -1, 3).mean(axis=1))
            bar.update(len(left_frames))

        reader, encoder = ThreadPoolExecutor(1, "m2s-read"), ThreadPoolExecutor(1, "m2s-write")
        for pool in (encoder, reader):  # on an error: stop both before the writers are aborted
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        prepared = deque(reader.submit(prepare, c) for c in schedule[:QUEUE_CHUNKS])
        written: deque[Future] = deque()
        for index, chunk in enumerate(schedule):
            s, e, known, stop_writing = chunk
            left_u8, left, warped, mask = prepared.popleft().result()
            if index + QUEUE_CHUNKS < len(schedule):
                prepared.append(reader.submit(prepare, schedule[index + QUEUE_CHUNKS]))
            if known:  # App. E: generated frames of the previous chunk as known frames, mask empty
                warped[:known] = held
                mask[:known] = False

            latent = refine_latent(
                model, _pad(left, hp, wp).to(device), _pad(warped, hp, wp).to(device), _pad(mask, hp, wp).to(device),
                steps=steps, fps_id=fps_id, tile=tile, tile_overlap=opts.tile_overlap, seed=opts.seed + index,
                times=times,
            )
            with times("decode"):
                right = decode_latent(model, latent, tile, opts.tile_overlap, opts.decode_chunk_size)
                right = right[:, :, :H, :W].float().cpu()

            # Output: the known frames cross-faded from the last chunk's prediction to this one's, then
            # this chunk's frames up to the next chunk's start; the rest is held as its known frames
            if known and opts.blend_overlap:
                w = (torch.arange(1, known + 1, dtype=torch.float32) / (known + 1))[:, None, None, None]
                right[:known] = (1 - w) * held + w * right[:known]
            elif known:
                right[:known] = held
            n = stop_writing - s
            written.append(encoder.submit(emit, left_u8[:n], right[:n]))
            held = right[n:]
            while len(written) > QUEUE_CHUNKS:
                written.popleft().result()
        for future in written:
            future.result()

        if writer.frames != T:
            raise DataError(f"video {input}: wrote {writer.frames} frames but the video has {T}")
        for extra in extras.values():
            extra.commit()
        writer.commit()

    seconds = time.perf_counter() - start_time
    convert_seconds = time.perf_counter() - convert_start
    model_seconds = sum(times.seconds[k] for k in MODEL_STAGES)
    boundaries = [(c.start, c.start + c.known) for c in schedule[1:]]  # the frames where chunks hand over
    grid = tile_grid(model, hp, wp, tile, opts.tile_overlap)
    right_jump = boundary_jumps(np.concatenate(right_means), boundaries)
    left_jump = boundary_jumps(np.concatenate(left_means), boundaries)
    return {
        "output": str(out),
        "frames": T,
        "height": H,
        "width": W,
        "format": opts.format,
        "padded": [hp, wp],
        "chunks": len(schedule),
        "chunk_frames": max(c.stop - c.start for c in schedule),
        "tiles_per_chunk": len(grid[3]) * len(grid[4]),
        "max_disparity": max_disparity,
        "close_kernel": kernel,
        "steps": steps,
        "seconds": seconds,
        "frames_per_second": T / seconds,
        "boundary_jump": right_jump["boundary"],
        "within_chunk_jump": right_jump["within"],
        "input_boundary_jump": left_jump["boundary"],
        "input_within_jump": left_jump["within"],
        # seconds per frame of each stage (read, depth, splat = splat + closing, encode, unet, decode,
        # write = compose + encode the video), and the share of the wall time outside the model
        "stage_seconds_per_frame": {k: v / T for k, v in sorted(times.seconds.items())},
        "non_model_fraction": max(0.0, 1 - model_seconds / convert_seconds),
    }
