"""`m2s bench model`: tiny-config step times and memory; img2vid-xt UNet / VAE FLOPs on the meta device.

1. The embedded default (tiny UNet + tiny VAE + pooled frame embedding, full attention on, 13
   channels) on its buckets 4x128^2, 16x64^2, 25x48^2 (batch 1, ~5% hole strip): the UNet one-step
   forward alone, the whole forward (condition encode + one step + decode) and forward+backward of
   the end-to-end loss (latent L2 + L1 through the decoder). Peak RSS is the process's peak after
   the bucket (buckets run smallest first; the figure is monotonic).
2. FLOPs at 16x512^2 on the meta device (no weights): img2vid-xt's UNet (diffusers' defaults, 13
   input channels) forward, the SVD VAE encoder (16 frames) and temporal decoder (one 16-frame chunk).
"""

from __future__ import annotations


import torch

from lightning_m2s.bench import best_time, peak_rss_mb

BUCKETS = [(4, 128), (16, 64), (25, 48)]  # (frames, side) of the embedded default

# The VAE of stable-video-diffusion-img2vid-xt (vae/config.json)
SVD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    sample_size=768, scaling_factor=0.18215,
)


def tiny_buckets(repeats: int, buckets=BUCKETS) -> dict:
    from lightning_m2s.models.refiner import build_refiner

    torch.manual_seed(0)
    model = build_refiner(pretrained=None)  # random tiny weights: the cost, not the result
    out = {}
    for frames, side in buckets:
        left, warped, right = (torch.rand(1, frames, 3, side, side) * 2 - 1 for _ in range(3))
        mask = torch.zeros(1, frames, 1, side, side, dtype=torch.bool)
        mask[..., side // 2 : side // 2 + max(1, side // 20)] = True  # ~5% hole strip

        model.eval()
        with torch.no_grad():
            cond = model.build_conditioning(left, warped, mask)
            unet_s = best_time(lambda: model.predict_one_step(cond), repeats)
            fwd_s = best_time(lambda: model.decode(model.predict_one_step(model.build_conditioning(left, warped, mask))), repeats)

        model.train()

        def train_step():
            cond = model.build_conditioning(left, warped, mask)
            target = model.encode_target(right)
            latent_loss, pred = model.denoiser.latent_loss(target, cond)
            loss = latent_loss.mean() + (model.decode(pred) - right).abs().mean()
            loss.backward()
            model.unet.zero_grad(set_to_none=True)

        fwd_bwd_s = best_time(train_step, repeats)
        out[f"{frames}x{side}^2"] = dict(
            latent=f"{frames}x{model.vae.latent_channels}x{side // model.vae.downscale}x{side // model.vae.downscale}", unet_forward_s=round(unet_s, 4),
            forward_s=round(fwd_s, 4), forward_backward_s=round(fwd_bwd_s, 4), peak_rss_mb=round(peak_rss_mb(), 1),
        )
    return out


def meta_flops(frames: int = 16, size: int = 512) -> dict:
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_m2s.models.unet import widen_conv_in

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    h = size // 8
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
    unet.to("meta"), vae.to("meta")  # a few buffers are created on the CPU regardless
    widen_conv_in(unet, left_condition=True)
    x = torch.empty(1, frames, 13, h, h, device="meta")
    ctx = torch.empty(1, 1, unet.config.cross_attention_dim, device="meta")  # SVD: one image embedding
    ids = torch.empty(1, 3, device="meta")
    video = torch.empty(frames, 3, size, size, device="meta")
    z = torch.empty(frames, 4, h, h, device="meta")
    return {
        "clip": f"{frames}x{size}^2",
        "unet_forward_tflop": round(count(lambda: unet(x, torch.empty(1, device="meta"), ctx, ids)), 3),
        "vae_encode_tflop": round(count(lambda: vae.encode(video).latent_dist.mode()), 3),
        "vae_decode_tflop": round(count(lambda: vae.decode(z, num_frames=frames)), 3),
    }


def run(quick: bool = False) -> dict:
    buckets = BUCKETS[1:2] if quick else BUCKETS
    return {
        "tiny": tiny_buckets(repeats=1 if quick else 3, buckets=buckets),
        "img2vid_xt_meta": meta_flops(),
    }
