"""Output: the streaming, atomic video writer, the uint8 conversions of model-side frames, and the write
stage (compose the stereo format, encode, keep per-frame means) that runs in the writer thread."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from lightning_m2s.convert.report import StageTimes
from lightning_m2s.errors import ConfigError
from lightning_m2s.stereo_formats import compose

OUTPUT_SUFFIXES = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov"}


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


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grey(x: torch.Tensor) -> np.ndarray:
    """[T, H, W] in [0, 1] -> uint8 [T, H, W, 3]."""
    g = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(g[..., None], 3, axis=-1)



def writable_folder(folder: Path) -> None:
    """Create `folder` if needed and check that files can be created in it (ConfigError naming it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"output folder {folder} is not writable ({err.strerror}); choose another --out") from err


class WriteStage:
    """The writer thread's work: compose finished left / right frames into the output format, encode them,
    and keep each frame's mean colour (the boundary jumps of the report)."""

    def __init__(self, writer: StreamWriter, format: str, times: StageTimes, bar):
        self.writer, self.format, self.times, self.bar = writer, format, times, bar
        self.right_means: list[np.ndarray] = []  # [t, 3] per call
        self.left_means: list[np.ndarray] = []

    def __call__(self, left_frames: np.ndarray, right_frames: torch.Tensor) -> None:
        """left_frames: uint8 [t, H, W, 3]; right_frames: [t, 3, H, W] in [-1, 1]."""
        with self.times("write"):
            right_u8 = to_uint8(right_frames)
            self.writer.write(compose(left_frames, right_u8, self.format))
            self.right_means.append(right_u8.reshape(len(right_u8), -1, 3).mean(axis=1))
            self.left_means.append(left_frames.reshape(len(left_frames), -1, 3).mean(axis=1))
        self.bar.update(len(left_frames))
