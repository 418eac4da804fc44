"""Evaluation metrics: PSNR / MS-SSIM / LPIPS per video, inside / outside the mask, temporal error."""

import math

import pytest
import torch
from skimage import data

from lightning_m2s.errors import ConfigError, DataError
from lightning_m2s.metrics import (
    StereoMetrics,
    frame_lpips,
    lpips_network,
    metric_keys,
    ms_ssim_scales,
    restrict,
    temporal_error,
    to_unit,
    video_ms_ssim,
    video_ms_ssim_released,
    video_psnr,
)


def real_video(size: int, frames: int = 4, batch: int = 1) -> torch.Tensor:
    """[B, T, 3, size, size] in [-1, 1]: the astronaut photo, panning 2 px per frame."""
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    img = torch.nn.functional.interpolate(img, size=size + 2 * frames, mode="area")[0]
    clip = torch.stack([img[:, frames:frames + size, 2 * t:2 * t + size] for t in range(frames)])
    return clip[None].repeat(batch, 1, 1, 1, 1).contiguous()


def noisy(video: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (video + sigma * torch.randn(video.shape, generator=g)).clamp(-1, 1)


def no_mask(video: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*video.shape[:2], 1, *video.shape[3:], dtype=torch.bool)


def square_mask(video: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    mask = no_mask(video)
    mask[..., lo:hi, lo:hi] = True
    return mask


@pytest.mark.filterwarnings("ignore:StereoMetrics")
def test_psnr_known_value_and_cap():
    target = torch.zeros(2, 3, 3, 16, 16)  # 0.5 in [0, 1]
    pred = torch.full_like(target, 0.2)  # 0.6 in [0, 1]: MSE 0.01 -> 20 dB
    assert video_psnr(to_unit(pred), to_unit(target)).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    m = StereoMetrics(lpips_net=None)
    m.update(pred, target, no_mask(pred))
    assert m.compute()["psnr"] == pytest.approx(20.0, abs=1e-4)
    # Out-of-range predictions are clamped to [0, 1] first: 3.0 -> 1.0, MSE 0.25 -> 6.02 dB.
    assert float(video_psnr(to_unit(torch.full_like(target, 3.0)), to_unit(target))[0]) == pytest.approx(6.0206, abs=1e-3)
    assert float(video_psnr(to_unit(target), to_unit(target))[0]) == 100.0  # capped, not inf


@pytest.mark.parametrize("size, scales", [(48, 3), (128, 4)])
def test_ms_ssim_small_resolutions(size, scales):
    assert ms_ssim_scales(size, size) == scales
    video = to_unit(real_video(size, frames=2))
    assert float(video_ms_ssim(video, video)[0]) == pytest.approx(1.0, abs=1e-5)
    vals = [float(video_ms_ssim(to_unit(noisy(video * 2 - 1, s)), video)[0]) for s in (0.02, 0.1, 0.3, 1.0)]
    assert all(math.isfinite(v) for v in vals)  # no NaN from negative contrast terms at small scales
    assert vals[0] > vals[1] > vals[2] > vals[3] and vals[0] > 0.99 and vals[2] < 0.95 and vals[3] < 0.8


def test_ms_ssim_scale_rule():
    assert ms_ssim_scales(512, 512) == 5  # the paper's resolution: standard 5-scale MS-SSIM
    assert ms_ssim_scales(256, 512) == 5
    assert ms_ssim_scales(64, 96) == 3
    with pytest.raises(DataError, match="8x8"):
        ms_ssim_scales(8, 8)


def test_whitening_semantics():
    gt = real_video(64, frames=3)
    mask = square_mask(gt, 16, 40)
    pred = torch.where(mask, noisy(gt, 0.3), gt)  # error only inside the mask
    p_in, g_in = restrict(to_unit(pred), to_unit(gt), mask, "inside")
    assert torch.all(p_in[~mask.expand_as(p_in)] == 1.0) and torch.all(g_in[~mask.expand_as(g_in)] == 1.0)
    p_out, _ = restrict(to_unit(pred), to_unit(gt), mask, "outside")
    assert torch.all(p_out[mask.expand_as(p_out)] == 1.0)
    assert torch.equal(p_out[~mask.expand_as(p_out)], to_unit(pred)[~mask.expand_as(p_out)])

    m = StereoMetrics()
    m.update(pred, gt, mask)
    r = m.compute()
    assert r["psnr_outside"] == 100.0 and r["ms_ssim_outside"] == pytest.approx(1.0, abs=1e-6)
    assert r["lpips_outside"] == pytest.approx(0.0, abs=1e-6)
    assert r["psnr_inside"] < 30 and r["ms_ssim_inside"] < 1.0 and r["lpips_inside"] > 0.01
    # With the error only inside, whitening the outside changes no squared error: same MSE.
    assert r["psnr_inside"] == pytest.approx(r["psnr"], abs=1e-4)
    assert r["n_videos"] == r["n_videos_inside"] == r["n_videos_outside"] == 1.0

    m = StereoMetrics(lpips_net=None)  # and the mirror case: error only outside
    m.update(torch.where(mask, gt, noisy(gt, 0.3)), gt, mask)
    r = m.compute()
    assert r["psnr_inside"] == 100.0 and r["psnr_outside"] < 30


def test_empty_and_full_masks_are_skipped_and_counted():
    gt = real_video(48, frames=2, batch=2)
    pred = noisy(gt, 0.1)
    mask = no_mask(gt)
    mask[0, :, :, 10:20, 10:20] = True  # video 0 has holes, video 1 none
    m = StereoMetrics(lpips_net=None)
    m.update(pred, gt, mask)
    r = m.compute()
    assert r["n_videos"] == 2 and r["n_videos_inside"] == 1 and r["n_videos_outside"] == 2
    per = m.per_video()
    assert math.isnan(per["psnr_inside"][1]) and math.isfinite(per["psnr_inside"][0])
    assert r["psnr_inside"] == pytest.approx(per["psnr_inside"][0])  # the hole-free video is not averaged in

    m = StereoMetrics(lpips_net=None)
    m.update(pred, gt, no_mask(gt))
    with pytest.warns(RuntimeWarning, match="_inside is undefined"):
        r = m.compute()
    assert math.isnan(r["psnr_inside"]) and r["n_videos_inside"] == 0 and math.isfinite(r["psnr"])

    m = StereoMetrics(lpips_net=None)
    m.update(pred, gt, ~no_mask(gt))  # all hole: no "outside"
    with pytest.warns(RuntimeWarning, match="_outside is undefined"):
        assert m.compute()["n_videos_outside"] == 0


def test_per_video_averaging_vs_batch_reduction():
    gt = real_video(48, frames=2, batch=2)
    pred = gt.clone()
    pred[0] = noisy(gt[0], 0.02)
    pred[1] = noisy(gt[1], 0.3)
    mask = square_mask(gt, 8, 24)
    per_video = video_psnr(to_unit(pred), to_unit(gt))
    m = StereoMetrics(lpips_net=None)
    m.update(pred, gt, mask)
    r_video = m.compute()
    assert r_video["psnr"] == pytest.approx(float(per_video.mean()), abs=1e-4)
    # Splitting the batch does not change the per-video average.
    m2 = StereoMetrics(lpips_net=None)
    m2.update(pred[:1], gt[:1], mask[:1])
    m2.update(pred[1:], gt[1:], mask[1:])
    assert m2.compute() == pytest.approx(r_video)
    assert m2.per_video()["psnr"] == pytest.approx(per_video.tolist(), abs=1e-4)
    # The released code's batch reduction: PSNR of the MSE over the whole batch tensor.
    b = StereoMetrics(lpips_net=None, reduction="batch")
    b.update(pred, gt, mask)
    r_batch = b.compute()
    mse = (to_unit(pred) - to_unit(gt)).pow(2).mean()
    assert r_batch["psnr"] == pytest.approx(float(10 * torch.log10(1 / mse)), abs=1e-4)
    assert r_batch["psnr"] < r_video["psnr"] - 1  # the bad video dominates the pooled MSE
    assert r_batch["n_videos"] == 1


def test_lpips_metric_orders_noise_and_matches_network():
    gt = real_video(64, frames=2)
    mask = square_mask(gt, 16, 40)
    results = []
    for sigma in (0.02, 0.1, 0.3):
        m = StereoMetrics()
        m.update(noisy(gt, sigma), gt, mask)
        results.append(m.compute())
    lp = [r["lpips"] for r in results]
    assert lp[0] < lp[1] < lp[2] and lp[2] > 0.05  # 64 px frames: smaller than at 256 px
    assert [r["lpips_inside"] for r in results] == sorted(r["lpips_inside"] for r in results)
    direct = frame_lpips(to_unit(noisy(gt, 0.3)[0]), to_unit(gt[0]), lpips_network("alex")).mean()
    assert lp[2] == pytest.approx(float(direct), rel=1e-5)


@pytest.mark.filterwarnings("ignore:StereoMetrics")
def test_temporal_error():
    gt = real_video(48, frames=5) * 0.5  # keep away from the clamp
    zero = StereoMetrics(lpips_net=None)
    zero.update(gt, gt, no_mask(gt))
    assert zero.compute()["temporal_error"] == 0.0
    assert float(temporal_error(to_unit(gt + 0.2), to_unit(gt))[0]) == pytest.approx(0.0, abs=1e-6)  # static offset
    sign = torch.tensor([(-1.0) ** t for t in range(5)]).view(1, 5, 1, 1, 1)
    flicker = gt + 0.2 * sign  # +-0.1 in [0, 1] units, alternating: frame differences off by 0.2
    m = StereoMetrics(lpips_net=None)
    m.update(flicker, gt, no_mask(gt))
    assert m.compute()["temporal_error"] == pytest.approx(0.2, abs=1e-5)
    one = StereoMetrics(lpips_net=None)
    one.update(gt[:, :1], gt[:, :1], no_mask(gt[:, :1]))
    with pytest.warns(RuntimeWarning, match="temporal_error is undefined"):
        assert math.isnan(one.compute()["temporal_error"])


def test_keys_and_validation():
    gt = real_video(48, frames=2)
    m = StereoMetrics()
    m.update(gt, gt, no_mask(gt).float())  # float masks are thresholded
    with pytest.warns(RuntimeWarning):
        r = m.compute()
    assert list(r)[:10] == list(metric_keys()) and len(metric_keys()) == 10
    assert all(isinstance(v, float) for v in r.values())
    m.reset()
    with pytest.raises(DataError, match="mask"):
        m.update(gt, gt, torch.zeros(1, 2, 1, 10, 10, dtype=torch.bool))
    with pytest.raises(DataError, match="target shape"):
        m.update(gt, gt[:, :1], no_mask(gt))
    with pytest.raises(ConfigError, match="lpips_net"):
        StereoMetrics(lpips_net="squeeze")
    with pytest.raises(ConfigError, match="reduction"):
        StereoMetrics(reduction="dataset")
    with pytest.raises(ConfigError, match="ms_ssim_scales"):
        StereoMetrics(ms_ssim_scales=7)


@pytest.mark.filterwarnings("ignore:Skipping Gaussian Smoothing")  # the direct pytorch_msssim call below
def test_released_ms_ssim_spans_time_as_the_release():
    """module.eval.ms_ssim: released: pytorch_msssim on the 5-D video [B, 3, T, H, W], so its window runs over
    time too: reordering the frames of both videos changes it, while per-frame MS-SSIM cannot see the order."""
    from pytorch_msssim import ms_ssim

    gt = real_video(176, frames=12)  # the library needs frames > 160 px; 12 frames >= the 11-tap window
    pred = noisy(gt, 0.1)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    released = video_ms_ssim_released(to_unit(pred), to_unit(gt))
    shuffled = video_ms_ssim_released(to_unit(pred[:, order]), to_unit(gt[:, order]))
    assert abs(float(released - shuffled)) > 1e-3
    per_frame = video_ms_ssim(to_unit(pred), to_unit(gt), scales=5)
    reordered = video_ms_ssim(to_unit(pred[:, order]), to_unit(gt[:, order]), scales=5)
    assert float(per_frame) == pytest.approx(float(reordered))
    assert float(released) != pytest.approx(float(per_frame), abs=1e-3)
    five_d = ms_ssim(to_unit(pred).transpose(1, 2), to_unit(gt).transpose(1, 2), data_range=1.0)
    assert float(released) == pytest.approx(float(five_d), abs=1e-6)  # exactly the release's call
    # Through StereoMetrics, per video and with the release's batch reduction (its videos averaged).
    both_pred, both_gt = torch.cat([pred, gt]), torch.cat([gt, gt])
    m = StereoMetrics(lpips_net=None, ms_ssim_mode="released")
    m.update(both_pred, both_gt, square_mask(both_gt, 40, 90))
    assert m.per_video()["ms_ssim"] == pytest.approx([float(released), 1.0], abs=1e-5)
    b = StereoMetrics(lpips_net=None, ms_ssim_mode="released", reduction="batch")
    b.update(both_pred, both_gt, square_mask(both_gt, 40, 90))
    assert b.compute()["ms_ssim"] == pytest.approx((float(released) + 1.0) / 2, abs=1e-5)
    with pytest.raises(DataError, match="160 px"):
        video_ms_ssim_released(to_unit(gt[..., :64, :64]), to_unit(gt[..., :64, :64]))
    with pytest.raises(ConfigError, match="module.eval.ms_ssim"):
        StereoMetrics(lpips_net=None, ms_ssim_mode="3d")
