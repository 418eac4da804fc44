"""Shared data fixtures: a small exact stereo clip and writers for the on-disk dataset layouts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from lightning_m2s.data.sources.ego4d import write_disparity_pngs
from lightning_m2s.data.sources.synthetic import SyntheticSource
from lightning_m2s.data.video_io import write_video


@pytest.fixture(scope="session")
def stereo_arrays():
    """An exact stereo clip: left, right uint8 [12, 64, 64, 3], disparity float32 [12, 64, 64] (whole pixels)."""
    src = SyntheticSource(num_videos=1, size=(64, 64), num_frames=12, seed=7, max_disparity=8, subpixel=False)
    r = src.render(0, np.arange(12))
    return r["left"], r["right"], r["disparity"]


def write_folder_clip(root: Path, name: str, left, right, disparity, fps: float = 30.0) -> Path:
    d = Path(root) / name
    write_video(d / "left.mp4", left, fps, lossless=True)
    write_video(d / "right.mp4", right, fps, lossless=True)
    np.savez(d / "disparity.npz", disparity=disparity)
    return d


def write_stereo4d_clip(root: Path, vid: str, left, right, disparity, fps: float = 30.0, nested: bool = True) -> Path:
    """The Stereo4D tooling's layout (root/{vid}/...) or the M2SVid release's (left_rectified/, right_rectified/)."""
    root = Path(root)
    if nested:
        lp, rp = root / vid / f"{vid}-left_rectified.mp4", root / vid / f"{vid}-right_rectified.mp4"
        fp = root / vid / f"{vid}-flows_stereo.pkl"
    else:
        lp, rp = root / "left_rectified" / f"{vid}-left_rectified.mp4", root / "right_rectified" / f"{vid}-right_rectified.mp4"
        fp = root / "flows_stereo" / f"{vid}-flows_stereo.pkl"
    write_video(lp, left, fps, lossless=True)
    write_video(rp, right, fps, lossless=True)
    fp.parent.mkdir(parents=True, exist_ok=True)
    # left -> right flow: x moves by -d; y stays (rectified)
    flows = [{"fwd": np.stack([-d, np.zeros_like(d)], -1), "bwd": np.stack([d, np.zeros_like(d)], -1)} for d in disparity]
    with open(fp, "wb") as f:
        pickle.dump(flows, f)
    return lp


def write_ego4d_clip(root: Path, clip: str, left, right, disparity, fps: float = 30.0, png: bool = True) -> Path:
    root = Path(root)
    write_video(root / f"{clip}.mp4", np.concatenate([left, right], axis=2), fps, lossless=True)  # side by side
    if png:
        write_disparity_pngs(root / f"{clip}_disparity", disparity)
    else:
        np.savez(root / f"{clip}_disparity.npz", disparity=disparity)
    return root / f"{clip}.mp4"


@pytest.fixture
def layouts():
    """Writers for each on-disk layout: folder, stereo4d, ego4d."""
    return {"folder": write_folder_clip, "stereo4d": write_stereo4d_clip, "ego4d": write_ego4d_clip}


# --- training stack ---------------------------------------------------------------------------------

def write_tiny_svd_dir(root: Path) -> Path:
    """A random SVD checkpoint in diffusers format (the img2vid-xt layout) at tiny width: an 8-channel UNet
    beside img2vid-xt's parts (8x VAE with 4 latent channels, CLIP image encoder, scheduler)."""
    from lightning_m2s.benchmarks.convert import write_img2vid_parts
    from lightning_m2s.models.unet import build_tiny_unet

    root = Path(root)
    build_tiny_unet(seed=0, in_channels=8, out_channels=4).save_pretrained(root / "unet")
    return write_img2vid_parts(root)


@pytest.fixture(scope="session")
def tiny_svd_dir(tmp_path_factory):
    return write_tiny_svd_dir(tmp_path_factory.mktemp("tiny-svd"))


@pytest.fixture(scope="session")
def debug_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the debug experiment's module (untrained), written by a real Lightning Trainer."""
    import lightning as L

    from lightning_m2s.config import load_config
    from lightning_m2s.train import build_module

    root = tmp_path_factory.mktemp("ckpt")
    module = build_module(load_config("debug", [f"meta.output_dir={root / 'out'}"]))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(root / "model.ckpt")
    return root / "model.ckpt"


def store_overrides(root: Path) -> list[str]:
    """Config overrides that keep a run's tracking store and outputs inside `root`."""
    root = Path(root)
    return [f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"meta.output_dir={root / 'out'}"]


@pytest.fixture(autouse=True, scope="session")
def _work_root(tmp_path_factory):
    """Every test (and subprocess) writes its stores and outputs into a temporary root, never the checkout's."""
    import os

    root = tmp_path_factory.mktemp("m2s_root")
    os.environ["M2S_ROOT"] = str(root)
    yield root
