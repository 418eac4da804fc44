"""Depth for `m2s convert`: depth files and monocular depth models, read in frame ranges.

Every provider is a `DepthSource`: its size, its frame count, and `inverse(start, stop)`, the
inverse depth (larger = nearer) of frames [start, stop) as float32 `[t, H, W]`, read from disk per
call so long videos never sit in memory. One normalisation per video (paper Sec. 4, released code:
per-video min-max of inverse depth) needs the global range first: `inverse_range(source)` makes that
first pass chunk by chunk.

Files (`open_depth_file`):
  .npy          [T, H, W] (or [T, 1, H, W] / [T, H, W, 1]), memory-mapped
  .npz          key depth | disparity | inverse_depth | the only array (loaded whole: use .npy for long videos)
  folder        one PNG per frame, sorted by name, 16-bit (or 8-bit) grey
  video         luma = inverse depth (the usual export of depth models: near = bright)
`kind` says what the values are: "depth" (> 0, far = large), "inverse" (>= 0, near = large) or
"auto": inverse for PNG folders, videos and npz keys disparity / inverse_depth; depth otherwise.

Models (`estimate_depth`): a transformers depth-estimation model in a local directory (Depth Anything
V2, DPT, ...) run over the video in overlapping temporal windows (DepthCrafter's 110 frames with 25 of
overlap by default, paper App. C.1). Each window's relative inverse depth is aligned to the previous
window on the overlap by least-squares scale and shift and blended linearly across it; the result
goes to a memory-mapped .npy in a temporary folder and is read back like a depth file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.errors import ConfigError, DataError, GeometryError, ModelError

DEPTH_KINDS = ("auto", "depth", "inverse")
NPZ_KEYS = {"depth": "depth", "disparity": "inverse", "inverse_depth": "inverse"}  # key -> auto kind
VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v"}
DEPTH_WINDOW = 110  # DepthCrafter's window (paper App. C.1)
DEPTH_OVERLAP = 25


def _frames(bad: np.ndarray, start: int, shown: int = 8) -> str:
    """The frames (0-based, of the whole video) where `bad` [t, H, W] holds: "frame 5", "frames 3, 7-9"."""
    frames = (np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1)) + start).tolist()
    runs = []
    for f in frames:
        if runs and f == runs[-1][1] + 1:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:shown])
    more = f" and {len(runs) - shown} more ranges" if len(runs) > shown else ""
    return f"frame{'s' if len(frames) > 1 else ''} {text}{more}"


class DepthSource:
    """Depth of a video, read by frame range. Subclasses implement `_raw(start, stop)`."""

    def __init__(self, path: Path, num_frames: int, height: int, width: int, kind: str):
        self.path, self.num_frames, self.height, self.width = Path(path), num_frames, height, width
        if kind not in ("depth", "inverse"):
            raise ConfigError(f"depth kind {kind!r}: choose from {DEPTH_KINDS}")
        self.kind = kind

    def _raw(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def inverse(self, start: int, stop: int) -> np.ndarray:
        """Inverse depth of frames [start, stop): float32 [t, H, W], validated (finite, depth > 0)."""
        raw = np.asarray(self._raw(start, stop), dtype=np.float32)
        if not np.isfinite(raw).all():
            bad = int((~np.isfinite(raw)).sum())
            raise GeometryError(f"depth {self.path}: {bad} non-finite values (NaN or inf) in "
                                f"{_frames(~np.isfinite(raw), start)}")
        if self.kind == "inverse":
            return raw
        if (raw <= 0).any():
            raise GeometryError(
                f"depth {self.path}: values <= 0 in {_frames(raw <= 0, start)}; depth must be > 0 "
                "(if the file holds inverse depth / disparity, as DepthCrafter's npz does, pass --depth-kind inverse)"
            )
        return 1.0 / raw

    def check_matches(self, num_frames: int, height: int, width: int, video: str | Path) -> None:
        """The depth must have the video's frame count and frame size."""
        if self.num_frames != num_frames:
            raise DataError(f"depth {self.path} has {self.num_frames} frames but video {video} has {num_frames}")
        if (self.height, self.width) != (height, width):
            raise DataError(
                f"depth {self.path} frames are {self.height}x{self.width} but video {video} frames are {height}x{width}"
            )


class ArrayDepth(DepthSource):
    """An array [T, H, W] in memory or memory-mapped from .npy."""

    def __init__(self, path: Path, array: np.ndarray, kind: str):
        array = _squeeze_depth(array, path)  # a memmap stays a memmap
        super().__init__(path, *array.shape, kind=kind)
        self.array = array

    def _raw(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop], dtype=np.float32)


class NpyDepth(ArrayDepth):
    """A .npy file, memory-mapped anew for every read: the pages a read touches leave the process with
    its map, so passes over a long video (the range pass, the chunks) keep one chunk resident, not the
    file (1000 frames of 320x240 float32 are 300 MB)."""

    def __init__(self, path: Path, kind: str):
        super().__init__(path, np.load(path, mmap_mode="r"), kind)
        self.array = None  # the shape is known; each read maps the file itself

    def _raw(self, start: int, stop: int) -> np.ndarray:
        array = _squeeze_depth(np.load(self.path, mmap_mode="r"), self.path)
        return np.array(array[start:stop], dtype=np.float32)


class PngFolderDepth(DepthSource):
    """One grey PNG per frame (16- or 8-bit), sorted by file name."""

    def __init__(self, path: Path, files: list[Path], kind: str):
        first = _read_png(files[0])
        super().__init__(path, len(files), *first.shape, kind=kind)
        self.files = files

    def _raw(self, start: int, stop: int) -> np.ndarray:
        frames = []
        for f in self.files[start:stop]:
            a = _read_png(f)
            if a.shape != (self.height, self.width):
                raise DataError(f"depth PNG {f} is {a.shape[0]}x{a.shape[1]}, the first frame is {self.height}x{self.width}")
            frames.append(a)
        return np.stack(frames).astype(np.float32)


class VideoDepth(DepthSource):
    """A video whose luma is inverse depth."""

    def __init__(self, path: Path, kind: str):
        from lightning_m2s.data.video_io import video_info

        info = video_info(path)
        super().__init__(path, info.num_frames, info.height, info.width, kind=kind)

    def _raw(self, start: int, stop: int) -> np.ndarray:
        from lightning_m2s.data.video_io import read_frames

        rgb = read_frames(self.path, range(start, stop)).astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # BT.601 luma


def _squeeze_depth(a: np.ndarray, path: Path) -> np.ndarray:
    if a.ndim == 4 and 1 in (a.shape[1], a.shape[3]):
        a = a[:, 0] if a.shape[1] == 1 else a[..., 0]
    if a.ndim != 3 or min(a.shape) < 1:
        raise DataError(f"depth {path}: expected an array [T, H, W], got shape {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise DataError(f"depth {path}: expected real numbers, got dtype {a.dtype}")
    return a


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.array(im)
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad files
        raise DataError(f"cannot read depth PNG {path}: {err}") from err
    if a.ndim == 3:  # grey stored as RGB(A): take the first channel
        a = a[..., 0]
    return a


def open_depth_file(path: str | Path, kind: str = "auto") -> DepthSource:
    """A depth file or folder (see the module docstring) as a DepthSource."""
    if kind not in DEPTH_KINDS:
        raise ConfigError(f"depth kind {kind!r}: choose from {DEPTH_KINDS}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"depth file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise DataError(f"depth folder {path} has no .png files")
        return PngFolderDepth(path, files, "inverse" if kind == "auto" else kind)
    if suffix == ".npy":
        try:
            return NpyDepth(path, "depth" if kind == "auto" else kind)
        except (DataError, GeometryError):
            raise
        except Exception as err:  # noqa: BLE001
            raise DataError(f"cannot read depth {path}: {err}") from err
    if suffix == ".npz":
        try:
            with np.load(path) as z:
                keys = list(z.files)
                key = next((k for k in NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(f"depth {path}: no array named {sorted(NPZ_KEYS)} among {keys}")
                array = z[key]
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - zipfile / pickle errors on corrupt files
            raise DataError(f"cannot read depth {path}: {err}") from err
        return ArrayDepth(path, array, NPZ_KEYS.get(key, "depth") if kind == "auto" else kind)
    if suffix in VIDEO_SUFFIXES:
        return VideoDepth(path, "inverse" if kind == "auto" else kind)
    raise DataError(f"depth {path}: unknown format {suffix!r}; use .npy, .npz, a folder of PNGs, or a video")


def inverse_range(source: DepthSource, chunk: int = 64) -> tuple[float, float]:
    """The video's inverse-depth (min, max): the first pass of the one-per-video normalisation."""
    lo, hi = np.inf, -np.inf
    for start in range(0, source.num_frames, chunk):
        inv = source.inverse(start, min(start + chunk, source.num_frames))
        lo, hi = min(lo, float(inv.min())), max(hi, float(inv.max()))
    return lo, hi


def normalised_disparity(
    inverse: torch.Tensor, value_range: tuple[float, float], max_disparity: float, convergence: float = 0.0, eps: float = 1e-6
) -> torch.Tensor:
    """geometry.depth_to_disparity with the normalisation range given (the whole video's, from
    `inverse_range`), so a chunk gets the same disparity it would get inside the whole clip."""
    if not max_disparity > 0:
        raise GeometryError(f"max_disparity must be > 0 pixels, got {max_disparity}")
    if not 0.0 <= convergence <= 1.0:
        raise GeometryError(f"convergence must be in [0, 1], got {convergence}")
    lo, hi = value_range
    normalised = (inverse.float() - lo) / max(hi - lo, eps)
    return (normalised - convergence) * max_disparity


# --- windowed estimation ------------------------------------------------------------------------------
def fit_scale_shift(x: np.ndarray, y: np.ndarray, max_samples: int = 200_000) -> tuple[float, float]:
    """Least squares (s, b) minimising |s x + b - y|^2 over all elements (strided subsample if large)."""
    x, y = x.reshape(-1).astype(np.float64), y.reshape(-1).astype(np.float64)
    step = max(1, x.size // max_samples)
    x, y = x[::step], y[::step]
    A = np.stack([x, np.ones_like(x)], 1)
    if np.ptp(x) < 1e-12:  # a flat overlap fixes the shift only
        return 1.0, float(y.mean() - x.mean())
    (s, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(s), float(b)


def blend_windows(
    predict: Callable[[int, int], np.ndarray],
    num_frames: int,
    write: Callable[[int, np.ndarray], None],
    window: int = DEPTH_WINDOW,
    overlap: int = DEPTH_OVERLAP,
) -> None:
    """Relative depth of a whole video from overlapping windows.

    predict(start, stop) -> float [t, H, W] relative inverse depth of frames [start, stop) (own scale and
    shift per call). Window k is aligned to the already-blended previous frames on the overlap (least
    squares scale + shift), then blended linearly across the overlap (weight of the new window rising
    from 1/(o+1) to o/(o+1)); write(start, frames) receives each frame range once it is final. Only the
    overlap of the previous window stays in memory.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ConfigError(f"depth window {window} / overlap {overlap}: need window >= 1 and 0 <= overlap < window")
    tail: np.ndarray | None = None  # the previous window's last `overlap` frames, aligned, not yet written
    start = 0
    while True:
        stop = min(start + window, num_frames)
        cur = np.asarray(predict(start, stop), dtype=np.float32)
        o = 0 if tail is None else tail.shape[0]
        if o:
            s, b = fit_scale_shift(cur[:o], tail)
            cur = s * cur + b
            w = (np.arange(1, o + 1, dtype=np.float32) / (o + 1))[:, None, None]
            cur[:o] = (1 - w) * tail + w * cur[:o]
        if stop == num_frames:
            write(start, cur)
            break
        keep = min(overlap, cur.shape[0] - 1)
        write(start, cur[: cur.shape[0] - keep])
        tail = cur[cur.shape[0] - keep :].copy() if keep else None
        start = stop - keep


def load_depth_pipeline(model_dir: str | Path, device: str = "cpu"):
    """transformers' depth-estimation pipeline from a local directory (no downloads)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(
            f"depth model directory {path} does not exist; put a transformers depth-estimation model there "
            "(e.g. Depth Anything V2: config.json, weights and preprocessor_config.json) or pass --depth FILE"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"depth model directory {path} has no config.json (not a transformers model directory)")
    try:
        from transformers import pipeline

        return pipeline("depth-estimation", model=str(path), device=device, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError / ValueError / KeyError
        raise ModelError(f"cannot load depth model {path}: {str(err).splitlines()[0]}") from err


def estimate_depth(
    video: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    window: int = DEPTH_WINDOW,
    overlap: int = DEPTH_OVERLAP,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = False,
) -> NpyDepth:
    """Relative inverse depth of `video` by the model in `model_dir`, written to `out_path` (.npy, memory-mapped)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from lightning_m2s.data.video_io import read_frames, video_info

    info = video_info(video)
    pipe = load_depth_pipeline(model_dir, device)
    T, H, W = info.num_frames, info.height, info.width
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(T, H, W))
    cache: dict[int, np.ndarray] = {}  # per-frame predictions of the overlap: an image model needs them once
    bar = tqdm(total=T, desc="depth", unit="frame", disable=not progress)

    def predict(start: int, stop: int) -> np.ndarray:
        todo = [i for i in range(start, stop) if i not in cache]
        for b in range(0, len(todo), batch_size):
            idx = todo[b : b + batch_size]
            frames = read_frames(video, idx)
            results = pipe([Image.fromarray(f) for f in frames])
            results = results if isinstance(results, list) else [results]
            for i, r in zip(idx, results):
                d = torch.as_tensor(r["predicted_depth"]).float().reshape(1, 1, *r["predicted_depth"].shape[-2:])
                if d.shape[-2:] != (H, W):
                    d = F.interpolate(d, size=(H, W), mode="bilinear", align_corners=False)
                cache[i] = d[0, 0].numpy()
            bar.update(len(idx))
        pred = np.stack([cache[i] for i in range(start, stop)])
        for i in [i for i in cache if i < stop - overlap]:
            del cache[i]
        return pred

    def write(start: int, frames: np.ndarray) -> None:
        out[start : start + frames.shape[0]] = frames

    blend_windows(predict, T, write, window, overlap)
    bar.close()
    out.flush()
    del out  # unmapped: the written pages leave the process
    return NpyDepth(Path(out_path), "inverse")
