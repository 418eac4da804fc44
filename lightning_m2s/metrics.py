"""Evaluation metrics of the paper (Sec. 6, App. D.2) plus one temporal measure; LPIPS by real weights offline.

What is measured, per video, then averaged over the dataset (paper Sec. 6):

- **PSNR**: ``10 log10(1 / MSE)`` with the MSE over all frames, channels and pixels of the video,
  images mapped from [-1, 1] to [0, 1] and clamped. Identical videos give ``PSNR_CAP_DB`` (100 dB,
  i.e. the MSE is floored at 1e-10) instead of ``inf``, so averages stay finite.
- **MS-SSIM**: per frame (2-D, Wang et al. 2003 via torchmetrics), averaged over the frames. See
  :func:`ms_ssim_scales` for the number of scales at small resolutions. ``ms_ssim_mode="released"``
  computes it as the released evaluation does instead: pytorch_msssim on the whole video as one 5-D
  tensor ``[B, 3, T, H, W]``, so the Gaussian window and the downsampling also span time.
- **LPIPS**: per frame (default AlexNet backbone, real weights, see :func:`lpips_network` in lpips_net.py),
  averaged over the frames.
- each of the three **inside** the disocclusion mask M and **outside** it, as the paper's App. D.2
  and the released code define it: "inside" sets every pixel outside M to white (1.0) in both
  prediction and ground truth, "outside" sets every pixel inside M to white; the metrics are then
  computed over the full frame as usual. A video whose mask is empty (no disoccluded pixel in any
  frame) has no "inside" value: it is skipped for the ``*_inside`` averages and counted in
  ``n_videos_inside``; likewise a video that is all hole is skipped for ``*_outside``.
- **temporal_error** (beyond the paper): ``mean |(p[t+1] - p[t]) - (g[t+1] - g[t])|`` over
  consecutive frame pairs, channels and pixels, in [0, 1] intensity units. It is 0 when the
  prediction changes over time exactly as the ground truth does (a constant offset or a static
  error costs nothing) and grows with flicker: frame-to-frame changes the ground truth does not
  have. Needs >= 2 frames; warp-free, so it also penalises nothing the ground truth itself does.

:class:`StereoMetrics` accumulates these over batches (torchmetrics ``Metric``, so per-stage
instances in a LightningModule and DDP gathering work); ``compute()`` returns a dict of floats and
``per_video()`` the values of every video (for spread plots).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
from torchmetrics.utilities import dim_zero_cat

from lightning_m2s.errors import ConfigError, DataError
from lightning_m2s.lpips_net import (  # noqa: F401 - build_lpips, _cached_lpips: importable from here too
    LPIPSDistance, _cached_lpips, build_lpips, lpips_network)
from lightning_m2s.lpips_weights import BACKBONES

PSNR_CAP_DB = 100.0  # PSNR of a perfect reconstruction (MSE floored at 1e-10)
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest to coarsest
MS_SSIM_KERNEL = 11  # Gaussian window size of standard SSIM / MS-SSIM
MS_SSIM_SIGMA = 1.5
REGIONS = ("full", "inside", "outside")
METRICS = ("psnr", "ms_ssim", "lpips")
MS_SSIM_MODES = ("per_frame", "released")  # 2-D per frame, averaged (paper text) | 3-D over the video (released code)
RELEASED_MS_SSIM_MIN_SIDE = (MS_SSIM_KERNEL - 1) * 16  # pytorch_msssim: frames must be larger (4 downsamplings)


def metric_keys(lpips: bool = True) -> tuple[str, ...]:
    """The keys of :meth:`StereoMetrics.compute` (besides the ``n_videos*`` counts), in order."""
    names = METRICS if lpips else METRICS[:2]
    keys = [m if r == "full" else f"{m}_{r}" for m in names for r in REGIONS]
    return (*keys, "temporal_error")


# --------------------------------------------------------------------------------------------
# Functional metrics on videos [B, T, 3, H, W]
# --------------------------------------------------------------------------------------------


def _check_videos(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor | None:
    if pred.ndim != 5 or pred.shape[2] != 3:
        raise DataError(f"prediction must be a video batch [B, T, 3, H, W], got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise DataError(f"target shape {tuple(target.shape)} differs from prediction shape {tuple(pred.shape)}")
    if mask is None:
        return None
    if mask.ndim == 4:
        mask = mask.unsqueeze(2)
    if mask.shape != (*pred.shape[:2], 1, *pred.shape[3:]):
        raise DataError(f"mask must be [B, T, 1, H, W] = {(*pred.shape[:2], 1, *pred.shape[3:])}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask > 0.5


def to_unit(video: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped, float32."""
    return ((video.float() + 1.0) * 0.5).clamp_(0.0, 1.0)


def restrict(pred01: Tensor, target01: Tensor, mask: Tensor, region: str) -> tuple[Tensor, Tensor]:
    """App. D.2: keep ``region`` ("full", "inside" or "outside" the bool ``mask``) and paint the
    rest white (1.0) in both videos (in [0, 1])."""
    if region == "full":
        return pred01, target01
    if region not in REGIONS:
        raise ConfigError(f"region {region!r} is not one of {REGIONS}")
    keep = mask if region == "inside" else ~mask
    return pred01.masked_fill(~keep, 1.0), target01.masked_fill(~keep, 1.0)


def psnr_from_mse(mse: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / mse.clamp_min(10.0 ** (-PSNR_CAP_DB / 10.0)))


def video_psnr(pred01: Tensor, target01: Tensor) -> Tensor:
    """PSNR per video ``[B]`` (MSE over T, C, H, W; data range 1; capped at ``PSNR_CAP_DB``)."""
    mse = (pred01.float() - target01.float()).pow(2).flatten(1).mean(1)
    return psnr_from_mse(mse)


def ms_ssim_scales(height: int, width: int, kernel_size: int = MS_SSIM_KERNEL) -> int:
    """Number of MS-SSIM scales for a frame size: the standard 5 where they fit, fewer below.

    Kept standard per scale (11-tap Gaussian, sigma 1.5, K1 0.01, K2 0.03, Wang et al.'s betas),
    so that at the paper's 512 px (and anything >= 176 px) this is exactly the usual 5-scale
    MS-SSIM the published numbers use. At small frames the coarsest scales are dropped instead of
    shrinking the window: the largest s <= 5 such that the coarsest scale (side / 2^(s-1)) is at
    least one window wide and torchmetrics' size check passes. Examples: 48-64 px -> 3 scales,
    128 px -> 4, 256 and 512 px -> 5; below 11 px there is no valid SSIM and a DataError is raised.
    The betas of the kept scales are renormalised to sum to 1 (see :func:`ms_ssim_betas`).
    """
    side = min(height, width)
    for s in range(len(MS_SSIM_BETAS), 0, -1):
        coarsest = side // 2 ** (s - 1)
        if coarsest >= kernel_size and side // max(1, s - 1) ** 2 > kernel_size - 1 and side >= 2**s:
            return s
    raise DataError(f"frames of {height}x{width} px are smaller than the {kernel_size}-px MS-SSIM window")


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    """Wang et al.'s betas for the finest ``scales`` scales, renormalised to sum to 1 (so the
    exponents keep the weight of the full 5-scale product and identical images still give 1)."""
    betas = MS_SSIM_BETAS[:scales]
    total = sum(betas)
    return tuple(b / total for b in betas)


def frame_ms_ssim(pred01: Tensor, target01: Tensor, scales: int | Literal["auto"] = "auto",
                  kernel_size: int = MS_SSIM_KERNEL, chunk: int = 16) -> Tensor:
    """MS-SSIM per frame: ``[N, 3, H, W]`` in [0, 1] -> ``[N]``.

    torchmetrics' implementation with ``normalize="relu"`` (negative contrast terms clamp to 0, as
    pytorch_msssim, the released code's library, does: without it a fractional exponent of a
    negative value is NaN on heavily corrupted small frames).
    """
    h, w = pred01.shape[-2:]
    if scales == "auto":
        scales = ms_ssim_scales(h, w, kernel_size)
    out = [
        multiscale_structural_similarity_index_measure(
            p.float(), g.float(), gaussian_kernel=True, sigma=MS_SSIM_SIGMA * kernel_size / MS_SSIM_KERNEL,
            kernel_size=kernel_size, reduction="none", data_range=1.0, betas=ms_ssim_betas(scales), normalize="relu",
        ).reshape(-1)
        for p, g in zip(pred01.split(chunk), target01.split(chunk))  # bounded memory at 512 px
    ]
    return torch.cat(out)


def video_ms_ssim(pred01: Tensor, target01: Tensor, scales: int | Literal["auto"] = "auto",
                  kernel_size: int = MS_SSIM_KERNEL) -> Tensor:
    """MS-SSIM per video ``[B]``: per-frame MS-SSIM averaged over the T frames."""
    b, t = pred01.shape[:2]
    return frame_ms_ssim(pred01.flatten(0, 1), target01.flatten(0, 1), scales, kernel_size).view(b, t).mean(1)


def video_ms_ssim_released(pred01: Tensor, target01: Tensor, kernel_size: int = MS_SSIM_KERNEL) -> Tensor:
    """MS-SSIM per video ``[B]`` as the released evaluation computes it: pytorch_msssim's 5-scale MS-SSIM
    on ``[B, 3, T, H, W]`` (data range 1, 11-tap Gaussian, sigma 1.5), whose window and 2x average
    pooling run over T as well as H and W; along a dimension shorter than the window (T < 11 at the
    coarser scales) the library skips the smoothing, as it did for the release. Needs frames wider
    than 160 px (the library's bound for four downsamplings)."""
    from pytorch_msssim import ms_ssim

    if min(pred01.shape[-2:]) <= (kernel_size - 1) * 16:
        raise DataError(f"released MS-SSIM (module.eval.ms_ssim: released) needs frames larger than "
                        f"{(kernel_size - 1) * 16} px, got {tuple(pred01.shape[-2:])}; use per_frame")
    p, g = pred01.float().transpose(1, 2), target01.float().transpose(1, 2)  # [B, 3, T, H, W]
    with warnings.catch_warnings():  # "Skipping Gaussian Smoothing at dimension ...": the release's behaviour
        warnings.simplefilter("ignore", UserWarning)
        values = [ms_ssim(p[i : i + 1], g[i : i + 1], data_range=1.0, size_average=False, win_size=kernel_size)
                  for i in range(p.shape[0])]  # one video at a time: bounded memory at 512 px
    return torch.cat(values).reshape(-1)


@torch.no_grad()
def frame_lpips(pred01: Tensor, target01: Tensor, net: LPIPSDistance, chunk: int = 32) -> Tensor:
    """LPIPS per frame: ``[N, 3, H, W]`` in [0, 1] -> ``[N]`` (fed to the network in [-1, 1])."""
    net = net.to(pred01.device)
    out = [net(p * 2 - 1, g * 2 - 1) for p, g in zip(pred01.split(chunk), target01.split(chunk))]
    return torch.cat(out).float()


def video_lpips(pred01: Tensor, target01: Tensor, net: LPIPSDistance, chunk: int = 32) -> Tensor:
    """LPIPS per video ``[B]``: per-frame LPIPS averaged over the T frames."""
    b, t = pred01.shape[:2]
    return frame_lpips(pred01.flatten(0, 1), target01.flatten(0, 1), net, chunk).view(b, t).mean(1)


def temporal_error(pred01: Tensor, target01: Tensor) -> Tensor:
    """Temporal error per video ``[B]`` (needs T >= 2):
    ``mean over t, c, y, x of |(p[t+1] - p[t]) - (g[t+1] - g[t])|`` in [0, 1] units.

    0 for a prediction whose frame-to-frame changes equal the ground truth's (identical videos, or
    a constant offset); positive for flicker or temporally unstable hole filling.
    """
    if pred01.shape[1] < 2:
        raise DataError(f"temporal_error needs at least 2 frames, got T={pred01.shape[1]}")
    dp = pred01[:, 1:].float() - pred01[:, :-1].float()
    dg = target01[:, 1:].float() - target01[:, :-1].float()
    return (dp - dg).abs().flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# The accumulating metric
# --------------------------------------------------------------------------------------------


class StereoMetrics(Metric):
    """PSNR / MS-SSIM / LPIPS over the full frame, inside and outside the disocclusion mask, plus
    temporal error; per video, averaged over everything seen since the last ``reset()``.

    ``update(pred, target, mask)``: ``pred``, ``target`` ``[B, T, 3, H, W]`` in [-1, 1] (mapped to
    [0, 1] and clamped), ``mask`` bool ``[B, T, 1, H, W]`` (True = disoccluded; a float mask is
    thresholded at 0.5, so {0, 1} masks work; ``[B, T, H, W]`` is accepted too).

    ``compute()`` -> dict of floats: ``psnr, psnr_inside, psnr_outside, ms_ssim, ms_ssim_inside,
    ms_ssim_outside, lpips, lpips_inside, lpips_outside, temporal_error`` and the counts
    ``n_videos, n_videos_inside, n_videos_outside`` (videos that had a defined inside / outside
    value: a video with an empty mask has no inside value and is left out of the ``*_inside``
    averages, one with a full mask out of ``*_outside``; with T = 1 temporal_error is undefined).
    A key with no defined value at all is NaN **with a RuntimeWarning** naming it.

    ``per_video()`` -> dict key -> list of floats, one per video (NaN where undefined).

    Options:
    - ``lpips_net``: "alex" (default: the LPIPS authors' recommended forward metric and the lpips
      package default, which the paper's unqualified "LPIPS [zhang2018perceptual]" denotes) or
      "vgg" (what the released evaluation code uses); ``None`` leaves LPIPS out.
    - ``reduction``: "video" (paper: values per video, averaged over videos) or "batch" (the
      released code: each ``update()`` batch is one unit: PSNR from the MSE over the whole batch
      tensor, MS-SSIM and LPIPS averaged over the batch's frames (or its videos, "released" MS-SSIM);
      the units are then averaged).
    - ``ms_ssim_mode``: "per_frame" (2-D per frame, averaged: the paper text) or "released"
      (pytorch_msssim on the 5-D video, the window spanning time; frames > 160 px, see
      :func:`video_ms_ssim_released`).
    - ``ms_ssim_scales``: "auto" (see :func:`ms_ssim_scales`) or a fixed 1..5 (fix it when
      comparing runs at different resolutions); ``ms_ssim_kernel``: Gaussian window size (odd).

    Call ``update()`` (not ``forward``) from training code to avoid computing twice.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        lpips_net: str | None = "alex",
        reduction: Literal["video", "batch"] = "video",
        ms_ssim_scales: int | Literal["auto"] = "auto",
        ms_ssim_kernel: int = MS_SSIM_KERNEL,
        lpips_checkpoint: str | os.PathLike | None = None,
        lpips_chunk: int = 32,
        ms_ssim_mode: str = "per_frame",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if lpips_net is not None and lpips_net not in BACKBONES:
            raise ConfigError(f"metrics.lpips_net: {lpips_net!r} is not one of {sorted(BACKBONES)} (or null)")
        if reduction not in ("video", "batch"):
            raise ConfigError(f"metrics.reduction: {reduction!r} is not 'video' or 'batch'")
        if ms_ssim_scales != "auto" and not (isinstance(ms_ssim_scales, int) and 1 <= ms_ssim_scales <= 5):
            raise ConfigError(f"metrics.ms_ssim_scales: {ms_ssim_scales!r} is not 'auto' or an integer 1..5")
        if not (isinstance(ms_ssim_kernel, int) and ms_ssim_kernel >= 3 and ms_ssim_kernel % 2 == 1):
            raise ConfigError(f"metrics.ms_ssim_kernel: {ms_ssim_kernel!r} is not an odd integer >= 3")
        if ms_ssim_mode not in MS_SSIM_MODES:
            raise ConfigError(f"module.eval.ms_ssim: {ms_ssim_mode!r} is not one of {MS_SSIM_MODES}")
        self.ms_ssim_mode = ms_ssim_mode
        self.lpips_net = lpips_net
        self.reduction = reduction
        self.ms_ssim_scales = ms_ssim_scales
        self.ms_ssim_kernel = ms_ssim_kernel
        self.lpips_checkpoint = lpips_checkpoint
        self.lpips_chunk = lpips_chunk
        self.metric_names = metric_keys(lpips_net is not None)
        if lpips_net is not None:  # fail at construction, not at the first validation batch
            lpips_network(lpips_net, lpips_checkpoint)
        # One row per video (or per batch with reduction="batch"); "cat" gathers rows across ranks.
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("valid", default=[], dist_reduce_fx="cat")

    # The LPIPS network is deliberately not a submodule: it would land in every checkpoint.
    def _lpips(self) -> LPIPSDistance:
        return lpips_network(self.lpips_net, self.lpips_checkpoint)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        mask = _check_videos(pred, target, mask)
        p01, g01 = to_unit(pred), to_unit(target)
        frames = p01.shape[1]  # per video, before a "batch" reduction joins them
        if self.reduction == "batch":  # the whole batch is one unit: [1, B*T, 3, H, W]
            p01, g01, mask = p01.flatten(0, 1)[None], g01.flatten(0, 1)[None], mask.flatten(0, 1)[None]
        b, t = p01.shape[:2]
        holes = mask.flatten(1).any(1)  # [B]
        known = (~mask).flatten(1).any(1)
        defined = {"full": torch.ones_like(holes), "inside": holes, "outside": known}
        # Three regions as one frame batch: [3 * B * T, 3, H, W]
        regions = [restrict(p01, g01, mask, r) for r in REGIONS]
        p_all = torch.cat([p for p, _ in regions])  # [3B, T, 3, H, W]
        g_all = torch.cat([g for _, g in regions])
        cols: dict[str, Tensor] = {}
        if self.ms_ssim_mode == "released":  # on each video [3 regions * videos], then averaged per unit
            as_videos = lambda x: x.reshape(-1, frames, *x.shape[2:])  # noqa: E731
            ms_ssim = video_ms_ssim_released(as_videos(p_all), as_videos(g_all), self.ms_ssim_kernel)
            ms_ssim = ms_ssim.reshape(3 * b, -1).mean(1)
        else:
            ms_ssim = video_ms_ssim(p_all, g_all, self.ms_ssim_scales, self.ms_ssim_kernel)
        per = {"psnr": psnr_from_mse((p_all - g_all).pow(2).flatten(1).mean(1)), "ms_ssim": ms_ssim}
        if self.lpips_net is not None:
            per["lpips"] = video_lpips(p_all, g_all, self._lpips(), self.lpips_chunk)
        ok: dict[str, Tensor] = {}
        for name, vals in per.items():
            for i, r in enumerate(REGIONS):
                key = name if r == "full" else f"{name}_{r}"
                cols[key], ok[key] = vals[i * b:(i + 1) * b], defined[r]
        if t >= 2:
            cols["temporal_error"] = temporal_error(p01, g01)
            ok["temporal_error"] = torch.ones_like(holes)
        else:
            cols["temporal_error"] = torch.full((b,), float("nan"), device=p01.device)
            ok["temporal_error"] = torch.zeros_like(holes)
        values = torch.stack([cols[k].float() for k in self.metric_names], 1)  # [B, K]
        valid = torch.stack([ok[k] for k in self.metric_names], 1)  # [B, K]
        # Stored flat and as float: a rank that saw no video syncs an empty 1-D float tensor (torchmetrics),
        # which only concatenates with other ranks' states if theirs are 1-D floats too.
        self.values.append(values.masked_fill(~valid, float("nan")).flatten())
        self.valid.append(valid.float().flatten())

    def _rows(self) -> tuple[Tensor, Tensor]:
        if isinstance(self.values, list) and not self.values:
            return torch.zeros(0, len(self.metric_names)), torch.zeros(0, len(self.metric_names), dtype=torch.bool)
        K = len(self.metric_names)
        return dim_zero_cat(self.values).reshape(-1, K), dim_zero_cat(self.valid).reshape(-1, K).bool()

    def compute(self) -> dict[str, float]:
        values, valid = self._rows()
        out: dict[str, float] = {}
        for j, key in enumerate(self.metric_names):
            n = int(valid[:, j].sum())
            if n == 0:
                why = {"inside": "no video had a disoccluded pixel", "outside": "every video was all hole",
                       "temporal_error": "no video had 2 or more frames"}
                reason = next((v for k, v in why.items() if key.endswith(k)), "no video was seen")
                warnings.warn(f"StereoMetrics: {key} is undefined ({reason}); reporting NaN", RuntimeWarning, stacklevel=2)
                out[key] = math.nan
            else:
                out[key] = float(values[valid[:, j], j].double().mean())
        out["n_videos"] = float(values.shape[0])
        j_in, j_out = self.metric_names.index("psnr_inside"), self.metric_names.index("psnr_outside")
        out["n_videos_inside"] = float(valid[:, j_in].sum())
        out["n_videos_outside"] = float(valid[:, j_out].sum())
        return out

    def per_video(self) -> dict[str, list[float]]:
        """Every video's value per key (rows of the "batch" units with reduction="batch"); NaN
        where a value is undefined (inside of an empty mask, outside of a full one, T = 1)."""
        values, valid = self._rows()
        values = values.masked_fill(~valid, float("nan"))
        return {k: values[:, j].tolist() for j, k in enumerate(self.metric_names)}
