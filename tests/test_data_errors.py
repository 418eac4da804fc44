"""Bad input gives an explicit project error that names the file or key, never a silent wrong sample."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_m2s.data import StereoClipDataset, StereoDataModule, build_source
from lightning_m2s.data.sources import FolderSource, Stereo4DSource, SyntheticSource
from lightning_m2s.data.video_io import read_frames, write_video
from lightning_m2s.errors import ConfigError, DataError


def folder(tmp_path, stereo_arrays, layouts, **change):
    left, right, disp = stereo_arrays
    arrays = {"left": left, "right": right, "disparity": disp, **change}
    return layouts["folder"](tmp_path, "clip", arrays["left"], arrays["right"], arrays["disparity"])


def test_missing_video(tmp_path, stereo_arrays, layouts):
    d = folder(tmp_path, stereo_arrays, layouts)
    (d / "right.mp4").unlink()
    with pytest.raises(DataError, match="not found.*right.mp4"):
        FolderSource(tmp_path).read(0, [0])
    with pytest.raises(DataError, match="nope.mp4"):
        read_frames(tmp_path / "nope.mp4")


def test_missing_disparity(tmp_path, stereo_arrays, layouts):
    d = folder(tmp_path, stereo_arrays, layouts)
    (d / "disparity.npz").unlink()
    with pytest.raises(DataError, match=f"{d}.*disparity file not found"):
        FolderSource(tmp_path).read(0, [0])


def test_corrupt_video(tmp_path, stereo_arrays, layouts):
    d = folder(tmp_path, stereo_arrays, layouts)
    (d / "left.mp4").write_bytes(b"\x00garbage" * 500)
    with pytest.raises(DataError, match="left.mp4"):
        FolderSource(tmp_path).read(0, [0])


def test_frame_count_mismatch(tmp_path, stereo_arrays, layouts):
    d = folder(tmp_path, stereo_arrays, layouts, right=stereo_arrays[1][:6])
    with pytest.raises(DataError, match=f"{d}.*frame count mismatch"):
        FolderSource(tmp_path).read(0, [0])


def test_size_mismatch(tmp_path, stereo_arrays, layouts):
    d = folder(tmp_path, stereo_arrays, layouts, right=np.ascontiguousarray(stereo_arrays[1][:, :32, :32]))
    with pytest.raises(DataError, match=f"{d}.*size mismatch"):
        FolderSource(tmp_path).read(0, [0])


def test_disparity_frame_count_mismatch(tmp_path, stereo_arrays, layouts):
    folder(tmp_path, stereo_arrays, layouts, disparity=stereo_arrays[2][:5])
    with pytest.raises(DataError, match="disparity.npz.*5 frames"):
        FolderSource(tmp_path).read(0, [0])


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, "NaN/inf"), (-2.0, "negative")])
def test_bad_disparity_values(tmp_path, stereo_arrays, layouts, bad, what):
    disp = stereo_arrays[2].copy()
    disp[3, 10, 10] = bad
    d = folder(tmp_path, stereo_arrays, layouts, disparity=disp)
    src = FolderSource(tmp_path)
    src.read(0, [0, 1])  # the good frames read fine
    with pytest.raises(DataError, match=f"{d}.*{what}"):
        src.read(0, [2, 3])


def test_stereo4d_wrong_flow_sign_names_the_flow_file(tmp_path, stereo_arrays, layouts):
    layouts["stereo4d"](tmp_path, "v1", *stereo_arrays)
    with pytest.raises(DataError, match="v1-flows_stereo.pkl.*negative"):
        Stereo4DSource(tmp_path, flow_sign="keep").read(0, [0])
    with pytest.raises(ConfigError, match="flow_sign"):
        Stereo4DSource(tmp_path, flow_sign="flip")


def test_clip_too_short(tmp_path, stereo_arrays, layouts):
    d = folder(tmp_path, stereo_arrays, layouts)  # 12 frames at 30 fps
    ds = StereoClipDataset([FolderSource(tmp_path)], train=False, eval_frames=16, eval_fps=5, eval_size=32)
    with pytest.raises(DataError, match=f"{d}.*too short"):
        ds[0]
    with pytest.raises(DataError, match=f"{d}.*shorter than requested"):
        FolderSource(tmp_path).read(0, [0, 12])


def test_unknown_source_name_and_option():
    with pytest.raises(ConfigError, match=r"unknown source 'stereo5d'.*data.train_sources\[0\].name.*synthetic"):
        StereoDataModule(train_sources=[{"name": "stereo5d"}]).setup("fit")
    with pytest.raises(ConfigError, match="unknown option.*'sise'.*synthetic"):
        build_source("synthetic", sise=64)


def test_bad_numbers_name_their_key(tmp_path):
    with pytest.raises(ConfigError, match="max_disparity"):
        SyntheticSource(max_disparity=0)  # D_max <= 0
    with pytest.raises(ConfigError, match="data.crop_scale"):
        StereoDataModule(crop_scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]"):
        StereoDataModule(buckets=["4x128", "16x60"])
    with pytest.raises(DataError, match="not found"):
        build_source("folder", root=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no stereo videos found"):
        build_source("stereo4d", root=str(tmp_path))


def test_write_video_rejects_non_uint8(tmp_path):
    with pytest.raises(DataError, match="x.mp4.*uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
