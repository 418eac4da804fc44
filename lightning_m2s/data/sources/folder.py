"""Users' own stereo videos: one folder per video with `left.mp4`, `right.mp4`, `disparity.npz`.

    root/
      my_clip_a/left.mp4  right.mp4  disparity.npz   (array 'disparity' [T, H, W] float, pixels, left view)
      my_clip_b/...
`disparity.npy` (same array, memory-mapped, faster for long videos) is accepted instead of the npz.
`root` may also be one such folder itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_m2s.data.sources.base import StereoSource, check_pair_videos, require_dir, select_videos
from lightning_m2s.data.video_io import VideoInfo, read_frames, video_info
from lightning_m2s.errors import DataError


def load_disparity_array(path: Path, frame_indices: np.ndarray, num_frames: int, key: str = "disparity") -> np.ndarray:
    """Frames of a [T, H, W] disparity array from .npy (memory-mapped) or .npz (key `key`): float32 [t, H, W]."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
        else:
            with np.load(path) as z:
                if key not in z:
                    raise DataError(f"{path}: no array {key!r} (found {list(z.keys())})")
                arr = z[key]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read disparity file {path}: {e}") from e
    if arr.ndim != 3:
        raise DataError(f"{path}: disparity must be [T, H, W], got shape {arr.shape}")
    if arr.shape[0] != num_frames:
        raise DataError(f"{path}: disparity has {arr.shape[0]} frames but the video has {num_frames}")
    return np.asarray(arr[frame_indices], dtype=np.float32)


class FolderSource(StereoSource):
    name = "folder"

    def __init__(self, root: str | Path, videos: Sequence[str] | str | None = None):
        self.root = require_dir(root)
        dirs = [self.root] if (self.root / "left.mp4").exists() else sorted(p.parent for p in self.root.glob("*/left.mp4"))
        found = {d.name: d for d in dirs}
        self.names = select_videos(found, videos, self.root)
        self.dirs = [found[n] for n in self.names]
        self._info: dict[int, VideoInfo] = {}

    def __len__(self) -> int:
        return len(self.dirs)

    def describe(self, i: int) -> str:
        return str(self.dirs[i])

    def _disparity_path(self, i: int) -> Path:
        for name in ("disparity.npy", "disparity.npz"):
            if (self.dirs[i] / name).is_file():
                return self.dirs[i] / name
        raise DataError(f"{self.dirs[i]}: disparity file not found (disparity.npz or disparity.npy)")

    def info(self, i: int) -> VideoInfo:
        if i not in self._info:
            left = video_info(self.dirs[i] / "left.mp4", self.names[i])
            right = video_info(self.dirs[i] / "right.mp4", self.names[i])
            check_pair_videos(str(self.dirs[i]), left, right)
            self._info[i] = left
        return self._info[i]

    def _read(self, i: int, frame_indices: np.ndarray):
        n = self.info(i).num_frames
        left = read_frames(self.dirs[i] / "left.mp4", frame_indices)
        right = read_frames(self.dirs[i] / "right.mp4", frame_indices)
        disparity = load_disparity_array(self._disparity_path(i), frame_indices, n)
        return left, right, disparity
