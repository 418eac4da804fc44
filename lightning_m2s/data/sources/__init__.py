"""Stereo video sources by name (a plain dict registry): config `{name: <source>, weight: w, **options}`."""

from __future__ import annotations

from lightning_m2s.data.sources.base import StereoSource
from lightning_m2s.data.sources.ego4d import Ego4DSource
from lightning_m2s.data.sources.folder import FolderSource
from lightning_m2s.data.sources.image_pairs import ImagePairSource
from lightning_m2s.data.sources.stereo4d import Stereo4DSource
from lightning_m2s.data.sources.synthetic import SyntheticSource
from lightning_m2s.errors import ConfigError

SOURCES: dict[str, type[StereoSource]] = {
    "synthetic": SyntheticSource,  # procedural layered-parallax scenes, exact ground truth
    "image_pairs": ImagePairSource,  # camera-pan clips over the real Middlebury pair scikit-image ships
    "stereo4d": Stereo4DSource,  # rectified clips + flows_stereo.pkl
    "ego4d": Ego4DSource,  # side-by-side rectified clips + 16-bit PNG / npz disparity
    "folder": FolderSource,  # users' own: <video>/left.mp4, right.mp4, disparity.npz
}


def build_source(name: str, key: str = "name", **options) -> StereoSource:
    """The source `name` built with `options`; unknown names or options raise ConfigError naming the key."""
    if name not in SOURCES:
        raise ConfigError(f"unknown source {name!r} (key {key!r}); choose from {sorted(SOURCES)}")
    cls = SOURCES[name]
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for source {name!r}; allowed: {sorted(allowed)}")
    return cls(**options)


__all__ = ["SOURCES", "StereoSource", "build_source", "SyntheticSource", "ImagePairSource",
           "Stereo4DSource", "Ego4DSource", "FolderSource"]
