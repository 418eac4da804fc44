"""The source interface: a list of stereo videos with left-view disparity, validated on every read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_m2s.data.video_io import VideoInfo, read_frames, video_info
from lightning_m2s.errors import ConfigError, DataError


class StereoSource:
    """A list of stereo videos.

    Subclasses implement `__len__`, `info(i) -> VideoInfo` and `_read(i, frame_indices)`; `read` checks
    what `_read` returns, so no source can hand a malformed sample to the pipeline.
    Sources must be cheap to pickle (paths and numbers, no open readers): DataLoader workers copy them.
    """

    name = "source"
    outliers_are_holes = False  # True: NaN disparity marks pixels without one (a source's outliers), warped as holes

    def __len__(self) -> int:
        raise NotImplementedError

    def info(self, i: int) -> VideoInfo:
        raise NotImplementedError

    def _read(self, i: int, frame_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """The file (or scene) behind video i, for error messages."""
        return f"{self.name}[{i}]"

    def read_warp(self, i: int, frame_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """An offline warp of the same frames, (warped uint8 [T, H, W, 3], holes bool [T, H, W]), for
        sources that ship one (then `read` may return no disparity); None: warp from the disparity."""
        return None

    def read(self, i: int, frame_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Frames `frame_indices` of video i: left, right uint8 `[T, H, W, 3]`, disparity float32 `[T, H, W]`
        (None when the source ships offline warps instead, see `read_warp`)."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name} has {len(self)} videos; index {i} is out of range")
        idx = np.asarray(frame_indices, dtype=np.int64)
        n = self.info(i).num_frames
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise DataError(
                f"{self.describe(i)}: clip shorter than requested: it has {n} frames, frame {int(idx.max())} was asked for"
            )
        left, right, disparity = self._read(i, idx)
        check_views(self.describe(i), left, right, disparity, len(idx), self.outliers_are_holes)
        return left, right, None if disparity is None else disparity.astype(np.float32, copy=False)


def check_views(where: str, left: np.ndarray, right: np.ndarray, disparity: np.ndarray, num_frames: int,
                allow_nan: bool = False) -> None:
    """Explicit errors for inconsistent stereo data (DataError naming `where`); `allow_nan`: NaN disparity
    marks pixels without one (holes), only inf is an error."""
    if left.ndim != 4 or left.shape[-1] != 3:
        raise DataError(f"{where}: left view must be [T, H, W, 3], got {left.shape}")
    if left.shape[0] != right.shape[0]:
        raise DataError(f"{where}: left/right frame count mismatch: {left.shape[0]} vs {right.shape[0]}")
    if left.shape != right.shape:
        raise DataError(f"{where}: left/right size mismatch: {left.shape[1:3]} vs {right.shape[1:3]}")
    if left.shape[0] != num_frames:
        raise DataError(f"{where}: clip shorter than requested: got {left.shape[0]} of {num_frames} frames")
    if disparity is None:  # an offline warp instead (read_released_warp checks it)
        return
    if disparity.shape != left.shape[:3]:
        raise DataError(f"{where}: disparity shape {disparity.shape} does not match the video {left.shape[:3]}")
    finite = np.isfinite(disparity) | (allow_nan & np.isnan(disparity))
    if not finite.all():
        raise DataError(f"{where}: disparity has {int((~finite).sum())} NaN/inf values")
    if (disparity < 0).any():
        raise DataError(
            f"{where}: disparity has negative values (min {float(disparity.min()):.3g} px); "
            "left-view disparity must be >= 0"
        )


WARPS = ("splat", "released")  # warp in the pipeline from the disparity | the M2SVid release's offline warps


def read_released_warp(root: Path, name: str, frame_indices: np.ndarray, info: VideoInfo) -> tuple[np.ndarray, np.ndarray]:
    """The M2SVid release's offline warp of clip `name`: `root/reprojected/<name>.mp4` (the warped right
    view) and `root/reprojected_mask/<name>.mp4` (white = hole) -> uint8 [T, H, W, 3], bool [T, H, W]."""
    paths = root / "reprojected" / f"{name}.mp4", root / "reprojected_mask" / f"{name}.mp4"
    for path in paths:
        if not path.is_file():
            raise DataError(f"offline warp (warps: released): {path} not found")
        v = video_info(path, name)
        if (v.num_frames, v.height, v.width) != (info.num_frames, info.height, info.width):
            raise DataError(f"{path}: {v.num_frames} frames of {v.height}x{v.width}, but the clip has "
                            f"{info.num_frames} of {info.height}x{info.width}")
    return read_frames(paths[0], frame_indices), read_frames(paths[1], frame_indices)[..., 0] > 127


def check_pair_videos(where: str, left: VideoInfo, right: VideoInfo) -> None:
    """Left and right videos of one clip must agree in frame count and size."""
    if left.num_frames != right.num_frames:
        raise DataError(f"{where}: left/right frame count mismatch: {left.num_frames} vs {right.num_frames}")
    if (left.height, left.width) != (right.height, right.width):
        raise DataError(
            f"{where}: left/right size mismatch: {left.height}x{left.width} vs {right.height}x{right.width}"
        )


def select_videos(found: dict[str, object], videos: Sequence[str] | str | None, root: Path, key: str = "videos") -> list[str]:
    """Names to use: all found (sorted), or the `videos` list / a JSON or text split file of names."""
    if videos is None:
        names = sorted(found)
    else:
        if isinstance(videos, (str, Path)):
            path = Path(videos)
            if not path.is_absolute():
                path = root / path
            if not path.is_file():
                raise DataError(f"split file {path} (option {key!r}) not found")
            text = path.read_text()
            videos = json.loads(text) if path.suffix == ".json" else text.split()
            if isinstance(videos, dict):  # {"clips": [...]} or {name: ...}
                videos = next(iter(videos.values())) if len(videos) == 1 else list(videos)
        names = [str(v) for v in videos]
        missing = [v for v in names if v not in found]
        if missing:
            raise DataError(f"{root}: videos listed in {key!r} not found: {missing[:5]}")
    if not names:
        raise DataError(f"no stereo videos found under {root}")
    return names


def require_dir(root: str | Path, key: str = "root") -> Path:
    if root is None:
        raise ConfigError(f"source option {key!r} is required (a directory)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} (option {key!r}) not found")
    return root
