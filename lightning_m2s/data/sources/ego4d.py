"""Ego4D stereo: rectified clips (the M2SVid preprocessing) with per-frame disparity maps.

Layout (the M2SVid release stores side-by-side clips `<uuid>_clip_NNNN.mp4`; disparity is ours):
    root/
      <clip>.mp4                      side by side, left half = left view (or <clip>_left.mp4 + <clip>_right.mp4)
      <clip>_disparity/000000.png ... one 16-bit PNG per frame (sorted by name), value = disparity * 256
                                      (KITTI's scale), pixels of one view, left view
      or <clip>_disparity.npz         array 'disparity' [T, H, W] float pixels (or <clip>_disparity.npy)
A clip is every name with a disparity entry; its video must exist. `disparity_scale` changes the PNG scale.
warps "released": the release's offline warps `root/reprojected/<clip>.mp4` and
`root/reprojected_mask/<clip>.mp4` (white = hole) replace the disparity; a clip is then every name there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_m2s.data.sources.base import (
    WARPS, StereoSource, check_pair_videos, read_released_warp, require_dir, select_videos,
)
from lightning_m2s.data.sources.folder import load_disparity_array
from lightning_m2s.data.video_io import VideoInfo, read_frames, video_info
from lightning_m2s.errors import ConfigError, DataError


def write_disparity_pngs(folder: str | Path, disparity: np.ndarray, scale: float = 256.0) -> None:
    """Store disparity [T, H, W] (pixels) as 16-bit PNGs `folder/000000.png`, ... (value = disparity * scale)."""
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (disparity < 0).any() or disparity.max() * scale > 65535:
        raise DataError(f"{folder}: disparity out of the 16-bit PNG range [0, {65535 / scale:.1f}] px")
    for t, d in enumerate(disparity):
        iio.imwrite(folder / f"{t:06d}.png", np.rint(d * scale).astype(np.uint16))


class Ego4DSource(StereoSource):
    name = "ego4d"

    def __init__(
        self, root: str | Path, videos: Sequence[str] | str | None = None, disparity_scale: float = 256.0,
        warps: str = "splat",
    ):
        if warps not in WARPS:
            raise ConfigError(f"ego4d: warps {warps!r} (key 'warps') must be one of {WARPS}")
        self.root = require_dir(root)
        self.disparity_scale, self.warps = float(disparity_scale), warps
        found: dict[str, Path] = {}
        if warps == "released":
            found = {p.stem: p for p in sorted((self.root / "reprojected").glob("*.mp4"))}
        else:
            for p in sorted(self.root.iterdir()):
                for suffix in ("_disparity", "_disparity.npz", "_disparity.npy"):
                    if p.name.endswith(suffix) and (p.is_dir() == (suffix == "_disparity")):
                        found[p.name[: -len(suffix)]] = p
        self.names = select_videos(found, videos, self.root)
        self.disparity = [found[n] for n in self.names]  # disparity files, or the offline warps
        self._info: dict[int, VideoInfo] = {}

    def __len__(self) -> int:
        return len(self.names)

    def _videos(self, i: int) -> tuple[Path, ...]:
        """(side-by-side,) or (left, right)."""
        sbs = self.root / f"{self.names[i]}.mp4"
        left, right = self.root / f"{self.names[i]}_left.mp4", self.root / f"{self.names[i]}_right.mp4"
        return (left, right) if left.exists() or right.exists() else (sbs,)

    def describe(self, i: int) -> str:
        return f"{' / '.join(map(str, self._videos(i)))} ({'warp' if self.warps == 'released' else 'disparity'} {self.disparity[i].name})"

    def read_warp(self, i: int, frame_indices):
        return read_released_warp(self.root, self.names[i], frame_indices, self.info(i)) if self.warps == "released" else None

    def info(self, i: int) -> VideoInfo:
        if i not in self._info:
            paths = self._videos(i)
            v = video_info(paths[0], self.names[i])
            if len(paths) == 2:
                check_pair_videos(self.describe(i), v, video_info(paths[1], self.names[i]))
            else:
                if v.width % 2:
                    raise DataError(f"{paths[0]}: side-by-side video has odd width {v.width}")
                v = VideoInfo(v.name, v.num_frames, v.fps, v.height, v.width // 2)
            self._info[i] = v
        return self._info[i]

    def _load_disparity(self, i: int, frame_indices: np.ndarray) -> np.ndarray:
        path, n = self.disparity[i], self.info(i).num_frames
        if not path.is_dir():
            return load_disparity_array(path, frame_indices, n)
        import imageio.v3 as iio

        files = sorted(path.glob("*.png"))
        if len(files) != n:
            raise DataError(f"{path}: {len(files)} disparity PNGs but the video has {n} frames")
        out = []
        for f in frame_indices:
            try:
                png = iio.imread(files[int(f)])
            except Exception as e:
                raise DataError(f"cannot read disparity PNG {files[int(f)]}: {e}") from e
            if png.dtype != np.uint16 or png.ndim != 2:
                raise DataError(f"{files[int(f)]}: expected a 16-bit single-channel PNG, got {png.dtype} {png.shape}")
            out.append(png.astype(np.float32) / self.disparity_scale)
        return np.stack(out)

    def _read(self, i: int, frame_indices: np.ndarray):
        paths = self._videos(i)
        if len(paths) == 2:
            left, right = read_frames(paths[0], frame_indices), read_frames(paths[1], frame_indices)
        else:
            sbs = read_frames(paths[0], frame_indices)  # [T, H, 2W, 3]
            half = sbs.shape[2] // 2
            left, right = np.ascontiguousarray(sbs[:, :, :half]), np.ascontiguousarray(sbs[:, :, half:])
        return left, right, None if self.warps == "released" else self._load_disparity(i, frame_indices)
