"""Video files: decord for reading selected frames, PyAV (ffmpeg) for writing.

A decord VideoReader is opened inside `read_frames` (so inside a DataLoader worker), never kept in a
parent process: readers do not survive a fork.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_m2s.errors import DataError


@dataclass(frozen=True)
class VideoInfo:
    name: str
    num_frames: int
    fps: float
    height: int
    width: int


def _open(path: str | Path):
    import decord

    path = Path(path)
    if not path.is_file():
        raise DataError(f"video file not found: {path}")
    try:
        # One decoding thread: DataLoader workers are the parallelism.
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises its own DECORDError (and RuntimeError) on bad containers
        raise DataError(f"cannot decode video {path}: {e}".splitlines()[0]) from e


def video_info(path: str | Path, name: str | None = None) -> VideoInfo:
    """Frame count, fps and size of a video file (opens and closes a reader)."""
    vr = _open(path)
    n = len(vr)
    if n == 0:
        raise DataError(f"video {path} has no frames")
    try:
        h, w = vr[0].shape[:2]
    except Exception as e:  # noqa: BLE001 - decord's DECORDError: the first frame's data is corrupt
        raise DataError(f"cannot decode frame 0 of video {path}: the file is corrupt ({_decoder_reason(e)})") from e
    fps = float(vr.get_avg_fps())
    del vr
    return VideoInfo(name=name or Path(path).stem, num_frames=n, fps=fps, height=h, width=w)


def _decoder_reason(err: Exception) -> str:
    """decord's message without its source-file prefixes: `[time] file.cc:N: ... Check failed: ...`."""
    text = " ".join(str(err).split())
    return text.rsplit(": ", 1)[-1][:120] if text else type(err).__name__


def read_frames(path: str | Path, indices: Sequence[int] | None = None) -> np.ndarray:
    """Frames `indices` (all when None) of a video as uint8 `[T, H, W, 3]`."""
    vr = _open(path)
    n = len(vr)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise DataError(f"video {path} has {n} frames; requested frame {bad[0]} is out of range")
    try:
        frames = vr.get_batch(idx).asnumpy()
    except Exception:  # noqa: BLE001 - decord mis-sizes some small frame widths: decode with PyAV instead
        frames = None
    if frames is None or frames.ndim != 4 or frames.shape[-1] != 3:
        frames = _read_frames_pyav(path, idx)
    return np.ascontiguousarray(frames)


def _read_frames_pyav(path: str | Path, idx: list[int]) -> np.ndarray:
    """The same frames decoded sequentially with PyAV (slower, but exact for any frame size)."""
    import av

    wanted = set(idx)
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    found[i] = frame.to_ndarray(format="rgb24")
                if i >= max(wanted):
                    break
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unreadable
        raise DataError(f"cannot decode frames of video {path}: {e}".splitlines()[0]) from e
    missing = [i for i in idx if i not in found]
    if missing:
        raise DataError(f"cannot decode frame {missing[0]} of video {path}")
    return np.stack([found[i] for i in idx])


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Delete the partial files (`.<name>.*.partial<ext>`) beside `out` that no live writer holds: a writer
    keeps an exclusive lock on its file, which a process killed with -9 loses. Returns what was removed."""
    import fcntl
    import glob
    import logging
    import os

    out = Path(out)
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.stem)}.*.partial{glob.escape(out.suffix)}"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another convert is writing it now
            continue
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        removed.append(path)
        logging.getLogger(__name__).warning("removed %s, left by a conversion that was killed", path)
    return removed


def write_video(path: str | Path, frames: np.ndarray, fps: float = 30.0, lossless: bool = False, crf: int = 18) -> Path:
    """Write uint8 `[T, H, W, 3]` to an H.264 mp4.

    lossless=True stores RGB exactly (libx264rgb, crf 0): tests compare bit-exact pixels. Otherwise
    yuv420p at `crf` (18 is visually lossless), which players everywhere accept; H and W must be even.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DataError(f"write_video({path}): expected uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        if lossless:
            stream = container.add_stream("libx264rgb", rate=rate)
            stream.pix_fmt = "rgb24"
            stream.options = {"crf": "0", "preset": "ultrafast"}
        else:
            stream = container.add_stream("libx264", rate=rate)
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
        stream.height, stream.width = frames.shape[1:3]
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
