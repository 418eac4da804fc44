"""ConvertOptions: every setting of a conversion, its default and why, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_m2s.depth import DEPTH_KINDS, DEPTH_OVERLAP, DEPTH_WINDOW
from lightning_m2s.errors import ConfigError
from lightning_m2s.geometry import SPLATS
from lightning_m2s.stereo_formats import FORMATS

MIN_SIDE = 16  # smallest frame side converted: two latent cells of an 8x VAE
MIN_FPS, MAX_FPS = 0.1, 1000.0  # frame rates a video container can carry sensibly


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
        """ConfigError naming the first setting out of range (before the video, the depth or the model is read)."""
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
