"""Camera-pan clips cut from a real stereo pair with ground-truth disparity (real-content evaluation).

The pair is scikit-image's bundled Middlebury 2014 Motorcycle (left, right 500x741, left-view disparity
in pixels, ~7% inf = unknown). A clip is a square window sliding (and optionally zooming) across the
pair: the same window in both views, resized to `size`; the window's disparity is rescaled by
size / window side. Every clip has its own path (seeded by index), so the clips differ.

Unknown disparity is filled before cropping: each inf pixel takes the smaller (farther) of the nearest
finite values to its left and right in the same row (a background fill: unknown pixels are mostly
occluded background beside foreground edges, which belong to the far side).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.data.sources.base import StereoSource
from lightning_m2s.data.video_io import VideoInfo
from lightning_m2s.errors import ConfigError, DataError

PAIRS = ("motorcycle",)


def fill_unknown_disparity(disparity: np.ndarray) -> np.ndarray:
    """Fill non-finite values row-wise with the farther (smaller) nearest finite neighbour: [H, W] -> [H, W]."""
    d = disparity.astype(np.float32).copy()
    H, W = d.shape
    known = np.isfinite(d)
    if not known.any(axis=1).all():
        raise DataError("stereo pair disparity has a row without any finite value; cannot fill it")
    cols = np.arange(W)[None, :].repeat(H, 0)
    # index of the nearest known pixel at or before / at or after each column (-1 / W when none)
    before = np.maximum.accumulate(np.where(known, cols, -1), axis=1)
    after = np.minimum.accumulate(np.where(known, cols, W)[:, ::-1], axis=1)[:, ::-1]
    rows = np.arange(H)[:, None]
    big = np.float32(np.inf)
    left_val = np.where(before >= 0, d[rows, before.clip(0)], big)
    right_val = np.where(after < W, d[rows, after.clip(max=W - 1)], big)
    return np.where(known, d, np.minimum(left_val, right_val)).astype(np.float32)


def load_pair(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if name != "motorcycle":
        raise ConfigError(f"image_pairs: unknown pair {name!r} (key 'pair'); choose from {list(PAIRS)}")
    import skimage.data

    left, right, disparity = skimage.data.stereo_motorcycle()
    return left, right, fill_unknown_disparity(disparity)


class ImagePairSource(StereoSource):
    """`num_clips` camera-pan clips of `num_frames` frames over one real stereo pair.

    size: side of the output frames; window: (min, max) window side as a fraction of the pair's height;
    zoom: max relative change of the window side over a clip (0 = pure pan); seed: the window paths.
    """

    name = "image_pairs"

    def __init__(
        self,
        num_clips: int = 8,
        size: int = 192,
        num_frames: int = 150,
        fps: float = 30.0,
        window: tuple[float, float] = (0.7, 1.0),
        zoom: float = 0.2,
        seed: int = 0,
        pair: str = "motorcycle",
    ):
        if num_clips < 1 or num_frames < 1 or size < 8:
            raise ConfigError(f"image_pairs: num_clips, num_frames >= 1 and size >= 8 needed, got {num_clips}, {num_frames}, {size}")
        if not 0 < window[0] <= window[1] <= 1:
            raise ConfigError(f"image_pairs: window must be fractions 0 < min <= max <= 1, got {window}")
        self.num_clips, self.size, self.num_frames, self.fps = int(num_clips), int(size), int(num_frames), float(fps)
        self.window, self.zoom, self.seed, self.pair = tuple(window), float(zoom), int(seed), pair
        if pair not in PAIRS:
            raise ConfigError(f"image_pairs: unknown pair {pair!r} (key 'pair'); choose from {list(PAIRS)}")
        self._data = None  # loaded lazily per process (a few MB; cheap)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def _pair(self):
        if self._data is None:
            left, right, disp = load_pair(self.pair)
            to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()  # noqa: E731
            self._data = (to_t(left), to_t(right), torch.from_numpy(disp))  # [3, H, W] x2, [H, W]
        return self._data

    def __len__(self) -> int:
        return self.num_clips

    def info(self, i: int) -> VideoInfo:
        return VideoInfo(f"{self.pair}-{self.seed}-{i}", self.num_frames, self.fps, self.size, self.size)

    def describe(self, i: int) -> str:
        return f"image pair {self.pair!r} clip {i} (seed {self.seed})"

    def windows(self, i: int, frame_indices: np.ndarray) -> np.ndarray:
        """Window (top, left, side) per frame, integer pixels of the pair: [T, 3]."""
        left, _, _ = self._pair()
        H, W = left.shape[-2:]
        rng = np.random.default_rng([self.seed, i])
        s0 = rng.uniform(*self.window) * H
        s1 = float(np.clip(s0 * (1 + rng.uniform(-self.zoom, self.zoom)), self.window[0] * H, H))
        # start and end centres anywhere the window fits; the path is a straight pan between them
        c0 = [rng.uniform(s0 / 2, H - s0 / 2), rng.uniform(s0 / 2, W - s0 / 2)]
        c1 = [rng.uniform(s1 / 2, H - s1 / 2), rng.uniform(s1 / 2, W - s1 / 2)]
        a = np.asarray(frame_indices, dtype=np.float64) / max(self.num_frames - 1, 1)
        side = s0 + (s1 - s0) * a
        cy = c0[0] + (c1[0] - c0[0]) * a
        cx = c0[1] + (c1[1] - c0[1]) * a
        top = np.clip(np.rint(cy - side / 2), 0, H - np.rint(side))
        lft = np.clip(np.rint(cx - side / 2), 0, W - np.rint(side))
        return np.stack([top, lft, np.rint(side)], 1).astype(np.int64)

    def _read(self, i: int, frame_indices: np.ndarray):
        left, right, disp = self._pair()
        S = self.size
        out_l, out_r, out_d = [], [], []
        for top, lft, side in self.windows(i, frame_indices):
            crop = lambda x: x[..., top : top + side, lft : lft + side]  # noqa: E731
            rgb = torch.stack([crop(left), crop(right)])  # [2, 3, side, side]
            rgb = F.interpolate(rgb, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
            # disparity: nearest (no blended depth edges), values scaled to output pixels
            d = F.interpolate(crop(disp)[None, None], size=(S, S), mode="nearest-exact")[0, 0] * (S / side)
            out_l.append(rgb[0])
            out_r.append(rgb[1])
            out_d.append(d)
        to_u8 = lambda xs: torch.stack(xs).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
        return to_u8(out_l), to_u8(out_r), torch.stack(out_d).numpy()
