"""Sources: the synthetic renderer's geometry is exact, real-pair clips are consistent, adapters read their layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lightning_m2s.data.sources import Ego4DSource, FolderSource, ImagePairSource, Stereo4DSource, SyntheticSource, build_source
from lightning_m2s.data.sources.image_pairs import fill_unknown_disparity
from lightning_m2s.errors import ConfigError, DataError
from lightning_m2s.geometry import forward_splat

FRAMES = np.arange(0, 150, 15)


def _splat_views(r):
    """Splat the left view (and its disparity as a 4th channel) to the right view."""
    left = torch.from_numpy(r["left"]).permute(0, 3, 1, 2).float()
    right = torch.from_numpy(r["right"]).permute(0, 3, 1, 2).float()
    d = torch.from_numpy(r["disparity"])
    warped, holes = forward_splat(torch.cat([left, d[:, None]], 1), d)
    # pixels where the splat shows the surface the right view shows (elsewhere a farther surface lands on a
    # pixel whose true surface is hidden in the left view: a warping limit, not a rendering error)
    same_surface = ~holes & ((warped[:, 3] - torch.from_numpy(r["right_disparity"])).abs() < 0.5)
    err = (warped[:, :3] - right).abs().amax(1)  # [T, H, W], 0-255 levels
    return err, holes, same_surface, (left - right).abs().amax(1)


@pytest.mark.parametrize("video", [0, 1, 2, 3])
def test_synthetic_right_view_is_exact_splat_of_left(video):
    # Whole-pixel mode: every layer is an integer translation of its texture, so the splat (one tap of
    # weight 1) copies left pixels exactly: any difference above float rounding is a geometry bug.
    r = SyntheticSource(subpixel=False, fence_prob=0.5).render(video, FRAMES)
    err, holes, same, _ = _splat_views(r)
    nonhole = ~holes
    assert same.float().mean() > 0.8  # the check covers most of the frame
    assert err[same].max() < 1e-3
    # the other non-hole pixels are rare (right-view surfaces hidden in the left view)
    assert (nonhole & (err > 1e-3)).float().sum() / nonhole.sum() < 0.03


def test_synthetic_subpixel_views_agree_within_interpolation_error():
    # Sub-pixel mode: both views sample the textures bilinearly at different phases and the splat
    # interpolates linearly once more; the residual is interpolation error (~1 level) plus uint8 rounding
    # (<= 0.5), far below the difference between the unwarped views.
    r = SyntheticSource(subpixel=True).render(1, FRAMES)
    err, holes, same, unwarped = _splat_views(r)
    assert err[same].mean() < 2.5
    assert err[same].mean() < 0.15 * unwarped.mean()


def test_synthetic_is_deterministic_by_seed_and_index():
    a = SyntheticSource(seed=3).read(2, [0, 5, 9])
    b = pickle.loads(pickle.dumps(SyntheticSource(seed=3))).read(2, [0, 5, 9])  # as a worker gets it
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = SyntheticSource(seed=4).read(2, [0, 5, 9])
    d = SyntheticSource(seed=3).read(1, [0, 5, 9])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


def test_synthetic_has_disocclusions_and_moving_occluders():
    src = SyntheticSource()
    W = src.size[1]
    for video in range(4):
        r = src.render(video, [0, 60])
        d = torch.from_numpy(r["disparity"])
        _, holes = forward_splat(torch.zeros(2, 1, *src.size), d)
        interior = holes[:, :, : W - int(src.max_disparity) - 1]  # not the right border strip
        assert interior.float().mean() > 0.005, "no disocclusions beside foreground objects"
        # background hidden in one frame and visible in the other: the near layer moved
        assert ((d[0] - d[1]).abs() > 1.0).float().mean() > 0.01


def test_synthetic_num_objects_sets_the_depth_edges_of_a_scene():
    def interior_holes(src):  # holes beside depth edges (not the right border strip), over 6 scenes
        fractions = []
        for video in range(6):
            r = src.render(video, [0, 40])
            _, holes = forward_splat(torch.zeros(2, 1, *src.size), torch.from_numpy(r["disparity"]))
            fractions.append(holes[:, :, : src.size[1] - 21].float().mean().item())
        return np.mean(fractions)

    sparse = SyntheticSource(num_objects=(1, 1), max_disparity=20, fence_prob=0)
    dense = SyntheticSource(num_objects=(5, 5), max_disparity=20, fence_prob=0)
    assert [len(src._scene(0)[0]) for src in (sparse, dense)] == [2 + 1, 2 + 5]  # background, hill, objects
    assert interior_holes(dense) > 1.3 * interior_holes(sparse)  # measured 0.074 vs 0.047
    with pytest.raises(ConfigError, match="num_objects"):
        SyntheticSource(num_objects=(3, 1))


def test_synthetic_disparity_errors_change_only_the_warping_disparity():
    exact = SyntheticSource(fence_prob=1.0).render(0, [0, 30])
    noisy_src = SyntheticSource(fence_prob=1.0, error_blur=1.5, error_scale=0.2, error_thin=True)
    left, right, warp = noisy_src.read(0, [0, 30])
    np.testing.assert_array_equal(left, exact["left"])
    np.testing.assert_array_equal(right, exact["right"])
    levels = np.unique(exact["disparity"])
    off = np.abs(warp[..., None] - levels).min(-1) > 0.05  # values no layer has: blurred edges, scale
    assert off.mean() > 0.2
    # the fence is missed: at fence pixels the warping disparity is the farther one behind it
    assert (warp < exact["disparity"] - 1.0).mean() > 0.01


def test_fill_unknown_disparity_uses_the_far_side():
    d = np.array([[5.0, np.inf, np.inf, 9.0], [np.inf, 3.0, 7.0, np.inf]], dtype=np.float32)
    np.testing.assert_array_equal(fill_unknown_disparity(d), [[5, 5, 5, 9], [3, 3, 7, 7]])


def test_image_pair_clips_are_finite_and_consistent():
    src = ImagePairSource(num_clips=3, size=96, num_frames=30)
    first = None
    for clip in range(3):
        left, right, d = src.read(clip, [0, 14, 29])
        assert left.shape == right.shape == (3, 96, 96, 3) and d.shape == (3, 96, 96)
        assert np.isfinite(d).all() and d.min() >= 0
        r = {"left": left, "right": right, "disparity": d, "right_disparity": np.zeros_like(d)}
        err, holes, _, unwarped = _splat_views(r)
        # real pair, real ground truth: the warp explains the right view far better than no warp
        assert err[~holes].mean() < 0.35 * unwarped.mean()
        first = left if first is None else first
    assert not np.array_equal(first, left)  # different window paths
    w = src.windows(0, [0, 29])
    assert (w[0] != w[1]).any()  # the window moves: a camera pan


def test_folder_source_reads_its_layout(tmp_path, stereo_arrays, layouts):
    left, right, disp = stereo_arrays
    layouts["folder"](tmp_path, "clip_a", left, right, disp)
    layouts["folder"](tmp_path, "clip_b", left[:6], right[:6], disp[:6])
    src = FolderSource(tmp_path)
    assert len(src) == 2 and src.names == ["clip_a", "clip_b"]
    assert src.info(0).num_frames == 12 and src.info(1).num_frames == 6 and src.info(0).fps == 30
    l, r, d = src.read(0, [1, 3, 5])
    np.testing.assert_array_equal(l, left[[1, 3, 5]])  # lossless video: bit exact
    np.testing.assert_array_equal(r, right[[1, 3, 5]])
    np.testing.assert_array_equal(d, disp[[1, 3, 5]])
    assert len(FolderSource(tmp_path, videos=["clip_b"])) == 1


@pytest.mark.parametrize("nested", [True, False])
def test_stereo4d_source_reads_its_layouts(tmp_path, stereo_arrays, layouts, nested):
    left, right, disp = stereo_arrays
    layouts["stereo4d"](tmp_path, "vidA_123", left, right, disp, nested=nested)
    src = build_source("stereo4d", root=str(tmp_path))
    assert src.names == ["vidA_123"]
    l, r, d = src.read(0, [0, 11])
    np.testing.assert_array_equal(l, left[[0, 11]])
    np.testing.assert_array_equal(r, right[[0, 11]])
    np.testing.assert_allclose(d, disp[[0, 11]])  # disparity = -fwd x flow
    _, _, d_auto = Stereo4DSource(tmp_path, flow_sign="auto").read(0, [0, 11])
    np.testing.assert_allclose(d_auto, disp[[0, 11]])


@pytest.mark.parametrize("png", [True, False])
def test_ego4d_source_reads_its_layout(tmp_path, stereo_arrays, layouts, png):
    left, right, disp = stereo_arrays
    layouts["ego4d"](tmp_path, "uuid_clip_0001", left, right, disp, png=png)
    src = Ego4DSource(tmp_path)
    assert src.names == ["uuid_clip_0001"] and src.info(0).width == 64
    l, r, d = src.read(0, [2, 7])
    np.testing.assert_array_equal(l, left[[2, 7]])
    np.testing.assert_array_equal(r, right[[2, 7]])
    np.testing.assert_allclose(d, disp[[2, 7]], atol=0.5 / 256)  # 16-bit PNG stores disparity * 256


@pytest.mark.parametrize("width", [48, 72])
def test_small_frame_widths_read_exactly(tmp_path, width):
    # decord mis-sizes some small widths; reading falls back to PyAV and stays exact.
    from lightning_m2s.data.video_io import read_frames, write_video

    frames = np.random.default_rng(0).integers(0, 256, (6, 24, width, 3), dtype=np.uint8)
    path = write_video(tmp_path / "small.mp4", frames, lossless=True)
    assert np.array_equal(read_frames(path, [1, 4]), frames[[1, 4]])


def test_stereo4d_released_warps_replace_the_splat(tmp_path, stereo_arrays):
    """The M2SVid release's layout: offline warps in reprojected/ and reprojected_mask/, no flow file read."""
    from conftest import write_stereo4d_clip

    from lightning_m2s.data.dataset import StereoClipDataset
    from lightning_m2s.data.video_io import write_video

    left, right, disp = stereo_arrays
    write_stereo4d_clip(tmp_path, "vidB", left, right, disp, nested=False)
    warped, holes = forward_splat(torch.from_numpy(left).permute(0, 3, 1, 2).float(), torch.from_numpy(disp))
    write_video(tmp_path / "reprojected" / "vidB.mp4", warped.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(),
                30.0, lossless=True)
    write_video(tmp_path / "reprojected_mask" / "vidB.mp4", (holes[..., None] * 255).byte().expand(-1, -1, -1, 3).numpy(),
                30.0, lossless=True)
    (tmp_path / "flows_stereo" / "vidB-flows_stereo.pkl").unlink()  # never needed

    def eval_clip(source):
        ds = StereoClipDataset([source], [1.0], train=False, eval_frames=4, eval_size=(64, 64), eval_fps=30.0, close_kernel=3)
        return ds[0]

    released = eval_clip(Stereo4DSource(tmp_path, warps="released"))
    assert torch.isnan(released.disparity).all()  # unknown: the warp was made offline
    write_stereo4d_clip(tmp_path / "flows", "vidB", left, right, disp)
    splatted = eval_clip(Stereo4DSource(tmp_path / "flows"))  # the same warp, made in the pipeline
    assert torch.equal(released.mask, splatted.mask) and released.mask.any()
    assert (released.warped - splatted.warped).abs().max() <= 1 / 127.5 + 1e-6  # uint8 video vs float

    (tmp_path / "reprojected_mask" / "vidB.mp4").unlink()
    with pytest.raises(DataError, match="reprojected_mask/vidB.mp4 not found"):
        Stereo4DSource(tmp_path, warps="released").read_warp(0, [0, 1])
    with pytest.raises(ConfigError, match="warps"):
        Stereo4DSource(tmp_path, warps="offline")


def test_ego4d_released_warps(tmp_path, stereo_arrays):
    from lightning_m2s.data.video_io import write_video

    left, right, disp = stereo_arrays
    write_video(tmp_path / "uuid_clip_0002.mp4", np.concatenate([left, right], axis=2), 30.0, lossless=True)
    holes = np.zeros(disp.shape, dtype=bool)
    holes[:, 10:20, 30:40] = True
    write_video(tmp_path / "reprojected" / "uuid_clip_0002.mp4", right, 30.0, lossless=True)
    write_video(tmp_path / "reprojected_mask" / "uuid_clip_0002.mp4", np.repeat(holes[..., None] * 255, 3, -1).astype(np.uint8),
                30.0, lossless=True)
    src = Ego4DSource(tmp_path, warps="released")  # no disparity files: the clips are the warps'
    assert src.names == ["uuid_clip_0002"]
    l, r, d = src.read(0, [1, 4])
    assert d is None
    warped, mask = src.read_warp(0, [1, 4])
    np.testing.assert_array_equal(warped, right[[1, 4]])
    np.testing.assert_array_equal(mask, holes[[1, 4]])


def test_stereo4d_flow_outliers_become_counted_holes(tmp_path, stereo_arrays):
    """Negative-disparity outliers (occlusions, sky) are holes of the warp, counted per clip; a clip fails only
    when more than max_outlier_fraction of its sampled pixels are outliers (a wrong flow sign, not noise)."""
    from conftest import write_stereo4d_clip

    from lightning_m2s.data.dataset import StereoClipDataset

    left, right, disp = stereo_arrays
    noisy = disp.copy()
    noisy[:, 20:28, 30:40] = -6.0  # 80 outlier pixels per frame, 2% of each 64x64 frame
    noisy[:, 0:4, 0:4] = -0.5  # noise within the tolerance: clamped to 0, not an outlier
    write_stereo4d_clip(tmp_path / "noisy", "v1", left, right, noisy)
    write_stereo4d_clip(tmp_path / "clean", "v1", left, right, disp)
    _, _, d = Stereo4DSource(tmp_path / "noisy").read(0, [0, 5])
    assert np.isnan(d[:, 20:28, 30:40]).all() and np.isnan(d).sum() == 2 * 80
    assert (d[:, 0:4, 0:4] == 0).all()

    def eval_clip(root):
        ds = StereoClipDataset([Stereo4DSource(root)], train=False, eval_frames=4, eval_size=64, eval_fps=30.0,
                               close_kernel=1)
        return ds[0]

    noisy_clip, clean = eval_clip(tmp_path / "noisy"), eval_clip(tmp_path / "clean")
    assert noisy_clip.meta["disparity_outliers"] == 4 * 80 and noisy_clip.meta["disparity_pixels"] == 4 * 64 * 64
    assert torch.isnan(noisy_clip.disparity).sum() == 4 * 80  # unknown where the flow was an outlier
    assert torch.isfinite(noisy_clip.warped).all()
    # the outliers landed nowhere: where only they would have landed, the warp has new holes
    assert (noisy_clip.holes >= clean.holes).all() and noisy_clip.holes.sum() > clean.holes.sum()
    assert clean.meta["disparity_outliers"] == 0

    many = disp.copy()
    many[:, :, :24] = -6.0  # 3/8 of every frame
    write_stereo4d_clip(tmp_path / "bad", "v1", left, right, many)
    with pytest.raises(DataError, match=r"v1-flows_stereo.pkl: 37.5% .*max_outlier_fraction 25.0%"):
        Stereo4DSource(tmp_path / "bad").read(0, [0])
    Stereo4DSource(tmp_path / "bad", max_outlier_fraction=0.5).read(0, [0])  # a documented, configurable bound
    with pytest.raises(ConfigError, match="max_outlier_fraction"):
        Stereo4DSource(tmp_path / "bad", max_outlier_fraction=2)
