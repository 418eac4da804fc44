"""Procedural layered-parallax stereo video with exact left view, right view and disparity.

A scene is 3-5 textured layers at constant disparities (far to near): a background plane, a mid
"hill" with a wavy top edge, 1-2 foreground objects (ellipses, boxes, polygons) with their own motion,
and optionally a thin fence. Textures are cut from photographs scikit-image ships. The camera pans:
a layer of disparity d moves by `pan(t) * d` pixels, so parallax is real. Each view is rendered
directly (painter's algorithm, far to near) with the layer shifted by -d in the right view, so the
right view holds content the left view hides (disocclusions) and background that hides and shows as
objects move. Frames are rendered on demand, so a video can be long at no cost.

Optional disparity errors make the returned (warping) disparity look like a monocular estimate while
the views stay exact: Gaussian-blurred depth edges (flying pixels), a global scale error per video, and
a fence whose disparity is missed (it takes the disparity behind it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.data.sources.base import StereoSource
from lightning_m2s.data.video_io import VideoInfo
from lightning_m2s.errors import ConfigError

# Bundled scikit-image photographs used as textures (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina")
_photo_cache: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    if name not in _photo_cache:
        import skimage.data

        img = getattr(skimage.data, name)()
        _photo_cache[name] = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, -1)
    return _photo_cache[name]


@dataclass
class Layer:
    texture: np.ndarray  # float32 [2H + H + 1, 2W + W + 1, 3]: period (2H, 2W) (mirror-tiled, no seams), wrap-padded
    disparity: float  # pixels, constant over the layer
    shape: str  # "all", "hill", "ellipse", "box", "polygon", "fence"
    params: dict
    motion: tuple[float, float, float, float, float, float]  # own motion: vx, vy, ax, ay, freq, phase


class SyntheticSource(StereoSource):
    """`num_videos` procedural stereo videos, deterministic by (seed, index).

    size: (height, width) of the rendered views; num_frames, fps: of each video; max_disparity: of the
    nearest layer in pixels (min_disparity for the background); pan_speed: pixels per frame of the
    nearest layer (upper bound); fence_prob: chance of a thin fence layer; subpixel: False rounds
    positions and disparities to whole pixels (exact pixel copies, for geometry tests);
    error_blur (px sigma), error_scale (std of the log scale factor), error_thin (miss the fence):
    errors of the returned disparity only. num_objects: (min, max) foreground objects per scene (more
    objects, more depth edges and disocclusions).
    """

    name = "synthetic"

    def __init__(
        self,
        num_videos: int = 64,
        size: tuple[int, int] | int = (128, 128),
        num_frames: int = 150,
        fps: float = 30.0,
        seed: int = 0,
        max_disparity: float = 10.0,
        min_disparity: float = 0.5,
        pan_speed: float = 0.6,
        fence_prob: float = 0.3,
        num_objects: tuple[int, int] = (1, 2),
        subpixel: bool = True,
        error_blur: float = 0.0,
        error_scale: float = 0.0,
        error_thin: bool = False,
        cache_scenes: int = 8,
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if num_videos < 1 or num_frames < 1 or min(self.size) < 8:
            raise ConfigError(
                f"synthetic: num_videos, num_frames must be >= 1 and size >= 8, got {num_videos}, {num_frames}, {self.size}"
            )
        if not 0 <= min_disparity < max_disparity:
            raise ConfigError(f"synthetic: need 0 <= min_disparity < max_disparity, got {min_disparity}, {max_disparity}")
        self.num_videos, self.num_frames, self.fps, self.seed = int(num_videos), int(num_frames), float(fps), int(seed)
        self.max_disparity, self.min_disparity = float(max_disparity), float(min_disparity)
        self.pan_speed, self.fence_prob, self.subpixel = float(pan_speed), float(fence_prob), bool(subpixel)
        self.error_blur, self.error_scale, self.error_thin = float(error_blur), float(error_scale), bool(error_thin)
        self.num_objects = tuple(int(n) for n in num_objects)
        if len(self.num_objects) != 2 or not 0 <= self.num_objects[0] <= self.num_objects[1]:
            raise ConfigError(f"synthetic: num_objects must be (min, max) with 0 <= min <= max, got {num_objects}")
        self.cache_scenes = int(cache_scenes)
        self._scenes: OrderedDict[int, tuple[list[Layer], dict]] = OrderedDict()  # per process, rebuilt on demand

    def __len__(self) -> int:
        return self.num_videos

    def info(self, i: int) -> VideoInfo:
        return VideoInfo(f"synthetic-{self.seed}-{i}", self.num_frames, self.fps, *self.size)

    def describe(self, i: int) -> str:
        return f"synthetic scene (seed {self.seed}, video {i})"

    def __getstate__(self):  # workers rebuild scenes; do not pickle textures
        state = self.__dict__.copy()
        state["_scenes"] = OrderedDict()
        return state

    # ---- scene construction -------------------------------------------------------------------------
    def _texture(self, rng: np.random.Generator) -> np.ndarray:
        H, W = self.size
        img = _photo(PHOTOS[rng.integers(len(PHOTOS))])
        side = int(rng.uniform(0.25, 0.9) * min(img.shape[:2]))  # texture scale varies per layer
        y0, x0 = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
        crop = torch.from_numpy(np.ascontiguousarray(img[y0 : y0 + side, x0 : x0 + side])).permute(2, 0, 1)[None].float()
        tex = F.interpolate(crop, size=(H, W), mode="bilinear", antialias=True, align_corners=False)[0]
        tex = tex.permute(1, 2, 0).numpy() * rng.uniform(0.7, 1.15, size=3).astype(np.float32)  # tint layers apart
        tex = np.concatenate([tex, tex[:, ::-1]], 1)  # mirror tiling: periodic with period (2H, 2W), no seam
        tex = np.concatenate([tex, tex[::-1]], 0)
        # wrap-pad by one frame (+1 for the bilinear tap) so every shifted window is a plain slice
        tex = np.pad(tex, ((0, H + 1), (0, W + 1), (0, 0)), mode="wrap")
        return np.ascontiguousarray(np.clip(tex, 0, 255).astype(np.float32))

    def _scene(self, i: int) -> tuple[list[Layer], dict]:
        if i in self._scenes:
            self._scenes.move_to_end(i)
            return self._scenes[i]
        H, W = self.size
        rng = np.random.default_rng([self.seed, i])
        n_objects = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        has_fence = bool(rng.random() < self.fence_prob)
        kinds = ["all", "hill"] + ["object"] * n_objects + (["fence"] if has_fence else [])
        # Disparities far to near: stratified over [min, max], at least 1.5 px apart (2 when integer) so
        # the splat's depth test (tolerance 1 px) separates the layers.
        K = len(kinds)
        edges = np.linspace(self.min_disparity, self.max_disparity, K + 1)
        disp = edges[:-1] + (edges[1:] - edges[:-1]) * rng.uniform(0.3, 0.7, K)
        disp[0] = self.min_disparity + (edges[1] - edges[0]) * rng.uniform(0.0, 0.5)
        gap = 1.5 if self.subpixel else 2.0
        for k in range(1, K):
            disp[k] = max(disp[k], disp[k - 1] + gap)
        if not self.subpixel:
            disp = np.round(disp)
            for k in range(1, K):
                disp[k] = max(disp[k], disp[k - 1] + gap)
        # Camera pan in units of "pixels per pixel of disparity": the nearest layer moves <= pan_speed px/frame.
        scale = W / 128.0
        pan = {
            "vx": rng.uniform(0.3, 1.0) * rng.choice([-1, 1]) * self.pan_speed * scale / self.max_disparity,
            "vy": rng.uniform(-0.3, 0.3) * self.pan_speed * scale / self.max_disparity,
            "wobble": rng.uniform(0, 1.0) * scale / self.max_disparity,
            "freq": rng.uniform(0.01, 0.05),
        }
        mid_t = (self.num_frames - 1) / 2
        layers = []
        for k, kind in enumerate(kinds):
            d = float(disp[k])
            motion = (0.0,) * 5 + (0.0,)
            params: dict = {}
            if kind == "hill":
                params = {"h0": rng.uniform(0.45, 0.75) * H, "amp": rng.uniform(0.03, 0.12) * H,
                          "k": rng.uniform(1, 4) * 2 * math.pi / W, "phi": rng.uniform(0, 2 * math.pi)}
            elif kind == "object":
                kind = str(rng.choice(["ellipse", "box", "polygon"]))
                vx = rng.uniform(-0.6, 0.6) * scale
                motion = (vx, rng.uniform(-0.2, 0.2) * scale, rng.uniform(0, 0.15) * W, rng.uniform(0, 0.05) * H,
                          rng.uniform(0.02, 0.08), rng.uniform(0, 2 * math.pi))
                # centre so the object is in view mid-video, wherever the pan and its motion carry it
                cx = rng.uniform(0.25, 0.75) * W - self._offset(pan, motion, d, mid_t)[0]
                cy = rng.uniform(0.35, 0.75) * H - self._offset(pan, motion, d, mid_t)[1]
                params = {"cx": cx, "cy": cy, "rx": rng.uniform(0.1, 0.25) * W, "ry": rng.uniform(0.1, 0.3) * H,
                          "n": int(rng.integers(3, 8)), "rot": rng.uniform(0, 2 * math.pi)}
            elif kind == "fence":
                params = {"period": rng.uniform(0.12, 0.3) * W, "width": rng.uniform(1.0, 3.0) * scale,
                          "rail": rng.uniform(0.2, 0.5) * H, "rail_h": rng.uniform(1.0, 3.0) * scale}
            layers.append(Layer(self._texture(rng), d, kind, params, motion))
        scale_error = float(np.exp(rng.normal(0.0, self.error_scale))) if self.error_scale > 0 else 1.0
        scene = (layers, {"pan": pan, "scale_error": scale_error})
        self._scenes[i] = scene
        while len(self._scenes) > self.cache_scenes:
            self._scenes.popitem(last=False)
        return scene

    @staticmethod
    def _offset(pan: dict, motion, d: float, t: float) -> tuple[float, float]:
        """Left-view position of a layer at frame t: camera parallax (proportional to d) + own motion."""
        vx, vy, ax, ay, freq, phase = motion
        px = pan["vx"] * t + pan["wobble"] * math.sin(2 * math.pi * pan["freq"] * t)
        py = pan["vy"] * t
        return (-px * d + vx * t + ax * math.sin(2 * math.pi * freq * t + phase),
                -py * d + vy * t + ay * math.sin(2 * math.pi * freq * t + phase + 1.0))

    # ---- rendering ----------------------------------------------------------------------------------
    def _alpha(self, layer: Layer, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
        """Coverage of a layer at layer coordinates u [1, W], v [H, 1] (hard edges: exact geometry)."""
        p = layer.params
        if layer.shape == "all":
            return None
        if layer.shape == "hill":
            return v >= p["h0"] + p["amp"] * np.sin(p["k"] * u + p["phi"])
        if layer.shape == "fence":
            posts = np.mod(u, p["period"]) < p["width"]
            rail = np.abs(v - p["rail"]) < p["rail_h"] / 2
            return posts | rail
        du, dv = (u - p["cx"]) / p["rx"], (v - p["cy"]) / p["ry"]
        if layer.shape == "ellipse":
            return du**2 + dv**2 <= 1.0
        if layer.shape == "box":
            return (np.abs(du) <= 0.8) & (np.abs(dv) <= 0.8)
        # regular polygon: inside when the distance along every edge normal is within the apothem
        ang = np.arctan2(dv, du) - p["rot"]
        sector = 2 * math.pi / p["n"]
        r = np.hypot(du, dv)
        return r * np.cos(np.mod(ang, sector) - sector / 2) <= math.cos(sector / 2)

    def _sample(self, tex: np.ndarray, ox: float, oy: float) -> np.ndarray:
        """Texture translated by (ox, oy), bilinear between the 4 integer shifts: [H, W, 3]."""
        H, W = self.size
        PH, PW = 2 * H, 2 * W  # period of the mirror-tiled texture
        iu, iv = math.floor(-ox), math.floor(-oy)
        fu, fv = np.float32(-ox - iu), np.float32(-oy - iv)
        r, c = iv % PH, iu % PW
        win = lambda dr, dc: tex[r + dr : r + dr + H, c + dc : c + dc + W]  # noqa: E731
        top = win(0, 0) if fu == 0 else (1 - fu) * win(0, 0) + fu * win(0, 1)
        if fv == 0:
            return top
        bottom = win(1, 0) if fu == 0 else (1 - fu) * win(1, 0) + fu * win(1, 1)
        return (1 - fv) * top + fv * bottom

    def render(self, i: int, frame_indices) -> dict[str, np.ndarray]:
        """All streams of video i: left, right uint8 [T, H, W, 3]; disparity (exact, left view),
        right_disparity (exact, right view), warp_disparity (with the configured errors) float32 [T, H, W]."""
        layers, extra = self._scene(i)
        H, W = self.size
        x = np.arange(W, dtype=np.float32)[None, :]
        y = np.arange(H, dtype=np.float32)[:, None]
        out = {k: [] for k in ("left", "right", "disparity", "right_disparity", "miss_thin")}
        for t in frame_indices:
            for view in ("left", "right"):
                img = np.empty((H, W, 3), np.float32)
                dmap = np.empty((H, W), np.float32)
                dmap_nofence = np.empty((H, W), np.float32)
                for layer in layers:  # painter's algorithm, far to near
                    ox, oy = self._offset(extra["pan"], layer.motion, layer.disparity, float(t))
                    if not self.subpixel:
                        ox, oy = round(ox), round(oy)
                    if view == "right":
                        ox -= layer.disparity  # the right view sees the layer shifted by -d
                    a = self._alpha(layer, x - ox, y - oy)
                    colour = self._sample(layer.texture, ox, oy)
                    if a is None:
                        img[:], dmap[:], dmap_nofence[:] = colour, layer.disparity, layer.disparity
                    else:
                        a = np.broadcast_to(a, (H, W))
                        np.copyto(img, colour, where=a[..., None])
                        np.copyto(dmap, np.float32(layer.disparity), where=a)
                        if layer.shape != "fence":
                            np.copyto(dmap_nofence, np.float32(layer.disparity), where=a)
                out[view].append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
                if view == "left":
                    out["disparity"].append(dmap)
                    out["miss_thin"].append(dmap_nofence)
                else:
                    out["right_disparity"].append(dmap)
        res = {k: np.stack(v) for k, v in out.items()}
        warp = res.pop("miss_thin") if self.error_thin else res["disparity"].copy()
        if self.error_blur > 0:
            from scipy.ndimage import gaussian_filter

            warp = gaussian_filter(warp, sigma=(0, self.error_blur, self.error_blur), mode="nearest")
        res["warp_disparity"] = (warp * extra["scale_error"]).astype(np.float32)
        res.pop("miss_thin", None)
        return res

    def _read(self, i: int, frame_indices: np.ndarray):
        r = self.render(i, frame_indices)
        return r["left"], r["right"], r["warp_disparity"]
