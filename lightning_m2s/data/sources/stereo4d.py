"""Stereo4D: rectified 512x512 clips with per-frame stereo flow, as the public Stereo4D tooling writes them.

Files per clip id `{vid}` anywhere under `root` (searched recursively):
    {vid}-left_rectified.mp4, {vid}-right_rectified.mp4, {vid}-flows_stereo.pkl
The tooling puts the three in `root/{vid}/`; the M2SVid release keeps the videos in
`root/left_rectified/` and `root/right_rectified/`; both work, as does a flat folder.
`{vid}-flows_stereo.pkl` is a pickled list (one entry per frame) of dicts with 'fwd' and 'bwd' HxWx2
flows between the rectified views. 'fwd' is left -> right flow: a left pixel at x moves to x + u in the
right view, so u = -d. Disparity = -fwd[..., 0] (flow_sign "negate", the default; Stereo4D's own
loader computes depth from -fwd the same way). flow_sign "keep" takes fwd[..., 0] as is; "auto" picks
the sign per clip that makes most values >= 0. Stereo matching is noisy near zero disparity: values
down to -negative_tolerance px are clamped to 0. Real flows also have outliers (occlusions, the sky):
pixels more negative than that have no disparity (NaN): they land nowhere in the warp, so what they
would cover is a hole, and each clip counts them (meta "disparity_outliers", logged per training
epoch). Only a clip whose sampled frames have more than `max_outlier_fraction` (default 25%) of such
pixels is an error naming the file: real outliers stay far below it, a wrong flow_sign (most pixels
negative) far above.

warps "released": use the M2SVid release's offline warps instead of splatting the flow's disparity:
`root/reprojected/{vid}.mp4` (the warped right view) and `root/reprojected_mask/{vid}.mp4` (white =
hole), made at native resolution; they are cropped and resized with the views, and no flow file is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_m2s.data.sources.base import (
    WARPS, StereoSource, check_pair_videos, read_released_warp, require_dir, select_videos,
)
from lightning_m2s.data.video_io import VideoInfo, read_frames, video_info
from lightning_m2s.errors import ConfigError, DataError
from lightning_m2s.safe_pickle import load_data_pickle

FLOW_SIGNS = ("negate", "keep", "auto")


def _index(root: Path, suffix: str) -> dict[str, Path]:
    return {p.name[: -len(suffix)]: p for p in sorted(root.rglob(f"*{suffix}"))}


MAX_OUTLIER_FRACTION = 0.25  # of a clip's sampled pixels; above it the flow is wrong, not noisy


def flow_to_disparity(flows: list, frame_indices: np.ndarray, sign: str, path: Path, tolerance: float,
                      max_outliers: float = MAX_OUTLIER_FRACTION) -> np.ndarray:
    """x flow of the selected frames -> left-view disparity float32 [t, H, W]; NaN at outliers (below
    -tolerance px: holes of the warp), an error when more than `max_outliers` of the pixels are."""
    try:
        x = np.stack([np.asarray(flows[int(f)]["fwd"], dtype=np.float32)[..., 0] for f in frame_indices])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DataError(f"{path}: expected a list of per-frame dicts with 'fwd' HxWx2 flow ({e!r})") from e
    if not np.isfinite(x).all():
        raise DataError(f"{path}: the flow has {int((~np.isfinite(x)).sum())} NaN/inf values")
    if sign == "negate" or (sign == "auto" and np.median(x) < 0):
        x = -x
    outliers = x < -tolerance
    fraction = float(outliers.mean())
    if fraction > max_outliers:
        raise DataError(f"{path}: {fraction:.1%} of the sampled pixels have negative disparity below "
                        f"-{tolerance:g} px, more than max_outlier_fraction {max_outliers:.1%} "
                        f"(is flow_sign {sign!r} right?)")
    x = np.maximum(x, 0.0)  # stereo-matching noise around zero disparity
    x[outliers] = np.nan  # no disparity here: a hole of the warp
    return x


class Stereo4DSource(StereoSource):
    name = "stereo4d"
    outliers_are_holes = True

    def __init__(
        self,
        root: str | Path,
        videos: Sequence[str] | str | None = None,
        flow_sign: str = "negate",
        negative_tolerance: float = 1.0,
        warps: str = "splat",
        max_outlier_fraction: float = MAX_OUTLIER_FRACTION,
    ):
        if flow_sign not in FLOW_SIGNS:
            raise ConfigError(f"stereo4d: flow_sign {flow_sign!r} (key 'flow_sign') must be one of {FLOW_SIGNS}")
        if warps not in WARPS:
            raise ConfigError(f"stereo4d: warps {warps!r} (key 'warps') must be one of {WARPS}")
        self.root = require_dir(root)
        self.warps = warps
        self.flow_sign, self.negative_tolerance = flow_sign, float(negative_tolerance)
        if not 0 <= max_outlier_fraction <= 1:
            raise ConfigError(f"stereo4d: max_outlier_fraction {max_outlier_fraction!r} (key 'max_outlier_fraction') "
                              "must be in [0, 1]")
        self.max_outlier_fraction = float(max_outlier_fraction)
        lefts = _index(self.root, "-left_rectified.mp4")
        rights = _index(self.root, "-right_rectified.mp4")
        flows = _index(self.root, "-flows_stereo.pkl")
        self.names = select_videos(lefts, videos, self.root)
        self.files = []
        for vid in self.names:
            # a missing partner is reported when the clip is read, naming the expected file
            right = rights.get(vid, lefts[vid].with_name(f"{vid}-right_rectified.mp4"))
            flow = flows.get(vid, lefts[vid].with_name(f"{vid}-flows_stereo.pkl"))
            self.files.append((lefts[vid], right, flow))
        self._info: dict[int, VideoInfo] = {}

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        left, _, flow = self.files[i]
        return f"{left} (flows {flow.name})"

    def info(self, i: int) -> VideoInfo:
        if i not in self._info:
            left_path, right_path, _ = self.files[i]
            left, right = video_info(left_path, self.names[i]), video_info(right_path, self.names[i])
            check_pair_videos(f"{left_path} / {right_path}", left, right)
            self._info[i] = left
        return self._info[i]

    def read_warp(self, i: int, frame_indices):
        return read_released_warp(self.root, self.names[i], frame_indices, self.info(i)) if self.warps == "released" else None

    def _read(self, i: int, frame_indices: np.ndarray):
        left_path, right_path, flow_path = self.files[i]
        if self.warps == "released":  # the offline warp replaces the disparity (read_warp)
            return read_frames(left_path, frame_indices), read_frames(right_path, frame_indices), None
        if not flow_path.is_file():
            raise DataError(f"stereo flow file not found: {flow_path}")
        flows = load_data_pickle(flow_path)  # numpy arrays and containers only: never runs code
        n = self.info(i).num_frames
        if len(flows) != n:
            raise DataError(f"{flow_path}: {len(flows)} flow frames but the video has {n}")
        disparity = flow_to_disparity(flows, frame_indices, self.flow_sign, flow_path, self.negative_tolerance,
                                      self.max_outlier_fraction)
        left = read_frames(left_path, frame_indices)
        right = read_frames(right_path, frame_indices)
        if disparity.shape != left.shape[:3]:
            raise DataError(f"{flow_path}: flow size {disparity.shape[1:]} does not match the video {left.shape[1:3]}")
        return left, right, disparity
