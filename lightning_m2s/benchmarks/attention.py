"""`m2s bench attention`: disocclusion full attention over SVD's stock per-frame attention.

1. Per layer at SVD's real shapes (16 frames; 64x64 / 32x32 / 16x16 token grids with 320 / 640 /
   1280 channels, head dim 64; 5% of each frame's tokens masked): the time of
   `disocclusion_attention` over stock SDPA, against the theoretical 1 + p * N (p = masked
   fraction, N = frames): masked queries see N times more keys. Stock and masked runs alternate
   and the best of each is kept (the machine is shared and noisy). Goal: within 20% of theory.
2. Whole UNet: FLOPs of img2vid-xt's UNet (diffusers' defaults = SVD, conv_in widened to 13) at
   16x512^2 on the meta device (no weights), without and with the disocclusion processors, for a
   realistic mask: holes of forward-splatting a layered scene (background ramp + three objects
   moving over the clip, released disparity scale up to int(0.05 * 512) px), closed 11x11 and
   dilated 3x3 as the released code, scaled so ~5% of pixels are holes. Goal: <= 5% (area policy).
   The extra FLOPs are p * N times the attention FLOPs of each layer, whatever the implementation,
   plus (with the released pre-norm keys/values, the default) a K/V projection of every token of the
   layers with a masked token; `unet_overhead_area_normed_kv` is the figure without it.
3. End to end: the same extra FLOPs over the whole conversion (UNet + two VAE encodes + temporal
   decode), the quantity behind the paper's 2.0 s -> 2.1 s.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lightning_m2s.benchmarks.model import meta_flops
from lightning_m2s.models.attention import disocclusion_attention, install_attention_processors, layer_grid, token_mask_for_grid

# (token grid side, channels) of SVD's spatial transformers; heads = channels / 64
SVD_LAYERS = [(64, 320), (32, 640), (16, 1280)]
HEAD_DIM = 64


def _close_dilate(holes: torch.Tensor, close: int = 11, dilate: int = 3) -> torch.Tensor:
    """Closing (dilate, erode) with a close x close square, then a dilate x dilate dilation: [N, H, W] bool."""
    x = holes.float()[:, None]
    x = F.max_pool2d(x, close, 1, close // 2)
    x = -F.max_pool2d(-x, close, 1, close // 2)
    x = F.max_pool2d(x, dilate, 1, dilate // 2)
    return x[:, 0] > 0.5


def layered_scene_disparity(frames: int, size: int, d_max: float) -> torch.Tensor:
    """Disparity [T, H, W] of a layered scene: a background ramp and three objects panning left."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    out = []
    for t in range(frames):
        disp = 0.1 * d_max + 0.15 * d_max * y / size  # far background, nearer towards the bottom
        objects = [  # (centre x, centre y, half-width, half-height, disparity as a fraction of d_max)
            (0.30 * size - 2 * t, 0.55 * size, 0.10 * size, 0.30 * size, 1.0),
            (0.62 * size - 3 * t, 0.45 * size, 0.07 * size, 0.18 * size, 0.6),
            (0.80 * size - 1 * t, 0.70 * size, 0.05 * size, 0.12 * size, 0.4),
        ]
        for cx, cy, hw, hh, frac in sorted(objects, key=lambda o: o[4]):  # nearest drawn last
            inside = ((x - cx) / hw) ** 2 + ((y - cy) / hh) ** 2 <= 1.0  # ellipses: curved edges
            disp = torch.where(inside, torch.full_like(disp, frac * d_max), disp)
        out.append(disp)
    return torch.stack(out)


def realistic_hole_mask(frames: int = 16, size: int = 512, target: float = 0.05) -> tuple[torch.Tensor, float]:
    """Bool hole mask [T, H, W] of a splatted layered scene with about `target` hole fraction."""
    from lightning_m2s.geometry import forward_splat

    def holes_for(d_max: float, n: int = frames) -> torch.Tensor:
        disp = layered_scene_disparity(n, size, d_max)
        image = torch.zeros(n, 1, size, size)
        _, holes = forward_splat(image, disp)
        return _close_dilate(holes)

    lo, hi = 1.0, float(int(0.05 * size)) * 2
    for _ in range(10):  # bisection on the disparity scale
        mid = (lo + hi) / 2
        if holes_for(mid, min(frames, 4)).float().mean().item() < target:  # first frames suffice
            lo = mid
        else:
            hi = mid
    holes = holes_for((lo + hi) / 2)
    return holes, (lo + hi) / 2


def _layer_ratios(frames: int, layers, p: float, repeats: int) -> dict:
    results = {}
    gen = torch.Generator().manual_seed(0)
    for side, channels in layers:
        L, heads = side * side, channels // HEAD_DIM
        # projections as diffusers lays them out: [B*T, L, heads*d] viewed as [B*T, heads, L, d]
        q, k, v = (torch.randn(frames, L, heads, HEAD_DIM, generator=gen).transpose(1, 2) for _ in range(3))
        n = max(1, round(p * L))
        mask = torch.zeros(frames, L, dtype=torch.bool)
        for t in range(frames):
            mask[t, torch.randperm(L, generator=gen)[:n]] = True
        stock = masked = float("inf")
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)  # warm-up
            disocclusion_attention(q, k, v, mask, frames)
            for _ in range(repeats):  # alternate, keep the best of each
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v)
                stock = min(stock, time.perf_counter() - t0)
                t0 = time.perf_counter()
                disocclusion_attention(q, k, v, mask, frames)
                masked = min(masked, time.perf_counter() - t0)
        p_eff = n / L
        theory = 1 + p_eff * frames
        ratio = masked / stock
        results[f"{side}x{side}_c{channels}"] = dict(
            tokens=L, heads=heads, masked_fraction=round(p_eff, 4), stock_s=round(stock, 4),
            masked_s=round(masked, 4), ratio=round(ratio, 3), theory=round(theory, 3),
            ratio_over_theory=round(ratio / theory, 3), within_20pct=abs(ratio / theory - 1) <= 0.2,
        )
    return results


def unet_flops_overhead(frames: int = 16, size: int = 512, target: float = 0.05, policies=("area", "any", "bilinear")) -> dict:
    """Meta-device FLOPs of img2vid-xt's UNet with and without the disocclusion processors."""
    from diffusers import UNetSpatioTemporalConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_m2s.models.unet import widen_conv_in

    holes, d_max = realistic_hole_mask(frames, size, target)
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()  # diffusers' defaults are SVD's architecture
    unet.to("meta")  # a few buffers are created on the CPU regardless of the default device
    widen_conv_in(unet, left_condition=True)
    controller = install_attention_processors(unet, full_attention=True)
    h = size // 8
    x = torch.empty(1, frames, 13, h, h, device="meta")
    context = torch.empty(1, frames, unet.config.cross_attention_dim, device="meta")
    time_ids = torch.empty(1, 3, device="meta")

    def count() -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, torch.empty(1, device="meta"), context, time_ids)
        return counter.get_total_flops()

    controller.set_mask(None)
    base = count()
    out = dict(unet_tflops=round(base / 1e12, 3), hole_fraction=round(holes.float().mean().item(), 4),
               splat_d_max_px=round(d_max, 2))
    for policy in policies:
        controller.policy = policy
        controller.set_mask(holes[None], latent_hw=(h, h))
        flops = count()
        grids = sorted({layer_grid(h * h // 4**i, (h, h)) for i in range(4)}, reverse=True)
        fractions = {f"{g[0]}x{g[1]}": round(token_mask_for_grid(holes.float(), g, policy, controller.threshold, (h, h)).float().mean().item(), 4) for g in grids}
        out[f"unet_overhead_{policy}"] = round(flops / base - 1, 4)
        out[f"token_fraction_{policy}"] = fractions
    # The released keys/values (the block input before norm1) need their own K/V projections of every
    # token; "normed" reuses the per-frame attention's.
    install_attention_processors(unet, full_attention=True, kv_source="normed").set_mask(holes[None], latent_hw=(h, h))
    out["unet_overhead_area_normed_kv"] = round(count() / base - 1, 4)
    return out


def run(quick: bool = False) -> dict:
    frames = 4 if quick else 16
    layers = SVD_LAYERS[1:] if quick else SVD_LAYERS
    result = {
        "frames": frames,
        "layers": _layer_ratios(frames, layers, p=0.05, repeats=1 if quick else 3),
    }
    # The whole-UNet count is cheap on the meta device; quick mode uses a smaller clip.
    flops = unet_flops_overhead(frames=frames, size=256 if quick else 512)
    result["whole_unet"] = {"frames": frames, "size": 256 if quick else 512, **flops}
    result["meets_goal_area_5pct"] = flops["unet_overhead_area"] <= 0.05
    # Where the 5% goal would be met: the attention part grows linearly with the hole fraction, the
    # pre-norm K/V projections cost the same whatever the fraction
    kv_projections = flops["unet_overhead_area"] - flops["unet_overhead_area_normed_kv"]
    result["whole_unet"]["hole_fraction_meeting_5pct_goal_est"] = round(
        flops["hole_fraction"] * max(0.05 - kv_projections, 0.0) / max(flops["unet_overhead_area_normed_kv"], 1e-9), 4)
    # What the paper timed (2.0 s -> 2.1 s): the whole conversion, UNet + two VAE encodes + temporal decode
    vae = meta_flops(frames=frames, size=256 if quick else 512)
    pipeline = vae["unet_forward_tflop"] + 2 * vae["vae_encode_tflop"] + vae["vae_decode_tflop"]
    extra = flops["unet_overhead_area"] * flops["unet_tflops"]
    result["end_to_end"] = dict(pipeline_tflops=round(pipeline, 3), flop_overhead_area=round(extra / pipeline, 4))
    return result
